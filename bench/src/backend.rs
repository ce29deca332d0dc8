//! The brokers under test, the framework's view of them (through [`Probe`], which
//! timestamps every ack), and the raw loop a careful engineer would write by hand
//! with no framework: the ceiling every framework figure is compared against.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use clap::ValueEnum;
use tokio::sync::{Notify, Semaphore};
use worker_amqp::{AmqpConfig, FetchMode};
use worker_core::{
    Broker, BrokerError, DeadLetter, Delivery, Envelope, FetchPlan, JobId, Lease, MemoryBroker,
    NewJob, QueueDepth, WorkerInfo,
};
use worker_redis::RedisConfig;

use crate::clock::{now_ns, unix_ns};
use crate::Result;

/// Which broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// The embedded in-memory broker (in-process only).
    Memory,
    /// Redis.
    Redis,
    /// RabbitMQ.
    Amqp,
}

impl Kind {
    /// Lower-case name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Memory => "memory",
            Kind::Redis => "redis",
            Kind::Amqp => "amqp",
        }
    }
}

/// Where the brokers are.
#[derive(Clone, Debug, clap::Args)]
pub struct Urls {
    /// Redis URL.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// RabbitMQ URL (its virtual host is replaced by each run's own).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// RabbitMQ management API, with credentials: each run gets a virtual host of its
    /// own through it, and the idle scenario reads connection statistics from it.
    #[arg(
        long,
        env = "AMQP_MANAGEMENT_URL",
        default_value = "http://guest:guest@127.0.0.1:15672"
    )]
    pub amqp_management_url: String,
}

impl Urls {
    /// The same settings as command-line arguments, for a child process.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--redis-url".into(),
            self.redis_url.clone(),
            "--amqp-url".into(),
            self.amqp_url.clone(),
            "--amqp-management-url".into(),
            self.amqp_management_url.clone(),
        ]
    }

    /// The AMQP URL with virtual host `vhost`.
    pub fn amqp_url_in(&self, vhost: &str) -> String {
        let base = match self.amqp_url.split_once("://") {
            Some((scheme, rest)) => {
                let authority = rest.split(['/', '?']).next().unwrap_or(rest);
                format!("{scheme}://{authority}")
            }
            None => self.amqp_url.clone(),
        };
        format!("{base}/{vhost}")
    }
}

/// The RabbitMQ management API, for what the harness does around a run.
pub struct Management {
    http: reqwest::Client,
    base: String,
    user: String,
    password: String,
}

impl Management {
    /// A client of the API at `url` (`http://user:password@host:port`).
    pub fn new(url: &str) -> Result<Self> {
        let (scheme, rest) = url.split_once("://").ok_or("management URL: no scheme")?;
        let (creds, host) = rest.rsplit_once('@').unwrap_or(("guest:guest", rest));
        let (user, password) = creds.split_once(':').unwrap_or((creds, ""));
        Ok(Self {
            http: reqwest::Client::new(),
            base: format!("{scheme}://{}", host.trim_end_matches('/')),
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str) -> Result<reqwest::Response> {
        Ok(self
            .http
            .request(method, format!("{}/api/{path}", self.base))
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await?)
    }

    /// Create virtual host `name` with every permission for the API's user.
    pub async fn create_vhost(&self, name: &str) -> Result<()> {
        let r = self
            .http
            .put(format!("{}/api/vhosts/{name}", self.base))
            .basic_auth(&self.user, Some(&self.password))
            .json(&serde_json::json!({}))
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(format!("create vhost {name}: HTTP {}", r.status()).into());
        }
        let r = self
            .http
            .put(format!(
                "{}/api/permissions/{name}/{}",
                self.base, self.user
            ))
            .basic_auth(&self.user, Some(&self.password))
            .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(format!("permissions on {name}: HTTP {}", r.status()).into());
        }
        Ok(())
    }

