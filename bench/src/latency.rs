//! Open-loop latency: jobs arrive on a fixed schedule (a fraction of the measured
//! maximum rate), each sent at its scheduled time by a producer thread, and every
//! latency is measured from the *scheduled* time, not the send time — a producer
//! that falls behind adds its lag to the figures instead of hiding the queueing
//! (no coordinated omission).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::json;
use worker_core::{Broker, NewJob};

use crate::backend::{connect, json_payload, namespace, Kind, Probe, Raw, Urls};
use crate::child::{framework_worker, Pool};
use crate::clock::now_ns;
use crate::report::{Percentiles, Table};
use crate::throughput::{self, DrainArgs, Side};
use crate::Result;

/// The open-loop scenario's shape.
#[derive(Clone, Debug, clap::Args)]
pub struct LatencyArgs {
    /// Worker concurrency.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u32,
    /// Arrival rates as fractions of the maximum (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![0.25, 0.5, 0.9])]
    pub fractions: Vec<f64>,
    /// The maximum rate, jobs/s; measured first (a framework drain) when absent.
    #[arg(long)]
    pub max_rate: Option<f64>,
    /// Seconds of arrivals per rate.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Payload bytes.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Run only one side (for profiling one of them); the other reads 0.
    #[arg(long, value_enum)]
    pub only: Option<Side>,
}

/// Latencies at one arrival rate.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LatencyPoint {
    /// Backend.
    pub backend: &'static str,
    /// Fraction of the maximum rate.
    pub fraction: f64,
    /// Arrivals per second.
    pub rate: f64,
    /// Jobs sent.
    pub jobs: u64,
    /// Framework: scheduled arrival to handler start.
    pub start: Percentiles,
    /// Framework: scheduled arrival to ack returned.
    pub ack: Percentiles,
    /// Raw loop: scheduled arrival to pop returned.
    pub raw_start: Percentiles,
    /// Raw loop: scheduled arrival to ack returned.
    pub raw_ack: Percentiles,
}

/// Run the scenario at each fraction of the maximum rate.
pub async fn run(kind: Kind, urls: &Urls, args: &LatencyArgs) -> Result<Vec<LatencyPoint>> {
    let max = match args.max_rate {
        Some(r) => r,
        None => {
            let drain = DrainArgs {
                jobs: (args.seconds * 2000.0).clamp(2000.0, 20_000.0) as u64,
                concurrency: vec![args.concurrency],
                processes: 1,
                payload: args.payload,
                sleep_ms: 0,
                prefetch: 0,
                runs: 1,
                only: None,
            };
            throughput::framework(kind, urls, &drain, args.concurrency)
                .await?
                .rate
        }
    };
    let mut points = Vec::new();
    for &fraction in &args.fractions {
        let rate = max * fraction;
        let jobs = ((rate * args.seconds) as u64).max(1);
        let (start, ack) = match args.only {
            Some(Side::Raw) => (Percentiles::default(), Percentiles::default()),
            _ => framework(kind, urls, args, rate, jobs).await?,
        };
        let (raw_start, raw_ack) = match args.only {
            Some(Side::Framework) => (Percentiles::default(), Percentiles::default()),
            _ => raw(kind, urls, args, rate, jobs).await?,
        };
        points.push(LatencyPoint {
            backend: kind.name(),
            fraction,
            rate,
            jobs,
            start,
            ack,
            raw_start,
            raw_ack,
        });
    }
    println!(
        "open-loop latency on {}: C = {}, maximum {max:.0} jobs/s, {} s per rate, ms from the scheduled arrival",
        kind.name(),
        args.concurrency,
        args.seconds
    );
    let mut table = Table::new(&["load", "jobs/s", "what", "p50", "p99", "p99.9", "max"]);
    for p in &points {
        for (what, pc) in [
            ("start", p.start),
            ("ack", p.ack),
            ("raw start", p.raw_start),
            ("raw ack", p.raw_ack),
        ] {
            let mut row = vec![
                format!("{:.0}%", p.fraction * 100.0),
                format!("{:.0}", p.rate),
                what.to_owned(),
            ];
            row.extend(pc.cells());
            table.row(row);
        }
    }
    table.print();
    println!(
        "{}",
        json!({"scenario": "latency", "backend": kind.name(), "concurrency": args.concurrency,
            "max_rate": max, "points": points})
    );
    Ok(points)
}

fn histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000_000, 3)?)
}

/// Send `jobs` arrivals, the i-th at `t0 + i / rate`, from a thread of its own that
/// sleeps until each time (to ~0.1 ms, finer than the async timer), calling `send(i)`
/// on the runtime. Stores `t0` (`now_ns` clock) before the first arrival and
/// returns it once the last one is sent.
async fn produce<F, Fut>(rate: f64, jobs: u64, t0: &AtomicU64, send: F) -> Result<u64>
where
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let rt = tokio::runtime::Handle::current();
    let start = now_ns() + 20_000_000;
    t0.store(start, Ordering::Release);
    let thread = std::thread::spawn(move || {
        for i in 0..jobs {
            let at = scheduled(start, rate, i);
            let now = now_ns();
            if at > now {
                std::thread::sleep(Duration::from_nanos(at - now));
            }
            rt.spawn(send(i));
        }
    });
    tokio::task::spawn_blocking(move || thread.join())
        .await?
        .map_err(|_| "the producer thread panicked")?;
    Ok(start)
}

