//! Drain of a real `demo-worker` process on SIGTERM / SIGINT.

use std::time::{Duration, Instant};

use serde_json::json;
use system_tests::{demo_jobs, DemoWorker};

/// A demo-worker with `jobs` copies of `payload`, once `running` of them have started.
async fn start_busy(
    jobs: usize,
    payload: serde_json::Value,
    env: &[(&str, &str)],
    running: usize,
) -> DemoWorker {
    let jobs = demo_jobs(jobs, payload);
    let mut vars = vec![("DEMO_JOBS", jobs.as_str())];
    vars.extend_from_slice(env);
    let w = DemoWorker::start(&vars);
    w.wait_listening().await;
    w.wait_for(Duration::from_secs(10), "jobs started", |e| {
        e.iter().filter(|e| e["event"] == "start").count() == running
    })
    .await;
    w
}

fn pending_attempts(stopped: &serde_json::Value, queue: &str) -> Vec<u64> {
    stopped["queues"][queue]["pending"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["attempt"].as_u64()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_jobs_finish_starts_nothing_new_and_exits_zero() {
    let mut w = start_busy(
        6,
        json!({"sleep_ms": 1500}),
        &[("WORKER_CONCURRENCY", "2"), ("WORKER_DRAIN_TIMEOUT", "20s")],
        2,
    )
    .await;
    assert_eq!(w.get("/readyz").await.0, 200);

    w.signal("TERM");
    let signalled = Instant::now();
    let mut readyz = 200;
    while readyz == 200 && signalled.elapsed() < Duration::from_secs(1) {
        readyz = w.get("/readyz").await.0;
    }
    assert_eq!(readyz, 503, "/readyz must fail once draining begins");
    assert!(
        signalled.elapsed() < Duration::from_millis(500),
        "{:?}",
        signalled.elapsed()
    );

    let status = w.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", w.stderr());
    assert_eq!(w.count("start"), 2, "no job may start after SIGTERM");
    assert_eq!(w.count("end"), 2, "running jobs finish");
    let stopped = w.stopped();
    assert_eq!(stopped["report"]["ok"], 2);
    assert_eq!(stopped["report"]["released"], 0);
    assert_eq!(stopped["report"]["clean_drain"], true);
    assert_eq!(pending_attempts(&stopped, "default"), vec![1, 1, 1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_longer_than_the_drain_timeout_are_released_and_the_process_exits_in_time() {
    let mut w = start_busy(
        3,
        json!({"sleep_ms": 600_000}),
        &[("WORKER_CONCURRENCY", "2"), ("WORKER_DRAIN_TIMEOUT", "1s")],
        2,
    )
    .await;
    w.signal("TERM");
    let signalled = Instant::now();
    let status = w.wait_exit(Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "exited {took:?} after SIGTERM; drain timeout is 1s"
    );
    assert_eq!(status.code(), Some(0), "stderr:\n{}", w.stderr());
    assert_eq!(
        w.count("cancelled"),
        2,
        "running handlers see their cancellation"
    );
    let stopped = w.stopped();
    assert_eq!(stopped["report"]["released"], 2);
    assert_eq!(stopped["report"]["clean_drain"], false);
    assert_eq!(pending_attempts(&stopped, "default"), vec![1, 1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_releases_everything_and_exits_at_once() {
    let mut w = start_busy(
        2,
        json!({"sleep_ms": 600_000}),
        &[("WORKER_CONCURRENCY", "2"), ("WORKER_DRAIN_TIMEOUT", "10m")],
        2,
    )
    .await;
    w.signal("INT");
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.get("/readyz").await.0 != 503 {
        assert!(Instant::now() < deadline, "not draining after SIGINT");
    }
    w.signal("TERM");
    let signalled = Instant::now();
    let status = w.wait_exit(Duration::from_secs(10)).await;
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "{:?}",
        signalled.elapsed()
    );
    assert_eq!(status.code(), Some(0), "stderr:\n{}", w.stderr());
    let stopped = w.stopped();
    assert_eq!(stopped["report"]["released"], 2);
    assert_eq!(pending_attempts(&stopped, "default"), vec![1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_settled_and_the_worker_keeps_running() {
    let jobs = json!([
        {"outcome": "fatal"},
        {"outcome": "panic"},
        "this is not json",
        {"outcome": "retry"},
        {"sleep_ms": 10}
    ])
    .to_string();
    let mut w = DemoWorker::start(&[
        ("DEMO_JOBS", &jobs),
        ("WORKER_MAX_ATTEMPTS", "2"),
        ("WORKER_RETRY_BASE", "10ms"),
        ("WORKER_RETRY_CAP", "20ms"),
    ]);
    w.wait_listening().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = w.get("/scaling").await;
        assert_eq!(status, 200, "{body}");
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let q = &doc["queues"]["default"];
        if q["dead"] == 4 && doc["backlog"] == 0 && q["delayed"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "not settled: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.signal("TERM");
    assert_eq!(w.wait_exit(Duration::from_secs(10)).await.code(), Some(0));
    let stopped = w.stopped();
    let reasons: Vec<String> = stopped["queues"]["default"]["dead"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| d["reason"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(reasons.contains(&"asked to fail".to_owned()), "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("handler panicked: asked to panic")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("undecodable payload: ")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r == "failed 2 of 2 attempts; last error: asked to retry"),
        "{reasons:?}"
    );
    assert_eq!(stopped["report"]["ok"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_configuration_value_names_the_variable_and_exits_nonzero() {
    let mut w = DemoWorker::start(&[("WORKER_CONCURRENCY", "lots")]);
    let status = w.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(2));
    assert!(
        w.stderr()
            .contains(r#"WORKER_CONCURRENCY="lots" is invalid: expected a positive integer"#),
        "{}",
        w.stderr()
    );
}
