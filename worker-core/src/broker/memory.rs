//! [`MemoryBroker`]: the whole [`Broker`] contract in process memory.
//!
//! It is the embedded default when no broker is configured, and the reference the
//! real backends are held to: leases expire and the reaper redelivers, tokens fence
//! every operation, delayed jobs wait for their time. Time is tokio's clock, so tests
//! can pause and advance it. Nothing survives the process.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Broker, DeadLetter, Delivery, FetchPlan, Lease, LeaseToken, QueueDepth, WorkerInfo};
use crate::error::BrokerError;
use crate::job::{now_ms, Envelope, JobId, NewJob};

/// An in-process broker with the semantics of a real backend. Cheap to clone; clones
/// share the same queues.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), worker_core::BrokerError> {
/// use std::time::Duration;
/// use worker_core::{Broker, FetchPlan, MemoryBroker, NewJob};
///
/// let broker = MemoryBroker::new();
/// broker.enqueue(vec![NewJob::new("q", "hello")]).await?;
/// let got = broker.fetch(&FetchPlan::single("q", 10, Duration::from_secs(30))).await?;
/// assert_eq!(got.len(), 1);
/// broker.ack(&got[0].lease).await?;
/// assert_eq!(broker.depth("q").await?.backlog(), 0);
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    /// Woken on every change that may make a job startable.
    work: Notify,
    max_payload: Option<usize>,
}

#[derive(Default)]
struct State {
    queues: HashMap<String, QueueState>,
    workers: HashMap<String, (WorkerInfo, Instant)>,
    seq: u64,
}

#[derive(Default)]
struct QueueState {
    /// Every live (not dead) job of the queue.
    jobs: HashMap<JobId, Stored>,
    pending: VecDeque<JobId>,
    in_flight: HashMap<JobId, (LeaseToken, Instant)>,
    /// (due, insertion order, id)
    delayed: BTreeSet<(Instant, u64, JobId)>,
    dead: VecDeque<DeadLetter>,
    /// The ids in `dead`, each once: a dead id is taken until it is purged or requeued.
    dead_ids: HashSet<JobId>,
}

struct Stored {
    envelope: Envelope,
    /// When it last became startable, for the oldest-pending age.
    ready_since: Instant,
}

impl QueueState {
    fn promote_due(&mut self, now: Instant) -> bool {
        let mut any = false;
        while let Some(first) = self.delayed.first() {
            if first.0 > now {
                break;
            }
            let Some((due, _, id)) = self.delayed.pop_first() else {
                break;
            };
            if let Some(stored) = self.jobs.get_mut(&id) {
                stored.ready_since = due;
                self.pending.push_back(id);
                any = true;
            }
        }
        any
    }

    /// Whether `lease` owns its job: `LeaseLost` if not.
    fn check_owned(&self, lease: &Lease) -> Result<(), BrokerError> {
        match self.in_flight.get(&lease.job_id) {
            Some((token, _)) if *token == lease.token => Ok(()),
            _ => Err(BrokerError::LeaseLost {
                job_id: lease.job_id.clone(),
            }),
        }
    }

    /// Remove the in-flight entry if `lease` owns it.
    fn take_owned(&mut self, lease: &Lease) -> Result<(), BrokerError> {
        self.check_owned(lease)?;
        self.in_flight.remove(&lease.job_id);
        Ok(())
    }

    /// Whether `id` names a job of this queue: live (pending, delayed, in flight) or dead.
    fn holds(&self, id: &JobId) -> bool {
        self.jobs.contains_key(id) || self.dead_ids.contains(id)
    }

    fn envelope_mut(&mut self, id: &JobId) -> Result<&mut Stored, BrokerError> {
        self.jobs
            .get_mut(id)
            .ok_or_else(|| BrokerError::LeaseLost { job_id: id.clone() })
    }
}

