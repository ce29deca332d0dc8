//! Autoscaling on real processes: KEDA's and the HPA's rules drive a pool of real
//! `demo-worker` processes on the real Redis through a bursty load, and a ReplicaSet's
//! rules pick the pods a scale-down deletes; the report says what happened to every
//! job and every replica.
//!
//! The autoscaler ([`Autoscaler`], in `autoscaler.rs`) runs two loops, each with its
//! own reading of the signal: KEDA's polling loop, which only activates a pool at zero
//! and returns it to zero after the cooldown, and the HPA's sync, which sets the count
//! above zero. The signal is one of:
//! - [`Signal::Backlog`]: the pool's `/scaling` document from a real `workerctl
//!   exporter` (KEDA's `metrics-api` trigger on `backlog`);
//! - [`Signal::PendingOnly`]: the length of the pending list, what KEDA's `redis` list
//!   trigger sees.
//!
//! Scaling down sends SIGTERM to the pods `ActivePodsWithRanks` puts first
//! (`replicaset.rs`): not-ready pods, then the lowest pod-deletion cost (read from the
//! annotations the workers keep, when they keep them), then newer pods; the replica
//! drains and its process lives on until it exits, and those seconds count.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;
use worker_core::{Broker, NewJob};
use worker_redis::RedisConfig;

use crate::{binary, since_epoch_ms, DemoWorker};

mod autoscaler;
mod replicaset;

pub use autoscaler::{Autoscaler, Fallback, KedaVersion, Loop, ScalerSpec, Why};
pub use replicaset::{less, pods_to_delete, Phase, PodFacts};

/// The shared Redis the pool runs on.
const REDIS: &str = "127.0.0.1:6379";
/// The pool's one queue.
const QUEUE: &str = "jobs";

/// The signal the autoscaler reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// `backlog` from the pool's exporter: pending + in flight + delayed that is due.
    Backlog,
    /// Pending jobs only, as KEDA's native list trigger sees them.
    PendingOnly,
}

impl Signal {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Backlog => "backlog (exporter)",
            Signal::PendingOnly => "pending only (LLEN)",
        }
    }
}

/// One job of the load: enqueued `at` after the start, running `sleep_ms`.
#[derive(Debug, Clone, Copy)]
pub struct LoadItem {
    /// When it is enqueued, from the start of the run.
    pub at: Duration,
    /// How long its handler runs.
    pub sleep_ms: u64,
}

/// A bursty load of mixed job lengths: a burst of 20 short jobs at 0.5 s, then 6 jobs
/// of `long_ms` from 7.5 s, once the burst is done and nothing else waits, a quiet
/// spell, a second burst at 16 s and a trickle.
pub fn bursty_load(seed: u64, long_ms: u64) -> Vec<LoadItem> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut load = Vec::new();
    let at = |ms: u64| Duration::from_millis(ms);
    for _ in 0..20 {
        load.push(LoadItem {
            at: at(500),
            sleep_ms: rng.u64(300..1_200),
        });
    }
    for i in 0..6 {
        load.push(LoadItem {
            at: at(7_500 + i * 100),
            sleep_ms: long_ms,
        });
    }
    for _ in 0..12 {
        load.push(LoadItem {
            at: at(16_000),
            sleep_ms: rng.u64(300..800),
        });
    }
    for i in 0..5 {
        load.push(LoadItem {
            at: at(17_000 + i * 1_000),
            sleep_ms: 200,
        });
    }
    load
}

/// What the workers tell the ReplicaSet that picks the pods a scale-down deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Victims {
    /// Nothing: no pod-deletion cost, so the ReplicaSet goes by readiness, then by
    /// how recently each pod became ready, then by age (newer first), whether a pod is
    /// busy or not.
    Age,
    /// Each worker keeps its pod's `controller.kubernetes.io/pod-deletion-cost` equal
    /// to its jobs in flight (`WORKER_POD_DELETION_COST`).
    Cost,
    /// As [`Cost`](Self::Cost), and surplus workers go quiet
    /// (`WORKER_QUIET_SURPLUS`): when the pool needs fewer replicas than are live, the
    /// ones the ReplicaSet would delete first stop taking jobs, and an idle quiet
    /// worker's cost is 0.
    Quiet,
}

impl Victims {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Victims::Age => "no deletion cost",
            Victims::Cost => "deletion cost",
            Victims::Quiet => "deletion cost, quiet surplus",
        }
    }
}