    /// Names of the virtual hosts, or of the default vhost's queues, starting with `prefix`.
    async fn names(&self, path: &str, prefix: &str) -> Result<Vec<String>> {
        let list: serde_json::Value = self
            .call(reqwest::Method::GET, &format!("{path}?columns=name"))
            .await?
            .json()
            .await?;
        Ok(list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str())
            .filter(|n| n.starts_with(prefix))
            .map(str::to_owned)
            .collect())
    }

    /// Delete the virtual hosts, and the default vhost's queues, named `prefix…`.
    pub async fn delete_all(&self, prefix: &str) -> Result<()> {
        for v in self.names("vhosts", prefix).await? {
            self.call(reqwest::Method::DELETE, &format!("vhosts/{v}"))
                .await?;
        }
        for q in self.names("queues/%2F", prefix).await? {
            self.call(reqwest::Method::DELETE, &format!("queues/%2F/{q}"))
                .await?;
        }
        Ok(())
    }

    /// Frames RabbitMQ has received on the connections of virtual host `vhost`
    /// (statistics the broker refreshes every few seconds), and how many connections.
    pub async fn frames_received(&self, vhost: &str) -> Result<(u64, usize)> {
        let list: serde_json::Value = self
            .call(
                reqwest::Method::GET,
                &format!("vhosts/{vhost}/connections?columns=name,recv_cnt"),
            )
            .await?
            .json()
            .await?;
        let conns = list.as_array().cloned().unwrap_or_default();
        let frames = conns.iter().filter_map(|c| c["recv_cnt"].as_u64()).sum();
        Ok((frames, conns.len()))
    }
}

/// A run's own namespace on a shared broker, so runs never see each other's jobs.
pub fn namespace(tag: &str) -> String {
    format!("bench-{}-{tag}-{}", std::process::id(), fastrand::u32(..))
}

