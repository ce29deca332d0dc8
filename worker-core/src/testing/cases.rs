//! One public async function per behaviour of the [`Broker`] contract.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;

use super::{eventually, unique};
use crate::broker::{Broker, FetchPlan, FetchShare, Lease, LeaseToken, WorkerInfo};
use crate::error::BrokerError;
use crate::job::{Envelope, JobId, NewJob};

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

/// Fetch from `queue` until at least `n` jobs came (10 s at most; `what` names the
/// wait). It does not call `wait_for_work`: in `run_all` the wake-up case measures
/// the waits of the same broker.
async fn fetch_at_least(b: &dyn Broker, queue: &str, n: usize, what: &str) -> Vec<crate::Delivery> {
    let fetched = std::sync::Mutex::new(Vec::new());
    eventually(
        Duration::from_secs(10),
        &format!("{n} jobs of {queue} fetched {what}"),
        || async {
            let got = take(b, queue, 10, LONG).await;
            let mut all = fetched.lock().unwrap();
            all.extend(got);
            all.len() >= n
        },
    )
    .await;
    fetched.into_inner().unwrap()
}

/// Every operation on `lease` is refused with [`BrokerError::LeaseLost`] (a checkpoint
/// may instead be [`BrokerError::Unsupported`]); `what` says which lease it is.
async fn every_operation_is_refused(b: &dyn Broker, lease: &Lease, what: &str) {
    let r = b.ack(lease).await;
    assert!(
        matches!(r, Err(BrokerError::LeaseLost { .. })),
        "ack of {what}: {r:?}"
    );
    let r = b.retry_after(lease, Duration::ZERO, "late").await;
    assert!(
        matches!(r, Err(BrokerError::LeaseLost { .. })),
        "retry_after of {what}: {r:?}"
    );
    let r = b.dead_letter(lease, "late").await;
    assert!(
        matches!(r, Err(BrokerError::LeaseLost { .. })),
        "dead_letter of {what}: {r:?}"
    );
    let r = b.release(lease).await;
    assert!(
        matches!(r, Err(BrokerError::LeaseLost { .. })),
        "release of {what}: {r:?}"
    );
    let r = b.extend_lease(lease, LONG).await;
    assert!(
        matches!(r, Err(BrokerError::LeaseLost { .. })),
        "extend_lease of {what}: {r:?}"
    );
    let r = b.extend_leases(std::slice::from_ref(lease), LONG).await;
    assert!(
        matches!(r.as_slice(), [Err(BrokerError::LeaseLost { .. })]),
        "extend_leases of {what}: {r:?}"
    );
    let mut job = Envelope::from_new(NewJob::new(&lease.queue, "late").id(lease.job_id.clone()));
    job.checkpoint = Some(Bytes::from_static(b"late"));
    let r = b.checkpoint(lease, &job).await;
    assert!(
        matches!(
            r,
            Err(BrokerError::LeaseLost { .. } | BrokerError::Unsupported { .. })
        ),
        "checkpoint of {what}: {r:?}"
    );
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

/// A job whose id or headers are out of bounds (see
/// [`validate_new_job`](crate::broker::validate_new_job)) refuses its whole batch
/// before anything is written; jobs at the bounds are stored and read back whole.
pub async fn jobs_out_of_bounds_are_refused_and_nothing_is_written(b: &dyn Broker) {
    use crate::broker::{MAX_HEADERS, MAX_HEADER_BYTES, MAX_HEADER_NAME, MAX_JOB_ID};
    let q = unique("bounds");
    let with_header = |k: &str, v: &str| {
        let mut j = NewJob::new(&q, "x");
        j.headers.insert(k.to_owned(), v.to_owned());
        j
    };
    let many = {
        let mut j = NewJob::new(&q, "x");
        for i in 0..=MAX_HEADERS {
            j.headers.insert(format!("h{i}"), "v".into());
        }
        j
    };
    let bad = [
        NewJob::new(&q, "x").id("i".repeat(MAX_JOB_ID + 1)),
        NewJob::new(&q, "x").id("line\nbreak"),
        NewJob::new(&q, "x").id("esc\u{1b}[2J"),
        with_header(&"k".repeat(MAX_HEADER_NAME + 1), "v"),
        with_header("", "v"),
        with_header("bell\u{7}", "v"),
        with_header("big", &"v".repeat(MAX_HEADER_BYTES)),
        many,
    ];
    for job in bad {
        let shown = format!("id {:?}, {} headers", job.id, job.headers.len());
        let r = b.enqueue(vec![NewJob::new(&q, "fine"), job]).await;
        assert!(
            matches!(r, Err(BrokerError::InvalidJob { .. })),
            "{shown}: {r:?}"
        );
        assert!(!r.unwrap_err().is_transient());
    }
    assert_eq!(b.depth(&q).await.unwrap().pending, 0, "nothing written");
    // At the bounds: stored, and read back as sent.
    let id = "i".repeat(MAX_JOB_ID);
    let mut edge = NewJob::new(&q, "edge").id(id.clone());
    edge.headers
        .insert("k".repeat(MAX_HEADER_NAME), "traceparent-like value".into());
    b.enqueue(vec![edge]).await.unwrap();
    let got = take(b, &q, 1, LONG).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].envelope.id.as_str(), id);
    assert_eq!(
        got[0]
            .envelope
            .headers
            .get(&"k".repeat(MAX_HEADER_NAME))
            .map(String::as_str),
        Some("traceparent-like value")
    );
    b.ack(&got[0].lease).await.unwrap();
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

