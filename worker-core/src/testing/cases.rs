//! One public async function per behaviour of the [`Broker`] contract.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;

use super::{eventually, unique};
use crate::broker::{Broker, FetchPlan, FetchShare, WorkerInfo};
use crate::error::BrokerError;
use crate::job::{JobId, NewJob};

const LONG: Duration = Duration::from_secs(60);

async fn put(b: &dyn Broker, queue: &str, n: usize) -> Vec<JobId> {
    let jobs = (0..n)
        .map(|i| NewJob::new(queue, format!("{{\"n\":{i}}}")))
        .collect();
    b.enqueue(jobs).await.expect("enqueue")
}

async fn take(b: &dyn Broker, queue: &str, n: u32, lease: Duration) -> Vec<crate::Delivery> {
    b.fetch(&FetchPlan::single(queue, n, lease))
        .await
        .expect("fetch")
}

fn is_lease_lost<T: std::fmt::Debug>(r: Result<T, BrokerError>) -> bool {
    matches!(r, Err(BrokerError::LeaseLost { .. }))
}

/// Enqueued jobs are fetched, counted in flight, and gone once acked.
pub async fn enqueue_fetch_ack(b: &dyn Broker) {
    let q = unique("basic");
    let ids = put(b, &q, 3).await;
    assert_eq!(ids.len(), 3);
    assert_eq!(b.depth(&q).await.unwrap().pending, 3);
    let got = take(b, &q, 2, LONG).await;
    assert_eq!(got.len(), 2);
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.pending, d.in_flight), (1, 2));
    for g in &got {
        b.ack(&g.lease).await.unwrap();
    }
    let rest = take(b, &q, 5, LONG).await;
    assert_eq!(rest.len(), 1);
    b.ack(&rest[0].lease).await.unwrap();
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.pending, d.in_flight, d.delayed, d.dead), (0, 0, 0, 0));
}

/// Oldest first; never more than asked; nothing from an empty queue.
pub async fn fetch_is_fifo_and_bounded(b: &dyn Broker) {
    let q = unique("fifo");
    assert!(take(b, &q, 4, LONG).await.is_empty());
    let ids = put(b, &q, 5).await;
    let first = take(b, &q, 3, LONG).await;
    let second = take(b, &q, 3, LONG).await;
    let order: Vec<JobId> = first
        .iter()
        .chain(&second)
        .map(|d| d.envelope.id.clone())
        .collect();
    assert_eq!(order, ids);
    assert!(take(b, &q, 3, LONG).await.is_empty());
}

/// Shares are kept when every queue has work; an empty queue's share and the
/// per-queue maximum are honoured in the same round trip.
pub async fn fetch_plan_keeps_shares_and_conserves_work(b: &dyn Broker) {
    let (qa, qb) = (unique("a"), unique("b"));
    put(b, &qa, 10).await;
    put(b, &qb, 10).await;
    let count =
        |got: &[crate::Delivery], q: &str| got.iter().filter(|d| d.lease.queue == q).count();
    let plan = FetchPlan::new(
        vec![FetchShare::new(&qa, 3, 8), FetchShare::new(&qb, 1, 8)],
        4,
        LONG,
    );
    let got = b.fetch(&plan).await.unwrap();
    assert_eq!((count(&got, &qa), count(&got, &qb)), (3, 1));
    // A has 7 left: a plan wanting 9 from A (max 8) and none from B takes 7 + 2.
    let plan = FetchPlan::new(
        vec![FetchShare::new(&qa, 9, 9), FetchShare::new(&qb, 0, 8)],
        9,
        LONG,
    );
    let got = b.fetch(&plan).await.unwrap();
    assert_eq!((count(&got, &qa), count(&got, &qb)), (7, 2));
    // Per-queue max: B may give at most 1 although 7 remain and 4 are wanted.
    let plan = FetchPlan::new(vec![FetchShare::new(&qb, 1, 1)], 4, LONG);
    assert_eq!(b.fetch(&plan).await.unwrap().len(), 1);
}

/// Payload bytes, headers, cost, max attempts and the given id come back as stored.
pub async fn envelope_round_trips(b: &dyn Broker) {
    let q = unique("env");
    let binary = Bytes::from_static(&[0, 159, 146, 150, 255]);
    let job = NewJob::new(&q, binary.clone())
        .id("job-1")
        .cost(42)
        .max_attempts(7)
        .header("traceparent", "00-abc-def-01");
    let ids = b.enqueue(vec![job]).await.unwrap();
    assert_eq!(ids, vec![JobId::from("job-1")]);
    let got = take(b, &q, 1, LONG).await;
    let env = &got[0].envelope;
    assert_eq!(env.id.as_str(), "job-1");
    assert_eq!(env.queue, q);
    assert_eq!(env.payload, binary);
    assert_eq!(env.attempt, 1);
    assert_eq!(env.cost, 42);
    assert_eq!(env.max_attempts, Some(7));
    assert_eq!(
        env.headers.get("traceparent").map(String::as_str),
        Some("00-abc-def-01")
    );
    assert!(env.enqueued_at_ms > 0);
    assert_eq!(got[0].lease.job_id, env.id);
}

