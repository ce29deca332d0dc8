//! One lease keeper per process. Every lease the worker holds is registered here while
//! its job is in the worker's hands; one task extends them all, those falling due
//! together in one [`Broker::extend_leases`](crate::Broker::extend_leases) call (one
//! script call per queue on Redis), and ends jobs whose time is up. A job's own task
//! runs its handler and watches its [`Watch`]: nothing per job ticks.
//!
//! The keeper knows by the worker's own clock until when each lease surely lasts. A
//! lease is lost when the broker refuses its token, or when that time passes without an
//! extension: another worker may own the job by then. A transient failure (the broker
//! unreachable, or refusing writes) loses nothing while time is left: the extension is
//! tried again sooner, and the fetch loop takes no new jobs until writes are accepted
//! again. Either way the keeper tells exactly that job, by cancelling its token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::broker::Lease;
use crate::error::chain;

/// First wait before extending again after a transient failure; it doubles up to
/// lease/3.
const EXTEND_RETRY: Duration = Duration::from_millis(250);
/// Least wait between two extensions.
const EXTEND_RETRY_MIN: Duration = Duration::from_millis(10);

/// What the keeper tells one job.
#[derive(Debug)]
pub(crate) struct Watch {
    /// The handler's token: cancelled when the lease is lost, when the job's time is
    /// up, and (it is a child of the worker's hard-stop token) at the drain deadline.
    pub(crate) stop: CancellationToken,
    lost: AtomicBool,
    timed_out: AtomicBool,
}

impl Watch {
    /// Whether the lease was lost: another worker may own the job.
    pub(crate) fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Whether the job's timeout passed.
    pub(crate) fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Acquire)
    }
}

struct Entry {
    lease: Lease,
    /// Until when the lease surely lasts: the last successful extension (or the fetch)
    /// was sent `lease` before, and the broker started that lease no earlier.
    held_until: Instant,
    /// When to extend next.
    next: Instant,
    /// The wait after the next transient failure.
    retry: Duration,
    /// When the job's time is up, once its handler runs with a timeout.
    timeout_at: Option<Instant>,
    /// An extension of this lease is on the wire.
    extending: bool,
    watch: Arc<Watch>,
}

#[derive(Default)]
struct State {
    next_key: u64,
    held: HashMap<u64, Entry>,
    /// When the keeper wakes by itself next; `None` while it waits to be told.
    wakes_at: Option<Instant>,
}

/// Every lease this worker holds.
pub(crate) struct Leases {
    lease: Duration,
    state: Mutex<State>,
    /// Tells the keeper that something falls due before it would wake.
    wake: Notify,
}

/// A lease registered with the keeper; dropping it stops the extensions.
pub(crate) struct Held<'a> {
    leases: &'a Leases,
    key: u64,
    /// What the keeper tells this job.
    pub(crate) watch: Arc<Watch>,
    /// Whether registering it woke the keeper.
    woke: bool,
}

impl Held<'_> {
    /// End the job's run at `at` (its timeout): its token is cancelled then.
    ///
    /// When that wakes the keeper, this task yields once first: the task a worker
    /// thread wakes last runs next on that thread and no other may take it, so a
    /// handler that holds its thread would otherwise hold the keeper too.
    pub(crate) async fn time_out_at(&self, at: Instant) {
        let woke = {
            let mut st = self.leases.lock();
            if let Some(e) = st.held.get_mut(&self.key) {
                e.timeout_at = Some(at);
            }
            self.leases.wake_if_before(&mut st, at)
        };
        if woke {
            tokio::task::yield_now().await;
        }
    }

    /// Yield once if registering this lease woke the keeper (see
    /// [`time_out_at`](Self::time_out_at)).
    pub(crate) async fn settle_in(&self) {
        if self.woke {
            tokio::task::yield_now().await;
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.leases.lock().held.remove(&self.key);
    }
}

