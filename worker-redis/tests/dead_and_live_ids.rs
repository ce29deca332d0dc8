//! A job id both live and dead in one queue: the contract's enqueue never lets that
//! happen, but keys written by something else (an older release's enqueue script, a
//! restored backup) can hold it. Requeue then makes no second live copy, and
//! dead-lettering the live job never overwrites the dead letter.

use std::time::Duration;

use worker_core::testing::unique;
use worker_core::{Broker, BrokerError, Envelope, FetchPlan, JobId, NewJob};
use worker_redis::RedisConfig;

const URL: &str = "redis://127.0.0.1:6379";
const LONG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_live_and_dead_is_neither_requeued_nor_dead_twice() {
    let prefix = unique("ids");
    let b = RedisConfig::new(URL)
        .prefix(&prefix)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.enqueue(vec![NewJob::new("q", "A").id("x")])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let plan = FetchPlan::single("q", 10, LONG);
    let first = b.fetch(&plan).await.unwrap_or_else(|e| panic!("{e}"));
    b.dead_letter(&first[0].lease, "poison")
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // Written as a waiting job is written, beside the dead letter of the same id.
    let live = Envelope::from_new(NewJob::new("q", "B").id("x"));
    let mut conn = redis::Client::open(URL)
        .unwrap_or_else(|e| panic!("{e}"))
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let tag = format!("{{{prefix}:q}}");
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg(format!("{tag}:jobs"))
        .arg("e:x")
        .arg(live.to_bytes())
        .arg("m:x")
        .arg(format!("1|{}|", live.due_at_ms))
        .cmd("RPUSH")
        .arg(format!("{tag}:pending"))
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    for ids in [vec![], vec![JobId::from("x")]] {
        let moved = b
            .requeue_dead("q", &ids)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            moved, 0,
            "requeue_dead({ids:?}) moved a dead letter whose id is live"
        );
    }
    let d = b.depth("q").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((d.pending, d.dead), (1, 1), "{d:?}");
    let running = b.fetch(&plan).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        running.len(),
        1,
        "one fetch returned x {} times",
        running.len()
    );
    assert_eq!(running[0].envelope.payload.as_ref(), b"B");
    assert_eq!(
        b.requeue_dead("q", &[])
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        0
    );

    let r = b.dead_letter(&running[0].lease, "poison again").await;
    assert!(
        matches!(r, Err(BrokerError::DuplicateJob { .. })),
        "dead-lettering x beside its dead letter: {r:?}"
    );
    let dead = b
        .dead_letters("q", 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.payload.as_ref(), b"A");
    assert_eq!(dead[0].reason, "poison");
    // Refused, it changed nothing: the running job still owns its lease.
    b.extend_lease(&running[0].lease, LONG)
        .await
        .unwrap_or_else(|e| panic!("the refused dead letter cost the lease: {e}"));
    b.ack(&running[0].lease)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let d = b.depth("q").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((d.pending, d.in_flight, d.delayed, d.dead), (0, 0, 0, 1));
    assert_eq!(
        b.purge_dead("q", &[])
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        1
    );
}
