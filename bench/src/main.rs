//! Run with: `cargo run --release -p bench -- idle-latency`
//!
//! Benchmarks of the worker runtime. Each scenario prints a table and a final
//! machine-readable JSON line.
//!
//! * `idle-latency`: an idle pool on Redis; jobs enqueued one at a time at a fixed
//!   interval; the time from the start of each enqueue call to the start of its
//!   handler (p50 / p90 / p99 / max).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use worker_core::{handler_fn, Broker, Job, JobError, NewJob, Worker, WorkerConfig};
use worker_redis::RedisConfig;

#[derive(Parser)]
#[command(about = "Benchmarks of the worker runtime")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Enqueue-to-start latency on an idle Redis pool.
    IdleLatency {
        /// Redis URL.
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis: String,
        /// Jobs to send.
        #[arg(long, default_value_t = 500)]
        jobs: u64,
        /// Pause between two jobs, in milliseconds (long enough for the pool to go idle).
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
        /// Worker concurrency.
        #[arg(long, default_value_t = 4)]
        concurrency: u32,
    },
}

static ORIGIN: OnceLock<Instant> = OnceLock::new();

fn since_origin() -> u64 {
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    match Cli::parse().scenario {
        Scenario::IdleLatency {
            redis,
            jobs,
            interval_ms,
            concurrency,
        } => idle_latency(&redis, jobs, interval_ms, concurrency).await,
    }
}

async fn idle_latency(
    url: &str,
    jobs: u64,
    interval_ms: u64,
    concurrency: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    let prefix = format!("bench-{}", std::process::id());
    let broker = Arc::new(RedisConfig::new(url).prefix(&prefix).connect().await?);
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let h = hist.clone();
    let handler = handler_fn(move |job: Job<u64>| {
        let latency = since_origin().saturating_sub(job.payload);
        if let Ok(mut h) = h.lock() {
            let _ = h.record(latency);
        }
        async { Ok::<_, JobError>(()) }
    });
    let config = WorkerConfig::builder()
        .pool("bench")
        .queue("latency")
        .concurrency(concurrency)
        .http_addr(None)
        .build()?;
    let worker = Worker::with_shared_broker(broker.clone(), config, handler)
        .spawn()
        .await?;
    // Let the worker subscribe and go idle before the first job.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..jobs {
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
        let sent = since_origin();
        broker
            .enqueue(vec![NewJob::json("latency", &sent)?])
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while hist.lock().map(|h| h.len()).unwrap_or(0) < jobs && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    worker.shutdown_handle().drain();
    worker.join().await?;
    let h = hist.lock().map_err(|_| "histogram lock poisoned")?.clone();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e6;
    println!(
        "idle-latency on {url}: {} jobs, one every {interval_ms} ms, concurrency {concurrency}",
        h.len()
    );
    println!(
        "{:>10} {:>10} {:>10} {:>10}",
        "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    println!(
        "{:>10.3} {:>10.3} {:>10.3} {:>10.3}",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        h.max() as f64 / 1e6
    );
    println!(
        "{}",
        serde_json::json!({"scenario": "idle-latency", "backend": "redis", "jobs": h.len(),
            "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "max_ms": h.max() as f64 / 1e6})
    );
    Ok(())
}