/// How a pool at zero learns of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// KEDA's polling loop reads the signal every `pollingInterval`.
    Poll,
    /// As well, the exporter's external scaler pushes `true` on `StreamIsActive` when
    /// the first job arrives, and KEDA checks the scalers at once (`external-push`).
    Push,
}

/// One run of a pool under an autoscaler.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// A name for reports.
    pub name: String,
    /// What the autoscaler reads.
    pub signal: Signal,
    /// How it decides.
    pub scaler: ScalerSpec,
    /// `WORKER_CONCURRENCY` of each replica.
    pub concurrency: u32,
    /// `WORKER_DRAIN_TIMEOUT` of each replica.
    pub drain_timeout: Duration,
    /// The jobs and when they arrive.
    pub load: Vec<LoadItem>,
    /// From when to when (since the start) the exporter cannot reach Redis.
    pub outage: Option<(Duration, Duration)>,
    /// Seeds the pods' UIDs (the ReplicaSet's last tie-breaker).
    pub seed: u64,
    /// What the workers tell the ReplicaSet.
    pub victims: Victims,
    /// How a pool at zero learns of work.
    pub wake: Wake,
    /// The run gives up after this.
    pub limit: Duration,
}

/// One reading and decision.
#[derive(Debug, Clone)]
pub struct Poll {
    /// Which loop read and decided.
    pub by: Loop,
    /// When the read began (ms since the start).
    pub at_ms: u64,
    /// The metric, or `None` when the read failed; for a push, 1 (active) or 0.
    pub reading: Option<f64>,
    /// The pool's true backlog at that moment (pending + in flight + due), read
    /// directly from Redis whatever the signal.
    pub backlog: Option<u64>,
    /// Replicas before the decision (not counting those draining).
    pub current: u32,
    /// Replica processes alive before the decision, draining ones included.
    pub alive: u32,
    /// Replicas after it.
    pub desired: u32,
    /// Why.
    pub why: Why,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The scenario's name.
    pub name: String,
    /// The signal's name.
    pub signal: &'static str,
    /// What the workers told the ReplicaSet.
    pub victims: Victims,
    /// How a pool at zero learned of work.
    pub wake: Wake,
    /// The KEDA release whose rules applied.
    pub keda: &'static str,
    /// `WORKER_DRAIN_TIMEOUT` in seconds.
    pub drain_timeout_s: f64,
    /// The longest job's run time in seconds.
    pub longest_job_s: f64,
    /// Jobs enqueued.
    pub jobs: usize,
    /// Jobs that completed.
    pub completed: usize,
    /// Jobs not completed by the end of the run that are still live in the broker
    /// (pending, leased or delayed), counted by id.
    pub unfinished: usize,
    /// Jobs dead-lettered, counted by id: the simulated jobs all succeed, so a dead
    /// letter is a job the pool failed.
    pub dead: usize,
    /// Jobs neither completed, nor live in the broker, nor dead-lettered, by id.
    pub lost: usize,
    /// The ids of the lost jobs (at most 20), to look them up.
    pub lost_ids: Vec<String>,
    /// Jobs that completed more than once.
    pub duplicated: usize,
    /// Jobs cancelled mid-run by a drain timeout.
    pub interrupted: usize,
    /// Jobs released back to the queue by draining replicas (from their run reports).
    pub released: u64,
    /// Starts beyond the first, over all jobs.
    pub restarts: usize,
    /// Replicas stopped by scale-down (SIGTERM).
    pub stopped: usize,
    /// Of those, how many were running a job at the time.
    pub stopped_busy: usize,
    /// The most replicas at once (not counting those draining).
    pub max_replicas: u32,
    /// Seconds of replica processes alive, draining ones included.
    pub replica_seconds: f64,
    /// Total job run time / concurrency: a perfectly packed pool with no idle time, a
    /// lower bound no autoscaler reaches.
    pub ideal_replica_seconds: f64,
    /// Replica-seconds missing against the need, summed over polls: the need is
    /// `ceil(true backlog / concurrency)`, the replicas are the processes alive.
    pub short_replica_seconds: f64,
    /// Replica-seconds beyond the need, the same way.
    pub excess_replica_seconds: f64,
    /// Of those, the replica-seconds the autoscaler kept beyond the need (replicas it
    /// counts, not draining, minus the need): what its scale-down window and cooldown
    /// hold whichever pods go. The rest are draining replicas still alive.
    pub held_replica_seconds: f64,
    /// Enqueue to first start, p50 / p99 / max, in ms.
    pub wait_ms: (u64, u64, u64),
    /// From the first enqueue to the poll that woke the pool from zero, in ms.
    pub wake_ms: Option<u64>,
    /// Whether that poll was the first one that began after the first enqueue.
    pub woke_on_first_poll: bool,
    /// Reads that failed.
    pub failed_reads: usize,
    /// Whether the run ended before its limit (everything done, the pool back at zero).
    pub finished: bool,
    /// Every poll.
    pub polls: Vec<Poll>,
}

