//! The worker's life: `Starting → Running → Draining → Stopped`, and the two tokens
//! that drive it.
//!
//! * `drain` — the first SIGTERM/SIGINT (or [`ShutdownHandle::drain`]): stop fetching at
//!   once, release jobs fetched but not started, let running jobs finish.
//! * `hard` — the drain deadline, or a second signal (or [`ShutdownHandle::force`]):
//!   cancel running jobs and release them, attempt not counted.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where a worker is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Binding its listener, registering.
    Starting = 0,
    /// Fetching and running jobs.
    Running = 1,
    /// Not fetching; running jobs finish until the drain deadline.
    Draining = 2,
    /// Done; every job it held is settled or released.
    Stopped = 3,
}

impl State {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Starting,
            1 => Self::Running,
            2 => Self::Draining,
            _ => Self::Stopped,
        }
    }
}

/// Lifecycle state shared by the runtime, the HTTP listener and handles.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    state: AtomicU8,
    /// Whether the last broker call succeeded (for `/readyz`).
    connected: AtomicBool,
    /// Whether the broker accepts writes: `false` from a transient failure of a write
    /// on a job (a lease extension, a settle) until a lease extension or a heartbeat
    /// succeeds. The fetch loop takes no new jobs meanwhile.
    writes: watch::Sender<bool>,
    pub(crate) drain: CancellationToken,
    pub(crate) hard: CancellationToken,
}

impl Lifecycle {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            state: AtomicU8::new(State::Starting as u8),
            connected: AtomicBool::new(true),
            writes: watch::Sender::new(true),
            drain: CancellationToken::new(),
            hard: CancellationToken::new(),
        })
    }

    pub(crate) fn state(&self) -> State {
        // Readers only report the state; no other memory is published through it.
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Move forward only: a late `Running` never overwrites `Draining`.
    pub(crate) fn advance(&self, to: State) {
        self.state.fetch_max(to as u8, Ordering::Relaxed);
    }

    pub(crate) fn set_connected(&self, ok: bool) {
        self.connected.store(ok, Ordering::Relaxed);
    }

    /// Record whether a write was accepted; `true` when this changed it.
    pub(crate) fn set_writes_accepted(&self, ok: bool) -> bool {
        self.writes
            .send_if_modified(|now| std::mem::replace(now, ok) != ok)
    }

    pub(crate) fn writes_accepted(&self) -> bool {
        *self.writes.borrow()
    }

    /// Wait until the broker accepts writes again.
    pub(crate) async fn writes_resumed(&self) {
        // The sender lives as long as `self`, so the wait ends only by the value.
        let _ = self.writes.subscribe().wait_for(|ok| *ok).await;
    }

    /// Ready only while running, connected, accepting writes, and not asked to drain
    /// (the token is checked directly so `/readyz` fails the moment a signal arrives).
    pub(crate) fn is_ready(&self) -> bool {
        self.state() == State::Running
            && !self.drain.is_cancelled()
            && self.connected.load(Ordering::Relaxed)
            && self.writes_accepted()
    }
}

/// Asks a running worker to stop. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    pub(crate) life: Arc<Lifecycle>,
}

impl ShutdownHandle {
    /// Begin the drain, as a first SIGTERM does.
    pub fn drain(&self) {
        self.life.drain.cancel();
    }

    /// Release every job at once and stop, as a second signal does.
    pub fn force(&self) {
        self.life.drain.cancel();
        self.life.hard.cancel();
    }

    /// The worker's current state.
    pub fn state(&self) -> State {
        self.life.state()
    }
}

/// Turn SIGTERM/SIGINT into drain (first) and force (second), on a thread of its own
/// so signals are seen even when every runtime thread is busy.
pub(crate) fn install_signal_handlers(
    shutdown: ShutdownHandle,
) -> std::io::Result<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::iterator::Signals;

    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("worker-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen == 1 {
                    tracing::info!(signal, "signal received: draining");
                    shutdown.drain();
                } else {
                    tracing::warn!(signal, "second signal: releasing every job and exiting");
                    shutdown.force();
                }
            }
        })?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn not_ready_while_writes_are_refused() {
        let life = Lifecycle::new();
        life.advance(State::Running);
        assert!(life.is_ready());
        assert!(life.set_writes_accepted(false));
        assert!(
            !life.set_writes_accepted(false),
            "no change the second time"
        );
        assert!(!life.is_ready());
        let resumed = tokio::spawn({
            let life = life.clone();
            async move { life.writes_resumed().await }
        });
        tokio::task::yield_now().await;
        assert!(!resumed.is_finished());
        assert!(life.set_writes_accepted(true));
        resumed.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(life.is_ready());
    }
}
