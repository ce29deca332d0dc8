//! The runtime's behaviour on the in-memory broker: fairness, limits, leases, retries,
//! failures and drain. Time is tokio's paused clock unless a test serves HTTP.
#![cfg(feature = "testing")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use worker_core::telemetry::Outcome;
use worker_core::testing::{eventually, http_get};
use worker_core::{
    handler_fn, Backoff, Broker, BrokerError, DeadLetter, Delivery, FetchPlan, Job, JobError,
    JobId, Lease, MemoryBroker, NewJob, QueueDepth, QueueSpec, RunReport, RunningWorker,
    Scheduling, Settled, State, Worker, WorkerConfig, WorkerInfo,
};

fn config() -> worker_core::WorkerConfigBuilder {
    WorkerConfig::builder().http_addr(None)
}

async fn put(b: &MemoryBroker, queue: &str, payloads: impl IntoIterator<Item = serde_json::Value>) {
    let jobs = payloads
        .into_iter()
        .map(|p| NewJob::json(queue, &p).unwrap())
        .collect();
    b.enqueue(jobs).await.unwrap();
}

async fn settled(b: &impl Broker, queues: &[&str]) {
    eventually(Duration::from_secs(600), "every job settled", || async {
        let mut left = 0;
        for q in queues {
            let d = b.depth(q).await.unwrap();
            left += d.backlog() + d.delayed;
        }
        left == 0
    })
    .await;
}

async fn stop(w: RunningWorker) -> RunReport {
    w.shutdown_handle().drain();
    w.join().await.unwrap()
}

/// Tracks jobs running at once.
#[derive(Default)]
struct Gauge {
    now: AtomicU32,
    max: AtomicU32,
}

impl Gauge {
    fn enter(&self, n: u32) {
        let now = self.now.fetch_add(n, Ordering::SeqCst) + n;
        self.max.fetch_max(now, Ordering::SeqCst);
    }
    fn leave(&self, n: u32) {
        self.now.fetch_sub(n, Ordering::SeqCst);
    }
    fn max(&self) -> u32 {
        self.max.load(Ordering::SeqCst)
    }
}

#[tokio::test(start_paused = true)]
async fn weighted_fairness_is_three_to_one_and_work_conserving() {
    let broker = MemoryBroker::new();
    let none = || std::iter::repeat_n(serde_json::json!(null), 3000);
    put(&broker, "a", none()).await;
    put(&broker, "b", none()).await;
    let starts = Arc::new(Mutex::new(Vec::<String>::new()));
    let s = starts.clone();
    let handler = handler_fn(move |job: Job<serde_json::Value>| {
        s.lock().unwrap().push(job.ctx.queue().to_owned());
        async { Ok::<_, JobError>(()) }
    });
    let cfg = config()
        .queue(QueueSpec::new("a").weight(3))
        .queue(QueueSpec::new("b").weight(1))
        .concurrency(8)
        .build()
        .unwrap();
    let w = Worker::new(broker.clone(), cfg, handler)
        .spawn()
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "4000 starts", || async {
        starts.lock().unwrap().len() >= 4000
    })
    .await;
    let first: Vec<String> = starts.lock().unwrap()[..4000].to_vec();
    let a = first.iter().filter(|q| *q == "a").count() as f64;
    let b = first.iter().filter(|q| *q == "b").count() as f64;
    let ratio = a / b;
    assert!((ratio - 3.0).abs() <= 0.15, "A:B = {a}:{b} = {ratio}");
    // A runs dry after 3000; B then takes every slot until it is empty too.
    settled(&broker, &["a", "b"]).await;
    let all = starts.lock().unwrap().clone();
    assert_eq!(all.len(), 6000);
    let last_a = all.iter().rposition(|q| q == "a").unwrap();
    assert!(
        last_a < 6000 - 1,
        "B must still have had work when A ran dry"
    );
    assert!(all[last_a + 1..].iter().all(|q| q == "b"));
    stop(w).await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_queue_gives_all_capacity_to_the_other() {
    let broker = MemoryBroker::new();
    put(
        &broker,
        "b",
        std::iter::repeat_n(serde_json::json!(null), 200),
    )
    .await;
    let gauge = Arc::new(Gauge::default());
    let g = gauge.clone();
    let handler = handler_fn(move |_job: Job<serde_json::Value>| {
        let g = g.clone();
        async move {
            g.enter(1);
            tokio::time::sleep(Duration::from_millis(10)).await;
            g.leave(1);
            Ok::<_, JobError>(())
        }
    });
    let cfg = config()
        .queue(QueueSpec::new("a").weight(100))
        .queue(QueueSpec::new("b").weight(1))
        .concurrency(4)
        .build()
        .unwrap();
    let w = Worker::new(broker.clone(), cfg, handler)
        .spawn()
        .await
        .unwrap();
    settled(&broker, &["b"]).await;
    assert_eq!(gauge.max(), 4, "B should use every permit while A is empty");
    stop(w).await;
}

#[tokio::test(start_paused = true)]
async fn strict_priority_drains_the_first_queue_first() {
    let broker = MemoryBroker::new();
    put(
        &broker,
        "lo",
        std::iter::repeat_n(serde_json::json!(null), 50),
    )
    .await;
    put(
        &broker,
        "hi",
        std::iter::repeat_n(serde_json::json!(null), 50),
    )
    .await;
    let starts = Arc::new(Mutex::new(Vec::<String>::new()));
    let s = starts.clone();
    let handler = handler_fn(move |job: Job<serde_json::Value>| {
        s.lock().unwrap().push(job.ctx.queue().to_owned());
        async { Ok::<_, JobError>(()) }
    });
    let cfg = config()
        .queue("hi")
        .queue("lo")
        .scheduling(Scheduling::Priority)
        .concurrency(4)
        .build()
        .unwrap();
    let w = Worker::new(broker.clone(), cfg, handler)
        .spawn()
        .await
        .unwrap();
    settled(&broker, &["hi", "lo"]).await;
    let all = starts.lock().unwrap().clone();
    assert!(all[..50].iter().all(|q| q == "hi"), "{all:?}");
    stop(w).await;
}

#[tokio::test(start_paused = true)]
async fn concurrency_limit_is_reached_and_never_exceeded() {
    let broker = MemoryBroker::new();
    put(
        &broker,
        "default",
        (0..300).map(|i| serde_json::json!(i % 17 + 1)),
    )
    .await;
    let gauge = Arc::new(Gauge::default());
    let g = gauge.clone();
    let handler = handler_fn(move |job: Job<u64>| {
        let g = g.clone();
        async move {
            g.enter(1);
            tokio::time::sleep(Duration::from_millis(job.payload)).await;
            g.leave(1);
            Ok::<_, JobError>(())
        }
    });
    let w = Worker::new(
        broker.clone(),
        config().concurrency(5).build().unwrap(),
        handler,
    )
    .spawn()
    .await
    .unwrap();
    settled(&broker, &["default"]).await;
    assert_eq!(gauge.max(), 5);
    assert_eq!(stop(w).await.ok, 300);
}

