//! The backend contract. A [`Broker`] stores jobs in four states — pending, in flight
//! (leased), delayed, dead — and moves them between states atomically.
//!
//! ```text
//! enqueue ─► pending ─fetch─► in_flight ─ack──────────► gone
//!               ▲                │  ├─retry_after──────► delayed ─(due)─► pending, attempt+1
//!               │                │  ├─dead_letter──────► dead
//!               └─release────────┘  └─(lease expires)──► reap_expired ─► pending, attempt+1
//! ```
//!
//! **Fencing.** Each delivery gets a fresh [`LeaseToken`]. Every operation on an in-flight
//! job carries it, and a backend refuses a token that no longer owns the job with
//! [`BrokerError::LeaseLost`], changing nothing. A worker whose lease expired therefore
//! cannot ack, retry, release or extend the attempt another worker now owns.
//!
//! **Attempts.** [`Envelope::attempt`] is 1 on first delivery, counts up on
//! `retry_after` and on a reaped lease, and is unchanged by `release`.
//!
//! **Ids.** An id belongs to one job of a queue from its enqueue until that job is
//! acked or its dead letter is purged. While the id is live (pending, delayed, in
//! flight) or dead, [`Broker::enqueue`] of the same id to that queue is refused with
//! [`BrokerError::DuplicateJob`]; [`Broker::requeue_dead`] skips a dead letter whose id
//! is live, so no operation makes two live copies of one id; a dead letter is never
//! overwritten. After the ack or [`Broker::purge_dead`] the id is free again. A backend
//! whose [`Broker::refuses_duplicate_ids`] is false (AMQP) is exempt.
//!
//! **Checkpoints.** [`Broker::checkpoint`] stores a handler's progress with the
//! in-flight job (fenced like every other step); it travels with the job through every
//! state until the ack, so the next delivery resumes where the last one stopped.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::BrokerError;
use crate::job::{Envelope, JobId, NewJob};

pub mod memory;

/// Opaque proof of ownership of one delivery of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseToken(pub u64);

impl LeaseToken {
    /// A new random token.
    pub fn random() -> Self {
        Self(fastrand::u64(1..))
    }
}

/// What identifies one delivery: the job, its queue and the lease token.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// The job.
    pub job_id: JobId,
    /// Its queue.
    pub queue: String,
    /// The token of this delivery.
    pub token: LeaseToken,
}

impl Lease {
    /// A lease for `job_id` on `queue` with `token`.
    pub fn new(job_id: JobId, queue: impl Into<String>, token: LeaseToken) -> Self {
        Self {
            job_id,
            queue: queue.into(),
            token,
        }
    }
}

/// A fetched job and the lease that owns it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Delivery {
    /// The job as stored.
    pub envelope: Envelope,
    /// The lease of this delivery.
    pub lease: Lease,
}

impl Delivery {
    /// A delivery of `envelope` under `token`.
    pub fn new(envelope: Envelope, token: LeaseToken) -> Self {
        let lease = Lease::new(envelope.id.clone(), envelope.queue.clone(), token);
        Self { envelope, lease }
    }
}

/// One queue's part in a [`FetchPlan`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FetchShare {
    /// The queue.
    pub queue: String,
    /// Jobs the scheduler would like from this queue.
    pub share: u32,
    /// Jobs this queue may give at most (its per-queue limit's room).
    pub max: u32,
}

impl FetchShare {
    /// A share of `share` jobs, at most `max`, from `queue`.
    pub fn new(queue: impl Into<String>, share: u32, max: u32) -> Self {
        Self {
            queue: queue.into(),
            share,
            max: max.max(share),
        }
    }
}

/// What to fetch in one round trip.
///
/// A backend takes, in order, up to `share` jobs from each entry; then, while it has
/// fewer than `total`, it tops up from the entries in order, each up to its `max`.
/// That keeps the scheduler's weights when every queue has work and gives an empty
/// queue's share to the others when one has none (work-conserving).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FetchPlan {
    /// Queues in order of preference.
    pub shares: Vec<FetchShare>,
    /// Jobs wanted in all.
    pub total: u32,
    /// Lease length for every job fetched.
    pub lease: Duration,
    /// The caller takes fewer than `total` as readily as all of them (the runtime
    /// fetches again as soon as it has room): a backend that holds deliveries locally
    /// may return those at once rather than ask the broker to make the count exact.
    pub partial: bool,
}