/// Leases of several queues extended in one call: each outcome is its own lease's, in
/// order; a stale token is refused alone, and the leases extended are not reaped.
pub async fn extending_many_leases_refuses_each_stale_one_alone(b: &dyn Broker) {
    let (q1, q2) = (unique("extend-many"), unique("extend-many"));
    put(b, &q1, 2).await;
    put(b, &q2, 1).await;
    let lease = Duration::from_millis(300);
    let mut got = take(b, &q1, 2, lease).await;
    got.extend(take(b, &q2, 1, lease).await);
    assert_eq!(got.len(), 3);
    let mut forged = got[1].lease.clone();
    forged.token = LeaseToken(forged.token.0.wrapping_add(1).max(1));
    let leases = [got[0].lease.clone(), forged, got[2].lease.clone()];
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = b.extend_leases(&leases, lease).await;
        assert!(
            matches!(
                r.as_slice(),
                [Ok(()), Err(BrokerError::LeaseLost { job_id }), Ok(())] if *job_id == got[1].envelope.id
            ),
            "{r:?}"
        );
    }
    // Only the lease whose extension was refused ran out.
    let queues = vec![q1.clone(), q2.clone()];
    assert_eq!(b.reap_expired(&queues).await.unwrap(), 1);
    b.ack(&got[0].lease).await.unwrap();
    b.ack(&got[2].lease).await.unwrap();
    let d = b.depth(&q1).await.unwrap();
    assert_eq!((d.pending, d.in_flight), (1, 0));
    assert!(b.extend_leases(&[], lease).await.is_empty());
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

/// After a lease was reclaimed, the old token can change nothing (every operation,
/// checkpoint included): neither while the job waits to be fetched again, nor once a new
/// delivery owns it, whose outcome stands. Nor can a token the broker never gave.
pub async fn stale_token_is_refused_everywhere(b: &dyn Broker) {
    let q = unique("fence");
    put(b, &q, 1).await;
    let old = take(b, &q, 1, Duration::from_millis(100)).await.remove(0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.reap_expired(std::slice::from_ref(&q)).await.unwrap(), 1);
    every_operation_is_refused(b, &old.lease, "a reclaimed lease, its job pending").await;
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.pending, d.in_flight, d.delayed, d.dead), (1, 0, 0, 0));
    let new = take(b, &q, 1, LONG).await.remove(0);
    assert_eq!(new.envelope.attempt, 2);
    every_operation_is_refused(b, &old.lease, "a reclaimed lease, its job redelivered").await;
    let mut forged = new.lease.clone();
    forged.token = LeaseToken(new.lease.token.0.wrapping_add(1).max(1));
    every_operation_is_refused(b, &forged, "a token never given").await;
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.pending, d.in_flight, d.delayed, d.dead), (0, 1, 0, 0));
    // The owner's lease is whole: it extends and settles.
    b.extend_lease(&new.lease, LONG).await.unwrap();
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
    // No limit at all is a limit too.
    assert_eq!(
        b.dead_letters(&q, usize::MAX).await.unwrap().len(),
        b.dead_letters(&q, 1000).await.unwrap().len()
    );

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
    w1.quiet = true;
    b.beat_worker(&w1, LONG).await.unwrap();
    let listed = b.list_workers(Some(&pool)).await.unwrap();
    let seen = listed.iter().find(|w| w.id == w1.id).expect("w1 listed");
    assert_eq!((seen.in_flight, seen.draining, seen.quiet), (3, true, true));
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