/// The Redis server's own CPU time so far (user and system, seconds, from `INFO cpu`),
/// for `kind` Redis; `None` for other backends or when it cannot be read. Every
/// client's work counts, so it measures a run only on a server the run has to itself.
pub async fn redis_cpu_seconds(kind: Kind, urls: &Urls) -> Option<f64> {
    if kind != Kind::Redis {
        return None;
    }
    let client = redis::Client::open(urls.redis_url.as_str()).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(&mut conn)
        .await
        .ok()?;
    let field = |name: &str| -> Option<f64> {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(field("used_cpu_user")? + field("used_cpu_sys")?)
}

/// Delete every key this process's runs left on Redis (a run that failed midway
/// leaves its jobs behind). Best effort: the run's own result is what matters.
pub async fn cleanup(urls: &Urls) {
    if let Ok(m) = Management::new(&urls.amqp_management_url) {
        let _ = m
            .delete_all(&format!("bench-{}-", std::process::id()))
            .await;
    }
    let Ok(client) = redis::Client::open(urls.redis_url.as_str()) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let pattern = format!("*bench-{}-*", std::process::id());
    let mut keys: Vec<String> = Vec::new();
    if let Ok(mut iter) = redis::AsyncCommands::scan_match::<_, String>(&mut conn, &pattern).await {
        use futures::StreamExt;
        while let Some(k) = iter.next().await {
            keys.extend(k.ok());
        }
    }
    for chunk in keys.chunks(500) {
        let _: Result<i64, _> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
    }
}

/// The framework's broker for `kind`. `prefix` isolates the run: the Redis key
/// prefix, RabbitMQ's virtual host (made here when missing). A RabbitMQ consumer's
/// prefetch is `prefetch`; `AMQP_FETCH=get` takes RabbitMQ's jobs with `basic.get`
/// instead (see `worker_amqp::FetchMode`).
pub async fn connect(
    kind: Kind,
    urls: &Urls,
    prefix: &str,
    prefetch: u32,
) -> Result<Arc<dyn Broker>> {
    Ok(match kind {
        Kind::Amqp => {
            Management::new(&urls.amqp_management_url)?
                .create_vhost(prefix)
                .await?;
            let mut config = AmqpConfig::new(urls.amqp_url_in(prefix))
                .management_url(&urls.amqp_management_url)
                .prefetch(prefetch.clamp(1, u32::from(u16::MAX)) as u16);
            if let Ok(v) = std::env::var("AMQP_FETCH") {
                let mode = FetchMode::parse(&v)
                    .ok_or_else(|| format!("AMQP_FETCH={v}: expected consume or get"))?;
                config = config.fetch_mode(mode);
            }
            Arc::new(config.connect().await?)
        }
        Kind::Memory => Arc::new(MemoryBroker::new()),
        Kind::Redis => Arc::new(
            RedisConfig::new(&urls.redis_url)
                .prefix(prefix)
                .connect()
                .await?,
        ),
    })
}

/// Enqueue `n` jobs to `queue`, ids `0..n`, each payload a JSON string of `bytes`
/// bytes, in batches of up to 500 jobs and about 4 MiB.
pub async fn fill(broker: &dyn Broker, queue: &str, n: u64, bytes: usize) -> Result<()> {
    let payload = json_payload(bytes);
    let batch = ((4 << 20) / bytes.max(1)).clamp(1, 500) as u64;
    let mut i = 0;
    while i < n {
        let end = (i + batch).min(n);
        let batch = (i..end)
            .map(|id| NewJob::new(queue, payload.clone()).id(id.to_string()))
            .collect();
        broker.enqueue(batch).await?;
        i = end;
    }
    Ok(())
}

/// A JSON string of exactly `bytes` bytes (at least 2: the quotes).
pub fn json_payload(bytes: usize) -> bytes::Bytes {
    let mut v = vec![b'x'; bytes.max(2)];
    v[0] = b'"';
    let last = v.len() - 1;
    v[last] = b'"';
    v.into()
}

/// A broker wrapper that counts and timestamps successful acks, so a run ends at
/// the last ack, as the broker saw it, not at the last handler return.
pub struct Probe {
    inner: Arc<dyn Broker>,
    acked: AtomicU64,
    last_ack_ns: AtomicU64,
    last_ack_unix_ns: AtomicU64,
    /// Per job index (the job id parsed as a number): when its ack returned (`now_ns`).
    ack_at: Vec<AtomicU64>,
    target: u64,
    reached: Notify,
}

impl Probe {
    /// Wrap `inner`; [`Probe::reached`] fires once `target` acks have returned.
    /// `per_job` sizes the per-job ack record (0 for none).
    pub fn new(inner: Arc<dyn Broker>, target: u64, per_job: usize) -> Arc<Self> {
        Arc::new(Self {
            inner,
            acked: AtomicU64::new(0),
            last_ack_ns: AtomicU64::new(0),
            last_ack_unix_ns: AtomicU64::new(0),
            ack_at: (0..per_job).map(|_| AtomicU64::new(0)).collect(),
            target,
            reached: Notify::new(),
        })
    }

    /// Acks so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// Monotonic time of the last ack.
    pub fn last_ack_ns(&self) -> u64 {
        self.last_ack_ns.load(Ordering::Acquire)
    }

    /// Wall-clock time of the last ack.
    pub fn last_ack_unix_ns(&self) -> u64 {
        self.last_ack_unix_ns.load(Ordering::Acquire)
    }

    /// When job `index`'s ack returned (0 if it has not).
    pub fn ack_at(&self, index: usize) -> u64 {
        self.ack_at
            .get(index)
            .map_or(0, |a| a.load(Ordering::Acquire))
    }

    /// Wait until the target number of acks is reached or `timeout` passes.
    pub async fn wait(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.reached.notified();
            if self.acked() >= self.target {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(format!(
                    "only {} of {} jobs were acked within {timeout:?}",
                    self.acked(),
                    self.target
                )
                .into());
            }
        }
    }
}

