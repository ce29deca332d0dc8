//! Real `demo-worker` processes against the real Redis on 127.0.0.1:6379: a worker
//! killed with SIGKILL mid-job, a drain handing jobs to another worker, and the
//! `/scaling` numbers while a pool runs. Each test uses a key prefix of its own.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use system_tests::DemoWorker;
use worker_core::testing::unique;
use worker_core::{Broker, NewJob};
use worker_redis::RedisBroker;

const URL: &str = "redis://127.0.0.1:6379";

async fn broker(prefix: &str) -> RedisBroker {
    system_tests::redis_broker(prefix).await
}

async fn enqueue(b: &RedisBroker, queue: &str, payload: Value, n: usize) -> Vec<String> {
    system_tests::enqueue_json(b, queue, &payload, n).await
}

fn worker(prefix: &str, queue: &str, extra: &[(&str, &str)]) -> DemoWorker {
    let mut env = vec![
        ("REDIS_URL", URL),
        ("REDIS_PREFIX", prefix),
        ("WORKER_QUEUES", queue),
    ];
    env.extend_from_slice(extra);
    DemoWorker::start(&env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_s_job_completes_elsewhere_with_its_attempt_raised() {
    let (prefix, queue) = (unique("kill"), "jobs");
    let b = broker(&prefix).await;
    let ids = enqueue(&b, queue, json!({"sleep_ms": 2000}), 1).await;
    let lease = [("WORKER_LEASE", "1s")];
    let mut first = worker(&prefix, queue, &lease);
    first
        .wait_for(
            Duration::from_secs(20),
            "first worker started the job",
            |e| e.iter().any(|e| e["event"] == "start"),
        )
        .await;
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(first.count("end"), 0);

    let mut second = worker(&prefix, queue, &lease);
    second
        .wait_for(
            Duration::from_secs(20),
            "second worker finished the job",
            |e| e.iter().any(|e| e["event"] == "end"),
        )
        .await;
    assert_eq!(second.starts(), vec![(ids[0].clone(), 2)]);
    // The end event comes as the handler returns; the ack follows it.
    worker_core::testing::eventually(Duration::from_secs(5), "the job is acked", || async {
        let d = b.depth(queue).await.unwrap_or_else(|e| panic!("{e}"));
        (d.pending, d.in_flight, d.delayed, d.dead) == (0, 0, 0, 0)
    })
    .await;
    second.signal("TERM");
    assert_eq!(
        second.wait_exit(Duration::from_secs(10)).await.code(),
        Some(0)
    );
    assert_eq!(
        second.count("end"),
        1,
        "completed exactly once by live workers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_worker_s_jobs_go_to_another_worker_at_once_with_attempt_unchanged() {
    let (prefix, queue) = (unique("drain"), "jobs");
    let b = broker(&prefix).await;
    let ids = enqueue(&b, queue, json!({"sleep_ms": 600_000}), 2).await;
    let mut first = worker(
        &prefix,
        queue,
        &[("WORKER_CONCURRENCY", "2"), ("WORKER_DRAIN_TIMEOUT", "1s")],
    );
    first
        .wait_for(Duration::from_secs(20), "both jobs started", |e| {
            e.iter().filter(|e| e["event"] == "start").count() == 2
        })
        .await;
    let mut second = worker(
        &prefix,
        queue,
        &[("WORKER_CONCURRENCY", "2"), ("WORKER_DRAIN_TIMEOUT", "1s")],
    );
    second.wait_listening().await;

    first.signal("TERM");
    let status = first.wait_exit(Duration::from_secs(10)).await;
    let exited = Instant::now();
    assert_eq!(status.code(), Some(0), "{}", first.stderr());
    assert_eq!(first.stopped()["report"]["released"], 2);
    second
        .wait_for(Duration::from_secs(5), "second worker took both", |e| {
            e.iter().filter(|e| e["event"] == "start").count() == 2
        })
        .await;
    assert!(
        exited.elapsed() < Duration::from_secs(2),
        "pick-up took {:?}",
        exited.elapsed()
    );
    let mut got = second.starts();
    got.sort();
    let mut want: Vec<(String, u64)> = ids.into_iter().map(|id| (id, 1)).collect();
    want.sort();
    assert_eq!(got, want, "released jobs keep their attempt");
    second.signal("TERM");
    assert_eq!(
        second.wait_exit(Duration::from_secs(10)).await.code(),
        Some(0)
    );
    let d = b.depth(queue).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((d.pending, d.in_flight, d.dead), (2, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_equals_what_the_test_counts_while_a_pool_runs() {
    let (prefix, queue) = (unique("depth"), "jobs");
    let b = broker(&prefix).await;
    // One job that dies at once, ten that run for long, one delayed for an hour.
    enqueue(&b, queue, json!({"outcome": "fatal"}), 1).await;
    enqueue(&b, queue, json!({"sleep_ms": 600_000}), 10).await;
    b.enqueue(vec![
        NewJob::new(queue, "null").delay(Duration::from_secs(3600))
    ])
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut w = worker(
        &prefix,
        queue,
        &[("WORKER_CONCURRENCY", "3"), ("WORKER_DRAIN_TIMEOUT", "1s")],
    );
    w.wait_for(
        Duration::from_secs(20),
        "fatal job ended, three long ones started",
        |e| {
            e.iter().filter(|e| e["event"] == "start").count() == 4
                && e.iter().any(|e| e["event"] == "end")
        },
    )
    .await;
    // Counted by the test itself from the worker's events: one ended (dead), the
    // others that started are running.
    let running = (w.count("start") - w.count("end")) as u64;
    let dead = w.count("end") as u64;
    worker_core::testing::eventually(Duration::from_secs(5), "/scaling agrees", || async {
        let (status, body) = w.get("/scaling").await;
        let doc: Value = serde_json::from_str(&body).unwrap_or_default();
        let q = &doc["queues"][queue];
        status == 200
            && q["in_flight"].as_u64() == Some(running)
            && q["pending"].as_u64() == Some(11 - running - dead)
            && q["delayed"].as_u64() == Some(1)
            && q["dead"].as_u64() == Some(dead)
            && doc["backlog"].as_u64() == Some(10)
            && doc["desired_replicas"].as_u64() == Some(4)
    })
    .await;
    assert_eq!((running, dead), (3, 1));
    w.signal("TERM");
    assert_eq!(w.wait_exit(Duration::from_secs(10)).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_releases_every_job_to_redis_and_exits_at_once() {
    let (prefix, queue) = (unique("second"), "jobs");
    let b = broker(&prefix).await;
    let mut ids = enqueue(&b, queue, json!({"sleep_ms": 600_000}), 2).await;
    let mut w = worker(
        &prefix,
        queue,
        &[("WORKER_CONCURRENCY", "2"), ("WORKER_DRAIN_TIMEOUT", "10m")],
    );
    w.wait_for(Duration::from_secs(20), "both jobs started", |e| {
        e.iter().filter(|e| e["event"] == "start").count() == 2
    })
    .await;
    w.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.get("/readyz").await.0 != 503 {
        assert!(Instant::now() < deadline, "not draining after SIGTERM");
    }
    // The drain would wait 10 minutes for these jobs; the second signal ends it now.
    w.signal("TERM");
    let status = w.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", w.stderr());
    assert_eq!(w.stopped()["report"]["released"], 2);
    let d = b.depth(queue).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (d.pending, d.in_flight, d.delayed, d.dead),
        (2, 0, 0, 0),
        "both jobs back in pending at once, not left to their leases"
    );
    let got = b
        .fetch(&worker_core::FetchPlan::single(
            queue,
            2,
            Duration::from_secs(30),
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut again: Vec<(String, u32)> = got
        .iter()
        .map(|d| (d.envelope.id.to_string(), d.envelope.attempt))
        .collect();
    again.sort();
    ids.sort();
    let want: Vec<(String, u32)> = ids.into_iter().map(|id| (id, 1)).collect();
    assert_eq!(again, want, "a release does not count an attempt");
}
