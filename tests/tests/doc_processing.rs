//! The high-memory document pool (`examples/doc-processing`) as a real process on the
//! real Redis and the real RabbitMQ: under a burst of documents of mixed sizes its
//! memory budget is never
//! exceeded (from its own events and from `/metrics`), its peak RSS stays within the
//! budget plus its own baseline, and a document larger than the whole budget is
//! dead-lettered with that reason.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use system_tests::{DemoWorker, PoolBroker};
use worker_core::testing::unique;
use worker_core::NewJob;

const MIB: u64 = 1024 * 1024;
const BUDGET_MIB: u64 = 64;
/// Slack over the budget and the process's own baseline for the peak RSS: the
/// allocator's bookkeeping, buffers of the runtime and the broker client.
const RSS_SLACK_MIB: u64 = 8;

fn write_document(path: &Path, mib: u64) {
    let line = b"lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod\n";
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).unwrap_or_else(|e| panic!("{path:?}: {e}")),
    );
    // Exactly `mib` MiB: the declared cost is its size.
    let mut left = usize::try_from(mib * MIB).unwrap_or(usize::MAX);
    while left > 0 {
        let n = left.min(line.len());
        out.write_all(&line[..n]).unwrap_or_else(|e| panic!("{e}"));
        left -= n;
    }
    out.flush().unwrap_or_else(|e| panic!("{e}"));
}

/// `VmHWM` (peak RSS) or `VmRSS` of a process, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A gauge's value from a Prometheus text page.
fn gauge(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_holds_under_a_burst_and_an_oversize_document_is_dead_lettered() {
    let queue = unique("documents");
    budget_holds(PoolBroker::redis(&queue).await, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_the_memory_budget_holds_and_an_oversize_document_is_dead_lettered() {
    let queue = unique("documents");
    budget_holds(PoolBroker::rabbitmq(&queue).await, &queue).await;
}

async fn budget_holds(on: PoolBroker, queue: &str) {
    let b = &on.broker;
    let dir = std::env::temp_dir().join(queue);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));

    let sizes: [u64; 12] = [4, 12, 20, 8, 28, 16, 6, 24, 10, 2, 18, 14];
    let mut jobs = Vec::new();
    for (i, &mib) in sizes.iter().enumerate() {
        let path = dir.join(format!("doc-{i}.txt"));
        write_document(&path, mib);
        let payload = json!({"path": path, "meta": {"n": i}, "hold_ms": 400});
        jobs.push(
            NewJob::json(queue, &payload)
                .unwrap_or_else(|e| panic!("{e}"))
                .cost(u32::try_from(mib).unwrap_or(u32::MAX)),
        );
    }
    // Larger than the whole budget: it could never start.
    let oversize_path = dir.join("oversize.txt");
    write_document(&oversize_path, 1);
    jobs.push(
        NewJob::json(queue, &json!({"path": oversize_path}))
            .unwrap_or_else(|e| panic!("{e}"))
            .cost(u32::try_from(BUDGET_MIB + 1).unwrap_or(u32::MAX)),
    );
    let budget = format!("{BUDGET_MIB}MiB");
    let mut worker = DemoWorker::start_binary(
        "doc-processing",
        &on.env(&[
            ("WORKER_QUEUES", queue),
            ("WORKER_CONCURRENCY", "8"),
            ("WORKER_MEMORY_BUDGET", &budget),
        ]),
    );
    worker.wait_listening().await;
    // The process's own baseline, before any document reaches it.
    let baseline_kib = status_kib(worker.pid(), "VmRSS:");
    let ids = b
        .enqueue(jobs)
        .await
        .unwrap_or_else(|e| panic!("enqueue: {e}"));
    let oversize = ids[12].to_string();

    // Watch /metrics while the burst runs.
    let mut most_used = 0.0f64;
    let mut totals = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    // Twelve documents end in the handler; the oversize one never reaches it.
    while worker.count("end") < 12 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not done: {:?}\n{}",
            worker.events(),
            worker.stderr()
        );
        let (_, page) = worker.get("/metrics").await;
        if let Some(used) = gauge(&page, "worker_budget_used") {
            most_used = most_used.max(used);
        }
        if let Some(total) = gauge(&page, "worker_budget_total") {
            totals.push(total);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let peak_kib = status_kib(worker.pid(), "VmHWM:");
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", worker.stderr());

    // From /metrics: the budget in use never went past the budget.
    assert!(totals.iter().all(|&t| t == BUDGET_MIB as f64), "{totals:?}");
    assert!(most_used <= BUDGET_MIB as f64, "{most_used}");
    assert!(
        most_used > 28.0,
        "no two documents ever overlapped: {most_used}"
    );

    // From the worker's own events: the documents it held at once.
    let events = worker.events();
    let (mut held, mut most_held) = (0u64, 0u64);
    for e in &events {
        let cost = e["cost"].as_u64().unwrap_or(0);
        match e["event"].as_str() {
            Some("start") => held += cost,
            Some("end") if e["id"] != oversize.as_str() => held -= cost,
            _ => {}
        }
        most_held = most_held.max(held);
    }
    assert!(most_held <= BUDGET_MIB, "held {most_held} MiB at once");
    let ok = events
        .iter()
        .filter(|e| e["event"] == "end" && e["ok"] == true)
        .count();
    assert_eq!(ok, 12, "{events:?}");
    // Each document was read and counted whole.
    for e in events
        .iter()
        .filter(|e| e["event"] == "end" && e["ok"] == true)
    {
        let n = e["meta"]["n"].as_u64().unwrap_or(0) as usize;
        assert!(e["bytes"].as_u64().unwrap_or(0) >= sizes[n] * MIB, "{e}");
        assert!(e["words"].as_u64().unwrap_or(0) > 0, "{e}");
    }

    // The oversize document never started; it was dead-lettered with the reason.
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "start" && e["id"] == oversize.as_str()),
        "the oversize document started"
    );
    let dead = b
        .dead_letters(queue, 10)
        .await
        .unwrap_or_else(|e| panic!("dead letters: {e}"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].envelope.id.as_str(), oversize);
    assert!(
        dead[0].reason.contains("exceeds the pool budget"),
        "{}",
        dead[0].reason
    );

    // Peak RSS: the documents in memory at once (at most the budget) over the
    // process's own baseline, plus a little.
    let limit_kib = baseline_kib + (BUDGET_MIB + RSS_SLACK_MIB) * 1024;
    eprintln!(
        "doc-processing: baseline RSS {} MiB, peak RSS {} MiB, budget {BUDGET_MIB} MiB, \
         most budget in use {most_used} MiB, limit {} MiB",
        baseline_kib / 1024,
        peak_kib / 1024,
        limit_kib / 1024
    );
    assert!(
        peak_kib > 0 && peak_kib <= limit_kib,
        "peak RSS {peak_kib} KiB > {limit_kib} KiB"
    );
    let _ = std::fs::remove_dir_all(&dir);
    on.cleanup().await;
}
