//! Run with: `cargo run -p demo-worker`
//!
//! A worker whose handler does what each job's JSON payload says:
//! `{"sleep_ms": u64, "outcome": "ok"|"retry"|"fatal"|"panic", "fail_times": u32,
//! "cost": u32, "queue": "name"}` (every field optional; `fail_times: n` asks for a
//! retry on attempts 1 to n, then `outcome`). Configured entirely from the environment (`WORKER_*`).
//!
//! With `REDIS_URL` set it consumes the Redis queues (key prefix `REDIS_PREFIX`,
//! default `wp`); with `AMQP_URL` set, the RabbitMQ queues (`AMQP_*` settings, see
//! `worker_amqp::AmqpConfig::from_env`); otherwise it runs on the embedded in-memory
//! broker. Either way it
//! first enqueues `DEMO_JOBS` if given (a JSON array of such payloads; `queue` picks
//! the queue, default the first of `WORKER_QUEUES`, and `cost` is the job's budget cost).
//!
//! It prints one JSON line per event on stdout — `start` and `end` per job (`end` as
//! the handler returns, before the outcome is recorded), `settled` per job once the
//! broker confirmed its outcome (`{"event":"settled","id","queue","attempt","outcome"}`,
//! `outcome` one of `ok`, `retried`, `dead`, `released`, `failed`; see
//! `Worker::on_settled`), and `stopped` with the run report and the jobs left in the
//! broker — so system tests can follow it; logs go to stderr. It exits 0 after a drain, 2 on a configuration
//! error, 1 when the worker failed otherwise.

use std::process::ExitCode;
use std::time::Duration;

use example_support::event;
use serde::Deserialize;
use serde_json::json;
use worker_core::{async_trait, Broker, Handler, Job, JobError, NewJob, Worker, WorkerConfig};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Payload {
    sleep_ms: u64,
    outcome: Outcome,
    fail_times: u32,
    cost: u32,
    queue: Option<String>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Outcome {
    #[default]
    Ok,
    Retry,
    Fatal,
    Panic,
}

struct Demo;

#[async_trait]
impl Handler for Demo {
    type Payload = Payload;

    async fn handle(&self, job: Job<Payload>) -> Result<(), JobError> {
        let ctx = job.ctx();
        event(
            json!({"event": "start", "id": ctx.id().as_str(), "queue": ctx.queue(), "attempt": ctx.attempt()}),
        );
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(job.payload.sleep_ms)) => {}
            _ = ctx.cancellation().cancelled() => {
                event(json!({"event": "cancelled", "id": ctx.id().as_str(), "attempt": ctx.attempt()}));
                return Err(JobError::retry("cancelled"));
            }
        }
        let result = match job.payload.outcome {
            _ if ctx.attempt() <= job.payload.fail_times => Err(JobError::retry("asked to retry")),
            Outcome::Ok => Ok(()),
            Outcome::Retry => Err(JobError::retry("asked to retry")),
            Outcome::Fatal => Err(JobError::fatal("asked to fail")),
            Outcome::Panic => panic!("asked to panic"),
        };
        event(
            json!({"event": "end", "id": ctx.id().as_str(), "queue": ctx.queue(), "attempt": ctx.attempt(), "ok": result.is_ok()}),
        );
        result
    }
}

fn seed_jobs(config: &WorkerConfig) -> Result<Vec<NewJob>, String> {
    let Ok(raw) = std::env::var("DEMO_JOBS") else {
        return Ok(Vec::new());
    };
    let items: Vec<serde_json::Value> = serde_json::from_str(&raw)
        .map_err(|e| format!("DEMO_JOBS is invalid: expected a JSON array of payloads ({e})"))?;
    let default_queue = config.queues[0].name.clone();
    Ok(items
        .into_iter()
        .map(|item| {
            let queue = item
                .get("queue")
                .and_then(|q| q.as_str())
                .map_or_else(|| default_queue.clone(), str::to_owned);
            let cost = item.get("cost").and_then(|c| c.as_u64()).unwrap_or(0) as u32;
            // Seeded payloads are passed through as given, even ones the handler cannot
            // decode: that is how the dead-lettering of bad payloads is exercised.
            let bytes = match &item {
                serde_json::Value::String(s) => s.clone().into_bytes(),
                other => other.to_string().into_bytes(),
            };
            NewJob::new(queue, bytes).cost(cost)
        })
        .collect())
}

#[tokio::main]
async fn main() -> ExitCode {
    example_support::init_tracing();
    let config = match WorkerConfig::from_env() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let connected = match example_support::broker_from_env(&config).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let broker = connected.broker.clone();
    let jobs = match seed_jobs(&config) {
        Ok(jobs) => jobs,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    if !jobs.is_empty() {
        let n = jobs.len();
        if let Err(e) = broker.enqueue(jobs).await {
            tracing::error!(error = %e, "cannot seed DEMO_JOBS");
            return ExitCode::from(2);
        }
        tracing::info!(jobs = n, "seeded the broker from DEMO_JOBS");
    }
    let worker = Worker::with_shared_broker(broker, config.clone(), Demo).on_settled(|s| {
        event(
            json!({"event": "settled", "id": s.id.as_str(), "queue": s.queue,
                     "attempt": s.attempt, "outcome": s.outcome.as_str()}),
        );
    });
    example_support::finish(worker.run_until_signal().await, &connected, &config).await
}
