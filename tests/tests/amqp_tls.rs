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

/// The CA file is the only trust root, a certificate for another host is refused, and
/// a broker that checks its clients takes the one that presents a certificate its CA
/// signed (`AMQP_CLIENT_CERT_FILE`, `AMQP_CLIENT_KEY_FILE`) and no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_checks_names_and_client_certificates() {
    let certs = RedisServer::scratch_dir(free_addr().port());
    make_certificates(&certs);
    system_tests::make_signed_certificate(&certs, "client", "worker-pool client", None);
    system_tests::make_signed_certificate(
        &certs,
        "other",
        "other.invalid",
        Some("DNS:other.invalid"),
    );
    let stranger = certs.join("stranger");
    std::fs::create_dir_all(&stranger).unwrap_or_else(|e| panic!("{e}"));
    make_certificates(&stranger);
    let file = |dir: &std::path::Path, name: &str| dir.join(name).to_string_lossy().into_owned();
    let upstream = "127.0.0.1:5672".parse().unwrap_or_else(|e| panic!("{e}"));
    let config = |url: &str, ca: &str, client: bool| {
        let (url, ca) = (url.to_owned(), ca.to_owned());
        let (cert, key) = (file(&certs, "client.crt"), file(&certs, "client.key"));
        AmqpConfig::from_vars(&move |name: &str| match name {
            "AMQP_URL" => Some(url.clone()),
            "AMQP_CA_FILE" => Some(ca.clone()),
            "AMQP_CLIENT_CERT_FILE" if client => Some(cert.clone()),
            "AMQP_CLIENT_KEY_FILE" if client => Some(key.clone()),
            _ => None,
        })
        .unwrap_or_else(|e| panic!("config: {e}"))
    };
    let ca = file(&certs, "ca.crt");

    // Checks clients: in with the client certificate, refused without.
    let checking = system_tests::TlsProxy::start_with(
        system_tests::tls_acceptor_with(&certs, "server", true),
        upstream,
    )
    .await;
    let url = format!("amqps://guest:guest@localhost:{}/%2f", checking.addr.port());
    let b = config(&url, &ca, true)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("with a client certificate: {e}"));
    let q = unique("mtls");
    system_tests::enqueue_json(&b, &q, &json!({}), 1).await;
    worker_core::Broker::close(&b).await;
    RabbitAdmin::new().delete_queues(&q).await;
    let refused = config(&url, &ca, false).connect().await;
    assert!(refused.is_err(), "in without a client certificate");

    // Another CA in the CA file: the broker's certificate is not trusted, whatever the
    // system's trust store holds.
    let plain = TlsProxy::start(&certs, upstream).await;
    let url = format!("amqps://guest:guest@localhost:{}/%2f", plain.addr.port());
    let err = config(&url, &file(&stranger, "ca.crt"), false)
        .connect()
        .await
        .err()
        .unwrap_or_else(|| panic!("a CA file of another CA must not trust the broker"));
    // (The other CA has the same name, so rustls finds it and rejects the signature.)
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );

    // A certificate for other.invalid, reached as localhost.
    let misnamed = system_tests::TlsProxy::start_with(
        system_tests::tls_acceptor_with(&certs, "other", false),
        upstream,
    )
    .await;
    let url = format!("amqps://guest:guest@localhost:{}/%2f", misnamed.addr.port());
    let err = config(&url, &ca, false)
        .connect()
        .await
        .err()
        .unwrap_or_else(|| panic!("a certificate for another host must be refused"));
    assert!(err.to_string().contains("not valid for name"), "{err}");

    // No CA file and no system trust store: a worker stops at start and says what to
    // set, without a panic.
    let nothing = certs.join("no-store");
    std::fs::create_dir_all(&nothing).unwrap_or_else(|e| panic!("{e}"));
    let out = tokio::process::Command::new(system_tests::binary("demo-worker"))
        .env_remove("REDIS_URL")
        .env_remove("AMQP_CA_FILE")
        .env("AMQP_URL", &url)
        .env("WORKER_QUEUES", "tls-no-store")
        .env("WORKER_HTTP_ADDR", "off")
        .env("SSL_CERT_FILE", nothing.join("none.pem"))
        .env("SSL_CERT_DIR", &nothing)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .unwrap_or_else(|_| panic!("demo-worker did not stop"))
        .unwrap_or_else(|e| panic!("demo-worker: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("AMQP_CA_FILE"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // A CA file without a certificate fails at start, naming the variable.
    let empty = certs.join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap_or_else(|e| panic!("{e}"));
    let e = AmqpConfig::from_vars(&|name: &str| match name {
        "AMQP_URL" => Some("amqps://guest:guest@localhost:5671/%2f".into()),
        "AMQP_CA_FILE" => Some(empty.to_string_lossy().into_owned()),
        _ => None,
    })
    .expect_err("an empty CA file");
    assert!(e.to_string().contains("AMQP_CA_FILE"), "{e}");
    let _ = std::fs::remove_dir_all(&certs);
}
