//! Autoscaling on real processes: an autoscaler with KEDA's and the HPA's semantics
//! drives a pool of real `demo-worker` processes on the real Redis through a bursty
//! load, and reports what happened to every job and every replica.
//!
//! The autoscaler ([`Autoscaler`]) reads one signal every polling interval:
//! - [`Signal::Backlog`]: the pool's `/scaling` document from a real `workerctl
//!   exporter` (KEDA's `metrics-api` trigger on `backlog`);
//! - [`Signal::PendingOnly`]: the length of the pending list, what KEDA's `redis` list
//!   trigger sees.
//!
//! and decides as KEDA and the HPA do: `desired = ceil(metric / target)` for an
//! `AverageValue` target, no change within the HPA's 10 % tolerance, clamped to
//! `[max(min, 1), max]`; scale-up at once and scale-down to the highest recommendation
//! of the stabilization window; activation from zero when the metric exceeds the
//! activation value, and back to zero once it has not for the cooldown period; a read
//! that fails holds the replicas, and once failures in a row exceed
//! `failure_threshold` the fallback keeps `max(current, replicas)` (KEDA's
//! `currentReplicasIfHigher`); scale-up at most `max(2 × start, start + 4)` per
//! scale-up period, `start` being the replicas at the period's start (the HPA's
//! default policies).
//!
//! Scaling down sends SIGTERM to a replica chosen at random, as a ReplicaSet may; the
//! replica drains and its process lives on until it exits, and those seconds count.

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

/// The shared Redis the pool runs on.
const REDIS: &str = "127.0.0.1:6379";
/// The pool's one queue.
const QUEUE: &str = "jobs";

/// How the autoscaler decides: the fields of a KEDA `ScaledObject` and its HPA.
#[derive(Debug, Clone)]
pub struct ScalerSpec {
    /// KEDA's `pollingInterval`.
    pub polling: Duration,
    /// The `AverageValue` target per replica (the workers' concurrency).
    pub target: f64,
    /// KEDA's `activationTargetValue`: active while the metric is above it.
    pub activation: f64,
    /// `minReplicaCount` (0 lets the pool scale to zero).
    pub min: u32,
    /// `maxReplicaCount`.
    pub max: u32,
    /// KEDA's `cooldownPeriod`: inactive this long before going to zero.
    pub cooldown: Duration,
    /// The HPA's scale-down `stabilizationWindowSeconds`.
    pub scale_down_window: Duration,
    /// The HPA's tolerance (0.1 by default).
    pub tolerance: f64,
    /// KEDA's `fallback` with `behavior: currentReplicasIfHigher`.
    pub fallback: Option<Fallback>,
    /// The `periodSeconds` of the HPA's default scale-up policies (15 s): within one
    /// period the replicas grow to at most `max(2 × start, start + 4)`.
    pub scale_up_period: Duration,
}

impl ScalerSpec {
    /// KEDA's and the HPA's rules on a compressed clock: polling 1 s, a 4 s cooldown,
    /// a 6 s scale-down window, a 1 s scale-up period, the 10 % tolerance, 0 to 8
    /// replicas, activation on any backlog, and a fallback holding at least one
    /// replica once more than three reads in a row have failed.
    /// `target` is the jobs one replica runs at once.
    pub fn compressed(target: u32) -> Self {
        Self {
            polling: Duration::from_secs(1),
            target: f64::from(target),
            activation: 0.0,
            min: 0,
            max: 8,
            cooldown: Duration::from_secs(4),
            scale_down_window: Duration::from_secs(6),
            tolerance: 0.1,
            fallback: Some(Fallback {
                failure_threshold: 3,
                replicas: 1,
            }),
            scale_up_period: Duration::from_secs(1),
        }
    }
}

/// KEDA's `fallback` section.
#[derive(Debug, Clone, Copy)]
pub struct Fallback {
    /// Failed reads in a row before the fallback applies.
    pub failure_threshold: u32,
    /// The replicas it holds at least.
    pub replicas: u32,
}

