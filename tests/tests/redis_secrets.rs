//! Credentials from a mounted file on Redis: `REDIS_URL_FILE` is read at start, and
//! every reconnect authenticates with the password the file holds then. A test-owned
//! `redis-server` changes its password; the file is rewritten and the broker's
//! connections are killed: the next calls succeed with the new password.

use std::time::Duration;

use system_tests::{redis_cli, RedisServer};
use worker_core::testing::{eventually, unique};
use worker_core::{Broker, NewJob};
use worker_redis::RedisConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_password_in_the_url_file_is_used_by_the_next_reconnect() {
    let server = RedisServer::start();
    let port = server.port;
    let ok = redis_cli(port, &["CONFIG", "SET", "requirepass", "first-pass"]).await;
    assert_eq!(ok, "OK");
    let dir = RedisServer::scratch_dir(port).join(unique("secret"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let file = dir.join("url");
    let url = |password: &str| format!("redis://:{password}@127.0.0.1:{port}\n");
    std::fs::write(&file, url("first-pass")).unwrap_or_else(|e| panic!("{e}"));

    let config = RedisConfig::url_file(&file).unwrap_or_else(|e| panic!("config: {e}"));
    assert!(!format!("{config:?}").contains("first-pass"));
    let b = config
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let q = unique("rotation");
    b.enqueue(vec![NewJob::new(&q, "before")])
        .await
        .unwrap_or_else(|e| panic!("enqueue: {e}"));

    let auth = ["-a", "first-pass", "--no-auth-warning"];
    let set = [&auth[..], &["CONFIG", "SET", "requirepass", "second-pass"]].concat();
    assert_eq!(redis_cli(port, &set).await, "OK");
    std::fs::write(&file, url("second-pass")).unwrap_or_else(|e| panic!("{e}"));
    let auth = ["-a", "second-pass", "--no-auth-warning"];
    let kill = [&auth[..], &["CLIENT", "KILL", "TYPE", "normal"]].concat();
    let killed: u32 = redis_cli(port, &kill).await.parse().unwrap_or(0);
    assert!(killed > 0, "the broker's connections were killed");

    eventually(
        Duration::from_secs(30),
        "an enqueue after the reconnect",
        || async { b.enqueue(vec![NewJob::new(&q, "after")]).await.is_ok() },
    )
    .await;
    let d = b.depth(&q).await.unwrap_or_else(|e| panic!("depth: {e}"));
    assert_eq!(d.pending, 2, "both jobs stored");
    let _ = std::fs::remove_dir_all(&dir);
}
