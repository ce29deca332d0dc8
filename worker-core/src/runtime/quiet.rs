//! Surplus replicas go quiet: when the pool needs fewer replicas than are live, the
//! workers a ReplicaSet would delete first stop taking new jobs, so that they are idle
//! (and, with the pod-deletion cost, ranked first) by the time the autoscaler removes
//! them; they take jobs again as soon as the pool needs them.
//!
//! Each worker decides alone, from what every worker reads alike: the worker registry
//! and the pool's depth. The ranking uses only what the registry shows, so workers
//! reading the same entries agree on who is surplus; an entry is written again at once
//! when a worker's quiet or draining state changes, so peers see it within a check.
//!
//! The jobs in flight an entry shows may be a beat old, so a worker goes quiet only
//! once the verdict has held for a heartbeat (entries written after the first verdict
//! have been read by then); it resumes at the first verdict that it is needed.

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::broker::WorkerInfo;
use crate::error::chain;
use crate::handler::Handler;
use crate::telemetry::http::HttpState;

/// Longest time between two checks.
const MOST_EVERY: Duration = Duration::from_secs(1);

/// What one check concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// Whether this worker should be quiet.
    pub(crate) quiet: bool,
    /// Replicas the pool needs: `max(desired_replicas, 1)`.
    pub(crate) need: u64,
    /// Live replicas: registry entries of the pool that are not draining, this worker
    /// included.
    pub(crate) live: usize,
}

/// Decide whether `me` is surplus, given the registry entries of its pool (`listed`)
/// and the pool's `desired_replicas`.
///
/// The live workers are ranked in the order a ReplicaSet deletes pods whose
/// pod-deletion cost is `2 × in_flight + (0 if quiet else 1)`, least valuable first,
/// from what the registry shows: fewer jobs in flight first; among equals, quiet before
/// active (a worker that went quiet stays so rather than trading places with an active
/// one that is just as idle); then the newest start first (the ReplicaSet deletes newer
/// pods first); then by id. The first `live - need` are quiet. Every worker ranks from
/// the same entries, its own included, so they agree; `me` counts even when the
/// listing lacks it.
pub(crate) fn decide(me: &WorkerInfo, listed: &[WorkerInfo], desired_replicas: u64) -> Verdict {
    let mut live: Vec<&WorkerInfo> = listed.iter().filter(|w| !w.draining).collect();
    if !listed.iter().any(|w| w.id == me.id) {
        live.push(me);
    }
    live.sort_by_key(|w| {
        (
            w.in_flight,
            !w.quiet,
            Reverse(w.started_at_ms),
            w.id.as_str(),
        )
    });
    let need = desired_replicas.max(1);
    let surplus = (live.len() as u64).saturating_sub(need);
    // Absent only when the listing shows me draining: then I take no jobs anyway.
    let quiet = live
        .iter()
        .position(|w| w.id == me.id)
        .is_some_and(|rank| (rank as u64) < surplus);
    Verdict {
        quiet,
        need,
        live: live.len(),
    }
}

/// Going quiet waits until the verdict has held for `hold`; resuming does not wait.
#[derive(Debug)]
pub(crate) struct Settle {
    hold: Duration,
    /// Since when every verdict said quiet, while active.
    quiet_since: Option<Instant>,
}

impl Settle {
    pub(crate) fn new(hold: Duration) -> Self {
        Self {
            hold,
            quiet_since: None,
        }
    }

    /// Whether to be quiet after a verdict, given whether the worker is quiet now.
    pub(crate) fn next(&mut self, quiet_now: bool, verdict: bool) -> bool {
        if !verdict {
            self.quiet_since = None;
            return false;
        }
        if quiet_now {
            return true;
        }
        let since = *self.quiet_since.get_or_insert_with(Instant::now);
        since.elapsed() >= self.hold
    }
}

