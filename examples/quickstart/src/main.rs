//! Run with: `cargo run -p quickstart`
//!
//! Enqueues a few jobs, runs a worker on them, prints each outcome, and exits 0 once
//! every job is settled. Uses Redis when `REDIS_URL` is set, RabbitMQ when `AMQP_URL`
//! is set, else the embedded in-memory broker.

use std::sync::Arc;
use std::time::Duration;

use worker_core::{handler_fn, Broker, Job, JobError, MemoryBroker, NewJob, Worker, WorkerConfig};

#[derive(serde::Deserialize, serde::Serialize)]
struct Greeting {
    name: String,
    /// Fail this many attempts before succeeding, to show retries.
    flaky: u32,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,worker_core=warn".into()),
        )
        .init();

    let broker: Arc<dyn Broker> = if let Ok(url) = std::env::var("REDIS_URL") {
        Arc::new(worker_redis::RedisBroker::connect(&url).await?)
    } else if std::env::var_os("AMQP_URL").is_some() {
        Arc::new(worker_amqp::AmqpConfig::from_env()?.connect().await?)
    } else {
        Arc::new(MemoryBroker::new())
    };
    let mut jobs = Vec::new();
    for (name, flaky) in [("Ada", 0), ("Grace", 1), ("Linus", 0), ("Barbara", 2)] {
        jobs.push(NewJob::json(
            "greetings",
            &Greeting {
                name: name.into(),
                flaky,
            },
        )?);
    }
    jobs.push(NewJob::new("greetings", "this is not JSON"));
    let ids = broker.enqueue(jobs).await?;

    let config = WorkerConfig::builder()
        .pool("quickstart")
        .queue("greetings")
        .concurrency(2)
        .backoff(worker_core::Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(200),
        ))
        .http_addr(None)
        .build()?;
    let handler = handler_fn(|job: Job<Greeting>| async move {
        if job.ctx.attempt() <= job.payload.flaky {
            tracing::info!(name = %job.payload.name, attempt = job.ctx.attempt(), "flaky failure");
            return Err(JobError::retry("flaky on purpose"));
        }
        tracing::info!(name = %job.payload.name, attempt = job.ctx.attempt(), "hello");
        Ok(())
    });
    let worker = Worker::with_shared_broker(broker.clone(), config, handler)
        .spawn()
        .await?;

    while broker.depth("greetings").await?.backlog() + broker.depth("greetings").await?.delayed > 0
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.shutdown_handle().drain();
    let report = worker.join().await?;
    tracing::info!(
        ok = report.ok,
        retried = report.retried,
        dead = report.dead,
        "all jobs settled"
    );
    // This run's dead letters (a broker that outlives the example keeps earlier runs').
    for dead in broker.dead_letters("greetings", 1000).await? {
        if ids.contains(&dead.envelope.id) {
            tracing::info!(id = %dead.envelope.id, reason = %dead.reason, "dead letter");
        }
    }
    broker.close().await;
    Ok(())
}
