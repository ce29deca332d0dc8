//! `/livez`, `/readyz`, `/metrics`, `/scaling`.
//!
//! Bodies never carry a broker error's text, which can name the broker's user and host:
//! they say what failed in a word, and the log has the error with its causes.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State as AxumState;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::listener::{self, Limits};
use super::names;
use super::reading::{self, SharedReading};
use super::scaling::ScalingDoc;
use crate::broker::{Broker, QueueDepth};
use crate::error::chain;
use crate::lifecycle::{Lifecycle, State};
use crate::BrokerError;

/// The worker's routes' state. Clones share one depth reading, so the routes and the
/// quiet-surplus check together cost the broker at most ten readings a second.
#[derive(Clone)]
pub(crate) struct HttpState {
    pub(crate) life: Arc<Lifecycle>,
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) pool: String,
    pub(crate) capacity: u32,
    pub(crate) queues: Vec<String>,
    depth: Arc<SharedReading<ScalingDoc>>,
}

impl HttpState {
    /// The state of a worker of `pool` whose replicas each run `capacity` jobs, fed by
    /// `queues`.
    pub(crate) fn new(
        life: Arc<Lifecycle>,
        broker: Arc<dyn Broker>,
        pool: String,
        capacity: u32,
        queues: Vec<String>,
    ) -> Self {
        Self {
            life,
            broker,
            pool,
            capacity,
            queues,
            depth: Arc::new(SharedReading::new(reading::DEFAULT_TTL)),
        }
    }

    /// The pool's scaling document, from the shared reading.
    pub(crate) async fn read(&self) -> Result<Arc<ScalingDoc>, Arc<BrokerError>> {
        self.depth
            .get(|| async {
                let read = ScalingDoc::read(
                    self.broker.as_ref(),
                    &self.pool,
                    self.capacity,
                    &self.queues,
                )
                .await;
                depth_read(&self.pool, read)
            })
            .await
    }
}

pub(crate) fn router(state: HttpState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/scaling", get(scaling))
        .with_state(Arc::new(state))
}

/// Serve until `stop` fires.
pub(crate) fn serve(
    listener: TcpListener,
    state: HttpState,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = listener::serve(listener, router(state), Limits::DEFAULT, stop).await {
            tracing::error!(error = %e, "HTTP listener failed");
        }
    })
}

pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn readyz(AxumState(s): AxumState<Arc<HttpState>>) -> Response {
    if s.life.is_ready() {
        return (StatusCode::OK, "ready\n").into_response();
    }
    let why = match s.life.state() {
        State::Starting => "starting",
        State::Running if !s.life.drain.is_cancelled() && !s.life.writes_accepted() => {
            "broker refuses writes"
        }
        State::Running if !s.life.drain.is_cancelled() => "broker unreachable",
        State::Running | State::Draining => "draining",
        State::Stopped => "stopped",
    };
    (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
}

async fn scaling(AxumState(r): AxumState<Arc<HttpState>>) -> Response {
    match r.read().await {
        Ok(doc) => Json(doc.as_ref()).into_response(),
        // Never a zero that would scale the pool down: an error the autoscaler sees as one.
        Err(e) => depth_unavailable_json(&e),
    }
}

async fn metrics(AxumState(r): AxumState<Arc<HttpState>>) -> Response {
    // A failed reading is counted and logged where it was taken; the process's own
    // metrics are served regardless.
    let _ = r.read().await;
    render_metrics()
}

/// Finish a depth reading: set the queue gauges from it, or count and log its error
/// with the error's causes (the one place they are shown).
pub(crate) fn depth_read(
    pool: &str,
    read: Result<(ScalingDoc, Vec<(String, QueueDepth)>), BrokerError>,
) -> Result<ScalingDoc, BrokerError> {
    match read {
        Ok((doc, depths)) => {
            publish_depths(pool, &depths);
            Ok(doc)
        }
        Err(e) => {
            depth_failed(pool, &e);
            Err(e)
        }
    }
}

/// Count and log a failed depth reading.
pub(crate) fn depth_failed(pool: &str, e: &BrokerError) {
    metrics::counter!(names::BROKER_ERRORS, names::POOL => pool.to_owned(), names::OP => "depth")
        .increment(1);
    tracing::warn!(pool, error = %chain(e), "cannot read queue depth");
}

/// What a response may say of a broker error: its kind, never its text.
pub(crate) fn public_reason(e: &BrokerError) -> &'static str {
    match e {
        BrokerError::Unavailable { .. } => "broker unavailable",
        BrokerError::Protocol(_) => "broker protocol error",
        BrokerError::InvalidQueueName { .. } => "invalid queue name",
        BrokerError::Unsupported { .. } => "queue depth not supported by this broker",
        BrokerError::LeaseLost { .. }
        | BrokerError::PayloadTooLarge { .. }
        | BrokerError::InvalidJob { .. }
        | BrokerError::DuplicateJob { .. } => "cannot read queue depth",
    }
}

/// The 503 of `/scaling`: `{"error": ...}`, its text from [`public_reason`].
pub(crate) fn depth_unavailable_json(e: &BrokerError) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "error": public_reason(e) })),
    )
        .into_response()
}

/// The process's metrics in the Prometheus text format.
pub(crate) fn render_metrics() -> Response {
    match super::prometheus() {
        Some(handle) => {
            handle.run_upkeep();
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.render(),
            )
                .into_response()
        }
        None => (
            StatusCode::NOT_IMPLEMENTED,
            "another metrics recorder is installed; scrape its exporter\n",
        )
            .into_response(),
    }
}

/// Set the queue gauges from fresh depths.
pub(crate) fn publish_depths(pool: &str, depths: &[(String, QueueDepth)]) {
    for (queue, d) in depths {
        let labels = |state: &'static str| {
            [
                (names::POOL, pool.to_owned()),
                (names::QUEUE, queue.clone()),
                (names::STATE, state.to_owned()),
            ]
        };
        for (state, v) in [
            ("pending", d.pending),
            ("in_flight", d.in_flight),
            ("delayed", d.delayed),
            ("dead", d.dead),
        ] {
            metrics::gauge!(names::QUEUE_DEPTH, &labels(state)).set(v as f64);
        }
        let q = [
            (names::POOL, pool.to_owned()),
            (names::QUEUE, queue.clone()),
        ];
        metrics::gauge!(names::QUEUE_BACKLOG, &q).set(d.backlog() as f64);
        metrics::gauge!(names::QUEUE_OLDEST_AGE, &q)
            .set(d.oldest_pending_age.map_or(0.0, |a| a.as_secs_f64()));
    }
}
