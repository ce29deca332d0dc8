//! [`RedisBroker`]: the `Broker` contract on Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script, ScriptInvocation};
use tokio::sync::OnceCell;
use tokio::time::Instant;
use worker_core::broker::validate_queue_name;
use worker_core::job::{AttemptRecord, MAX_HISTORY};
use worker_core::{
    Broker, BrokerError, DeadLetter, Delivery, Envelope, FetchPlan, JobId, Lease, LeaseToken,
    NewJob, QueueDepth, WorkerInfo,
};

use crate::batch::{self, AckItem, AckOutcome, Batches, EnqueueItem, EnqueueOutcome, Taken};
use crate::error::{for_each_waiter, from_redis};
pub use crate::replicas::WaitReplicas;
use crate::scripts;
use crate::wait::Waiter;
use worker_core::{redact, SecretSource};

use crate::credentials::UrlFile;

/// Most expired leases one reap call reclaims per queue (the next call takes the rest).
const REAP_BATCH: u32 = 1000;

/// How to reach Redis and lay out keys.
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
    pub url: String,
    /// The file the URL was read from (`REDIS_URL_FILE`), if it was: each connect
    /// authenticates with the user and password the file holds then. See
    /// [`url_file`](Self::url_file).
    pub url_file: Option<SecretSource>,
    /// Key prefix, so several deployments can share one Redis.
    pub prefix: String,
    /// Largest payload accepted by `enqueue`, in bytes.
    pub max_payload: usize,
    /// How long connecting may take before the call fails as transient.
    pub connect_timeout: Duration,
    /// How long a reply may take before the call fails as transient.
    pub response_timeout: Duration,
    /// PEM certificate(s) of the authority that signed the server's certificate, for
    /// `rediss://` URLs; the system's trust store when `None`.
    pub ca_cert: Option<Vec<u8>>,
    /// PEM certificate and private key this client presents for `rediss://`
    /// (`tls-auth-clients yes`); none when `None`.
    pub client_cert: Option<(Vec<u8>, Vec<u8>)>,
    /// Seed nodes of a Redis Cluster; empty for a single server at `url`.
    pub cluster_nodes: Vec<String>,
    /// Replicas that must confirm an enqueue before it is acknowledged (`WAIT`), and
    /// how long to wait for them; `None` acknowledges once the master has written it.
    /// See [`wait_replicas`](Self::wait_replicas).
    pub wait_replicas: Option<WaitReplicas>,
}

