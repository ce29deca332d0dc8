//! A fault-injection soak: a pool of real `demo-worker` processes runs thousands of
//! jobs of mixed length and outcome on two weighted queues while faults are injected
//! at random; at the end every job is reconciled from the workers' event lines and
//! the broker's final state (see [`reconcile`](mod@reconcile) for what is asserted, defined
//! precisely).
//!
//! Every random choice (the jobs, the faults, their order and durations) comes from
//! one seed, printed first: `SOAK_SEED=<seed>` replays it. `SOAK_MINUTES` sets how
//! long faults are injected.
//!
//! Faults, on every backend: kill -9 of a worker, SIGTERM of a worker (both replaced
//! at once), connections cut or stalled by a [`ChaosProxy`] between the workers and
//! the broker, and the broker process stopped with SIGSTOP for longer than a lease.
//! On Redis also: a restart (clean shutdown, or kill -9) of a Redis with an
//! append-only file fsynced on every write, and Redis at its `maxmemory` with
//! `noeviction`. On RabbitMQ instead: a node stop and start, and a memory alarm
//! (publishers blocked).

pub mod proxy;
pub mod reconcile;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use worker_amqp::{AmqpConfig, QueueType};
use worker_core::{Broker, BrokerError, NewJob};

/// How long the backlog must read zero before the pool is stopped.
const BACKLOG_ZERO_FOR: Duration = Duration::from_secs(5);

pub use proxy::ChaosProxy;
pub use reconcile::{reconcile, FinalState, Kind, Planned, ProcRecord, Verdict};

use crate::{since_epoch_ms, DemoWorker, RabbitNode, RedisServer};

/// Which broker the pool runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A test-owned Redis.
    Redis,
    /// A test-owned RabbitMQ node, classic queues.
    RabbitClassic,
    /// A test-owned RabbitMQ node, quorum queues.
    RabbitQuorum,
}

/// A soak's settings.
#[derive(Clone, Debug)]
pub struct Soak {
    /// The broker.
    pub backend: Backend,
    /// The seed of every random choice.
    pub seed: u64,
    /// How long faults are injected.
    pub duration: Duration,
    /// Jobs enqueued over the first part of it.
    pub jobs: usize,
    /// Worker processes running at once.
    pub workers: usize,
    /// Each worker's `WORKER_CONCURRENCY`.
    pub concurrency: u32,
    /// Each worker's `WORKER_LEASE`.
    pub lease: Duration,
}

impl Soak {
    /// The short soak of the test suite: `minutes` of faults (or `SOAK_MINUTES`), 2,000
    /// jobs a minute, three workers; the seed from `SOAK_SEED` or fresh.
    pub fn new(backend: Backend, minutes: f64) -> Self {
        let minutes = std::env::var("SOAK_MINUTES")
            .ok()
            .and_then(|m| m.parse::<f64>().ok())
            .unwrap_or(minutes);
        let seed = std::env::var("SOAK_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        Self {
            backend,
            seed,
            duration: Duration::from_secs_f64(minutes * 60.0),
            jobs: ((minutes * 2000.0) as usize).max(200),
            workers: 3,
            concurrency: 6,
            lease: Duration::from_secs(3),
        }
    }

    /// Run it; returns the verdict (the caller asserts it has no problems). Prints the
    /// seed first and the figures last.
    pub async fn run(self) -> Outcome {
        eprintln!(
            "soak seed: {} ({:?}; replay with SOAK_SEED={})",
            self.seed, self.backend, self.seed
        );
        let mut run = Run::start(self).await;
        run.inject().await;
        run.finish().await
    }
}

/// What a soak found.
pub struct Outcome {
    /// The seed it ran with.
    pub seed: u64,
    /// The reconciliation.
    pub verdict: Verdict,
    /// The faults injected, in order, with their times.
    pub timeline: Vec<String>,
}

impl Outcome {
    /// The figures on one line.
    pub fn figures(&self) -> String {
        let mut out = format!("seed={}", self.seed);
        for (k, v) in &self.verdict.figures {
            let _ = write!(out, " {k}={v}");
        }
        out
    }

    /// The seed, the figures, the problems (each naming its job and its history) and
    /// the fault timeline, unless every promise held.
    pub fn failure(&self) -> Option<String> {
        if self.verdict.problems.is_empty() {
            return None;
        }
        let shown = self.verdict.problems.len().min(40);
        Some(format!(
            "soak failed (replay with SOAK_SEED={}): {} problems\nfigures: {}\n{}\nfaults:\n{}",
            self.seed,
            self.verdict.problems.len(),
            self.figures(),
            self.verdict.problems[..shown].join("\n"),
            self.timeline.join("\n")
        ))
    }

