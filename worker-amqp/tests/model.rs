//! The RabbitMQ backend agrees with the model of the `Broker` contract on random
//! sequences of operations, with the differences its crate documentation states
//! (duplicate ids stored, no checkpoints, due delays moved by RabbitMQ itself): on
//! classic queues, taking jobs by consuming and with `basic.get`. Leases and delays pass in real time: the
//! short ones last 800 ms, well beyond the 200 ms a fetch may wait for deliveries. The run gets a virtual host of its own, made and deleted
//! through the management API (`AMQP_MANAGEMENT_URL`, default local).

// Setup failures must stop the run loudly, with their text.
#![allow(clippy::expect_used)]

use std::time::Duration;

use worker_amqp::{AmqpConfig, FetchMode};
use worker_core::testing::model::{check, ModelConfig};

/// A virtual host that lives as long as the value.
struct Vhost {
    rt: tokio::runtime::Runtime,
    api: String,
    name: String,
}

impl Vhost {
    fn new(api: String) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let v = Self {
            rt,
            api,
            name: worker_core::testing::unique("wp-model"),
        };
        v.call(reqwest::Method::PUT, &format!("vhosts/{}", v.name), None);
        let all = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
        v.call(
            reqwest::Method::PUT,
            &format!("permissions/{}/guest", v.name),
            Some(all),
        );
        v
    }

    fn call(&self, method: reqwest::Method, path: &str, body: Option<serde_json::Value>) {
        let url = format!("{}/api/{path}", self.api);
        let status = self.rt.block_on(async {
            let mut req = reqwest::Client::new()
                .request(method, &url)
                .basic_auth("guest", Some("guest"));
            if let Some(body) = body {
                req = req.json(&body);
            }
            req.send()
                .await
                .expect("management API (enable it: rabbitmq-plugins enable rabbitmq_management)")
                .status()
        });
        assert!(status.is_success(), "{url}: {status}");
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        self.call(
            reqwest::Method::DELETE,
            &format!("vhosts/{}", self.name),
            None,
        );
    }
}

/// Run the model against a broker made by `tweak` from the run's base configuration.
fn agrees(name: &'static str, tweak: fn(AmqpConfig) -> AmqpConfig, cases: u32) {
    let api =
        std::env::var("AMQP_MANAGEMENT_URL").unwrap_or_else(|_| "http://127.0.0.1:15672".into());
    let host = std::env::var("AMQP_HOST").unwrap_or_else(|_| "127.0.0.1:5672".into());
    let vhost = Vhost::new(api.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let base = AmqpConfig::new(format!("amqp://guest:guest@{host}/{}", vhost.name))
        .management_url(api.replacen("://", "://guest:guest@", 1))
        .depth_from_management(false)
        .prefetch(100);
    let broker = rt
        .block_on(tweak(base).connect())
        .expect("connect to RabbitMQ");
    let config = ModelConfig::for_broker(name, &broker)
        .checkpoints(false)
        .moves_due_delays(true)
        .short(Duration::from_millis(800), Duration::from_millis(300))
        .cases(cases, 25);
    check(&rt, &broker, &config);
    rt.block_on(worker_core::Broker::close(&broker));
}

#[test]
fn classic_queues_consumed_agree_with_the_model() {
    agrees("amqp classic, consume", |c| c, 16);
}

#[test]
fn classic_queues_taken_with_get_agree_with_the_model() {
    agrees(
        "amqp classic, basic.get",
        |c| c.fetch_mode(FetchMode::Get),
        10,
    );
}
