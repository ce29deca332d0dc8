//! One job's life inside the worker, in this order:
//!
//! 1. **admission** — too many attempts (a job whose worker keeps dying) or a cost over
//!    the whole budget: dead-letter at once;
//! 2. **start** — wait for budget units and a run permit, the lease registered with
//!    the process's lease keeper (`leases.rs`), which extends it; a drain beginning
//!    before the job starts releases it at once;
//! 3. **decode** — an undecodable payload is dead-lettered with the decode error;
//! 4. **run** — the handler in this job's own task (a panic is caught here), raced
//!    against its token, which the keeper cancels when the lease is lost or the job's
//!    timeout passes, and the worker at the drain deadline;
//! 5. **settle** — ack, retry with backoff, dead-letter or release, fenced by the lease
//!    token; transient broker errors are retried until the lease would have expired.
//!    The job's fetch permit is already back by then (it returns with the handler), so
//!    the next fetch travels while this call does.
//!
//! # A handler told to stop
//!
//! The job timeout, the drain deadline (or a second signal) and a lost lease cancel the
//! handler's token. It then has a grace of 250 ms ([`CANCEL_GRACE`]) to return by
//! itself; past that its future is dropped, which stops it at the await it is in.
//! Either way, what it answers when it ends decides, and an `Ok` is acked:
//!
//! | told to stop by | `Ok`         | `Fatal`                 | `Retry`                     | else (interrupted, panic, dropped) |
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
//! Until its future has really ended (a handler holding its thread, between awaits,
//! cannot be dropped until it yields), the job keeps its run permit, its budget units,
//! its fetch permit and its lease, which the keeper, on another task, goes on
//! extending; only then is the job settled. So this worker never runs one job twice at
//! once, nor more units than its budget. A warning names a job whose handler outlives
//! its grace.
//!
//! Work a handler moved off its own task (`spawn_blocking`, `tokio::spawn`) is not seen:
//! dropping the handler's future detaches that work, and the job is then settled while
//! the work goes on. Such a handler watches
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

use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::Instrument;

use super::leases::Watch;
use super::limits::RunPermits;
use super::{Settled, Shared};
use crate::broker::{Delivery, Lease};
use crate::error::{chain, BrokerError, JobError};
use crate::handler::Handler;
use crate::job::{now_ms, Envelope, Job, JobContext, Progress};
use crate::telemetry::Outcome;

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
    let outcome = supervise(&shared, delivery, held, fetched_at)
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

/// How long a cancelled handler may take to return by itself before its future is dropped.
const CANCEL_GRACE: Duration = Duration::from_millis(250);

/// How the handler's future ended.
enum Answer {
    /// It returned this.
    Returned(Result<(), JobError>),
    /// It panicked, with this message.
    Panicked(String),
}

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
    /// `None`: it was dropped after its grace, at an await.
    Stopped { why: Stop, answer: Option<Answer> },
}