#[tokio::test(start_paused = true)]
async fn weighted_budget_is_never_exceeded_and_oversize_jobs_die() {
    let broker = MemoryBroker::new();
    let jobs: Vec<NewJob> = (0..200u32)
        .map(|i| {
            NewJob::json("docs", &(i % 7 + 1))
                .unwrap()
                .cost(10 + (i * 37) % 51)
        })
        .chain([NewJob::json("docs", &1).unwrap().cost(101).id("huge")])
        .collect();
    broker.enqueue(jobs).await.unwrap();
    let units = Arc::new(Gauge::default());
    let jobs_running = Arc::new(Gauge::default());
    let (u, j) = (units.clone(), jobs_running.clone());
    let handler = handler_fn(move |job: Job<u64>| {
        let (u, j) = (u.clone(), j.clone());
        async move {
            let cost = job.ctx.cost();
            u.enter(cost);
            j.enter(1);
            tokio::time::sleep(Duration::from_millis(job.payload * 3)).await;
            j.leave(1);
            u.leave(cost);
            Ok::<_, JobError>(())
        }
    });
    let cfg = config()
        .queue("docs")
        .concurrency(8)
        .budget(100)
        .build()
        .unwrap();
    let w = Worker::new(broker.clone(), cfg, handler)
        .spawn()
        .await
        .unwrap();
    settled(&broker, &["docs"]).await;
    assert!(
        units.max() <= 100,
        "budget exceeded: {} units running",
        units.max()
    );
    assert!(
        units.max() >= 60,
        "the budget should be well used: {}",
        units.max()
    );
    assert!(jobs_running.max() > 1, "jobs should share the budget");
    let dead = broker.dead_letters("docs", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.id.as_str(), "huge");
    assert!(
        dead[0]
            .reason
            .contains("exceeds the pool budget of 100 units"),
        "{}",
        dead[0].reason
    );
    let report = stop(w).await;
    assert_eq!((report.ok, report.dead), (200, 1));
}

#[tokio::test(start_paused = true)]
async fn per_queue_limit_is_respected_while_others_use_the_rest() {
    let broker = MemoryBroker::new();
    put(
        &broker,
        "gpu",
        std::iter::repeat_n(serde_json::json!(20), 60),
    )
    .await;
    put(
        &broker,
        "cpu",
        std::iter::repeat_n(serde_json::json!(20), 60),
    )
    .await;
    let per_queue: Arc<HashMap<&'static str, Gauge>> = Arc::new(HashMap::from([
        ("gpu", Gauge::default()),
        ("cpu", Gauge::default()),
    ]));
    let p = per_queue.clone();
    let handler = handler_fn(move |job: Job<u64>| {
        let p = p.clone();
        async move {
            let g = &p[job.ctx.queue()];
            g.enter(1);
            tokio::time::sleep(Duration::from_millis(job.payload)).await;
            g.leave(1);
            Ok::<_, JobError>(())
        }
    });
    let cfg = config()
        .queue(QueueSpec::new("gpu").weight(10).max_in_flight(2))
        .queue("cpu")
        .concurrency(6)
        .build()
        .unwrap();
    let w = Worker::new(broker.clone(), cfg, handler)
        .spawn()
        .await
        .unwrap();
    settled(&broker, &["gpu", "cpu"]).await;
    assert_eq!(per_queue["gpu"].max(), 2);
    assert!(
        per_queue["cpu"].max() >= 4,
        "cpu max {}",
        per_queue["cpu"].max()
    );
    stop(w).await;
}

#[tokio::test(start_paused = true)]
async fn a_job_longer_than_its_lease_is_not_redelivered() {
    let broker = MemoryBroker::new();
    put(&broker, "default", [serde_json::json!(5000)]).await;
    let starts = Arc::new(AtomicU32::new(0));
    let s = starts.clone();
    let handler = handler_fn(move |job: Job<u64>| {
        s.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(job.payload)).await;
            Ok::<_, JobError>(())
        }
    });
    let cfg = config()
        .lease(Duration::from_millis(300))
        .reap_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    // Two workers: the second reaps the first's lease if it ever lapses.
    let w1 = Worker::new(broker.clone(), cfg.clone(), handler)
        .spawn()
        .await
        .unwrap();
    let w2 = Worker::new(
        broker.clone(),
        cfg,
        handler_fn(|_: Job<u64>| async { Ok::<_, JobError>(()) }),
    )
    .spawn()
    .await
    .unwrap();
    settled(&broker, &["default"]).await;
    assert_eq!(starts.load(Ordering::SeqCst), 1);
    assert_eq!(stop(w1).await.ok, 1);
    assert_eq!(stop(w2).await.ok, 0);
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_is_redelivered_and_the_late_ack_refused() {
    let broker = MemoryBroker::new();
    put(&broker, "default", [serde_json::json!(1)]).await;
    // A worker that took the job and died: it never extends, acks or releases.
    let ghost = broker
        .fetch(&FetchPlan::single("default", 1, Duration::from_millis(200)))
        .await
        .unwrap()
        .remove(0);
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let a = attempts.clone();
    let handler = handler_fn(move |job: Job<u64>| {
        a.lock().unwrap().push(job.ctx.attempt());
        async { Ok::<_, JobError>(()) }
    });
    let cfg = config()
        .reap_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let w = Worker::new(broker.clone(), cfg, handler)
        .spawn()
        .await
        .unwrap();
    settled(&broker, &["default"]).await;
    assert_eq!(*attempts.lock().unwrap(), vec![2]);
    assert!(matches!(
        broker.ack(&ghost.lease).await,
        Err(BrokerError::LeaseLost { .. })
    ));
    assert_eq!(stop(w).await.ok, 1);
}

/// A broker whose lease extensions and heartbeats fail transiently while `partitioned`
/// is set, as when a worker loses its connection while its handler keeps running, or
/// when a Redis at its `maxmemory` refuses the writes that need memory (its pops and
/// deletes, and so fetches and settles, still work). It counts the extensions asked
/// for, per job, and notes each ack the inner broker confirmed, in `acked`.
#[derive(Clone)]
struct Partitionable {
    inner: MemoryBroker,
    partitioned: Arc<AtomicBool>,
    extended: Arc<Mutex<HashMap<String, u32>>>,
    /// The leases of each `extend_leases` call, in order.
    extend_calls: Arc<Mutex<Vec<usize>>>,
    acked: Arc<Mutex<Vec<JobId>>>,
}

impl Partitionable {
    fn new(inner: MemoryBroker) -> Self {
        Self {
            inner,
            partitioned: Arc::new(AtomicBool::new(false)),
            extended: Arc::default(),
            extend_calls: Arc::default(),
            acked: Arc::default(),
        }
    }

    fn extensions(&self, job: &str) -> u32 {
        self.extended.lock().unwrap().get(job).copied().unwrap_or(0)
    }
}

