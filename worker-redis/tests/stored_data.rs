//! Data in Redis that the runtime did not write as it would: a job's meta overwritten
//! by something else does not stop the fetch that finds it.

use std::time::Duration;

use worker_core::testing::unique;
use worker_core::{Broker, FetchPlan, NewJob};
use worker_redis::RedisConfig;

const URL: &str = "redis://127.0.0.1:6379";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_meta_was_overwritten_is_still_fetched_and_acked() {
    let prefix = unique("meta");
    let b = RedisConfig::new(URL)
        .prefix(&prefix)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.enqueue(vec![
        NewJob::new("q", "x").id("odd"),
        NewJob::new("q", "y").id("plain"),
    ])
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // Something outside the runtime wrote a meta that does not read as `attempt|due|`.
    let mut conn = redis::Client::open(URL)
        .unwrap_or_else(|e| panic!("{e}"))
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _: () = redis::cmd("HSET")
        .arg(format!("{{{prefix}:q}}:jobs"))
        .arg("m:odd")
        .arg("not-a-number|")
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let got = b
        .fetch(&FetchPlan::single("q", 2, Duration::from_secs(30)))
        .await
        .unwrap_or_else(|e| panic!("the fetch must not fail for one odd meta: {e}"));
    assert_eq!(got.len(), 2);
    let odd = got
        .iter()
        .find(|d| d.envelope.id.as_str() == "odd")
        .unwrap_or_else(|| panic!("odd was not fetched"));
    assert_eq!(
        odd.envelope.attempt, 1,
        "an unreadable meta counts as a first attempt"
    );
    for d in &got {
        b.ack(&d.lease).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let d = b.depth("q").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((d.pending, d.in_flight), (0, 0));
}

async fn raw_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(URL)
        .unwrap_or_else(|e| panic!("{e}"))
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Overwrite `field` of the hash `key` as something outside the runtime would.
async fn overwrite(key: &str, field: &str, value: &[u8]) {
    let _: () = redis::cmd("HSET")
        .arg(key)
        .arg(field)
        .arg(value)
        .query_async(&mut raw_conn().await)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

async fn broker(prefix: &str) -> worker_redis::RedisBroker {
    RedisConfig::new(URL)
        .prefix(prefix)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_envelope_is_dead_lettered_and_its_batch_mates_run() {
    let prefix = unique("corrupt");
    let b = broker(&prefix).await;
    b.enqueue(
        ["a", "b", "bad", "c"]
            .iter()
            .map(|id| NewJob::new("q", format!("payload of {id}")).id(*id))
            .collect(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let stored = b"{\"id\":\"bad\",\"payload\":";
    overwrite(&format!("{{{prefix}:q}}:jobs"), "e:bad", stored).await;

    let got = b
        .fetch(&FetchPlan::single("q", 4, Duration::from_secs(30)))
        .await
        .unwrap_or_else(|e| panic!("one corrupt envelope must not fail the fetch: {e}"));
    let mut ids: Vec<&str> = got.iter().map(|d| d.envelope.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["a", "b", "c"]);
    for d in &got {
        assert_eq!(d.envelope.attempt, 1);
        assert_eq!(
            d.envelope.payload.as_ref(),
            format!("payload of {}", d.envelope.id).as_bytes()
        );
    }

    let dead = b
        .dead_letters("q", 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].envelope.id.as_str(), "bad");
    assert_eq!(dead[0].envelope.queue, "q");
    assert!(
        dead[0]
            .reason
            .starts_with("stored envelope is corrupt: EOF while parsing"),
        "{}",
        dead[0].reason
    );
    assert_eq!(
        dead[0].envelope.payload.as_ref(),
        stored,
        "nothing of the payload reads, so the stored bytes are kept whole"
    );

    for d in &got {
        b.ack(&d.lease).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let d = b.depth("q").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((d.backlog(), d.delayed, d.dead), (0, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_stored_under_another_id_is_dead_lettered_with_what_reads_of_it() {
    let prefix = unique("misfiled");
    let b = broker(&prefix).await;
    b.enqueue(vec![
        NewJob::new("q", "x").id("here"),
        NewJob::new("q", "y").id("fine"),
    ])
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let other = worker_core::Envelope::from_new(NewJob::new("q", "kept").id("elsewhere"));
    overwrite(&format!("{{{prefix}:q}}:jobs"), "e:here", &other.to_bytes()).await;

    let got = b
        .fetch(&FetchPlan::single("q", 2, Duration::from_secs(30)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].envelope.id.as_str(), "fine");
    let dead = b
        .dead_letters("q", 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].envelope.id.as_str(), "here");
    assert_eq!(dead[0].envelope.payload.as_ref(), b"kept");
    assert!(
        dead[0].reason.contains("elsewhere"),
        "the reason names the id the envelope claims: {}",
        dead[0].reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_history_does_not_stop_its_job() {
    let prefix = unique("history");
    let b = broker(&prefix).await;
    b.enqueue(vec![
        NewJob::new("q", "x").id("odd"),
        NewJob::new("q", "y").id("plain"),
    ])
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    overwrite(&format!("{{{prefix}:q}}:jobs"), "h:odd", b"[{\"attempt\":").await;
    let got = b
        .fetch(&FetchPlan::single("q", 2, Duration::from_secs(30)))
        .await
        .unwrap_or_else(|e| panic!("one corrupt history must not fail the fetch: {e}"));
    assert_eq!(got.len(), 2);
    let odd = got
        .iter()
        .find(|d| d.envelope.id.as_str() == "odd")
        .unwrap_or_else(|| panic!("odd was not fetched"));
    assert_eq!(odd.envelope.payload.as_ref(), b"x");
    assert!(odd.envelope.history.is_empty());
    for d in &got {
        b.ack(&d.lease).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let d = b.depth("q").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d.backlog(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unreadable_dead_letter_does_not_hide_the_others() {
    let prefix = unique("deadlist");
    let b = broker(&prefix).await;
    b.enqueue(
        ["one", "two", "three"]
            .iter()
            .map(|id| NewJob::new("q", format!("payload of {id}")).id(*id))
            .collect(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let got = b
        .fetch(&FetchPlan::single("q", 3, Duration::from_secs(30)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for d in &got {
        b.dead_letter(&d.lease, "failed")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let dead_jobs = format!("{{{prefix}:q}}:dead_jobs");
    // A payload that still reads in an envelope that does not; a history that does not.
    overwrite(
        &dead_jobs,
        "e:two",
        br#"{"payload":"payload of two","cost":"x"}"#,
    )
    .await;
    overwrite(&dead_jobs, "h:three", b"not json").await;
    let dead = b
        .dead_letters("q", 10)
        .await
        .unwrap_or_else(|e| panic!("one unreadable dead letter must not hide the others: {e}"));
    let by_id = |id: &str| {
        dead.iter()
            .find(|d| d.envelope.id.as_str() == id)
            .unwrap_or_else(|| panic!("{id} is not listed: {dead:?}"))
    };
    assert_eq!(dead.len(), 3);
    for id in ["one", "two", "three"] {
        let d = by_id(id);
        assert_eq!(d.reason, "failed");
        assert_eq!(d.envelope.queue, "q");
        assert_eq!(
            d.envelope.payload.as_ref(),
            format!("payload of {id}").as_bytes()
        );
    }
    assert_eq!(by_id("one").envelope.history.len(), 1);
    assert!(by_id("three").envelope.history.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_too_large_to_have_been_enqueued_is_dead_lettered_unread() {
    let prefix = unique("huge");
    let b = RedisConfig::new(URL)
        .prefix(&prefix)
        .max_payload(1024)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.enqueue(vec![
        NewJob::new("q", "x").id("huge"),
        NewJob::new("q", "y").id("fine"),
    ])
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // A well-formed envelope, written by another producer, far over 4 × 1 KiB + 1 MiB.
    let other = worker_core::Envelope::from_new(NewJob::new("q", "z".repeat(2 << 20)).id("huge"));
    overwrite(&format!("{{{prefix}:q}}:jobs"), "e:huge", &other.to_bytes()).await;

    let got = b
        .fetch(&FetchPlan::single("q", 2, Duration::from_secs(30)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ids: Vec<&str> = got.iter().map(|d| d.envelope.id.as_str()).collect();
    assert_eq!(ids, ["fine"]);
    let d = b.depth("q").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((d.pending, d.in_flight, d.dead), (0, 1, 1));
    let dead = b
        .dead_letters("q", 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.contains("larger than"), "{}", dead[0].reason);
    b.ack(&got[0].lease).await.unwrap_or_else(|e| panic!("{e}"));
}
