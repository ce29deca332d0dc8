//! A TCP proxy between workers and their broker that a test can break: cut every
//! open connection, stall them (bytes stop flowing both ways, connections stay open)
//! for a while, or take the way down (every connection closed, open or new).
//!
//! Bounded: one task per connection, each with two fixed 16 KiB buffers, all owned by
//! one `JoinSet` that dies with the proxy.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use worker_core::CancellationToken;

/// The proxy; it stops, closing every connection, when dropped.
pub struct ChaosProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Cancelled to cut the connections open now; replaced after each cut.
    cut: Arc<Mutex<CancellationToken>>,
    down: Arc<AtomicBool>,
    stalled: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ChaosProxy {
    /// Listen on a free loopback port and forward each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("proxy bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("proxy addr: {e}"));
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let (stalled, watching) = watch::channel(false);
        let down = Arc::new(AtomicBool::new(false));
        let (conns_cut, refuse) = (cut.clone(), down.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        // Only a flag between tests and this loop; nothing else is
                        // ordered by it.
                        if refuse.load(Ordering::Relaxed) {
                            continue; // dropped: closed at once
                        }
                        let token = conns_cut.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        conns.spawn(forward(client, upstream, token, watching.clone()));
                    }
                    // Reap finished connections so the set stays as small as what is open.
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Self {
            addr,
            cut,
            down,
            stalled,
            task,
        }
    }

    /// Close every connection open now (new ones are accepted at once).
    pub fn cut(&self) {
        let mut token = self.cut.lock().unwrap_or_else(|p| p.into_inner());
        token.cancel();
        *token = CancellationToken::new();
    }

    /// Take the way down (`true`: every open connection cut, every new one closed at
    /// once) or bring it back (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
        if down {
            self.cut();
        }
    }

    /// Stop forwarding bytes on every connection, open or new, for `how_long`.
    pub async fn stall(&self, how_long: Duration) {
        self.stalled.send_replace(true);
        tokio::time::sleep(how_long).await;
        self.stalled.send_replace(false);
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    mut client: TcpStream,
    upstream: SocketAddr,
    cut: CancellationToken,
    stalled: watch::Receiver<bool>,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let up = pipe(&mut cr, &mut sw, stalled.clone());
    let down = pipe(&mut sr, &mut cw, stalled);
    tokio::select! {
        _ = cut.cancelled() => {}
        _ = async { tokio::join!(up, down) } => {}
    }
}

/// Copy `from` to `to` until either side closes, holding every chunk while stalled.
async fn pipe(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    mut stalled: watch::Receiver<bool>,
) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}