/// A batch with a duplicate id or an invalid member writes nothing. A backend that
/// says it cannot refuse duplicate ids must store both, losing neither.
pub async fn batch_enqueue_is_all_or_nothing(b: &dyn Broker) {
    let q = unique("batch");
    b.enqueue(vec![NewJob::new(&q, "x").id("dup")])
        .await
        .unwrap();
    let r = b
        .enqueue(vec![
            NewJob::new(&q, "y").id("fresh"),
            NewJob::new(&q, "z").id("dup"),
        ])
        .await;
    let stored = if b.refuses_duplicate_ids() {
        assert!(matches!(r, Err(BrokerError::DuplicateJob { .. })), "{r:?}");
        1
    } else {
        assert_eq!(r.unwrap().len(), 2);
        3
    };
    let r = b
        .enqueue(vec![NewJob::new(&q, "y"), NewJob::new("bad name", "z")])
        .await;
    assert!(
        matches!(r, Err(BrokerError::InvalidQueueName { .. })),
        "{r:?}"
    );
    assert_eq!(b.depth(&q).await.unwrap().pending, stored);
}

/// Names that would break keys or configuration are refused with the reason.
pub async fn invalid_queue_names_are_refused(b: &dyn Broker) {
    for name in [
        "",
        "has space",
        "tag{x}",
        "a,b",
        "a:b",
        "nl\n",
        &"x".repeat(201),
    ] {
        let r = b.enqueue(vec![NewJob::new(name, "x")]).await;
        assert!(
            matches!(r, Err(BrokerError::InvalidQueueName { .. })),
            "{name:?}: {r:?}"
        );
    }
    // Unusual but valid names work.
    let odd = unique("ünïcødé.queue/π-1");
    b.enqueue(vec![NewJob::new(&odd, "x")]).await.unwrap();
    assert_eq!(take(b, &odd, 1, LONG).await.len(), 1);
}

/// An expired lease goes back to pending with its attempt counted; a new delivery
/// has a new token.
pub async fn expired_lease_is_reaped_with_attempt_counted(b: &dyn Broker) {
    let q = unique("reap");
    put(b, &q, 1).await;
    let first = take(b, &q, 1, Duration::from_millis(150)).await;
    assert_eq!(b.reap_expired(std::slice::from_ref(&q)).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(b.reap_expired(std::slice::from_ref(&q)).await.unwrap(), 1);
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.pending, d.in_flight), (1, 0));
    let second = take(b, &q, 1, LONG).await;
    assert_eq!(second[0].envelope.id, first[0].envelope.id);
    assert_eq!(second[0].envelope.attempt, 2);
    assert_ne!(second[0].lease.token, first[0].lease.token);
    b.ack(&second[0].lease).await.unwrap();
}

/// A lease kept alive by extension is never reaped.
pub async fn extended_lease_is_not_reaped(b: &dyn Broker) {
    let q = unique("extend");
    put(b, &q, 1).await;
    let lease = Duration::from_millis(300);
    let got = take(b, &q, 1, lease).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.extend_lease(&got[0].lease, lease).await.unwrap();
        assert_eq!(b.reap_expired(std::slice::from_ref(&q)).await.unwrap(), 0);
    }
    b.ack(&got[0].lease).await.unwrap();
}

/// Many reapers at the same moment reclaim each expired lease exactly once.
pub async fn concurrent_reapers_reclaim_each_lease_once(b: &dyn Broker) {
    let q = unique("reapers");
    put(b, &q, 20).await;
    assert_eq!(take(b, &q, 20, Duration::from_millis(100)).await.len(), 20);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let queues = vec![q.clone()];
    let reaps = futures::future::join_all((0..8).map(|_| b.reap_expired(&queues))).await;
    let total: u64 = reaps.into_iter().map(|r| r.unwrap()).sum();
    assert_eq!(total, 20);
    let again = take(b, &q, 50, LONG).await;
    assert_eq!(again.len(), 20);
    assert!(again.iter().all(|d| d.envelope.attempt == 2));
}

