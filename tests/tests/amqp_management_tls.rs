//! The management API over `https://` with a private CA: a TLS endpoint the test owns
//! (a CA of its own, and a certificate for the one name `localhost`) in front of the
//! shared RabbitMQ's management API, which stays as it is. Through `AMQP_CA_FILE` the
//! worker registry is read over it; without the CA, or under a name the certificate
//! does not carry, the client refuses the endpoint and says why, without the password.

use std::path::Path;

use system_tests::TlsProxy;
use worker_amqp::AmqpConfig;
use worker_core::testing::unique;
use worker_core::Broker;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const SECRET: &str = "n0t-The-Passw0rd";

/// A CA (`ca.crt`) and a server certificate for `localhost` only (`server.crt`,
/// `server.key`), as [`TlsProxy`] serves them.
fn certificates_for_localhost(dir: &Path) {
    system_tests::make_certificates(dir);
    system_tests::make_signed_certificate(dir, "server", "localhost", Some("DNS:localhost"));
}

/// A broker configured as a worker is, from `vars` (AMQP_URL is the shared RabbitMQ).
async fn broker(vars: &[(&str, String)]) -> worker_amqp::AmqpBroker {
    let lookup = |name: &str| {
        if name == "AMQP_URL" {
            return Some(AMQP.to_owned());
        }
        vars.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
    };
    AmqpConfig::from_vars(&lookup)
        .unwrap_or_else(|e| panic!("configuration: {e}"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_over_https_trusts_the_ca_file_and_checks_the_name() {
    let certs = std::env::temp_dir().join(unique("management-tls"));
    std::fs::create_dir_all(&certs).unwrap_or_else(|e| panic!("{e}"));
    certificates_for_localhost(&certs);
    let upstream = "127.0.0.1:15672".parse().unwrap_or_else(|e| panic!("{e}"));
    let proxy = TlsProxy::start(&certs, upstream).await;
    let port = proxy.addr.port();
    let ca_file = certs.join("ca.crt").to_string_lossy().into_owned();
    let pool = unique("pool");

    // With the CA file: the registry is read through the TLS endpoint.
    let trusted = broker(&[
        (
            "AMQP_MANAGEMENT_URL",
            format!("https://guest:guest@localhost:{port}"),
        ),
        ("AMQP_CA_FILE", ca_file.clone()),
    ])
    .await;
    let workers = trusted.list_workers(Some(&pool)).await.unwrap_or_else(|e| {
        panic!(
            "management API over https with the CA file: {}",
            worker_core::error::chain(&e)
        )
    });
    assert!(workers.is_empty(), "{workers:?}");

    // Without it, the certificate's issuer is unknown.
    let untrusted = broker(&[(
        "AMQP_MANAGEMENT_URL",
        format!("https://guest:{SECRET}@localhost:{port}"),
    )])
    .await;
    let err = untrusted
        .list_workers(Some(&pool))
        .await
        .err()
        .unwrap_or_else(|| panic!("a certificate of an unknown CA must be refused"));
    let text = worker_core::error::chain(&err);
    assert!(
        text.contains("https://guest:***@localhost") && text.contains("UnknownIssuer"),
        "{text}"
    );
    assert!(!format!("{text} {err:?}").contains(SECRET), "{text}");

    // With the CA file, but under a name the certificate does not carry.
    let misnamed = broker(&[
        (
            "AMQP_MANAGEMENT_URL",
            format!("https://guest:{SECRET}@127.0.0.1:{port}"),
        ),
        ("AMQP_CA_FILE", ca_file),
    ])
    .await;
    let err = misnamed
        .list_workers(Some(&pool))
        .await
        .err()
        .unwrap_or_else(|| panic!("a certificate for another name must be refused"));
    let text = worker_core::error::chain(&err);
    assert!(text.contains("not valid for name \"127.0.0.1\""), "{text}");
    assert!(!format!("{text} {err:?}").contains(SECRET), "{text}");

    drop(proxy);
    let _ = std::fs::remove_dir_all(&certs);
}
