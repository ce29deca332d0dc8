//! The GPU inference pool (`examples/gpu-inference`) as a real process on the real
//! Redis (and, for batching and outcomes, the real RabbitMQ): batches form within their size and wait bounds, each request gets its own
//! outcome, and a drain in the middle of a batch loses nothing.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use system_tests::{since_epoch_ms, DemoWorker, PoolBroker};
use worker_core::testing::unique;
use worker_core::NewJob;

async fn enqueue(on: &PoolBroker, queue: &str, payloads: &[Value]) -> Vec<String> {
    let jobs = payloads
        .iter()
        .map(|p| NewJob::json(queue, p).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    on.broker
        .enqueue(jobs)
        .await
        .unwrap_or_else(|e| panic!("enqueue: {e}"))
        .into_iter()
        .map(|id| id.to_string())
        .collect()
}

fn pool(on: &PoolBroker, queue: &str, extra: &[(&str, &str)]) -> DemoWorker {
    let mut env = on.env(&[("WORKER_QUEUES", queue)]);
    env.extend_from_slice(extra);
    DemoWorker::start_binary("gpu-inference", &env)
}

fn of(events: &[Value], name: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["event"] == name)
        .cloned()
        .collect()
}

fn ids(batch: &Value) -> Vec<String> {
    batch["ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_form_within_size_and_wait_and_each_request_has_its_own_outcome() {
    let queue = unique("infer");
    batches_form(PoolBroker::redis(&queue).await, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_batches_form_and_each_request_has_its_own_outcome() {
    let queue = unique("infer");
    batches_form(PoolBroker::rabbitmq(&queue).await, &queue).await;
}

async fn batches_form(on: PoolBroker, queue: &str) {
    let b = &on.broker;
    let mut payloads = vec![json!({"size": 32, "steps": 1}); 10];
    payloads.push(json!({"size": 32, "steps": 1, "fail": true}));
    let enqueued = enqueue(&on, queue, &payloads).await;
    let failing = enqueued[10].clone();

    let mut worker = pool(
        &on,
        queue,
        &[
            ("BATCH_MAX_SIZE", "4"),
            ("BATCH_MAX_WAIT", "300ms"),
            ("BATCH_STREAMS", "2"),
        ],
    );
    worker
        .wait_for(Duration::from_secs(60), "11 requests ended", |e| {
            e.iter().filter(|e| e["event"] == "end").count() >= 11
        })
        .await;
    // A lone request: its batch waits for company as long as BATCH_MAX_WAIT, no longer.
    let lone = enqueue(&on, queue, &[json!({"size": 16})]).await.remove(0);
    worker
        .wait_for(Duration::from_secs(30), "the lone request ended", |e| {
            e.iter()
                .any(|e| e["event"] == "end" && e["id"] == lone.as_str())
        })
        .await;
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", worker.stderr());

    let events = worker.events();
    let batches = of(&events, "batch");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for batch in &batches {
        let size = batch["size"].as_u64().unwrap_or(0);
        assert!((1..=4).contains(&size), "{batch}");
        assert!(batch["stream"].as_u64().is_some_and(|s| s < 2), "{batch}");
        for id in ids(batch) {
            *seen.entry(id).or_default() += 1;
        }
    }
    // Each request ran in exactly one batch, and some batches were full.
    assert_eq!(seen.len(), 12, "{batches:?}");
    assert!(seen.values().all(|&n| n == 1), "{batches:?}");
    assert!(batches.iter().any(|b| b["size"] == 4), "{batches:?}");
    let lone_batch = batches
        .iter()
        .find(|b| ids(b).contains(&lone))
        .unwrap_or_else(|| panic!("no batch for the lone request: {batches:?}"));
    assert_eq!(lone_batch["size"], 1);
    assert_eq!(lone_batch["formed"], "waited");
    assert!(
        lone_batch["formed_in_ms"].as_u64().unwrap_or(0) >= 300,
        "{lone_batch}"
    );

    // The failing request was dead-lettered alone; its batch-mates succeeded.
    let ends = of(&events, "end");
    for end in &ends {
        let expected_ok = end["id"] != failing.as_str();
        assert_eq!(end["ok"], expected_ok, "{end}");
    }
    let failing_batch = batches
        .iter()
        .find(|b| ids(b).contains(&failing))
        .unwrap_or_else(|| panic!("no batch for the failing request"));
    assert!(
        failing_batch["size"].as_u64().unwrap_or(0) > 1,
        "{failing_batch}"
    );
    let dead = b
        .dead_letters(queue, 10)
        .await
        .unwrap_or_else(|e| panic!("dead letters: {e}"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.id.as_str(), failing);
    assert!(
        dead[0].reason.contains("asked to fail"),
        "{}",
        dead[0].reason
    );
    // Nothing held, waiting or delayed; one dead letter.
    on.settled(queue, (0, 0, 0, 1)).await;
    on.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_mid_batch_finishes_the_batch_and_hands_back_the_rest() {
    let queue = unique("infer");
    let on = PoolBroker::redis(&queue).await;
    let enqueued = enqueue(&on, &queue, &vec![json!({"size": 160, "steps": 6}); 8]).await;
    let settings = [
        ("BATCH_MAX_SIZE", "4"),
        ("BATCH_STREAMS", "1"),
        ("WORKER_PREFETCH", "0"),
    ];
    let mut first = pool(&on, &queue, &settings);
    first
        .wait_for(Duration::from_secs(60), "a batch started", |e| {
            e.iter().any(|e| e["event"] == "batch")
        })
        .await;
    let term_at = since_epoch_ms(std::time::Instant::now());
    first.signal("TERM");
    let status = first.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{}", first.stderr());
    let events = first.events();
    let batches = of(&events, "batch");
    assert_eq!(batches.len(), 1, "{batches:?}");
    let in_batch = ids(&batches[0]);
    assert_eq!(in_batch.len(), 4);
    // The batch ran to its end during the drain.
    let ends = of(&events, "end");
    assert_eq!(ends.len(), 4, "{ends:?}");
    for end in &ends {
        assert_eq!(end["ok"], true, "{end}");
        assert!(in_batch.iter().any(|id| end["id"] == id.as_str()));
        assert!(end["_at_ms"].as_u64().unwrap_or(0) > term_at, "{end}");
    }
    assert_eq!(first.stopped()["report"]["ok"], 4);

    // The other four were never taken, or were handed back: another replica runs them.
    let mut second = pool(&on, &queue, &settings);
    second
        .wait_for(Duration::from_secs(60), "the rest ended", |e| {
            e.iter().filter(|e| e["event"] == "end").count() >= 4
        })
        .await;
    second.signal("TERM");
    second.wait_exit(Duration::from_secs(60)).await;
    let mut done: Vec<String> = first
        .events()
        .iter()
        .chain(second.events().iter())
        .filter(|e| e["event"] == "end" && e["ok"] == true)
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect();
    done.sort();
    let mut expected = enqueued.clone();
    expected.sort();
    assert_eq!(done, expected, "each request completed exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_longer_than_the_drain_timeout_is_released_not_lost() {
    let queue = unique("infer");
    let on = PoolBroker::redis(&queue).await;
    let b = &on.broker;
    let enqueued = enqueue(&on, &queue, &vec![json!({"size": 160, "steps": 400}); 2]).await;
    let mut first = pool(
        &on,
        &queue,
        &[
            ("BATCH_MAX_SIZE", "2"),
            ("BATCH_STREAMS", "1"),
            ("WORKER_PREFETCH", "0"),
            ("WORKER_DRAIN_TIMEOUT", "300ms"),
        ],
    );
    first
        .wait_for(Duration::from_secs(60), "the batch started", |e| {
            e.iter().any(|e| e["event"] == "batch" && e["size"] == 2)
        })
        .await;
    first.signal("TERM");
    first.wait_exit(Duration::from_secs(60)).await;
    let report = first.stopped()["report"].clone();
    assert_eq!(report["released"], 2, "{report}");
    assert_eq!(report["ok"], 0, "{report}");

    // Both are back in the queue, their attempt not counted, and run elsewhere.
    let depth = b.depth(&queue).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((depth.pending, depth.in_flight, depth.dead), (2, 0, 0));
    let second = pool(
        &on,
        &queue,
        &[("BATCH_MAX_SIZE", "2"), ("BATCH_MAX_WAIT", "1ms")],
    );
    // Only that they start again elsewhere, as first attempts; no need to wait the run.
    second
        .wait_for(Duration::from_secs(60), "the batch started again", |e| {
            e.iter().any(|e| e["event"] == "batch" && e["size"] == 2)
        })
        .await;
    let again = of(&second.events(), "batch");
    let mut ids_again = ids(&again[0]);
    ids_again.sort();
    let mut expected = enqueued;
    expected.sort();
    assert_eq!(ids_again, expected);
    second.signal("KILL");
}