/// After a lease was reclaimed and redelivered, the old token can change nothing,
/// and the new owner's outcome stands.
pub async fn stale_token_is_refused_everywhere(b: &dyn Broker) {
    let q = unique("fence");
    put(b, &q, 1).await;
    let old = take(b, &q, 1, Duration::from_millis(100)).await.remove(0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.reap_expired(std::slice::from_ref(&q)).await.unwrap();
    let new = take(b, &q, 1, LONG).await.remove(0);
    assert!(is_lease_lost(b.ack(&old.lease).await));
    assert!(is_lease_lost(
        b.retry_after(&old.lease, Duration::ZERO, "late").await
    ));
    assert!(is_lease_lost(b.dead_letter(&old.lease, "late").await));
    assert!(is_lease_lost(b.release(&old.lease).await));
    assert!(is_lease_lost(b.extend_lease(&old.lease, LONG).await));
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.pending, d.in_flight, d.delayed, d.dead), (0, 1, 0, 0));
    b.ack(&new.lease).await.unwrap();
    assert_eq!(b.depth(&q).await.unwrap().backlog(), 0);
}

/// A retry waits out its delay as delayed, then comes back with attempt + 1 and the
/// error in its history.
pub async fn retry_after_delays_and_counts_the_attempt(b: &dyn Broker) {
    let q = unique("retry");
    put(b, &q, 1).await;
    let got = take(b, &q, 1, LONG).await.remove(0);
    b.retry_after(&got.lease, Duration::from_millis(300), "boom")
        .await
        .unwrap();
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.pending, d.in_flight, d.delayed), (0, 0, 1));
    assert!(
        take(b, &q, 1, LONG).await.is_empty(),
        "fetched before its delay"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    let d = b.depth(&q).await.unwrap();
    assert_eq!(d.delayed_due + d.pending, 1, "{d:?}");
    assert_eq!(d.backlog(), 1);
    let again = take(b, &q, 1, LONG).await.remove(0);
    assert_eq!(again.envelope.attempt, 2);
    assert_eq!(again.envelope.history.len(), 1);
    assert_eq!(again.envelope.history[0].error, "boom");
    assert_eq!(again.envelope.history[0].attempt, 1);
}

/// A retry with no delay is pending again at once.
pub async fn retry_without_delay_is_pending_at_once(b: &dyn Broker) {
    let q = unique("retry0");
    put(b, &q, 1).await;
    let got = take(b, &q, 1, LONG).await.remove(0);
    b.retry_after(&got.lease, Duration::ZERO, "again")
        .await
        .unwrap();
    let again = take(b, &q, 1, LONG).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].envelope.attempt, 2);
}

/// A checkpoint stays with the job through a release, a reclaimed lease, a retry and
/// a dead-letter requeue, until the ack; a stale token cannot save one. A backend that
/// refuses checkpoints ([`BrokerError::Unsupported`]) must change nothing by refusing.
pub async fn checkpoint_travels_with_the_job_until_ack(b: &dyn Broker) {
    let q = unique("checkpoint");
    put(b, &q, 1).await;
    let first = take(b, &q, 1, LONG).await.remove(0);
    assert_eq!(first.envelope.checkpoint, None);
    let mut saved = first.envelope.clone();
    saved.checkpoint = Some(Bytes::from_static(b"{\"done\":10}"));
    match b.checkpoint(&first.lease, &saved).await {
        Ok(()) => {}
        Err(BrokerError::Unsupported { .. }) => {
            b.ack(&first.lease).await.unwrap();
            assert_eq!(b.depth(&q).await.unwrap().backlog(), 0);
            return;
        }
        Err(e) => panic!("checkpoint: {e}"),
    }

    // Released (a drain): delivered again with it, attempt unchanged.
    b.release(&first.lease).await.unwrap();
    let second = take(b, &q, 1, Duration::from_millis(150)).await.remove(0);
    assert_eq!(second.envelope.attempt, 1);
    assert_eq!(second.envelope.checkpoint, saved.checkpoint);
    assert_eq!(second.envelope.payload, first.envelope.payload);

    // A later save replaces it (bytes that are not UTF-8 too); reclaimed after a
    // crash, the job comes back with the latest one and its attempt counted.
    let mut later = second.envelope.clone();
    later.checkpoint = Some(Bytes::from_static(&[0xff, 0x00, 0x7f]));
    b.checkpoint(&second.lease, &later).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(b.reap_expired(std::slice::from_ref(&q)).await.unwrap(), 1);
    let third = take(b, &q, 1, LONG).await.remove(0);
    assert_eq!(third.envelope.attempt, 2);
    assert_eq!(third.envelope.checkpoint, later.checkpoint);

    // The stale delivery cannot overwrite it.
    let mut stale = second.envelope.clone();
    stale.checkpoint = Some(Bytes::from_static(b"stale"));
    assert!(is_lease_lost(b.checkpoint(&second.lease, &stale).await));

    // Retried: still there, beside the failure in the history.
    b.retry_after(&third.lease, Duration::ZERO, "flaky")
        .await
        .unwrap();
    let fourth = take(b, &q, 1, LONG).await.remove(0);
    assert_eq!(fourth.envelope.attempt, 3);
    assert_eq!(
        fourth.envelope.history.last().map(|r| r.error.as_str()),
        Some("flaky")
    );
    assert_eq!(fourth.envelope.checkpoint, later.checkpoint);

    // Dead-lettered and requeued: still there.
    b.dead_letter(&fourth.lease, "inspect").await.unwrap();
    let dead = b.dead_letters(&q, 10).await.unwrap();
    assert_eq!(dead[0].envelope.checkpoint, later.checkpoint);
    assert_eq!(b.requeue_dead(&q, &[]).await.unwrap(), 1);
    let fifth = take(b, &q, 1, LONG).await.remove(0);
    assert_eq!(fifth.envelope.checkpoint, later.checkpoint);

    // Acked: gone with the job.
    b.ack(&fifth.lease).await.unwrap();
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.pending, d.in_flight, d.delayed, d.dead), (0, 0, 0, 0));
}

