//! Drain throughput: N jobs enqueued first, then drained by concurrency C in one
//! process or P processes; jobs/s from the first start to the last ack. The raw
//! loop drains the same N items in the same run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::backend::{connect, fill, namespace, redis_cpu_seconds, Kind, Probe, Raw, Urls};
use crate::child::{framework_worker, raw_drain_consumers, report, Child, Pool};
use crate::clock::now_ns;
use crate::report::{median, Table};
use crate::Result;

/// One drain's shape.
#[derive(Clone, Debug, clap::Args)]
pub struct DrainArgs {
    /// Jobs per run.
    #[arg(long, default_value_t = 20_000)]
    pub jobs: u64,
    /// Concurrency per process (several: a comma-separated list).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 4, 16, 64])]
    pub concurrency: Vec<u32>,
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    pub processes: u32,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Handler sleep, ms (0: a no-op handler).
    #[arg(long, default_value_t = 0)]
    pub sleep_ms: u64,
    /// Framework prefetch: jobs fetched ahead of free permits (`WORKER_PREFETCH`). The
    /// raw RabbitMQ consumer's prefetch is the framework's total, C plus this.
    #[arg(long, default_value_t = 0)]
    pub prefetch: u32,
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Run only one side (for profiling one of them); the other reads 0.
    #[arg(long, value_enum)]
    pub only: Option<Side>,
}

/// The framework or the raw loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    /// The framework.
    Framework,
    /// The raw loop.
    Raw,
}

/// One drain's figures.
#[derive(Clone, Copy, Debug)]
pub struct Drain {
    /// Jobs/s from the first start to the last ack.
    pub rate: f64,
    /// The Redis server's CPU per job over the drain (the enqueue before it left
    /// out), µs; `None` off Redis.
    pub redis_us_per_job: Option<f64>,
}

/// Throughput at one concurrency: framework and raw medians.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Point {
    /// Backend.
    pub backend: &'static str,
    /// Concurrency per process.
    pub concurrency: u32,
    /// Processes.
    pub processes: u32,
    /// Framework jobs/s, median.
    pub framework: f64,
    /// Raw loop jobs/s, median.
    pub raw: f64,
    /// Every framework run.
    pub framework_runs: Vec<f64>,
    /// Every raw run.
    pub raw_runs: Vec<f64>,
    /// The Redis server's CPU per job while the framework drained, µs, median.
    pub framework_redis_us: Option<f64>,
    /// The same for the raw loop.
    pub raw_redis_us: Option<f64>,
}

impl Point {
    /// framework / raw.
    pub fn ratio(&self) -> f64 {
        self.framework / self.raw
    }
}

/// Run the drain scenario for every concurrency in `args`, alternating framework
/// and raw runs so drift on a shared machine falls on both alike.
pub async fn run(kind: Kind, urls: &Urls, args: &DrainArgs) -> Result<Vec<Point>> {
    if kind == Kind::Memory && args.processes > 1 {
        return Err("the in-memory broker lives in one process: use --processes 1".into());
    }
    let mut points = Vec::new();
    for &c in &args.concurrency {
        let (mut fw, mut raw) = (Vec::new(), Vec::new());
        for _ in 0..args.runs {
            if args.only != Some(Side::Raw) {
                fw.push(framework(kind, urls, args, c).await?);
            }
            if args.only != Some(Side::Framework) {
                raw.push(raw_loop(kind, urls, args, c).await?);
            }
        }
        let rates = |d: &[Drain]| d.iter().map(|d| d.rate).collect::<Vec<_>>();
        let cpu = |d: &[Drain]| {
            let v: Option<Vec<f64>> = d.iter().map(|d| d.redis_us_per_job).collect();
            v.filter(|v| !v.is_empty()).map(|v| median(&v))
        };
        points.push(Point {
            backend: kind.name(),
            concurrency: c,
            processes: args.processes,
            framework: median(&rates(&fw)),
            raw: median(&rates(&raw)),
            framework_runs: rates(&fw),
            raw_runs: rates(&raw),
            framework_redis_us: cpu(&fw),
            raw_redis_us: cpu(&raw),
        });
    }
    let mut table = Table::new(&[
        "backend",
        "C",
        "P",
        "framework jobs/s",
        "raw jobs/s",
        "ratio",
        "redis µs/job fw",
        "raw",
    ]);
    let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    for p in &points {
        table.row(vec![
            p.backend.to_string(),
            p.concurrency.to_string(),
            p.processes.to_string(),
            format!("{:.0}", p.framework),
            format!("{:.0}", p.raw),
            format!("{:.3}", p.ratio()),
            us(p.framework_redis_us),
            us(p.raw_redis_us),
        ]);
    }
    println!(
        "drain throughput: {} jobs of {} B, handler sleep {} ms, prefetch {}, median of {} runs",
        args.jobs, args.payload, args.sleep_ms, args.prefetch, args.runs
    );
    table.print();
    println!(
        "{}",
        json!({"scenario": "throughput", "backend": kind.name(), "jobs": args.jobs,
            "payload": args.payload, "sleep_ms": args.sleep_ms, "prefetch": args.prefetch,
            "points": points})
    );
    Ok(points)
}

/// A drain's figures: its rate, and the Redis server's CPU per job since `cpu_before`.
async fn drain(kind: Kind, urls: &Urls, rate: f64, jobs: u64, cpu_before: Option<f64>) -> Drain {
    let after = redis_cpu_seconds(kind, urls).await;
    Drain {
        rate,
        redis_us_per_job: cpu_before
            .zip(after)
            .map(|(b, a)| (a - b) * 1e6 / jobs.max(1) as f64),
    }
}