#[async_trait]
impl Broker for Partitionable {
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, BrokerError> {
        self.inner.enqueue(jobs).await
    }
    async fn fetch(&self, plan: &FetchPlan) -> Result<Vec<Delivery>, BrokerError> {
        self.inner.fetch(plan).await
    }
    async fn ack(&self, lease: &Lease) -> Result<(), BrokerError> {
        // A slow answer: the settled outcome must wait for it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.inner.ack(lease).await?;
        self.acked.lock().unwrap().push(lease.job_id.clone());
        Ok(())
    }
    async fn retry_after(&self, l: &Lease, d: Duration, e: &str) -> Result<(), BrokerError> {
        self.inner.retry_after(l, d, e).await
    }
    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), BrokerError> {
        self.inner.dead_letter(lease, reason).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), BrokerError> {
        self.inner.release(lease).await
    }
    async fn extend_lease(&self, lease: &Lease, d: Duration) -> Result<(), BrokerError> {
        *self
            .extended
            .lock()
            .unwrap()
            .entry(lease.job_id.to_string())
            .or_default() += 1;
        if self.partitioned.load(Ordering::SeqCst) {
            return Err(BrokerError::Unavailable {
                message: "partitioned".into(),
                source: None,
            });
        }
        self.inner.extend_lease(lease, d).await
    }
    async fn extend_leases(&self, leases: &[Lease], d: Duration) -> Vec<Result<(), BrokerError>> {
        self.extend_calls.lock().unwrap().push(leases.len());
        let mut out = Vec::with_capacity(leases.len());
        for lease in leases {
            out.push(self.extend_lease(lease, d).await);
        }
        out
    }
    async fn reap_expired(&self, queues: &[String]) -> Result<u64, BrokerError> {
        self.inner.reap_expired(queues).await
    }
    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        self.inner.depth(queue).await
    }
    async fn dead_letters(&self, q: &str, n: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        self.inner.dead_letters(q, n).await
    }
    async fn requeue_dead(&self, q: &str, ids: &[JobId]) -> Result<u64, BrokerError> {
        self.inner.requeue_dead(q, ids).await
    }
    async fn purge_dead(&self, q: &str, ids: &[JobId]) -> Result<u64, BrokerError> {
        self.inner.purge_dead(q, ids).await
    }
    async fn register_worker(&self, w: &WorkerInfo, ttl: Duration) -> Result<(), BrokerError> {
        if self.partitioned.load(Ordering::SeqCst) {
            return Err(BrokerError::Unavailable {
                message: "partitioned".into(),
                source: None,
            });
        }
        self.inner.register_worker(w, ttl).await
    }
    async fn list_workers(&self, pool: Option<&str>) -> Result<Vec<WorkerInfo>, BrokerError> {
        self.inner.list_workers(pool).await
    }
    async fn deregister_worker(&self, id: &str) -> Result<(), BrokerError> {
        self.inner.deregister_worker(id).await
    }
    async fn wait_for_work(&self, queues: &[String], timeout: Duration) {
        self.inner.wait_for_work(queues, timeout).await
    }
}

/// What a [`sleeper`] handler saw: each job's start (its name and attempt) and
/// cancellation, with the paused clock's time.
#[derive(Default)]
struct Seen {
    starts: Vec<(String, u32, tokio::time::Instant)>,
    cancelled: Vec<(String, tokio::time::Instant)>,
}

/// A handler for payloads `{"name": .., "ms": ..}`: sleeps `ms` unless cancelled.
fn sleeper(seen: Arc<Mutex<Seen>>) -> impl worker_core::Handler<Payload = serde_json::Value> {
    handler_fn(move |job: Job<serde_json::Value>| {
        let seen = seen.clone();
        async move {
            let name = job.payload["name"].as_str().unwrap_or("").to_owned();
            let ms = job.payload["ms"].as_u64().unwrap_or(0);
            let now = tokio::time::Instant::now;
            seen.lock()
                .unwrap()
                .starts
                .push((name.clone(), job.ctx.attempt(), now()));
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(()),
                _ = job.ctx.cancellation().cancelled() => {
                    seen.lock().unwrap().cancelled.push((name, now()));
                    Err(JobError::retry("cancelled"))
                }
            }
        }
    })
}

/// A worker with a lease of `LEASE` on a broker that refuses writes on demand, running
/// one 8 s job named "long"; returned once that job started.
struct Refusable {
    memory: MemoryBroker,
    refusing: Partitionable,
    seen: Arc<Mutex<Seen>>,
    worker: RunningWorker,
    /// Before the worker's first fetch.
    spawned_at: tokio::time::Instant,
}

const LEASE: Duration = Duration::from_secs(6);

async fn start_refusable(cfg: worker_core::WorkerConfigBuilder) -> Refusable {
    let memory = MemoryBroker::new();
    let long = serde_json::json!({"name": "long", "ms": 8000});
    put(&memory, "default", [long]).await;
    let refusing = Partitionable::new(memory.clone());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let spawned_at = tokio::time::Instant::now();
    let cfg = cfg.lease(LEASE).build().unwrap();
    let worker = Worker::new(refusing.clone(), cfg, sleeper(seen.clone()))
        .spawn()
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "the long job started", || async {
        seen.lock().unwrap().starts.len() == 1
    })
    .await;
    Refusable {
        memory,
        refusing,
        seen,
        worker,
        spawned_at,
    }
}