impl RedisConfig {
    /// Defaults for `url`: prefix `wp`, 16 MiB payloads, 5 s to connect, 10 s to reply.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            url_file: None,
            prefix: "wp".into(),
            max_payload: 16 << 20,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(10),
            ca_cert: None,
            client_cert: None,
            cluster_nodes: Vec::new(),
            wait_replicas: None,
        }
    }

    /// A Redis Cluster reached through these seed node URLs. Each queue's keys share
    /// one hash tag, so every script touches a single slot.
    pub fn cluster<S: Into<String>>(nodes: impl IntoIterator<Item = S>) -> Self {
        let nodes: Vec<String> = nodes.into_iter().map(Into::into).collect();
        let mut config = Self::new(nodes.first().cloned().unwrap_or_default());
        config.cluster_nodes = nodes;
        config
    }

    /// Take the URL from a file (a mounted Secret): read now, and again at each connect
    /// and reconnect for its user and password, so a rotated password is picked up
    /// without a restart (a live connection re-authenticates within seconds of the
    /// change). Its host, port and database are read now only.
    pub fn url_file(path: impl Into<std::path::PathBuf>) -> Result<Self, worker_core::ConfigError> {
        let path = path.into().display().to_string();
        let source = SecretSource::lookup(
            &|name| (name == "REDIS_URL_FILE").then(|| path.clone()),
            "REDIS_URL",
        )?
        .ok_or_else(|| {
            worker_core::ConfigError::invalid("REDIS_URL_FILE", &path, "the path of a file")
        })?;
        let mut config = Self::new(source.read()?);
        config.url_file = Some(source);
        Ok(config)
    }

    /// Trust this PEM certificate authority for `rediss://` (e.g. a private CA).
    pub fn ca_cert_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_cert = Some(pem.into());
        self
    }

    /// Present this PEM certificate and private key to the server (mutual TLS).
    pub fn client_cert_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }

    /// The certificates of a TLS connection, when any were configured.
    fn tls_certificates(&self) -> Option<redis::TlsCertificates> {
        if self.ca_cert.is_none() && self.client_cert.is_none() {
            return None;
        }
        Some(redis::TlsCertificates {
            client_tls: self
                .client_cert
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca_cert.clone(),
        })
    }

    /// Use this key prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Refuse payloads over `bytes`.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// Acknowledge an enqueue only once `replicas` replicas of its master hold it
    /// (Redis `WAIT`, sent on the same connection right after the write). Redis
    /// replicates asynchronously: without this, a master killed just after
    /// acknowledging loses the jobs its replica had not received yet, and the replica
    /// promoted in its place never had them. With it, an enqueue its replicas have
    /// not confirmed within `timeout` fails as transient (`Unavailable`): the jobs are
    /// on the master and may or may not survive its failure, and enqueueing the same
    /// ids again is safe (a `DuplicateJob` answer means they are stored). It costs one
    /// replica round trip per enqueue call (concurrent enqueues to a queue share one);
    /// `replicas` 0 turns it off. Other writes need no wait: a lost ack or lease only
    /// makes a job run again, never lose it.
    pub fn wait_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_replicas = (replicas > 0).then_some(WaitReplicas { replicas, timeout });
        self
    }

    /// Build the broker. Connections are made on first use, so a Redis that is down at
    /// start is retried by the worker with backoff; only a malformed URL fails here.
    pub async fn connect(self) -> Result<RedisBroker, BrokerError> {
        validate_queue_name(&self.prefix).map_err(|e| {
            BrokerError::Protocol(format!("invalid key prefix {:?}: {e}", self.prefix))
        })?;
        let invalid = |e: redis::RedisError| {
            // Never echo the URL itself: it may carry a password.
            BrokerError::Protocol(format!(
                "invalid Redis URL {}: {:?}",
                redact(&self.url),
                e.kind()
            ))
        };
        let certs = self.tls_certificates();
        let client = open_client(&self.url, certs.clone()).map_err(invalid)?;
        tracing::debug!(url = %redact(&self.url), prefix = %self.prefix, "redis broker configured");
        let mut manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
            // Fail a call fast while the server is down; the runtime backs off itself.
            .set_number_of_retries(1);
        let url_file = self.url_file.clone().map(UrlFile::new);
        if let Some(file) = &url_file {
            manager_config = manager_config.set_credentials_provider(file.clone());
        }
        let cluster = if self.cluster_nodes.is_empty() {
            None
        } else {
            let mut builder = redis::cluster::ClusterClient::builder(self.cluster_nodes.clone())
                .connection_timeout(self.connect_timeout)
                .response_timeout(self.response_timeout)
                .retries(2);
            if let Some(file) = &url_file {
                builder = builder.set_credentials_provider(file.clone());
            }
            if let Some(certs) = certs.clone() {
                if self
                    .cluster_nodes
                    .iter()
                    .any(|n| n.starts_with("rediss://"))
                {
                    install_crypto_provider();
                }
                builder = builder.certs(certs);
            }
            Some(builder.build().map_err(invalid)?)
        };
        // Notifications subscribe on connections of their own: each from the file's URL
        // as it reads then.
        let fresh_client: Option<crate::wait::ClientSource> = url_file.map(|file| {
            let certs = certs.clone();
            let source: crate::wait::ClientSource =
                Box::new(move || open_client(&file.url()?, certs.clone()));
            source
        });
        Ok(RedisBroker {
            client: client.clone(),
            cluster,
            manager_config,
            conn: OnceCell::new(),
            prefix: self.prefix,
            max_payload: self.max_payload,
            next_due: Mutex::new(HashMap::new()),
            waiter: Waiter::new(client, fresh_client),
            acks: Arc::new(Batches::new(1000, usize::MAX, |_| 1)),
            enqueues: Arc::new(Batches::new(500, 4 << 20, batch::enqueue_bytes)),
            wait_replicas: self.wait_replicas,
        })
    }
}

/// One shared connection: a self-reconnecting multiplexed connection to a single
/// server, or redis-rs's cluster connection, which routes each script by its keys' slot.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// A client of the server at `url`, with `certs` (a CA to trust, a client
/// certificate) for `rediss://` when given.
fn open_client(
    url: &str,
    certs: Option<redis::TlsCertificates>,
) -> redis::RedisResult<redis::Client> {
    match certs {
        Some(certs) => {
            install_crypto_provider();
            redis::Client::build_with_tls(url, certs)
        }
        None => {
            if url.starts_with("rediss://") {
                install_crypto_provider();
            }
            redis::Client::open(url)
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact(&self.url))
            .field("url_file", &self.url_file)
            .field("prefix", &self.prefix)
            .field("max_payload", &self.max_payload)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("ca_cert", &self.ca_cert.is_some())
            .field("client_cert", &self.client_cert.is_some())
            .field(
                "cluster_nodes",
                &self
                    .cluster_nodes
                    .iter()
                    .map(|n| redact(n))
                    .collect::<Vec<_>>(),
            )
            .field("wait_replicas", &self.wait_replicas)
            .finish()
    }
}