#[async_trait]
impl Broker for Probe {
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, BrokerError> {
        self.inner.enqueue(jobs).await
    }
    async fn fetch(&self, plan: &FetchPlan) -> Result<Vec<Delivery>, BrokerError> {
        self.inner.fetch(plan).await
    }
    async fn ack(&self, lease: &Lease) -> Result<(), BrokerError> {
        self.inner.ack(lease).await?;
        let t = now_ns();
        self.last_ack_ns.fetch_max(t, Ordering::AcqRel);
        self.last_ack_unix_ns.fetch_max(unix_ns(), Ordering::AcqRel);
        if let Some(slot) = lease
            .job_id
            .as_str()
            .parse::<usize>()
            .ok()
            .and_then(|i| self.ack_at.get(i))
        {
            slot.store(t, Ordering::Release);
        }
        if self.acked.fetch_add(1, Ordering::AcqRel) + 1 >= self.target {
            self.reached.notify_waiters();
        }
        Ok(())
    }
    async fn retry_after(
        &self,
        lease: &Lease,
        delay: Duration,
        error: &str,
    ) -> Result<(), BrokerError> {
        self.inner.retry_after(lease, delay, error).await
    }
    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), BrokerError> {
        self.inner.dead_letter(lease, reason).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), BrokerError> {
        self.inner.release(lease).await
    }
    async fn extend_lease(&self, lease: &Lease, lease_for: Duration) -> Result<(), BrokerError> {
        self.inner.extend_lease(lease, lease_for).await
    }
    async fn extend_leases(
        &self,
        leases: &[Lease],
        lease_for: Duration,
    ) -> Vec<Result<(), BrokerError>> {
        self.inner.extend_leases(leases, lease_for).await
    }
    async fn reap_expired(&self, queues: &[String]) -> Result<u64, BrokerError> {
        self.inner.reap_expired(queues).await
    }
    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        self.inner.depth(queue).await
    }
    async fn dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        self.inner.dead_letters(queue, limit).await
    }
    async fn requeue_dead(&self, queue: &str, ids: &[JobId]) -> Result<u64, BrokerError> {
        self.inner.requeue_dead(queue, ids).await
    }
    async fn purge_dead(&self, queue: &str, ids: &[JobId]) -> Result<u64, BrokerError> {
        self.inner.purge_dead(queue, ids).await
    }
    async fn register_worker(&self, info: &WorkerInfo, ttl: Duration) -> Result<(), BrokerError> {
        self.inner.register_worker(info, ttl).await
    }
    async fn list_workers(&self, pool: Option<&str>) -> Result<Vec<WorkerInfo>, BrokerError> {
        self.inner.list_workers(pool).await
    }
    async fn deregister_worker(&self, worker_id: &str) -> Result<(), BrokerError> {
        self.inner.deregister_worker(worker_id).await
    }
    async fn wait_for_work(&self, queues: &[String], timeout: Duration) {
        self.inner.wait_for_work(queues, timeout).await
    }
    async fn checkpoint(&self, lease: &Lease, job: &Envelope) -> Result<(), BrokerError> {
        self.inner.checkpoint(lease, job).await
    }
    async fn stop_fetching(&self, queues: &[String]) {
        self.inner.stop_fetching(queues).await
    }

    async fn resume_fetching(&self, queues: &[String]) {
        self.inner.resume_fetching(queues).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
    fn refuses_duplicate_ids(&self) -> bool {
        self.inner.refuses_duplicate_ids()
    }
}

/// One item taken by a raw consumer: its bytes, and what the ack needs.
pub struct RawItem {
    /// The payload as pushed.
    pub data: Vec<u8>,
    key: u64,
    acker: Option<lapin::acker::Acker>,
}

/// The hand-written reliable queue, with no framework.
///
/// * Redis: `LPUSH` to a list; a consumer moves the oldest item into a processing
///   list with `LMOVE` (`BLMOVE` on its own connection when it must wait) and acks
///   with `LREM` — the reliable-queue pattern, one round trip per step. A drain runs
///   each consumer on a thread of its own with a blocking connection of its own
///   ([`RawRedis::drain_on_threads`]).
/// * AMQP: a durable queue, persistent messages published with confirms; one lapin
///   consumer with the framework's prefetch (C, plus `WORKER_PREFETCH` where the
///   framework has one) and manual acks, its deliveries shared by the C tasks.
/// * Memory: a mutex-guarded deque with a semaphore counting its items, and a
///   processing map, so a taken item is held until acked as the framework holds it.
#[derive(Clone)]
pub enum Raw {
    /// In-process.
    Memory(Arc<RawMemory>),
    /// Redis lists `src` and `processing` on one multiplexed connection.
    Redis(Arc<RawRedis>),
    /// A RabbitMQ queue.
    Amqp(Arc<RawAmqp>),
}