impl Report {
    /// `replica_seconds / ideal_replica_seconds`.
    pub fn provisioning(&self) -> f64 {
        if self.ideal_replica_seconds > 0.0 {
            self.replica_seconds / self.ideal_replica_seconds
        } else {
            0.0
        }
    }

    /// One machine-readable line.
    pub fn json(&self) -> Value {
        json!({
            "name": self.name, "signal": self.signal,
            "victims": format!("{:?}", self.victims), "wake": format!("{:?}", self.wake),
            "keda": self.keda, "drain_timeout_s": self.drain_timeout_s,
            "longest_job_s": self.longest_job_s, "jobs": self.jobs, "completed": self.completed,
            "unfinished": self.unfinished, "dead": self.dead, "lost": self.lost, "lost_ids": self.lost_ids, "duplicated": self.duplicated, "interrupted": self.interrupted,
            "released": self.released, "restarts": self.restarts, "stopped": self.stopped,
            "stopped_busy": self.stopped_busy, "max_replicas": self.max_replicas,
            "replica_seconds": round2(self.replica_seconds),
            "ideal_replica_seconds": round2(self.ideal_replica_seconds),
            "provisioning": round2(self.provisioning()),
            "short_replica_seconds": round2(self.short_replica_seconds),
            "excess_replica_seconds": round2(self.excess_replica_seconds),
            "held_replica_seconds": round2(self.held_replica_seconds),
            "wait_ms": {"p50": self.wait_ms.0, "p99": self.wait_ms.1, "max": self.wait_ms.2},
            "wake_ms": self.wake_ms, "woke_on_first_poll": self.woke_on_first_poll,
            "failed_reads": self.failed_reads, "finished": self.finished,
        })
    }

