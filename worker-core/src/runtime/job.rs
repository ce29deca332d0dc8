//! One job's life inside the worker, in this order:
//!
//! 1. **admission** — too many attempts (a job whose worker keeps dying) or a cost over
//!    the whole budget: dead-letter at once;
//! 2. **start** — wait for budget units and a run permit, keeping the lease alive; a drain
//!    beginning before the job starts releases it at once;
//! 3. **decode** — an undecodable payload is dead-lettered with the decode error;
//! 4. **run** — the handler on its own task (a panic is caught there), supervised by this
//!    task: lease extended every lease/3 (see [`LeaseKeeper`]), the per-job timeout, the
//!    drain deadline;
//! 5. **settle** — ack, retry with backoff, dead-letter or release, fenced by the lease
//!    token; transient broker errors are retried until the lease would have expired.
//!    The job's fetch permit is already back by then (it returns with the handler), so
//!    the next fetch travels while this call does.
//!
//! # A handler told to stop
//!
//! The job timeout, the drain deadline (or a second signal) and a lost lease cancel the
//! handler's token. It then has a grace of 250 ms ([`CANCEL_GRACE`]) to return by
//! itself; past that its task is aborted, which stops it at its next await. Either way,
//! what it answers when it ends decides, and an `Ok` is acked:
//!
//! | told to stop by | `Ok`         | `Fatal`                 | `Retry`                     | else (interrupted, panic, aborted) |
//! |-----------------|--------------|-------------------------|-----------------------------|------------------------------------|
//! | the job timeout | ack          | dead letter, its reason | retry, its reason and delay | retry: "timed out after …"         |
//! | the drain       | ack          | release                 | release                     | release                            |
//! | a lost lease    | not recorded | not recorded            | not recorded                | not recorded                       |
//!
//! A lost lease records nothing: another worker may own the job by then, and its token
//! would be refused.
//!
//! After a timeout the attempt is spent whatever happens, and the handler knows better
//! than the timer why it stopped. After the drain deadline an error is how the handler
//! stopped, not a verdict on the job: the job goes back to pending, attempt not counted.
//!
//! Until its task has really ended (a handler holding its thread, between awaits, is not
//! stopped by the abort), the job keeps its run permit, its budget units, its fetch
//! permit and its lease, which is extended as before; only then is the job settled. So
//! this worker never runs one job twice at once, nor more units than its budget.
//! A warning names a job whose handler outlives its grace.
//!
//! Work a handler moved off its own task (`spawn_blocking`, `tokio::spawn`) is not seen:
//! the abort drops the handler's future, which detaches that work, and the job is then
//! settled while the work goes on. Such a handler watches
//! [`JobContext::cancellation`](crate::JobContext::cancellation) inside that work.
//!
//! A handler that never returns keeps its job leased for as long as the process lives.
//! The drain does not wait for it past the drain deadline and the release grace of
//! [`Worker::run`](crate::Worker::run) (a second signal ends the drain at once as
//! before): the run returns with `clean_drain: false` and that job unsettled. When the
//! process exits, the lease lapses and the job comes back as from a crashed worker, its
//! attempt counted.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::OwnedSemaphorePermit;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;
use tracing::Instrument;

use super::limits::RunPermits;
use super::{Settled, Shared};
use crate::broker::{Delivery, Lease};
use crate::error::{chain, BrokerError, JobError};
use crate::handler::Handler;
use crate::job::{now_ms, Envelope, Job, JobContext, Progress};
use crate::telemetry::{names, Outcome};

/// `fetched_at` is when the fetch that leased `delivery` was sent: the broker started
/// the lease no earlier, so the lease surely lasts until `fetched_at + lease`.
pub(crate) async fn run<H: Handler>(
    shared: Arc<Shared<H>>,
    delivery: Delivery,
    held: OwnedSemaphorePermit,
    fetched_at: Instant,
) {
    let queue = delivery.lease.queue.clone();
    let (id, attempt) = (delivery.envelope.id.clone(), delivery.envelope.attempt);
    let span = tracing::info_span!(
        "job",
        id = %delivery.envelope.id,
        queue = %queue,
        attempt = delivery.envelope.attempt,
    );
    let keeper = LeaseKeeper::new(shared.config.lease, fetched_at);
    let outcome = supervise(&shared, delivery, held, keeper)
        .instrument(span)
        .await;
    // After the settling call returned: what is recorded is what the broker confirmed.
    shared.record(Settled {
        id,
        queue: queue.clone(),
        attempt,
        outcome,
    });
    shared.sched().finished(&queue);
    shared.job_done.notify_one();
}