#[tokio::test(start_paused = true)]
async fn writes_refused_for_less_than_a_lease_keep_the_job_and_pause_fetching() {
    let cfg = config()
        .concurrency(4)
        .heartbeat(Duration::from_millis(500))
        .reap_interval(Duration::from_secs(3600));
    let Refusable {
        memory,
        refusing,
        seen,
        worker,
        ..
    } = start_refusable(cfg).await;

    // Refused from 1 s to 5 s after the start: past the first two extensions (at 2 s
    // and 4 s), short of the lease's end at 6 s.
    tokio::time::sleep(Duration::from_secs(1)).await;
    refusing.partitioned.store(true, Ordering::SeqCst);
    // A heartbeat and an extension have been refused by then.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let short = serde_json::json!({"name": "short", "ms": 10});
    put(&memory, "default", [short]).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        seen.lock().unwrap().starts.len(),
        1,
        "no job started while writes were refused"
    );
    let healed = tokio::time::Instant::now();
    refusing.partitioned.store(false, Ordering::SeqCst);

    settled(&memory, &["default"]).await;
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(seen.cancelled.is_empty(), "cancelled: {:?}", seen.cancelled);
    let starts: Vec<(&str, u32)> = seen
        .starts
        .iter()
        .map(|(n, a, _)| (n.as_str(), *a))
        .collect();
    assert_eq!(starts, [("long", 1), ("short", 1)]);
    assert!(
        seen.starts[1].2 >= healed,
        "the short job started after the refusal"
    );
    let report = stop(worker).await;
    assert_eq!((report.ok, report.failed, report.retried), (2, 0, 0));
    let d = memory.depth("default").await.unwrap();
    assert_eq!((d.pending, d.in_flight, d.delayed, d.dead), (0, 0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_lease_that_runs_out_while_writes_are_refused_is_given_up_at_its_deadline() {
    let cfg = config()
        .concurrency(1)
        .reap_interval(Duration::from_millis(500));
    let Refusable {
        memory,
        refusing,
        seen,
        worker,
        spawned_at,
    } = start_refusable(cfg).await;
    refusing.partitioned.store(true, Ordering::SeqCst);
    eventually(Duration::from_secs(10), "the handler cancelled", || async {
        !seen.lock().unwrap().cancelled.is_empty()
    })
    .await;
    // Given up by the worker's own clock, no later than the lease's end: past it,
    // another worker may own the job.
    let cancelled_at = seen.lock().unwrap().cancelled[0].1;
    assert!(
        cancelled_at <= spawned_at + LEASE + Duration::from_millis(10),
        "cancelled {:?} after the fetch",
        cancelled_at - spawned_at
    );
    assert!(cancelled_at >= spawned_at + LEASE - Duration::from_secs(1));
    refusing.partitioned.store(false, Ordering::SeqCst);
    // Reclaimed when its lease expires, and run again as attempt 2.
    settled(&memory, &["default"]).await;
    let starts: Vec<u32> = seen.lock().unwrap().starts.iter().map(|s| s.1).collect();
    assert_eq!(starts, [1, 2]);
    let report = stop(worker).await;
    assert_eq!((report.ok, report.failed), (1, 1));
}

/// One lease keeper per process: the leases of jobs fetched together fall due together
/// and go in one `extend_leases` call per tick, every job's lease in each; a job's own
/// task runs its handler and nothing per job ticks.
#[tokio::test(start_paused = true)]
async fn leases_that_fall_due_together_are_extended_in_one_call() {
    let memory = MemoryBroker::new();
    put(&memory, "default", (0..8).map(|i| serde_json::json!(i))).await;
    let broker = Partitionable::new(memory.clone());
    let handler = handler_fn(|_job: Job<u64>| async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Ok::<_, JobError>(())
    });
    let cfg = config()
        .concurrency(8)
        .lease(Duration::from_secs(3))
        .build()
        .unwrap();
    let w = Worker::new(broker.clone(), cfg, handler)
        .spawn()
        .await
        .unwrap();
    settled(&memory, &["default"]).await;
    let calls = broker.extend_calls.lock().unwrap().clone();
    // 10 s of running with a 3 s lease: an extension every 1 s (a third of the lease).
    assert!((8..=11).contains(&calls.len()), "calls: {calls:?}");
    assert!(calls.iter().all(|&n| n == 8), "leases per call: {calls:?}");
    let per_job: Vec<u32> = broker.extended.lock().unwrap().values().copied().collect();
    assert_eq!(per_job.len(), 8);
    assert!(
        per_job.iter().all(|&n| n as usize == calls.len()),
        "{per_job:?}"
    );
    assert_eq!(stop(w).await.ok, 8);
}

#[tokio::test(start_paused = true)]
async fn each_settled_outcome_is_reported_after_the_broker_confirmed_it() {
    let memory = MemoryBroker::new();
    let broker = Partitionable::new(memory.clone());
    let ids: Vec<JobId> = memory
        .enqueue(
            ["ok", "retry-once", "fatal", "long"]
                .iter()
                .map(|kind| NewJob::json("default", kind).unwrap())
                .collect(),
        )
        .await
        .unwrap();
    let handler = handler_fn(|job: Job<String>| async move {
        match (job.payload.as_str(), job.ctx.attempt()) {
            ("retry-once", 1) => Err(JobError::retry("once")),
            ("fatal", _) => Err(JobError::fatal("asked to")),
            ("long", _) => {
                job.ctx.cancellation().cancelled().await;
                Err(JobError::interrupted("drained"))
            }
            _ => Ok(()),
        }
    });
    let seen = Arc::new(Mutex::new(Vec::<(usize, u32, Outcome)>::new()));
    let (s, acked, index) = (seen.clone(), broker.acked.clone(), ids.clone());
    let cfg = config()
        .concurrency(4)
        .drain_timeout(Duration::from_secs(1))
        .backoff(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(10),
        ))
        .build()
        .unwrap();
    let w = Worker::new(broker, cfg, handler)
        .on_settled(move |settled: &Settled| {
            if settled.outcome == Outcome::Ok {
                assert!(
                    acked.lock().unwrap().contains(&settled.id),
                    "an Ok is reported only after its ack was confirmed"
                );
            }
            assert_eq!(settled.queue, "default");
            let job = index.iter().position(|id| *id == settled.id).unwrap();
            s.lock()
                .unwrap()
                .push((job, settled.attempt, settled.outcome));
        })
        .spawn()
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "four outcomes", || async {
        seen.lock().unwrap().len() == 4
    })
    .await;
    let report = stop(w).await;
    let mut got = seen.lock().unwrap().clone();
    got.sort_by_key(|(job, attempt, _)| (*job, *attempt));
    assert_eq!(
        got,
        vec![
            (0, 1, Outcome::Ok),
            (1, 1, Outcome::Retried),
            (1, 2, Outcome::Ok),
            (2, 1, Outcome::Dead),
            (3, 1, Outcome::Released),
        ]
    );
    assert_eq!(
        (report.ok, report.retried, report.dead, report.released),
        (2, 1, 1, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_lost_its_lease_is_cancelled_and_cannot_ack() {
    let memory = MemoryBroker::new();
    put(&memory, "default", [serde_json::json!(null)]).await;
    let flaky = Partitionable::new(memory.clone());
    let started = Arc::new(tokio::sync::Notify::new());
    let cancelled = Arc::new(AtomicBool::new(false));
    let (st, ca) = (started.clone(), cancelled.clone());
    let slow = handler_fn(move |job: Job<serde_json::Value>| {
        let (st, ca) = (st.clone(), ca.clone());
        async move {
            st.notify_one();
            job.ctx.cancellation().cancelled().await;
            ca.store(true, Ordering::SeqCst);
            Ok::<_, JobError>(())
        }
    });
    let lease = Duration::from_millis(300);
    // Concurrency 1: the busy first worker cannot fetch the reclaimed job itself.
    let cfg = config()
        .lease(lease)
        .concurrency(1)
        .reap_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let w1 = Worker::new(flaky.clone(), cfg, slow).spawn().await.unwrap();
    started.notified().await;
    // The partition outlasts the lease; the job is reclaimed and run elsewhere.
    flaky.partitioned.store(true, Ordering::SeqCst);
    tokio::time::sleep(lease * 2).await;
    assert_eq!(memory.reap_expired(&["default".into()]).await.unwrap(), 1);
    let second_attempt = Arc::new(Mutex::new(None));
    let sa = second_attempt.clone();
    let w2_cfg = config()
        .lease(Duration::from_secs(30))
        .reap_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let w2 = Worker::new(
        memory.clone(),
        w2_cfg,
        handler_fn(move |job: Job<serde_json::Value>| {
            *sa.lock().unwrap() = Some(job.ctx.attempt());
            async { Ok::<_, JobError>(()) }
        }),
    )
    .spawn()
    .await
    .unwrap();
    settled(&memory, &["default"]).await;
    assert_eq!(*second_attempt.lock().unwrap(), Some(2));
    // The partition heals: the first worker's next extension is refused, its handler
    // is cancelled, and its outcome is not recorded.
    flaky.partitioned.store(false, Ordering::SeqCst);
    eventually(Duration::from_secs(5), "w1 handler cancelled", || async {
        cancelled.load(Ordering::SeqCst)
    })
    .await;
    let r1 = stop(w1).await;
    assert_eq!((r1.ok, r1.failed), (0, 1));
    assert_eq!(stop(w2).await.ok, 1);
    let d = memory.depth("default").await.unwrap();
    assert_eq!((d.pending, d.in_flight, d.delayed, d.dead), (0, 0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_within_bounds_then_dead_letter_with_the_last_error() {
    let broker = MemoryBroker::new();
    let jobs = 200;
    put(&broker, "default", (0..jobs).map(|i| serde_json::json!(i))).await;
    let starts = Arc::new(Mutex::new(HashMap::<u64, Vec<tokio::time::Instant>>::new()));
    let s = starts.clone();
    let handler = handler_fn(move |job: Job<u64>| {
        s.lock()
            .unwrap()
            .entry(job.payload)
            .or_default()
            .push(tokio::time::Instant::now());
        let attempt = job.ctx.attempt();
        async move { Err::<(), _>(JobError::retry(format!("failure {attempt}"))) }
    });
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(250));
    let cfg = config()
        .concurrency(8)
        .max_attempts(4)
        .backoff(backoff)
        .build()
        .unwrap();
    let w = Worker::new(broker.clone(), cfg, handler)
        .spawn()
        .await
        .unwrap();
    settled(&broker, &["default"]).await;
    let starts = starts.lock().unwrap().clone();
    assert_eq!(starts.len(), jobs as usize);
    assert!(starts.values().all(|s| s.len() == 4), "{starts:?}");
    // Full jitter: the wait after attempt n is uniform in [0, ceiling(n)]. Over 200
    // jobs each quarter of the range is hit (a miss has odds of 0.75^200), so a
    // constant delay, zero or the ceiling, or a half-jittered one fails here.
    for attempt in 1..=3u32 {
        let ceiling = backoff.ceiling(attempt);
        let gaps: Vec<Duration> = starts
            .values()
            .map(|s| s[attempt as usize] - s[attempt as usize - 1])
            .collect();
        // The paused clock runs a due job at once: the gap is the delay itself.
        let over: Vec<_> = gaps.iter().filter(|g| **g > ceiling).collect();
        assert!(
            over.is_empty(),
            "attempt {attempt}: over {ceiling:?}: {over:?}"
        );
        let quarter = |q: u32| {
            let (lo, hi) = (ceiling * q / 4, ceiling * (q + 1) / 4);
            gaps.iter().filter(|g| **g >= lo && **g <= hi).count()
        };
        let quarters: Vec<usize> = (0..4).map(quarter).collect();
        assert!(
            quarters.iter().all(|n| *n > 0),
            "attempt {attempt}: gaps per quarter of [0, {ceiling:?}]: {quarters:?}"
        );
    }
    let dead = broker.dead_letters("default", 1000).await.unwrap();
    assert_eq!(dead.len(), jobs as usize);
    assert!(dead.iter().all(
        |d| d.reason == "failed 4 of 4 attempts; last error: failure 4"
            && d.envelope.history.len() == 4
    ));
    let r = stop(w).await;
    assert_eq!((r.retried, r.dead), (3 * jobs, jobs));
}

#[tokio::test(start_paused = true)]
async fn retry_after_uses_the_exact_delay() {
    let broker = MemoryBroker::new();
    put(&broker, "default", [serde_json::json!(null)]).await;
    let starts = Arc::new(Mutex::new(Vec::new()));
    let s = starts.clone();
    let handler = handler_fn(move |job: Job<serde_json::Value>| {
        s.lock().unwrap().push(tokio::time::Instant::now());
        let first = job.ctx.attempt() == 1;
        async move {
            if first {
                Err(JobError::retry_after(
                    "rate limited",
                    Duration::from_secs(7),
                ))
            } else {
                Ok(())
            }
        }
    });
    let w = Worker::new(broker.clone(), config().build().unwrap(), handler)
        .spawn()
        .await
        .unwrap();
    settled(&broker, &["default"]).await;
    let s = starts.lock().unwrap().clone();
    let gap = s[1] - s[0];
    assert!(
        gap >= Duration::from_secs(7) && gap < Duration::from_millis(7100),
        "{gap:?}"
    );
    stop(w).await;
}

#[tokio::test(start_paused = true)]
async fn fatal_panic_undecodable_and_timeout_are_dead_lettered_and_the_worker_carries_on() {
    let broker = MemoryBroker::new();
    broker
        .enqueue(vec![
            NewJob::json("default", &"fatal").unwrap().id("fatal"),
            NewJob::json("default", &"panic").unwrap().id("panic"),
            NewJob::new("default", "{not json").id("garbage"),
            NewJob::json("default", &"slow").unwrap().id("slow"),
            NewJob::json("default", &"fine").unwrap().id("fine"),
        ])
        .await
        .unwrap();
    let handler = handler_fn(|job: Job<String>| async move {
        match job.payload.as_str() {
            "fatal" => Err(JobError::fatal("bad input")),
            "panic" => panic!("boom"),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(())
            }
            _ => Ok(()),
        }
    });
    let cfg = config()
        .max_attempts(1)
        .job_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let w = Worker::new(broker.clone(), cfg, handler)
        .spawn()
        .await
        .unwrap();
    settled(&broker, &["default"]).await;
    let dead: HashMap<String, String> = broker
        .dead_letters("default", 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.envelope.id.to_string(), d.reason))
        .collect();
    assert_eq!(dead["fatal"], "bad input");
    assert_eq!(
        dead["panic"],
        "failed 1 of 1 attempts; last error: handler panicked: boom"
    );
    assert!(
        dead["garbage"].starts_with("undecodable payload: "),
        "{}",
        dead["garbage"]
    );
    assert_eq!(
        dead["slow"],
        "failed 1 of 1 attempts; last error: timed out after 100ms"
    );
    assert!(!dead.contains_key("fine"));
    let r = stop(w).await;
    assert_eq!((r.ok, r.dead), (1, 4));
}

#[tokio::test(start_paused = true)]
async fn a_panic_is_a_retryable_failure() {
    let broker = MemoryBroker::new();
    put(&broker, "default", [serde_json::json!(null)]).await;
    let handler = handler_fn(|job: Job<serde_json::Value>| async move {
        assert!(job.ctx.attempt() > 1, "first attempt panics");
        Ok::<_, JobError>(())
    });
    let cfg = config().backoff(Backoff::new(
        Duration::from_millis(10),
        Duration::from_millis(10),
    ));
    let w = Worker::new(broker.clone(), cfg.build().unwrap(), handler)
        .spawn()
        .await
        .unwrap();
    settled(&broker, &["default"]).await;
    let r = stop(w).await;
    assert_eq!((r.retried, r.ok), (1, 1));
}

/// Long jobs that finish when told to.
fn gated(
    started: Arc<AtomicU32>,
    gate: Arc<tokio::sync::Semaphore>,
) -> impl worker_core::Handler<Payload = serde_json::Value> {
    handler_fn(move |_job: Job<serde_json::Value>| {
        let (started, gate) = (started.clone(), gate.clone());
        async move {
            started.fetch_add(1, Ordering::SeqCst);
            let _ = gate.acquire().await.map(|p| p.forget());
            Ok::<_, JobError>(())
        }
    })
}

/// A worker running `jobs` long jobs that finish only when `Gated::gate` gets permits;
/// returns once `running` of them have started.
struct Gated {
    broker: MemoryBroker,
    started: Arc<AtomicU32>,
    gate: Arc<tokio::sync::Semaphore>,
    worker: RunningWorker,
}

async fn start_gated(jobs: usize, running: u32, cfg: worker_core::WorkerConfigBuilder) -> Gated {
    let broker = MemoryBroker::new();
    put(
        &broker,
        "default",
        std::iter::repeat_n(serde_json::json!(null), jobs),
    )
    .await;
    let (started, gate) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(tokio::sync::Semaphore::new(0)),
    );
    let handler = gated(started.clone(), gate.clone());
    let worker = Worker::new(broker.clone(), cfg.build().unwrap(), handler)
        .spawn()
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "jobs started", || async {
        started.load(Ordering::SeqCst) == running
    })
    .await;
    Gated {
        broker,
        started,
        gate,
        worker,
    }
}

