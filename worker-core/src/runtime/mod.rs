//! The worker: fetch loop, job supervision, background tasks, drain.

mod background;
mod deletion_cost;
mod fetcher;
mod job;
mod leases;
pub(crate) mod limits;
mod meters;
mod quiet;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, WorkerInfo};
use crate::config::WorkerConfig;
use crate::error::WorkerError;
use crate::handler::Handler;
use crate::job::JobId;
use crate::kubernetes::PodApi;
use crate::lifecycle::{install_signal_handlers, Lifecycle, ShutdownHandle, State};
use crate::scheduler::Scheduler;
use crate::telemetry::{self, http, names, Outcome};
use limits::Limits;

/// What happened during a worker's run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunReport {
    /// Jobs acked.
    pub ok: u64,
    /// Jobs scheduled for retry.
    pub retried: u64,
    /// Jobs dead-lettered.
    pub dead: u64,
    /// Jobs given back to pending, attempt not counted.
    pub released: u64,
    /// Jobs whose outcome could not be recorded (lease lost, broker refused).
    pub failed: u64,
    /// Whether every running job finished before the drain deadline.
    pub clean_drain: bool,
}

#[derive(Debug, Default)]
struct Counts([AtomicU64; 5]);

impl Counts {
    fn add(&self, outcome: Outcome) {
        // Plain tallies for the report; nothing else is ordered by them.
        self.0[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }
    fn get(&self, outcome: Outcome) -> u64 {
        self.0[outcome as usize].load(Ordering::Relaxed)
    }
}

/// One job's outcome as the worker settled it, handed to the
/// [`on_settled`](Worker::on_settled) callback.
///
/// It is reported after the settling call returned: for [`Outcome::Ok`] the broker
/// confirmed the ack (as far as its protocol can, see [`Worker::on_settled`]), for [`Outcome::Retried`], [`Outcome::Dead`] and
/// [`Outcome::Released`] it confirmed the retry, the dead letter or the release.
/// [`Outcome::Failed`] means nothing was recorded (the lease was lost, or the broker
/// kept refusing until the lease would have expired): the broker redelivers the job.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Settled {
    /// The job's id.
    pub id: JobId,
    /// Its queue.
    pub queue: String,
    /// The attempt that was settled (1 for the first run).
    pub attempt: u32,
    /// How it was settled.
    pub outcome: Outcome,
}

type OnSettled = Arc<dyn Fn(&Settled) + Send + Sync>;

/// State every task of one worker shares.
pub(crate) struct Shared<H> {
    pub(crate) config: WorkerConfig,
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) handler: Arc<H>,
    pub(crate) life: Arc<Lifecycle>,
    pub(crate) sched: Mutex<Scheduler>,
    pub(crate) limits: Limits,
    /// Every lease this worker holds, kept by one task.
    pub(crate) leases: leases::Leases,
    /// The metric handles each job records through.
    pub(crate) meters: meters::Meters,
    /// Signalled when a job settles, so a fetcher blocked on per-queue limits retries.
    pub(crate) job_done: Notify,
    pub(crate) running: AtomicU32,
    /// Whether this worker is quiet (see [`WorkerConfig::quiet_surplus`]); the fetch
    /// loop follows it.
    pub(crate) quiet: watch::Sender<bool>,
    /// The pod-deletion cost as last published (from `running` and `quiet`), for the
    /// task that keeps the annotation current.
    cost: watch::Sender<u32>,
    /// Asks the heartbeat to write the registry entry now: the quiet or draining state
    /// changed, and peers rank by it.
    pub(crate) beat_now: Notify,
    pub(crate) worker_id: String,
    /// Start time, ms since the Unix epoch, as the registry shows it.
    started_at_ms: u64,
    counts: Counts,
    on_settled: Option<OnSettled>,
}

impl<H> Shared<H> {
    pub(crate) fn sched(&self) -> MutexGuard<'_, Scheduler> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a settled job and tell the [`Worker::on_settled`] callback.
    pub(crate) fn record(&self, settled: Settled) {
        let Settled { queue, outcome, .. } = &settled;
        let (queue, outcome) = (queue.as_str(), *outcome);
        self.counts.add(outcome);
        self.meters.queue(queue).settled(outcome);
        if let Some(f) = &self.on_settled {
            f(&settled);
        }
    }