/// A lapin connection driven by the tokio runtime.
async fn lapin_connect(url: &str) -> Result<lapin::Connection> {
    let props = lapin::ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    Ok(lapin::Connection::connect(url, props).await?)
}

/// The AMQP raw queue: a consuming connection with the one consumer every task
/// takes deliveries from, and a producer's connection with a confirming channel.
pub struct RawAmqp {
    conn: lapin::Connection,
    _producer: lapin::Connection,
    publisher: lapin::Channel,
    queue: String,
    prefetch: u16,
    consumer: tokio::sync::OnceCell<tokio::sync::Mutex<lapin::Consumer>>,
}

impl RawAmqp {
    async fn consumer(&self) -> Result<&tokio::sync::Mutex<lapin::Consumer>> {
        self.consumer
            .get_or_try_init(|| async {
                let ch = self.conn.create_channel().await?;
                ch.basic_qos(self.prefetch, lapin::options::BasicQosOptions::default())
                    .await?;
                let c = ch
                    .basic_consume(
                        &self.queue,
                        "raw",
                        lapin::options::BasicConsumeOptions::default(),
                        lapin::types::FieldTable::default(),
                    )
                    .await?;
                Ok::<_, crate::Error>(tokio::sync::Mutex::new(c))
            })
            .await
    }
}

impl RawRedis {
    /// Drain the list with `c` consumers, each an OS thread with a blocking connection
    /// of its own and nothing else in its way: `LMOVE` the oldest item into the
    /// processing list, run the handler (a sleep of `sleep_ms`), `LREM` it. Returns
    /// (acked, first start, last ack) on `clock`.
    pub async fn drain_on_threads(
        &self,
        c: u32,
        sleep_ms: u64,
        clock: fn() -> u64,
    ) -> Result<(u64, u64, u64)> {
        let first = Arc::new(AtomicU64::new(0));
        let last = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for _ in 0..c {
            let mut conn = self.client.get_connection()?;
            let (src, processing) = (self.src.clone(), self.processing.clone());
            let (first, last, acked) = (first.clone(), last.clone(), acked.clone());
            threads.push(std::thread::spawn(move || -> redis::RedisResult<()> {
                loop {
                    let item: Option<Vec<u8>> = redis::cmd("LMOVE")
                        .arg(&src)
                        .arg(&processing)
                        .arg("RIGHT")
                        .arg("LEFT")
                        .query(&mut conn)?;
                    let Some(item) = item else {
                        return Ok(());
                    };
                    let _ = first.compare_exchange(0, clock(), Ordering::AcqRel, Ordering::Acquire);
                    if sleep_ms > 0 {
                        std::thread::sleep(Duration::from_millis(sleep_ms));
                    }
                    let _: i64 = redis::cmd("LREM")
                        .arg(&processing)
                        .arg(1)
                        .arg(&item)
                        .query(&mut conn)?;
                    last.fetch_max(clock(), Ordering::AcqRel);
                    acked.fetch_add(1, Ordering::AcqRel);
                }
            }));
        }
        tokio::task::spawn_blocking(move || {
            for t in threads {
                t.join().map_err(|_| "a raw consumer thread panicked")??;
            }
            Ok::<_, crate::Error>(())
        })
        .await??;
        Ok((
            acked.load(Ordering::Acquire),
            first.load(Ordering::Acquire),
            last.load(Ordering::Acquire),
        ))
    }
}

/// The Redis raw queue's connection and lists.
pub struct RawRedis {
    /// For consumers that need their own connection.
    client: redis::Client,
    /// Shared, pipelined connection.
    conn: redis::aio::MultiplexedConnection,
    /// The work list.
    src: String,
    /// The processing list.
    processing: String,
}