/// How long a cancelled handler may take to return by itself before it is aborted.
const CANCEL_GRACE: Duration = Duration::from_millis(250);

type Answer = Result<Result<(), JobError>, JoinError>;

/// Why the handler's token was cancelled.
enum Stop {
    TimedOut(Duration),
    /// The drain deadline or a second signal.
    Drain,
    LeaseLost,
}

enum RunEnd {
    /// The handler ended without being told to stop.
    Finished(Answer),
    /// It was told to stop; `answer` is how it ended.
    Stopped { why: Stop, answer: Answer },
}

/// First wait before extending again after a transient failure; it doubles up to
/// lease/3.
const EXTEND_RETRY: Duration = Duration::from_millis(250);
/// Least wait between two extensions.
const EXTEND_RETRY_MIN: Duration = Duration::from_millis(10);

/// Keeps one job's lease: extends it every lease/3, and knows by the worker's own clock
/// until when the lease surely lasts. The lease is lost when the broker refuses the
/// token, or when that time passes without an extension: another worker may own the
/// job by then. A transient failure (the broker unreachable, or refusing writes) loses
/// nothing while time is left: the extension is tried again sooner, and the fetch loop
/// takes no new jobs until writes are accepted again.
pub(crate) struct LeaseKeeper {
    lease: Duration,
    /// When to extend next.
    next: Instant,
    /// Until when the lease surely lasts: the last successful extension (or the fetch)
    /// was sent `lease` before, and the broker started that lease no earlier.
    held_until: Instant,
    /// The wait after the next transient failure.
    retry: Duration,
}

impl LeaseKeeper {
    fn new(lease: Duration, fetched_at: Instant) -> Self {
        Self {
            lease,
            next: Instant::now() + lease / 3,
            held_until: fetched_at + lease,
            retry: EXTEND_RETRY,
        }
    }

    /// Wait until an extension is due.
    ///
    /// # Cancel safety
    /// Cancel safe: it only sleeps.
    async fn due(&self) {
        tokio::time::sleep_until(self.next).await;
    }

    /// Extend the lease once. `Err` only when the lease is lost.
    async fn extend<H>(&mut self, shared: &Shared<H>, lease: &Lease) -> Result<(), BrokerError> {
        let sent = Instant::now();
        let call = shared.broker.extend_lease(lease, self.lease);
        // A reply after `held_until` still counts: the broker is the judge of its lease.
        match tokio::time::timeout_at(self.held_until, call).await {
            Ok(Ok(())) => {
                self.held_until = sent + self.lease;
                self.next = Instant::now() + self.lease / 3;
                self.retry = EXTEND_RETRY;
                if shared.life.set_writes_accepted(true) {
                    tracing::info!("lease extended: the broker accepts writes again");
                }
                Ok(())
            }
            Ok(Err(e)) if !e.is_transient() => {
                tracing::warn!(error = %chain(&e), "lease lost: another worker owns this job now");
                Err(e)
            }
            Ok(Err(e)) => {
                shared.broker_error("extend_lease");
                shared.life.set_writes_accepted(false);
                let now = Instant::now();
                if now >= self.held_until {
                    return Err(self.ran_out(lease, Some(&e)));
                }
                let left = self.held_until - now;
                let wait = self.retry.min(left / 2).max(EXTEND_RETRY_MIN);
                self.next = now + wait;
                self.retry = (self.retry * 2).min(self.lease / 3);
                tracing::warn!(
                    error = %chain(&e),
                    retry_in = ?wait,
                    lease_left = ?left,
                    "lease extension failed; retrying while the lease lasts"
                );
                Ok(())
            }
            Err(_) => {
                shared.broker_error("extend_lease");
                shared.life.set_writes_accepted(false);
                Err(self.ran_out(lease, None))
            }
        }
    }

