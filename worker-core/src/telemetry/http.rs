//! `/livez`, `/readyz`, `/metrics`, `/scaling`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State as AxumState;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::names;
use super::scaling::ScalingDoc;
use crate::broker::{Broker, QueueDepth};
use crate::lifecycle::{Lifecycle, State};

#[derive(Clone)]
pub(crate) struct HttpState {
    pub(crate) life: Arc<Lifecycle>,
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) pool: String,
    pub(crate) capacity: u32,
    pub(crate) queues: Vec<String>,
}

pub(crate) fn router(state: HttpState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/scaling", get(scaling))
        .with_state(state)
}

/// Serve until `stop` fires.
pub(crate) fn serve(
    listener: TcpListener,
    state: HttpState,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let app = router(state);
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "HTTP listener failed");
        }
    })
}

pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn readyz(AxumState(s): AxumState<HttpState>) -> Response {
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

async fn scaling(AxumState(s): AxumState<HttpState>) -> Response {
    match ScalingDoc::read(s.broker.as_ref(), &s.pool, s.capacity, &s.queues).await {
        Ok((doc, depths)) => {
            publish_depths(&s.pool, &depths);
            Json(doc).into_response()
        }
        // Never a zero that would scale the pool down: an error the autoscaler sees as one.
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": e.to_string() })),
        )
            .into_response(),
    }
}

async fn metrics(AxumState(s): AxumState<HttpState>) -> Response {
    match ScalingDoc::read(s.broker.as_ref(), &s.pool, s.capacity, &s.queues).await {
        Ok((_, depths)) => publish_depths(&s.pool, &depths),
        Err(e) => {
            metrics::counter!(names::BROKER_ERRORS, names::POOL => s.pool.clone(), names::OP => "depth")
                .increment(1);
            tracing::warn!(error = %e, "cannot read queue depth for /metrics");
        }
    }
    render_metrics()
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