/// Why the autoscaler chose a replica count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// At zero and still inactive.
    Idle,
    /// From zero: the metric went above the activation value.
    Activate,
    /// To zero: inactive for the cooldown period.
    Deactivate,
    /// The HPA's arithmetic and stabilization.
    Hpa,
    /// The read failed, fewer times than the fallback's threshold: nothing changes.
    Hold,
    /// The read failed more than `failure_threshold` times in a row.
    Fallback,
}

/// KEDA's scale loop and the HPA it feeds, as one decision per reading.
#[derive(Debug)]
pub struct Autoscaler {
    spec: ScalerSpec,
    failures: u32,
    last_active: Option<Instant>,
    recommendations: VecDeque<(Instant, u32)>,
    /// The HPA's scale-up events: when, and how many replicas each added.
    scale_ups: VecDeque<(Instant, u32)>,
}

impl Autoscaler {
    /// An autoscaler with no history.
    pub fn new(spec: ScalerSpec) -> Self {
        Self {
            spec,
            failures: 0,
            last_active: None,
            recommendations: VecDeque::new(),
            scale_ups: VecDeque::new(),
        }
    }

    /// The most replicas the HPA may scale up to now, from `current`: its default
    /// scale-up policies (100 % and 4 pods per period, `selectPolicy: Max`), from the
    /// replicas at the start of the period. Kubernetes
    /// `calculateScaleUpLimitWithScalingRules` with `getReplicasChangePerPeriod`
    /// (pkg/controller/podautoscaler/horizontal.go).
    fn scale_up_limit(&mut self, now: Instant, current: u32) -> u32 {
        let period = self.spec.scale_up_period;
        while let Some(&(at, _)) = self.scale_ups.front() {
            if now.duration_since(at) >= period {
                self.scale_ups.pop_front();
            } else {
                break;
            }
        }
        let added: u32 = self.scale_ups.iter().map(|&(_, n)| n).sum();
        let start = current.saturating_sub(added);
        (start * 2).max(start + 4)
    }

    /// The replica count for a `reading` of the metric (`None`: the read failed) taken
    /// at `now` with `current` replicas.
    pub fn decide(&mut self, now: Instant, reading: Option<f64>, current: u32) -> (u32, Why) {
        let spec = &self.spec;
        let Some(metric) = reading else {
            self.failures += 1;
            if let Some(f) = spec.fallback {
                // KEDA's fallback feeds the HPA; a pool at zero has no HPA running. It
                // applies once the failures exceed the threshold (KEDA
                // `GetMetricsWithFallback`, pkg/fallback/fallback.go: the 4th failure
                // for a threshold of 3).
                if self.failures > f.failure_threshold && current > 0 {
                    return (current.max(f.replicas).min(spec.max), Why::Fallback);
                }
            }
            return (current, Why::Hold);
        };
        self.failures = 0;
        let active = metric > spec.activation;
        if active {
            self.last_active = Some(now);
        }
        if current == 0 {
            return if active {
                (spec.min.max(1), Why::Activate)
            } else {
                (0, Why::Idle)
            };
        }
        if !active && spec.min == 0 {
            let cooled = self
                .last_active
                .is_none_or(|t| now.duration_since(t) >= spec.cooldown);
            if cooled {
                // The HPA keeps its recommendations while KEDA holds the pool at zero
                // (Kubernetes `stabilizeRecommendationWithBehaviors` reads them again
                // when the HPA runs next).
                return (0, Why::Deactivate);
            }
        }
        // The HPA: usage ratio of an AverageValue target on an external metric.
        let ratio = metric / (spec.target * f64::from(current));
        let raw = if (ratio - 1.0).abs() <= spec.tolerance {
            current
        } else {
            // Bounded by the clamp below; the cast saturates.
            (metric / spec.target).ceil() as u32
        };
        let recommendation = raw.clamp(spec.min.max(1), spec.max);
        self.recommendations.push_back((now, recommendation));
        while let Some(&(at, _)) = self.recommendations.front() {
            if now.duration_since(at) > spec.scale_down_window {
                self.recommendations.pop_front();
            } else {
                break;
            }
        }
        let highest = self
            .recommendations
            .iter()
            .map(|&(_, r)| r)
            .max()
            .unwrap_or(recommendation);
        // Up at once (window 0) within the scale-up limit; down only to the highest
        // recommendation in the window (Kubernetes `normalizeDesiredReplicasWithBehaviors`:
        // stabilization, then `convertDesiredReplicasWithBehaviorRate`).
        let desired = if recommendation >= current {
            recommendation.min(self.scale_up_limit(now, current).max(current))
        } else {
            current.min(highest)
        };
        if desired > current {
            self.scale_ups.push_back((now, desired - current));
        }
        (desired, Why::Hpa)
    }
}

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