    pub(crate) fn broker_error(&self, op: &'static str) {
        metrics::counter!(names::BROKER_ERRORS, names::POOL => self.config.pool.clone(), names::OP => op)
            .increment(1);
    }

    /// Refresh the process gauges after a job starts or ends.
    pub(crate) fn publish_load(&self) {
        // Only a gauge reading; no data is published through this counter.
        let running = self.running.load(Ordering::Relaxed);
        let m = &self.meters;
        m.in_flight.set(f64::from(running));
        self.publish_cost();
        m.utilization
            .set(f64::from(running) / f64::from(self.config.concurrency));
        if let Some((used, total)) = self.limits.budget_used() {
            m.budget_used.set(f64::from(used));
            m.budget_total.set(f64::from(total));
        }
    }

    /// Publish the pod-deletion cost of the current count and quiet state.
    fn publish_cost(&self) {
        // Loaded again under the channel's lock: of two jobs ending together, the one
        // publishing last sends the newer cost, never a stale one.
        self.cost.send_if_modified(|seen| {
            let now = deletion_cost::cost(
                self.config.quiet_surplus,
                self.running.load(Ordering::Relaxed),
                *self.quiet.borrow(),
            );
            let changed = *seen != now;
            *seen = now;
            changed
        });
    }

    /// Set the quiet state; `true` when it changed. A change is published at once: to
    /// the fetch loop, the `worker_quiet` gauge, the pod-deletion cost and the registry.
    pub(crate) fn set_quiet(&self, quiet: bool) -> bool {
        let changed = self.quiet.send_if_modified(|q| {
            let changed = *q != quiet;
            *q = quiet;
            changed
        });
        if changed {
            metrics::gauge!(names::QUIET, names::POOL => self.config.pool.clone()).set(if quiet {
                1.0
            } else {
                0.0
            });
            self.publish_cost();
            self.beat_now.notify_one();
        }
        changed
    }

    pub(crate) fn worker_info(&self) -> WorkerInfo {
        let mut info = WorkerInfo::new(
            self.worker_id.clone(),
            self.config.pool.clone(),
            self.config.queue_names(),
        );
        info.host = hostname();
        info.concurrency = self.config.concurrency;
        info.in_flight = self.running.load(Ordering::Relaxed);
        info.draining = self.life.drain.is_cancelled();
        info.quiet = *self.quiet.borrow();
        info.started_at_ms = self.started_at_ms;
        info
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// A worker: a broker, a configuration and a handler.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use worker_core::{handler_fn, Broker, Job, JobError, MemoryBroker, NewJob, Worker, WorkerConfig};
///
/// let broker = MemoryBroker::new();
/// broker.enqueue(vec![NewJob::json("default", &"hello")?]).await?;
///
/// let config = WorkerConfig::builder().http_addr(None).build()?;
/// let worker = Worker::new(broker.clone(), config, handler_fn(|job: Job<String>| async move {
///     assert_eq!(job.payload, "hello");
///     Ok::<_, JobError>(())
/// }))
/// .spawn()
/// .await?;
///
/// while broker.depth("default").await?.backlog() > 0 {
///     tokio::time::sleep(std::time::Duration::from_millis(5)).await;
/// }
/// worker.shutdown_handle().drain();
/// let report = worker.join().await?;
/// assert_eq!(report.ok, 1);
/// # Ok(()) }
/// ```
pub struct Worker<H> {
    config: WorkerConfig,
    broker: Arc<dyn Broker>,
    handler: Arc<H>,
    life: Arc<Lifecycle>,
    on_settled: Option<OnSettled>,
}

impl<H: Handler> Worker<H> {
    /// A worker for `broker` running `handler` under `config`.
    pub fn new(broker: impl Broker, config: WorkerConfig, handler: H) -> Self {
        Self::with_shared_broker(Arc::new(broker), config, handler)
    }

    /// A worker on a broker shared with other parts of the program.
    pub fn with_shared_broker(broker: Arc<dyn Broker>, config: WorkerConfig, handler: H) -> Self {
        Self {
            config,
            broker,
            handler: Arc::new(handler),
            life: Lifecycle::new(),
            on_settled: None,
        }
    }

    /// Call `f` with each job's [`Settled`] outcome once the broker confirmed it (an
    /// ack that landed, a retry, a dead letter or a release that was stored), or with
    /// [`Outcome::Failed`] when nothing could be recorded. A job's handler returning
    /// `Ok` is not yet a success; this call is.
    ///
    /// "Confirmed" is as much as the backend's protocol gives: Redis answers every
    /// call; AMQP 0-9-1 has no reply to an ack, so on RabbitMQ `ok` means the ack was
    /// handed to a live channel, and one lost with its connection brings the job back.
    ///
    /// `f` runs on the job's task, after the settling call and before the job's slot
    /// is counted free: keep it short and non-blocking (send to a channel for
    /// anything slower). One call per settled job; a process that dies between the
    /// broker's answer and the call loses that call, never the job.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use worker_core::telemetry::Outcome;
    /// use worker_core::{handler_fn, Broker, Job, JobError, MemoryBroker, NewJob, Worker, WorkerConfig};
    ///
    /// let broker = MemoryBroker::new();
    /// broker.enqueue(vec![NewJob::json("default", &1)?]).await?;
    /// let (tx, mut settled) = tokio::sync::mpsc::unbounded_channel();
    /// let config = WorkerConfig::builder().http_addr(None).build()?;
    /// let handler = handler_fn(|_: Job<u32>| async { Ok::<_, JobError>(()) });
    /// let worker = Worker::new(broker.clone(), config, handler)
    ///     .on_settled(move |s| {
    ///         let _ = tx.send(s.clone());
    ///     })
    ///     .spawn()
    ///     .await?;
    /// let first = settled.recv().await.expect("one job settles");
    /// assert_eq!((first.attempt, first.outcome), (1, Outcome::Ok));
    /// worker.shutdown_handle().drain();
    /// worker.join().await?;
    /// # Ok(()) }
    /// ```
    pub fn on_settled(mut self, f: impl Fn(&Settled) + Send + Sync + 'static) -> Self {
        self.on_settled = Some(Arc::new(f));
        self
    }

    /// A handle that can drain or force-stop the worker once it runs.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            life: self.life.clone(),
        }
    }