#[tokio::test(start_paused = true)]
async fn drain_stops_fetching_and_lets_running_jobs_finish() {
    let g = start_gated(5, 2, config().concurrency(2)).await;
    g.worker.shutdown_handle().drain();
    // Fetching stops within 100 ms of the request (on tokio's clock, so load cannot skew it).
    let draining = async {
        while g.worker.state() != State::Draining {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_millis(100), draining)
        .await
        .expect("the fetch loop must stop within 100 ms of the drain");
    g.gate.add_permits(10);
    let r = g.worker.join().await.unwrap();
    let started = g.started.load(Ordering::SeqCst);
    assert_eq!(started, 2, "no job may start after the drain began");
    assert_eq!((r.ok, r.released, r.clean_drain), (2, 0, true));
    let d = g.broker.depth("default").await.unwrap();
    assert_eq!((d.pending, d.in_flight), (3, 0));
}

#[tokio::test(start_paused = true)]
async fn jobs_outlasting_the_drain_timeout_are_released_with_their_attempt() {
    let cfg = config()
        .concurrency(2)
        .drain_timeout(Duration::from_secs(2));
    let g = start_gated(3, 2, cfg).await;
    let began = tokio::time::Instant::now();
    g.worker.shutdown_handle().drain();
    let r = g.worker.join().await.unwrap();
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    assert_eq!((r.ok, r.released, r.clean_drain), (0, 2, false));
    let left = g
        .broker
        .fetch(&FetchPlan::single("default", 10, Duration::from_secs(9)))
        .await
        .unwrap();
    assert_eq!(left.len(), 3);
    assert!(left.iter().all(|d| d.envelope.attempt == 1));
}

#[tokio::test(start_paused = true)]
async fn force_releases_at_once() {
    let cfg = config()
        .concurrency(2)
        .drain_timeout(Duration::from_secs(3600));
    let g = start_gated(2, 2, cfg).await;
    let began = tokio::time::Instant::now();
    g.worker.shutdown_handle().drain();
    tokio::time::sleep(Duration::from_secs(1)).await;
    g.worker.shutdown_handle().force();
    let r = g.worker.join().await.unwrap();
    assert!(began.elapsed() < Duration::from_secs(2));
    assert_eq!(r.released, 2);
    assert_eq!(g.broker.depth("default").await.unwrap().pending, 2);
}

#[tokio::test(start_paused = true)]
async fn prefetched_jobs_are_released_as_soon_as_the_drain_begins() {
    let broker = MemoryBroker::new();
    put(
        &broker,
        "default",
        std::iter::repeat_n(serde_json::json!(null), 3),
    )
    .await;
    let (started, gate) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(tokio::sync::Semaphore::new(0)),
    );
    let cfg = config().concurrency(1).prefetch(2).build().unwrap();
    let w = Worker::new(broker.clone(), cfg, gated(started.clone(), gate.clone()))
        .spawn()
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "held three", || async {
        broker.depth("default").await.unwrap().in_flight == 3
    })
    .await;
    assert_eq!(started.load(Ordering::SeqCst), 1);
    w.shutdown_handle().drain();
    eventually(
        Duration::from_secs(5),
        "two released while one runs",
        || async {
            let d = broker.depth("default").await.unwrap();
            d.pending == 2 && d.in_flight == 1
        },
    )
    .await;
    gate.add_permits(1);
    let r = w.join().await.unwrap();
    assert_eq!((r.ok, r.released), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_and_metrics_equal_the_true_state_while_jobs_run() {
    let broker = MemoryBroker::new();
    let pool = worker_core::testing::unique("pool");
    put(
        &broker,
        "work",
        std::iter::repeat_n(serde_json::json!(null), 10),
    )
    .await;
    broker
        .enqueue(vec![
            NewJob::new("work", "null").delay(Duration::from_secs(3600)),
            NewJob::new("work", "null").delay(Duration::from_secs(3600)),
        ])
        .await
        .unwrap();
    put(&broker, "other", [serde_json::json!(null)]).await;
    let ghost = broker
        .fetch(&FetchPlan::single("other", 1, Duration::from_secs(60)))
        .await
        .unwrap();
    broker.dead_letter(&ghost[0].lease, "poison").await.unwrap();
    let (started, gate) = (
        Arc::new(AtomicU32::new(0)),
        Arc::new(tokio::sync::Semaphore::new(0)),
    );
    let cfg = WorkerConfig::builder()
        .pool(&pool)
        .queue("work")
        .queue("other")
        .concurrency(3)
        .http_addr(Some("127.0.0.1:0".parse().unwrap()))
        .build()
        .unwrap();
    let w = Worker::new(broker.clone(), cfg, gated(started.clone(), gate.clone()))
        .spawn()
        .await
        .unwrap();
    let addr = w.http_addr().unwrap();
    eventually(Duration::from_secs(5), "three running", || async {
        started.load(Ordering::SeqCst) == 3
    })
    .await;

    let (status, body) = http_get(addr, "/scaling").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["pool"], pool.as_str());
    assert_eq!(doc["backlog"], 10);
    assert_eq!(doc["capacity_per_replica"], 3);
    assert_eq!(doc["desired_replicas"], 4);
    let work = &doc["queues"]["work"];
    assert_eq!(
        (work["pending"].as_u64(), work["in_flight"].as_u64()),
        (Some(7), Some(3))
    );
    assert_eq!(
        (work["delayed"].as_u64(), work["delayed_due"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(doc["queues"]["other"]["dead"], 1);
    let truth = broker.depth("work").await.unwrap();
    assert_eq!((truth.pending, truth.in_flight), (7, 3));

    let (status, metrics) = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let line = |name: &str, labels: &str| {
        let prefix = format!("{name}{{{labels}}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
    };
    let q = format!("pool=\"{pool}\",queue=\"work\"");
    assert_eq!(
        line("worker_queue_depth", &format!("{q},state=\"pending\"")).as_deref(),
        Some("7"),
        "{metrics}"
    );
    assert_eq!(
        line("worker_queue_depth", &format!("{q},state=\"in_flight\"")).as_deref(),
        Some("3")
    );
    assert_eq!(
        line("worker_queue_depth", &format!("{q},state=\"delayed\"")).as_deref(),
        Some("2")
    );
    assert_eq!(line("worker_queue_backlog", &q).as_deref(), Some("10"));
    assert_eq!(
        line("worker_in_flight", &format!("pool=\"{pool}\"")).as_deref(),
        Some("3")
    );
    assert_eq!(
        (
            http_get(addr, "/readyz").await.unwrap().0,
            http_get(addr, "/livez").await.unwrap().0
        ),
        (200, 200)
    );

    gate.add_permits(100);
    eventually(Duration::from_secs(10), "work done", || async {
        broker.depth("work").await.unwrap().backlog() == 0
    })
    .await;
    // The endpoint shares one broker reading for up to a second.
    eventually(Duration::from_secs(10), "/scaling reads 0", || async {
        let doc: serde_json::Value =
            serde_json::from_str(&http_get(addr, "/scaling").await.unwrap().1).unwrap();
        (doc["backlog"].as_u64(), doc["desired_replicas"].as_u64()) == (Some(0), Some(0))
    })
    .await;
    // Each job counted once by outcome, its run time recorded, on the queue it came from.
    let (_, metrics) = http_get(addr, "/metrics").await.unwrap();
    let line = |name: &str, labels: &str| {
        let prefix = format!("{name}{{{labels}}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
    };
    assert_eq!(
        line("worker_jobs_total", &format!("{q},outcome=\"ok\"")).as_deref(),
        Some("10"),
        "{metrics}"
    );
    assert_eq!(
        line("worker_job_duration_seconds_count", &q).as_deref(),
        Some("10")
    );
    assert_eq!(
        line("worker_job_wait_seconds_count", &q).as_deref(),
        Some("10")
    );
    assert_eq!(
        line("worker_in_flight", &format!("pool=\"{pool}\"")).as_deref(),
        Some("0")
    );
    let r = stop(w).await;
    assert_eq!(r.ok, 10);
}

/// A handler that saves its place and stops when the drain begins hands its job back
/// at once (not at the drain deadline), attempt unchanged, checkpoint kept. The same
/// answer while the worker is not draining counts as a retry.
#[tokio::test(start_paused = true)]
async fn an_interrupted_job_is_released_with_its_checkpoint_only_while_draining() {
    let broker = MemoryBroker::new();
    put(
        &broker,
        "default",
        [serde_json::json!("early"), serde_json::json!("long")],
    )
    .await;
    let early_attempts = Arc::new(AtomicU32::new(0));
    let seen = early_attempts.clone();
    let handler = handler_fn(move |job: Job<String>| {
        let seen = seen.clone();
        async move {
            if job.payload == "early" {
                seen.fetch_add(1, Ordering::SeqCst);
                return match job.ctx.attempt() {
                    1 => Err(JobError::interrupted("stopped without a drain")),
                    _ => Ok(()),
                };
            }
            assert_eq!(job.ctx.last_checkpoint(), None);
            job.ctx.checkpoint("half").await?;
            assert_eq!(job.ctx.last_checkpoint().as_deref(), Some(&b"half"[..]));
            job.ctx.drain_started().cancelled().await;
            job.ctx.checkpoint("most").await?;
            Err(JobError::interrupted("drain"))
        }
    });
    let cfg = config()
        .concurrency(2)
        .backoff(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(10),
        ))
        .drain_timeout(Duration::from_secs(3600));
    let w = Worker::new(broker.clone(), cfg.build().unwrap(), handler)
        .spawn()
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "the early job retried", || async {
        early_attempts.load(Ordering::SeqCst) == 2
    })
    .await;
    let began = tokio::time::Instant::now();
    let r = stop(w).await;
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "{:?}",
        began.elapsed()
    );
    assert_eq!((r.ok, r.retried, r.released), (1, 1, 1), "{r:?}");
    assert!(r.clean_drain);
    let left = broker
        .fetch(&FetchPlan::single("default", 10, Duration::from_secs(9)))
        .await
        .unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].envelope.attempt, 1);
    assert_eq!(left[0].envelope.checkpoint.as_deref(), Some(&b"most"[..]));
}

