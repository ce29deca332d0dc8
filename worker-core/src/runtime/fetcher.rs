//! The fetch loop: take permits first, then ask the broker for exactly that many jobs.
//!
//! Several fetches may be on the wire at once (up to [`MAX_FETCHES`]): a job that
//! finishes while a fetch is travelling frees its permit, and the next fetch goes at
//! once instead of after that reply, so a busy pool's pipeline stays full. Together
//! they never ask for more jobs than there are permits, and the scheduler reserves
//! each plan's room, so per-queue limits hold across them.
//!
//! While the broker refuses writes (a lease extension or a settle failed transiently;
//! see `Lifecycle::set_writes_accepted`), no new fetch starts: a job taken
//! now could not keep its lease, and would run again elsewhere with its attempt raised.
//! Fetching resumes once a lease extension or a heartbeat succeeds.
//!
//! While the worker is quiet (the pool needs fewer replicas, see `quiet.rs`), no new
//! fetch starts either: once those on the wire are back, the broker is told to stop
//! fetching (a backend holding deliveries ahead hands them back), and when the worker
//! is needed again it is told to resume, and fetching goes on at once.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::{job, Shared};
use crate::broker::{Delivery, FetchPlan};
use crate::error::{chain, BrokerError};
use crate::handler::Handler;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Most fetches on the wire at once. More would overlap more, but each fetch costs
/// the broker a fixed amount whatever its size: measured on Redis, 4 or 8 made
/// batches smaller and a no-op pool slower than 2.
pub(crate) const MAX_FETCHES: usize = 2;

/// Why no new fetch may start until those on the wire are back.
enum Pause {
    /// A fetch found nothing: wait for work on these queues.
    Idle(Vec<String>),
    /// A fetch failed: back off this long.
    Failed(Duration),
}

/// A fetch's plan, permits, the time it was sent, and what it got.
type Fetched = (
    FetchPlan,
    Vec<OwnedSemaphorePermit>,
    Instant,
    Result<Vec<Delivery>, BrokerError>,
);

async fn fetch_one<H: Handler>(
    shared: Arc<Shared<H>>,
    plan: FetchPlan,
    held: Vec<OwnedSemaphorePermit>,
) -> Fetched {
    let sent = Instant::now();
    let result = shared.broker.fetch(&plan).await;
    (plan, held, sent, result)
}

/// Wait while the broker refuses writes; `false` when the drain began meanwhile.
async fn wait_for_writes<H>(shared: &Shared<H>) -> bool {
    let life = &shared.life;
    if life.writes_accepted() {
        return true;
    }
    tracing::warn!("the broker refuses writes: no new jobs until it accepts them again");
    tokio::select! {
        _ = life.drain.cancelled() => return false,
        _ = life.writes_resumed() => {}
    }
    tracing::info!("the broker accepts writes again: fetching resumes");
    true
}

/// Quiet: hand back what the broker holds ahead, and wait until the worker is needed
/// again (`true`, fetching resumed) or the drain begins (`false`).
async fn stay_quiet<H>(shared: &Shared<H>, quiet: &mut watch::Receiver<bool>) -> bool {
    let queues = shared.config.queue_names();
    shared.broker.stop_fetching(&queues).await;
    let resumed = tokio::select! {
        _ = shared.life.drain.cancelled() => false,
        needed = quiet.wait_for(|q| !*q) => needed.is_ok(),
    };
    if resumed {
        shared.broker.resume_fetching(&queues).await;
    }
    resumed
}