/// State of the in-memory raw queue.
pub struct RawMemory {
    items: Mutex<VecDeque<Vec<u8>>>,
    ready: Semaphore,
    processing: Mutex<HashMap<u64, Vec<u8>>>,
    next: AtomicU64,
}

impl Default for RawMemory {
    fn default() -> Self {
        Self {
            items: Mutex::default(),
            ready: Semaphore::new(0),
            processing: Mutex::default(),
            next: AtomicU64::new(0),
        }
    }
}

impl Raw {
    /// A fresh raw queue for `kind` named after `name`; on RabbitMQ its consumer's
    /// prefetch is `prefetch` (the framework's at the same point: concurrency plus
    /// `WORKER_PREFETCH`).
    pub async fn new(kind: Kind, urls: &Urls, name: &str, prefetch: u32) -> Result<Self> {
        Ok(match kind {
            Kind::Amqp => {
                let conn = lapin_connect(&urls.amqp_url).await?;
                // The producer is another service: a connection of its own, as the
                // framework's producer has.
                let producer = lapin_connect(&urls.amqp_url).await?;
                let publisher = producer.create_channel().await?;
                publisher
                    .confirm_select(lapin::options::ConfirmSelectOptions::default())
                    .await?;
                publisher
                    .queue_declare(
                        name,
                        lapin::options::QueueDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        lapin::types::FieldTable::default(),
                    )
                    .await?;
                Raw::Amqp(Arc::new(RawAmqp {
                    conn,
                    _producer: producer,
                    publisher,
                    queue: name.to_owned(),
                    prefetch: prefetch.clamp(1, u32::from(u16::MAX)) as u16,
                    consumer: tokio::sync::OnceCell::new(),
                }))
            }
            Kind::Memory => Raw::Memory(Arc::default()),
            Kind::Redis => {
                let client = redis::Client::open(urls.redis_url.as_str())?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                // Large payloads at high concurrency queue many MiB on one connection.
                conn.set_response_timeout(Duration::from_secs(60));
                Raw::Redis(Arc::new(RawRedis {
                    client,
                    conn,
                    src: format!("{name}:src"),
                    processing: format!("{name}:processing"),
                }))
            }
        })
    }