impl FetchPlan {
    /// A plan taking `total` jobs by `shares`, each leased for `lease`.
    pub fn new(shares: Vec<FetchShare>, total: u32, lease: Duration) -> Self {
        Self {
            shares,
            total,
            lease,
            partial: false,
        }
    }

    /// Mark the plan as satisfied by fewer jobs than `total` (see [`FetchPlan::partial`]).
    pub fn partial_ok(mut self) -> Self {
        self.partial = true;
        self
    }

    /// A plan for up to `n` jobs from one queue.
    pub fn single(queue: impl Into<String>, n: u32, lease: Duration) -> Self {
        Self::new(vec![FetchShare::new(queue, n, n)], n, lease)
    }

    /// How many jobs each share gets from `available` (per entry, in order): the
    /// reference for what a backend must return. Backends that can count first may
    /// use it directly.
    pub fn allocate(&self, available: &[u64]) -> Vec<u32> {
        let mut taken: Vec<u32> = self
            .shares
            .iter()
            .zip(available)
            .map(|(s, &a)| (s.share as u64).min(a) as u32)
            .collect();
        let mut left = self.total.saturating_sub(taken.iter().sum());
        for (i, (s, &a)) in self.shares.iter().zip(available).enumerate() {
            if left == 0 {
                break;
            }
            let room = (s.max as u64).min(a) as u32 - taken[i];
            let more = room.min(left);
            taken[i] += more;
            left -= more;
        }
        taken
    }
}

/// Jobs of one queue by state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QueueDepth {
    /// Ready to start now.
    pub pending: u64,
    /// Leased to a worker.
    pub in_flight: u64,
    /// Waiting for a delay or retry backoff, including those already due.
    pub delayed: u64,
    /// Part of `delayed` whose time has come but that is not pending yet.
    pub delayed_due: u64,
    /// Dead letters.
    pub dead: u64,
    /// Age of the oldest pending job (since it became due), if any.
    pub oldest_pending_age: Option<Duration>,
    /// Where each number was read, by field name (`pending`, `in_flight`, `delayed`,
    /// `delayed_due`, `dead`, `oldest_age`): a backend whose numbers do not all come
    /// from one exact reading says so here, and `/scaling` shows it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sources: BTreeMap<String, String>,
}

impl QueueDepth {
    /// The names of the numbers, as keys of [`QueueDepth::sources`].
    pub const FIELDS: [&'static str; 6] = [
        "pending",
        "in_flight",
        "delayed",
        "delayed_due",
        "dead",
        "oldest_age",
    ];

    /// Record that the numbers named in `fields` were read from `source`.
    ///
    /// ```
    /// use worker_core::QueueDepth;
    ///
    /// let mut d = QueueDepth::default();
    /// d.read_from(&QueueDepth::FIELDS, "redis");
    /// d.read_from(&["in_flight"], "leases of this process");
    /// assert_eq!(d.sources["pending"], "redis");
    /// assert_eq!(d.sources["in_flight"], "leases of this process");
    /// ```
    pub fn read_from(&mut self, fields: &[&str], source: &str) {
        for f in fields {
            self.sources.insert((*f).to_owned(), source.to_owned());
        }
    }

    /// Work the pool owes: pending + in flight + delayed that is due.
    pub fn backlog(&self) -> u64 {
        self.pending + self.in_flight + self.delayed_due
    }
}

/// A dead job with the reason it died.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The envelope as it was, with its attempt history.
    pub envelope: Envelope,
    /// Why it was dead-lettered.
    pub reason: String,
    /// When, ms since the Unix epoch.
    pub died_at_ms: u64,
}

impl DeadLetter {
    /// A dead letter of `envelope`, dead for `reason` at `died_at_ms`.
    pub fn new(envelope: Envelope, reason: impl Into<String>, died_at_ms: u64) -> Self {
        Self {
            envelope,
            reason: reason.into(),
            died_at_ms,
        }
    }
}

/// A live worker as the registry knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// Unique per process.
    pub id: String,
    /// Pool name.
    pub pool: String,
    /// Queues it consumes.
    pub queues: Vec<String>,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Concurrency limit.
    pub concurrency: u32,
    /// Jobs running at the last beat.
    pub in_flight: u32,
    /// Whether it is draining.
    pub draining: bool,
    /// Whether it is quiet: live and ready but taking no new jobs, because the pool
    /// needs fewer replicas than are live (see `WorkerConfig::quiet_surplus`). Absent
    /// in entries written without it, which read as `false`.
    #[serde(default)]
    pub quiet: bool,
    /// Start time, ms since the Unix epoch.
    pub started_at_ms: u64,
    /// Last beat, ms since the Unix epoch.
    pub last_beat_ms: u64,
}

