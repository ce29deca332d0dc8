//! Preemptible batch pool: many small jobs at high concurrency, on nodes that may be
//! taken away with a short notice. A job works through `items` units; every
//! `CHECKPOINT_EVERY` units, and at once when the worker begins to drain, it saves its
//! position and running result with the job (`JobContext::checkpoint`). A job released
//! by a drain or reclaimed after a crash resumes from its last checkpoint on the next
//! worker instead of starting over.
//!
//! Run with: `cargo run -p batch` (in-memory broker: two thousand small jobs and four
//! long ones; Ctrl-C mid-way to see the long ones checkpoint and hand themselves
//! back), or with `REDIS_URL` to consume a real queue. On RabbitMQ checkpoints are
//! refused (a published message cannot change) and a job runs to its end or is cut
//! at the drain deadline and starts over.
//!
//! - Payload: `{"items": 400, "item_ms": 10, "seed": 7}`. Each item is a small real
//!   computation folded into the job's result, plus `item_ms` of waiting (a stand-in
//!   for I/O). Defaults: 1 item, no wait, seed 0: a tiny job.
//! - `CHECKPOINT_EVERY` (default 100): items between checkpoints.
//! - `WORKER_CONCURRENCY` defaults to 64 here. A spot notice is a SIGTERM with a short
//!   `WORKER_DRAIN_TIMEOUT`: every running job checkpoints and is released within it.
//!
//! It prints JSON lines on stdout for tests: `start` (attempt, the item it starts
//! from), `checkpoint`, `checkpoints_refused` (the broker keeps none), `interrupted`
//! (released by the drain), `end` (with its result) per job, and `stopped` with the
//! run report.

use std::process::ExitCode;
use std::time::Duration;

use example_support::event;
use serde::{Deserialize, Serialize};
use serde_json::json;
use worker_core::{async_trait, BrokerError, Handler, Job, JobError, NewJob, Worker};

/// Concurrency when `WORKER_CONCURRENCY` is not set.
const DEFAULT_CONCURRENCY: u32 = 64;
/// Items between checkpoints when `CHECKPOINT_EVERY` is not set.
const DEFAULT_CHECKPOINT_EVERY: u64 = 100;

#[derive(Debug, Deserialize)]
struct Work {
    #[serde(default = "one")]
    items: u64,
    #[serde(default)]
    item_ms: u64,
    #[serde(default)]
    seed: u64,
}

fn one() -> u64 {
    1
}

/// Where a job stands: the next item to do and the result so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    next: u64,
    acc: u64,
}

/// One unit of work: a few thousand rounds of a 64-bit mix, folded into `acc`.
fn work_item(acc: u64, seed: u64, item: u64) -> u64 {
    let mut x = acc ^ seed.rotate_left(17) ^ item.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for _ in 0..2_000 {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 29;
    }
    x
}

struct Batch {
    checkpoint_every: u64,
}

impl Batch {
    /// Save `at` with the job. `Ok(false)` when the broker keeps no checkpoints.
    async fn save(job: &Job<Work>, at: Position) -> Result<bool, JobError> {
        let data = serde_json::to_vec(&at)?;
        match job.ctx().checkpoint(data).await {
            Ok(()) => {
                event(json!({"event": "checkpoint", "id": job.id().to_string(),
                             "next": at.next, "acc": at.acc}));
                Ok(true)
            }
            Err(e @ BrokerError::Unsupported { .. }) => {
                event(
                    json!({"event": "checkpoints_refused", "id": job.id().to_string(),
                             "reason": e.to_string()}),
                );
                Ok(false)
            }
            // The lease is gone (another worker owns the job) or the broker failed:
            // stop; the runtime knows what became of the job.
            Err(e) => Err(JobError::retry(format!("checkpoint not saved: {e}"))),
        }
    }
}

#[async_trait]
impl Handler for Batch {
    type Payload = Work;

