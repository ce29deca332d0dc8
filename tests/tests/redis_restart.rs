//! A test-owned Redis restarted under a busy worker: the worker logs, backs off,
//! reconnects, and every job completes.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use system_tests::{DemoWorker, RedisServer};
use worker_core::{Broker, NewJob};
use worker_redis::RedisConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_completes_across_a_redis_restart() {
    let mut server = RedisServer::start();
    let url = server.url();
    let b = RedisConfig::new(&url)
        .prefix("restart")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let jobs = (0..40)
        .map(|_| NewJob::json("jobs", &json!({"sleep_ms": 150})).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let ids: HashSet<String> = b
        .enqueue(jobs)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|id| id.to_string())
        .collect();
    let mut w = DemoWorker::start(&[
        ("REDIS_URL", &url),
        ("REDIS_PREFIX", "restart"),
        ("WORKER_QUEUES", "jobs"),
        ("WORKER_CONCURRENCY", "4"),
        ("WORKER_LEASE", "3s"),
    ]);
    w.wait_for(Duration::from_secs(20), "some jobs done", |e| {
        e.iter().filter(|e| e["event"] == "end").count() >= 8
    })
    .await;
    server.restart(Duration::from_secs(1));

    let done = |e: &[serde_json::Value]| -> HashSet<String> {
        e.iter()
            .filter(|e| e["event"] == "end")
            .filter_map(|e| e["id"].as_str().map(str::to_owned))
            .collect()
    };
    w.wait_for(Duration::from_secs(60), "every job completed", |e| {
        done(e) == ids
    })
    .await;
    // The test's own connection also saw the restart: its first call may fail as
    // transient while it reconnects, as the worker's did.
    worker_core::testing::eventually(Duration::from_secs(10), "queue empty", || async {
        match b.depth("jobs").await {
            Ok(d) => (d.pending, d.in_flight, d.delayed, d.dead) == (0, 0, 0, 0),
            Err(e) => {
                assert!(e.is_transient(), "{e}");
                false
            }
        }
    })
    .await;
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
