//! KEDA's external scaler service (`proto/externalscaler.proto`) on the pool's
//! exporter, for KEDA's `external-push` (and `external`) trigger.
//!
//! - `GetMetricSpec`: one metric, `backlog`, whose target is the capacity of one
//!   replica; it needs no broker, so KEDA always gets it while the exporter answers.
//! - `GetMetrics`: the pool's backlog, the same number as `/scaling` (from the same
//!   shared reading), so the HPA wants `ceil(backlog / capacity)` replicas.
//! - `IsActive`: whether the backlog is above the activation (0 by default).
//! - `StreamIsActive`: the activity when the stream opens, then each change: `true`
//!   within a reading's time of the first job reaching an idle pool (Redis: the
//!   queues' pub/sub notices; RabbitMQ: a passive declare every 50 ms while a stream
//!   is open and the pool idle), `false` on the periodic reading after it went idle.
//!   Every stream shares one watcher.
//!
//! While the broker cannot be read, `IsActive` and `GetMetrics` answer `UNAVAILABLE`,
//! never a 0, and a stream sends nothing until a reading succeeds again (each failure
//! is logged with its causes). `StreamMetricSpec`, which KEDA treats as optional,
//! answers `UNIMPLEMENTED`: the spec never changes while the exporter runs.
//!
//! When `scalerMetadata` names a `pool`, it must be the exporter's: a trigger wired to
//! another pool's exporter gets `INVALID_ARGUMENT` rather than that pool's numbers.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request, Response, Status};
use worker_core::telemetry::accept_within;
use worker_core::telemetry::exporter::{public_reason, Activity, Exporter, Wake};
use worker_core::{async_trait, Broker, BrokerError};

/// The code generated from `proto/externalscaler.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("externalscaler");
}

use pb::external_scaler_server::{ExternalScaler, ExternalScalerServer};
use pb::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};

/// The one metric's name (KEDA shows it as `s<trigger index>-backlog`).
pub const METRIC: &str = "backlog";

/// Connections open at once; each one over is closed as soon as it is accepted. KEDA
/// keeps one per scaler address (streams and calls share it).
const MAX_CONNECTIONS: usize = 64;

/// Streams and calls at once on one connection.
const MAX_STREAMS: u32 = 32;

/// A call must be answered within this (a stream's responses are not bounded by it).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTP/2 ping this often on an idle connection, which must be answered within
/// [`KEEPALIVE_TIMEOUT`]: a peer gone without a word frees its slot.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// See [`KEEPALIVE_INTERVAL`].
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the RabbitMQ wake-up counts the ready jobs while the pool is idle.
const AMQP_POLL: Duration = Duration::from_millis(50);

/// The service: the exporter's numbers, and streams that end when `stop` fires.
struct Scaler {
    exporter: Exporter,
    stop: CancellationToken,
}

type ActivityStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;
type SpecStream = Pin<Box<dyn Stream<Item = Result<GetMetricSpecResponse, Status>> + Send>>;

impl Scaler {
    /// Refuse a request whose `scalerMetadata` names another pool.
    fn check(&self, object: &ScaledObjectRef) -> Result<(), Status> {
        match object.scaler_metadata.get("pool") {
            Some(pool) if pool != self.exporter.pool() => Err(Status::invalid_argument(format!(
                "scalerMetadata.pool is {pool:?}, but this exporter serves pool {:?}",
                self.exporter.pool()
            ))),
            _ => Ok(()),
        }
    }