/// rustls needs one process-wide cryptography provider; install ring's unless the
/// application installed one already.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The Redis backend. Cheap to share behind an `Arc`.
///
/// # Enqueue: one queue is all or nothing, a batch over several is not
///
/// [`Broker::enqueue`] checks every job first (payload size, queue name) and writes
/// nothing if one is refused. It then writes the batch queue by queue, in the order
/// each queue first appears in it, each queue's jobs in one script call that stores
/// all of them or none. The first queue whose call fails ends the enqueue with its
/// error, and then:
///
/// - the queues before it are stored whole, the queues after it not at all;
/// - on [`BrokerError::DuplicateJob`] none of its jobs are stored (the error names
///   the job whose id was taken);
/// - on any other error (a lost connection, a reply that did not come) its jobs may
///   or may not be stored: the call may have run before the reply was lost.
///
/// A producer that retries should therefore give its jobs ids of its own
/// ([`NewJob::id`]): sending a stored job again is then refused as a duplicate rather
/// than stored twice, and after an error it sends again the failing queue's jobs and
/// those of the queues after it. One queue per call makes every enqueue all or
/// nothing. Queues of one batch are not written in one step because, on a cluster,
/// each queue lives on its own slot, which one script cannot span.
///
/// All calls share one multiplexed connection that reconnects by itself: concurrent
/// calls from many tasks are pipelined on one socket, and no call pays a health-check
/// round trip (as a pool's check-out does). It is opened on first use, so a server
/// that is down when the worker starts is a transient error the runtime backs off on.
pub struct RedisBroker {
    client: redis::Client,
    cluster: Option<redis::cluster::ClusterClient>,
    manager_config: ConnectionManagerConfig,
    conn: OnceCell<Conn>,
    prefix: String,
    max_payload: usize,
    /// When each queue's first delayed job falls due, as the last empty fetch saw it.
    next_due: Mutex<HashMap<String, Instant>>,
    waiter: Waiter,
    acks: Arc<Batches<AckItem, AckOutcome>>,
    enqueues: Arc<Batches<EnqueueItem, EnqueueOutcome>>,
    wait_replicas: Option<WaitReplicas>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Items a fetch reply gives per job (see `lua/fetch.lua`).
const ROW: usize = 5;

/// A fetch reply, read: the deliveries to hand out, and the jobs leased with them that
/// do not read, each with its lease and why.
#[derive(Default)]
struct Fetched {
    deliveries: Vec<Delivery>,
    unreadable: Vec<(Lease, String)>,
}

/// A queue's keys, in the order every script takes them (see `lua/prelude.lua`).
const QUEUE_KEYS: [&str; 6] = [
    "pending",
    "inflight",
    "jobs",
    "delayed",
    "dead",
    "dead_jobs",
];

impl RedisBroker {
    /// Connect with the defaults of [`RedisConfig::new`].
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        RedisConfig::new(url).connect().await
    }