/// A released job is next in line and keeps its attempt.
pub async fn release_keeps_the_attempt_and_goes_first(b: &dyn Broker) {
    let q = unique("release");
    let ids = put(b, &q, 3).await;
    let got = take(b, &q, 1, LONG).await.remove(0);
    assert_eq!(got.envelope.id, ids[0]);
    b.release(&got.lease).await.unwrap();
    let again = take(b, &q, 1, LONG).await.remove(0);
    assert_eq!(again.envelope.id, ids[0]);
    assert_eq!(again.envelope.attempt, 1);
    assert!(again.envelope.history.is_empty());
}

/// Dead letters keep the envelope, the reason and the history; they can be listed,
/// requeued (attempt reset) and purged.
pub async fn dead_letters_keep_reason_and_history(b: &dyn Broker) {
    let q = unique("dead");
    let ids = put(b, &q, 3).await;
    let got = take(b, &q, 1, LONG).await.remove(0);
    b.retry_after(&got.lease, Duration::ZERO, "first failure")
        .await
        .unwrap();
    let got = take(b, &q, 1, LONG).await.remove(0);
    assert_eq!(got.envelope.id, ids[1]);
    let got = {
        b.release(&got.lease).await.unwrap();
        let all = take(b, &q, 3, LONG).await;
        for d in &all {
            b.dead_letter(&d.lease, &format!("poison {}", d.envelope.id))
                .await
                .unwrap();
        }
        all
    };
    assert_eq!(got.len(), 3);
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.pending, d.in_flight, d.dead), (0, 0, 3));
    let dead = b.dead_letters(&q, 10).await.unwrap();
    assert_eq!(dead.len(), 3);
    let first = dead
        .iter()
        .find(|d| d.envelope.id == ids[0])
        .expect("dead job 0");
    assert_eq!(first.reason, format!("poison {}", ids[0]));
    assert_eq!(first.envelope.attempt, 2);
    let errors: Vec<&str> = first
        .envelope
        .history
        .iter()
        .map(|h| h.error.as_str())
        .collect();
    assert_eq!(errors, vec!["first failure", &format!("poison {}", ids[0])]);
    assert_eq!(b.dead_letters(&q, 2).await.unwrap().len(), 2);

    assert_eq!(
        b.requeue_dead(&q, std::slice::from_ref(&ids[0]))
            .await
            .unwrap(),
        1
    );
    let back = take(b, &q, 5, LONG).await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].envelope.id, ids[0]);
    assert_eq!(back[0].envelope.attempt, 1);
    assert_eq!(
        b.purge_dead(&q, std::slice::from_ref(&ids[1]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(b.purge_dead(&q, &[]).await.unwrap(), 1);
    assert_eq!(b.depth(&q).await.unwrap().dead, 0);
}

/// A job enqueued with a delay is not fetched before it is due.
pub async fn delayed_enqueue_waits_for_its_time(b: &dyn Broker) {
    let q = unique("delayed");
    b.enqueue(vec![
        NewJob::new(&q, "later").delay(Duration::from_millis(300))
    ])
    .await
    .unwrap();
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.pending, d.delayed, d.delayed_due), (0, 1, 0));
    assert!(take(b, &q, 1, LONG).await.is_empty());
    eventually(Duration::from_secs(5), "delayed job fetched", || async {
        !take(b, &q, 1, LONG).await.is_empty()
    })
    .await;
}