/// Once a delivery is settled (acked, retried, dead-lettered or released), its token
/// can change nothing: every operation is refused and the job stays where the
/// settlement put it.
pub async fn settled_job_cannot_be_settled_again(b: &dyn Broker) {
    let q = unique("twice");
    put(b, &q, 4).await;
    let got = take(b, &q, 4, LONG).await;
    assert_eq!(got.len(), 4);
    let state = |d: crate::QueueDepth| (d.pending, d.in_flight, d.delayed, d.dead);

    b.ack(&got[0].lease).await.unwrap();
    every_operation_is_refused(b, &got[0].lease, "acked").await;
    assert_eq!(state(b.depth(&q).await.unwrap()), (0, 3, 0, 0));

    b.retry_after(&got[1].lease, LONG, "later").await.unwrap();
    every_operation_is_refused(b, &got[1].lease, "retried").await;
    assert_eq!(state(b.depth(&q).await.unwrap()), (0, 2, 1, 0));

    b.dead_letter(&got[2].lease, "poison").await.unwrap();
    every_operation_is_refused(b, &got[2].lease, "dead-lettered").await;
    assert_eq!(state(b.depth(&q).await.unwrap()), (0, 1, 1, 1));

    b.release(&got[3].lease).await.unwrap();
    every_operation_is_refused(b, &got[3].lease, "released").await;
    assert_eq!(state(b.depth(&q).await.unwrap()), (1, 0, 1, 1));
    let again = take(b, &q, 4, LONG).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].envelope.id, got[3].envelope.id);
    assert_eq!(
        again[0].envelope.attempt, 1,
        "a refused retry counted an attempt"
    );
    b.ack(&again[0].lease).await.unwrap();
    let dead = b.dead_letters(&q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "poison");
}

/// A wait with no work lasts its timeout (it neither returns early nor spins), and a
/// worker waiting for work is woken promptly by an enqueue made while it waits.
///
/// The short wait's timeout is under the 50 ms that the default `wait_for_work` sleeps,
/// so a backend without a wake-up mechanism waits it out too. The wake-up is measured
/// as the runtime uses it, wait then fetch, in a loop: a backend may return early (the
/// wait is a hint), but the loop must see the job well within a second of the enqueue,
/// and may not go round more than about once per 10 ms.
pub async fn wait_for_work_wakes_on_enqueue(b: &dyn Broker) {
    use tokio::time::Instant;
    let q = unique("wake");
    let queues = vec![q.clone()];
    // A first wait lets a backend set up its wake-up path (it may return at once).
    b.wait_for_work(&queues, Duration::from_millis(200)).await;

    let short = Duration::from_millis(40);
    for _ in 0..5 {
        let started = Instant::now();
        b.wait_for_work(&queues, short).await;
        // tokio's timers round up to the millisecond; 2 ms of slack for the clock.
        assert!(
            started.elapsed() + Duration::from_millis(2) >= short,
            "a wait with no work returned after {:?}, before its {short:?} timeout",
            started.elapsed()
        );
    }

    let waited_from = Instant::now();
    let waiter = async {
        let mut rounds = 0u32;
        loop {
            b.wait_for_work(&queues, Duration::from_secs(20)).await;
            rounds += 1;
            let got = take(b, &q, 1, LONG).await;
            if !got.is_empty() {
                return (Instant::now(), rounds, got);
            }
        }
    };
    let producer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        put(b, &q, 1).await;
        Instant::now()
    };
    let ((seen_at, rounds, got), enqueued_at) = tokio::join!(waiter, producer);
    let late = seen_at.saturating_duration_since(enqueued_at);
    assert!(
        late < Duration::from_secs(1),
        "the job was fetched {late:?} after its enqueue returned"
    );
    let waited = seen_at.duration_since(waited_from);
    let most = waited.as_millis() / 10 + 5;
    assert!(
        u128::from(rounds) <= most,
        "{rounds} returns from wait_for_work in {waited:?} with no work: it spins"
    );
    assert_eq!(got.len(), 1);
    b.ack(&got[0].lease).await.unwrap();
}

