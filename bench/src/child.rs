//! Worker processes started by the harness (this same binary, hidden subcommands),
//! and the parent's side: spawn, read their JSON lines, signal them.
//!
//! A child prints one JSON object per line on stdout: `start` / `end` events when
//! asked, and a final `report` when it exits.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::IgnoredAny;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use worker_core::{handler_fn, Broker, Handler, Job, JobError, Worker, WorkerConfig};

use crate::backend::{connect, fill, Kind, Probe, Raw, Urls};
use crate::clock::unix_ns;
use crate::Result;

/// What a framework worker does with each job.
#[derive(Clone, Debug, clap::Args)]
pub struct WorkerArgs {
    /// Broker.
    #[arg(long, value_enum)]
    pub backend: Kind,
    #[command(flatten)]
    pub urls: Urls,
    /// Key prefix (Redis).
    #[arg(long)]
    pub prefix: String,
    /// Queue to consume.
    #[arg(long)]
    pub queue: String,
    /// Concurrency.
    #[arg(long)]
    pub concurrency: u32,
    /// Prefetch.
    #[arg(long, default_value_t = 0)]
    pub prefetch: u32,
    /// Handler sleep, ms.
    #[arg(long, default_value_t = 0)]
    pub sleep_ms: u64,
    /// Enqueue this many jobs first (the only way to feed the in-memory broker).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Payload bytes of seeded jobs.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Drain and exit after this many acks (0: run until SIGTERM).
    #[arg(long, default_value_t = 0)]
    pub expect: u64,
    /// Print a `start` and an `end` event per job.
    #[arg(long)]
    pub events: bool,
    /// Drain timeout, ms.
    #[arg(long, default_value_t = 30_000)]
    pub drain_timeout_ms: u64,
}

/// The shape of a framework worker under test.
#[derive(Clone, Copy, Debug)]
pub struct Pool {
    /// Jobs running at once.
    pub concurrency: u32,
    /// Jobs fetched ahead of free permits (`WORKER_PREFETCH`).
    pub prefetch: u32,
    /// Handler sleep, ms (0: a no-op handler).
    pub sleep_ms: u64,
    /// Drain timeout.
    pub drain_timeout: Duration,
}