    /// The key prefix in use.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn connection(&self) -> Result<Conn, BrokerError> {
        self.conn
            .get_or_try_init(|| async {
                match &self.cluster {
                    Some(cluster) => cluster.get_async_connection().await.map(Conn::Cluster),
                    None => ConnectionManager::new_with_config(
                        self.client.clone(),
                        self.manager_config.clone(),
                    )
                    .await
                    .map(Conn::Single),
                }
            })
            .await
            .cloned()
            .map_err(|e| from_redis("connect", e))
    }

    fn tag(&self, queue: &str) -> String {
        format!("{{{}:{queue}}}", self.prefix)
    }

    pub(crate) fn channel(&self, queue: &str) -> String {
        format!("{}:notify", self.tag(queue))
    }

    async fn call<T: FromRedisValue>(
        &self,
        op: &'static str,
        script: &Script,
        keys: &[String],
        args: impl FnOnce(&mut ScriptInvocation<'_>),
    ) -> Result<T, BrokerError> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        args(&mut inv);
        let result = match self.connection().await? {
            Conn::Single(mut c) => inv.invoke_async(&mut c).await,
            Conn::Cluster(mut c) => inv.invoke_async(&mut c).await,
        };
        result.map_err(|e| from_redis(op, e))
    }

    fn queue_keys(&self, queue: &str) -> Vec<String> {
        let tag = self.tag(queue);
        QUEUE_KEYS.iter().map(|k| format!("{tag}:{k}")).collect()
    }

    async fn queue_call<T: FromRedisValue>(
        &self,
        op: &'static str,
        script: &Script,
        queue: &str,
        args: impl FnOnce(&mut ScriptInvocation<'_>),
    ) -> Result<T, BrokerError> {
        self.call(op, script, &self.queue_keys(queue), args).await
    }

    /// A call on a leased job: the script's reply (`1` done, `0` the token no longer
    /// owns the job, a script may have more).
    async fn fenced_reply(
        &self,
        op: &'static str,
        script: &Script,
        lease: &Lease,
        extra: impl FnOnce(&mut ScriptInvocation<'_>),
    ) -> Result<i64, BrokerError> {
        self.queue_call(op, script, &lease.queue, |inv| {
            inv.arg(lease.job_id.as_str())
                .arg(lease.token.0.to_string());
            extra(inv);
        })
        .await
    }

    /// A settling call: `1` means done, `0` means the token no longer owns the job.
    async fn fenced(
        &self,
        op: &'static str,
        script: &Script,
        lease: &Lease,
        extra: impl FnOnce(&mut ScriptInvocation<'_>),
    ) -> Result<(), BrokerError> {
        let done = self.fenced_reply(op, script, lease, extra).await?;
        if done == 1 {
            Ok(())
        } else {
            Err(BrokerError::LeaseLost {
                job_id: lease.job_id.clone(),
            })
        }
    }

    /// Up to `n` jobs from one queue: a one-queue plan (the cluster path).
    async fn fetch_queue(
        &self,
        queue: &str,
        n: u32,
        lease: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        self.fetch_plan(&FetchPlan::single(queue, n, lease)).await
    }

    /// Deliveries from a fetch reply: quintuples (queue's number in the plan, id,
    /// envelope, meta, history), the i-th leased with `tokens[i]`, then one "ms until
    /// the first delayed job is due" per queue (-1: none), which is remembered for the
    /// idle wait. A job that does not read is not a delivery: it comes back among the
    /// unreadable, with its lease and why, for the caller to dead-letter.
    /// The largest stored envelope a fetch decodes: a payload at its limit escaped as
    /// JSON, a checkpoint as large, headers and history. A larger one was written by
    /// something else than enqueue; decoding it could take a great deal of memory.
    fn max_envelope(&self) -> usize {
        self.max_payload.saturating_mul(4).saturating_add(1 << 20)
    }

    fn parse_fetched(
        &self,
        mut rows: Vec<Vec<u8>>,
        queues: &[&str],
        tokens: &[u64],
    ) -> Result<Fetched, BrokerError> {
        if rows.len() < queues.len()
            || !(rows.len() - queues.len()).is_multiple_of(ROW)
            || (rows.len() - queues.len()) / ROW > tokens.len()
        {
            return Err(BrokerError::Protocol(format!(
                "malformed fetch reply of {} items",
                rows.len()
            )));
        }
        let dues = rows.split_off(rows.len() - queues.len());
        {
            let mut next = self.next_due.lock().unwrap_or_else(|p| p.into_inner());
            for (queue, due) in queues.iter().zip(&dues) {
                let due = text(due).ok().and_then(|t| t.parse::<i64>().ok());
                match due {
                    Some(due) if due >= 0 => {
                        next.insert(
                            (*queue).to_owned(),
                            Instant::now() + Duration::from_millis(due as u64),
                        );
                    }
                    _ => {
                        next.remove(*queue);
                    }
                }
            }
        }
        let mut fetched = Fetched::default();
        for (r, token) in rows.chunks_exact(ROW).zip(tokens) {
            let queue = text(&r[0])
                .ok()
                .and_then(|q| q.parse::<usize>().ok())
                .and_then(|q| queues.get(q.checked_sub(1)?))
                .ok_or_else(|| {
                    BrokerError::Protocol(format!(
                        "fetch reply names queue {:?} of a plan of {}",
                        String::from_utf8_lossy(&r[0]),
                        queues.len()
                    ))
                })?;
            let id = String::from_utf8_lossy(&r[1]);
            let lease = Lease::new(JobId::from(id.as_ref()), *queue, LeaseToken(*token));
            let stored = if r[2].len() > self.max_envelope() {
                Err(format!(
                    "stored envelope of {} bytes is larger than the {} bytes a fetch reads \
                     (4 × the payload limit + 1 MiB): not written by this version's enqueue",
                    r[2].len(),
                    self.max_envelope()
                ))
            } else {
                read_stored(&id, queue, &r[2])
            };
            match stored {
                Ok(mut env) => {
                    let (attempt, due) = parse_meta(&r[1], &r[3]);
                    env.attempt = attempt;
                    env.history = read_history(&id, &r[4]);
                    env.due_at_ms = due;
                    fetched.deliveries.push(Delivery::new(env, lease.token));
                }
                Err(reason) => fetched.unreadable.push((lease, reason)),
            }
        }
        Ok(fetched)
    }

    /// Dead-letter jobs a fetch leased but could not read, each with why. One that
    /// fails stays leased: its lease runs out, it is reclaimed, and the fetch that
    /// finds it next tries again.
    async fn bury_unreadable(&self, unreadable: Vec<(Lease, String)>) {
        for (lease, reason) in unreadable {
            tracing::warn!(
                job = %lease.job_id,
                queue = %lease.queue,
                %reason,
                "unreadable job in redis; dead-lettered"
            );
            if let Err(e) = self.dead_letter(&lease, &reason).await {
                tracing::warn!(
                    job = %lease.job_id,
                    queue = %lease.queue,
                    error = %e,
                    "could not dead-letter an unreadable job; it is retried when its lease runs out"
                );
            }
        }
    }

    /// A whole plan in one round trip; all its queues must be on one server (always
    /// true without a cluster, and for one-queue plans). Acks of the plan's queues that
    /// wait behind an ack call on the wire travel with it.
    async fn fetch_plan(&self, plan: &FetchPlan) -> Result<Vec<Delivery>, BrokerError> {
        let keys: Vec<String> = plan
            .shares
            .iter()
            .flat_map(|s| {
                let tag = self.tag(&s.queue);
                QUEUE_KEYS.iter().map(move |k| format!("{tag}:{k}"))
            })
            .collect();
        let tokens: Vec<u64> = (0..plan.total).map(|_| LeaseToken::random().0).collect();
        let acks: Vec<Taken<AckItem, AckOutcome>> = plan
            .shares
            .iter()
            .map(|s| self.acks.take(&s.queue))
            .collect();
        let n_acks: usize = acks.iter().map(Taken::len).sum();
        let reply: Result<Vec<Vec<u8>>, BrokerError> = self
            .call("fetch", &scripts::FETCH, &keys, |inv| {
                inv.arg(plan.total)
                    .arg(plan.lease.as_millis() as u64)
                    .arg(plan.shares.len());
                for s in &plan.shares {
                    inv.arg(s.share);
                }
                for s in &plan.shares {
                    inv.arg(s.max);
                }
                for t in &tokens {
                    inv.arg(*t);
                }
                inv.arg(n_acks);
                for (q, taken) in acks.iter().enumerate() {
                    for (id, token) in taken.items() {
                        inv.arg(q + 1)
                            .arg(id.as_str())
                            .arg(batch::ack_suffix(*token));
                    }
                }
            })
            .await;
        let reply = reply.and_then(|rows| {
            if rows.len() >= n_acks {
                Ok(rows)
            } else {
                Err(BrokerError::Protocol(format!(
                    "malformed fetch reply of {} items",
                    rows.len()
                )))
            }
        });
        let mut rows = match reply {
            Ok(rows) => rows,
            Err(e) => {
                for taken in acks {
                    taken.settle(Err(for_each_waiter(&e)));
                }
                return Err(e);
            }
        };
        let mut acked = rows.split_off(rows.len() - n_acks).into_iter();
        for taken in acks {
            let outcomes = acked
                .by_ref()
                .take(taken.len())
                .map(|a| a == b"1")
                .collect();
            taken.settle(Ok(outcomes));
        }
        let queues: Vec<&str> = plan.shares.iter().map(|s| s.queue.as_str()).collect();
        let fetched = self.parse_fetched(rows, &queues, &tokens)?;
        self.bury_unreadable(fetched.unreadable).await;
        Ok(fetched.deliveries)
    }
}

fn text(raw: &[u8]) -> Result<&str, BrokerError> {
    std::str::from_utf8(raw).map_err(|_| BrokerError::Protocol("non-UTF-8 field from redis".into()))
}

fn parse_num(raw: &[u8]) -> Result<u64, BrokerError> {
    let t = text(raw)?;
    // Lua may hand back integral floats such as "3.0" or "1.7e12"; accept both forms.
    t.parse::<u64>()
        .or_else(|_| t.parse::<f64>().map(|f| f as u64))
        .map_err(|_| BrokerError::Protocol(format!("expected a number from redis, got {t:?}")))
}

/// Attempt and due time of a waiting job's meta, `attempt|due|` (the token is the
/// fetch's own). A meta that does not read so (written by something else) counts as a
/// first attempt due at once, as the scripts read it, so the job still runs.
fn parse_meta(id: &[u8], raw: &[u8]) -> (u32, u64) {
    let parsed = text(raw).ok().and_then(|t| {
        let mut parts = t.split('|');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(d), Some(""), None) => Some((
                parse_num(a.as_bytes()).ok()? as u32,
                parse_num(d.as_bytes()).ok()?,
            )),
            _ => None,
        }
    });
    parsed.unwrap_or_else(|| {
        tracing::warn!(
            job = %String::from_utf8_lossy(id),
            meta = %String::from_utf8_lossy(raw),
            "unreadable job meta in redis; taken as a first attempt"
        );
        (1, 0)
    })
}

