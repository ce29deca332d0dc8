//! A test-owned Redis restarted, killed or down under a busy worker: the worker logs,
//! backs off, reconnects, and every job completes; a worker drained while its Redis is
//! down exits in time and loses nothing.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use system_tests::{DemoWorker, RedisServer};
use worker_core::{Broker, NewJob};
use worker_redis::{RedisBroker, RedisConfig};

/// `n` jobs of `sleep_ms` each on queue `jobs`; their ids.
async fn enqueue(b: &RedisBroker, n: usize, sleep_ms: u64) -> HashSet<String> {
    let jobs = (0..n)
        .map(|_| {
            NewJob::json("jobs", &json!({ "sleep_ms": sleep_ms })).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    b.enqueue(jobs)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|id| id.to_string())
        .collect()
}

/// A demo-worker on queue `jobs` of `server` under `prefix`, with a 3 s lease.
fn worker(server: &RedisServer, prefix: &str, extra: &[(&str, &str)]) -> DemoWorker {
    let url = server.url();
    let mut env = vec![
        ("REDIS_URL", url.as_str()),
        ("REDIS_PREFIX", prefix),
        ("WORKER_QUEUES", "jobs"),
        ("WORKER_LEASE", "3s"),
    ];
    env.extend_from_slice(extra);
    DemoWorker::start(&env)
}

/// Ids of the jobs that ended with success.
fn succeeded(e: &[serde_json::Value]) -> HashSet<String> {
    e.iter()
        .filter(|e| e["event"] == "end" && e["ok"] == true)
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect()
}

/// Wait until queue `jobs` has no job in any state. The test's own connection may
/// also have seen the outage: its first calls may fail as transient while it
/// reconnects, as the worker's did.
async fn wait_settled(b: &RedisBroker) {
    worker_core::testing::eventually(Duration::from_secs(20), "queue empty", || async {
        match b.depth("jobs").await {
            Ok(d) => (d.pending, d.in_flight, d.delayed, d.dead) == (0, 0, 0, 0),
            Err(e) => {
                assert!(e.is_transient(), "{e}");
                false
            }
        }
    })
    .await;
}

/// 40 short jobs on a busy worker; `outage` takes the server away and brings it back
/// after some have completed; every job then completes and the worker exits cleanly.
async fn every_job_completes_across(prefix: &str, outage: impl FnOnce(&mut RedisServer)) {
    let mut server = RedisServer::start();
    let b = RedisConfig::new(server.url())
        .prefix(prefix)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ids = enqueue(&b, 40, 150).await;
    let mut w = worker(&server, prefix, &[("WORKER_CONCURRENCY", "4")]);
    w.wait_for(Duration::from_secs(20), "some jobs done", |e| {
        succeeded(e).len() >= 8
    })
    .await;
    outage(&mut server);
    w.wait_for(Duration::from_secs(60), "every job completed", |e| {
        succeeded(e) == ids
    })
    .await;
    wait_settled(&b).await;
    let log = w.stderr();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains("WARN"),
        "the outage should have been logged:\n{log}"
    );
    w.signal("TERM");
    assert_eq!(
        w.wait_exit(Duration::from_secs(10)).await.code(),
        Some(0),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_completes_across_a_redis_restart() {
    every_job_completes_across("restart", |server| server.restart(Duration::from_secs(1))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_completes_after_redis_is_killed_and_started_again() {
    every_job_completes_across("killed", |server| {
        // No shutdown: the server keeps only what its append-only file had synced.
        server.kill();
        std::thread::sleep(Duration::from_secs(1));
        server.start_again();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_while_redis_is_down_exits_in_time_and_loses_nothing() {
    let mut server = RedisServer::start();
    let b = RedisConfig::new(server.url())
        .prefix("down")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ids = enqueue(&b, 4, 3000).await;
    let drain = [("WORKER_DRAIN_TIMEOUT", "1s")];
    let mut first = worker(&server, "down", &[("WORKER_CONCURRENCY", "2"), drain[0]]);
    first
        .wait_for(Duration::from_secs(20), "two jobs started", |e| {
            e.iter().filter(|e| e["event"] == "start").count() == 2
        })
        .await;
    // Redis goes away mid-run: the drain can neither release nor settle anything.
    server.stop();
    first.signal("TERM");
    // The drain timeout is 1 s and calls to a server that is gone fail fast: the
    // exit must not wait on it.
    first.wait_exit(Duration::from_secs(15)).await;
    let log = first.stderr();
    assert!(!log.contains("panicked"), "{log}");

    // Back up: the two jobs it held come back when their leases run out, the two it
    // never took are still pending, and another worker completes all four.
    server.start_again();
    let mut second = worker(&server, "down", &[("WORKER_CONCURRENCY", "4"), drain[0]]);
    second
        .wait_for(Duration::from_secs(60), "every job completed", |e| {
            succeeded(e) == ids
        })
        .await;
    wait_settled(&b).await;
    second.signal("TERM");
    assert_eq!(
        second.wait_exit(Duration::from_secs(10)).await.code(),
        Some(0)
    );
}