/// A handler that stops when told to and, a moment later (well inside the grace),
/// gives the answer its payload names: `ok`, `fatal` or `retry`. From its second
/// attempt on it succeeds at once.
fn answers_after_cancellation(runs: Arc<AtomicU32>) -> impl worker_core::Handler<Payload = String> {
    handler_fn(move |job: Job<String>| {
        runs.fetch_add(1, Ordering::SeqCst);
        async move {
            if job.ctx.attempt() > 1 {
                return Ok(());
            }
            job.ctx.cancellation().cancelled().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            match job.payload.as_str() {
                "fatal" => Err(JobError::fatal("bad input, seen while stopping")),
                "retry" => Err(JobError::retry("upstream busy, seen while stopping")),
                _ => Ok(()),
            }
        }
    })
}

/// A worker running [`answers_after_cancellation`] on jobs `ok`, `fatal` and `retry`,
/// and how many times the handler was called.
async fn start_answers(
    cfg: worker_core::WorkerConfigBuilder,
) -> (MemoryBroker, Arc<AtomicU32>, RunningWorker) {
    let broker = MemoryBroker::new();
    broker
        .enqueue(
            ["ok", "fatal", "retry"]
                .map(|a| NewJob::json("default", &a).unwrap().id(a))
                .into(),
        )
        .await
        .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let handler = answers_after_cancellation(runs.clone());
    let w = Worker::new(broker.clone(), cfg.concurrency(3).build().unwrap(), handler)
        .spawn()
        .await
        .unwrap();
    (broker, runs, w)
}

