//! `amqps://` with a private CA: a TLS endpoint the test owns, with a certificate the
//! test makes with `openssl`, in front of the shared RabbitMQ. A real `demo-worker`
//! consumes through it with `AMQP_CA_FILE`; without the CA the connection is refused
//! with a clear error that does not show the password.

use std::time::Duration;

use serde_json::json;
use system_tests::{free_addr, make_certificates, DemoWorker, RabbitAdmin, RedisServer, TlsProxy};
use worker_amqp::AmqpConfig;
use worker_core::testing::unique;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_file() {
    let certs = RedisServer::scratch_dir(free_addr().port());
    make_certificates(&certs);
    let upstream = "127.0.0.1:5672".parse().unwrap_or_else(|e| panic!("{e}"));
    let proxy = TlsProxy::start(&certs, upstream).await;
    let url = format!("amqps://guest:guest@localhost:{}/%2f", proxy.addr.port());
    let ca_file = certs.join("ca.crt");
    let ca = std::fs::read_to_string(&ca_file).unwrap_or_else(|e| panic!("{e}"));
    let queue = unique("tls");

    let b = AmqpConfig::new(&url)
        .ca_cert_pem(ca)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("amqps with the CA: {e}"));
    let ids = system_tests::enqueue_json(&b, &queue, &json!({"sleep_ms": 5}), 5).await;
    let ca_path = ca_file.to_string_lossy().into_owned();
    let w = DemoWorker::start(&[
        ("AMQP_URL", url.as_str()),
        ("AMQP_CA_FILE", ca_path.as_str()),
        ("WORKER_QUEUES", queue.as_str()),
    ]);
    w.wait_for(Duration::from_secs(30), "every job completes", |ev| {
        ids.iter().all(|id| {
            ev.iter()
                .any(|e| e["event"] == "end" && e["id"] == id.as_str() && e["ok"] == true)
        })
    })
    .await;
    w.signal("TERM");

    // Without the CA, the broker's certificate is not trusted.
    let secret = "n0t-The-Passw0rd";
    let untrusted = format!("amqps://guest:{secret}@localhost:{}/%2f", proxy.addr.port());
    let err = AmqpConfig::new(&untrusted)
        .connect()
        .await
        .err()
        .unwrap_or_else(|| panic!("an untrusted certificate must fail"));
    let text = format!("{err} {err:?}");
    let shown = err.to_string();
    assert!(
        shown.contains("amqp connect to amqps://guest:***@localhost")
            && shown.contains("UnknownIssuer"),
        "{shown}"
    );
    assert!(!text.contains(secret), "{text}");
    RabbitAdmin::new().delete_queues(&queue).await;
    drop(proxy);
    let _ = std::fs::remove_dir_all(&certs);
}