/// An id belongs to one job of a queue from its enqueue until that job is acked or its
/// dead letter is purged: while it is pending, delayed, in flight or dead, an enqueue of
/// the same id to that queue is refused with [`BrokerError::DuplicateJob`] and writes
/// nothing of its batch, and the job holding the id is untouched. Another queue may use
/// the id. A backend that does not refuse duplicate ids must store both, losing neither.
pub async fn a_dead_id_is_refused_by_enqueue(b: &dyn Broker) {
    let q = unique("ids");
    let job = |id: &str, payload: &str| NewJob::new(&q, payload.to_owned()).id(id);
    b.enqueue(vec![
        job("pending", "A"),
        job("in-flight", "A"),
        job("delayed", "A").delay(LONG),
        job("retried", "A"),
        job("dead", "A"),
    ])
    .await
    .unwrap();
    let got = take(b, &q, 4, LONG).await;
    let by_id = |id: &str| got.iter().find(|d| d.envelope.id.as_str() == id).unwrap();
    b.release(&by_id("pending").lease).await.unwrap();
    b.retry_after(&by_id("retried").lease, LONG, "later")
        .await
        .unwrap();
    b.dead_letter(&by_id("dead").lease, "poison").await.unwrap();
    let state = |d: crate::QueueDepth| (d.pending, d.in_flight, d.delayed, d.dead);
    assert_eq!(state(b.depth(&q).await.unwrap()), (1, 1, 2, 1));

    if !b.refuses_duplicate_ids() {
        b.enqueue(vec![job("dead", "B")]).await.unwrap();
        assert_eq!(state(b.depth(&q).await.unwrap()), (2, 1, 2, 1));
        let dead = b.dead_letters(&q, 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].envelope.payload, Bytes::from_static(b"A"));
        return;
    }
    for id in ["pending", "in-flight", "delayed", "retried", "dead"] {
        let r = b
            .enqueue(vec![job(&unique("fresh"), "B"), job(id, "B")])
            .await;
        match r {
            Err(BrokerError::DuplicateJob { job_id }) => assert_eq!(job_id.as_str(), id),
            other => panic!("enqueue of the {id} job's id: expected DuplicateJob, got {other:?}"),
        }
    }
    assert_eq!(
        state(b.depth(&q).await.unwrap()),
        (1, 1, 2, 1),
        "a refused batch wrote something"
    );
    // The dead letter is as it died, the running job still owns its lease.
    let dead = b.dead_letters(&q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.payload, Bytes::from_static(b"A"));
    assert_eq!(dead[0].reason, "poison");
    b.extend_lease(&by_id("in-flight").lease, LONG)
        .await
        .unwrap();
    b.ack(&by_id("in-flight").lease).await.unwrap();
    let again = take(b, &q, 10, LONG).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].envelope.id.as_str(), "pending");
    assert_eq!(again[0].envelope.payload, Bytes::from_static(b"A"));
    // One id per queue, not per broker: another queue takes it.
    let other = unique("ids-other");
    b.enqueue(vec![NewJob::new(&other, "C").id("dead")])
        .await
        .unwrap();
    assert_eq!(b.depth(&other).await.unwrap().pending, 1);
}

/// Job `x` of `q`, payload `A`, enqueued, fetched and dead-lettered.
async fn dead_letter_of_x(b: &dyn Broker, q: &str) {
    b.enqueue(vec![NewJob::new(q, "A").id("x")]).await.unwrap();
    let first = take(b, q, 1, LONG).await.remove(0);
    b.dead_letter(&first.lease, "poison").await.unwrap();
}