    /// The replica count over time, one character per poll of KEDA's loop (`.` for
    /// zero, `!` for a failed read).
    pub fn timeline(&self) -> String {
        self.polls
            .iter()
            .filter(|p| p.by == Loop::Keda)
            .map(|p| match (p.reading, p.desired) {
                (None, _) => '!',
                (_, 0) => '.',
                (_, n @ 1..=9) => char::from_digit(n, 10).unwrap_or('+'),
                _ => '+',
            })
            .collect()
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// One row of [`table`]: how a report's cell is written.
type Cell = Box<dyn Fn(&Report) -> String>;

/// Reports side by side, one column each.
pub fn table(reports: &[&Report]) -> String {
    let rows: Vec<(&str, Cell)> = vec![
        ("signal", Box::new(|r| r.signal.to_string())),
        (
            "workers tell the ReplicaSet",
            Box::new(|r| r.victims.name().to_owned()),
        ),
        (
            "wake from zero",
            Box::new(|r| format!("{:?}, {}", r.wake, r.keda)),
        ),
        (
            "drain timeout / longest job",
            Box::new(|r| format!("{:.0} s / {:.1} s", r.drain_timeout_s, r.longest_job_s)),
        ),
        (
            "jobs completed / unfinished / lost",
            Box::new(|r| format!("{} / {} / {}", r.completed, r.unfinished, r.lost)),
        ),
        (
            "jobs completed twice",
            Box::new(|r| r.duplicated.to_string()),
        ),
        (
            "interrupted / released / restarts",
            Box::new(|r| format!("{} / {} / {}", r.interrupted, r.released, r.restarts)),
        ),
        (
            "replicas stopped (busy)",
            Box::new(|r| format!("{} ({})", r.stopped, r.stopped_busy)),
        ),
        ("max replicas", Box::new(|r| r.max_replicas.to_string())),
        (
            "replica-seconds / ideal",
            Box::new(|r| {
                format!(
                    "{:.1} / {:.1} ({:.2} x)",
                    r.replica_seconds,
                    r.ideal_replica_seconds,
                    r.provisioning()
                )
            }),
        ),
        (
            "replica-seconds short / in excess",
            Box::new(|r| {
                format!(
                    "{:.0} / {:.0}",
                    r.short_replica_seconds, r.excess_replica_seconds
                )
            }),
        ),
        (
            "excess held / draining",
            Box::new(|r| {
                format!(
                    "{:.0} / {:.0}",
                    r.held_replica_seconds,
                    r.excess_replica_seconds - r.held_replica_seconds
                )
            }),
        ),
        (
            "wait p50 / p99 / max",
            Box::new(|r| format!("{} / {} / {} ms", r.wait_ms.0, r.wait_ms.1, r.wait_ms.2)),
        ),
        (
            "woke from zero after",
            Box::new(|r| match r.wake_ms {
                Some(ms) if r.woke_on_first_poll => format!("{ms} ms (first poll)"),
                Some(ms) => format!("{ms} ms"),
                None => "-".into(),
            }),
        ),
        ("failed reads", Box::new(|r| r.failed_reads.to_string())),
    ];
    let mut out = String::new();
    let _ = write!(out, "{:<36}", "");
    for r in reports {
        let _ = write!(out, "{:<30}", r.name);
    }
    out.push('\n');
    for (label, cell) in rows {
        let _ = write!(out, "{label:<36}");
        for r in reports {
            let _ = write!(out, "{:<30}", cell(r));
        }
        out.push('\n');
    }
    for r in reports {
        let _ = writeln!(out, "replicas per poll, {}: {}", r.name, r.timeline());
    }
    out
}

/// Every reading and decision of a run, one line each: when, which loop, the reading,
/// the true backlog, the replicas live and alive, the decision and why.
pub fn trace(report: &Report) -> String {
    let mut out = format!("{}:\n", report.name);
    for p in &report.polls {
        let _ = writeln!(
            out,
            "{:>7} ms {:<5} reading {:<6} backlog {:<6} current {:>2} alive {:>2} -> {:>2} {:?}",
            p.at_ms,
            format!("{:?}", p.by),
            p.reading.map_or("failed".into(), |r| format!("{r}")),
            p.backlog.map_or("?".into(), |b| b.to_string()),
            p.current,
            p.alive,
            p.desired,
            p.why
        );
    }
    out
}

/// One replica: a `demo-worker` process, as a pod.
struct Replica {
    worker: DemoWorker,
    /// Its pod's name (`POD_NAME`).
    pod: String,
    started: Instant,
    stopped: Option<Instant>,
    exited: Option<Instant>,
    /// When its readiness probe last began to succeed, since the run's start.
    ready_since: Option<Duration>,
    /// Its pod's UID.
    uid: String,
}

impl Replica {
    fn in_flight(&self) -> usize {
        let events = self.worker.events();
        let count = |name: &str| events.iter().filter(|e| e["event"] == name).count();
        count("start").saturating_sub(count("end") + count("cancelled"))
    }

    /// What the ReplicaSet sees of its pod: one node, running, its readiness as last
    /// probed, and the deletion cost the API server holds for it.
    fn facts(&self, start: Instant, costs: &HashMap<String, i64>) -> PodFacts {
        PodFacts {
            assigned: true,
            phase: Phase::Running,
            ready: self.ready_since.is_some(),
            ready_since: self.ready_since,
            deletion_cost: costs
                .get(&self.pod)
                .map_or(0, |&c| i32::try_from(c).unwrap_or(i32::MAX)),
            on_same_node: 1,
            restarts: 0,
            created: self.started.duration_since(start),
            uid: self.uid.clone(),
        }
    }
}

/// Whether `/readyz` answers 200 within 200 ms, as a readiness probe asks.
async fn ready(http: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(200),
            worker_core::testing::http_get(http, "/readyz"),
        )
        .await,
        Ok(Ok((200, _)))
    )
}

/// A run's key prefix, unique in this machine's Redis.
fn prefix() -> String {
    static RUN: AtomicU32 = AtomicU32::new(0);
    format!(
        "sim-{}-{}-{}",
        std::process::id(),
        since_epoch_ms(std::time::Instant::now()),
        RUN.fetch_add(1, Ordering::Relaxed)
    )
}

async fn read_backlog(exporter: SocketAddr, timeout: Duration) -> Option<f64> {
    let (status, body) = tokio::time::timeout(
        timeout,
        worker_core::testing::http_get(exporter, "/scaling"),
    )
    .await
    .ok()?
    .ok()?;
    if status != 200 {
        return None;
    }
    let doc: Value = serde_json::from_str(&body).ok()?;
    doc["backlog"].as_f64()
}