    async fn backlog(&self) -> Result<Arc<worker_core::ScalingDoc>, Status> {
        // Logged with its causes where it was read; the status says only its kind.
        self.exporter.scaling().await.map_err(|e| {
            Status::unavailable(format!("cannot read queue depth: {}", public_reason(&e)))
        })
    }
}

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        self.check(request.get_ref())?;
        let doc = self.backlog().await?;
        Ok(Response::new(IsActiveResponse {
            result: self.exporter.is_active(&doc),
        }))
    }

    type StreamIsActiveStream = ActivityStream;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<ActivityStream>, Status> {
        self.check(request.get_ref())?;
        let state = (self.exporter.activity(), self.stop.clone());
        let stream = futures::stream::unfold(state, |(mut activity, stop): (Activity, _)| async {
            let active = tokio::select! {
                changed = activity.changed() => changed?,
                () = stop.cancelled() => return None,
            };
            Some((Ok(IsActiveResponse { result: active }), (activity, stop)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        self.check(request.get_ref())?;
        let target = self.exporter.capacity_per_replica();
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: METRIC.into(),
                target_size: i64::from(target),
                target_size_float: f64::from(target),
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let request = request.into_inner();
        if let Some(object) = &request.scaled_object_ref {
            self.check(object)?;
        }
        if !request.metric_name.is_empty() && request.metric_name != METRIC {
            return Err(Status::not_found(format!(
                "no metric {:?}: this exporter serves {METRIC:?}",
                request.metric_name
            )));
        }
        let backlog = self.backlog().await?.backlog;
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: METRIC.into(),
                metric_value: i64::try_from(backlog).unwrap_or(i64::MAX),
                metric_value_float: backlog as f64,
            }],
        }))
    }

    type StreamMetricSpecStream = SpecStream;

    async fn stream_metric_spec(
        &self,
        _request: Request<ScaledObjectRef>,
    ) -> Result<Response<SpecStream>, Status> {
        Err(Status::unimplemented(
            "the metric spec does not change while the exporter runs: use GetMetricSpec",
        ))
    }
}

/// Serve the external scaler service for `exporter` on `listener` until `stop` fires:
/// open streams then end, and calls in progress finish.
///
/// At most 64 connections are open at once (one more is closed as soon as it is
/// accepted), 32 streams and calls on each; a call is answered within 30 s, and a
/// connection whose peer stops answering HTTP/2 pings is closed.
pub async fn serve(
    exporter: Exporter,
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(pool = %exporter.pool(), addr = ?addr, "external scaler (gRPC) listening");
    let service = ExternalScalerServer::new(Scaler {
        exporter,
        stop: stop.clone(),
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let incoming = futures::stream::unfold(
        (listener, slots, stop.clone()),
        |(listener, slots, stop)| async move {
            let (stream, peer, slot) = accept_within(&listener, &slots, &stop, "gRPC").await?;
            // Each activity change is one small frame: sent at once, not batched.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
            }
            let conn = Capped {
                stream,
                _slot: slot,
            };
            Some((Ok::<_, io::Error>(conn), (listener, slots, stop)))
        },
    );
    tonic::transport::Server::builder()
        .timeout(CALL_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .serve_with_incoming_shutdown(service, incoming, stop.cancelled_owned())
        .await
}

/// An accepted connection and its slot, given back when the connection is dropped.
struct Capped {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Capped {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Redis: the pub/sub notices every script that makes a job startable publishes on
/// its queue's channel, as an idle worker waits on them. Subscribing takes no job.
pub struct RedisWake(pub Arc<worker_redis::RedisBroker>);

#[async_trait]
impl Wake for RedisWake {
    async fn wait(&self, queues: &[String], timeout: Duration) {
        self.0.wait_for_work(queues, timeout).await;
    }
}

/// RabbitMQ: the ready jobs counted by a passive declare of each queue every 50 ms.
///
/// Not a consumer: one would have to give back the delivery it was sent, and a
/// delivery given back with `basic.nack` is marked redelivered, which the workers
/// count as an attempt on classic queues (and which raised a quorum queue's
/// `x-delivery-count`, towards its delivery limit, before RabbitMQ 4.3). The poll runs
/// only while a stream is open and the pool idle.
pub struct AmqpWake(pub Arc<worker_amqp::AmqpBroker>);

#[async_trait]
impl Wake for AmqpWake {
    async fn wait(&self, queues: &[String], timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.0.ready(queues).await {
                Ok(0) => {}
                Ok(_) => return,
                Err(e) => {
                    // The reading that follows reports it; do not poll a broker that fails.
                    log_wake_failure(&e);
                    let pause = tokio::time::Instant::now() + Duration::from_secs(1);
                    tokio::time::sleep_until(pause.min(deadline)).await;
                    return;
                }
            }
            if tokio::time::Instant::now() + AMQP_POLL >= deadline {
                tokio::time::sleep_until(deadline).await;
                return;
            }
            tokio::time::sleep(AMQP_POLL).await;
        }
    }
}

fn log_wake_failure(e: &BrokerError) {
    tracing::debug!(error = %worker_core::error::chain(e), "cannot count ready jobs");
}