impl WorkerInfo {
    /// Info for a worker `id` of `pool` consuming `queues`.
    pub fn new(id: impl Into<String>, pool: impl Into<String>, queues: Vec<String>) -> Self {
        let now = crate::job::now_ms();
        Self {
            id: id.into(),
            pool: pool.into(),
            queues,
            host: String::new(),
            pid: std::process::id(),
            concurrency: 0,
            in_flight: 0,
            draining: false,
            quiet: false,
            started_at_ms: now,
            last_beat_ms: now,
        }
    }

    /// Time since the last beat.
    pub fn beat_age(&self) -> Duration {
        let now = crate::job::now_ms();
        Duration::from_millis(now.saturating_sub(self.last_beat_ms))
    }
}

/// The backend contract: every state change of a job, atomic and fenced by lease token.
///
/// Implementations must pass the conformance suite in `worker_core::testing`
/// (feature `testing`). Every method may be called concurrently from many tasks and
/// many processes.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Store jobs (pending, or delayed when they have a delay). A refused job (too
    /// large, bad queue name) fails the batch before anything is written. An error
    /// that comes later (a duplicate id, a lost connection) may leave a batch written
    /// in part: each backend documents which part (the in-memory broker writes a batch
    /// all or nothing; Redis writes it queue by queue, each queue all or nothing), so a
    /// producer knows what to send again. Ids of the producer's own ([`NewJob::id`])
    /// make sending again safe where the backend
    /// [refuses duplicate ids](Self::refuses_duplicate_ids).
    ///
    /// An id belongs to one job of a queue from this enqueue until that job is acked or
    /// its dead letter is purged. While a job of the queue with the same id is pending,
    /// delayed, in flight or dead, its queue's part of the batch is refused with
    /// [`BrokerError::DuplicateJob`] naming that id, and nothing of that part is
    /// written; so is a batch naming one id twice for one queue. Another queue may use
    /// the id. After the ack or [`purge_dead`](Self::purge_dead) the id may be enqueued
    /// again, as a new job. A backend whose
    /// [`refuses_duplicate_ids`](Self::refuses_duplicate_ids) is false stores every job
    /// it is given instead.
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, BrokerError>;

    /// Lease up to `plan.total` pending jobs as [`FetchPlan`] describes, oldest first
    /// within a queue. Delayed jobs whose time has come are promoted first. Returns
    /// at once, possibly with nothing.
    async fn fetch(&self, plan: &FetchPlan) -> Result<Vec<Delivery>, BrokerError>;

    /// The job succeeded: remove it.
    async fn ack(&self, lease: &Lease) -> Result<(), BrokerError>;

    /// The attempt failed: record `error` and make the job due again after `delay`
    /// with its attempt counted.
    async fn retry_after(
        &self,
        lease: &Lease,
        delay: Duration,
        error: &str,
    ) -> Result<(), BrokerError>;

    /// Move the job to the dead letters with `reason`.
    ///
    /// A dead letter is never overwritten: should one with the same id be stored
    /// already (enqueue refuses a dead id, so only a store changed by other means can
    /// hold one), the call is refused with [`BrokerError::DuplicateJob`] and changes
    /// nothing; the job stays in flight under its lease.
    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), BrokerError>;

    /// Give the job back to pending at the head of its queue, attempt not counted
    /// (the worker is stopping, not the job failing).
    async fn release(&self, lease: &Lease) -> Result<(), BrokerError>;

    /// Push the lease deadline to now + `lease`.
    async fn extend_lease(&self, lease: &Lease, lease_for: Duration) -> Result<(), BrokerError>;

    /// Push each lease's deadline to now + `lease_for`: one outcome per lease, in
    /// order, each as [`extend_lease`](Self::extend_lease) would answer it (a refused
    /// token refuses that lease alone). The worker extends every lease it holds
    /// through this, at once; the default extends them one by one, concurrently. A
    /// backend that can extend many in one round trip overrides it.
    async fn extend_leases(
        &self,
        leases: &[Lease],
        lease_for: Duration,
    ) -> Vec<Result<(), BrokerError>> {
        futures::future::join_all(leases.iter().map(|l| self.extend_lease(l, lease_for))).await
    }

    /// Store `job.checkpoint` as the in-flight job's saved progress, replacing any
    /// earlier one. `job` is the envelope `lease` delivered, with only its checkpoint
    /// changed: a backend that stores envelopes whole may write it back as it is. The
    /// checkpoint is delivered with the job again after a release, a reclaimed lease,
    /// a retry and a dead-letter requeue, until the job is acked.
    ///
    /// The default refuses with [`BrokerError::Unsupported`], changing nothing: a
    /// backend whose stored jobs cannot be changed in place (AMQP) keeps it.
    async fn checkpoint(&self, lease: &Lease, job: &Envelope) -> Result<(), BrokerError> {
        let _ = (lease, job);
        Err(BrokerError::Unsupported {
            operation: "checkpoint",
            reason: "this backend cannot change a stored job".into(),
        })
    }

    /// Move every job of `queues` whose lease deadline has passed back to pending,
    /// counting an attempt. Safe to run from many workers at once: each expired
    /// lease is reclaimed exactly once. Returns how many were reclaimed.
    async fn reap_expired(&self, queues: &[String]) -> Result<u64, BrokerError>;

    /// Jobs of `queue` by state.
    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError>;

    /// Up to `limit` dead letters of `queue`, oldest first.
    async fn dead_letters(&self, queue: &str, limit: usize)
        -> Result<Vec<DeadLetter>, BrokerError>;

    /// Put dead letters of `queue` back to pending with a fresh attempt count: the
    /// ones with these ids, or all when `ids` is empty. Returns how many moved.
    ///
    /// No operation makes two live copies of one id: a dead letter whose id is live
    /// (pending, delayed or in flight) is skipped: not moved, not counted, left dead,
    /// and the live job (its payload, its lease) untouched. Under the id rule of
    /// [`enqueue`](Self::enqueue) that cannot arise on a backend that refuses duplicate
    /// ids; a backend that does not (AMQP) is exempt.
    async fn requeue_dead(&self, queue: &str, ids: &[JobId]) -> Result<u64, BrokerError>;

    /// Drop dead letters of `queue`: these ids, or all when empty. Returns how many.
    /// Their ids are free again for [`enqueue`](Self::enqueue).
    async fn purge_dead(&self, queue: &str, ids: &[JobId]) -> Result<u64, BrokerError>;

    /// Add or refresh a worker in the registry; it disappears `ttl` after its last beat.
    async fn register_worker(&self, info: &WorkerInfo, ttl: Duration) -> Result<(), BrokerError>;

    /// Refresh a registered worker (same as registering again).
    async fn beat_worker(&self, info: &WorkerInfo, ttl: Duration) -> Result<(), BrokerError> {
        self.register_worker(info, ttl).await
    }

    /// Live workers of `pool` (all pools when `None`).
    async fn list_workers(&self, pool: Option<&str>) -> Result<Vec<WorkerInfo>, BrokerError>;

    /// Remove a worker from the registry.
    async fn deregister_worker(&self, worker_id: &str) -> Result<(), BrokerError>;

    /// Wait until one of `queues` may have work, or `timeout` passes. A hint only:
    /// the caller fetches afterwards either way. Backends without a wake-up
    /// mechanism may simply sleep; the default sleeps `min(timeout, 50 ms)`. Either
    /// way it does not spin: once set up for `queues` (the first call for them may
    /// return at once), a wait during which no job arrives lasts at least
    /// `min(timeout, 50 ms)`; and
    /// work enqueued during a wait reaches the caller's next fetch well within a second.
    async fn wait_for_work(&self, queues: &[String], timeout: Duration) {
        let _ = queues;
        tokio::time::sleep(timeout.min(Duration::from_millis(50))).await;
    }

    /// The worker will fetch no more from `queues` (its drain began). A backend that
    /// receives jobs ahead of [`fetch`](Self::fetch), as AMQP consumers do, stops
    /// receiving and hands back at once what it holds but has not given out, at the
    /// same attempt, so other workers can start it. Leases already given out are
    /// untouched: they extend and settle as before. A later fetch of these queues on
    /// this instance may return nothing until [`resume_fetching`](Self::resume_fetching).
    /// The default does nothing: a backend that only hands out jobs on fetch holds
    /// nothing.
    async fn stop_fetching(&self, queues: &[String]) {
        let _ = queues;
    }

    /// Undo [`stop_fetching`](Self::stop_fetching) for `queues`: the next
    /// [`fetch`](Self::fetch) or [`wait_for_work`](Self::wait_for_work) of them
    /// receives jobs again (a quiet worker taking work again). Not after
    /// [`close`](Self::close). The default does nothing.
    async fn resume_fetching(&self, queues: &[String]) {
        let _ = queues;
    }

    /// The worker has stopped: close connections cleanly. Later calls connect again
    /// and work; `close` first stops fetching from every queue this instance consumes
    /// (as [`stop_fetching`](Self::stop_fetching)), and a queue stopped so may stay
    /// stopped for this instance. The default does nothing.
    async fn close(&self) {}

    /// Whether this backend keeps the id rule: [`enqueue`](Self::enqueue) refuses an id
    /// that is live or dead in its queue ([`BrokerError::DuplicateJob`]),
    /// [`requeue_dead`](Self::requeue_dead) skips a dead letter whose id is live, and a
    /// dead letter is never overwritten. A backend that cannot look jobs up by id
    /// (AMQP) answers false and stores every job it is given, so two jobs may share an
    /// id there; handlers make their effects idempotent by job id either way, as
    /// delivery is at least once.
    fn refuses_duplicate_ids(&self) -> bool {
        true
    }
}