impl Pool {
    /// A no-op pool of `concurrency`, no prefetch, a 30 s drain timeout.
    pub fn new(concurrency: u32) -> Self {
        Self {
            concurrency,
            prefetch: 0,
            sleep_ms: 0,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// A framework worker with a no-op (or sleeping) handler that calls `on_start` with
/// each job's id as it starts and `on_end` as it returns.
pub fn framework_worker(
    broker: Arc<dyn Broker>,
    queue: &str,
    pool: Pool,
    on_start: impl Fn(&str) + Send + Sync + 'static,
    on_end: impl Fn(&str) + Send + Sync + Clone + 'static,
) -> Result<Worker<impl Handler>> {
    let sleep_ms = pool.sleep_ms;
    let handler = handler_fn(move |job: Job<IgnoredAny>| {
        on_start(job.id().as_str());
        let id = job.id().as_str().to_owned();
        let on_end = on_end.clone();
        async move {
            if sleep_ms > 0 {
                tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
            }
            on_end(&id);
            Ok::<_, JobError>(())
        }
    });
    let config = WorkerConfig::builder()
        .pool("bench")
        .queue(queue)
        .concurrency(pool.concurrency)
        .prefetch(pool.prefetch)
        .drain_timeout(pool.drain_timeout)
        .http_addr(Some(([127, 0, 0, 1], 0).into()))
        .build()?;
    Ok(Worker::with_shared_broker(broker, config, handler))
}

/// The `worker` child: run a framework worker until `expect` acks or SIGTERM.
pub async fn run_worker(args: WorkerArgs) -> Result<()> {
    let inner = connect(
        args.backend,
        &args.urls,
        &args.prefix,
        args.concurrency + args.prefetch,
    )
    .await?;
    if args.seed > 0 {
        fill(inner.as_ref(), &args.queue, args.seed, args.payload).await?;
    }
    let target = if args.expect == 0 {
        u64::MAX
    } else {
        args.expect
    };
    let probe = Probe::new(inner, target, 0);
    let first_start = Arc::new(AtomicU64::new(0));
    let fs = first_start.clone();
    let events = args.events;
    let worker = framework_worker(
        probe.clone(),
        &args.queue,
        Pool {
            concurrency: args.concurrency,
            prefetch: args.prefetch,
            sleep_ms: args.sleep_ms,
            drain_timeout: Duration::from_millis(args.drain_timeout_ms),
        },
        move |id| {
            let t = unix_ns();
            let _ = fs.compare_exchange(0, t, Ordering::AcqRel, Ordering::Acquire);
            if events {
                println!("{}", json!({"event": "start", "id": id, "unix_ns": t}));
            }
        },
        move |id| {
            if events {
                println!(
                    "{}",
                    json!({"event": "end", "id": id, "unix_ns": unix_ns()})
                );
            }
        },
    )?;
    if args.expect > 0 {
        let handle = worker.shutdown_handle();
        let p = probe.clone();
        tokio::spawn(async move {
            if p.wait(Duration::from_secs(3600)).await.is_ok() {
                handle.drain();
            }
        });
    }
    println!("{}", json!({"event": "ready", "unix_ns": unix_ns()}));
    worker.run_until_signal().await?;
    println!(
        "{}",
        json!({"event": "report", "acked": probe.acked(),
            "first_start_unix_ns": first_start.load(Ordering::Acquire),
            "last_ack_unix_ns": probe.last_ack_unix_ns(),
            "peak_rss_kib": peak_rss_kib()})
    );
    Ok(())
}

/// What a raw consumer process does.
#[derive(Clone, Debug, clap::Args)]
pub struct RawArgs {
    /// Broker.
    #[arg(long, value_enum)]
    pub backend: Kind,
    #[command(flatten)]
    pub urls: Urls,
    /// The raw queue's name.
    #[arg(long)]
    pub name: String,
    /// Concurrent consumers.
    #[arg(long)]
    pub concurrency: u32,
    /// Handler sleep, ms.
    #[arg(long, default_value_t = 0)]
    pub sleep_ms: u64,
    /// Deliveries held ahead of the consumers beyond `concurrency` (RabbitMQ).
    #[arg(long, default_value_t = 0)]
    pub prefetch: u32,
}

/// The `raw-worker` child: consume the raw queue until it is empty, then report.
pub async fn run_raw_worker(args: RawArgs) -> Result<()> {
    let raw = Raw::new(
        args.backend,
        &args.urls,
        &args.name,
        args.concurrency + args.prefetch,
    )
    .await?;
    let t = raw_drain_consumers(&raw, args.concurrency, args.sleep_ms, unix_ns).await?;
    println!(
        "{}",
        json!({"event": "report", "acked": t.acked, "first_start_unix_ns": t.first_start,
            "last_ack_unix_ns": t.last_ack, "peak_rss_kib": peak_rss_kib()})
    );
    Ok(())
}

/// What a set of raw consumers did, on the clock they were given.
pub struct RawTiming {
    /// Items acked.
    pub acked: u64,
    /// First pop.
    pub first_start: u64,
    /// Last ack.
    pub last_ack: u64,
}

/// Run `c` non-blocking raw consumers until the queue is empty (on Redis, each on a
/// thread of its own with a blocking connection).
pub async fn raw_drain_consumers(
    raw: &Raw,
    c: u32,
    sleep_ms: u64,
    clock: fn() -> u64,
) -> Result<RawTiming> {
    if let Raw::Redis(r) = raw {
        let (acked, first_start, last_ack) = r.drain_on_threads(c, sleep_ms, clock).await?;
        return Ok(RawTiming {
            acked,
            first_start,
            last_ack,
        });
    }
    let first = Arc::new(AtomicU64::new(0));
    let last = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..c {
        let mut consumer = raw.consumer(false).await?;
        let (first, last, acked) = (first.clone(), last.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(item) = consumer.pop().await? {
                let _ = first.compare_exchange(0, clock(), Ordering::AcqRel, Ordering::Acquire);
                if sleep_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
                }
                consumer.ack(&item).await?;
                last.fetch_max(clock(), Ordering::AcqRel);
                acked.fetch_add(1, Ordering::AcqRel);
            }
            Ok::<_, crate::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(RawTiming {
        acked: acked.load(Ordering::Acquire),
        first_start: first.load(Ordering::Acquire),
        last_ack: last.load(Ordering::Acquire),
    })
}

/// Peak resident set of this process (VmHWM), KiB.
pub fn peak_rss_kib() -> u64 {
    proc_status_kib(std::process::id(), "VmHWM:").unwrap_or(0)
}

/// A `/proc/<pid>/status` field in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time (user + system) of process `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A child process of this binary, with its stdout lines parsed as JSON.
pub struct Child {
    child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<Value>,
    /// Its pid.
    pub pid: u32,
}

impl Child {
    /// Start `bench <args>`.
    pub fn spawn(args: &[String]) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().ok_or("child exited at once")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(Self { child, lines, pid })
    }

    /// The next event named `event` (others are returned in `skipped`), within `timeout`.
    pub async fn next_event(
        &mut self,
        event: &str,
        timeout: Duration,
        skipped: &mut Vec<Value>,
    ) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(v)) if v["event"] == event => return Ok(v),
                Ok(Some(v)) => skipped.push(v),
                Ok(None) => return Err(format!("child exited before its {event} event").into()),
                Err(_) => return Err(format!("no {event} event within {timeout:?}").into()),
            }
        }
    }

    /// Send a signal by name (`TERM`, `KILL`).
    pub async fn signal(&self, name: &str) -> Result<()> {
        let status = Command::new("kill")
            .args(["-s", name, &self.pid.to_string()])
            .status()
            .await?;
        if !status.success() {
            return Err(format!("kill -s {name} {} failed", self.pid).into());
        }
        Ok(())
    }

    /// Wait for exit; the wall-clock time it was seen, and every line it printed
    /// that was not read yet.
    pub async fn wait(mut self, timeout: Duration) -> Result<(u64, Vec<Value>)> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .map_err(|_| format!("child {} did not exit within {timeout:?}", self.pid))??;
        let exited = unix_ns();
        if !status.success() {
            return Err(format!("child {} exited with {status}", self.pid).into());
        }
        let mut rest = Vec::new();
        while let Some(v) = self.lines.recv().await {
            rest.push(v);
        }
        Ok((exited, rest))
    }
}

/// The `report` line among `lines`.
pub fn report(lines: &[Value]) -> Result<&Value> {
    lines
        .iter()
        .find(|v| v["event"] == "report")
        .ok_or_else(|| "the child printed no report".into())
}