/// The drain deadline cancels the handlers; one that still finishes inside the grace
/// has its success acked. Any error it returns then is how it stopped, not a verdict
/// on the job: the job is released, attempt not counted.
#[tokio::test(start_paused = true)]
async fn after_the_drain_deadline_an_ok_inside_the_grace_is_acked_and_errors_release() {
    let (broker, runs, w) = start_answers(config().drain_timeout(Duration::from_secs(1))).await;
    eventually(Duration::from_secs(5), "three running", || async {
        runs.load(Ordering::SeqCst) == 3
    })
    .await;
    let r = stop(w).await;
    assert_eq!(
        (r.ok, r.released, r.retried, r.dead, r.clean_drain),
        (1, 2, 0, 0, false),
        "{r:?}"
    );
    let d = broker.depth("default").await.unwrap();
    assert_eq!((d.pending, d.in_flight, d.delayed, d.dead), (2, 0, 0, 0));
    let left = broker
        .fetch(&FetchPlan::single("default", 10, Duration::from_secs(9)))
        .await
        .unwrap();
    let mut ids: Vec<&str> = left.iter().map(|d| d.envelope.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["fatal", "retry"]);
    assert!(left.iter().all(|d| d.envelope.attempt == 1));
}

/// The job timeout cancels the handler; its answer inside the grace is taken as its
/// answer: a success is acked, a fatal error dead-letters with the handler's reason,
/// a retry is counted with the handler's reason. Nothing runs twice but the retry.
#[tokio::test(start_paused = true)]
async fn after_the_job_timeout_the_answer_inside_the_grace_is_the_handlers() {
    let cfg = config()
        .job_timeout(Duration::from_secs(1))
        .backoff(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(10),
        ));
    let (broker, runs, w) = start_answers(cfg).await;
    settled(&broker, &["default"]).await;
    let r = stop(w).await;
    assert_eq!((r.ok, r.retried, r.dead, r.released), (2, 1, 1, 0), "{r:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 4, "only the retry runs again");
    let dead = broker.dead_letters("default", 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.id.as_str(), "fatal");
    assert_eq!(dead[0].reason, "bad input, seen while stopping");
    let d = broker.depth("default").await.unwrap();
    assert_eq!((d.pending, d.in_flight, d.delayed), (0, 0, 0));
}

