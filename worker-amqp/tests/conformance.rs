//! The worker-core conformance suite against the real RabbitMQ (`AMQP_URL`, default
//! local), with classic and with quorum queues, each consuming and taking jobs with
//! `basic.get`. The run gets a
//! virtual host of its own, made through the management API; the next run deletes
//! it once its process is gone.

// Setup failures must stop the run loudly, with their text.
#![allow(clippy::expect_used)]

use std::sync::OnceLock;

use worker_amqp::{AmqpBroker, AmqpConfig, QueueType};

const MANAGEMENT: &str = "http://127.0.0.1:15672";

fn management() -> String {
    std::env::var("AMQP_MANAGEMENT_URL").unwrap_or_else(|_| MANAGEMENT.into())
}

/// Create this process's virtual host (once) and drop those of finished runs.
fn vhost() -> &'static str {
    static VHOST: OnceLock<String> = OnceLock::new();
    VHOST.get_or_init(|| {
        let name = format!("wp-conformance-{}", std::process::id());
        let made = name.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let http = reqwest::Client::new();
                let base = management();
                let api = |path: &str| format!("{base}/api/{path}");
                let vhosts: Vec<serde_json::Value> = http
                    .get(api("vhosts?columns=name"))
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await
                    .expect(
                        "management API (enable it: rabbitmq-plugins enable rabbitmq_management)",
                    )
                    .json()
                    .await
                    .expect("vhost list");
                for v in vhosts {
                    let Some(old) = v["name"].as_str() else {
                        continue;
                    };
                    let Some(pid) = old.strip_prefix("wp-conformance-") else {
                        continue;
                    };
                    if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                        continue;
                    }
                    let _ = http
                        .delete(api(&format!("vhosts/{old}")))
                        .basic_auth("guest", Some("guest"))
                        .send()
                        .await;
                }
                let ok = http
                    .put(api(&format!("vhosts/{made}")))
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await
                    .expect("create vhost");
                assert!(ok.status().is_success(), "create vhost: {}", ok.status());
                let ok = http
                    .put(api(&format!("permissions/{made}/guest")))
                    .basic_auth("guest", Some("guest"))
                    .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
                    .send()
                    .await
                    .expect("grant permissions");
                assert!(ok.status().is_success(), "permissions: {}", ok.status());
            });
        })
        .join()
        .expect("vhost setup");
        name
    })
}

fn config() -> AmqpConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let host = std::env::var("AMQP_HOST").unwrap_or_else(|_| "127.0.0.1:5672".into());
    let url = format!("amqp://guest:guest@{host}/{}", vhost());
    // Depth from the management API lags by its statistics interval; the suite
    // checks exact counts, so it reads this process's own.
    AmqpConfig::new(url)
        .management_url(management().replacen("://", "://guest:guest@", 1))
        .depth_from_management(false)
        .prefetch(100)
}

async fn classic() -> AmqpBroker {
    config().connect().await.expect("connect to RabbitMQ")
}

// A second worker: another connection to the same virtual host.
worker_core::conformance_suite!(classic(), peer = |_| classic());

mod quorum {
    use super::*;

    async fn quorum() -> AmqpBroker {
        config()
            .default_queue_type(QueueType::Quorum)
            .connect()
            .await
            .expect("connect to RabbitMQ")
    }

    worker_core::conformance_suite!(quorum(), peer = |_| quorum());
}

/// The same suite taking jobs with `basic.get` ([`FetchMode::Get`]).
mod get {
    use super::*;
    use worker_amqp::FetchMode;

    async fn classic() -> AmqpBroker {
        config()
            .fetch_mode(FetchMode::Get)
            .connect()
            .await
            .expect("connect to RabbitMQ")
    }

    worker_core::conformance_suite!(classic(), peer = |_| classic());

    mod quorum {
        use super::*;

        async fn quorum() -> AmqpBroker {
            config()
                .fetch_mode(FetchMode::Get)
                .default_queue_type(QueueType::Quorum)
                .connect()
                .await
                .expect("connect to RabbitMQ")
        }

        worker_core::conformance_suite!(quorum(), peer = |_| quorum());
    }
}
