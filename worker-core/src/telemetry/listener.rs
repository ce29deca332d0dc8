//! The one HTTP listener behind the worker's routes and the exporter's: HTTP/1.1 on
//! hyper, bounded so that clients that connect and never finish cannot hold the port.
//!
//! Two bounds ([`Limits`]):
//!
//! * A header-read timeout. It runs whenever the server waits for a request's head: from
//!   the accept, and again from the end of each response on a kept-alive connection.
//!   A client that sends half a request, or nothing, or stays idle between requests, is
//!   closed when it runs out, so each slot it holds costs it a reconnect per timeout.
//! * A cap on open connections. One over the cap is accepted and closed at once rather
//!   than left in the kernel's accept queue: queued, it would wait behind clients that
//!   may hold their slots for a whole timeout, and the queue's overflow would drop
//!   handshakes silently; closed, the client learns at once and retries, and the accept
//!   loop keeps the queue empty.
//!
//! Neither makes the port immune to a flood (a client with more sockets than the cap
//! still crowds out probes); they bound what one listener holds, and a network policy
//! decides who may connect at all.

use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What one listener lets its clients hold.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// How long a connection may take to send a request's head, counted from when
    /// the server starts waiting for it (the accept, or the end of the previous
    /// response). Probes and scrapers send theirs in one packet.
    pub(crate) header_read_timeout: Duration,
    /// Connections open at once; each one over is closed as soon as it is accepted.
    /// Kubelet probes, a Prometheus pair and KEDA need a handful.
    pub(crate) max_connections: usize,
}

impl Limits {
    /// The bounds both listeners serve with.
    pub(crate) const DEFAULT: Self = Self {
        header_read_timeout: Duration::from_secs(5),
        max_connections: 64,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Serve `router` on `listener` within `limits` until `stop` fires, then stop
/// accepting, let each open connection finish its request, and return.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let mut http = http1::Builder::new();
    // hyper enforces the header-read timeout only with a timer set.
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    while let Some((stream, peer, slot)) = accept_within(&listener, &slots, &stop, "HTTP").await {
        let service = TowerToHyperService::new(router.clone());
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let stop = stop.clone();
        connections.spawn(async move {
            // The slot is given back when the connection ends, however it ends.
            let _slot = slot;
            let mut connection = pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = stop.cancelled() => {
                    // Finishes a request in progress; an idle connection closes now.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %crate::error::chain(&e), "HTTP connection ended");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// The next connection of `listener` that gets one of `slots`, or `None` once `stop`
/// fires. A connection accepted while every slot is taken is closed at once (see the
/// module's docs); a failed accept is logged and waited out. `what` names the
/// listener in logs (`HTTP`, `gRPC`). The slot is the caller's to hold for as long
/// as the connection lives.
pub async fn accept_within(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    stop: &CancellationToken,
    what: &'static str,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = stop.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e, stop, what).await;
                    continue;
                }
            },
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => return Some((stream, peer, slot)),
            Err(_) => {
                tracing::debug!(%peer, listener = what, "connection over the cap closed");
                drop(stream);
            }
        }
    }
}

/// After a failed accept: a client that gave up is nothing; anything else (out of file
/// descriptors, most often) is logged and waited out, as retrying at once would spin.
async fn accept_failed(e: io::Error, stop: &CancellationToken, what: &str) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, listener = what, "cannot accept; trying again in 1s");
    let _ = stop
        .run_until_cancelled(tokio::time::sleep(Duration::from_secs(1)))
        .await;
}