    /// Panic with [`Outcome::failure`], if any.
    pub fn assert_clean(&self) {
        if let Some(failure) = self.failure() {
            panic!("{failure}");
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillWorker,
    TermWorker,
    CutConnections,
    StallConnections,
    PauseBroker,
    RestartBroker,
    KillBroker,
    MemoryFull,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Self::KillWorker => "fault_kill_worker",
            Self::TermWorker => "fault_term_worker",
            Self::CutConnections => "fault_cut_connections",
            Self::StallConnections => "fault_stall_connections",
            Self::PauseBroker => "fault_pause_broker",
            Self::RestartBroker => "fault_restart_broker",
            Self::KillBroker => "fault_kill_broker",
            Self::MemoryFull => "fault_memory_full",
        }
    }
}

/// The faults of `backend`, each with its weight.
fn faults(backend: Backend) -> Vec<(Fault, u32)> {
    let mut all = vec![
        (Fault::KillWorker, 4),
        (Fault::TermWorker, 2),
        (Fault::CutConnections, 2),
        (Fault::StallConnections, 2),
        (Fault::PauseBroker, 1),
        (Fault::RestartBroker, 1),
        (Fault::MemoryFull, 1),
    ];
    if backend == Backend::Redis {
        all.push((Fault::KillBroker, 1));
    }
    all
}

enum Server {
    Redis(RedisServer),
    Rabbit(RabbitNode),
}