    /// Run until SIGTERM/SIGINT, then drain (a second signal releases everything and
    /// exits). Returns after the drain; the caller exits 0.
    pub async fn run_until_signal(self) -> Result<RunReport, WorkerError> {
        let signals =
            install_signal_handlers(self.shutdown_handle()).map_err(WorkerError::Signals)?;
        let result = self.run().await;
        signals.close();
        result
    }

    /// Run until the [`ShutdownHandle`] asks it to stop.
    pub async fn run(self) -> Result<RunReport, WorkerError> {
        self.spawn().await?.join().await
    }

    /// Start the worker in the background: bind the HTTP listener, register, and
    /// begin fetching. Configuration and listener errors are returned here, as are
    /// service-account files that [`pod_deletion_cost`](WorkerConfig::pod_deletion_cost)
    /// needs and cannot read.
    pub async fn spawn(self) -> Result<RunningWorker, WorkerError> {
        self.config.validate()?;
        let pod_api = match &self.config.pod_deletion_cost {
            Some(cost) => Some((PodApi::connect(cost).await?, cost.interval)),
            None => None,
        };
        let listener = match self.config.http_addr {
            Some(addr) => Some(
                http::bind(addr)
                    .await
                    .map_err(|source| WorkerError::Listen { addr, source })?,
            ),
            None => None,
        };
        let http_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        if listener.is_some() {
            telemetry::prometheus();
        }
        let shared = Arc::new(Shared {
            sched: Mutex::new(Scheduler::new(&self.config.queues, self.config.scheduling)),
            limits: Limits::new(&self.config),
            leases: leases::Leases::new(self.config.lease),
            meters: meters::Meters::new(&self.config.pool, &self.config.queue_names()),
            job_done: Notify::new(),
            running: AtomicU32::new(0),
            quiet: watch::Sender::new(false),
            cost: watch::Sender::new(deletion_cost::cost(self.config.quiet_surplus, 0, false)),
            beat_now: Notify::new(),
            started_at_ms: crate::job::now_ms(),
            worker_id: format!(
                "{}-{}-{:08x}",
                self.config.pool,
                std::process::id(),
                fastrand::u32(..)
            ),
            counts: Counts::default(),
            on_settled: self.on_settled,
            config: self.config,
            broker: self.broker,
            handler: self.handler,
            life: self.life,
        });
        let stop = CancellationToken::new();
        let mut background = vec![
            tokio::spawn(background::heartbeat(shared.clone(), stop.clone())),
            tokio::spawn(background::reaper(shared.clone(), stop.clone())),
            tokio::spawn(leases::keep(shared.clone(), stop.clone())),
        ];
        // The HTTP routes and the quiet check share one depth reading.
        let pool = http::HttpState::new(
            shared.life.clone(),
            shared.broker.clone(),
            shared.config.pool.clone(),
            shared.config.capacity_per_replica(),
            shared.config.queue_names(),
        );
        if shared.config.quiet_surplus {
            background.push(tokio::spawn(quiet::keep_deciding(
                shared.clone(),
                pool.clone(),
                stop.clone(),
            )));
        }
        if let Some(listener) = listener {
            background.push(http::serve(listener, pool, stop.clone()));
        }
        if let Some((api, interval)) = pod_api {
            background.push(tokio::spawn(deletion_cost::keep_current(
                api,
                shared.cost.subscribe(),
                interval,
                stop.clone(),
            )));
        }
        shared.publish_load();
        metrics::gauge!(names::DRAINING, names::POOL => shared.config.pool.clone()).set(0.0);
        metrics::gauge!(names::QUIET, names::POOL => shared.config.pool.clone()).set(0.0);
        shared.life.advance(State::Running);
        tracing::info!(
            pool = %shared.config.pool,
            worker = %shared.worker_id,
            queues = ?shared.config.queue_names(),
            concurrency = shared.config.concurrency,
            quiet_surplus = shared.config.quiet_surplus,
            http = ?http_addr,
            "worker running"
        );
        let handle = ShutdownHandle {
            life: shared.life.clone(),
        };
        let join = tokio::spawn(drive(shared, stop, background));
        Ok(RunningWorker {
            handle,
            http_addr,
            join,
        })
    }
}

