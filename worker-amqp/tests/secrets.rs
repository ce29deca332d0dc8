//! Credentials from a mounted file: `AMQP_URL_FILE` is read at start and again at each
//! reconnect, so a rotated password is picked up without a restart. Runs on the
//! shared RabbitMQ with a user of its own (created and deleted through the
//! management API on 15672); the broker's connections of that user are closed to
//! force the reconnect.

use std::time::Duration;

use serde_json::{json, Value};
use worker_amqp::AmqpConfig;
use worker_core::testing::{eventually, unique};
use worker_core::{Broker, NewJob};

fn api() -> String {
    std::env::var("AMQP_MANAGEMENT_API")
        .map(|base| format!("{base}/api"))
        .unwrap_or_else(|_| "http://127.0.0.1:15672/api".into())
}

async fn call(http: &reqwest::Client, method: reqwest::Method, path: &str, body: Option<Value>) {
    let mut req = http
        .request(method.clone(), format!("{}{path}", api()))
        .basic_auth("guest", Some("guest"));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("management API {method} {path}: {e}"));
    assert!(
        res.status().is_success() || res.status() == reqwest::StatusCode::NOT_FOUND,
        "management API {method} {path}: {}",
        res.status()
    );
}

async fn set_password(http: &reqwest::Client, user: &str, password: &str) {
    call(
        http,
        reqwest::Method::PUT,
        &format!("/users/{user}"),
        Some(json!({"password": password, "tags": ""})),
    )
    .await;
}

/// Close every connection `user` has open, as a broker restart or a network cut would.
async fn close_connections(http: &reqwest::Client, user: &str) -> usize {
    let list: Vec<Value> = http
        .get(format!("{}/connections", api()))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("connections: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("connections: {e}"));
    let mine: Vec<String> = list
        .iter()
        .filter(|c| c["user"] == user)
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect();
    for name in &mine {
        let path = format!(
            "/connections/{}",
            percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC)
        );
        call(http, reqwest::Method::DELETE, &path, None).await;
    }
    mine.len()
}

struct UserGuard(String);

impl Drop for UserGuard {
    fn drop(&mut self) {
        let user = self.0.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(call(
                    &reqwest::Client::new(),
                    reqwest::Method::DELETE,
                    &format!("/users/{user}"),
                    None,
                ));
            }
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_password_in_the_url_file_is_used_by_the_next_reconnect() {
    let http = reqwest::Client::new();
    let user = unique("rotating");
    let _guard = UserGuard(user.clone());
    set_password(&http, &user, "first-pass").await;
    call(
        &http,
        reqwest::Method::PUT,
        &format!("/permissions/%2F/{user}"),
        Some(json!({"configure": ".*", "write": ".*", "read": ".*"})),
    )
    .await;
    let dir = std::env::temp_dir().join(unique("amqp-secret"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let file = dir.join("url");
    let url = |password: &str| format!("amqp://{user}:{password}@127.0.0.1:5672/%2f\n");
    std::fs::write(&file, url("first-pass")).unwrap_or_else(|e| panic!("{e}"));

    let path = file.display().to_string();
    let config = AmqpConfig::from_vars(&|name| (name == "AMQP_URL_FILE").then(|| path.clone()))
        .unwrap_or_else(|e| panic!("config: {e}"));
    assert!(!format!("{config:?}").contains("first-pass"));
    let b = config
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let q = unique("rotation");
    b.enqueue(vec![NewJob::new(&q, "before")])
        .await
        .unwrap_or_else(|e| panic!("enqueue: {e}"));

    // Rotate: the broker now wants the second password, the file holds it, and the
    // old connections are gone.
    set_password(&http, &user, "second-pass").await;
    std::fs::write(&file, url("second-pass")).unwrap_or_else(|e| panic!("{e}"));
    eventually(Duration::from_secs(20), "connections closed", || async {
        close_connections(&http, &user).await > 0
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "an enqueue after the reconnect",
        || async { b.enqueue(vec![NewJob::new(&q, "after")]).await.is_ok() },
    )
    .await;
    let d = b.depth(&q).await.unwrap_or_else(|e| panic!("depth: {e}"));
    assert_eq!(d.pending, 2, "both jobs stored");
    b.purge_dead(&q, &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.close().await;
    call(
        &http,
        reqwest::Method::DELETE,
        &format!("/queues/%2F/{q}"),
        None,
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}