impl Server {
    fn addr(&self) -> SocketAddr {
        let port = match self {
            Self::Redis(r) => r.port,
            Self::Rabbit(n) => n.port,
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// The processes to stop for a pause: the server and everything it started.
    fn pids(&self) -> Vec<u32> {
        match self {
            Self::Redis(r) => r.pid().into_iter().collect(),
            Self::Rabbit(n) => n.pids(),
        }
    }
}

struct Proc {
    worker: DemoWorker,
    killed_at_ms: Option<u64>,
}

struct Run {
    soak: Soak,
    rng: fastrand::Rng,
    server: Option<Server>,
    proxy: ChaosProxy,
    broker: Arc<dyn Broker>,
    queues: [String; 2],
    env: Vec<(String, String)>,
    plan: Vec<(Planned, NewJob)>,
    enqueued: usize,
    procs: Vec<Proc>,
    live: Vec<usize>,
    counts: BTreeMap<&'static str, u64>,
    timeline: Vec<String>,
    began: Instant,
}

impl Run {
    async fn start(soak: Soak) -> Self {
        let setup = Instant::now();
        let mut rng = fastrand::Rng::with_seed(soak.seed);
        let tag = worker_core::testing::unique("soak");
        let (server, broker, queues, mut env): (Server, Arc<dyn Broker>, _, Vec<(String, String)>) =
            match soak.backend {
                Backend::Redis => {
                    let server = tokio::task::spawn_blocking(RedisServer::start)
                        .await
                        .unwrap_or_else(|e| panic!("redis: {e}"));
                    let broker = worker_redis::RedisConfig::new(server.url())
                        .prefix(&tag)
                        .connect()
                        .await
                        .unwrap_or_else(|e| panic!("redis: {e}"));
                    let env = vec![("REDIS_PREFIX".to_owned(), tag.clone())];
                    (
                        Server::Redis(server),
                        Arc::new(broker),
                        ["a".to_owned(), "b".to_owned()],
                        env,
                    )
                }
                Backend::RabbitClassic | Backend::RabbitQuorum => {
                    let node = tokio::task::spawn_blocking(RabbitNode::start_with_management)
                        .await
                        .unwrap_or_else(|e| panic!("rabbit: {e}"));
                    let kind = if soak.backend == Backend::RabbitQuorum {
                        "quorum"
                    } else {
                        "classic"
                    };
                    let management = node.management_url();
                    let broker = AmqpConfig::new(node.url())
                        .default_queue_type(if kind == "quorum" {
                            QueueType::Quorum
                        } else {
                            QueueType::Classic
                        })
                        .management_url(&management)
                        .connect()
                        .await
                        .unwrap_or_else(|e| panic!("rabbitmq: {e}"));
                    let env = vec![
                        ("AMQP_QUEUE_TYPE".to_owned(), kind.to_owned()),
                        ("AMQP_MANAGEMENT_URL".to_owned(), management),
                    ];
                    let queues = [format!("{tag}-a"), format!("{tag}-b")];
                    (Server::Rabbit(node), Arc::new(broker), queues, env)
                }
            };
        let proxy = ChaosProxy::start(server.addr()).await;
        match soak.backend {
            Backend::Redis => env.push(("REDIS_URL".into(), format!("redis://{}", proxy.addr))),
            _ => env.push((
                "AMQP_URL".into(),
                format!("amqp://guest:guest@{}/%2f", proxy.addr),
            )),
        }
        let lease_ms = soak.lease.as_millis();
        env.extend(
            [
                ("WORKER_POOL", "soak".to_owned()),
                ("WORKER_QUEUES", format!("{}:3,{}:1", queues[0], queues[1])),
                ("WORKER_CONCURRENCY", soak.concurrency.to_string()),
                ("WORKER_LEASE", format!("{lease_ms}ms")),
                ("WORKER_DRAIN_TIMEOUT", "2s".to_owned()),
                ("WORKER_REAP_INTERVAL", "1s".to_owned()),
                ("WORKER_RETRY_BASE", "50ms".to_owned()),
                ("WORKER_RETRY_CAP", "1s".to_owned()),
                ("RUST_LOG", "warn,lapin=off".to_owned()),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        );
        let plan = plan_jobs(&mut rng, &soak, &queues);
        let mut run = Self {
            rng,
            server: Some(server),
            proxy,
            broker,
            queues,
            env,
            plan,
            enqueued: 0,
            procs: Vec::new(),
            live: Vec::new(),
            counts: BTreeMap::new(),
            timeline: Vec::new(),
            began: Instant::now(),
            soak,
        };
        for _ in 0..run.soak.workers {
            run.spawn_worker();
        }
        for p in &run.procs {
            p.worker.wait_listening().await;
        }
        run.began = Instant::now();
        run.note(format!("set up in {:?}", setup.elapsed()));
        run
    }

    fn spawn_worker(&mut self) {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.live.push(self.procs.len());
        self.procs.push(Proc {
            worker: DemoWorker::start(&env),
            killed_at_ms: None,
        });
    }

    /// Add to the fault timeline, on the clock of the workers' events (`_at_ms`).
    fn note(&mut self, what: String) {
        let at = since_epoch_ms(Instant::now());
        self.timeline.push(format!("  {at:>8} ms  {what}"));
    }

    /// Enqueue the plan's jobs up to `upto`, in batches, through a connection of the
    /// test's own (not the proxy). Broker faults are never under way here.
    async fn enqueue_upto(&mut self, upto: usize) {
        while self.enqueued < upto {
            let end = upto.min(self.enqueued + 200);
            let batch: Vec<NewJob> = self.plan[self.enqueued..end]
                .iter()
                .map(|(_, job)| job.clone())
                .collect();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match self.broker.enqueue(batch.clone()).await {
                    Ok(_) => break,
                    // An earlier try that failed late may have stored the batch.
                    Err(BrokerError::DuplicateJob { .. }) => {
                        self.enqueue_one_by_one(&batch).await;
                        break;
                    }
                    Err(e) if Instant::now() < deadline => {
                        self.note(format!("enqueue failed, retrying: {e}"));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => panic!("enqueue: {e}"),
                }
            }
            self.enqueued = end;
        }
    }

    async fn enqueue_one_by_one(&mut self, batch: &[NewJob]) {
        for job in batch {
            match self.broker.enqueue(vec![job.clone()]).await {
                Ok(_) | Err(BrokerError::DuplicateJob { .. }) => {}
                Err(e) => panic!("enqueue: {e}"),
            }
        }
    }

    async fn inject(&mut self) {
        let menu = faults(self.soak.backend);
        let total: u32 = menu.iter().map(|(_, w)| w).sum();
        let feed = self.soak.duration.mul_f64(0.6);
        while self.began.elapsed() < self.soak.duration {
            let share = (self.began.elapsed().as_secs_f64() / feed.as_secs_f64()).min(1.0);
            self.enqueue_upto((self.plan.len() as f64 * share) as usize)
                .await;
            let quiet = self.rng.u64(300..2500);
            tokio::time::sleep(Duration::from_millis(quiet)).await;
            let mut pick = self.rng.u32(0..total);
            let fault = menu
                .iter()
                .find(|(_, w)| {
                    let hit = pick < *w;
                    pick = pick.saturating_sub(*w);
                    hit
                })
                .map_or(Fault::KillWorker, |(f, _)| *f);
            *self.counts.entry(fault.name()).or_default() += 1;
            self.apply(fault).await;
        }
        let all = self.plan.len();
        self.enqueue_upto(all).await;
    }

    async fn apply(&mut self, fault: Fault) {
        let lease = self.soak.lease;
        match fault {
            Fault::KillWorker | Fault::TermWorker => {
                let slot = self.rng.usize(0..self.live.len());
                let index = self.live.swap_remove(slot);
                let proc = &mut self.procs[index];
                if fault == Fault::KillWorker {
                    proc.killed_at_ms = Some(since_epoch_ms(Instant::now()));
                    proc.worker.signal("KILL");
                    proc.worker.wait_exit(Duration::from_secs(10)).await;
                } else {
                    proc.worker.signal("TERM");
                }
                self.note(format!("{fault:?} worker#{index}"));
                self.spawn_worker();
            }
            Fault::CutConnections => {
                self.proxy.cut();
                self.note("cut every connection".into());
            }
            Fault::StallConnections => {
                let ms = self.rng.u64(300..lease.as_millis() as u64 * 3 / 2);
                self.note(format!("stall connections for {ms} ms"));
                self.proxy.stall(Duration::from_millis(ms)).await;
            }
            Fault::PauseBroker => {
                let ms = lease.as_millis() as u64 + self.rng.u64(500..2000);
                let pids = self.server.as_ref().map(Server::pids).unwrap_or_default();
                self.note(format!("SIGSTOP broker {pids:?} for {ms} ms"));
                signal_all(&pids, "STOP");
                tokio::time::sleep(Duration::from_millis(ms)).await;
                signal_all(&pids, "CONT");
            }
            Fault::RestartBroker | Fault::KillBroker => {
                let down = Duration::from_millis(self.rng.u64(200..2000));
                self.note(format!("{fault:?}, down for {down:?}"));
                let hard = fault == Fault::KillBroker;
                let server = self.server.take().unwrap_or_else(|| panic!("no server"));
                let server = tokio::task::spawn_blocking(move || restart(server, hard, down))
                    .await
                    .unwrap_or_else(|e| panic!("restart: {e}"));
                self.server = Some(server);
            }
            Fault::MemoryFull => {
                let ms = self.rng.u64(500..3000);
                self.note(format!("broker memory full for {ms} ms"));
                let server = self.server.take().unwrap_or_else(|| panic!("no server"));
                let server = tokio::task::spawn_blocking(move || {
                    memory_full(&server, true);
                    std::thread::sleep(Duration::from_millis(ms));
                    memory_full(&server, false);
                    server
                })
                .await
                .unwrap_or_else(|e| panic!("memory: {e}"));
                self.server = Some(server);
            }
        }
    }

    async fn backlog(&self) -> Option<u64> {
        let mut left = 0;
        for q in &self.queues {
            let d = self.broker.depth(q).await.ok()?;
            left += d.pending + d.in_flight + d.delayed;
        }
        Some(left)
    }

    async fn finish(mut self) -> Outcome {
        self.note("faults stop; waiting for the backlog to drain".into());
        // Stuck jobs do not end the wait with a panic: the reconciliation names them.
        // Zero must hold a while: on RabbitMQ the delayed jobs other processes' movers
        // hold are counted through the management API, whose statistics trail.
        let deadline = Instant::now() + Duration::from_secs(120) + self.soak.duration / 4;
        let mut zero_since: Option<Instant> = None;
        while Instant::now() < deadline {
            if self.backlog().await == Some(0) {
                if zero_since.get_or_insert_with(Instant::now).elapsed() >= BACKLOG_ZERO_FOR {
                    break;
                }
            } else {
                zero_since = None;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.note("stopping the pool".into());
        for &i in &self.live {
            self.procs[i].worker.signal("TERM");
        }
        for p in &mut self.procs {
            p.worker.wait_exit(Duration::from_secs(30)).await;
        }
        self.note("every worker exited".into());
        let mut end = FinalState::default();
        for q in &self.queues {
            let depth = self
                .broker
                .depth(q)
                .await
                .unwrap_or_else(|e| panic!("depth: {e}"));
            end.depth.insert(q.clone(), depth);
            end.dead.extend(
                self.broker
                    .dead_letters(q, 1_000_000)
                    .await
                    .unwrap_or_else(|e| panic!("dead letters: {e}")),
            );
        }
        self.note("final state read".into());
        let records: Vec<ProcRecord> = self
            .procs
            .iter()
            .map(|p| ProcRecord {
                events: p.worker.events(),
                killed_at_ms: p.killed_at_ms,
            })
            .collect();
        let plan: Vec<Planned> = self.plan.iter().map(|(p, _)| p.clone()).collect();
        let mut verdict = reconcile(&plan, &records, &end);
        verdict
            .figures
            .insert("workers_started", self.procs.len() as u64);
        verdict
            .figures
            .insert("seconds", self.began.elapsed().as_secs());
        for (k, v) in &self.counts {
            verdict.figures.insert(k, *v);
        }
        if !verdict.problems.is_empty() {
            // Each worker's log beside the verdict, for the on-call reading a failure.
            let dir = std::env::temp_dir()
                .join(format!("soak-{}-{:?}", self.soak.seed, self.soak.backend));
            let _ = std::fs::create_dir_all(&dir);
            for (i, p) in self.procs.iter().enumerate() {
                let _ = std::fs::write(dir.join(format!("worker-{i}.log")), p.worker.stderr());
            }
            self.note(format!("worker logs in {}", dir.display()));
        }
        let outcome = Outcome {
            seed: self.soak.seed,
            verdict,
            timeline: std::mem::take(&mut self.timeline),
        };
        eprintln!(
            "soak figures ({:?}): {}",
            self.soak.backend,
            outcome.figures()
        );
        outcome
    }
}

/// The jobs, in enqueue order: 72% succeed, 12% retry once or twice then succeed,
/// 5% run longer than a lease, 6% fail fatally, 5% fail every attempt; 3:1 over the
/// two queues.
fn plan_jobs(rng: &mut fastrand::Rng, soak: &Soak, queues: &[String; 2]) -> Vec<(Planned, NewJob)> {
    let lease_ms = soak.lease.as_millis() as u64;
    (0..soak.jobs)
        .map(|i| {
            let queue = queues[usize::from(rng.u8(0..4) == 0)].clone();
            let roll = rng.u32(0..100);
            let kind = match roll {
                0..72 => Kind::Ok,
                72..84 => Kind::RetryThenOk(rng.u32(1..=2)),
                84..89 => Kind::Long,
                89..95 => Kind::Fatal,
                _ => Kind::Exhaust,
            };
            let sleep_ms = match kind {
                Kind::Long => rng.u64(lease_ms * 2 / 3..lease_ms * 2),
                _ => rng.u64(0..120),
            };
            let (outcome, fail_times, attempts) = match kind {
                Kind::Ok | Kind::Long => ("ok", 0, 30),
                Kind::RetryThenOk(n) => ("ok", n, 30),
                Kind::Fatal => ("fatal", 0, 30),
                Kind::Exhaust => ("retry", 0, 3),
            };
            let id = format!("j{i:06}");
            let payload =
                json!({"sleep_ms": sleep_ms, "outcome": outcome, "fail_times": fail_times});
            let job = NewJob::json(&queue, &payload)
                .unwrap_or_else(|e| panic!("payload: {e}"))
                .id(id.as_str())
                .max_attempts(attempts);
            (Planned { id, queue, kind }, job)
        })
        .collect()
}

fn signal_all(pids: &[u32], signal: &str) {
    for pid in pids {
        let _ = std::process::Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status();
    }
}

/// Stop the broker (cleanly, or with SIGKILL when `hard`), keep it down for `down`,
/// start it again on the same data.
fn restart(mut server: Server, hard: bool, down: Duration) -> Server {
    match &mut server {
        Server::Redis(r) => {
            if hard {
                r.kill();
            } else {
                r.stop();
            }
            std::thread::sleep(down);
            r.start_again();
        }
        Server::Rabbit(n) => n.restart(down),
    }
    server
}

/// Fill the broker's memory budget (`on`) or lift it: Redis's `maxmemory` at what it
/// uses now with `noeviction`; RabbitMQ's memory high watermark near 0, which raises
/// the memory alarm and blocks publishers.
fn memory_full(server: &Server, on: bool) {
    match server {
        Server::Redis(r) => {
            let limit = if on {
                let info = r.cli(&["info", "memory"]);
                info.lines()
                    .find_map(|l| l.strip_prefix("used_memory:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map_or("1".to_owned(), |used| (used / 2).to_string())
            } else {
                "0".to_owned()
            };
            r.cli(&["config", "set", "maxmemory-policy", "noeviction"]);
            r.cli(&["config", "set", "maxmemory", &limit]);
        }
        Server::Rabbit(n) => n.memory_alarm(on),
    }
}