    /// Push items (in batches of 500 per command).
    pub async fn push(&self, items: Vec<Vec<u8>>) -> Result<()> {
        match self {
            Raw::Memory(m) => {
                let n = items.len();
                m.items.lock().map_err(|_| "poisoned")?.extend(items);
                m.ready.add_permits(n);
            }
            Raw::Amqp(a) => {
                let props = lapin::BasicProperties::default().with_delivery_mode(2);
                let mut confirms = Vec::with_capacity(items.len());
                for item in &items {
                    confirms.push(
                        a.publisher
                            .basic_publish(
                                "",
                                &a.queue,
                                lapin::options::BasicPublishOptions::default(),
                                item,
                                props.clone(),
                            )
                            .await?,
                    );
                }
                for c in confirms {
                    if !c.await?.is_ack() {
                        return Err("raw push: the broker refused a message".into());
                    }
                }
            }
            Raw::Redis(r) => {
                let (mut conn, src) = (r.conn.clone(), &r.src);
                // Up to 500 items and about 4 MiB per command.
                let per = ((4 << 20) / items.first().map_or(1, Vec::len).max(1)).clamp(1, 500);
                for chunk in items.chunks(per) {
                    let _: () = redis::cmd("LPUSH")
                        .arg(src)
                        .arg(chunk)
                        .query_async(&mut conn)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// A consumer handle: `blocking` ones wait for work (and get their own
    /// connection on Redis, since a blocking command holds a connection).
    pub async fn consumer(&self, blocking: bool) -> Result<RawConsumer> {
        let own = match self {
            Raw::Redis(r) if blocking => {
                let mut own = r.client.get_multiplexed_async_connection().await?;
                // BLMOVE waits up to 1 s; the default response timeout is shorter.
                own.set_response_timeout(Duration::from_secs(5));
                Some(own)
            }
            _ => None,
        };
        Ok(RawConsumer {
            raw: self.clone(),
            own,
            blocking,
        })
    }
}

/// One consumer of a [`Raw`] queue.
pub struct RawConsumer {
    raw: Raw,
    own: Option<redis::aio::MultiplexedConnection>,
    blocking: bool,
}

impl RawConsumer {
    /// Take the oldest item; `None` when empty (non-blocking) or after waiting 1 s.
    pub async fn pop(&mut self) -> Result<Option<RawItem>> {
        match &self.raw {
            Raw::Memory(m) => {
                let permit = if self.blocking {
                    match tokio::time::timeout(Duration::from_secs(1), m.ready.acquire()).await {
                        Ok(p) => p?,
                        Err(_) => return Ok(None),
                    }
                } else {
                    match m.ready.try_acquire() {
                        Ok(p) => p,
                        Err(_) => return Ok(None),
                    }
                };
                permit.forget();
                let Some(data) = m.items.lock().map_err(|_| "poisoned")?.pop_front() else {
                    return Ok(None);
                };
                let key = m.next.fetch_add(1, Ordering::Relaxed);
                m.processing
                    .lock()
                    .map_err(|_| "poisoned")?
                    .insert(key, data.clone());
                Ok(Some(RawItem {
                    data,
                    key,
                    acker: None,
                }))
            }
            Raw::Redis(r) => {
                let RawRedis {
                    conn,
                    src,
                    processing,
                    ..
                } = r.as_ref();
                let data: Option<Vec<u8>> = match &mut self.own {
                    Some(own) if self.blocking => {
                        redis::cmd("BLMOVE")
                            .arg(src)
                            .arg(processing)
                            .arg("RIGHT")
                            .arg("LEFT")
                            .arg(1.0)
                            .query_async(own)
                            .await?
                    }
                    own => {
                        let mut c = own.clone().unwrap_or_else(|| conn.clone());
                        redis::cmd("LMOVE")
                            .arg(src)
                            .arg(processing)
                            .arg("RIGHT")
                            .arg("LEFT")
                            .query_async(&mut c)
                            .await?
                    }
                };
                Ok(data.map(|data| RawItem {
                    data,
                    key: 0,
                    acker: None,
                }))
            }
            Raw::Amqp(a) => {
                // One task at a time waits on the consumer; the others queue on the lock.
                let wait = Duration::from_millis(if self.blocking { 1000 } else { 500 });
                let consumer = a.consumer().await?;
                let next = async {
                    let mut c = consumer.lock().await;
                    futures::StreamExt::next(&mut *c).await
                };
                match tokio::time::timeout(wait, next).await {
                    Err(_) | Ok(None) => Ok(None),
                    Ok(Some(d)) => {
                        let d = d?;
                        Ok(Some(RawItem {
                            data: d.data,
                            key: d.delivery_tag,
                            acker: Some(d.acker),
                        }))
                    }
                }
            }
        }
    }

    /// Acknowledge an item: remove it from processing.
    pub async fn ack(&mut self, item: &RawItem) -> Result<()> {
        match &self.raw {
            Raw::Memory(m) => {
                m.processing
                    .lock()
                    .map_err(|_| "poisoned")?
                    .remove(&item.key);
            }
            Raw::Amqp(_) => {
                if let Some(acker) = &item.acker {
                    acker
                        .ack(lapin::options::BasicAckOptions::default())
                        .await?;
                }
            }
            Raw::Redis(r) => {
                let RawRedis {
                    conn, processing, ..
                } = r.as_ref();
                let mut c = match &self.own {
                    Some(own) => own.clone(),
                    None => conn.clone(),
                };
                let _: i64 = redis::cmd("LREM")
                    .arg(processing)
                    .arg(1)
                    .arg(&item.data)
                    .query_async(&mut c)
                    .await?;
            }
        }
        Ok(())
    }
}
