//! Benchmarks of the worker runtime, each against the raw broker loop in the same run.
//!
//! ```sh
//! cargo build --release -p bench
//! target/release/bench all --backend memory,redis,amqp # every scenario, ~15 min
//! target/release/bench all --backend redis --quick     # a smoke run, under a minute
//! target/release/bench throughput --backend redis --concurrency 16 --jobs 50000
//! ```
//!
//! Scenarios (each prints a table, then one JSON line):
//!
//! * `throughput` — N jobs enqueued first, drained by concurrency C (in P processes);
//!   jobs/s from the first start to the last ack, beside the raw loop's.
//! * `latency` — open loop at fractions of the maximum rate; scheduled-arrival to
//!   start and to ack, p50 / p99 / p99.9 / max, beside the raw loop's.
//! * `idle` — a worker process with nothing to do: CPU and broker commands per second.
//! * `memory` — peak RSS of a worker process at C jobs in flight.
//! * `drain-time` — SIGTERM with C jobs in flight: exit time after the last one ends.
//!
//! The raw loop is what a careful engineer writes by hand without a framework:
//! see [`backend::Raw`].

mod backend;
mod child;
mod clock;
mod latency;
mod report;
mod resources;
mod throughput;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use backend::{Kind, Urls};

/// Any error, boxed: a benchmark reports it and exits non-zero.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Parser)]
#[command(about = "Benchmarks of the worker runtime against the raw broker loop")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Every scenario on every named backend, and the throughput chart.
    All {
        /// Backends (comma-separated).
        #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![Kind::Memory, Kind::Redis, Kind::Amqp])]
        backend: Vec<Kind>,
        #[command(flatten)]
        urls: Urls,
        /// Small sizes and one run each: a smoke run in under a minute.
        #[arg(long)]
        quick: bool,
        /// Where to draw the throughput chart (not drawn in quick mode).
        #[arg(long, default_value = "bench/throughput.png")]
        chart: PathBuf,
    },
    /// Drain throughput against the raw loop.
    Throughput {
        /// Backend.
        #[arg(long, value_enum)]
        backend: Kind,
        #[command(flatten)]
        urls: Urls,
        #[command(flatten)]
        drain: throughput::DrainArgs,
        /// Also draw the chart here.
        #[arg(long)]
        chart: Option<PathBuf>,
    },
    /// Open-loop latency against the raw loop.
    Latency {
        /// Backend.
        #[arg(long, value_enum)]
        backend: Kind,
        #[command(flatten)]
        urls: Urls,
        #[command(flatten)]
        args: latency::LatencyArgs,
    },
    /// CPU and broker commands of an idle worker process.
    Idle {
        /// Backend.
        #[arg(long, value_enum)]
        backend: Kind,
        #[command(flatten)]
        urls: Urls,
        /// Seconds to watch.
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        /// Worker concurrency.
        #[arg(long, default_value_t = 16)]
        concurrency: u32,
    },
    /// Peak RSS of a worker process under load.
    Memory {
        /// Backend.
        #[arg(long, value_enum)]
        backend: Kind,
        #[command(flatten)]
        urls: Urls,
        /// Jobs in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: u32,
        /// Payload bytes.
        #[arg(long, default_value_t = 1024)]
        payload: usize,
        /// Jobs to run.
        #[arg(long, default_value_t = 2560)]
        jobs: u64,
    },
    /// Exit time after SIGTERM with jobs in flight.
    DrainTime {
        /// Backend.
        #[arg(long, value_enum)]
        backend: Kind,
        #[command(flatten)]
        urls: Urls,
        /// Jobs in flight.
        #[arg(long, default_value_t = 16)]
        concurrency: u32,
        /// Each job's length, ms.
        #[arg(long, default_value_t = 500)]
        sleep_ms: u64,
        /// Runs (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
    /// From a worker process's start to its first job, with jobs waiting.
    ColdStart {
        /// Backend (redis or amqp).
        #[arg(long, value_enum)]
        backend: Kind,
        #[command(flatten)]
        urls: Urls,
        /// Jobs waiting, and the worker's concurrency.
        #[arg(long, default_value_t = 16)]
        concurrency: u32,
        /// Runs (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: u32,
    },
    /// Draw the throughput chart from a saved run's output (its JSON lines).
    Chart {
        /// The saved output of `bench all` or `bench throughput`.
        #[arg(long)]
        input: PathBuf,
        /// The PNG to write.
        #[arg(long, default_value = "bench/throughput.png")]
        output: PathBuf,
    },
    /// A framework worker process (used by the scenarios).
    #[command(hide = true)]
    Worker(child::WorkerArgs),
    /// A raw-loop consumer process (used by the scenarios).
    #[command(hide = true)]
    RawWorker(child::RawArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // The runtime's own warnings (RUST_LOG to see more), on stderr: stdout carries
    // the tables and the JSON lines.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse().scenario).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(scenario: Scenario) -> Result<()> {
    let urls = match &scenario {
        Scenario::All { urls, .. }
        | Scenario::Throughput { urls, .. }
        | Scenario::Latency { urls, .. }
        | Scenario::Idle { urls, .. }
        | Scenario::Memory { urls, .. }
        | Scenario::DrainTime { urls, .. }
        | Scenario::ColdStart { urls, .. } => Some(urls.clone()),
        Scenario::Worker(_) | Scenario::RawWorker(_) | Scenario::Chart { .. } => None,
    };
    let result = scenario_run(scenario).await;
    if let Some(urls) = urls {
        backend::cleanup(&urls).await;
    }
    result
}

async fn scenario_run(scenario: Scenario) -> Result<()> {
    match scenario {
        Scenario::All {
            backend,
            urls,
            quick,
            chart,
        } => all(&backend, &urls, quick, &chart).await,
        Scenario::Throughput {
            backend,
            urls,
            drain,
            chart,
        } => {
            let points = throughput::run(backend, &urls, &drain).await?;
            if let Some(path) = chart {
                report::chart(&points, &path)?;
            }
            Ok(())
        }
        Scenario::Latency {
            backend,
            urls,
            args,
        } => latency::run(backend, &urls, &args).await.map(drop),
        Scenario::Idle {
            backend,
            urls,
            seconds,
            concurrency,
        } => resources::idle(backend, &urls, seconds, concurrency)
            .await
            .map(drop),
        Scenario::Memory {
            backend,
            urls,
            concurrency,
            payload,
            jobs,
        } => resources::memory(backend, &urls, concurrency, payload, jobs)
            .await
            .map(drop),
        Scenario::DrainTime {
            backend,
            urls,
            concurrency,
            sleep_ms,
            runs,
        } => resources::drain_time(backend, &urls, concurrency, sleep_ms, runs)
            .await
            .map(drop),
        Scenario::ColdStart {
            backend,
            urls,
            concurrency,
            runs,
        } => resources::cold_start(backend, &urls, concurrency, runs)
            .await
            .map(drop),
        Scenario::Chart { input, output } => {
            let text = std::fs::read_to_string(&input)
                .map_err(|e| format!("cannot read {}: {e}", input.display()))?;
            let points = report::points_from(&text);
            if points.is_empty() {
                return Err(format!("no throughput points in {}", input.display()).into());
            }
            report::chart(&points, &output)
        }
        Scenario::Worker(args) => child::run_worker(args).await,
        Scenario::RawWorker(args) => child::run_raw_worker(args).await,
    }
}

/// Every scenario, backend after backend.
async fn all(backends: &[Kind], urls: &Urls, quick: bool, chart: &std::path::Path) -> Result<()> {
    let drain = throughput::DrainArgs {
        jobs: if quick { 2_000 } else { 20_000 },
        concurrency: if quick {
            vec![1, 16]
        } else {
            vec![1, 4, 16, 64]
        },
        processes: 1,
        payload: 100,
        sleep_ms: 0,
        prefetch: 0,
        runs: if quick { 1 } else { 3 },
        only: None,
    };
    let mut points = Vec::new();
    for &kind in backends {
        println!("\n=== {} ===", kind.name());
        let mine = throughput::run(kind, urls, &drain).await?;
        let max_rate = mine
            .iter()
            .find(|p| p.concurrency == 16)
            .map(|p| p.framework);
        points.extend(mine);
        if !quick {
            // The same pool fetching ahead: how much of the gap is pipeline depth. On
            // RabbitMQ, prefetch 100 in all, against a raw consumer with prefetch 100.
            let ahead = throughput::DrainArgs {
                concurrency: vec![16],
                prefetch: if kind == Kind::Amqp { 100 - 16 } else { 48 },
                ..drain.clone()
            };
            throughput::run(kind, urls, &ahead).await?;
        }
        let lat = latency::LatencyArgs {
            concurrency: 16,
            fractions: if quick {
                vec![0.5]
            } else {
                vec![0.25, 0.5, 0.9]
            },
            max_rate,
            seconds: if quick { 1.0 } else { 10.0 },
            payload: 100,
            only: None,
        };
        latency::run(kind, urls, &lat).await?;
        resources::idle(kind, urls, if quick { 3.0 } else { 30.0 }, 16).await?;
        resources::memory(kind, urls, 256, 1024, if quick { 512 } else { 2560 }).await?;
        if !quick {
            resources::memory(kind, urls, 256, 1 << 20, 512).await?;
        }
        resources::drain_time(
            kind,
            urls,
            16,
            if quick { 200 } else { 500 },
            if quick { 1 } else { 3 },
        )
        .await?;
        if kind != Kind::Memory {
            resources::cold_start(kind, urls, 16, if quick { 1 } else { 5 }).await?;
        }
    }
    if !quick {
        report::chart(&points, chart)?;
        println!("chart: {}", chart.display());
    }
    Ok(())
}