fn rate(jobs: u64, from_ns: u64, to_ns: u64) -> Result<f64> {
    if to_ns <= from_ns {
        return Err("the run recorded no time between first start and last ack".into());
    }
    Ok(jobs as f64 / ((to_ns - from_ns) as f64 / 1e9))
}

/// One framework drain.
pub async fn framework(kind: Kind, urls: &Urls, args: &DrainArgs, c: u32) -> Result<Drain> {
    let prefix = namespace("drain");
    let queue = "drain";
    let broker = connect(kind, urls, &prefix, c + args.prefetch).await?;
    fill(broker.as_ref(), queue, args.jobs, args.payload).await?;
    let cpu = redis_cpu_seconds(kind, urls).await;
    if args.processes > 1 {
        let r = framework_processes(kind, urls, args, c, &prefix, queue, broker).await?;
        return Ok(drain(kind, urls, r, args.jobs, cpu).await);
    }
    let probe = Probe::new(broker, args.jobs, 0);
    let first = Arc::new(AtomicU64::new(0));
    let f = first.clone();
    let worker = framework_worker(
        probe.clone(),
        queue,
        Pool {
            prefetch: args.prefetch,
            sleep_ms: args.sleep_ms,
            ..Pool::new(c)
        },
        move |_| {
            let _ = f.compare_exchange(0, now_ns(), Ordering::AcqRel, Ordering::Acquire);
        },
        |_| {},
    )?
    .spawn()
    .await?;
    probe.wait(Duration::from_secs(600)).await?;
    worker.shutdown_handle().drain();
    worker.join().await?;
    let r = rate(
        args.jobs,
        first.load(Ordering::Acquire),
        probe.last_ack_ns(),
    )?;
    Ok(drain(kind, urls, r, args.jobs, cpu).await)
}

async fn framework_processes(
    kind: Kind,
    urls: &Urls,
    args: &DrainArgs,
    c: u32,
    prefix: &str,
    queue: &str,
    broker: Arc<dyn worker_core::Broker>,
) -> Result<f64> {
    let mut children = Vec::new();
    for _ in 0..args.processes {
        children.push(Child::spawn(
            &[
                vec!["worker".into(), "--backend".into(), kind.name().into()],
                urls.args(),
                vec![
                    "--prefix".into(),
                    prefix.into(),
                    "--queue".into(),
                    queue.into(),
                    "--concurrency".into(),
                    c.to_string(),
                    "--sleep-ms".into(),
                    args.sleep_ms.to_string(),
                    "--prefetch".into(),
                    args.prefetch.to_string(),
                ],
            ]
            .concat(),
        )?);
    }
    // The workers do not know when the others are done: watch the queue empty.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let d = broker.depth(queue).await?;
        if d.backlog() == 0 && d.delayed == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err("the processes did not drain the queue within 600 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    collect(children, true, args.jobs).await
}

/// One raw-loop drain.
pub async fn raw_loop(kind: Kind, urls: &Urls, args: &DrainArgs, c: u32) -> Result<Drain> {
    let name = namespace("raw");
    let raw = Raw::new(kind, urls, &name, c + args.prefetch).await?;
    let item = vec![b'x'; args.payload.max(1)];
    // Every item distinct, as real payloads are (LREM compares bytes).
    let items = (0..args.jobs)
        .map(|i| {
            let mut v = item.clone();
            let tag = i.to_string();
            let n = tag.len().min(v.len());
            v[..n].copy_from_slice(&tag.as_bytes()[..n]);
            v
        })
        .collect();
    raw.push(items).await?;
    let cpu = redis_cpu_seconds(kind, urls).await;
    if args.processes > 1 {
        let mut children = Vec::new();
        for _ in 0..args.processes {
            children.push(Child::spawn(
                &[
                    vec!["raw-worker".into(), "--backend".into(), kind.name().into()],
                    urls.args(),
                    vec![
                        "--name".into(),
                        name.clone(),
                        "--concurrency".into(),
                        c.to_string(),
                        "--sleep-ms".into(),
                        args.sleep_ms.to_string(),
                        "--prefetch".into(),
                        args.prefetch.to_string(),
                    ],
                ]
                .concat(),
            )?);
        }
        let r = collect(children, false, args.jobs).await?;
        return Ok(drain(kind, urls, r, args.jobs, cpu).await);
    }
    let t = raw_drain_consumers(&raw, c, args.sleep_ms, now_ns).await?;
    if t.acked != args.jobs {
        return Err(format!("raw: {} of {} items were acked", t.acked, args.jobs).into());
    }
    let r = rate(t.acked, t.first_start, t.last_ack)?;
    Ok(drain(kind, urls, r, args.jobs, cpu).await)
}

/// Stop (when `term`) and wait for every child; jobs/s from the earliest first start
/// to the latest last ack over all of them.
async fn collect(children: Vec<Child>, term: bool, jobs: u64) -> Result<f64> {
    let (mut first, mut last, mut acked) = (u64::MAX, 0, 0);
    for child in children {
        if term {
            child.signal("TERM").await?;
        }
        let (_, lines) = child.wait(Duration::from_secs(600)).await?;
        let r = report(&lines)?;
        let f = r["first_start_unix_ns"].as_u64().unwrap_or(0);
        if f > 0 {
            first = first.min(f);
        }
        last = last.max(r["last_ack_unix_ns"].as_u64().unwrap_or(0));
        acked += r["acked"].as_u64().unwrap_or(0);
    }
    if acked != jobs {
        return Err(format!("{acked} of {jobs} jobs were acked").into());
    }
    rate(acked, first, last)
}