/// `requeue_dead` never makes two live copies of one id: a dead letter whose id is
/// live is skipped (not moved, not counted, left dead), and one fetch never returns an
/// id twice.
///
/// On a backend that refuses duplicate ids a dead id cannot be enqueued again, so the
/// public API cannot make an id live and dead at once; the case tries (enqueue after
/// death), and checks the requeue only if the backend let it through. What it can always
/// check: a requeue of every dead letter moves each once, and a second requeue, with the
/// ids now live, moves nothing. A backend that does not refuse duplicate ids is exempt.
pub async fn requeue_never_makes_two_live_copies(b: &dyn Broker) {
    if !b.refuses_duplicate_ids() {
        return;
    }
    let q = unique("requeue-ids");
    dead_letter_of_x(b, &q).await;
    // Refused under the contract (see a_dead_id_is_refused_by_enqueue).
    let second_live = b.enqueue(vec![NewJob::new(&q, "B").id("x")]).await.is_ok();
    let moved = b.requeue_dead(&q, &[JobId::from("x")]).await.unwrap();
    let d = b.depth(&q).await.unwrap();
    if second_live {
        assert_eq!(
            moved, 0,
            "requeue_dead moved a dead letter whose id is live"
        );
        assert_eq!((d.pending, d.dead), (1, 1), "{d:?}");
        assert_eq!(b.requeue_dead(&q, &[]).await.unwrap(), 0);
    } else {
        assert_eq!(moved, 1);
        assert_eq!((d.pending, d.dead), (1, 0), "{d:?}");
    }
    let got = take(b, &q, 10, LONG).await;
    assert_eq!(got.len(), 1, "one fetch returned {} copies of x", got.len());
    let expected: &[u8] = if second_live { b"B" } else { b"A" };
    assert_eq!(got[0].envelope.payload, Bytes::from(expected));
    // The id is live (in flight): requeuing everything again moves nothing.
    assert_eq!(b.requeue_dead(&q, &[]).await.unwrap(), 0);
    let d = b.depth(&q).await.unwrap();
    assert_eq!(d.pending + d.in_flight + d.delayed, 1, "{d:?}");
    if second_live {
        // Dying too, the second copy may not overwrite the first dead letter: refused
        // (nothing changes), or both kept.
        let r = b.dead_letter(&got[0].lease, "poison again").await;
        let dead = b.dead_letters(&q, 10).await.unwrap();
        assert!(
            dead.iter()
                .any(|l| l.envelope.payload == Bytes::from_static(b"A")),
            "the first dead letter of x was overwritten ({r:?}): {dead:?}"
        );
        if r.is_err() {
            b.ack(&got[0].lease).await.unwrap();
        }
    } else {
        b.ack(&got[0].lease).await.unwrap();
    }
}

/// A requeue of an id whose job is running leaves that job's lease alone: the handler
/// keeps extending and acks, and nothing else of the id becomes live.
///
/// On a backend that refuses duplicate ids the running job can only be the requeued
/// one itself (a dead id cannot be enqueued again), so the case requeues it once more
/// while it runs; if the backend let a dead id be enqueued again, it also runs that new
/// job while the old one is dead and requeues then. Exempt: a backend that does not
/// refuse duplicate ids.
pub async fn requeue_of_a_running_id_leaves_its_lease_alone(b: &dyn Broker) {
    if !b.refuses_duplicate_ids() {
        return;
    }
    let q = unique("requeue-running");
    dead_letter_of_x(b, &q).await;
    if b.enqueue(vec![NewJob::new(&q, "B").id("x")]).await.is_ok() {
        let running = take(b, &q, 1, LONG).await.remove(0);
        assert_eq!(running.envelope.payload, Bytes::from_static(b"B"));
        let moved = b.requeue_dead(&q, &[]).await.unwrap();
        b.extend_lease(&running.lease, LONG)
            .await
            .expect("the running job lost its lease to a requeue");
        assert_eq!(moved, 0, "requeue_dead moved a dead letter whose id runs");
        b.ack(&running.lease).await.unwrap();
    }
    assert_eq!(b.requeue_dead(&q, &[JobId::from("x")]).await.unwrap(), 1);
    let running = take(b, &q, 1, LONG).await.remove(0);
    assert_eq!(running.envelope.payload, Bytes::from_static(b"A"));
    assert_eq!(b.requeue_dead(&q, &[JobId::from("x")]).await.unwrap(), 0);
    assert_eq!(b.requeue_dead(&q, &[]).await.unwrap(), 0);
    b.extend_lease(&running.lease, LONG).await.unwrap();
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.pending, d.in_flight, d.dead), (0, 1, 0), "{d:?}");
    assert!(take(b, &q, 10, LONG).await.is_empty());
    b.ack(&running.lease).await.unwrap();
    assert_eq!(b.depth(&q).await.unwrap().backlog(), 0);
}