/// A bursty load of mixed job lengths: a burst of short jobs, then long jobs (longer
/// than `long_ms`) while nothing else waits, a quiet spell, a second burst and a trickle.
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
            at: at(2_500 + i * 100),
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

/// Which replica a scale-down stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Victims {
    /// Any, at random: a ReplicaSet without pod-deletion costs may stop a busy pod.
    Random,
    /// The one with the fewest jobs in flight: what the ReplicaSet does when workers
    /// keep `controller.kubernetes.io/pod-deletion-cost` (`WORKER_POD_DELETION_COST`).
    IdleFirst,
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
    /// Seeds the choice of the replica to stop.
    pub seed: u64,
    /// Which replica a scale-down stops.
    pub victims: Victims,
    /// The run gives up after this.
    pub limit: Duration,
}

/// One reading and decision.
#[derive(Debug, Clone)]
pub struct Poll {
    /// When the read began (ms since the start).
    pub at_ms: u64,
    /// The metric, or `None` when the read failed.
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
    /// Which replica a scale-down stopped.
    pub victims: Victims,
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
            "victims": format!("{:?}", self.victims), "drain_timeout_s": self.drain_timeout_s,
            "longest_job_s": self.longest_job_s, "jobs": self.jobs, "completed": self.completed,
            "unfinished": self.unfinished, "dead": self.dead, "lost": self.lost, "lost_ids": self.lost_ids, "duplicated": self.duplicated, "interrupted": self.interrupted,
            "released": self.released, "restarts": self.restarts, "stopped": self.stopped,
            "stopped_busy": self.stopped_busy, "max_replicas": self.max_replicas,
            "replica_seconds": round2(self.replica_seconds),
            "ideal_replica_seconds": round2(self.ideal_replica_seconds),
            "provisioning": round2(self.provisioning()),
            "short_replica_seconds": round2(self.short_replica_seconds),
            "excess_replica_seconds": round2(self.excess_replica_seconds),
            "wait_ms": {"p50": self.wait_ms.0, "p99": self.wait_ms.1, "max": self.wait_ms.2},
            "wake_ms": self.wake_ms, "woke_on_first_poll": self.woke_on_first_poll,
            "failed_reads": self.failed_reads, "finished": self.finished,
        })
    }

    /// The replica count over time, one character per poll (`.` for zero, `!` for a
    /// failed read).
    pub fn timeline(&self) -> String {
        self.polls
            .iter()
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
            "scale-down stops",
            Box::new(|r| match r.victims {
                Victims::Random => "a random replica".to_owned(),
                Victims::IdleFirst => "the least busy (deletion cost)".to_owned(),
            }),
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

/// One replica: a `demo-worker` process.
struct Replica {
    worker: DemoWorker,
    started: Instant,
    stopped: Option<Instant>,
    exited: Option<Instant>,
}

impl Replica {
    fn in_flight(&self) -> usize {
        let events = self.worker.events();
        let count = |name: &str| events.iter().filter(|e| e["event"] == name).count();
        count("start").saturating_sub(count("end") + count("cancelled"))
    }
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
    let exporter = match scenario.signal {
        Signal::Backlog => Some(
            crate::start_exporter(
                &[
                    "--pool",
                    "sim",
                    "--queues",
                    QUEUE,
                    "--capacity",
                    &scenario.concurrency.to_string(),
                    "--max-replicas",
                    &scenario.scaler.max.to_string(),
                ],
                &[
                    ("REDIS_URL", &format!("redis://{}", proxy.addr)),
                    ("REDIS_PREFIX", &prefix),
                ],
            )
            .await,
        ),
        Signal::PendingOnly => None,
    };
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
        ("WORKER_HEARTBEAT".into(), "1s".into()),
        ("RUST_LOG".into(), "warn".into()),
    ];
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

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
        // The autoscaler.
        if now >= next_poll {
            next_poll += scenario.scaler.polling;
            let reading = match (scenario.signal, &exporter) {
                (Signal::Backlog, Some((_, addr))) => {
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
            let running: Vec<usize> = (0..replicas.len())
                .filter(|&i| replicas[i].stopped.is_none())
                .collect();
            let current = u32::try_from(running.len()).unwrap_or(u32::MAX);
            let alive = u32::try_from(replicas.iter().filter(|r| r.exited.is_none()).count())
                .unwrap_or(u32::MAX);
            let (desired, why) = scaler.decide(now, reading, current);
            polls.push(Poll {
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
                    replicas.push(Replica {
                        worker: DemoWorker::start(&env_refs),
                        started: Instant::now(),
                        stopped: None,
                        exited: None,
                    });
                }
            } else {
                let mut running = running;
                for _ in desired..current {
                    let pick = match scenario.victims {
                        Victims::Random => rng.usize(..running.len()),
                        // The ReplicaSet removes the lowest pod-deletion-cost first,
                        // ties at random: the replica with the fewest jobs in flight.
                        Victims::IdleFirst => {
                            let loads: Vec<usize> =
                                running.iter().map(|&i| replicas[i].in_flight()).collect();
                            let least = loads.iter().copied().min().unwrap_or(0);
                            let idle: Vec<usize> =
                                (0..running.len()).filter(|&k| loads[k] == least).collect();
                            idle[rng.usize(..idle.len())]
                        }
                    };
                    let victim = running.swap_remove(pick);
                    let r = &mut replicas[victim];
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
        tokio::time::sleep(tick).await;
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
    let (mut short, mut excess) = (0.0, 0.0);
    for p in &polls {
        if let Some(backlog) = p.backlog {
            let need = backlog.div_ceil(u64::from(scenario.concurrency.max(1)));
            let alive = u64::from(p.alive);
            short += need.saturating_sub(alive) as f64 * step;
            excess += alive.saturating_sub(need) as f64 * step;
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

    fn spec() -> ScalerSpec {
        ScalerSpec::compressed(4)
    }

    #[tokio::test(start_paused = true)]
    async fn wakes_from_zero_on_one_job_and_scales_up_at_once() {
        let mut a = Autoscaler::new(spec());
        let now = Instant::now();
        assert_eq!(a.decide(now, Some(0.0), 0), (0, Why::Idle));
        assert_eq!(a.decide(now, Some(1.0), 0), (1, Why::Activate));
        // ceil(13 / 4) = 4, at once.
        assert_eq!(a.decide(now, Some(13.0), 1), (4, Why::Hpa));
        // Within the 10 % tolerance: 4 replicas for a backlog of 17 stay 4.
        assert_eq!(a.decide(now, Some(17.0), 4), (4, Why::Hpa));
        // Within the scale-up period that began at 1 replica: at most 5.
        assert_eq!(a.decide(now, Some(100.0), 4), (5, Why::Hpa));
        // Next period, above the maximum: clamped.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(a.decide(Instant::now(), Some(100.0), 5), (8, Why::Hpa));
    }

    #[tokio::test(start_paused = true)]
    async fn scales_down_only_after_the_stabilization_window_and_to_zero_after_cooldown() {
        let mut a = Autoscaler::new(spec());
        assert_eq!(a.decide(Instant::now(), Some(16.0), 4), (4, Why::Hpa));
        // The backlog drops to 4: the window still holds the recommendation of 4.
        for _ in 0..6 {
            tokio::time::advance(Duration::from_secs(1)).await;
            assert_eq!(a.decide(Instant::now(), Some(4.0), 4), (4, Why::Hpa));
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(a.decide(Instant::now(), Some(4.0), 4), (1, Why::Hpa));
        // Idle: one replica (the HPA's floor) until the cooldown has passed.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(1)).await;
            assert_eq!(a.decide(Instant::now(), Some(0.0), 1), (1, Why::Hpa));
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(a.decide(Instant::now(), Some(0.0), 1), (0, Why::Deactivate));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_reads_hold_the_pool_then_fall_back_to_at_least_the_fallback() {
        let mut a = Autoscaler::new(spec());
        let now = Instant::now();
        // More than three failures: the 4th applies the fallback.
        for _ in 0..3 {
            assert_eq!(a.decide(now, None, 3), (3, Why::Hold));
        }
        assert_eq!(a.decide(now, None, 3), (3, Why::Fallback));
        assert_eq!(a.decide(now, None, 0), (0, Why::Hold));
        // currentReplicasIfHigher: below the fallback, the fallback.
        let mut b = Autoscaler::new(ScalerSpec {
            fallback: Some(Fallback {
                failure_threshold: 1,
                replicas: 2,
            }),
            ..spec()
        });
        assert_eq!(b.decide(now, None, 1), (1, Why::Hold));
        assert_eq!(b.decide(now, None, 1), (2, Why::Fallback));
        // A good read resets the count: at target, two replicas stay two.
        assert_eq!(b.decide(now, Some(8.0), 2), (2, Why::Hpa));
        assert_eq!(b.decide(now, None, 2), (2, Why::Hold));
        assert_eq!(b.decide(now, None, 2), (2, Why::Fallback));
    }

    #[tokio::test(start_paused = true)]
    async fn scale_up_grows_at_most_by_the_default_policies_per_period() {
        let mut a = Autoscaler::new(ScalerSpec { max: 20, ..spec() });
        // From 1: max(2 × 1, 1 + 4) = 5, though the backlog asks for 20.
        assert_eq!(a.decide(Instant::now(), Some(80.0), 1), (5, Why::Hpa));
        // Within the same period the start is still 1: no more.
        assert_eq!(a.decide(Instant::now(), Some(80.0), 5), (5, Why::Hpa));
        // A new period from 5: max(10, 9) = 10, then 20.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(a.decide(Instant::now(), Some(80.0), 5), (10, Why::Hpa));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(a.decide(Instant::now(), Some(80.0), 10), (20, Why::Hpa));
    }

    #[tokio::test(start_paused = true)]
    async fn recommendations_outlive_a_stay_at_zero() {
        let mut a = Autoscaler::new(spec());
        assert_eq!(a.decide(Instant::now(), Some(16.0), 4), (4, Why::Hpa));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(a.decide(Instant::now(), Some(0.0), 1), (0, Why::Deactivate));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(a.decide(Instant::now(), Some(0.5), 0), (1, Why::Activate));
        // Three replicas (scaled by hand, say): the recommendation of 4 from 4.5 s ago
        // is still in the 6 s window, so the HPA holds them.
        assert_eq!(a.decide(Instant::now(), Some(0.5), 3), (3, Why::Hpa));
    }

    #[tokio::test(start_paused = true)]
    async fn without_fallback_failed_reads_only_hold() {
        let mut a = Autoscaler::new(ScalerSpec {
            fallback: None,
            ..spec()
        });
        for _ in 0..10 {
            assert_eq!(a.decide(Instant::now(), None, 2), (2, Why::Hold));
        }
    }

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[7], 99.0), 7);
    }
}
