//! The whole conformance suite against a 3-master Redis Cluster the test starts on its
//! own loopback ports from the installed `redis-server`, and stops afterwards.

use std::process::Command;
use std::time::{Duration, Instant};

use system_tests::RedisServer;
use worker_core::testing::unique;
use worker_core::{Broker, NewJob};
use worker_redis::RedisConfig;

fn cluster_info(port: u16) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "cluster", "info"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn keys_on(port: u16) -> u64 {
    Command::new("redis-cli")
        .args(["-p", &port.to_string(), "dbsize"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes_on_a_three_master_cluster() {
    let args: Vec<String> = [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "5000",
        "--appendonly",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let nodes: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start_with(&args, false))
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap_or_else(|e| panic!("redis-cli --cluster create: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nodes
        .iter()
        .all(|n| cluster_info(n.port).contains("cluster_state:ok"))
    {
        assert!(Instant::now() < deadline, "cluster did not become ok");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let b = RedisConfig::cluster(nodes.iter().map(RedisServer::url))
        .prefix(unique("cluster"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    worker_core::testing::run_all(&b).await;

    // Queues hash to different slots, so they spread over the masters.
    for i in 0..30 {
        b.enqueue(vec![NewJob::new(format!("spread-{i}"), "x")])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let used = nodes.iter().filter(|n| keys_on(n.port) > 0).count();
    assert_eq!(used, 3, "every master should hold some queues");
    drop(nodes);
}
