//! The pool's activity for a push autoscaler: one watcher per exporter, shared by
//! every subscription and running while any is held.
//!
//! While the pool is idle the watcher waits on the broker's [`Wake`] (bounded by the
//! watch interval) and reads the depth as soon as it fires, so the first job to reach
//! an idle pool is reported within a reading's time. While the pool is active it reads
//! once per watch interval: a return to idle is reported on that reading. A reading
//! that fails changes nothing a subscriber sees; it is logged with its causes, and the
//! watcher reads again after a backoff.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use super::Exporter;
use crate::config::Backoff;
use crate::BrokerError;

/// Tells the exporter, between its readings, that work may have reached one of the
/// pool's queues.
#[async_trait]
pub trait Wake: Send + Sync {
    /// Return when one of `queues` may have received work, or once `timeout` has
    /// passed. A hint: the exporter reads the depth afterwards either way, so a return
    /// with no work costs a reading, not a wrong answer.
    ///
    /// It must take, hold and mark no job (a consumer that receives a delivery and
    /// gives it back leaves it counted as an attempt on RabbitMQ), and must not spin:
    /// a wait during which no job arrives lasts at least tens of milliseconds (the
    /// first one may return at once, to settle a subscription), and one that fails
    /// returns no sooner than it would without work.
    async fn wait(&self, queues: &[String], timeout: Duration);
}

/// The last reading's verdict: none yet, active or not, or why it failed.
type Seen = Option<Result<bool, Arc<BrokerError>>>;

/// Two readings of the watcher are at least this far apart: a pool that stays idle
/// while jobs keep arriving (a running pool that starts each at once) costs at most
/// this rate of readings.
const MIN_GAP: Duration = Duration::from_millis(20);

/// Upper bound of the delay after a first failed reading; it doubles per failure in a
/// row, up to the watch interval.
const RETRY: Duration = Duration::from_millis(250);

/// The running watcher of one exporter, if any.
#[derive(Default)]
pub(super) struct Watcher {
    /// The running watcher's channel; `None` while no subscription is held.
    slot: Mutex<Option<Arc<watch::Sender<Seen>>>>,
}

impl Watcher {
    /// A subscription to `exporter`'s watcher, started when none runs.
    pub(super) fn subscribe(exporter: &Exporter) -> Activity {
        let mut slot = exporter
            .watcher
            .slot
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = slot.as_ref() {
            return Activity::new(tx.subscribe());
        }
        let (tx, rx) = watch::channel(None);
        let tx = Arc::new(tx);
        *slot = Some(tx.clone());
        tokio::spawn(run(exporter.clone(), tx));
        Activity::new(rx)
    }

    /// Retire `tx`'s watcher if no subscription is left; whether it was. Under the
    /// lock that [`subscribe`](Self::subscribe) takes, so no subscription can join a
    /// watcher that is leaving.
    fn retire(&self, tx: &Arc<watch::Sender<Seen>>) -> bool {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if tx.receiver_count() > 0 {
            return false;
        }
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, tx)) {
            *slot = None;
        }
        true
    }
}

/// What the watcher does between two readings.
enum Pause {
    /// The pool is idle: wait for a wake-up, at most one watch interval.
    Wake,
    /// Active, or the reading failed: wait this long.
    Sleep(Duration),
}

/// The watcher: read, publish, pause; until no subscription is left.
async fn run(exporter: Exporter, tx: Arc<watch::Sender<Seen>>) {
    let interval = exporter.watch_interval;
    let backoff = Backoff::new(RETRY, interval.max(RETRY));
    let mut failures = 0u32;
    let mut last_read: Option<Instant> = None;
    tracing::debug!(pool = %exporter.pool, "activity watcher started");
    loop {
        if let Some(at) = last_read {
            tokio::time::sleep_until(at + MIN_GAP).await;
        }
        last_read = Some(Instant::now());
        let reading = exporter.depth.fresh(|| exporter.read()).await;
        let pause = match reading {
            Ok(doc) => {
                failures = 0;
                let active = exporter.is_active(&doc);
                tx.send_replace(Some(Ok(active)));
                if active {
                    Pause::Sleep(interval)
                } else {
                    Pause::Wake
                }
            }
            // Logged with its causes where it was read.
            Err(e) => {
                failures = failures.saturating_add(1);
                tx.send_replace(Some(Err(e)));
                Pause::Sleep(backoff.delay(failures).max(MIN_GAP))
            }
        };
        let paused = async {
            match pause {
                Pause::Sleep(d) => tokio::time::sleep(d).await,
                Pause::Wake => exporter.wake(interval).await,
            }
        };
        tokio::select! {
            () = paused => {}
            () = tx.closed() => {
                if exporter.watcher.retire(&tx) {
                    tracing::debug!(pool = %exporter.pool, "activity watcher stopped");
                    return;
                }
            }
        }
    }
}