/// Once its job is acked, or its dead letter purged, an id is free: enqueued again, it
/// is a new job (its own payload, attempt 1, no history).
pub async fn a_purged_or_acked_id_may_be_enqueued_again(b: &dyn Broker) {
    let q = unique("ids-free");
    let job = |payload: &str| NewJob::new(&q, payload.to_owned()).id("x");
    b.enqueue(vec![job("A")]).await.unwrap();
    let got = take(b, &q, 1, LONG).await.remove(0);
    b.ack(&got.lease).await.unwrap();

    b.enqueue(vec![job("B")]).await.unwrap();
    let got = take(b, &q, 1, LONG).await.remove(0);
    assert_eq!(got.envelope.payload, Bytes::from_static(b"B"));
    b.retry_after(&got.lease, Duration::ZERO, "flaky")
        .await
        .unwrap();
    let got = take(b, &q, 1, LONG).await.remove(0);
    b.dead_letter(&got.lease, "poison").await.unwrap();
    assert_eq!(b.purge_dead(&q, &[JobId::from("x")]).await.unwrap(), 1);

    b.enqueue(vec![job("C")]).await.unwrap();
    let got = take(b, &q, 1, LONG).await.remove(0);
    assert_eq!(got.envelope.payload, Bytes::from_static(b"C"));
    assert_eq!(got.envelope.attempt, 1);
    assert!(
        got.envelope.history.is_empty(),
        "{:?}",
        got.envelope.history
    );
    // Dead, requeued, acked: free again.
    b.dead_letter(&got.lease, "poison").await.unwrap();
    assert_eq!(b.requeue_dead(&q, &[]).await.unwrap(), 1);
    let got = take(b, &q, 1, LONG).await.remove(0);
    assert_eq!(got.envelope.payload, Bytes::from_static(b"C"));
    b.ack(&got.lease).await.unwrap();
    b.enqueue(vec![job("D")]).await.unwrap();
    let got = take(b, &q, 1, LONG).await.remove(0);
    assert_eq!(got.envelope.payload, Bytes::from_static(b"D"));
    b.ack(&got.lease).await.unwrap();
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.pending, d.in_flight, d.delayed, d.dead), (0, 0, 0, 0));
}