/// Wall-clock time as ms since the Unix epoch, for a `SystemTime`.
pub fn system_time_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Longest queue name any backend accepts.
pub const MAX_QUEUE_NAME: usize = 200;

/// Longest job id, in bytes.
pub const MAX_JOB_ID: usize = 200;

/// Most headers a job may carry.
pub const MAX_HEADERS: usize = 64;

/// Longest header name, in bytes.
pub const MAX_HEADER_NAME: usize = 128;

/// Most bytes of all header names and values of a job together.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The rules every backend applies to a job at enqueue, before it writes anything:
/// its queue's name ([`validate_queue_name`]); an id of 1 to [`MAX_JOB_ID`] bytes
/// without control characters; at most [`MAX_HEADERS`] headers, each name 1 to
/// [`MAX_HEADER_NAME`] bytes without control characters, and at most
/// [`MAX_HEADER_BYTES`] of names and values in all. Ids and header names travel as
/// protocol fields with a length limit (AMQP's short strings hold 255 bytes) and are
/// printed in logs and by `workerctl`; a control character in them could forge a
/// frame or a terminal escape.
pub fn validate_new_job(job: &crate::NewJob, position: usize) -> Result<(), BrokerError> {
    validate_queue_name(&job.queue)?;
    let name = || {
        job.id.as_ref().map_or_else(
            || format!("#{position} of the batch"),
            |id| id.as_str().chars().take(64).collect(),
        )
    };
    let refuse = |reason: String| {
        Err(BrokerError::InvalidJob {
            job: name(),
            reason,
        })
    };
    if let Some(id) = &job.id {
        let id = id.as_str();
        if id.is_empty() {
            return refuse("its id is empty".into());
        }
        if id.len() > MAX_JOB_ID {
            return refuse(format!(
                "its id is {} bytes, more than {MAX_JOB_ID}",
                id.len()
            ));
        }
        if id.chars().any(char::is_control) {
            return refuse("its id contains a control character".into());
        }
    }
    if job.headers.len() > MAX_HEADERS {
        return refuse(format!(
            "it has {} headers, more than {MAX_HEADERS}",
            job.headers.len()
        ));
    }
    let mut total = 0;
    for (k, v) in &job.headers {
        if k.is_empty() || k.len() > MAX_HEADER_NAME {
            return refuse(format!(
                "header name of {} bytes: names are 1 to {MAX_HEADER_NAME} bytes",
                k.len()
            ));
        }
        if k.chars().any(char::is_control) {
            return refuse(format!("header name {k:?} contains a control character"));
        }
        total += k.len() + v.len();
    }
    if total > MAX_HEADER_BYTES {
        return refuse(format!(
            "its headers hold {total} bytes, more than {MAX_HEADER_BYTES}"
        ));
    }
    Ok(())
}

