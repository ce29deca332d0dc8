//! What the example workers share: their logging, the broker chosen from the
//! environment, the JSON event lines they print for tests, and their exit codes.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use worker_core::{Broker, FetchPlan, MemoryBroker, NewJob, RunReport, WorkerConfig, WorkerError};

/// Logs to stderr at `info` (or `RUST_LOG`), with lapin's own lines off: it logs the
/// broker's routine "no such queue" answer to a passive declare as an error, and
/// worker-amqp logs what matters from the connection.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=off".into()),
        )
        .init();
}

/// The broker a worker runs on.
pub struct Connected {
    /// The broker.
    pub broker: Arc<dyn Broker>,
    /// The in-memory broker when no broker variable is set (it dies
    /// with the process, so the worker reports what it still holds).
    pub memory: Option<MemoryBroker>,
}

/// Redis when `REDIS_URL` or `REDIS_CLUSTER_NODES` is set (the other `REDIS_*`
/// settings, see `worker_redis::RedisConfig::from_env`), RabbitMQ when `AMQP_URL` is
/// set (the other `AMQP_*` settings, see `worker_amqp::AmqpConfig::from_env`), else
/// the embedded in-memory broker. The error says which variable is wrong (both
/// brokers set, or a bad value).
pub async fn broker_from_env(config: &WorkerConfig) -> Result<Connected, String> {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    let redis = set("REDIS_URL") || set("REDIS_CLUSTER_NODES");
    match (redis, set("AMQP_URL")) {
        (true, true) => Err(
            "both REDIS_URL (or REDIS_CLUSTER_NODES) and AMQP_URL are set: \
                             set the one broker to use"
                .into(),
        ),
        (true, false) => {
            let redis = worker_redis::RedisConfig::from_env()
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| format!("redis: {e}"))?;
            Ok(Connected {
                broker: Arc::new(redis),
                memory: None,
            })
        }
        (false, true) => {
            let amqp = worker_amqp::AmqpConfig::from_env()
                .map_err(|e| format!("AMQP_URL: {e}"))?
                .worker(config)
                .connect()
                .await
                .map_err(|e| format!("AMQP_URL: {e}"))?;
            Ok(Connected {
                broker: Arc::new(amqp),
                memory: None,
            })
        }
        (false, false) => {
            let memory = MemoryBroker::new();
            Ok(Connected {
                broker: Arc::new(memory.clone()),
                memory: Some(memory),
            })
        }
    }
}

/// The worker's configuration from the environment; on an error, logs it (it names
/// the variable and the accepted form) and gives exit code 2.
pub fn config_from_env() -> Result<WorkerConfig, ExitCode> {
    WorkerConfig::from_env().map_err(|e| {
        tracing::error!("{e}");
        ExitCode::from(2)
    })
}

/// [`config_from_env`], with `concurrency` when `WORKER_CONCURRENCY` is not set (a
/// pool whose own settings decide how many jobs it can run).
pub fn config_from_env_with_concurrency(concurrency: u32) -> Result<WorkerConfig, ExitCode> {
    let mut config = config_from_env()?;
    if std::env::var_os("WORKER_CONCURRENCY").is_none() {
        config.concurrency = concurrency;
    }
    Ok(config)
}

/// The broker of [`broker_from_env`] (exit code 2 on an error, logged). On the
/// in-memory broker it also stores `samples(first queue)`, so the example has work
/// to show; exit code 1 when they cannot be made or stored.
pub async fn connect_with_samples<F>(
    config: &WorkerConfig,
    samples: F,
) -> Result<Connected, ExitCode>
where
    F: FnOnce(&str) -> Result<Vec<NewJob>, String>,
{
    let connected = broker_from_env(config).await.map_err(|e| {
        tracing::error!("{e}");
        ExitCode::from(2)
    })?;
    if connected.memory.is_some() {
        let queue = config.queue_names().into_iter().next().unwrap_or_default();
        let stored = match samples(&queue) {
            Ok(jobs) => connected
                .broker
                .enqueue(jobs)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            tracing::error!("cannot seed the in-memory broker: {e}");
            return Err(ExitCode::from(1));
        }
    }
    Ok(connected)
}

/// Print one event line on stdout (system tests follow them).
pub fn event(value: Value) {
    println!("{value}");
}

/// A run report as JSON.
pub fn report_json(r: &RunReport) -> Value {
    json!({"ok": r.ok, "retried": r.retried, "dead": r.dead, "released": r.released,
           "failed": r.failed, "clean_drain": r.clean_drain})
}

/// What is left in an in-memory broker at exit: each queue's depth, the attempt
/// number of every pending job, and the dead letters with their reasons.
pub async fn leftovers(broker: &MemoryBroker, config: &WorkerConfig) -> Value {
    let mut queues = serde_json::Map::new();
    for q in config.queue_names() {
        let depth = broker.depth(&q).await.ok();
        let plan = FetchPlan::single(&q, u32::MAX, Duration::from_secs(60));
        let pending = broker.fetch(&plan).await.unwrap_or_default();
        let attempts: Vec<Value> = pending
            .iter()
            .map(|d| json!({"id": d.envelope.id.as_str(), "attempt": d.envelope.attempt}))
            .collect();
        for d in &pending {
            let _ = broker.release(&d.lease).await;
        }
        let dead: Vec<Value> = broker
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
    Value::Object(queues)
}

/// Print the `stopped` event and choose the exit code: 0 after a drain, 2 for a
/// configuration error, 1 when the worker failed otherwise.
pub async fn finish(
    result: Result<RunReport, WorkerError>,
    connected: &Connected,
    config: &WorkerConfig,
) -> ExitCode {
    match result {
        Ok(report) => {
            let queues = match &connected.memory {
                Some(memory) => leftovers(memory, config).await,
                None => Value::Null,
            };
            event(json!({"event": "stopped", "report": report_json(&report), "queues": queues}));
            ExitCode::SUCCESS
        }
        // Configuration found wrong only at start (a service-account file the
        // pod-deletion cost needs) exits like any other configuration error.
        Err(e @ WorkerError::Config(_)) => {
            tracing::error!("{e}");
            ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}
