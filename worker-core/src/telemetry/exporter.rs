//! The pool's depth exporter: `/scaling` and `/metrics` computed from the broker
//! alone, for a process that runs no worker (so the signal exists at zero replicas).
//! It never touches a job.
//!
//! Besides the HTTP routes it offers what a push autoscaler needs (KEDA's external
//! scaler service is served from it by `workerctl exporter`): the same reading as
//! `/scaling` ([`Exporter::scaling`]), and the pool's activity as it changes
//! ([`Exporter::activity`]), which a [`Wake`] of the broker's reports within
//! milliseconds of the first job reaching an idle pool.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State as AxumState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::http::{depth_failed, depth_read, depth_unavailable_json, render_metrics};
use super::listener::{self, Limits};
use super::reading::{self, SharedReading};
use super::scaling::ScalingDoc;
use crate::broker::Broker;
use crate::BrokerError;

mod activity;
use activity::Watcher;
pub use activity::{Activity, Wake};

/// Opens the broker; tried again on later requests (at most one attempt a second)
/// until it succeeds.
pub type Connect = Arc<
    dyn Fn() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Opened, BrokerError>> + Send>,
        > + Send
        + Sync,
>;

/// What [`Connect`] opens: the broker, and what tells, between readings, that work
/// may have reached the pool's queues (none: the activity is read periodically only).
#[derive(Clone)]
pub struct Opened {
    broker: Arc<dyn Broker>,
    wake: Option<Arc<dyn Wake>>,
}

impl Opened {
    /// The broker alone.
    pub fn new(broker: Arc<dyn Broker>) -> Self {
        Self { broker, wake: None }
    }

    /// With `wake` to learn of new work between readings.
    pub fn with_wake(mut self, wake: Arc<dyn Wake>) -> Self {
        self.wake = Some(wake);
        self
    }
}

impl From<Arc<dyn Broker>> for Opened {
    fn from(broker: Arc<dyn Broker>) -> Self {
        Self::new(broker)
    }
}

/// The default of [`Exporter::watch_interval`].
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// What a response may say of a broker error: its kind (`broker unavailable`, ...),
/// never its text, which can name the broker's host and user (the log has it).
pub fn public_reason(e: &BrokerError) -> &'static str {
    super::http::public_reason(e)
}

/// What the exporter serves for: one pool, the queues that feed it, and its bounds.
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// use std::sync::Arc;
/// use worker_core::telemetry::exporter::Exporter;
/// use worker_core::{CancellationToken, MemoryBroker};
///
/// let exporter = Exporter::new(Arc::new(MemoryBroker::new()), "gpu", 4, vec!["gpu".into()])
///     .replicas(0, Some(20));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:9090").await?;
/// exporter.serve(listener, CancellationToken::new()).await
/// # }
/// ```
///
/// Clones share the broker, the depth reading and the activity watcher.
#[derive(Clone)]
pub struct Exporter {
    opened: Arc<tokio::sync::OnceCell<Opened>>,
    connect: Connect,
    pool: String,
    capacity: u32,
    queues: Vec<String>,
    min_replicas: u64,
    max_replicas: Option<u64>,
    activation: u64,
    watch_interval: Duration,
    depth: Arc<SharedReading<ScalingDoc>>,
    watcher: Arc<Watcher>,
}

impl Exporter {
    /// An exporter for `pool`, whose replicas each run `capacity_per_replica` jobs at
    /// once, fed by `queues`.
    pub fn new(
        broker: Arc<dyn Broker>,
        pool: impl Into<String>,
        capacity_per_replica: u32,
        queues: Vec<String>,
    ) -> Self {
        let connect: Connect = Arc::new(move || {
            let broker = broker.clone();
            Box::pin(async move { Ok(Opened::new(broker)) })
        });
        Self::connecting(connect, pool, capacity_per_replica, queues)
    }

    /// An exporter that opens its broker with `connect` on the first request, and on
    /// later ones (at most once a second) until it succeeds: a broker that is down when
    /// the exporter starts is answered with 503 like one that goes down later.
    pub fn connecting(
        connect: Connect,
        pool: impl Into<String>,
        capacity_per_replica: u32,
        queues: Vec<String>,
    ) -> Self {
        Self {
            opened: Arc::new(tokio::sync::OnceCell::new()),
            connect,
            pool: pool.into(),
            capacity: capacity_per_replica,
            queues,
            min_replicas: 0,
            max_replicas: None,
            activation: 0,
            watch_interval: DEFAULT_WATCH_INTERVAL,
            depth: Arc::new(SharedReading::new(reading::DEFAULT_TTL)),
            watcher: Arc::new(Watcher::default()),
        }
    }

