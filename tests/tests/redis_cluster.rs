//! The whole conformance suite against a 3-master Redis Cluster the test starts on its
//! own loopback ports from the installed `redis-server`, and stops afterwards.

use std::process::Command;
use std::time::{Duration, Instant};

use system_tests::RedisServer;
use worker_core::testing::unique;
use worker_core::{Broker, FetchPlan, FetchShare, NewJob};
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

/// Three masters on loopback ports of their own, serving every slot.
async fn start_cluster() -> Vec<RedisServer> {
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
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes_on_a_three_master_cluster() {
    let nodes = start_cluster().await;
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

/// A cluster fetch calls one queue at a time, and each call leases what it returns: a
/// later queue's failing call must not drop what the earlier calls leased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_queue_does_not_drop_jobs_leased_from_the_queues_before_it() {
    let nodes = start_cluster().await;
    let prefix = unique("partial");
    let b = RedisConfig::cluster(nodes.iter().map(RedisServer::url))
        .prefix(&prefix)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.enqueue(vec![NewJob::new("good", "x"), NewJob::new("good", "y")])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The broken queue's pending list is a string, so its fetch script fails with
    // WRONGTYPE on whichever master holds it.
    let out = Command::new("redis-cli")
        .args(["-c", "-p", &nodes[0].port.to_string()])
        .args(["set", &format!("{{{prefix}:broken}}:pending"), "not a list"])
        .output()
        .unwrap_or_else(|e| panic!("redis-cli: {e}"));
    assert!(out.status.success(), "{out:?}");
    let lease = Duration::from_secs(30);
    let plan = |first: &str, second: &str| {
        FetchPlan::new(
            vec![FetchShare::new(first, 2, 2), FetchShare::new(second, 2, 2)],
            4,
            lease,
        )
    };

    // The broken queue first: nothing is leased, so the fetch fails and the good
    // queue is untouched.
    let e = b
        .fetch(&plan("broken", "good"))
        .await
        .expect_err("a fetch that leased nothing reports the failure");
    assert!(e.to_string().contains("WRONGTYPE"), "{e}");
    let d = b.depth("good").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((d.pending, d.in_flight), (2, 0));

    // The broken queue second: the jobs leased from the good queue are handed out.
    let got = b
        .fetch(&plan("good", "broken"))
        .await
        .unwrap_or_else(|e| panic!("the jobs leased before the failing queue are lost: {e}"));
    assert_eq!(got.len(), 2);
    for d in &got {
        assert_eq!(d.envelope.attempt, 1);
        b.ack(&d.lease).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let d = b.depth("good").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d.backlog(), 0);
    drop(nodes);
}