/// A beat renews a worker's TTL: one beating past its first TTL stays listed, one
/// that stopped beating disappears. A listing filters by pool and reports the fields
/// as they were written.
pub async fn worker_registry_renews_on_beat_and_lists_what_was_written(b: &dyn Broker) {
    let (pool, other_pool) = (unique("pool"), unique("pool"));
    let ttl = Duration::from_millis(1200);
    let mut beating = WorkerInfo::new(unique("beating"), &pool, vec!["a".into(), "b".into()]);
    beating.host = "node-7".into();
    beating.pid = 4242;
    beating.concurrency = 8;
    beating.in_flight = 2;
    beating.started_at_ms = 1_700_000_000_000;
    beating.quiet = true;
    let silent = WorkerInfo::new(unique("silent"), &pool, vec!["a".into()]);
    let mut elsewhere = WorkerInfo::new(unique("elsewhere"), &other_pool, vec!["c".into()]);
    elsewhere.draining = true;
    let registered_at = tokio::time::Instant::now();
    b.register_worker(&beating, ttl).await.unwrap();
    b.register_worker(&silent, ttl).await.unwrap();
    b.register_worker(&elsewhere, LONG).await.unwrap();

    let same = |listed: &WorkerInfo, written: &WorkerInfo| {
        let mut l = listed.clone();
        assert!(
            l.last_beat_ms >= written.last_beat_ms,
            "{} beat at {} but lists {}",
            written.id,
            written.last_beat_ms,
            l.last_beat_ms
        );
        l.last_beat_ms = written.last_beat_ms;
        assert_eq!(&l, written);
    };
    let ids = |ws: &[WorkerInfo]| ws.iter().map(|w| w.id.clone()).collect::<HashSet<_>>();
    // Beat (both live workers, as running workers do) until 3.5 TTLs have passed, the
    // beating worker is listed as last written and the silent one is gone. Without
    // renewal the beating worker is gone after one TTL (for good, or until a beat adds
    // it again: then it is missing from a listing once per TTL). One listing may miss
    // a live worker (on AMQP, concurrent listings briefly hide each other's beats), so
    // one miss is forgiven.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let (mut seen_once, mut misses) = (false, Vec::new());
    loop {
        // Four beats a listing: listings are few, so they rarely meet other listings.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            beating.in_flight = (beating.in_flight + 1) % 8;
            beating.last_beat_ms = crate::job::now_ms();
            b.beat_worker(&beating, ttl).await.unwrap();
            b.beat_worker(&elsewhere, LONG).await.unwrap();
        }
        let last = b.list_workers(Some(&pool)).await.unwrap();
        assert!(
            ids(&last).is_subset(&HashSet::from([beating.id.clone(), silent.id.clone()])),
            "listed for {pool}: {last:?}"
        );
        let seen = last.iter().find(|w| w.id == beating.id);
        match seen {
            Some(seen) => {
                same(seen, &beating);
                seen_once = true;
            }
            None if seen_once => misses.push(registered_at.elapsed()),
            None => {}
        }
        assert!(
            misses.len() <= 1,
            "a worker beating every 100 ms with a {ttl:?} TTL was missing from the listings \
             at {misses:?} after it registered"
        );
        let silent_gone = !ids(&last).contains(&silent.id);
        if seen.is_some() && silent_gone && registered_at.elapsed() >= ttl * 7 / 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a worker beating every 100 ms with a {ttl:?} TTL and one that never beat, \
             {:?} after they registered: listed {:?}",
            registered_at.elapsed(),
            ids(&last)
        );
    }
    let listed = std::sync::Mutex::new(Vec::new());
    eventually(Duration::from_secs(5), "the other pool listed", || async {
        b.beat_worker(&elsewhere, LONG).await.unwrap();
        let got = b.list_workers(Some(&other_pool)).await.unwrap();
        let found = !got.is_empty();
        *listed.lock().unwrap() = got;
        found
    })
    .await;
    let listed = listed.into_inner().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    same(&listed[0], &elsewhere);
    b.deregister_worker(&beating.id).await.unwrap();
    b.deregister_worker(&elsewhere.id).await.unwrap();
    assert!(b.list_workers(Some(&pool)).await.unwrap().is_empty());
}