    fn ran_out(&self, lease: &Lease, last: Option<&BrokerError>) -> BrokerError {
        let error = last.map(|e| chain(e)).unwrap_or_else(|| "no reply".into());
        tracing::warn!(
            %error,
            "lease lost: it ran out before an extension succeeded; another worker may own this job now"
        );
        BrokerError::LeaseLost {
            job_id: lease.job_id.clone(),
        }
    }
}

/// `held` is the job's fetch permit: given back as soon as the handler has returned,
/// so the next fetch overlaps this job's settling call instead of waiting for it.
async fn supervise<H: Handler>(
    shared: &Shared<H>,
    delivery: Delivery,
    held: OwnedSemaphorePermit,
    mut keeper: LeaseKeeper,
) -> Outcome {
    let Delivery { envelope, lease } = delivery;
    let max_attempts = envelope.max_attempts.unwrap_or(shared.config.max_attempts);

    // 1. admission
    if envelope.attempt > max_attempts {
        let last = envelope
            .history
            .last()
            .map_or("none recorded", |r| r.error.as_str());
        let reason = format!("exceeded {max_attempts} attempts; last error: {last}");
        return dead_letter(shared, &lease, &reason).await;
    }
    if let Some(total) = shared.limits.exceeds_budget(envelope.cost) {
        let reason = format!(
            "cost of {} units exceeds the pool budget of {total} units; it can never start",
            envelope.cost
        );
        return dead_letter(shared, &lease, &reason).await;
    }

    // 2. start
    let Some(permits) = wait_to_start(shared, &lease, &mut keeper, envelope.cost).await else {
        return if shared.life.drain.is_cancelled() {
            release(shared, &lease).await
        } else {
            Outcome::Failed
        };
    };

    // 3. decode
    let payload: H::Payload = match serde_json::from_slice(&envelope.payload) {
        Ok(p) => p,
        Err(e) => {
            drop(permits);
            let reason = format!("undecodable payload: {e}");
            return dead_letter(shared, &lease, &reason).await;
        }
    };

    // 4. run
    let envelope = Arc::new(envelope);
    let cancel = shared.life.hard.child_token();
    let job = Job {
        payload,
        raw: envelope.payload.clone(),
        ctx: JobContext {
            id: envelope.id.clone(),
            queue: envelope.queue.clone(),
            attempt: envelope.attempt,
            max_attempts,
            cost: envelope.cost,
            enqueued_at: UNIX_EPOCH + Duration::from_millis(envelope.enqueued_at_ms),
            headers: Arc::new(envelope.headers.clone()),
            cancel: cancel.clone(),
            drain: shared.life.drain.clone(),
            progress: Some(Arc::new(Progress::new(
                shared.broker.clone(),
                lease.token,
                envelope.clone(),
            ))),
        },
    };
    let labels = [
        (names::POOL, shared.config.pool.clone()),
        (names::QUEUE, envelope.queue.clone()),
    ];
    let waited = now_ms().saturating_sub(envelope.due_at_ms.max(envelope.enqueued_at_ms));
    metrics::histogram!(names::JOB_WAIT, &labels).record(waited as f64 / 1000.0);
    shared.running.fetch_add(1, Ordering::Relaxed);
    shared.publish_load();
    let started = Instant::now();

    let handler = shared.handler.clone();
    let task =
        tokio::spawn(async move { handler.handle(job).await }.instrument(tracing::Span::current()));
    let end = supervise_handler(shared, &lease, &mut keeper, task, &cancel).await;

    metrics::histogram!(names::JOB_DURATION, &labels).record(started.elapsed().as_secs_f64());
    shared.running.fetch_sub(1, Ordering::Relaxed);
    drop(permits);
    drop(held);
    shared.publish_load();

    // 5. settle
    match end {
        RunEnd::Stopped {
            why: Stop::LeaseLost,
            ..
        } => Outcome::Failed,
        RunEnd::Finished(Ok(Ok(())))
        | RunEnd::Stopped {
            answer: Ok(Ok(())), ..
        } => settle(shared, &lease, Outcome::Ok, || shared.broker.ack(&lease)).await,
        RunEnd::Finished(Ok(Err(JobError::Fatal { reason }))) => {
            dead_letter(shared, &lease, &reason).await
        }
        RunEnd::Finished(Ok(Err(JobError::Retry { reason, after }))) => {
            fail(shared, &lease, &envelope, max_attempts, &reason, after).await
        }
        RunEnd::Finished(Ok(Err(JobError::Interrupted { reason }))) => {
            if shared.life.drain.is_cancelled() {
                tracing::info!(%reason, "handler stopped for the drain; job released");
                release(shared, &lease).await
            } else {
                tracing::warn!(%reason, "handler interrupted while not draining; counted as a retry");
                let reason = format!("interrupted while not draining: {reason}");
                fail(shared, &lease, &envelope, max_attempts, &reason, None).await
            }
        }
        RunEnd::Finished(Err(e)) => {
            let reason = if e.is_panic() {
                format!("handler panicked: {}", panic_message(e.into_panic()))
            } else {
                "handler task was cancelled".to_owned()
            };
            tracing::error!(%reason, "handler failed");
            fail(shared, &lease, &envelope, max_attempts, &reason, None).await
        }
        RunEnd::Stopped {
            why: Stop::Drain, ..
        } => release(shared, &lease).await,
        RunEnd::Stopped {
            why: Stop::TimedOut(limit),
            answer,
        } => match answer {
            Ok(Err(JobError::Fatal { reason })) => dead_letter(shared, &lease, &reason).await,
            Ok(Err(JobError::Retry { reason, after })) => {
                fail(shared, &lease, &envelope, max_attempts, &reason, after).await
            }
            _ => {
                let reason = format!("timed out after {limit:?}");
                fail(shared, &lease, &envelope, max_attempts, &reason, None).await
            }
        },
    }
}

