//! Credentials in the management URL are percent-decoded: a user of the real management
//! API whose password holds `@`, `%`, `:` and `/` (written percent-encoded in the URL,
//! as a URL requires) reads the worker registry. The test creates the user through the
//! API and deletes it when it ends, passed or not.

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use worker_amqp::AmqpConfig;
use worker_core::testing::unique;
use worker_core::Broker;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn api() -> String {
    std::env::var("AMQP_MANAGEMENT_API").unwrap_or_else(|_| "http://127.0.0.1:15672".into())
}

fn encode(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

/// A management user with the `monitoring` tag and every permission on `/`, deleted on
/// drop.
struct TestUser {
    name: String,
}

impl TestUser {
    async fn create(name: &str, password: &str) -> Self {
        let http = reqwest::Client::new();
        let user = encode(name);
        let put = |path: String, body: serde_json::Value| {
            http.put(format!("{}/api/{path}", api()))
                .basic_auth("guest", Some("guest"))
                .json(&body)
                .send()
        };
        let me = Self {
            name: name.to_owned(),
        };
        let res = put(
            format!("users/{user}"),
            serde_json::json!({"password": password, "tags": "monitoring"}),
        )
        .await
        .unwrap_or_else(|e| panic!("management API: {e}"));
        assert!(res.status().is_success(), "create user: {}", res.status());
        let res = put(
            format!("permissions/%2F/{user}"),
            serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}),
        )
        .await
        .unwrap_or_else(|e| panic!("management API: {e}"));
        assert!(res.status().is_success(), "permissions: {}", res.status());
        me
    }
}

impl TestUser {
    /// Give the user `password` instead of the one it has.
    async fn set_password(&self, password: &str) {
        let res = reqwest::Client::new()
            .put(format!("{}/api/users/{}", api(), encode(&self.name)))
            .basic_auth("guest", Some("guest"))
            .json(&serde_json::json!({"password": password, "tags": "monitoring"}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("management API: {e}"));
        assert!(res.status().is_success(), "set password: {}", res.status());
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // A runtime of its own on a thread of its own: this runs while the test's
        // runtime may be unwinding a failed assertion.
        let url = format!("{}/api/users/{}", api(), encode(&self.name));
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("runtime: {e}"));
            rt.block_on(async {
                reqwest::Client::new()
                    .delete(url)
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await
                    .map(|r| r.status())
            })
        })
        .join();
        if !matches!(done, Ok(Ok(s)) if s.is_success()) {
            eprintln!(
                "could not delete the management user {}: {done:?}",
                self.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_percent_encoded_password_in_the_management_url_is_decoded() {
    let name = unique("mgmt-user");
    let password = format!("p@ss%w0rd:/{}", fastrand::u32(..));
    let _user = TestUser::create(&name, &password).await;
    let authority = api().replacen(
        "://",
        &format!("://{}:{}@", encode(&name), encode(&password)),
        1,
    );
    let lookup = |var: &str| match var {
        "AMQP_URL" => Some(AMQP.to_owned()),
        "AMQP_MANAGEMENT_URL" => Some(authority.clone()),
        _ => None,
    };
    let broker = AmqpConfig::from_vars(&lookup)
        .unwrap_or_else(|e| panic!("configuration: {e}"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let pool = unique("pool");
    let workers = broker
        .list_workers(Some(&pool))
        .await
        .unwrap_or_else(|e| panic!("the management API as {name}: {e}"));
    assert!(workers.is_empty(), "{workers:?}");
}

/// `AMQP_MANAGEMENT_URL_FILE`: a password changed in the broker and in the file is
/// used by the next request, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_password_in_the_management_url_file_is_used_by_the_next_request() {
    let name = unique("mgmt-rotating");
    let user = TestUser::create(&name, "first-pass").await;
    let dir = std::env::temp_dir().join(unique("mgmt-secret"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let file = dir.join("url");
    let url =
        |password: &str| api().replacen("://", &format!("://{}:{password}@", encode(&name)), 1);
    std::fs::write(&file, url("first-pass")).unwrap_or_else(|e| panic!("{e}"));
    let path = file.display().to_string();
    let lookup = |var: &str| match var {
        "AMQP_URL" => Some(AMQP.to_owned()),
        "AMQP_MANAGEMENT_URL_FILE" => Some(path.clone()),
        _ => None,
    };
    let broker = AmqpConfig::from_vars(&lookup)
        .unwrap_or_else(|e| panic!("configuration: {e}"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let pool = unique("pool");
    broker
        .list_workers(Some(&pool))
        .await
        .unwrap_or_else(|e| panic!("with the first password: {e}"));
    // Rotate: the broker wants the second password; the file holds it.
    user.set_password("second-pass").await;
    std::fs::write(&file, url("second-pass")).unwrap_or_else(|e| panic!("{e}"));
    broker
        .list_workers(Some(&pool))
        .await
        .unwrap_or_else(|e| panic!("with the rotated password: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
}
