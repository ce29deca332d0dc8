//! The pool's depth exporter: `/scaling` and `/metrics` computed from the broker
//! alone, for a process that runs no worker (so the signal exists at zero replicas).
//! It never touches a job.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State as AxumState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::http::{
    depth_failed, depth_read, depth_unavailable_json, public_reason, render_metrics,
};
use super::listener::{self, Limits};
use super::reading::{self, SharedReading};
use super::scaling::ScalingDoc;
use crate::broker::Broker;
use crate::BrokerError;

/// Opens the broker; tried again on later requests (at most one attempt a second)
/// until it succeeds.
pub type Connect = Arc<
    dyn Fn() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Arc<dyn Broker>, BrokerError>> + Send>,
        > + Send
        + Sync,
>;

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
#[derive(Clone)]
pub struct Exporter {
    broker: Arc<tokio::sync::OnceCell<Arc<dyn Broker>>>,
    connect: Connect,
    pool: String,
    capacity: u32,
    queues: Vec<String>,
    min_replicas: u64,
    max_replicas: Option<u64>,
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
            Box::pin(async move { Ok(broker) })
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
            broker: Arc::new(tokio::sync::OnceCell::new()),
            connect,
            pool: pool.into(),
            capacity: capacity_per_replica,
            queues,
            min_replicas: 0,
            max_replicas: None,
        }
    }

    /// Clamp `desired_replicas` to `min ..= max` (no upper bound when `None`).
    pub fn replicas(mut self, min: u64, max: Option<u64>) -> Self {
        self.min_replicas = min;
        self.max_replicas = max;
        self
    }

    /// The routes: `/livez`, `/scaling`, `/metrics`.
    ///
    /// Requests that come within a second of a depth reading, or while one is in
    /// flight, are answered from it: scrapers do not multiply the broker's load. A
    /// reading that failed answers 503 the same way, its error logged (not sent).
    pub fn router(self) -> Router {
        super::prometheus();
        let routes = Routes {
            exporter: self,
            depth: SharedReading::new(reading::DEFAULT_TTL),
        };
        Router::new()
            .route("/livez", get(|| async { "ok\n" }))
            .route("/scaling", get(scaling))
            .route("/metrics", get(metrics))
            .with_state(Arc::new(routes))
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

    async fn read(&self) -> Result<ScalingDoc, BrokerError> {
        let broker = match self.broker.get_or_try_init(|| (self.connect)()).await {
            Ok(broker) => broker,
            Err(e) => {
                depth_failed(&self.pool, &e);
                return Err(e);
            }
        };
        let read = ScalingDoc::read(broker.as_ref(), &self.pool, self.capacity, &self.queues).await;
        let mut doc = depth_read(&self.pool, read)?;
        doc.desired_replicas = doc.desired_replicas.max(self.min_replicas);
        if let Some(max) = self.max_replicas {
            doc.desired_replicas = doc.desired_replicas.min(max);
        }
        Ok(doc)
    }
}

/// The exporter and the depth reading its requests share.
struct Routes {
    exporter: Exporter,
    depth: SharedReading<ScalingDoc>,
}

impl Routes {
    async fn read(&self) -> Result<Arc<ScalingDoc>, Arc<BrokerError>> {
        self.depth.get(|| self.exporter.read()).await
    }
}

async fn scaling(AxumState(r): AxumState<Arc<Routes>>) -> Response {
    match r.read().await {
        Ok(doc) => Json(doc.as_ref()).into_response(),
        // An error, never a 0: a lost signal must trigger the autoscaler's fallback.
        Err(e) => depth_unavailable_json(&e),
    }
}

async fn metrics(AxumState(r): AxumState<Arc<Routes>>) -> Response {
    if let Err(e) = r.read().await {
        // The gauges would show the last reading as if it were current.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read queue depth: {}\n", public_reason(&e)),
        )
            .into_response();
    }
    render_metrics()
}