/// Wait for budget units and a run permit, extending the lease while waiting. `None`
/// when the drain began first (the caller releases) or the lease was lost.
async fn wait_to_start<H>(
    shared: &Shared<H>,
    lease: &Lease,
    keeper: &mut LeaseKeeper,
    cost: u32,
) -> Option<RunPermits> {
    let drain = &shared.life.drain;
    let units = shared.limits.units_for(cost);
    if drain.is_cancelled() {
        return None;
    }
    if let Some(p) = shared.limits.try_start(units) {
        return Some(p);
    }
    let start = shared.limits.start(units);
    tokio::pin!(start);
    loop {
        tokio::select! {
            biased;
            _ = drain.cancelled() => return None,
            permits = &mut start => return permits,
            _ = keeper.due() => keeper.extend(shared, lease).await.ok()?,
        }
    }
}

/// Run the handler to its end. Returns only once its task has ended, so the caller
/// gives back its permits and settles the job only then.
async fn supervise_handler<H>(
    shared: &Shared<H>,
    lease: &Lease,
    keeper: &mut LeaseKeeper,
    mut task: JoinHandle<Result<(), JobError>>,
    cancel: &tokio_util::sync::CancellationToken,
) -> RunEnd {
    let timeout = shared.config.job_timeout;
    let timed_out = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timed_out);
    let why = loop {
        tokio::select! {
            biased;
            answer = &mut task => {
                // Only the drain deadline cancels the token while this loop runs.
                if cancel.is_cancelled() {
                    return RunEnd::Stopped { why: Stop::Drain, answer };
                }
                return RunEnd::Finished(answer);
            }
            _ = cancel.cancelled() => break Stop::Drain,
            _ = &mut timed_out => break Stop::TimedOut(timeout.unwrap_or_default()),
            _ = keeper.due() => {
                if keeper.extend(shared, lease).await.is_err() {
                    break Stop::LeaseLost;
                }
            }
        }
    };
    cancel.cancel();
    let keep_lease = !matches!(why, Stop::LeaseLost);
    let (answer, lost) = wait_for_end(shared, lease, &mut task, keeper, keep_lease).await;
    let why = if lost { Stop::LeaseLost } else { why };
    RunEnd::Stopped { why, answer }
}