impl Leases {
    pub(crate) fn new(lease: Duration) -> Self {
        Self {
            lease,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wake the keeper if `at` comes before it would wake; whether it did.
    fn wake_if_before(&self, st: &mut State, at: Instant) -> bool {
        if st.wakes_at.is_none_or(|w| at < w) {
            st.wakes_at = Some(at);
            self.wake.notify_one();
            return true;
        }
        false
    }

    /// Keep `lease`, leased by a fetch sent at `fetched_at`, until the returned guard
    /// drops. The job's token is a child of `parent`.
    pub(crate) fn hold(
        &self,
        lease: Lease,
        fetched_at: Instant,
        parent: &CancellationToken,
    ) -> Held<'_> {
        let watch = Arc::new(Watch {
            stop: parent.child_token(),
            lost: AtomicBool::new(false),
            timed_out: AtomicBool::new(false),
        });
        let next = Instant::now() + self.lease / 3;
        let mut st = self.lock();
        let key = st.next_key;
        st.next_key += 1;
        st.held.insert(
            key,
            Entry {
                lease,
                held_until: fetched_at + self.lease,
                next,
                retry: EXTEND_RETRY,
                timeout_at: None,
                extending: false,
                watch: watch.clone(),
            },
        );
        let woke = self.wake_if_before(&mut st, next);
        Held {
            leases: self,
            key,
            watch,
            woke,
        }
    }

    /// At `now`: end the jobs whose time is up, and take the leases to extend (those
    /// due within lease/6 go with those due now, so leases taken close together are
    /// extended together). Returns them with when to look again.
    fn due(&self, now: Instant) -> (Vec<(u64, Lease, Instant)>, Option<Instant>) {
        let slack = self.lease / 6;
        let mut st = self.lock();
        let mut batch = Vec::new();
        let mut wake: Option<Instant> = None;
        for (&key, e) in &mut st.held {
            if let Some(at) = e.timeout_at {
                if at <= now {
                    e.timeout_at = None;
                    e.watch.timed_out.store(true, Ordering::Release);
                    e.watch.stop.cancel();
                } else {
                    wake = Some(wake.map_or(at, |w| w.min(at)));
                }
            }
            if e.extending {
                continue;
            }
            // After a failure the retry waits its time: pulled forward, it would go
            // again at once.
            let early = if e.retry == EXTEND_RETRY {
                slack
            } else {
                Duration::ZERO
            };
            if e.next <= now + early {
                e.extending = true;
                batch.push((key, e.lease.clone(), e.held_until));
            } else {
                wake = Some(wake.map_or(e.next, |w| w.min(e.next)));
            }
        }
        // With nothing due, look again a third of a lease on: a lease taken meanwhile
        // falls due no sooner, so taking it need not wake the keeper.
        let wake = wake.or(Some(now + self.lease / 3));
        st.wakes_at = wake;
        (batch, wake)
    }

    /// The lease of `key` is lost: tell its job and stop extending it.
    fn lose(st: &mut State, key: u64) {
        if let Some(e) = st.held.remove(&key) {
            e.watch.lost.store(true, Ordering::Release);
            e.watch.stop.cancel();
        }
    }
}

/// The keeper: runs until `stop`.
pub(crate) async fn keep<H: Send + Sync + 'static>(
    shared: Arc<Shared<H>>,
    stop: CancellationToken,
) {
    loop {
        let (batch, wake) = shared.leases.due(Instant::now());
        if !batch.is_empty() {
            tokio::spawn(extend(shared.clone(), batch));
        }
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            () = sleep => {}
            () = shared.leases.wake.notified() => {}
        }
    }
}

/// Extend `batch` (key, lease, held until) in one call, and record what came of each.
async fn extend<H>(shared: Arc<Shared<H>>, batch: Vec<(u64, Lease, Instant)>) {
    let leases = &shared.leases;
    let sent = Instant::now();
    let list: Vec<Lease> = batch.iter().map(|(_, l, _)| l.clone()).collect();
    // A reply after the earliest `held_until` still counts for the others: the broker
    // is the judge of its leases.
    let earliest = batch.iter().map(|&(_, _, h)| h).min().unwrap_or(sent);
    let call = shared.broker.extend_leases(&list, leases.lease);
    let replies = tokio::time::timeout_at(earliest, call).await.ok();
    let now = Instant::now();
    let (mut accepted, mut refused_writes) = (false, false);
    {
        let mut st = leases.lock();
        for (i, (key, lease, _)) in batch.iter().enumerate() {
            let reply = replies.as_ref().map(|r| r.get(i));
            let Some(e) = st.held.get_mut(key) else {
                continue;
            };
            e.extending = false;
            match reply {
                Some(Some(Ok(()))) => {
                    e.held_until = sent + leases.lease;
                    e.next = now + leases.lease / 3;
                    e.retry = EXTEND_RETRY;
                    accepted = true;
                    let at = e.next;
                    leases.wake_if_before(&mut st, at);
                }
                Some(Some(Err(err))) if !err.is_transient() => {
                    tracing::warn!(job = %lease.job_id, error = %chain(err), "lease lost: another worker owns this job now");
                    Leases::lose(&mut st, *key);
                }
                failed => {
                    refused_writes = true;
                    let error = match failed {
                        Some(Some(Err(err))) => Some(chain(err)),
                        Some(None) => Some(format!(
                            "the backend answered {} of {} extensions",
                            replies.as_ref().map_or(0, Vec::len),
                            batch.len()
                        )),
                        _ => None,
                    };
                    if now >= e.held_until {
                        let error = error.unwrap_or_else(|| "no reply".into());
                        tracing::warn!(
                            job = %lease.job_id,
                            %error,
                            "lease lost: it ran out before an extension succeeded; another worker may own this job now"
                        );
                        Leases::lose(&mut st, *key);
                        continue;
                    }
                    let left = e.held_until - now;
                    let wait = e.retry.min(left / 2).max(EXTEND_RETRY_MIN);
                    e.next = now + wait;
                    e.retry = (e.retry * 2).min(leases.lease / 3);
                    tracing::warn!(
                        job = %lease.job_id,
                        error = error.as_deref().unwrap_or("no reply yet"),
                        retry_in = ?wait,
                        lease_left = ?left,
                        "lease extension failed; retrying while the lease lasts"
                    );
                    let at = e.next;
                    leases.wake_if_before(&mut st, at);
                }
            }
        }
    }
    if refused_writes {
        shared.broker_error("extend_lease");
        shared.life.set_writes_accepted(false);
    } else if accepted && shared.life.set_writes_accepted(true) {
        tracing::info!("lease extended: the broker accepts writes again");
    }
}