/// The end of a cluster fetch whose call to `queue` failed with `error`: the jobs
/// leased by the calls before it, or the error when there are none.
fn leased_before(
    leased: Vec<Delivery>,
    queue: &str,
    error: BrokerError,
) -> Result<Vec<Delivery>, BrokerError> {
    if leased.is_empty() {
        return Err(error);
    }
    tracing::warn!(
        queue,
        error = %error,
        leased = leased.len(),
        "redis fetch failed on one queue; handing out the jobs already leased from the others"
    );
    Ok(leased)
}

/// The envelope stored for job `id` of `queue`, or why it cannot be run: it does not
/// decode, or it names another job or queue (its lease would not be the one stored).
fn read_stored(id: &str, queue: &str, raw: &[u8]) -> Result<Envelope, String> {
    let env = Envelope::from_bytes(raw).map_err(|e| format!("stored envelope is corrupt: {e}"))?;
    if env.id.as_str() != id || env.queue != queue {
        return Err(format!(
            "stored envelope is corrupt: it names job {:?} of queue {:?} but is stored as job {id:?} of queue {queue:?}",
            env.id.as_str(),
            env.queue
        ));
    }
    Ok(env)
}

/// The stored envelope of job `id` of `queue`, under the id and queue it is stored
/// as (which `requeue_dead` and `purge_dead` take), or, when it does not decode, as
/// much of it as reads: the fields of its JSON that still decode, and as payload its
/// own payload field if that reads, else the stored bytes whole, so nothing of the
/// job is lost.
fn envelope_or_salvage(id: &str, queue: &str, raw: &[u8]) -> Envelope {
    match read_stored(id, queue, raw) {
        Ok(env) => env,
        Err(reason) => {
            tracing::warn!(job = id, queue, %reason, "listing what reads of a stored envelope");
            let mut env = Envelope::from_bytes(raw).unwrap_or_else(|_| salvage(id, queue, raw));
            env.id = JobId::from(id);
            env.queue = queue.to_owned();
            env
        }
    }
}