/// Subscribe to the `StreamIsActive` of the exporter's external scaler at `grpc`, as
/// KEDA does for an `external-push` trigger, and hand on each value it pushes; a
/// stream that ends or fails is opened again, as KEDA does.
fn stream_is_active(grpc: SocketAddr) -> tokio::sync::mpsc::UnboundedReceiver<bool> {
    use crate::external_scaler::{connect, pb::ScaledObjectRef};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let object = ScaledObjectRef {
            name: "sim".into(),
            namespace: "sim".into(),
            scaler_metadata: [("pool".to_owned(), "sim".to_owned())].into(),
        };
        let mut client = connect(grpc).await;
        while !tx.is_closed() {
            if let Ok(stream) = client.stream_is_active(object.clone()).await {
                let mut stream = stream.into_inner();
                while let Ok(Some(message)) = stream.message().await {
                    if tx.send(message.result).is_err() {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    rx
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Which of `ids` are live jobs (pending, leased or delayed) of the run's queue, read
/// by id from the Redis job hash (`{prefix:queue}:jobs`, field `e:<id>`; the layout is
/// in worker-redis's `lua/prelude.lua`).
async fn live_ids(prefix: &str, ids: &[&str]) -> HashSet<String> {
    if ids.is_empty() {
        return HashSet::new();
    }
    let client = redis::Client::open(format!("redis://{REDIS}"))
        .unwrap_or_else(|e| panic!("redis client: {e}"));
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("redis connect: {e}"));
    let fields: Vec<String> = ids.iter().map(|id| format!("e:{id}")).collect();
    let found: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
        .arg(format!("{{{prefix}:{QUEUE}}}:jobs"))
        .arg(&fields)
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("HMGET of the job hash: {e}"));
    ids.iter()
        .zip(found)
        .filter(|(_, v)| v.is_some())
        .map(|(id, _)| (*id).to_owned())
        .collect()
}

/// Run `scenario` to its end (every job done and the pool back at zero) or its limit.
pub async fn run(scenario: &Scenario) -> Report {
    // Build the binaries first: a build inside the loop would stall the autoscaler.
    tokio::task::spawn_blocking(|| {
        binary("demo-worker");
        binary("workerctl");
    })
    .await
    .unwrap_or_else(|e| panic!("building the binaries: {e}"));
    let prefix = prefix();
    let upstream: SocketAddr = REDIS
        .parse()
        .unwrap_or_else(|e| panic!("redis address: {e}"));
    let broker = RedisConfig::new(format!("redis://{REDIS}"))
        .prefix(prefix.clone())
        .connect()
        .await
        .unwrap_or_else(|e| panic!("redis: {e}"));
    let proxy = crate::soak::ChaosProxy::start(upstream).await;
    let grpc = crate::free_addr();
    let exporter = match scenario.signal {
        Signal::Backlog => {
            let capacity = scenario.concurrency.to_string();
            let max = scenario.scaler.max.to_string();
            let grpc = grpc.to_string();
            let mut args = vec![
                "--pool",
                "sim",
                "--queues",
                QUEUE,
                "--capacity",
                &capacity,
                "--max-replicas",
                &max,
            ];
            if scenario.wake == Wake::Push {
                args.extend(["--grpc-listen", &grpc, "--watch-interval", "1s"]);
            }
            let env = [
                ("REDIS_URL", format!("redis://{}", proxy.addr)),
                ("REDIS_PREFIX", prefix.clone()),
            ];
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            Some(crate::start_exporter(&args, &env).await)
        }
        Signal::PendingOnly => None,
    };
    // KEDA's end of `StreamIsActive`: each value the exporter pushes.
    let mut pushes = match (scenario.wake, &exporter) {
        (Wake::Push, Some(_)) => Some(stream_is_active(grpc)),
        _ => None,
    };
    let mut pushed: VecDeque<bool> = VecDeque::new();
    let env: Vec<(String, String)> = vec![
        ("REDIS_URL".into(), format!("redis://{REDIS}")),
        ("REDIS_PREFIX".into(), prefix.clone()),
        ("WORKER_POOL".into(), "sim".into()),
        ("WORKER_QUEUES".into(), QUEUE.into()),
        (
            "WORKER_CONCURRENCY".into(),
            scenario.concurrency.to_string(),
        ),
        (
            "WORKER_DRAIN_TIMEOUT".into(),
            format!("{}ms", scenario.drain_timeout.as_millis()),
        ),
        ("WORKER_LEASE".into(), "10s".into()),
        ("WORKER_HEARTBEAT".into(), "500ms".into()),
        ("RUST_LOG".into(), "warn".into()),
    ];
    let kube = match scenario.victims {
        Victims::Age => None,
        Victims::Cost | Victims::Quiet => Some(crate::kube_api::FakeCluster::start(false).await),
    };
    let mut env = env;
    if scenario.victims == Victims::Quiet {
        env.push(("WORKER_QUIET_SURPLUS".into(), "true".into()));
    }
    let env = env;
    let mut pods_made = 0u32;

    let mut rng = fastrand::Rng::with_seed(scenario.seed);
    let mut scaler = Autoscaler::new(scenario.scaler.clone());
    let mut replicas: Vec<Replica> = Vec::new();
    let mut polls = Vec::new();
    let mut enqueued: HashMap<String, u64> = HashMap::new();
    let mut load: VecDeque<LoadItem> = {
        let mut l = scenario.load.clone();
        l.sort_by_key(|i| i.at);
        l.into()
    };
    let start = Instant::now();
    let ms = |at: Instant| u64::try_from(at.duration_since(start).as_millis()).unwrap_or(0);
    let mut first_enqueue: Option<Instant> = None;
    let mut next_poll = start;
    let mut next_sync = start;
    let mut outage_on = false;
    let mut max_replicas = 0;
    let mut stopped_busy = 0;
    let mut finished = false;
    let tick = Duration::from_millis(50);

    while start.elapsed() < scenario.limit {
        let now = Instant::now();
        // The load.
        let mut due = Vec::new();
        while load.front().is_some_and(|i| start + i.at <= now) {
            if let Some(item) = load.pop_front() {
                due.push(item);
            }
        }
        if !due.is_empty() {
            let jobs = due
                .iter()
                .map(|i| {
                    NewJob::json(QUEUE, &json!({"sleep_ms": i.sleep_ms}))
                        .unwrap_or_else(|e| panic!("{e}"))
                })
                .collect();
            let ids = broker
                .enqueue(jobs)
                .await
                .unwrap_or_else(|e| panic!("enqueue: {e}"));
            let at = since_epoch_ms(Instant::now().into_std());
            for id in ids {
                enqueued.insert(id.to_string(), at);
            }
            first_enqueue.get_or_insert(now);
        }
        // The outage.
        if let Some((from, to)) = scenario.outage {
            let on = now >= start + from && now < start + to;
            if on != outage_on {
                proxy.set_down(on);
                outage_on = on;
            }
        }
        // Replicas that finished draining.
        for r in replicas.iter_mut().filter(|r| r.exited.is_none()) {
            if r.worker.try_exit().is_some() {
                r.exited = Some(Instant::now());
            }
        }
        // Readiness, as the kubelet's probe would see it: for pods not yet ready.
        for r in replicas.iter_mut().filter(|r| r.stopped.is_none()) {
            if r.ready_since.is_none() && ready(r.worker.http).await {
                r.ready_since = Some(r.started.duration_since(start) + r.started.elapsed());
            }
        }
        // A push, KEDA's polling loop, and the HPA's sync: the last two each read the
        // signal themselves.
        for by in [Loop::Push, Loop::Keda, Loop::Hpa] {
            let mut push = None;
            match by {
                Loop::Push => match pushed.pop_front() {
                    Some(active) => push = Some(active),
                    None => continue,
                },
                Loop::Keda | Loop::Hpa => {
                    let (next, period) = if by == Loop::Keda {
                        (&mut next_poll, scenario.scaler.polling)
                    } else {
                        (&mut next_sync, scenario.scaler.hpa_sync)
                    };
                    if now < *next {
                        continue;
                    }
                    *next += period;
                }
            }
            let running: Vec<usize> = (0..replicas.len())
                .filter(|&i| replicas[i].stopped.is_none())
                .collect();
            let current = u32::try_from(running.len()).unwrap_or(u32::MAX);
            // The HPA does not scale a target at zero, nor read for it.
            if by == Loop::Hpa && current == 0 {
                continue;
            }
            let reading = match (push, scenario.signal, &exporter) {
                (Some(active), _, _) => Some(if active { 1.0 } else { 0.0 }),
                (None, Signal::Backlog, Some((_, addr))) => {
                    read_backlog(*addr, scenario.scaler.polling).await
                }
                _ => broker.depth(QUEUE).await.ok().map(|d| d.pending as f64),
            };
            // The truth, read directly, whatever the signal: what the pool needed.
            let backlog = broker
                .depth(QUEUE)
                .await
                .ok()
                .map(|d| d.pending + d.in_flight + d.delayed_due);
            let alive = u32::try_from(replicas.iter().filter(|r| r.exited.is_none()).count())
                .unwrap_or(u32::MAX);
            let at = Instant::now();
            let (desired, why) = match (by, push) {
                (Loop::Push, Some(active)) => scaler.push(at, active, current),
                (Loop::Hpa, _) => scaler.sync(at, reading, current),
                (Loop::Keda | Loop::Push, _) => scaler.poll(at, reading, current),
            };
            polls.push(Poll {
                by,
                at_ms: ms(now),
                reading,
                backlog,
                current,
                alive,
                desired,
                why,
            });
            if desired > current {
                for _ in current..desired {
                    pods_made += 1;
                    let pod = format!("replica-{pods_made}");
                    let kube_env = kube.as_ref().map(|k| k.worker_env(&pod));
                    let mut env_refs: Vec<(&str, &str)> =
                        env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    env_refs.extend(kube_env.iter().flatten().map(|(k, v)| (*k, v.as_str())));
                    if kube.is_none() {
                        env_refs.push(("POD_NAME", &pod));
                    }
                    replicas.push(Replica {
                        worker: DemoWorker::start(&env_refs),
                        pod: pod.clone(),
                        started: Instant::now(),
                        stopped: None,
                        exited: None,
                        ready_since: None,
                        uid: format!("{:016x}", rng.u64(..)),
                    });
                }
            } else if desired < current {
                let now_since = Instant::now().duration_since(start);
                let costs = kube
                    .as_ref()
                    .map(|k| k.api.deletion_costs())
                    .unwrap_or_default();
                let mut pods = Vec::with_capacity(running.len());
                for &i in &running {
                    let r = &mut replicas[i];
                    // The Ready condition as it stands: probed again now.
                    if ready(r.worker.http).await {
                        r.ready_since.get_or_insert(now_since);
                    } else {
                        r.ready_since = None;
                    }
                    pods.push(r.facts(start, &costs));
                }
                let count = usize::try_from(current - desired).unwrap_or(usize::MAX);
                for k in pods_to_delete(&pods, count, now_since) {
                    let r = &mut replicas[running[k]];
                    if r.in_flight() > 0 {
                        stopped_busy += 1;
                    }
                    r.worker.signal("TERM");
                    r.stopped = Some(Instant::now());
                }
            }
            max_replicas = max_replicas.max(desired);
        }
        // The end: every job done, every replica gone.
        if load.is_empty() && replicas.iter().all(|r| r.exited.is_some()) {
            let done: HashSet<String> = replicas
                .iter()
                .flat_map(|r| r.worker.events())
                .filter(|e| e["event"] == "end" && e["ok"] == true)
                .filter_map(|e| e["id"].as_str().map(str::to_owned))
                .collect();
            if enqueued.keys().all(|id| done.contains(id)) {
                finished = true;
                break;
            }
        }
        match &mut pushes {
            Some(rx) => tokio::select! {
                () = tokio::time::sleep(tick) => {}
                Some(active) = rx.recv() => pushed.push_back(active),
            },
            None => tokio::time::sleep(tick).await,
        }
    }
    proxy.set_down(false);

    // Whatever is still alive past the limit is stopped now and counted until now.
    let end = Instant::now();
    for r in replicas.iter_mut().filter(|r| r.exited.is_none()) {
        r.worker.signal("KILL");
        r.exited = Some(end);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    let events: Vec<Value> = replicas.iter().flat_map(|r| r.worker.events()).collect();
    let mut ends: HashMap<&str, usize> = HashMap::new();
    let mut first_start: HashMap<&str, u64> = HashMap::new();
    let mut starts = 0usize;
    for e in &events {
        let id = e["id"].as_str().unwrap_or("");
        match e["event"].as_str() {
            Some("end") if e["ok"] == true => *ends.entry(id).or_default() += 1,
            Some("start") => {
                starts += 1;
                let at = e["_at_ms"].as_u64().unwrap_or(0);
                first_start
                    .entry(id)
                    .and_modify(|t| *t = (*t).min(at))
                    .or_insert(at);
            }
            _ => {}
        }
    }
    let completed = enqueued
        .keys()
        .filter(|id| ends.contains_key(id.as_str()))
        .count();
    let mut waits: Vec<u64> = enqueued
        .iter()
        .filter_map(|(id, at)| first_start.get(id.as_str()).map(|s| s.saturating_sub(*at)))
        .collect();
    waits.sort_unstable();
    let released = events
        .iter()
        .filter(|e| e["event"] == "stopped")
        .filter_map(|e| e["report"]["released"].as_u64())
        .sum();
    let wake = first_enqueue.and_then(|first| {
        polls
            .iter()
            .find(|p| p.why == Why::Activate && start + Duration::from_millis(p.at_ms) >= first)
            .map(|p| {
                let first_poll_after = polls
                    .iter()
                    .find(|q| start + Duration::from_millis(q.at_ms) >= first)
                    .map(|q| q.at_ms);
                (
                    p.at_ms.saturating_sub(ms(first)),
                    first_poll_after == Some(p.at_ms),
                )
            })
    });
    // Each job not completed must still be in the broker, live or dead, by its id:
    // whatever is in neither place is lost. Totals would let a duplicate hide a loss.
    let not_completed: Vec<&str> = enqueued
        .keys()
        .map(String::as_str)
        .filter(|id| !ends.contains_key(id))
        .collect();
    let dead_ids: HashSet<String> = broker
        .dead_letters(QUEUE, enqueued.len().max(1))
        .await
        .unwrap_or_else(|e| panic!("dead letters: {e}"))
        .into_iter()
        .map(|d| d.envelope.id.to_string())
        .collect();
    let live = live_ids(&prefix, &not_completed).await;
    let dead = not_completed
        .iter()
        .filter(|id| dead_ids.contains(**id))
        .count();
    let unfinished = not_completed
        .iter()
        .filter(|id| !dead_ids.contains(**id) && live.contains(**id))
        .count();
    let mut lost_ids: Vec<String> = not_completed
        .iter()
        .filter(|id| !dead_ids.contains(**id) && !live.contains(**id))
        .map(|id| (*id).to_owned())
        .collect();
    let lost = lost_ids.len();
    lost_ids.sort();
    lost_ids.truncate(20);
    let total_work_ms: u64 = scenario.load.iter().map(|i| i.sleep_ms).sum();
    let step = scenario.scaler.polling.as_secs_f64();
    let (mut short, mut excess, mut held) = (0.0, 0.0, 0.0);
    for p in polls.iter().filter(|p| p.by == Loop::Keda) {
        if let Some(backlog) = p.backlog {
            let need = backlog.div_ceil(u64::from(scenario.concurrency.max(1)));
            let alive = u64::from(p.alive);
            short += need.saturating_sub(alive) as f64 * step;
            excess += alive.saturating_sub(need) as f64 * step;
            held += u64::from(p.current).saturating_sub(need) as f64 * step;
        }
    }
    if let Some((mut child, _)) = exporter {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    Report {
        name: scenario.name.clone(),
        signal: scenario.signal.name(),
        victims: scenario.victims,
        wake: scenario.wake,
        keda: scenario.scaler.keda.name(),
        drain_timeout_s: scenario.drain_timeout.as_secs_f64(),
        longest_job_s: scenario.load.iter().map(|i| i.sleep_ms).max().unwrap_or(0) as f64 / 1000.0,
        jobs: enqueued.len(),
        completed,
        unfinished,
        dead,
        lost,
        lost_ids,
        duplicated: ends.values().filter(|&&n| n > 1).count(),
        interrupted: events.iter().filter(|e| e["event"] == "cancelled").count(),
        released,
        restarts: starts.saturating_sub(first_start.len()),
        stopped: replicas.iter().filter(|r| r.stopped.is_some()).count(),
        stopped_busy,
        max_replicas,
        replica_seconds: replicas
            .iter()
            .map(|r| {
                r.exited
                    .unwrap_or(end)
                    .duration_since(r.started)
                    .as_secs_f64()
            })
            .sum(),
        ideal_replica_seconds: total_work_ms as f64 / 1000.0 / f64::from(scenario.concurrency),
        short_replica_seconds: short,
        excess_replica_seconds: excess,
        held_replica_seconds: held,
        wait_ms: (
            percentile(&waits, 50.0),
            percentile(&waits, 99.0),
            waits.last().copied().unwrap_or(0),
        ),
        wake_ms: wake.map(|(ms, _)| ms),
        woke_on_first_poll: wake.is_some_and(|(_, first)| first),
        failed_reads: polls.iter().filter(|p| p.reading.is_none()).count(),
        finished,
        polls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[7], 99.0), 7);
    }
}
