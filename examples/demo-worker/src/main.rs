//! Run with: `cargo run -p demo-worker`
//!
//! A worker whose handler does what each job's JSON payload says:
//! `{"sleep_ms": u64, "outcome": "ok"|"retry"|"fatal"|"panic", "cost": u32, "queue": "name"}`
//! (every field optional). Configured entirely from the environment (`WORKER_*`).
//!
//! With `REDIS_URL` set it consumes the Redis queues (key prefix `REDIS_PREFIX`,
//! default `wp`); with `AMQP_URL` set, the RabbitMQ queues (`AMQP_*` settings, see
//! `worker_amqp::AmqpConfig::from_env`); otherwise it runs on the embedded in-memory
//! broker. Either way it
//! first enqueues `DEMO_JOBS` if given (a JSON array of such payloads; `queue` picks
//! the queue, default the first of `WORKER_QUEUES`, and `cost` is the job's budget cost).
//!
//! It prints one JSON line per event on stdout — `start` and `end` per job, and
//! `stopped` with the run report and the jobs left in the broker — so system tests
//! can follow it; logs go to stderr.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use worker_core::{
    async_trait, Broker, FetchPlan, Handler, Job, JobError, MemoryBroker, NewJob, RunReport,
    Worker, WorkerConfig,
};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Payload {
    sleep_ms: u64,
    outcome: Outcome,
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

fn event(value: serde_json::Value) {
    println!("{value}");
}

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
                event(json!({"event": "cancelled", "id": ctx.id().as_str()}));
                return Err(JobError::retry("cancelled"));
            }
        }
        let result = match job.payload.outcome {
            Outcome::Ok => Ok(()),
            Outcome::Retry => Err(JobError::retry("asked to retry")),
            Outcome::Fatal => Err(JobError::fatal("asked to fail")),
            Outcome::Panic => panic!("asked to panic"),
        };
        event(
            json!({"event": "end", "id": ctx.id().as_str(), "queue": ctx.queue(), "ok": result.is_ok()}),
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

/// What is left in the in-memory broker at exit: each queue's depth and the
/// attempt number of every pending job.
async fn leftovers(broker: &MemoryBroker, config: &WorkerConfig) -> serde_json::Value {
    let mut queues = serde_json::Map::new();
    for q in config.queue_names() {
        let depth = broker.depth(&q).await.ok();
        let plan = FetchPlan::single(&q, u32::MAX, Duration::from_secs(60));
        let pending = broker.fetch(&plan).await.unwrap_or_default();
        let attempts: Vec<serde_json::Value> = pending
            .iter()
            .map(|d| json!({"id": d.envelope.id.as_str(), "attempt": d.envelope.attempt}))
            .collect();
        for d in &pending {
            let _ = broker.release(&d.lease).await;
        }
        let dead: Vec<serde_json::Value> = broker
            .dead_letters(&q, usize::MAX)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|d| json!({"id": d.envelope.id.as_str(), "reason": d.reason}))
            .collect();
        queues.insert(
            q,
            json!({"depth": depth, "pending": attempts, "dead": dead}),
        );
    }
    serde_json::Value::Object(queues)
}

fn report_json(r: &RunReport) -> serde_json::Value {
    json!({"ok": r.ok, "retried": r.retried, "dead": r.dead, "released": r.released,
           "failed": r.failed, "clean_drain": r.clean_drain})
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            // lapin logs the broker's routine "no such queue" answer to a passive
            // declare as an error; worker-amqp logs what matters from the connection.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=off".into()),
        )
        .init();
    let config = match WorkerConfig::from_env() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let memory = MemoryBroker::new();
    let redis_url = std::env::var("REDIS_URL").ok();
    let amqp = std::env::var_os("AMQP_URL").is_some();
    let broker: Arc<dyn Broker> = match (redis_url, amqp) {
        (Some(_), true) => {
            tracing::error!("both REDIS_URL and AMQP_URL are set: set the one broker to use");
            return ExitCode::from(2);
        }
        (Some(url), false) => {
            let prefix = std::env::var("REDIS_PREFIX").unwrap_or_else(|_| "wp".into());
            match worker_redis::RedisConfig::new(url)
                .prefix(prefix)
                .connect()
                .await
            {
                Ok(redis) => Arc::new(redis),
                Err(e) => {
                    tracing::error!("REDIS_URL: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        (None, true) => {
            let connected = match worker_amqp::AmqpConfig::from_env() {
                Ok(c) => c.worker(&config).connect().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match connected {
                Ok(amqp) => Arc::new(amqp),
                Err(e) => {
                    tracing::error!("AMQP_URL: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        (None, false) => Arc::new(memory.clone()),
    };
    let in_memory = std::env::var_os("REDIS_URL").is_none() && !amqp;
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
    let worker = Worker::with_shared_broker(broker, config.clone(), Demo);
    match worker.run_until_signal().await {
        Ok(report) => {
            // The in-memory broker dies with the process: report what it still held.
            let queues = if in_memory {
                leftovers(&memory, &config).await
            } else {
                serde_json::Value::Null
            };
            event(json!({"event": "stopped", "report": report_json(&report), "queues": queues}));
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}