impl Exporter {
    /// Until the broker's wake-up fires, or `timeout`; without one, `timeout`.
    async fn wake(&self, timeout: Duration) {
        match self.opened.get().and_then(|o| o.wake.clone()) {
            Some(wake) => wake.wait(&self.queues, timeout).await,
            None => tokio::time::sleep(timeout).await,
        }
    }
}

/// A subscription to the pool's activity: whether its backlog is above the
/// exporter's activation, as the exporter's one watcher reads it.
pub struct Activity {
    rx: watch::Receiver<Seen>,
    last: Option<bool>,
}

impl Activity {
    fn new(rx: watch::Receiver<Seen>) -> Self {
        Self { rx, last: None }
    }

    /// The pool's activity once it differs from what this subscription returned last;
    /// the first call returns the current activity, as soon as a reading succeeded.
    ///
    /// A failed reading changes nothing here: while the broker cannot be read this
    /// waits (the watcher logs each failure and reads again, backing off), never
    /// turning an active pool idle. `None` when the watcher is gone.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a change that arrives meanwhile is returned by the next call.
    pub async fn changed(&mut self) -> Option<bool> {
        loop {
            let seen = self.rx.borrow_and_update().clone();
            if let Some(Ok(active)) = seen {
                if self.last != Some(active) {
                    self.last = Some(active);
                    return Some(active);
                }
            }
            self.rx.changed().await.ok()?;
        }
    }
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity")
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::broker::{Broker, FetchPlan};
    use crate::telemetry::exporter::{Connect, Opened};
    use crate::{MemoryBroker, NewJob};

    /// The in-memory broker's own wake-up (it takes no job), counting its returns.
    struct MemoryWake {
        broker: MemoryBroker,
        returns: AtomicU32,
    }

    #[async_trait]
    impl Wake for MemoryWake {
        async fn wait(&self, queues: &[String], timeout: Duration) {
            self.broker.wait_for_work(queues, timeout).await;
            self.returns.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn exporter(broker: &MemoryBroker, wake: Arc<MemoryWake>, interval: Duration) -> Exporter {
        let broker = broker.clone();
        let connect: Connect = Arc::new(move || {
            let opened = Opened::new(Arc::new(broker.clone())).with_wake(wake.clone());
            Box::pin(async move { Ok(opened) })
        });
        Exporter::connecting(connect, "gpu", 4, vec!["a".into(), "b".into()])
            .watch_interval(interval)
    }

    async fn next(activity: &mut Activity) -> bool {
        tokio::time::timeout(Duration::from_secs(10), activity.changed())
            .await
            .expect("an activity change within 10 s")
            .expect("the watcher runs")
    }

    #[tokio::test]
    async fn the_first_job_wakes_every_subscription_before_the_interval_and_idle_follows() {
        let broker = MemoryBroker::new();
        let wake = Arc::new(MemoryWake {
            broker: broker.clone(),
            returns: AtomicU32::new(0),
        });
        // Long: a change seen sooner came through the wake-up.
        let exporter = exporter(&broker, wake.clone(), Duration::from_secs(60));
        let mut first = exporter.activity();
        let mut second = exporter.activity();
        assert!(!next(&mut first).await);
        assert!(!next(&mut second).await);

        let started = std::time::Instant::now();
        broker
            .enqueue(vec![NewJob::new("b", b"{}".to_vec())])
            .await
            .unwrap();
        assert!(next(&mut first).await);
        assert!(next(&mut second).await);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(wake.returns.load(Ordering::Relaxed) >= 1);

        // The interval now bounds how soon idle is seen: shorten it on a second exporter
        // of the same broker, whose watcher runs on its own.
        let quick = exporter_quick(&broker, &wake);
        let mut third = quick.activity();
        assert!(next(&mut third).await);
        let plan = FetchPlan::single("b", 1, Duration::from_secs(30));
        for delivery in broker.fetch(&plan).await.unwrap() {
            broker.ack(&delivery.lease).await.unwrap();
        }
        assert!(!next(&mut third).await);
    }

    fn exporter_quick(broker: &MemoryBroker, wake: &Arc<MemoryWake>) -> Exporter {
        exporter(broker, wake.clone(), Duration::from_millis(50))
    }

    #[tokio::test]
    async fn the_watcher_stops_with_its_last_subscription_and_starts_again() {
        let broker = MemoryBroker::new();
        let wake = Arc::new(MemoryWake {
            broker: broker.clone(),
            returns: AtomicU32::new(0),
        });
        let exporter = exporter(&broker, wake, Duration::from_millis(50));
        let mut a = exporter.activity();
        assert!(!next(&mut a).await);
        drop(a);
        let deadline = Instant::now() + Duration::from_secs(5);
        while exporter.watcher.slot.lock().unwrap().is_some() {
            assert!(Instant::now() < deadline, "the watcher did not stop");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut b = exporter.activity();
        assert!(!next(&mut b).await);
    }
}
