//! Bad input against Redis: an oversize payload is refused with nothing written; a
//! real worker on a queue with an odd name dead-letters an undecodable payload with its
//! reason and carries on with the next job; a stored envelope that no longer reads is
//! dead-lettered while the jobs fetched with it run once.

use std::time::Duration;

use serde_json::json;
use system_tests::DemoWorker;
use worker_core::testing::unique;
use worker_core::{Broker, BrokerError, NewJob};
use worker_redis::RedisConfig;

const URL: &str = "redis://127.0.0.1:6379";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_payload_is_refused_and_nothing_of_its_batch_is_written() {
    let prefix = unique("size");
    let b = RedisConfig::new(URL)
        .prefix(&prefix)
        .max_payload(64)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let r = b
        .enqueue(vec![
            NewJob::new("q", "small"),
            NewJob::new("q", vec![b'x'; 65]),
        ])
        .await;
    match r {
        Err(BrokerError::PayloadTooLarge { size, limit }) => assert_eq!((size, limit), (65, 64)),
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let e = BrokerError::PayloadTooLarge {
        size: 65,
        limit: 64,
    };
    assert_eq!(
        e.to_string(),
        "payload of 65 bytes exceeds the limit of 64 bytes"
    );
    let d = b.depth("q").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d.pending + d.delayed, 0, "nothing half-written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dead_letters_an_undecodable_payload_and_carries_on() {
    let prefix = unique("bad");
    let queue = "ünïcødé.q/π-1";
    let b = RedisConfig::new(URL)
        .prefix(&prefix)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ids = b
        .enqueue(vec![
            NewJob::new(queue, vec![0xff, 0xfe, 0x00]).id("garbage"),
            NewJob::json(queue, &json!({"sleep_ms": 1}))
                .unwrap_or_else(|e| panic!("{e}"))
                .id("fine"),
        ])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ids.len(), 2);
    let mut w = DemoWorker::start(&[
        ("REDIS_URL", URL),
        ("REDIS_PREFIX", &prefix),
        ("WORKER_QUEUES", queue),
    ]);
    w.wait_for(Duration::from_secs(20), "the good job ran", |e| {
        e.iter().any(|e| e["event"] == "end" && e["id"] == "fine")
    })
    .await;
    let dead = b
        .dead_letters(queue, 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.id.as_str(), "garbage");
    assert_eq!(dead[0].envelope.payload.as_ref(), &[0xff, 0xfe, 0x00]);
    assert!(
        dead[0].reason.starts_with("undecodable payload: "),
        "{}",
        dead[0].reason
    );
    assert_eq!(
        w.count("start"),
        1,
        "the handler never saw the undecodable payload"
    );
    w.signal("TERM");
    assert_eq!(w.wait_exit(Duration::from_secs(10)).await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dead_letters_a_corrupt_stored_job_and_runs_its_batch_mates_once() {
    let prefix = unique("corrupt");
    let queue = "jobs";
    let b = RedisConfig::new(URL)
        .prefix(&prefix)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let good: Vec<String> = (0..6).map(|i| format!("good-{i}")).collect();
    let mut jobs: Vec<NewJob> = good
        .iter()
        .map(|id| {
            NewJob::json(queue, &json!({"sleep_ms": 1}))
                .unwrap_or_else(|e| panic!("{e}"))
                .id(id.as_str())
        })
        .collect();
    jobs.insert(3, NewJob::new(queue, "x").id("corrupt"));
    b.enqueue(jobs).await.unwrap_or_else(|e| panic!("{e}"));
    // Something outside the runtime overwrote the stored envelope.
    let out = std::process::Command::new("redis-cli")
        .args(["-p", "6379", "hset", &format!("{{{prefix}:{queue}}}:jobs")])
        .args(["e:corrupt", "{\"id\":"])
        .output()
        .unwrap_or_else(|e| panic!("redis-cli: {e}"));
    assert!(out.status.success(), "{out:?}");

    // Room for the whole queue in one fetch, and a short lease, so a fetch that
    // failed for the corrupt job would see its batch-mates come back at attempt 2.
    let mut w = DemoWorker::start(&[
        ("REDIS_URL", URL),
        ("REDIS_PREFIX", &prefix),
        ("WORKER_QUEUES", queue),
        ("WORKER_CONCURRENCY", "16"),
        ("WORKER_LEASE", "2s"),
    ]);
    w.wait_for(Duration::from_secs(30), "every good job ended", |e| {
        good.iter().all(|id| {
            e.iter()
                .any(|e| e["event"] == "end" && e["id"] == id.as_str())
        })
    })
    .await;
    worker_core::testing::eventually(Duration::from_secs(10), "backlog 0", || async {
        let d = b.depth(queue).await.unwrap_or_else(|e| panic!("{e}"));
        (d.backlog(), d.delayed, d.dead) == (0, 0, 1)
    })
    .await;
    let mut starts = w.starts();
    starts.sort();
    let want: Vec<(String, u64)> = good.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(starts, want, "each good job ran once, at attempt 1");
    assert_eq!(w.count("end"), good.len());
    let dead = b
        .dead_letters(queue, 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.id.as_str(), "corrupt");
    assert!(
        dead[0].reason.starts_with("stored envelope is corrupt: "),
        "{}",
        dead[0].reason
    );
    assert_eq!(dead[0].envelope.payload.as_ref(), b"{\"id\":");
    w.signal("TERM");
    assert_eq!(w.wait_exit(Duration::from_secs(10)).await.code(), Some(0));
}

/// A batch over several queues is written queue by queue, in the order each queue
/// first appears in it: a refused queue stops the batch there, so the producer knows
/// from the error which jobs are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_several_queues_is_written_queue_by_queue_up_to_the_one_refused() {
    let prefix = unique("spread");
    let b = RedisConfig::new(URL)
        .prefix(&prefix)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.enqueue(vec![NewJob::new("b", "first").id("taken")])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let r = b
        .enqueue(vec![
            NewJob::new("z", "1").id("z1"),
            NewJob::new("b", "2").id("b-new"),
            NewJob::new("b", "3").id("taken"),
            NewJob::new("z", "4").id("z2"),
            NewJob::new("a", "5").id("a1"),
        ])
        .await;
    match r {
        Err(BrokerError::DuplicateJob { job_id }) => assert_eq!(job_id.as_str(), "taken"),
        other => panic!("expected DuplicateJob, got {other:?}"),
    }
    let pending = |q: &'static str| {
        let b = &b;
        async move { b.depth(q).await.unwrap_or_else(|e| panic!("{e}")).pending }
    };
    assert_eq!(
        (pending("z").await, pending("b").await, pending("a").await),
        (2, 1, 0),
        "z (first in the batch) written whole, b (refused) left as it was, a (after it) not written"
    );
    // Sending again the refused queue's jobs (its duplicate left out) and the queues
    // after it completes the batch without writing anything twice.
    b.enqueue(vec![
        NewJob::new("b", "2").id("b-new"),
        NewJob::new("a", "5").id("a1"),
    ])
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (pending("z").await, pending("b").await, pending("a").await),
        (2, 2, 1)
    );
}