    async fn handle(&self, job: Job<Work>) -> Result<(), JobError> {
        let id = job.id().to_string();
        let from = match job.ctx().last_checkpoint() {
            Some(saved) => serde_json::from_slice::<Position>(&saved)
                .map_err(|e| JobError::fatal(format!("unreadable checkpoint: {e}")))?,
            None => Position::default(),
        };
        let (items, seed) = (job.payload.items, job.payload.seed);
        event(
            json!({"event": "start", "id": id, "attempt": job.ctx().attempt(),
                     "items": items, "from": from.next}),
        );
        let mut at = from;
        let mut checkpoints = true;
        while at.next < items {
            if job.ctx().drain_started().is_cancelled() && checkpoints {
                // A spot notice: save where we are and hand the job back at once.
                if Self::save(&job, at).await? {
                    event(json!({"event": "interrupted", "id": id, "next": at.next}));
                    return Err(JobError::interrupted(format!(
                        "stopped at item {} of {items}",
                        at.next
                    )));
                }
                checkpoints = false;
            }
            if job.ctx().is_cancelled() {
                return Err(JobError::retry("cancelled"));
            }
            at.acc = work_item(at.acc, seed, at.next);
            at.next += 1;
            if job.payload.item_ms > 0 {
                tokio::time::sleep(Duration::from_millis(job.payload.item_ms)).await;
            }
            if checkpoints && at.next < items && at.next % self.checkpoint_every == 0 {
                checkpoints = Self::save(&job, at).await?;
            }
        }
        event(
            json!({"event": "end", "id": id, "items": items, "from": from.next,
                     "done": items - from.next, "acc": at.acc}),
        );
        Ok(())
    }
}

/// A positive integer from `name`, or `default` when unset.
fn positive_env(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{name}={v:?} is not valid: expected a whole number of items above 0, e.g. {name}=100")),
        },
    }
}

/// Small jobs and a few long ones for the in-memory broker.
fn sample_jobs(queue: &str) -> Result<Vec<NewJob>, serde_json::Error> {
    let mut jobs = Vec::new();
    for i in 0..2_000u64 {
        jobs.push(NewJob::json(queue, &json!({"items": 4, "seed": i}))?);
    }
    for i in 0..4u64 {
        jobs.push(NewJob::json(
            queue,
            &json!({"items": 1_000, "item_ms": 10, "seed": 100 + i}),
        )?);
    }
    Ok(jobs)
}

#[tokio::main]
async fn main() -> ExitCode {
    example_support::init_tracing();
    let checkpoint_every = match positive_env("CHECKPOINT_EVERY", DEFAULT_CHECKPOINT_EVERY) {
        Ok(n) => n,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let config = match example_support::config_from_env_with_concurrency(DEFAULT_CONCURRENCY) {
        Ok(c) => c,
        Err(code) => return code,
    };
    tracing::info!(
        concurrency = config.concurrency,
        checkpoint_every,
        drain_timeout = ?config.drain_timeout,
        "batch pool"
    );
    let samples = |queue: &str| sample_jobs(queue).map_err(|e| e.to_string());
    let connected = match example_support::connect_with_samples(&config, samples).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let handler = Batch { checkpoint_every };
    let worker = Worker::with_shared_broker(connected.broker.clone(), config.clone(), handler);
    example_support::finish(worker.run_until_signal().await, &connected, &config).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_from_a_position_gives_the_same_result() {
        let whole = (0..50).fold(0, |acc, i| work_item(acc, 7, i));
        let half = (0..20).fold(0, |acc, i| work_item(acc, 7, i));
        let resumed = (20..50).fold(half, |acc, i| work_item(acc, 7, i));
        assert_eq!(whole, resumed);
        assert_ne!(whole, (0..50).fold(0, |acc, i| work_item(acc, 8, i)));
    }

    #[test]
    fn a_position_round_trips_as_json() {
        let p = Position {
            next: 3,
            acc: u64::MAX,
        };
        let back: Position =
            serde_json::from_slice(&serde_json::to_vec(&p).unwrap_or_default()).unwrap_or_default();
        assert_eq!(p, back);
    }
}