    /// Clamp `desired_replicas` to `min ..= max` (no upper bound when `None`).
    pub fn replicas(mut self, min: u64, max: Option<u64>) -> Self {
        self.min_replicas = min;
        self.max_replicas = max;
        self
    }

    /// The pool is active while its backlog is above `backlog` (0 by default: one job
    /// wakes it).
    pub fn activation(mut self, backlog: u64) -> Self {
        self.activation = backlog;
        self
    }

    /// While an [`Activity`] is watched: how often the depth is read besides the
    /// wake-ups ([`DEFAULT_WATCH_INTERVAL`] by default, at least 10 ms). A busy pool
    /// is read only this often, so its return to idle is reported within about one
    /// interval.
    pub fn watch_interval(mut self, interval: Duration) -> Self {
        self.watch_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// The pool's name.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// Jobs one replica runs at once: the autoscaler's target per replica.
    pub fn capacity_per_replica(&self) -> u32 {
        self.capacity
    }

    /// Whether `doc` shows the pool active: its backlog above the activation.
    pub fn is_active(&self, doc: &ScalingDoc) -> bool {
        doc.backlog > self.activation
    }

    /// The pool's scaling document, from the reading `/scaling` and `/metrics` share
    /// (at most one broker reading a second). An error when the broker cannot be read,
    /// never a 0; it is logged with its causes here.
    pub async fn scaling(&self) -> Result<Arc<ScalingDoc>, Arc<BrokerError>> {
        self.depth.get(|| self.read()).await
    }

    /// Follow the pool's activity: see [`Activity`]. Every subscription shares one
    /// watcher, which runs while any is held.
    pub fn activity(&self) -> Activity {
        Watcher::subscribe(self)
    }

    /// The routes: `/livez`, `/scaling`, `/metrics`.
    ///
    /// Requests that come within a second of a depth reading, or while one is in
    /// flight, are answered from it: scrapers do not multiply the broker's load. A
    /// reading that failed answers 503 the same way, its error logged (not sent).
    pub fn router(self) -> Router {
        super::prometheus();
        Router::new()
            .route("/livez", get(|| async { "ok\n" }))
            .route("/scaling", get(scaling))
            .route("/metrics", get(metrics))
            .with_state(Arc::new(self))
    }

    /// Serve on `listener` until `stop` fires, then let open requests finish.
    ///
    /// The listener is the workers' own: a client gets 5 s to send a request's headers
    /// (and 5 s idle between requests) before its connection is closed, and past 64
    /// open connections each new one is closed as soon as it is accepted.
    pub async fn serve(
        self,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let addr: Option<SocketAddr> = listener.local_addr().ok();
        tracing::info!(pool = %self.pool, addr = ?addr, queues = ?self.queues, "exporter listening");
        listener::serve(listener, self.router(), Limits::DEFAULT, stop).await
    }

    /// The broker and its wake-up, opened on first use.
    async fn opened(&self) -> Result<&Opened, BrokerError> {
        match self.opened.get_or_try_init(|| (self.connect)()).await {
            Ok(opened) => Ok(opened),
            Err(e) => {
                depth_failed(&self.pool, &e);
                Err(e)
            }
        }
    }

    async fn read(&self) -> Result<ScalingDoc, BrokerError> {
        let broker = &self.opened().await?.broker;
        let read = ScalingDoc::read(broker.as_ref(), &self.pool, self.capacity, &self.queues).await;
        let mut doc = depth_read(&self.pool, read)?;
        doc.desired_replicas = doc.desired_replicas.max(self.min_replicas);
        if let Some(max) = self.max_replicas {
            doc.desired_replicas = doc.desired_replicas.min(max);
        }
        Ok(doc)
    }
}

async fn scaling(AxumState(r): AxumState<Arc<Exporter>>) -> Response {
    match r.scaling().await {
        Ok(doc) => Json(doc.as_ref()).into_response(),
        // An error, never a 0: a lost signal must trigger the autoscaler's fallback.
        Err(e) => depth_unavailable_json(&e),
    }
}

async fn metrics(AxumState(r): AxumState<Arc<Exporter>>) -> Response {
    if let Err(e) = r.scaling().await {
        // The gauges would show the last reading as if it were current.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read queue depth: {}\n", public_reason(&e)),
        )
            .into_response();
    }
    render_metrics()
}
