//! A test-owned Redis at its `maxmemory` with `noeviction` under a busy `demo-worker`:
//! writes that need memory (a lease extension, a heartbeat, an enqueue) are refused
//! while deletes and pops still work. A refusal shorter than the lease loses no lease,
//! runs no job twice, and the worker takes no new job until writes are accepted again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use system_tests::{redis_cli, since_epoch_ms, DemoWorker, RedisServer};
use worker_core::{Broker, NewJob};
use worker_redis::RedisConfig;

/// Filler keys, together well over the server's `maxmemory`.
const FILLER_KEYS: usize = 40;
const FILLER_BYTES: &str = "100000";

/// Push the server past its `maxmemory`. `DEBUG POPULATE` is not refused for memory
/// (writes such as `SET` are), so one call overshoots by megabytes, and the few bytes
/// the worker's acks free cannot bring the server back under its limit.
async fn fill(port: u16) {
    let n = FILLER_KEYS.to_string();
    let reply = redis_cli(port, &["debug", "populate", &n, "filler", FILLER_BYTES]).await;
    assert_eq!(reply, "OK", "DEBUG POPULATE");
    let refused = redis_cli(port, &["set", "memory-check", "x"]).await;
    assert!(
        refused.starts_with("OOM"),
        "writes still accepted: {refused}"
    );
}

async fn unfill(port: u16) {
    let keys: Vec<String> = (0..FILLER_KEYS).map(|i| format!("filler:{i}")).collect();
    let mut args = vec!["del"];
    args.extend(keys.iter().map(String::as_str));
    let reply = redis_cli(port, &args).await;
    assert_eq!(reply, FILLER_KEYS.to_string(), "filler deleted");
    let accepted = redis_cli(port, &["set", "memory-check", "x"]).await;
    assert_eq!(accepted, "OK", "writes accepted again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_refused_for_less_than_a_lease_lose_no_lease_and_start_no_job() {
    let server = RedisServer::start_with_maxmemory("4mb");
    let url = server.url();
    let queue = "jobs";
    let b = RedisConfig::new(&url)
        .prefix("memory")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut ids = system_tests::enqueue_json(&b, queue, &json!({"sleep_ms": 8000}), 12).await;
    // Room for four more jobs than the long ones: a worker that fetched while writes
    // are refused would start the probes below during the refusal.
    let w = DemoWorker::start(&[
        ("REDIS_URL", &url),
        ("REDIS_PREFIX", "memory"),
        ("WORKER_QUEUES", queue),
        ("WORKER_CONCURRENCY", "16"),
        ("WORKER_LEASE", "6s"),
        ("WORKER_HEARTBEAT", "500ms"),
    ]);
    w.wait_for(Duration::from_secs(30), "the 12 long jobs started", |e| {
        e.iter().filter(|e| e["event"] == "start").count() == 12
    })
    .await;

    // Four short jobs that fall due while writes are refused, half a second after the
    // first lease extension (lease / 3 = 2 s after the long jobs started) has found
    // the writes refused and paused fetching: the worker knows by then.
    let due_in = Duration::from_millis(2500);
    let probes = (0..4)
        .map(|_| {
            NewJob::json(queue, &json!({"sleep_ms": 100}))
                .unwrap_or_else(|e| panic!("{e}"))
                .delay(due_in)
        })
        .collect();
    let probes_due = Instant::now() + due_in;
    ids.extend(
        b.enqueue(probes)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|id| id.to_string()),
    );

    let filled = Instant::now();
    let refused_from = since_epoch_ms(filled);
    fill(server.port).await;
    // A heartbeat (every 500 ms) is refused: the worker says it is not ready.
    let mut readyz = Vec::new();
    while filled.elapsed() < Duration::from_millis(2500) {
        let (status, body) = w.get("/readyz").await;
        readyz.push(format!("{status} {}", body.trim()));
        if status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The injected fault: 3 s of refused writes, half the lease.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(filled.elapsed())).await;
    let refused_until = since_epoch_ms(Instant::now());
    assert!(
        Instant::now() > probes_due,
        "the probes fell due while writes were refused"
    );
    unfill(server.port).await;

    worker_core::testing::eventually(Duration::from_secs(60), "every job settled", || async {
        match b.depth(queue).await {
            Ok(d) => d.pending + d.in_flight + d.delayed == 0,
            Err(e) => panic!("depth: {e}"),
        }
    })
    .await;
    let depth = b.depth(queue).await.unwrap_or_else(|e| panic!("{e}"));
    let events = w.events();
    let log = w.stderr();

    let mut problems = Vec::new();
    let mut runs: BTreeMap<&str, Vec<u64>> = ids.iter().map(|id| (id.as_str(), vec![])).collect();
    let mut ends: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &events {
        let id = e["id"].as_str().unwrap_or("");
        match e["event"].as_str() {
            Some("start") => {
                runs.entry(id)
                    .or_default()
                    .push(e["attempt"].as_u64().unwrap_or(0));
                let at = e["_at_ms"].as_u64().unwrap_or(0);
                if (refused_from..=refused_until).contains(&at) {
                    problems.push(format!(
                        "job {id} started while writes were refused ({at} ms in {refused_from}..={refused_until})"
                    ));
                }
            }
            Some("end") if e["ok"] == Value::Bool(true) => *ends.entry(id).or_default() += 1,
            _ => {}
        }
    }
    for (id, attempts) in &runs {
        if attempts != &[1] {
            problems.push(format!(
                "job {id} ran with attempts {attempts:?}, not once as attempt 1"
            ));
        }
        let ended = ends.get(id).copied().unwrap_or(0);
        if ended != 1 {
            problems.push(format!("job {id} ended {ended} times"));
        }
    }
    if readyz.last().map(String::as_str) != Some("503 broker refuses writes") {
        problems.push(format!("/readyz while writes were refused: {readyz:?}"));
    }
    let lost = log.matches("lease lost").count();
    if lost > 0 {
        problems.push(format!("{lost} `lease lost` lines in the worker's log"));
    }
    if depth.dead != 0 {
        problems.push(format!("{} jobs dead-lettered", depth.dead));
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}\n\nworker log:\n{log}",
        problems.len(),
        problems.join("\n")
    );

    w.signal("TERM");
    let mut w = w;
    assert_eq!(
        w.wait_exit(Duration::from_secs(10)).await.code(),
        Some(0),
        "{}",
        w.stderr()
    );
}