/// A refused checkpoint changes nothing: a stale token's save (carrying another payload
/// too) is refused, and the next delivery has the stored envelope as it was, with the
/// checkpoint the owner saved. A backend that refuses every checkpoint
/// ([`BrokerError::Unsupported`]) delivers the job with no checkpoint and unchanged.
pub async fn a_refused_checkpoint_changes_nothing(b: &dyn Broker) {
    let q = unique("checkpoint-refused");
    b.enqueue(vec![NewJob::new(&q, "payload").header("k", "v")])
        .await
        .unwrap();
    let first = take(b, &q, 1, Duration::from_millis(150)).await.remove(0);
    let mut saved = first.envelope.clone();
    saved.checkpoint = Some(Bytes::from_static(b"owner"));
    let supported = match b.checkpoint(&first.lease, &saved).await {
        Ok(()) => true,
        Err(BrokerError::Unsupported { .. }) => false,
        Err(e) => panic!("checkpoint: {e}"),
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(b.reap_expired(std::slice::from_ref(&q)).await.unwrap(), 1);
    let second = take(b, &q, 1, LONG).await.remove(0);

    let mut stale = first.envelope.clone();
    stale.payload = Bytes::from_static(b"stale payload");
    stale.headers.insert("k".into(), "stale".into());
    stale.checkpoint = Some(Bytes::from_static(b"stale"));
    let r = b.checkpoint(&first.lease, &stale).await;
    assert!(
        matches!(
            r,
            Err(BrokerError::LeaseLost { .. } | BrokerError::Unsupported { .. })
        ),
        "a stale checkpoint: {r:?}"
    );
    b.release(&second.lease).await.unwrap();
    let third = take(b, &q, 1, LONG).await.remove(0);
    let mut expected = second.envelope.clone();
    expected.checkpoint = supported.then(|| Bytes::from_static(b"owner"));
    expected.due_at_ms = third.envelope.due_at_ms;
    assert_eq!(
        third.envelope, expected,
        "the refused checkpoint changed the job"
    );
    assert_eq!(third.envelope.payload, Bytes::from_static(b"payload"));
    b.ack(&third.lease).await.unwrap();
}

/// The queues named in `stop_fetching` are left to other workers: what this instance
/// held but had not handed out is fetched by another instance on the same store (at the
/// same attempt), while the leases it had given out stay its own and still extend and
/// ack. A backend that holds nothing ahead of `fetch` passes by doing nothing. After
/// `resume_fetching`, the stopped instance fetches that queue's new jobs again.
pub async fn stop_fetching_leaves_the_rest_to_other_workers(b: &dyn Broker, other: &dyn Broker) {
    let q = unique("stop");
    let queues = vec![q.clone()];
    let ids: HashSet<JobId> = put(b, &q, 5).await.into_iter().collect();
    // A backend that receives ahead (AMQP, prefetch) may now hold the other 3.
    let mine = take(b, &q, 2, LONG).await;
    assert_eq!(mine.len(), 2);
    b.stop_fetching(&queues).await;

    let theirs = fetch_at_least(other, &q, 3, "by another worker after stop_fetching").await;
    let mine_ids: HashSet<JobId> = mine.iter().map(|d| d.envelope.id.clone()).collect();
    let theirs_ids: HashSet<JobId> = theirs.iter().map(|d| d.envelope.id.clone()).collect();
    assert!(
        theirs.len() == 3 && mine_ids.is_disjoint(&theirs_ids),
        "another worker fetched {} jobs, {} of them leased to the stopped one",
        theirs.len(),
        mine_ids.intersection(&theirs_ids).count()
    );
    assert_eq!(&mine_ids | &theirs_ids, ids);
    assert!(
        theirs.iter().all(|d| d.envelope.attempt == 1),
        "handed back with an attempt counted"
    );

    for d in &mine {
        b.extend_lease(&d.lease, LONG).await.unwrap();
        b.ack(&d.lease).await.unwrap();
    }
    for d in &theirs {
        other.ack(&d.lease).await.unwrap();
    }
    assert!(take(other, &q, 10, LONG).await.is_empty());

    // The other worker leaves the queue, so that the new jobs can only go to this one.
    other.stop_fetching(&queues).await;
    b.resume_fetching(&queues).await;
    let again: HashSet<JobId> = put(b, &q, 2).await.into_iter().collect();
    let resumed = fetch_at_least(b, &q, 2, "after resume_fetching").await;
    assert_eq!(
        resumed
            .iter()
            .map(|d| d.envelope.id.clone())
            .collect::<HashSet<_>>(),
        again
    );
    for d in &resumed {
        b.ack(&d.lease).await.unwrap();
    }
    for (who, broker) in [("stopped", b), ("other", other)] {
        let d = broker.depth(&q).await.unwrap();
        assert_eq!(
            (d.pending, d.in_flight, d.delayed, d.dead),
            (0, 0, 0, 0),
            "depth read by the {who} instance"
        );
    }
}

/// After `close`, later calls work again (connecting anew): enqueue, depth, dead-letter
/// listing, the registry, and fetch and ack on a queue it had not stopped. A queue it
/// consumed before the close counts as stopped by it (close stops fetching first), so
/// the case does not fetch from that one on this instance.
pub async fn later_calls_work_after_close(b: &dyn Broker) {
    let q = unique("close");
    let queues = vec![q.clone()];
    put(b, &q, 2).await;
    let got = take(b, &q, 1, LONG).await.remove(0);
    b.ack(&got.lease).await.unwrap();
    b.close().await;

    put(b, &q, 1).await;
    let d = b.depth(&q).await.unwrap();
    assert_eq!((d.pending, d.in_flight, d.delayed, d.dead), (2, 0, 0, 0));
    assert!(b.dead_letters(&q, 10).await.unwrap().is_empty());
    let pool = unique("pool");
    let w = WorkerInfo::new(unique("w"), &pool, queues.clone());
    b.register_worker(&w, LONG).await.unwrap();
    assert_eq!(b.list_workers(Some(&pool)).await.unwrap().len(), 1);
    b.deregister_worker(&w.id).await.unwrap();

    let fresh = unique("after-close");
    let ids = put(b, &fresh, 1).await;
    let got = fetch_at_least(b, &fresh, 1, "after close").await;
    assert_eq!(got[0].envelope.id, ids[0]);
    b.ack(&got[0].lease).await.unwrap();
    b.close().await;
}