/// Depth reports every state at once, and the age of the oldest pending job (a
/// backend that cannot read it says so in `sources`, as "unknown…").
pub async fn depth_counts_every_state(b: &dyn Broker) {
    let q = unique("depth");
    put(b, &q, 6).await;
    b.enqueue(vec![NewJob::new(&q, "d").delay(Duration::from_secs(60))])
        .await
        .unwrap();
    let got = take(b, &q, 3, LONG).await;
    b.dead_letter(&got[0].lease, "x").await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let d = b.depth(&q).await.unwrap();
    assert_eq!(
        (d.pending, d.in_flight, d.delayed, d.delayed_due, d.dead),
        (3, 2, 1, 0, 1)
    );
    assert_eq!(d.backlog(), 5);
    let unknown = d
        .sources
        .get("oldest_age")
        .is_some_and(|s| s.starts_with("unknown"));
    match d.oldest_pending_age {
        Some(age) => assert!(
            age >= Duration::from_millis(20) && age < Duration::from_secs(30),
            "{age:?}"
        ),
        None => assert!(unknown, "pending jobs have an age, or sources says why not"),
    }
    let empty = b.depth(&unique("none")).await.unwrap();
    assert_eq!(empty.backlog(), 0);
    assert_eq!(empty.oldest_pending_age, None);
}

/// Workers appear when registered, update on beats, leave on deregister or when
/// their TTL passes without a beat.
pub async fn worker_registry_lives_by_ttl(b: &dyn Broker) {
    let pool = unique("pool");
    let mut w1 = WorkerInfo::new(unique("w1"), &pool, vec!["a".into()]);
    let w2 = WorkerInfo::new(unique("w2"), &pool, vec!["a".into()]);
    let other = WorkerInfo::new(unique("w3"), unique("other"), vec![]);
    b.register_worker(&w1, LONG).await.unwrap();
    b.register_worker(&w2, Duration::from_millis(300))
        .await
        .unwrap();
    b.register_worker(&other, LONG).await.unwrap();
    let ids = |ws: Vec<WorkerInfo>| ws.into_iter().map(|w| w.id).collect::<HashSet<_>>();
    assert_eq!(
        ids(b.list_workers(Some(&pool)).await.unwrap()),
        HashSet::from([w1.id.clone(), w2.id.clone()])
    );
    w1.in_flight = 3;
    w1.draining = true;
    b.beat_worker(&w1, LONG).await.unwrap();
    let listed = b.list_workers(Some(&pool)).await.unwrap();
    let seen = listed.iter().find(|w| w.id == w1.id).expect("w1 listed");
    assert_eq!((seen.in_flight, seen.draining), (3, true));
    assert!(seen.beat_age() < Duration::from_secs(5));
    eventually(Duration::from_secs(5), "w2 expired", || async {
        !ids(b.list_workers(Some(&pool)).await.unwrap()).contains(&w2.id)
    })
    .await;
    b.deregister_worker(&w1.id).await.unwrap();
    assert!(b.list_workers(Some(&pool)).await.unwrap().is_empty());
    assert!(ids(b.list_workers(None).await.unwrap()).contains(&other.id));
    b.deregister_worker(&other.id).await.unwrap();
}

/// A settled job cannot be settled again with the same token.
pub async fn settled_job_cannot_be_settled_again(b: &dyn Broker) {
    let q = unique("twice");
    put(b, &q, 1).await;
    let got = take(b, &q, 1, LONG).await.remove(0);
    b.ack(&got.lease).await.unwrap();
    assert!(is_lease_lost(b.ack(&got.lease).await));
    assert!(is_lease_lost(b.release(&got.lease).await));
    assert_eq!(b.depth(&q).await.unwrap().backlog(), 0);
}

/// A worker waiting for work wakes when a job arrives, well before its timeout.
pub async fn wait_for_work_wakes_on_enqueue(b: &dyn Broker) {
    let q = unique("wake");
    let queues = vec![q.clone()];
    // A first wait lets a backend set up its wake-up path; the measured one must be woken.
    b.wait_for_work(&queues, Duration::from_millis(200)).await;
    let started = tokio::time::Instant::now();
    let waiter = b.wait_for_work(&queues, Duration::from_secs(20));
    let producer = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        put(b, &q, 1).await;
    };
    let ((), ()) = tokio::join!(waiter, producer);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(take(b, &q, 1, LONG).await.len(), 1);
}
