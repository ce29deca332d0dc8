//! The preemptible batch pool (`examples/batch`) as real processes on the real Redis:
//! a job whose worker is killed with SIGKILL, and jobs whose worker gets a spot notice
//! (SIGTERM with a short drain), resume on the next worker from their last checkpoint,
//! not from zero, and end with the same result as a run that was never interrupted.
//! On the real RabbitMQ, which keeps no checkpoints, the refusal is reported and a
//! killed job starts over and completes.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use system_tests::{DemoWorker, PoolBroker};
use worker_core::testing::unique;
use worker_core::{Broker, JobId, NewJob};

const QUEUE: &str = "batch";
/// Jobs only the second worker consumes: the same work, never interrupted.
const REFERENCE: &str = "batch-reference";

async fn enqueue(b: &dyn Broker, queue: &str, payloads: &[Value]) -> Vec<JobId> {
    let jobs = payloads
        .iter()
        .map(|p| NewJob::json(queue, p).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    b.enqueue(jobs)
        .await
        .unwrap_or_else(|e| panic!("enqueue: {e}"))
}

/// The events named `name` of job `id`.
fn of(events: &[Value], name: &str, id: &JobId) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["event"] == name && e["id"] == id.as_str())
        .cloned()
        .collect()
}

/// The single `end` event of `id`.
fn end_of(events: &[Value], id: &JobId) -> Value {
    let ends = of(events, "end", id);
    assert_eq!(
        ends.len(),
        1,
        "job {id} ended {} times: {events:?}",
        ends.len()
    );
    ends[0].clone()
}