/// Wait for a cancelled handler's task to end: a grace to return by itself, then an
/// abort, which stops it at its next await only. The lease is kept alive all along, if
/// `keep_lease`. Returns how the task ended and whether the lease was lost meanwhile.
async fn wait_for_end<H>(
    shared: &Shared<H>,
    lease: &Lease,
    task: &mut JoinHandle<Result<(), JobError>>,
    keeper: &mut LeaseKeeper,
    mut keep_lease: bool,
) -> (Answer, bool) {
    let mut lost = false;
    let grace = tokio::time::sleep(CANCEL_GRACE);
    tokio::pin!(grace);
    let mut aborted_at: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            answer = &mut *task => {
                // Not stopped by the abort: it held its thread past it.
                if let (Some(at), false) = (aborted_at, matches!(&answer, Err(e) if e.is_cancelled())) {
                    let after = at.elapsed();
                    tracing::warn!(job = %lease.job_id, ?after, "handler held its thread past its abort; settling the job now");
                }
                return (answer, lost);
            }
            _ = &mut grace, if aborted_at.is_none() => {
                tracing::warn!(
                    job = %lease.job_id,
                    grace = ?CANCEL_GRACE,
                    "handler did not stop within its grace; aborting it, and keeping its permits and lease until it has ended"
                );
                task.abort();
                aborted_at = Some(Instant::now());
            }
            _ = keeper.due(), if keep_lease => {
                if keeper.extend(shared, lease).await.is_err() {
                    keep_lease = false;
                    lost = true;
                }
            }
        }
    }
}

async fn fail<H>(
    shared: &Shared<H>,
    lease: &Lease,
    envelope: &Envelope,
    max_attempts: u32,
    reason: &str,
    after: Option<Duration>,
) -> Outcome {
    if envelope.attempt >= max_attempts {
        let reason = format!(
            "failed {} of {max_attempts} attempts; last error: {reason}",
            envelope.attempt
        );
        return dead_letter(shared, lease, &reason).await;
    }
    let delay = after.unwrap_or_else(|| shared.config.backoff.delay(envelope.attempt));
    tracing::info!(error = reason, retry_in = ?delay, "job failed; will retry");
    settle(shared, lease, Outcome::Retried, || {
        shared.broker.retry_after(lease, delay, reason)
    })
    .await
}

async fn dead_letter<H>(shared: &Shared<H>, lease: &Lease, reason: &str) -> Outcome {
    tracing::warn!(reason, "dead-lettering job");
    // Bounded like the error text of the job's history.
    let reason = crate::job::clip(reason.to_owned(), crate::job::MAX_ERROR_TEXT);
    settle(shared, lease, Outcome::Dead, || {
        shared.broker.dead_letter(lease, &reason)
    })
    .await
}

async fn release<H>(shared: &Shared<H>, lease: &Lease) -> Outcome {
    settle(shared, lease, Outcome::Released, || {
        shared.broker.release(lease)
    })
    .await
}

/// Run a settling call, retrying transient failures with backoff until the lease would
/// have expired (past that, another worker may own the job and the reaper returns it).
async fn settle<H, F, Fut>(shared: &Shared<H>, lease: &Lease, outcome: Outcome, op: F) -> Outcome
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), BrokerError>>,
{
    let give_up = Instant::now() + shared.config.lease;
    let mut wait = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(()) => return outcome,
            Err(e) if e.is_transient() && Instant::now() + wait < give_up => {
                shared.broker_error("settle");
                shared.life.set_writes_accepted(false);
                tracing::warn!(error = %chain(&e), outcome = outcome.as_str(), retry_in = ?wait, "could not record outcome; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                shared.broker_error("settle");
                tracing::warn!(
                    error = %e,
                    job = %lease.job_id,
                    outcome = outcome.as_str(),
                    "outcome not recorded; the broker will redeliver the job"
                );
                return Outcome::Failed;
            }
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "non-string panic payload".to_owned(),
        },
    }
}