/// `held` is the job's fetch permit: given back as soon as the handler has returned,
/// so the next fetch overlaps this job's settling call instead of waiting for it.
/// `fetched_at` is when the fetch that leased it was sent.
async fn supervise<H: Handler>(
    shared: &Shared<H>,
    delivery: Delivery,
    held: OwnedSemaphorePermit,
    fetched_at: Instant,
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

    // From here until it settles, the process's lease keeper keeps the lease.
    let kept = shared
        .leases
        .hold(lease.clone(), fetched_at, &shared.life.hard);

    // 2. start
    let Some(permits) = wait_to_start(shared, &kept.watch, envelope.cost).await else {
        let lost = kept.watch.lost();
        drop(kept);
        return if shared.life.drain.is_cancelled() && !lost {
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
            drop(kept);
            let reason = format!("undecodable payload: {e}");
            return dead_letter(shared, &lease, &reason).await;
        }
    };

    // 4. run
    let envelope = Arc::new(envelope);
    let cancel = kept.watch.stop.clone();
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
    let meters = shared.meters.queue(&envelope.queue);
    let waited = now_ms().saturating_sub(envelope.due_at_ms.max(envelope.enqueued_at_ms));
    meters.wait.record(waited as f64 / 1000.0);
    shared.running.fetch_add(1, Ordering::Relaxed);
    shared.publish_load();
    let started = Instant::now();
    kept.settle_in().await;
    if let Some(limit) = shared.config.job_timeout {
        kept.time_out_at(started + limit).await;
    }

    // The handler runs in this task; a panic is caught here.
    let handler = shared.handler.clone();
    let run = AssertUnwindSafe(handler.handle(job)).catch_unwind();
    let end = supervise_handler(shared, &kept.watch, run).await;
    drop(kept);

    meters.duration.record(started.elapsed().as_secs_f64());
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
        RunEnd::Finished(Answer::Returned(Ok(())))
        | RunEnd::Stopped {
            answer: Some(Answer::Returned(Ok(()))),
            ..
        } => settle(shared, &lease, Outcome::Ok, || shared.broker.ack(&lease)).await,
        RunEnd::Finished(Answer::Returned(Err(JobError::Fatal { reason }))) => {
            dead_letter(shared, &lease, &reason).await
        }
        RunEnd::Finished(Answer::Returned(Err(JobError::Retry { reason, after }))) => {
            fail(shared, &lease, &envelope, max_attempts, &reason, after).await
        }
        RunEnd::Finished(Answer::Returned(Err(JobError::Interrupted { reason }))) => {
            if shared.life.drain.is_cancelled() {
                tracing::info!(%reason, "handler stopped for the drain; job released");
                release(shared, &lease).await
            } else {
                tracing::warn!(%reason, "handler interrupted while not draining; counted as a retry");
                let reason = format!("interrupted while not draining: {reason}");
                fail(shared, &lease, &envelope, max_attempts, &reason, None).await
            }
        }
        RunEnd::Finished(Answer::Panicked(message)) => {
            let reason = format!("handler panicked: {message}");
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
            Some(Answer::Returned(Err(JobError::Fatal { reason }))) => {
                dead_letter(shared, &lease, &reason).await
            }
            Some(Answer::Returned(Err(JobError::Retry { reason, after }))) => {
                fail(shared, &lease, &envelope, max_attempts, &reason, after).await
            }
            _ => {
                let reason = format!("timed out after {limit:?}");
                fail(shared, &lease, &envelope, max_attempts, &reason, None).await
            }
        },
    }
}

/// Wait for budget units and a run permit (the keeper extends the lease meanwhile).
/// `None` when the drain began first (the caller releases) or the lease was lost.
async fn wait_to_start<H>(shared: &Shared<H>, watch: &Watch, cost: u32) -> Option<RunPermits> {
    let drain = &shared.life.drain;
    let units = shared.limits.units_for(cost);
    if drain.is_cancelled() || watch.stop.is_cancelled() {
        return None;
    }
    if let Some(p) = shared.limits.try_start(units) {
        return Some(p);
    }
    tokio::select! {
        biased;
        _ = drain.cancelled() => None,
        _ = watch.stop.cancelled() => None,
        permits = shared.limits.start(units) => permits,
    }
}

/// Why the keeper or the drain cancelled the handler's token.
fn why_stopped<H>(shared: &Shared<H>, watch: &Watch) -> Stop {
    if watch.lost() {
        Stop::LeaseLost
    } else if watch.timed_out() {
        Stop::TimedOut(shared.config.job_timeout.unwrap_or_default())
    } else {
        Stop::Drain
    }
}

/// Run the handler to its end. Returns only once its future has ended or been
/// dropped, so the caller gives back its permits and settles the job only then.
async fn supervise_handler<H, F>(shared: &Shared<H>, watch: &Watch, run: F) -> RunEnd
where
    F: Future<Output = std::thread::Result<Result<(), JobError>>>,
{
    let mut run = std::pin::pin!(run);
    let answer = |r: std::thread::Result<Result<(), JobError>>| match r {
        Ok(r) => Answer::Returned(r),
        Err(payload) => Answer::Panicked(panic_message(payload)),
    };
    tokio::select! {
        biased;
        r = &mut run => {
            let answer = answer(r);
            return if watch.stop.is_cancelled() {
                RunEnd::Stopped { why: why_stopped(shared, watch), answer: Some(answer) }
            } else {
                RunEnd::Finished(answer)
            };
        }
        _ = watch.stop.cancelled() => {}
    }
    // Told to stop: a grace to return by itself, then the future is dropped, which
    // stops it at the await it is in. The keeper extends the lease all along, unless
    // it is lost.
    let grace = tokio::time::sleep(CANCEL_GRACE);
    let answer = tokio::select! {
        biased;
        r = &mut run => Some(answer(r)),
        () = grace => {
            tracing::warn!(
                grace = ?CANCEL_GRACE,
                "handler did not stop within its grace; dropping it"
            );
            None
        }
    };
    RunEnd::Stopped {
        why: why_stopped(shared, watch),
        answer,
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
