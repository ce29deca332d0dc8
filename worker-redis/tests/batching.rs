//! Calls that travel together in one script call keep their own outcomes: concurrent
//! enqueues and acks against the shared Redis, many at once, with one bad call among
//! them.

use std::sync::Arc;
use std::time::Duration;

use worker_core::testing::unique;
use worker_core::{Broker, BrokerError, FetchPlan, Lease, LeaseToken, NewJob};

async fn broker() -> Arc<worker_redis::RedisBroker> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    Arc::new(
        worker_redis::RedisConfig::new(url)
            .prefix(unique("batching"))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("redis: {e}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueues_keep_their_own_all_or_nothing() {
    let b = broker().await;
    let q = unique("q");
    b.enqueue(vec![NewJob::new(&q, "x").id("taken")])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // 200 callers at once, two jobs each; caller 77 repeats an id that is live.
    let mut calls = Vec::new();
    for c in 0..200 {
        let (b, q) = (b.clone(), q.clone());
        calls.push(tokio::spawn(async move {
            let second = if c == 77 {
                "taken".to_owned()
            } else {
                format!("{c}-b")
            };
            b.enqueue(vec![
                NewJob::new(&q, "x").id(format!("{c}-a")),
                NewJob::new(&q, "x").id(second),
            ])
            .await
        }));
    }
    let mut refused = Vec::new();
    for (c, call) in calls.into_iter().enumerate() {
        match call.await.unwrap_or_else(|e| panic!("{e}")) {
            Ok(ids) => assert_eq!(ids.len(), 2),
            Err(BrokerError::DuplicateJob { job_id }) => {
                assert_eq!(job_id.as_str(), "taken");
                refused.push(c);
            }
            Err(e) => panic!("caller {c}: {e}"),
        }
    }
    assert_eq!(refused, vec![77]);
    let d = b.depth(&q).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        d.pending,
        1 + 199 * 2,
        "caller 77 wrote nothing, the others all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acks_each_learn_their_own_outcome() {
    let b = broker().await;
    let q = unique("q");
    let jobs = (0..300)
        .map(|i| NewJob::new(&q, "x").id(i.to_string()))
        .collect();
    b.enqueue(jobs).await.unwrap_or_else(|e| panic!("{e}"));
    let got = b
        .fetch(&FetchPlan::single(&q, 300, Duration::from_secs(30)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.len(), 300);
    let mut calls = Vec::new();
    for (i, d) in got.into_iter().enumerate() {
        let b = b.clone();
        // Every tenth ack carries a token that does not own its job.
        let lease = if i % 10 == 0 {
            Lease::new(
                d.lease.job_id.clone(),
                &d.lease.queue,
                LeaseToken(d.lease.token.0 ^ 1),
            )
        } else {
            d.lease.clone()
        };
        calls.push(tokio::spawn(async move { (i, b.ack(&lease).await) }));
    }
    for call in calls {
        let (i, r) = call.await.unwrap_or_else(|e| panic!("{e}"));
        match (i % 10 == 0, r) {
            (false, Ok(())) | (true, Err(BrokerError::LeaseLost { .. })) => {}
            (stale, r) => panic!("ack {i} (stale token: {stale}) gave {r:?}"),
        }
    }
    let d = b.depth(&q).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (d.pending, d.in_flight),
        (0, 30),
        "the 30 stale acks changed nothing"
    );
}
