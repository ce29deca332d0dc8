//! The fetch loop: take permits first, then ask the broker for exactly that many jobs.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::{job, Shared};
use crate::handler::Handler;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Runs until the drain begins. Never holds more jobs than `held` permits allow, so a
/// busy replica does not hoard work a new replica could start.
pub(crate) async fn fetch_loop<H: Handler>(shared: Arc<Shared<H>>, tracker: TaskTracker) {
    let drain = shared.life.drain.clone();
    let mut backoff = BACKOFF_START;
    loop {
        let first = tokio::select! {
            biased;
            _ = drain.cancelled() => return,
            permit = shared.limits.held.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let mut held = vec![first];
        while let Ok(p) = shared.limits.held.clone().try_acquire_owned() {
            held.push(p);
        }
        let plan = shared.sched().plan(held.len() as u32, shared.config.lease);
        let Some(plan) = plan else {
            // Every queue is at its own limit: wait for one of our jobs to settle.
            drop(held);
            tokio::select! {
                _ = drain.cancelled() => return,
                _ = shared.job_done.notified() => continue,
            }
        };
        // Not raced against the drain: a fetch whose reply is dropped would strand its
        // jobs until their leases expire. Jobs that arrive after the drain began are
        // released by their tasks at once.
        match shared.broker.fetch(&plan).await {
            Ok(deliveries) => {
                shared.life.set_connected(true);
                backoff = BACKOFF_START;
                let got: Vec<&str> = deliveries.iter().map(|d| d.lease.queue.as_str()).collect();
                shared.sched().fetched(&plan, &got);
                let empty = deliveries.is_empty();
                for (delivery, permit) in deliveries.into_iter().zip(held.drain(..)) {
                    tracker.spawn(job::run(shared.clone(), delivery, permit));
                }
                drop(held);
                if empty {
                    // Wait only on the queues this plan could take from: a queue at its
                    // own limit may have work we cannot start, and waking for it would
                    // spin. One of our jobs settling frees room, so it wakes us too.
                    let open: Vec<String> = plan.shares.into_iter().map(|s| s.queue).collect();
                    tokio::select! {
                        _ = drain.cancelled() => return,
                        _ = shared.job_done.notified() => {}
                        _ = shared.broker.wait_for_work(&open, shared.config.idle_wait) => {}
                    }
                }
            }
            Err(e) => {
                drop(held);
                shared.life.set_connected(false);
                shared.broker_error("fetch");
                let wait = jitter(backoff);
                tracing::warn!(error = %e, retry_in = ?wait, "fetch failed; backing off");
                tokio::select! {
                    _ = drain.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Half fixed, half random, so many workers losing a broker together do not return
/// in lockstep.
pub(crate) fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + Duration::from_millis(fastrand::u64(0..=half.as_millis() as u64))
}