/// Check every `min(heartbeat, 1 s)` until the drain begins or `stop` fires, and set
/// the worker quiet or active by [`decide`], settled by [`Settle`] over a heartbeat.
/// A failed read changes nothing.
pub(crate) async fn keep_deciding<H: Handler>(
    shared: Arc<Shared<H>>,
    pool: HttpState,
    stop: CancellationToken,
) {
    let every = shared.config.heartbeat.min(MOST_EVERY);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether the last check failed: the first failure is a warning, the rest debug.
    let mut failing = false;
    let mut settle = Settle::new(shared.config.heartbeat);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.life.drain.cancelled() => return,
            _ = tick.tick() => {}
        }
        let listed = match shared.broker.list_workers(Some(&shared.config.pool)).await {
            Ok(listed) => listed,
            Err(e) => {
                shared.broker_error("list_workers");
                let error = chain(&e);
                if std::mem::replace(&mut failing, true) {
                    tracing::debug!(%error, "quiet check: cannot read the worker registry");
                } else {
                    tracing::warn!(%error, "quiet check: cannot read the worker registry; staying as is until it can");
                }
                continue;
            }
        };
        // Counted and logged with its causes where the reading is taken.
        let desired = match pool.read().await {
            Ok(doc) => doc.desired_replicas,
            Err(e) => {
                tracing::debug!(error = %chain(e.as_ref()), "quiet check: cannot read the pool's depth; staying as is");
                failing = true;
                continue;
            }
        };
        failing = false;
        let me = shared.worker_info();
        let verdict = decide(&me, &listed, desired);
        if shared.set_quiet(settle.next(me.quiet, verdict.quiet)) {
            let (state, then) = if verdict.quiet {
                ("quiet", "taking no new jobs")
            } else {
                ("resumed", "taking jobs again")
            };
            tracing::info!(
                need = verdict.need,
                live = verdict.live,
                "{state}: the pool needs {} of {} replicas; {then}",
                verdict.need,
                verdict.live
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str, in_flight: u32, started_at_ms: u64) -> WorkerInfo {
        let mut w = WorkerInfo::new(id, "pool", vec!["q".into()]);
        w.in_flight = in_flight;
        w.started_at_ms = started_at_ms;
        w
    }

    fn quiet(mut w: WorkerInfo) -> WorkerInfo {
        w.quiet = true;
        w
    }

    /// The ids of `all` that decide to be quiet, each deciding from `all` as listed.
    fn quiet_ones(all: &[WorkerInfo], desired: u64) -> Vec<String> {
        all.iter()
            .filter(|me| !me.draining && decide(me, all, desired).quiet)
            .map(|w| w.id.clone())
            .collect()
    }

    #[test]
    fn the_pool_always_keeps_one_replica_and_no_surplus_means_nobody_is_quiet() {
        let all = [worker("a", 0, 1), worker("b", 0, 2), worker("c", 0, 3)];
        assert_eq!(quiet_ones(&all, 0).len(), 2);
        assert_eq!(quiet_ones(&all, 1).len(), 2);
        assert_eq!(quiet_ones(&all, 2).len(), 1);
        assert!(quiet_ones(&all, 3).is_empty());
        assert!(quiet_ones(&all, 50).is_empty());
        let v = decide(&all[0], &all, 0);
        assert_eq!((v.need, v.live), (1, 3));
        // Alone: never quiet.
        assert!(!decide(&all[0], &[], 0).quiet);
    }

    #[test]
    fn fewer_jobs_in_flight_go_quiet_first_and_a_busy_worker_never_does_while_idle_ones_are_live() {
        let all = [worker("busy", 1, 1), worker("b", 0, 2), worker("c", 0, 3)];
        assert_eq!(quiet_ones(&all, 1), vec!["b", "c"]);
        let all = [worker("a", 2, 9), worker("b", 1, 1), worker("c", 3, 5)];
        assert_eq!(quiet_ones(&all, 2), vec!["b"]);
    }

    #[test]
    fn among_equals_the_newest_goes_quiet_first_then_by_id() {
        let all = [
            worker("old", 0, 100),
            worker("new", 0, 300),
            worker("mid", 0, 200),
        ];
        assert_eq!(quiet_ones(&all, 2), vec!["new"]);
        assert_eq!(quiet_ones(&all, 1), vec!["new", "mid"]);
        let all = [worker("y", 0, 7), worker("x", 0, 7)];
        assert_eq!(quiet_ones(&all, 1), vec!["x"]);
    }

    #[test]
    fn among_equally_busy_workers_the_quiet_one_stays_quiet() {
        // Both idle: the one already quiet stays so, whatever their ages.
        let all = [quiet(worker("q", 0, 1)), worker("idle", 0, 2)];
        assert_eq!(quiet_ones(&all, 1), vec!["q"]);
        let all = [quiet(worker("q", 2, 1)), worker("busy", 2, 2)];
        assert_eq!(quiet_ones(&all, 1), vec!["q"]);
        // When the need comes back, it resumes.
        assert!(quiet_ones(&all, 2).is_empty());
    }

    #[test]
    fn a_quiet_worker_still_running_a_job_trades_places_with_an_idle_one() {
        // As the ReplicaSet ranks them by cost (2 vs 1), the idle one goes first.
        let all = [quiet(worker("q", 1, 1)), worker("idle", 0, 2)];
        assert_eq!(quiet_ones(&all, 1), vec!["idle"]);
    }

    #[test]
    fn draining_workers_do_not_count_and_the_listing_may_lack_me() {
        let mut leaving = worker("leaving", 0, 1);
        leaving.draining = true;
        let me = worker("me", 0, 2);
        let listed = [leaving, worker("other", 0, 3)];
        // Live: me and other; need 1: the newer ("other") is the surplus, not me.
        let v = decide(&me, &listed, 1);
        assert_eq!((v.quiet, v.live), (false, 2));
        let all = [listed[0].clone(), listed[1].clone(), me.clone()];
        assert!(decide(&listed[1], &all, 1).quiet);
        // Listed as draining myself: not quiet (the drain stops fetching anyway).
        let mut drained = me.clone();
        drained.draining = true;
        assert!(!decide(&me, &[drained, worker("other", 0, 3)], 1).quiet);
    }

    #[tokio::test(start_paused = true)]
    async fn going_quiet_waits_for_the_verdict_to_hold_a_heartbeat_and_resuming_does_not() {
        let beat = Duration::from_millis(300);
        let mut settle = Settle::new(beat);
        assert!(!settle.next(false, true));
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(!settle.next(false, true));
        // Needed again in between: the wait starts over.
        assert!(!settle.next(false, false));
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(!settle.next(false, true));
        tokio::time::advance(Duration::from_millis(299)).await;
        assert!(!settle.next(false, true));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(settle.next(false, true));
        // Quiet: stays so while the verdict holds, resumes at once when it does not.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(settle.next(true, true));
        assert!(!settle.next(true, false));
        // And going quiet again waits again.
        assert!(!settle.next(false, true));
    }

    #[test]
    fn workers_rank_from_the_listing_so_they_agree() {
        // The listing still shows "me" busy though it has finished: every worker ranks
        // from the listing, so exactly one of the two goes quiet.
        let listed = [worker("me", 2, 1), worker("other", 1, 2)];
        let me_now = worker("me", 0, 1);
        assert!(!decide(&me_now, &listed, 1).quiet);
        assert!(decide(&listed[1], &listed, 1).quiet);
    }
}