/// A handler that ignores its cancellation and holds its thread (work done in the
/// handler's own body, between awaits) is still running after `abort`: until it really
/// ends, its budget units stay taken, its lease is extended, and its job is neither
/// settled nor fetched again. Its success, when it comes, is acked.
///
/// On real threads: on tokio's paused clock (one thread) a handler holding the thread
/// would stop the runtime and the test with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_ignores_cancellation_keeps_its_budget_and_its_job_until_it_ends() {
    let memory = MemoryBroker::new();
    let job = |name: &str| NewJob::json("default", &name).unwrap().id(name).cost(10);
    memory.enqueue(vec![job("stuck")]).await.unwrap();
    let broker = Partitionable::new(memory.clone());
    let runs: Arc<HashMap<&'static str, AtomicU32>> = Arc::new(HashMap::from([
        ("stuck", AtomicU32::new(0)),
        ("next", AtomicU32::new(0)),
    ]));
    let (gate, told_to_stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    // Opened on the way out too, so a failed assertion does not leave a thread held.
    let _open = OpenOnDrop(gate.clone());
    let (r, g, t) = (runs.clone(), gate.clone(), told_to_stop.clone());
    let handler = handler_fn(move |job: Job<String>| {
        r[job.payload.as_str()].fetch_add(1, Ordering::SeqCst);
        let (g, t) = (g.clone(), t.clone());
        async move {
            // The first run only: a second one would hold the test's other thread.
            if job.payload == "stuck" && job.ctx.attempt() == 1 {
                while !g.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                t.store(job.ctx.is_cancelled(), Ordering::SeqCst);
            }
            Ok::<_, JobError>(())
        }
    });
    let cfg = config()
        .concurrency(2)
        .budget(10)
        .lease(Duration::from_millis(300))
        .job_timeout(Duration::from_millis(50))
        .backoff(Backoff::new(
            Duration::from_millis(10),
            Duration::from_millis(10),
        ))
        .build()
        .unwrap();
    let w = Worker::new(broker.clone(), cfg, handler)
        .spawn()
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "stuck started", || async {
        runs["stuck"].load(Ordering::SeqCst) == 1
    })
    .await;
    // Fetched at once (a second job may be held), it waits for the budget's units.
    memory.enqueue(vec![job("next")]).await.unwrap();
    // Timeout at 50 ms, abort at 300 ms; the lease is extended every 100 ms. Its fourth
    // extension comes after the abort, so the runtime has then given up on the handler
    // and the budget would be free by now if it were returned at the abort.
    eventually(
        Duration::from_secs(30),
        "the lease kept past the abort, or the job's units given away",
        || async {
            broker.extensions("stuck") >= 4
                || runs["next"].load(Ordering::SeqCst) > 0
                || runs["stuck"].load(Ordering::SeqCst) > 1
        },
    )
    .await;
    let seen = (
        runs["stuck"].load(Ordering::SeqCst),
        runs["next"].load(Ordering::SeqCst),
    );
    assert_eq!(
        seen,
        (1, 0),
        "(runs of stuck, runs of next) while stuck still holds its thread"
    );
    let d = memory.depth("default").await.unwrap();
    assert_eq!((d.pending, d.in_flight, d.delayed), (0, 2, 0));

    gate.store(true, Ordering::SeqCst);
    settled(&memory, &["default"]).await;
    assert!(
        told_to_stop.load(Ordering::SeqCst),
        "the handler was told to stop"
    );
    let r = stop(w).await;
    assert_eq!((r.ok, r.retried, r.released), (2, 0, 0), "{r:?}");
    assert_eq!(runs["stuck"].load(Ordering::SeqCst), 1);
}

struct OpenOnDrop(Arc<AtomicBool>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Three workers of one pool with `quiet_surplus`, each counting the jobs it started;
/// a job's payload is how long it runs, in ms.
async fn quiet_pool(broker: &MemoryBroker) -> (Vec<RunningWorker>, Vec<Arc<AtomicU32>>) {
    let (mut workers, mut started) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let count = Arc::new(AtomicU32::new(0));
        let c = count.clone();
        let handler = handler_fn(move |job: Job<u64>| {
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(job.payload)).await;
                Ok::<_, JobError>(())
            }
        });
        let cfg = config()
            .pool("quiet")
            .concurrency(2)
            .heartbeat(Duration::from_millis(300))
            .quiet_surplus(true)
            .build()
            .unwrap();
        workers.push(
            Worker::new(broker.clone(), cfg, handler)
                .spawn()
                .await
                .unwrap(),
        );
        started.push(count);
        // Started in turn, as pods are: the ranking tells them apart by start time.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (workers, started)
}

/// `(quiet, in_flight)` of each registered worker, sorted.
async fn registry(broker: &MemoryBroker) -> Vec<(bool, u32)> {
    let mut seen: Vec<(bool, u32)> = broker
        .list_workers(Some("quiet"))
        .await
        .unwrap()
        .iter()
        .map(|w| (w.quiet, w.in_flight))
        .collect();
    seen.sort();
    seen
}

#[tokio::test(start_paused = true)]
async fn surplus_workers_go_quiet_take_jobs_again_when_needed_and_never_the_busy_one() {
    let broker = MemoryBroker::new();
    let (workers, started) = quiet_pool(&broker).await;
    // Nothing to do: the pool needs 1 of 3.
    eventually(Duration::from_secs(10), "2 of 3 quiet", || async {
        registry(&broker).await == [(false, 0), (true, 0), (true, 0)]
    })
    .await;

    put(&broker, "default", [serde_json::json!(60_000)]).await;
    eventually(Duration::from_secs(10), "the long job running", || async {
        registry(&broker).await == [(false, 1), (true, 0), (true, 0)]
    })
    .await;
    // It stays so: the busy one is never quiet, the others take nothing.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(registry(&broker).await, [(false, 1), (true, 0), (true, 0)]);
    }

    // 13 in the backlog: the pool needs 7; every worker takes jobs.
    put(
        &broker,
        "default",
        std::iter::repeat_n(serde_json::json!(1000), 12),
    )
    .await;
    eventually(Duration::from_secs(10), "every worker active", || async {
        registry(&broker).await.iter().all(|(q, _)| !q)
    })
    .await;
    eventually(Duration::from_secs(30), "the short jobs done", || async {
        broker.depth("default").await.unwrap().backlog() == 1
    })
    .await;
    for (i, s) in started.iter().enumerate() {
        assert!(
            s.load(Ordering::SeqCst) >= 2,
            "worker {i} started {} jobs",
            s.load(Ordering::SeqCst)
        );
    }
    eventually(Duration::from_secs(10), "2 of 3 quiet again", || async {
        registry(&broker).await == [(false, 1), (true, 0), (true, 0)]
    })
    .await;
    assert_eq!(broker.depth("default").await.unwrap().in_flight, 1);
    for w in workers {
        w.shutdown_handle().force();
        let _ = w.join().await;
    }
}