impl MemoryBroker {
    /// An empty broker with no payload size limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty broker refusing payloads over `limit` bytes.
    pub fn with_max_payload(limit: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                max_payload: Some(limit),
                ..Inner::default()
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way
        // that matters more than losing the process's jobs, so poisoning is ignored.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn owned_queue<'a>(
        state: &'a mut State,
        lease: &Lease,
    ) -> Result<&'a mut QueueState, BrokerError> {
        state
            .queues
            .get_mut(&lease.queue)
            .ok_or_else(|| BrokerError::LeaseLost {
                job_id: lease.job_id.clone(),
            })
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, BrokerError> {
        for (i, job) in jobs.iter().enumerate() {
            crate::broker::validate_new_job(job, i + 1)?;
            if let Some(limit) = self.inner.max_payload {
                if job.payload.len() > limit {
                    return Err(BrokerError::PayloadTooLarge {
                        size: job.payload.len(),
                        limit,
                    });
                }
            }
        }
        let now = Instant::now();
        let mut state = self.state();
        let envelopes: Vec<Envelope> = jobs.into_iter().map(Envelope::from_new).collect();
        for (i, env) in envelopes.iter().enumerate() {
            let taken = state
                .queues
                .get(&env.queue)
                .is_some_and(|q| q.holds(&env.id))
                || envelopes[..i]
                    .iter()
                    .any(|e| e.id == env.id && e.queue == env.queue);
            if taken {
                return Err(BrokerError::DuplicateJob {
                    job_id: env.id.clone(),
                });
            }
        }
        let mut ids = Vec::with_capacity(envelopes.len());
        for env in envelopes {
            state.seq += 1;
            let seq = state.seq;
            let delay = Duration::from_millis(env.due_at_ms.saturating_sub(env.enqueued_at_ms));
            let id = env.id.clone();
            let q = state.queues.entry(env.queue.clone()).or_default();
            if delay.is_zero() {
                q.pending.push_back(id.clone());
            } else {
                q.delayed.insert((now + delay, seq, id.clone()));
            }
            q.jobs.insert(
                id.clone(),
                Stored {
                    envelope: env,
                    ready_since: now + delay,
                },
            );
            ids.push(id);
        }
        drop(state);
        self.inner.work.notify_waiters();
        Ok(ids)
    }

    async fn fetch(&self, plan: &FetchPlan) -> Result<Vec<Delivery>, BrokerError> {
        let now = Instant::now();
        let mut state = self.state();
        let mut available = Vec::with_capacity(plan.shares.len());
        for share in &plan.shares {
            let n = match state.queues.get_mut(&share.queue) {
                Some(q) => {
                    q.promote_due(now);
                    q.pending.len() as u64
                }
                None => 0,
            };
            available.push(n);
        }
        let counts = plan.allocate(&available);
        let mut out = Vec::with_capacity(counts.iter().sum::<u32>() as usize);
        for (share, n) in plan.shares.iter().zip(counts) {
            let Some(q) = state.queues.get_mut(&share.queue) else {
                continue;
            };
            for _ in 0..n {
                let Some(id) = q.pending.pop_front() else {
                    break;
                };
                let Some(stored) = q.jobs.get(&id) else {
                    continue;
                };
                let token = LeaseToken::random();
                q.in_flight.insert(id, (token, now + plan.lease));
                out.push(Delivery::new(stored.envelope.clone(), token));
            }
        }
        Ok(out)
    }

    async fn ack(&self, lease: &Lease) -> Result<(), BrokerError> {
        let mut state = self.state();
        let q = Self::owned_queue(&mut state, lease)?;
        q.take_owned(lease)?;
        q.jobs.remove(&lease.job_id);
        Ok(())
    }

