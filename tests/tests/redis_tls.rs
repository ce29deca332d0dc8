//! `rediss://` against a TLS Redis the test starts itself, with a certificate authority
//! and server certificate the test makes with `openssl`, and an ACL user whose password
//! comes from the URL and never shows in errors.

use std::time::Duration;

use system_tests::{free_addr, make_certificates, RedisServer};
use worker_core::testing::cases;
use worker_redis::RedisConfig;

const PASSWORD: &str = "s3cret-Pa55";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_an_acl_user_from_the_url() {
    let certs = RedisServer::scratch_dir(free_addr().port());
    make_certificates(&certs);
    let file = |name: &str| certs.join(name).to_string_lossy().into_owned();
    let args = vec![
        "--tls-cert-file".into(),
        file("server.crt"),
        "--tls-key-file".into(),
        file("server.key"),
        "--tls-ca-cert-file".into(),
        file("ca.crt"),
        "--tls-auth-clients".into(),
        "no".into(),
        "--user".into(),
        "worker".into(),
        "on".into(),
        format!(">{PASSWORD}"),
        "~*".into(),
        "&*".into(),
        "+@all".into(),
        "--user".into(),
        "default".into(),
        "off".into(),
    ];
    let server = RedisServer::start_with(&args, true);
    let ca = std::fs::read(certs.join("ca.crt")).unwrap_or_else(|e| panic!("{e}"));
    let url = format!("rediss://worker:{PASSWORD}@localhost:{}", server.port);

    let b = RedisConfig::new(&url)
        .ca_cert_pem(ca.clone())
        .prefix("tls")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    cases::enqueue_fetch_ack(&b).await;
    cases::stale_token_is_refused_everywhere(&b).await;
    cases::wait_for_work_wakes_on_enqueue(&b).await;

    // A wrong password, and a server whose CA is not trusted: clear errors, no secret.
    let wrong = format!("rediss://worker:not-{PASSWORD}@localhost:{}", server.port);
    let b = RedisConfig::new(&wrong)
        .ca_cert_pem(ca)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let err = tokio::time::timeout(Duration::from_secs(20), worker_core::Broker::depth(&b, "q"))
        .await
        .unwrap_or_else(|_| panic!("no answer"))
        .expect_err("a wrong password must fail");
    let text = format!("{err} {err:?}");
    assert!(text.contains("authentication failed"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
    let untrusted = RedisConfig::new(&url)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        worker_core::Broker::depth(&untrusted, "q"),
    )
    .await
    .unwrap_or_else(|_| panic!("no answer"))
    .expect_err("an untrusted certificate must fail");
    let text = format!("{err} {err:?}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");

    // workerctl (and the exporter it runs) configured from the environment trusts the
    // CA that REDIS_CA_FILE names, and fails without it.
    let ca_file = file("ca.crt");
    let ctl = |with_ca: bool| {
        let mut cmd = std::process::Command::new(system_tests::binary("workerctl"));
        cmd.args(["depth", "q", "--json"])
            .env_remove("AMQP_URL")
            .env("REDIS_URL", &url)
            .env("REDIS_PREFIX", "tls");
        if with_ca {
            cmd.env("REDIS_CA_FILE", &ca_file);
        } else {
            cmd.env_remove("REDIS_CA_FILE");
        }
        cmd.output().unwrap_or_else(|e| panic!("workerctl: {e}"))
    };
    let trusted = ctl(true);
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    let untrusted = ctl(false);
    assert_eq!(untrusted.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert!(!stderr.contains(PASSWORD), "{stderr}");
    drop(server);
    let _ = std::fs::remove_dir_all(&certs);
}

/// Mutual TLS: a server that requires client certificates takes a client that presents
/// one signed by its CA (from `REDIS_CLIENT_CERT_FILE` / `REDIS_CLIENT_KEY_FILE`) and
/// refuses one that presents none; and a server whose certificate names another host
/// is refused even though its CA is trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_and_host_names_are_checked() {
    let certs = RedisServer::scratch_dir(free_addr().port());
    make_certificates(&certs);
    system_tests::make_signed_certificate(&certs, "client", "worker-pool client", None);
    system_tests::make_signed_certificate(
        &certs,
        "other",
        "other.invalid",
        Some("DNS:other.invalid"),
    );
    let file = |name: &str| certs.join(name).to_string_lossy().into_owned();
    let server = RedisServer::start_with(
        &[
            "--tls-cert-file".into(),
            file("server.crt"),
            "--tls-key-file".into(),
            file("server.key"),
            "--tls-ca-cert-file".into(),
            file("ca.crt"),
            "--tls-auth-clients".into(),
            "yes".into(),
        ],
        true,
    );
    let url = format!("rediss://localhost:{}", server.port);
    let env = |with_client: bool| {
        let (url, ca, cert, key) = (
            url.clone(),
            file("ca.crt"),
            file("client.crt"),
            file("client.key"),
        );
        move |name: &str| match name {
            "REDIS_URL" => Some(url.clone()),
            "REDIS_CA_FILE" => Some(ca.clone()),
            "REDIS_CLIENT_CERT_FILE" if with_client => Some(cert.clone()),
            "REDIS_CLIENT_KEY_FILE" if with_client => Some(key.clone()),
            _ => None,
        }
    };
    let b = RedisConfig::from_vars(env(true))
        .unwrap_or_else(|e| panic!("{e}"))
        .prefix("mtls")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    cases::enqueue_fetch_ack(&b).await;
    let anonymous = RedisConfig::from_vars(env(false))
        .unwrap_or_else(|e| panic!("{e}"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let refused = tokio::time::timeout(
        Duration::from_secs(20),
        worker_core::Broker::depth(&anonymous, "q"),
    )
    .await
    .unwrap_or_else(|_| panic!("no answer"));
    assert!(refused.is_err(), "a client without a certificate got in");
    let half = RedisConfig::from_vars(|name: &str| {
        (name == "REDIS_CLIENT_CERT_FILE" || name == "REDIS_URL").then(|| url.clone())
    });
    let e = half.expect_err("a certificate without its key").to_string();
    assert!(e.contains("REDIS_CLIENT_KEY_FILE"), "{e}");
    drop(server);

    // A server certificate for other.invalid, reached as localhost, with its CA trusted.
    let other = RedisServer::start_with(
        &[
            "--tls-cert-file".into(),
            file("other.crt"),
            "--tls-key-file".into(),
            file("other.key"),
            "--tls-ca-cert-file".into(),
            file("ca.crt"),
            "--tls-auth-clients".into(),
            "no".into(),
        ],
        true,
    );
    let ca = std::fs::read(certs.join("ca.crt")).unwrap_or_else(|e| panic!("{e}"));
    let misnamed = RedisConfig::new(format!("rediss://localhost:{}", other.port))
        .ca_cert_pem(ca)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        worker_core::Broker::depth(&misnamed, "q"),
    )
    .await
    .unwrap_or_else(|_| panic!("no answer"))
    .expect_err("a certificate for another host must be refused");
    let text = format!("{err} {err:?}");
    assert!(text.contains("not valid for name"), "{text}");
    drop(other);
    let _ = std::fs::remove_dir_all(&certs);
}

/// Redis Cluster over TLS trusts the configured CA too: a one-node cluster (every slot
/// on it) with a test-owned CA, reached through `REDIS_CLUSTER_NODES`; without the CA
/// its certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_trusts_the_configured_ca() {
    let certs = RedisServer::scratch_dir(free_addr().port());
    make_certificates(&certs);
    let file = |name: &str| certs.join(name).to_string_lossy().into_owned();
    let args: Vec<String> = [
        "--tls-cert-file",
        &file("server.crt"),
        "--tls-key-file",
        &file("server.key"),
        "--tls-ca-cert-file",
        &file("ca.crt"),
        "--tls-auth-clients",
        "no",
        "--tls-cluster",
        "yes",
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let node = RedisServer::start_with(&args, true);
    let cli = |cmd: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["--tls", "--cacert", &file("ca.crt"), "-h", "localhost"])
            .args(["-p", &node.port.to_string()])
            .args(cmd)
            .output()
            .unwrap_or_else(|e| panic!("redis-cli: {e}"));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(cli(&["cluster", "addslotsrange", "0", "16383"]), "OK");
    worker_core::testing::eventually(Duration::from_secs(20), "cluster ok", || async {
        cli(&["cluster", "info"]).contains("cluster_state:ok")
    })
    .await;
    let seed = format!("rediss://localhost:{}", node.port);
    let config = |with_ca: bool| {
        let (seed, ca) = (seed.clone(), file("ca.crt"));
        RedisConfig::from_vars(move |name: &str| match name {
            "REDIS_CLUSTER_NODES" => Some(seed.clone()),
            "REDIS_CA_FILE" if with_ca => Some(ca.clone()),
            _ => None,
        })
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let b = config(true)
        .prefix("tls-cluster")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    cases::enqueue_fetch_ack(&b).await;
    let untrusted = config(false)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        worker_core::Broker::depth(&untrusted, "q"),
    )
    .await
    .unwrap_or_else(|_| panic!("no answer"))
    .expect_err("a cluster whose CA is not trusted must be refused");
    let text = format!("{err} {err:?}");
    assert!(
        text.contains("UnknownIssuer") || text.contains("invalid peer certificate"),
        "{text}"
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&certs);
}