/// Runs until the drain begins. Never holds more jobs than `held` permits allow, so a
/// busy replica does not hoard work a new replica could start.
pub(crate) async fn fetch_loop<H: Handler>(shared: Arc<Shared<H>>, tracker: TaskTracker) {
    let drain = shared.life.drain.clone();
    let mut backoff = BACKOFF_START;
    // Not raced against the drain: a fetch whose reply is dropped would strand its
    // jobs until their leases expire. Jobs that arrive after the drain began are
    // released by their tasks at once.
    let mut fetches = FuturesUnordered::new();
    let mut pause: Option<Pause> = None;
    // Every queue is at its own limit: wait for a job to settle or a fetch to return.
    let mut blocked = false;
    let mut quiet = shared.quiet.subscribe();
    loop {
        if fetches.is_empty() {
            if *quiet.borrow_and_update() {
                if !stay_quiet(&shared, &mut quiet).await {
                    break;
                }
                (pause, blocked) = (None, false);
                continue;
            }
            match pause.take() {
                Some(Pause::Idle(open)) => {
                    // Wait only on the queues the plan could take from: a queue at its
                    // own limit may have work we cannot start, and waking for it would
                    // spin. One of our jobs settling frees room, so it wakes us too.
                    tokio::select! {
                        _ = drain.cancelled() => break,
                        _ = shared.job_done.notified() => {}
                        _ = shared.broker.wait_for_work(&open, shared.config.idle_wait) => {}
                        Ok(()) = quiet.changed() => continue,
                    }
                }
                Some(Pause::Failed(wait)) => {
                    tokio::select! {
                        _ = drain.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                        Ok(()) = quiet.changed() => {
                            // Keep the backoff when the worker is needed again.
                            pause = Some(Pause::Failed(wait));
                            continue;
                        }
                    }
                }
                None => {}
            }
            if !wait_for_writes(&shared).await {
                break;
            }
        }
        let may_fetch = pause.is_none()
            && !blocked
            && !*quiet.borrow()
            && fetches.len() < MAX_FETCHES
            && shared.life.writes_accepted();
        tokio::select! {
            biased;
            _ = drain.cancelled() => break,
            Some(done) = fetches.next(), if !fetches.is_empty() => {
                blocked = false;
                if let Some(p) = settle_fetch(&shared, &tracker, done, &mut backoff) {
                    // An empty reply or a failure wins over an earlier empty reply.
                    if !matches!((&pause, &p), (Some(Pause::Failed(_)), Pause::Idle(_))) {
                        pause = Some(p);
                    }
                }
            }
            _ = shared.job_done.notified(), if blocked => blocked = false,
            // Quiet from now on, or needed again: look again.
            Ok(()) = quiet.changed() => {}
            permit = shared.limits.held.clone().acquire_owned(), if may_fetch => {
                let Ok(first) = permit else { break };
                let mut held = vec![first];
                while let Ok(p) = shared.limits.held.clone().try_acquire_owned() {
                    held.push(p);
                }
                match shared.sched().plan(held.len() as u32, shared.config.lease) {
                    Some(plan) => fetches.push(fetch_one(shared.clone(), plan, held)),
                    None => blocked = true,
                }
            }
        }
    }
    // Draining: collect what is still on the wire; those jobs' tasks release them.
    while let Some(done) = fetches.next().await {
        settle_fetch(&shared, &tracker, done, &mut backoff);
    }
}

/// Start the jobs a fetch returned. Returns why fetching should pause, if it should.
fn settle_fetch<H: Handler>(
    shared: &Arc<Shared<H>>,
    tracker: &TaskTracker,
    (plan, mut held, sent, result): Fetched,
    backoff: &mut Duration,
) -> Option<Pause> {
    match result {
        Ok(deliveries) => {
            shared.life.set_connected(true);
            *backoff = BACKOFF_START;
            let got: Vec<&str> = deliveries.iter().map(|d| d.lease.queue.as_str()).collect();
            shared.sched().fetched(&plan, &got);
            let empty = deliveries.is_empty();
            for (delivery, permit) in deliveries.into_iter().zip(held.drain(..)) {
                tracker.spawn(job::run(shared.clone(), delivery, permit, sent));
            }
            empty.then(|| Pause::Idle(plan.shares.into_iter().map(|s| s.queue).collect()))
        }
        Err(e) => {
            shared.sched().abandoned(&plan);
            drop(held);
            shared.life.set_connected(false);
            shared.broker_error("fetch");
            let wait = jitter(*backoff);
            tracing::warn!(error = %chain(&e), retry_in = ?wait, "fetch failed; backing off");
            *backoff = (*backoff * 2).min(BACKOFF_MAX);
            Some(Pause::Failed(wait))
        }
    }
}

/// Half fixed, half random, so many workers losing a broker together do not return
/// in lockstep.
pub(crate) fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + Duration::from_millis(fastrand::u64(0..=half.as_millis() as u64))
}