    async fn retry_after(
        &self,
        lease: &Lease,
        delay: Duration,
        error: &str,
    ) -> Result<(), BrokerError> {
        let now = Instant::now();
        let mut state = self.state();
        state.seq += 1;
        let seq = state.seq;
        let q = Self::owned_queue(&mut state, lease)?;
        q.take_owned(lease)?;
        let stored = q.envelope_mut(&lease.job_id)?;
        stored.envelope.record_failure(error);
        stored.envelope.attempt += 1;
        stored.envelope.due_at_ms = now_ms() + delay.as_millis() as u64;
        stored.ready_since = now + delay;
        if delay.is_zero() {
            q.pending.push_back(lease.job_id.clone());
        } else {
            q.delayed.insert((now + delay, seq, lease.job_id.clone()));
        }
        drop(state);
        self.inner.work.notify_waiters();
        Ok(())
    }

    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), BrokerError> {
        let mut state = self.state();
        let q = Self::owned_queue(&mut state, lease)?;
        q.check_owned(lease)?;
        // Never overwrite or double another dead letter of the id (enqueue refuses a
        // dead id, so only a store changed behind the broker's back could get here).
        if q.dead_ids.contains(&lease.job_id) {
            return Err(BrokerError::DuplicateJob {
                job_id: lease.job_id.clone(),
            });
        }
        q.take_owned(lease)?;
        let Some(mut stored) = q.jobs.remove(&lease.job_id) else {
            return Err(BrokerError::LeaseLost {
                job_id: lease.job_id.clone(),
            });
        };
        stored.envelope.record_failure(reason);
        q.dead_ids.insert(lease.job_id.clone());
        q.dead.push_back(DeadLetter {
            envelope: stored.envelope,
            reason: reason.to_owned(),
            died_at_ms: now_ms(),
        });
        Ok(())
    }

    async fn release(&self, lease: &Lease) -> Result<(), BrokerError> {
        let now = Instant::now();
        let mut state = self.state();
        let q = Self::owned_queue(&mut state, lease)?;
        q.take_owned(lease)?;
        // Released jobs go to the head: they were next in line before this worker took them.
        q.pending.push_front(lease.job_id.clone());
        if let Some(stored) = q.jobs.get_mut(&lease.job_id) {
            stored.ready_since = stored.ready_since.min(now);
        }
        drop(state);
        self.inner.work.notify_waiters();
        Ok(())
    }

    async fn extend_lease(&self, lease: &Lease, lease_for: Duration) -> Result<(), BrokerError> {
        let now = Instant::now();
        let mut state = self.state();
        let q = Self::owned_queue(&mut state, lease)?;
        match q.in_flight.get_mut(&lease.job_id) {
            Some((token, deadline)) if *token == lease.token => {
                *deadline = now + lease_for;
                Ok(())
            }
            _ => Err(BrokerError::LeaseLost {
                job_id: lease.job_id.clone(),
            }),
        }
    }

    async fn checkpoint(&self, lease: &Lease, job: &Envelope) -> Result<(), BrokerError> {
        let mut state = self.state();
        let q = Self::owned_queue(&mut state, lease)?;
        match q.in_flight.get(&lease.job_id) {
            Some((token, _)) if *token == lease.token => {
                q.envelope_mut(&lease.job_id)?.envelope.checkpoint = job.checkpoint.clone();
                Ok(())
            }
            _ => Err(BrokerError::LeaseLost {
                job_id: lease.job_id.clone(),
            }),
        }
    }

    async fn reap_expired(&self, queues: &[String]) -> Result<u64, BrokerError> {
        let now = Instant::now();
        let mut state = self.state();
        let mut reclaimed = 0;
        for name in queues {
            let Some(q) = state.queues.get_mut(name) else {
                continue;
            };
            let expired: Vec<JobId> = q
                .in_flight
                .iter()
                .filter(|(_, (_, deadline))| *deadline <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                q.in_flight.remove(&id);
                if let Some(stored) = q.jobs.get_mut(&id) {
                    stored
                        .envelope
                        .record_failure("lease expired: the worker stopped beating");
                    stored.envelope.attempt += 1;
                    stored.ready_since = now;
                    q.pending.push_back(id);
                    reclaimed += 1;
                }
            }
        }
        drop(state);
        if reclaimed > 0 {
            self.inner.work.notify_waiters();
        }
        Ok(reclaimed)
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        let now = Instant::now();
        let state = self.state();
        let mut d = QueueDepth::default();
        d.read_from(&QueueDepth::FIELDS, "memory: this process's queues");
        let Some(q) = state.queues.get(queue) else {
            return Ok(d);
        };
        let oldest = q
            .pending
            .iter()
            .filter_map(|id| q.jobs.get(id))
            .map(|s| s.ready_since)
            .min();
        d.pending = q.pending.len() as u64;
        d.in_flight = q.in_flight.len() as u64;
        d.delayed = q.delayed.len() as u64;
        d.delayed_due = q.delayed.iter().take_while(|(due, ..)| *due <= now).count() as u64;
        d.dead = q.dead.len() as u64;
        d.oldest_pending_age = oldest.map(|t| now.saturating_duration_since(t));
        Ok(d)
    }

    async fn dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        let state = self.state();
        Ok(state
            .queues
            .get(queue)
            .map(|q| q.dead.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    async fn requeue_dead(&self, queue: &str, ids: &[JobId]) -> Result<u64, BrokerError> {
        let now = Instant::now();
        let mut state = self.state();
        let Some(q) = state.queues.get_mut(queue) else {
            return Ok(0);
        };
        let mut moved = 0;
        let mut keep = VecDeque::with_capacity(q.dead.len());
        for dead in std::mem::take(&mut q.dead) {
            let id = &dead.envelope.id;
            // A dead letter whose id is live again stays dead: two live copies of one
            // id would share one lease and one pending slot.
            if !(ids.is_empty() || ids.contains(id)) || q.jobs.contains_key(id) {
                keep.push_back(dead);
                continue;
            }
            q.dead_ids.remove(id);
            let mut envelope = dead.envelope;
            envelope.attempt = 1;
            envelope.due_at_ms = now_ms();
            q.pending.push_back(envelope.id.clone());
            q.jobs.insert(
                envelope.id.clone(),
                Stored {
                    envelope,
                    ready_since: now,
                },
            );
            moved += 1;
        }
        q.dead = keep;
        drop(state);
        if moved > 0 {
            self.inner.work.notify_waiters();
        }
        Ok(moved)
    }

    async fn purge_dead(&self, queue: &str, ids: &[JobId]) -> Result<u64, BrokerError> {
        let mut state = self.state();
        let Some(q) = state.queues.get_mut(queue) else {
            return Ok(0);
        };
        let before = q.dead.len();
        let dead_ids = &mut q.dead_ids;
        q.dead.retain(|d| {
            let purge = ids.is_empty() || ids.contains(&d.envelope.id);
            if purge {
                dead_ids.remove(&d.envelope.id);
            }
            !purge
        });
        Ok((before - q.dead.len()) as u64)
    }

    async fn register_worker(&self, info: &WorkerInfo, ttl: Duration) -> Result<(), BrokerError> {
        let mut info = info.clone();
        info.last_beat_ms = now_ms();
        self.state()
            .workers
            .insert(info.id.clone(), (info, Instant::now() + ttl));
        Ok(())
    }

    async fn list_workers(&self, pool: Option<&str>) -> Result<Vec<WorkerInfo>, BrokerError> {
        let now = Instant::now();
        let mut state = self.state();
        state.workers.retain(|_, (_, expires)| *expires > now);
        let mut out: Vec<WorkerInfo> = state
            .workers
            .values()
            .filter(|(w, _)| pool.is_none_or(|p| w.pool == p))
            .map(|(w, _)| w.clone())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn deregister_worker(&self, worker_id: &str) -> Result<(), BrokerError> {
        self.state().workers.remove(worker_id);
        Ok(())
    }

    async fn wait_for_work(&self, queues: &[String], timeout: Duration) {
        let notified = self.inner.work.notified();
        tokio::pin!(notified);
        // Register before looking, so a change between the look and the wait still wakes us.
        notified.as_mut().enable();
        let now = Instant::now();
        let mut wake_at = now + timeout;
        {
            let state = self.state();
            for name in queues {
                if let Some(q) = state.queues.get(name) {
                    if !q.pending.is_empty() {
                        return;
                    }
                    if let Some((due, ..)) = q.delayed.first() {
                        wake_at = wake_at.min(*due);
                    }
                }
            }
        }
        if wake_at <= now {
            return;
        }
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(wake_at) => {}
        }
    }
}