fn salvage(id: &str, queue: &str, raw: &[u8]) -> Envelope {
    use serde_json::Value;
    let fields = match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(fields)) => fields,
        _ => serde_json::Map::new(),
    };
    let payload = match fields.get("payload") {
        Some(Value::String(text)) => text.as_bytes().to_vec(),
        Some(Value::Array(bytes)) => bytes
            .iter()
            .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect::<Option<Vec<u8>>>()
            .unwrap_or_else(|| raw.to_vec()),
        _ => raw.to_vec(),
    };
    let mut env = Envelope::from_new(NewJob::new(queue, payload).id(id));
    let number = |name: &str| fields.get(name).and_then(Value::as_u64);
    env.enqueued_at_ms = number("enqueued_at_ms").unwrap_or(0);
    env.due_at_ms = number("due_at_ms").unwrap_or(env.enqueued_at_ms);
    env.max_attempts = number("max_attempts").and_then(|n| u32::try_from(n).ok());
    env.cost = number("cost")
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0);
    if let Some(Value::Object(headers)) = fields.get("headers") {
        env.headers = headers
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect();
    }
    env
}

/// A job's stored history, its newest [`MAX_HISTORY`] records. A history that does
/// not decode is only a record of past failures: the job keeps running without it.
fn read_history(id: &str, raw: &[u8]) -> Vec<AttemptRecord> {
    if raw.is_empty() {
        return Vec::new();
    }
    match serde_json::from_slice::<Vec<AttemptRecord>>(raw) {
        Ok(mut h) => {
            if h.len() > MAX_HISTORY {
                h.drain(..h.len() - MAX_HISTORY);
            }
            h
        }
        Err(e) => {
            tracing::warn!(job = id, error = %e, "unreadable attempt history in redis; taken as empty");
            Vec::new()
        }
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, BrokerError> {
        for (i, job) in jobs.iter().enumerate() {
            worker_core::broker::validate_new_job(job, i + 1)?;
            if job.payload.len() > self.max_payload {
                return Err(BrokerError::PayloadTooLarge {
                    size: job.payload.len(),
                    limit: self.max_payload,
                });
            }
        }
        let mut ids = Vec::with_capacity(jobs.len());
        // Queues in the order each first appears in the batch: the order they are
        // written in, which the type's docs promise producers.
        let mut by_queue: Vec<(String, EnqueueItem)> = Vec::new();
        for job in jobs {
            let env = Envelope::from_new(job);
            let delay = env.due_at_ms.saturating_sub(env.enqueued_at_ms);
            ids.push(env.id.clone());
            let at = match by_queue.iter().position(|(q, _)| *q == env.queue) {
                Some(at) => at,
                None => {
                    by_queue.push((env.queue.clone(), Vec::new()));
                    by_queue.len() - 1
                }
            };
            by_queue[at].1.push((env.id.clone(), env.to_bytes(), delay));
        }
        for (queue, jobs) in by_queue {
            let (written, start) = self.enqueues.push(&queue, jobs);
            if start {
                match self.connection().await {
                    Ok(conn) => {
                        tokio::spawn(batch::flush_enqueues(
                            self.enqueues.clone(),
                            queue.clone(),
                            conn,
                            self.queue_keys(&queue),
                            self.channel(&queue),
                            self.wait_replicas,
                        ));
                    }
                    Err(e) => self.enqueues.fail_all(&queue, &e),
                }
            }
            match written.await {
                Ok(Ok(None)) => {}
                Ok(Ok(Some(id))) => return Err(BrokerError::DuplicateJob { job_id: id.into() }),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(BrokerError::Unavailable {
                        message: "redis enqueue: the batch carrying these jobs was dropped".into(),
                        source: None,
                    })
                }
            }
        }
        Ok(ids)
    }

    async fn fetch(&self, plan: &FetchPlan) -> Result<Vec<Delivery>, BrokerError> {
        if plan.total == 0 || plan.shares.is_empty() {
            return Ok(Vec::new());
        }
        if self.cluster.is_none() {
            return self.fetch_plan(plan).await;
        }
        // One script per queue keeps every call on one cluster slot. The first pass
        // takes each share; the second tops up from queues that had more. Each call
        // leases what it returns, so a call that fails ends the fetch with the jobs
        // already leased: dropping them would leave them to wait out their lease.
        let mut out = Vec::new();
        let mut taken = vec![0u32; plan.shares.len()];
        let mut short = false;
        for (i, share) in plan.shares.iter().enumerate() {
            let got = match self
                .fetch_queue(&share.queue, share.share, plan.lease)
                .await
            {
                Ok(got) => got,
                Err(e) => return leased_before(out, &share.queue, e),
            };
            taken[i] = got.len() as u32;
            short |= taken[i] < share.share;
            out.extend(got);
        }
        for (i, share) in plan.shares.iter().enumerate() {
            let left = plan.total.saturating_sub(out.len() as u32);
            if left == 0 || !short {
                break;
            }
            let room = share.max.saturating_sub(taken[i]).min(left);
            // A queue that could not fill its own share has nothing more to give.
            if room == 0 || taken[i] < share.share {
                continue;
            }
            match self.fetch_queue(&share.queue, room, plan.lease).await {
                Ok(got) => out.extend(got),
                Err(e) => return leased_before(out, &share.queue, e),
            }
        }
        Ok(out)
    }

    async fn ack(&self, lease: &Lease) -> Result<(), BrokerError> {
        let (acked, start) = self
            .acks
            .push(&lease.queue, (lease.job_id.clone(), lease.token));
        if start {
            match self.connection().await {
                Ok(conn) => {
                    let keys = self.queue_keys(&lease.queue);
                    tokio::spawn(batch::flush_acks(
                        self.acks.clone(),
                        lease.queue.clone(),
                        conn,
                        keys,
                    ));
                }
                Err(e) => self.acks.fail_all(&lease.queue, &e),
            }
        }
        match acked.await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(BrokerError::LeaseLost {
                job_id: lease.job_id.clone(),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BrokerError::Unavailable {
                message: "redis ack: the batch carrying this ack was dropped".into(),
                source: None,
            }),
        }
    }

    async fn retry_after(
        &self,
        lease: &Lease,
        delay: Duration,
        error: &str,
    ) -> Result<(), BrokerError> {
        let channel = self.channel(&lease.queue);
        self.fenced("retry", &scripts::RETRY, lease, |inv| {
            inv.arg(delay.as_millis() as u64).arg(error).arg(&channel);
        })
        .await
    }

    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), BrokerError> {
        let done = self
            .fenced_reply("dead_letter", &scripts::DEAD, lease, |inv| {
                inv.arg(reason);
            })
            .await?;
        match done {
            1 => Ok(()),
            // A dead letter of this id is stored already; it is never overwritten.
            2 => Err(BrokerError::DuplicateJob {
                job_id: lease.job_id.clone(),
            }),
            _ => Err(BrokerError::LeaseLost {
                job_id: lease.job_id.clone(),
            }),
        }
    }

    async fn release(&self, lease: &Lease) -> Result<(), BrokerError> {
        let channel = self.channel(&lease.queue);
        self.fenced("release", &scripts::RELEASE, lease, |inv| {
            inv.arg(&channel);
        })
        .await
    }

    async fn extend_lease(&self, lease: &Lease, lease_for: Duration) -> Result<(), BrokerError> {
        self.fenced("extend_lease", &scripts::EXTEND, lease, |inv| {
            inv.arg(lease_for.as_millis() as u64);
        })
        .await
    }

    async fn extend_leases(
        &self,
        leases: &[Lease],
        lease_for: Duration,
    ) -> Vec<Result<(), BrokerError>> {
        // One script call per queue (a queue's keys share one slot), all at once.
        let mut by_queue: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, lease) in leases.iter().enumerate() {
            match by_queue.iter_mut().find(|(q, _)| *q == lease.queue) {
                Some((_, at)) => at.push(i),
                None => by_queue.push((&lease.queue, vec![i])),
            }
        }
        let ms = u64::try_from(lease_for.as_millis()).unwrap_or(u64::MAX);
        let calls = by_queue.iter().map(|(queue, at)| async move {
            let reply: Result<Vec<i64>, BrokerError> = self
                .queue_call("extend_lease", &scripts::EXTEND_ALL, queue, |inv| {
                    inv.arg(ms);
                    for &i in at {
                        inv.arg(leases[i].job_id.as_str())
                            .arg(batch::ack_suffix(leases[i].token));
                    }
                })
                .await;
            (at, reply)
        });
        let mut out: Vec<Result<(), BrokerError>> = leases.iter().map(|_| Ok(())).collect();
        for (at, reply) in futures::future::join_all(calls).await {
            match reply {
                Ok(done) if done.len() == at.len() => {
                    for (&i, d) in at.iter().zip(done) {
                        if d != 1 {
                            out[i] = Err(BrokerError::LeaseLost {
                                job_id: leases[i].job_id.clone(),
                            });
                        }
                    }
                }
                Ok(done) => {
                    let e = BrokerError::Protocol(format!(
                        "extend_lease: reply of {} items for {} leases",
                        done.len(),
                        at.len()
                    ));
                    for &i in at.iter() {
                        out[i] = Err(crate::error::for_each_waiter(&e));
                    }
                }
                Err(e) => {
                    for &i in at.iter() {
                        out[i] = Err(crate::error::for_each_waiter(&e));
                    }
                }
            }
        }
        out
    }

    async fn checkpoint(&self, lease: &Lease, job: &Envelope) -> Result<(), BrokerError> {
        let size = job.checkpoint.as_ref().map_or(0, |c| c.len()) + job.payload.len();
        if size > self.max_payload {
            return Err(BrokerError::PayloadTooLarge {
                size,
                limit: self.max_payload,
            });
        }
        let stored = job.to_bytes();
        self.fenced("checkpoint", &scripts::CHECKPOINT, lease, |inv| {
            inv.arg(stored);
        })
        .await
    }

    async fn reap_expired(&self, queues: &[String]) -> Result<u64, BrokerError> {
        let mut total = 0;
        for q in queues {
            let channel = self.channel(q);
            let n: u64 = self
                .queue_call("reap", &scripts::REAP, q, |inv| {
                    inv.arg(REAP_BATCH).arg(&channel);
                })
                .await?;
            total += n;
        }
        Ok(total)
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        let v: Vec<i64> = self
            .queue_call("depth", &scripts::DEPTH, queue, |_| {})
            .await?;
        let [pending, in_flight, delayed, delayed_due, dead, age, ..] = v[..] else {
            return Err(BrokerError::Protocol(format!(
                "depth script returned {v:?}"
            )));
        };
        let mut d = QueueDepth::default();
        d.pending = pending as u64;
        d.in_flight = in_flight as u64;
        d.delayed = delayed as u64;
        d.delayed_due = delayed_due as u64;
        d.dead = dead as u64;
        d.oldest_pending_age = (age >= 0).then(|| Duration::from_millis(age as u64));
        d.read_from(
            &QueueDepth::FIELDS,
            "redis: one atomic script over the queue's keys (in_flight = unexpired leases)",
        );
        Ok(d)
    }

    async fn dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows: Vec<Vec<u8>> = self
            .queue_call("dead_letters", &scripts::DEAD_LIST, queue, |inv| {
                // ZRANGE takes a signed 64-bit rank.
                inv.arg((limit.min(i64::MAX as usize) - 1) as u64);
            })
            .await?;
        // Each dead letter is read on its own: one that does not decode is listed with
        // what reads of it, never hiding the others.
        Ok(rows
            .chunks_exact(6)
            .map(|r| {
                let id = String::from_utf8_lossy(&r[0]);
                let mut env = envelope_or_salvage(&id, queue, &r[1]);
                env.attempt = parse_num(&r[3]).map_or(1, |a| a as u32);
                env.history = read_history(&id, &r[4]);
                let died_at = parse_num(&r[5]).unwrap_or(0);
                DeadLetter::new(env, String::from_utf8_lossy(&r[2]), died_at)
            })
            .collect())
    }

    async fn requeue_dead(&self, queue: &str, ids: &[JobId]) -> Result<u64, BrokerError> {
        let channel = self.channel(queue);
        self.queue_call("requeue_dead", &scripts::DEAD_REQUEUE, queue, |inv| {
            inv.arg(&channel);
            for id in ids {
                inv.arg(id.as_str());
            }
        })
        .await
    }

    async fn purge_dead(&self, queue: &str, ids: &[JobId]) -> Result<u64, BrokerError> {
        self.queue_call("purge_dead", &scripts::DEAD_PURGE, queue, |inv| {
            for id in ids {
                inv.arg(id.as_str());
            }
        })
        .await
    }

    async fn register_worker(&self, info: &WorkerInfo, ttl: Duration) -> Result<(), BrokerError> {
        let mut info = info.clone();
        info.last_beat_ms = worker_core::job::now_ms();
        let json = serde_json::to_string(&info)
            .map_err(|e| BrokerError::Protocol(format!("cannot encode worker info: {e}")))?;
        let _: i64 = self
            .call(
                "register_worker",
                &scripts::REGISTRY,
                &self.registry_keys(),
                |inv| {
                    inv.arg("beat")
                        .arg(&info.id)
                        .arg(json)
                        .arg(ttl.as_millis() as u64);
                },
            )
            .await?;
        Ok(())
    }

    async fn list_workers(&self, pool: Option<&str>) -> Result<Vec<WorkerInfo>, BrokerError> {
        let rows: Vec<Vec<u8>> = self
            .call(
                "list_workers",
                &scripts::REGISTRY,
                &self.registry_keys(),
                |inv| {
                    inv.arg("list");
                },
            )
            .await?;
        let mut out: Vec<WorkerInfo> = rows
            .iter()
            .filter_map(|r| serde_json::from_slice::<WorkerInfo>(r).ok())
            .filter(|w| pool.is_none_or(|p| w.pool == p))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn deregister_worker(&self, worker_id: &str) -> Result<(), BrokerError> {
        let _: i64 = self
            .call(
                "deregister_worker",
                &scripts::REGISTRY,
                &self.registry_keys(),
                |inv| {
                    inv.arg("leave").arg(worker_id);
                },
            )
            .await?;
        Ok(())
    }

    async fn wait_for_work(&self, queues: &[String], timeout: Duration) {
        self.waiter.wait(self, queues, timeout).await;
    }
}

impl RedisBroker {
    fn registry_keys(&self) -> Vec<String> {
        let tag = format!("{{{}:workers}}", self.prefix);
        vec![format!("{tag}:index"), format!("{tag}:info")]
    }

    /// Time until the first delayed job of `queue` is due, as the last fetch saw it.
    /// A retry scheduled since then by another worker is not seen here; the idle
    /// wait's own timeout bounds how late it starts.
    pub(crate) fn next_due(&self, queue: &str) -> Option<Duration> {
        let next = self.next_due.lock().unwrap_or_else(|p| p.into_inner());
        next.get(queue)
            .map(|at| at.saturating_duration_since(Instant::now()))
    }
}
