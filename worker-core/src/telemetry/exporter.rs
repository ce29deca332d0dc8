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

use super::http::{publish_depths, render_metrics};
use super::names;
use super::scaling::ScalingDoc;
use crate::broker::Broker;
use crate::BrokerError;

/// Opens the broker; tried again on each request until it succeeds.
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
    /// each later one until it succeeds: a broker that is down when the exporter starts
    /// is answered with 503 like one that goes down later.
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
    pub fn router(self) -> Router {
        super::prometheus();
        Router::new()
            .route("/livez", get(|| async { "ok\n" }))
            .route("/scaling", get(scaling))
            .route("/metrics", get(metrics))
            .with_state(Arc::new(self))
    }

    /// Serve on `listener` until `stop` fires.
    pub async fn serve(
        self,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> std::io::Result<()> {
        let addr: Option<SocketAddr> = listener.local_addr().ok();
        tracing::info!(pool = %self.pool, addr = ?addr, queues = ?self.queues, "exporter listening");
        axum::serve(listener, self.router())
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    }

    async fn read(&self) -> Result<ScalingDoc, BrokerError> {
        let broker = self.broker.get_or_try_init(|| (self.connect)()).await?;
        let (mut doc, depths) =
            ScalingDoc::read(broker.as_ref(), &self.pool, self.capacity, &self.queues).await?;
        publish_depths(&self.pool, &depths);
        doc.desired_replicas = doc.desired_replicas.max(self.min_replicas);
        if let Some(max) = self.max_replicas {
            doc.desired_replicas = doc.desired_replicas.min(max);
        }
        Ok(doc)
    }
}

async fn scaling(AxumState(e): AxumState<Arc<Exporter>>) -> Response {
    match e.read().await {
        Ok(doc) => Json(doc).into_response(),
        // An error, never a 0: a lost signal must trigger the autoscaler's fallback.
        Err(err) => {
            tracing::warn!(pool = %e.pool, error = %err, "cannot read queue depth");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "error": err.to_string() })),
            )
                .into_response()
        }
    }
}

async fn metrics(AxumState(e): AxumState<Arc<Exporter>>) -> Response {
    if let Err(err) = e.read().await {
        metrics::counter!(names::BROKER_ERRORS, names::POOL => e.pool.clone(), names::OP => "depth")
            .increment(1);
        tracing::warn!(pool = %e.pool, error = %err, "cannot read queue depth for /metrics");
        // The gauges would show the last reading as if it were current.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read queue depth: {err}\n"),
        )
            .into_response();
    }
    render_metrics()
}