fn scheduled(t0: u64, rate: f64, i: u64) -> u64 {
    t0 + (i as f64 * 1e9 / rate) as u64
}

async fn framework(
    kind: Kind,
    urls: &Urls,
    args: &LatencyArgs,
    rate: f64,
    jobs: u64,
) -> Result<(Percentiles, Percentiles)> {
    let prefix = namespace("latency");
    let queue = "latency";
    let inner = connect(kind, urls, &prefix, args.concurrency).await?;
    // A producer is another service with its own connection (the in-memory broker
    // can only be shared).
    let producer: Arc<dyn Broker> = match kind {
        Kind::Memory => inner.clone(),
        _ => connect(kind, urls, &prefix, 1).await?,
    };
    let probe = Probe::new(inner, jobs, jobs as usize);
    let starts = Arc::new(Mutex::new(histogram()?));
    let t0 = Arc::new(AtomicU64::new(0));
    let (s, t) = (starts.clone(), t0.clone());
    let worker = framework_worker(
        probe.clone(),
        queue,
        Pool::new(args.concurrency),
        move |id| {
            let now = now_ns();
            if let (Ok(i), Ok(mut h)) = (id.parse::<u64>(), s.lock()) {
                let at = scheduled(t.load(Ordering::Acquire), rate, i);
                let _ = h.record(now.saturating_sub(at).max(1));
            }
        },
        |_| {},
    )?
    .spawn()
    .await?;
    // Open the producer's connection (it connects on first use), and let the pool go
    // idle and subscribe, before the first arrival.
    producer.depth(queue).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let payload = json_payload(args.payload);
    let broker = producer;
    let failed = Arc::new(AtomicBool::new(false));
    let f = failed.clone();
    let start = produce(rate, jobs, &t0, move |i| {
        let (b, p, f) = (broker.clone(), payload.clone(), f.clone());
        async move {
            let job = NewJob::new("latency", p).id(i.to_string());
            if let Err(e) = b.enqueue(vec![job]).await {
                eprintln!("enqueue failed: {e}");
                f.store(true, Ordering::Release);
            }
        }
    })
    .await?;
    let waited = probe.wait(Duration::from_secs(60 + (jobs / 1000))).await;
    worker.shutdown_handle().drain();
    worker.join().await?;
    waited?;
    if failed.load(Ordering::Acquire) {
        return Err("some enqueues failed".into());
    }
    let mut acks = histogram()?;
    for i in 0..jobs {
        let at = probe.ack_at(i as usize);
        acks.record(at.saturating_sub(scheduled(start, rate, i)).max(1))?;
    }
    let starts = starts.lock().map_err(|_| "poisoned")?;
    Ok((Percentiles::of(&starts), Percentiles::of(&acks)))
}

async fn raw(
    kind: Kind,
    urls: &Urls,
    args: &LatencyArgs,
    rate: f64,
    jobs: u64,
) -> Result<(Percentiles, Percentiles)> {
    let raw = Raw::new(kind, urls, &namespace("raw-latency"), args.concurrency).await?;
    let starts = Arc::new(Mutex::new(histogram()?));
    let acks = Arc::new(Mutex::new(histogram()?));
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Arc::new(AtomicU64::new(u64::MAX));
    let mut consumers = Vec::new();
    for _ in 0..args.concurrency {
        let mut c = raw.consumer(true).await?;
        let (starts, acks, done, t0) = (starts.clone(), acks.clone(), done.clone(), t0.clone());
        consumers.push(tokio::spawn(async move {
            while done.load(Ordering::Acquire) < jobs {
                let Some(item) = c.pop().await? else {
                    continue;
                };
                let popped = now_ns();
                let i: u64 = std::str::from_utf8(&item.data[..12.min(item.data.len())])?
                    .trim()
                    .parse()?;
                c.ack(&item).await?;
                let acked = now_ns();
                let at = scheduled(t0.load(Ordering::Acquire), rate, i);
                starts
                    .lock()
                    .map_err(|_| "poisoned")?
                    .record(popped.saturating_sub(at).max(1))?;
                acks.lock()
                    .map_err(|_| "poisoned")?
                    .record(acked.saturating_sub(at).max(1))?;
                done.fetch_add(1, Ordering::AcqRel);
            }
            Ok::<_, crate::Error>(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let payload = args.payload.max(12);
    let pusher = raw.clone();
    produce(rate, jobs, &t0, move |i| {
        let p = pusher.clone();
        async move {
            let mut item = format!("{i:<12}").into_bytes();
            item.resize(payload, b'x');
            if let Err(e) = p.push(vec![item]).await {
                eprintln!("raw push failed: {e}");
            }
        }
    })
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60 + jobs / 1000);
    while done.load(Ordering::Acquire) < jobs {
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "raw: only {} of {jobs} items were acked",
                done.load(Ordering::Acquire)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for c in consumers {
        c.await??;
    }
    let starts = starts.lock().map_err(|_| "poisoned")?;
    let acks = acks.lock().map_err(|_| "poisoned")?;
    Ok((Percentiles::of(&starts), Percentiles::of(&acks)))
}
