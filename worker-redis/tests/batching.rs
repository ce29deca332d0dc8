//! Calls that travel together in one script call keep their own outcomes: concurrent
//! enqueues and acks against the shared Redis, many at once, with one bad call among
//! them.

use std::sync::Arc;
use std::time::Duration;

use worker_core::testing::unique;
use worker_core::{Broker, BrokerError, FetchPlan, FetchShare, Lease, LeaseToken, NewJob};

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

/// Acks that wait behind an ack call on the wire travel with the next fetch of their
/// queues. On one thread the order is fixed: the first ack starts a flush task that
/// has not run yet, the rest wait behind it, and the fetch takes them all.
#[tokio::test(flavor = "current_thread")]
async fn acks_that_travel_with_a_fetch_each_learn_their_own_outcome() {
    let b = broker().await;
    let (q1, q2) = (unique("q1"), unique("q2"));
    let jobs = (0..6)
        .flat_map(|i| {
            [
                NewJob::new(&q1, "x").id(format!("a{i}")),
                NewJob::new(&q2, "x").id(format!("b{i}")),
            ]
        })
        .collect();
    b.enqueue(jobs).await.unwrap_or_else(|e| panic!("{e}"));
    let lease = Duration::from_secs(30);
    let plan = |n: u32| {
        FetchPlan::new(
            vec![
                FetchShare::new(&q1, n / 2, n),
                FetchShare::new(&q2, n / 2, n),
            ],
            n,
            lease,
        )
    };
    let held = b.fetch(&plan(4)).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(held.len(), 4);
    // The second of each queue's acks carries a token that does not own its job.
    let leases: Vec<(bool, Lease)> = held
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let stale = i % 2 == 1;
            let token = if stale {
                LeaseToken(d.lease.token.0 ^ 1)
            } else {
                d.lease.token
            };
            (
                stale,
                Lease::new(d.lease.job_id.clone(), &d.lease.queue, token),
            )
        })
        .collect();
    let acks = futures::future::join_all(leases.iter().map(|(_, l)| b.ack(l)));
    let second = plan(4);
    let (outcomes, next) = tokio::join!(acks, b.fetch(&second));
    let next = next.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        next.len(),
        4,
        "the fetch that carried the acks still fetched"
    );
    for ((stale, l), r) in leases.iter().zip(outcomes) {
        match (stale, r) {
            (false, Ok(())) | (true, Err(BrokerError::LeaseLost { .. })) => {}
            (stale, r) => panic!(
                "ack of {} (stale token: {stale}) gave {r:?}",
                l.job_id.as_str()
            ),
        }
    }
    // Per queue: of its 6 jobs, 2 were fetched by the second fetch and 2 by the first,
    // of which one was acked and one held against a stale ack.
    for q in [&q1, &q2] {
        let d = b.depth(q).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (d.pending, d.in_flight),
            (2, 3),
            "{q}: one job acked, the stale ack changed nothing"
        );
    }
    // Per ack: the delivery that owns the job acks it now only if nothing took it
    // away, so a good ack left nothing to ack and a stale one left its owner intact.
    for ((stale, l), d) in leases.iter().zip(&held) {
        match (stale, b.ack(&d.lease).await) {
            (true, Ok(())) | (false, Err(BrokerError::LeaseLost { .. })) => {}
            (stale, r) => panic!(
                "the owner's ack of {} after an ack with a stale token ({stale}) gave {r:?}",
                l.job_id.as_str()
            ),
        }
    }
}