fn worker(on: &PoolBroker, queues: &str, extra: &[(&str, &str)]) -> DemoWorker {
    let mut env = on.env(&[("WORKER_QUEUES", queues), ("WORKER_REAP_INTERVAL", "200ms")]);
    env.extend_from_slice(extra);
    DemoWorker::start_binary("batch", &env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_killed_mid_way_resumes_from_its_last_checkpoint() {
    let on = PoolBroker::redis(&unique("batch-kill")).await;
    let b = on.broker.as_ref();
    let work = json!({"items": 300, "item_ms": 10, "seed": 11});
    let id = enqueue(b, QUEUE, std::slice::from_ref(&work))
        .await
        .remove(0);

    let mut first = worker(
        &on,
        QUEUE,
        &[("WORKER_LEASE", "1s"), ("CHECKPOINT_EVERY", "20")],
    );
    first
        .wait_for(Duration::from_secs(60), "three checkpoints", |ev| {
            ev.iter().filter(|e| e["event"] == "checkpoint").count() >= 3
        })
        .await;
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10)).await;
    let before = first.events();
    assert!(
        of(&before, "end", &id).is_empty(),
        "it finished before the kill"
    );
    let last_saved = of(&before, "checkpoint", &id)
        .last()
        .and_then(|e| e["next"].as_u64())
        .unwrap_or(0);
    assert!(last_saved >= 60, "{before:?}");

    // The reference job, the same work, goes to the second worker only.
    let reference = enqueue(b, REFERENCE, &[work]).await.remove(0);
    let second = worker(&on, &format!("{QUEUE},{REFERENCE}"), &[]);
    second
        .wait_for(Duration::from_secs(60), "both jobs end", |ev| {
            ev.iter().filter(|e| e["event"] == "end").count() >= 2
        })
        .await;
    let after = second.events();
    let start = &of(&after, "start", &id)[0];
    let from = start["from"].as_u64().unwrap_or(0);
    // Reclaimed after the crash: an attempt counted, resumed where the first worker
    // saved last (a save it made but did not live to print would be later still).
    assert_eq!(start["attempt"], 2, "{start}");
    assert!(
        from >= last_saved && from.is_multiple_of(20) && from < 300,
        "resumed from {from}, last saved {last_saved}"
    );
    let end = end_of(&after, &id);
    assert_eq!(end["done"].as_u64(), Some(300 - from), "{end}");
    let whole = end_of(&after, &reference);
    assert_eq!(whole["done"], 300, "{whole}");
    assert_eq!(end["acc"], whole["acc"], "the resumed result differs");
    eprintln!(
        "batch, kill -9: last checkpoint seen at item {last_saved}, resumed at {from} of 300"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_notice_checkpoints_and_releases_every_running_job() {
    let on = PoolBroker::redis(&unique("batch-spot")).await;
    let b = on.broker.as_ref();
    let works: Vec<Value> = (0..4)
        .map(|i| json!({"items": 400, "item_ms": 10, "seed": 20 + i}))
        .collect();
    let ids = enqueue(b, QUEUE, &works).await;

    // No periodic checkpoint: only the one the notice makes.
    let mut first = worker(
        &on,
        QUEUE,
        &[
            ("WORKER_CONCURRENCY", "4"),
            ("WORKER_DRAIN_TIMEOUT", "3s"),
            ("CHECKPOINT_EVERY", "100000"),
        ],
    );
    first
        .wait_for(Duration::from_secs(60), "four starts", |ev| {
            ev.iter().filter(|e| e["event"] == "start").count() >= 4
        })
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let noticed = std::time::Instant::now();
    first.signal("TERM");
    let status = first.wait_exit(Duration::from_secs(30)).await;
    // Includes the 50 ms `wait_exit` gives the pipes.
    let exited_after = noticed.elapsed();
    assert!(status.success(), "{}", first.stderr());
    let before = first.events();
    let mut saved = HashMap::new();
    for id in &ids {
        assert!(of(&before, "end", id).is_empty(), "{id} ended: {before:?}");
        let stop = of(&before, "interrupted", id);
        assert_eq!(stop.len(), 1, "{id} was not handed back: {before:?}");
        let next = stop[0]["next"].as_u64().unwrap_or(0);
        assert!(next > 0 && next < 400, "{}", stop[0]);
        saved.insert(id.clone(), next);
    }
    // Released, not left to expire: all four are pending again, none in flight.
    let depth = b.depth(QUEUE).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((depth.pending, depth.in_flight), (4, 0), "{depth:?}");

    let references = enqueue(b, REFERENCE, &works).await;
    let second = worker(&on, &format!("{QUEUE},{REFERENCE}"), &[]);
    second
        .wait_for(Duration::from_secs(60), "eight jobs end", |ev| {
            ev.iter().filter(|e| e["event"] == "end").count() >= 8
        })
        .await;
    let after = second.events();
    for (id, reference) in ids.iter().zip(&references) {
        let start = &of(&after, "start", id)[0];
        // A release is not a failure: the attempt is unchanged.
        assert_eq!(start["attempt"], 1, "{start}");
        assert_eq!(start["from"].as_u64(), Some(saved[id]), "{start}");
        let end = end_of(&after, id);
        assert_eq!(end["done"].as_u64(), Some(400 - saved[id]), "{end}");
        assert_eq!(end["acc"], end_of(&after, reference)["acc"], "{id}");
    }
    let mut at: Vec<u64> = saved.values().copied().collect();
    at.sort_unstable();
    eprintln!(
        "batch, spot notice: exited {exited_after:?} after SIGTERM (drain timeout 3s); \
         resumed at items {at:?} of 400"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_checkpoints_are_refused_and_a_killed_job_starts_over() {
    let queue = unique("batch");
    let on = PoolBroker::rabbitmq(&queue).await;
    let work = json!({"items": 200, "item_ms": 10, "seed": 5});
    let id = enqueue(on.broker.as_ref(), &queue, &[work]).await.remove(0);
    let every = [("CHECKPOINT_EVERY", "20")];

    let mut first = worker(&on, &queue, &every);
    first
        .wait_for(Duration::from_secs(60), "the refusal", |ev| {
            ev.iter().any(|e| e["event"] == "checkpoints_refused")
        })
        .await;
    let refused = of(&first.events(), "checkpoints_refused", &id);
    assert!(
        refused[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("cannot be changed once published")),
        "{refused:?}"
    );
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(10)).await;
    assert!(of(&first.events(), "checkpoint", &id).is_empty());

    let mut second = worker(&on, &queue, &every);
    second
        .wait_for(Duration::from_secs(60), "the job ends", |ev| {
            ev.iter().any(|e| e["event"] == "end")
        })
        .await;
    let after = second.events();
    let start = &of(&after, "start", &id)[0];
    assert_eq!(start["attempt"], 2, "{start}");
    assert_eq!(start["from"], 0, "{start}");
    assert_eq!(end_of(&after, &id)["done"], 200);
    second.signal("TERM");
    assert!(second.wait_exit(Duration::from_secs(30)).await.success());
    on.cleanup().await;
}