/// The queue-name rules every backend shares: 1 to [`MAX_QUEUE_NAME`] bytes, no
/// control characters, no whitespace, and none of `{ } , :` (hash tags, and the
/// separators of `WORKER_QUEUES`).
pub fn validate_queue_name(name: &str) -> Result<(), BrokerError> {
    let refuse = |reason: &str| {
        Err(BrokerError::InvalidQueueName {
            name: name.to_owned(),
            reason: reason.to_owned(),
        })
    };
    if name.is_empty() {
        return refuse("it is empty");
    }
    if name.len() > MAX_QUEUE_NAME {
        return refuse("it is longer than 200 bytes");
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_control() || c.is_whitespace() || matches!(c, '{' | '}' | ',' | ':'))
    {
        return Err(BrokerError::InvalidQueueName {
            name: name.to_owned(),
            reason: format!(
                "it contains {c:?}; control characters, whitespace and {{ }} , : are not allowed"
            ),
        });
    }
    Ok(())
}

#[async_trait]
impl<B: Broker + ?Sized> Broker for std::sync::Arc<B> {
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, BrokerError> {
        (**self).enqueue(jobs).await
    }
    async fn fetch(&self, plan: &FetchPlan) -> Result<Vec<Delivery>, BrokerError> {
        (**self).fetch(plan).await
    }
    async fn ack(&self, lease: &Lease) -> Result<(), BrokerError> {
        (**self).ack(lease).await
    }
    async fn retry_after(
        &self,
        lease: &Lease,
        delay: Duration,
        error: &str,
    ) -> Result<(), BrokerError> {
        (**self).retry_after(lease, delay, error).await
    }
    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), BrokerError> {
        (**self).dead_letter(lease, reason).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), BrokerError> {
        (**self).release(lease).await
    }
    async fn extend_lease(&self, lease: &Lease, lease_for: Duration) -> Result<(), BrokerError> {
        (**self).extend_lease(lease, lease_for).await
    }
    async fn extend_leases(
        &self,
        leases: &[Lease],
        lease_for: Duration,
    ) -> Vec<Result<(), BrokerError>> {
        (**self).extend_leases(leases, lease_for).await
    }
    async fn checkpoint(&self, lease: &Lease, job: &Envelope) -> Result<(), BrokerError> {
        (**self).checkpoint(lease, job).await
    }
    async fn reap_expired(&self, queues: &[String]) -> Result<u64, BrokerError> {
        (**self).reap_expired(queues).await
    }
    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        (**self).depth(queue).await
    }
    async fn dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        (**self).dead_letters(queue, limit).await
    }
    async fn requeue_dead(&self, queue: &str, ids: &[JobId]) -> Result<u64, BrokerError> {
        (**self).requeue_dead(queue, ids).await
    }
    async fn purge_dead(&self, queue: &str, ids: &[JobId]) -> Result<u64, BrokerError> {
        (**self).purge_dead(queue, ids).await
    }
    async fn register_worker(&self, info: &WorkerInfo, ttl: Duration) -> Result<(), BrokerError> {
        (**self).register_worker(info, ttl).await
    }
    async fn beat_worker(&self, info: &WorkerInfo, ttl: Duration) -> Result<(), BrokerError> {
        (**self).beat_worker(info, ttl).await
    }
    async fn list_workers(&self, pool: Option<&str>) -> Result<Vec<WorkerInfo>, BrokerError> {
        (**self).list_workers(pool).await
    }
    async fn deregister_worker(&self, worker_id: &str) -> Result<(), BrokerError> {
        (**self).deregister_worker(worker_id).await
    }
    async fn wait_for_work(&self, queues: &[String], timeout: Duration) {
        (**self).wait_for_work(queues, timeout).await
    }
    async fn stop_fetching(&self, queues: &[String]) {
        (**self).stop_fetching(queues).await
    }
    async fn resume_fetching(&self, queues: &[String]) {
        (**self).resume_fetching(queues).await
    }
    async fn close(&self) {
        (**self).close().await
    }
    fn refuses_duplicate_ids(&self) -> bool {
        (**self).refuses_duplicate_ids()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(shares: &[(u32, u32)], total: u32) -> FetchPlan {
        FetchPlan::new(
            shares
                .iter()
                .enumerate()
                .map(|(i, &(s, m))| FetchShare::new(format!("q{i}"), s, m))
                .collect(),
            total,
            Duration::from_secs(1),
        )
    }

    #[test]
    fn allocation_keeps_shares_when_all_have_work() {
        assert_eq!(plan(&[(3, 8), (1, 8)], 4).allocate(&[10, 10]), vec![3, 1]);
    }

    #[test]
    fn allocation_gives_an_empty_queues_share_to_the_others() {
        assert_eq!(plan(&[(3, 8), (1, 8)], 4).allocate(&[0, 10]), vec![0, 4]);
        assert_eq!(plan(&[(3, 8), (1, 8)], 4).allocate(&[1, 10]), vec![1, 3]);
    }

    #[test]
    fn allocation_respects_per_queue_max() {
        assert_eq!(plan(&[(3, 3), (1, 1)], 8).allocate(&[10, 10]), vec![3, 1]);
    }
}