/// A worker started by [`Worker::spawn`].
#[derive(Debug)]
pub struct RunningWorker {
    handle: ShutdownHandle,
    http_addr: Option<SocketAddr>,
    join: tokio::task::JoinHandle<RunReport>,
}

impl RunningWorker {
    /// The bound address of the HTTP listener, if any.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Drain or force-stop it.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// Its state.
    pub fn state(&self) -> State {
        self.handle.state()
    }

    /// Wait until it has stopped.
    pub async fn join(self) -> Result<RunReport, WorkerError> {
        self.join
            .await
            .map_err(|e| WorkerError::Crashed(e.to_string()))
    }
}

/// After the hard deadline, how long releases may take before the worker stops anyway
/// (their leases expire and the reaper returns those jobs).
const RELEASE_GRACE: Duration = Duration::from_millis(800);

async fn drive<H: Handler>(
    shared: Arc<Shared<H>>,
    stop: CancellationToken,
    background: Vec<tokio::task::JoinHandle<()>>,
) -> RunReport {
    let tracker = TaskTracker::new();
    fetcher::fetch_loop(shared.clone(), tracker.clone()).await;
    shared
        .broker
        .stop_fetching(&shared.config.queue_names())
        .await;

    shared.life.advance(State::Draining);
    metrics::gauge!(names::DRAINING, names::POOL => shared.config.pool.clone()).set(1.0);
    tracing::info!(
        in_flight = tracker.len(),
        drain_timeout = ?shared.config.drain_timeout,
        "draining: fetching stopped"
    );
    tracker.close();
    let mut clean = true;
    tokio::select! {
        _ = tracker.wait() => {}
        _ = tokio::time::sleep(shared.config.drain_timeout) => {
            tracing::warn!(in_flight = tracker.len(), "drain timeout: cancelling and releasing running jobs");
            clean = false;
            shared.life.hard.cancel();
        }
        _ = shared.life.hard.cancelled() => {
            clean = false;
        }
    }
    if tokio::time::timeout(RELEASE_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::error!(
            left = tracker.len(),
            "releases did not finish in time; those jobs return when their leases expire"
        );
    }
    stop.cancel();
    for task in background {
        let _ = tokio::time::timeout(Duration::from_millis(500), task).await;
    }
    shared.broker.close().await;
    shared.life.advance(State::Stopped);
    let c = &shared.counts;
    let report = RunReport {
        ok: c.get(Outcome::Ok),
        retried: c.get(Outcome::Retried),
        dead: c.get(Outcome::Dead),
        released: c.get(Outcome::Released),
        failed: c.get(Outcome::Failed),
        clean_drain: clean,
    };
    tracing::info!(?report, "worker stopped");
    report
}
