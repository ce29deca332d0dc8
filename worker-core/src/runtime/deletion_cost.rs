//! The task that keeps the pod's pod-deletion-cost annotation current ([`cost`]), so a
//! ReplicaSet scaling down removes idle pods first (quiet idle ones before all).
//!
//! It follows the cost through a watch channel (updated with the `worker_in_flight`
//! and `worker_quiet` gauges), so an idle worker makes no requests and no wake-ups.
//! Coalescing: a change is sent at once if no request went out in the last interval,
//! else when the interval ends — with the count as it is then, so a burst of changes
//! costs one request. Nothing is sent while the count equals the one the API last
//! accepted. A failed request waits a jittered, doubling backoff (never below the
//! interval, capped) before the next try; jobs never wait on any of this.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fetcher::jitter;
use crate::kubernetes::{PatchError, PodApi};

/// Longest backoff between failed requests.
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// After the worker stops, how long the last count may take to be sent. Below the
/// runtime's wait for its background tasks, so the drain's exit is not delayed.
const FINAL_GRACE: Duration = Duration::from_millis(300);

/// The annotation's value for `in_flight` jobs: the count itself; with
/// `quiet_surplus`, `2 × in_flight + (0 if quiet else 1)`, so that among pods running
/// as many jobs a quiet one goes first, and an idle quiet pod (0) before every other.
pub(crate) fn cost(quiet_surplus: bool, in_flight: u32, quiet: bool) -> u32 {
    if quiet_surplus {
        in_flight
            .saturating_mul(2)
            .saturating_add(u32::from(!quiet))
    } else {
        in_flight
    }
}

/// Where the count goes: the Kubernetes API, or a test's recorder.
pub(crate) trait CostSink: Send + Sync + 'static {
    /// Set the annotation to `cost`.
    fn set(&self, cost: u32) -> impl Future<Output = Result<(), PatchError>> + Send;
}

impl CostSink for PodApi {
    fn set(&self, cost: u32) -> impl Future<Output = Result<(), PatchError>> + Send {
        self.set_deletion_cost(cost)
    }
}

/// Run until `stop`: send the first cost (the channel's value at start) at once, then
/// every change, coalesced to at most one request per `interval`. After `stop`, send
/// the last cost if the API does not hold it, for at most [`FINAL_GRACE`].
pub(crate) async fn keep_current<S: CostSink>(
    sink: S,
    mut costs: watch::Receiver<u32>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut accepted: Option<u32> = None;
    let mut not_before = Instant::now();
    let mut failures = 0u32;
    'run: loop {
        // Wait for a count the API does not hold.
        while accepted == Some(*costs.borrow_and_update()) {
            tokio::select! {
                _ = stop.cancelled() => break 'run,
                changed = costs.changed() => {
                    // The worker is gone.
                    if changed.is_err() {
                        break 'run;
                    }
                }
            }
        }
        // Let the interval (or the backoff) since the last request pass.
        tokio::select! {
            _ = stop.cancelled() => break 'run,
            _ = tokio::time::sleep_until(not_before) => {}
        }
        let cost = *costs.borrow_and_update();
        if accepted == Some(cost) {
            continue;
        }
        let sent = Instant::now();
        let result = tokio::select! {
            _ = stop.cancelled() => break 'run,
            result = sink.set(cost) => result,
        };
        match result {
            Ok(()) => {
                if failures > 0 || accepted.is_none() {
                    tracing::info!(cost, "pod-deletion-cost annotation set");
                } else {
                    tracing::debug!(cost, "pod-deletion-cost annotation set");
                }
                accepted = Some(cost);
                failures = 0;
                not_before = sent + interval;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = backoff(interval, failures);
                warn(&e, cost, wait);
                not_before = Instant::now() + wait;
            }
        }
    }
    let cost = *costs.borrow();
    if accepted != Some(cost) {
        match tokio::time::timeout(FINAL_GRACE, sink.set(cost)).await {
            Ok(Ok(())) => tracing::debug!(cost, "pod-deletion-cost annotation set at stop"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, cost, "pod-deletion-cost annotation not set at stop")
            }
            Err(_) => tracing::warn!(
                cost,
                "pod-deletion-cost annotation not set at stop: no answer in {FINAL_GRACE:?}"
            ),
        }
    }
}

/// After `failures` failed requests in a row: a doubling ceiling from 2 × `interval`
/// up to [`BACKOFF_CAP`], jittered so pods refused together do not retry in lockstep,
/// and never below `interval`.
fn backoff(interval: Duration, failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX);
    let ceiling = interval.saturating_mul(factor).min(BACKOFF_CAP);
    jitter(ceiling).max(interval)
}

fn warn(e: &PatchError, cost: u32, retry_in: Duration) {
    match e.hint() {
        Some(hint) => tracing::warn!(
            error = %e,
            cost,
            ?retry_in,
            "could not set the pod-deletion-cost annotation; {hint}"
        ),
        None => tracing::warn!(
            error = %e,
            cost,
            ?retry_in,
            "could not set the pod-deletion-cost annotation"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// Records each request with the (paused) time it was made; answers from a script,
    /// then `Ok`.
    #[derive(Clone, Default)]
    struct Recorder {
        sent: Arc<Mutex<Vec<(Duration, u32)>>>,
        answers: Arc<Mutex<VecDeque<Result<(), u16>>>>,
        latency: Duration,
        start: Option<Instant>,
    }

    impl Recorder {
        fn new() -> Self {
            Self {
                start: Some(Instant::now()),
                ..Self::default()
            }
        }
        fn answering(self, answers: impl IntoIterator<Item = Result<(), u16>>) -> Self {
            self.answers.lock().unwrap().extend(answers);
            self
        }
        fn slow(mut self, latency: Duration) -> Self {
            self.latency = latency;
            self
        }
        fn sent(&self) -> Vec<(Duration, u32)> {
            self.sent.lock().unwrap().clone()
        }
        fn values(&self) -> Vec<u32> {
            self.sent().into_iter().map(|(_, v)| v).collect()
        }
    }

    impl CostSink for Recorder {
        fn set(&self, cost: u32) -> impl Future<Output = Result<(), PatchError>> + Send {
            let me = self.clone();
            async move {
                let at = me.start.map_or(Duration::ZERO, |s| s.elapsed());
                me.sent.lock().unwrap().push((at, cost));
                tokio::time::sleep(me.latency).await;
                match me.answers.lock().unwrap().pop_front() {
                    Some(Err(status)) => Err(PatchError::Status {
                        status,
                        body: "{}".into(),
                    }),
                    Some(Ok(())) | None => Ok(()),
                }
            }
        }
    }

    struct Running {
        count: watch::Sender<u32>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(sink: &Recorder) -> Running {
        let (count, rx) = watch::channel(0);
        let stop = CancellationToken::new();
        let task = tokio::spawn(keep_current(sink.clone(), rx, SECOND, stop.clone()));
        Running { count, stop, task }
    }

    /// Let spawned tasks run without moving the clock.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sends_zero_at_start_then_nothing_while_it_holds() {
        let sink = Recorder::new();
        let _w = start(&sink);
        settle().await;
        assert_eq!(sink.sent(), vec![(Duration::ZERO, 0)]);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(sink.values(), vec![0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_within_the_interval_costs_one_request_with_the_latest_count() {
        let sink = Recorder::new();
        let w = start(&sink);
        settle().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        for n in [1, 2, 3, 4, 3] {
            w.count.send_replace(n);
            settle().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(sink.sent(), vec![(Duration::ZERO, 0), (SECOND, 3)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_after_a_quiet_interval_goes_at_once() {
        let sink = Recorder::new();
        let w = start(&sink);
        tokio::time::sleep(Duration::from_secs(10)).await;
        w.count.send_replace(2);
        settle().await;
        assert_eq!(sink.sent(), vec![(Duration::ZERO, 0), (10 * SECOND, 2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_sent_when_the_count_comes_back_before_the_interval_ends() {
        let sink = Recorder::new();
        let w = start(&sink);
        settle().await;
        w.count.send_replace(5);
        settle().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        w.count.send_replace(0);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(sink.values(), vec![0]);
        // The same count again, later: still nothing to say.
        w.count.send_replace(0);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(sink.values(), vec![0]);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_doubling_to_a_cap_and_then_send_the_latest_count() {
        let sink = Recorder::new().answering(std::iter::repeat_n(Err(403), 8));
        let w = start(&sink);
        tokio::time::sleep(Duration::from_secs(20)).await;
        w.count.send_replace(7);
        tokio::time::sleep(Duration::from_secs(300)).await;
        let sent = sink.sent();
        assert_eq!(sent.len(), 9, "{sent:?}");
        let gaps: Vec<Duration> = sent.windows(2).map(|w| w[1].0 - w[0].0).collect();
        for (i, gap) in gaps.iter().enumerate() {
            // After failure n the ceiling is min(2^n s, 30 s); jitter keeps the upper half.
            let ceiling = SECOND.saturating_mul(1 << (i + 1)).min(BACKOFF_CAP);
            assert!(
                *gap >= ceiling / 2 && *gap <= ceiling,
                "gap {i}: {gap:?} {gaps:?}"
            );
        }
        assert!(gaps.iter().skip(5).all(|g| *g >= BACKOFF_CAP / 2));
        assert_eq!(sent.last().map(|s| s.1), Some(7), "{sent:?}");
        assert!(sent.iter().take(3).all(|s| s.1 == 0), "{sent:?}");
        // Accepted now: the next change is paced by the interval again.
        w.count.send_replace(1);
        settle().await;
        assert_eq!(sink.values().last(), Some(&1));
    }

    #[tokio::test(start_paused = true)]
    async fn at_stop_the_last_count_is_sent_once_and_a_hung_api_does_not_hold_the_exit() {
        let sink = Recorder::new();
        let w = start(&sink);
        settle().await;
        w.count.send_replace(2);
        tokio::time::sleep(SECOND + Duration::from_millis(100)).await;
        w.count.send_replace(0);
        settle().await;
        assert_eq!(sink.values(), vec![0, 2]);
        // The 0 is waiting for the interval when the worker stops; it goes at once.
        w.stop.cancel();
        let began = Instant::now();
        w.task.await.unwrap();
        assert_eq!(began.elapsed(), Duration::ZERO);
        assert_eq!(sink.values(), vec![0, 2, 0]);

        let hung = Recorder::new().slow(Duration::from_secs(3600));
        let w = start(&hung);
        settle().await;
        w.count.send_replace(1);
        w.stop.cancel();
        let began = Instant::now();
        w.task.await.unwrap();
        assert!(began.elapsed() <= FINAL_GRACE, "{:?}", began.elapsed());
    }

    #[test]
    fn the_cost_ranks_quiet_idle_pods_first_and_never_a_busy_one_below_an_idle_one() {
        assert_eq!(
            [(0, true), (0, false), (1, true), (1, false)].map(|(n, q)| cost(true, n, q)),
            [0, 1, 2, 3]
        );
        for q in [true, false] {
            assert_eq!(cost(false, 3, q), 3);
        }
        assert_eq!(cost(true, u32::MAX, false), u32::MAX);
    }

    #[test]
    fn backoff_never_goes_below_the_interval() {
        let long = Duration::from_secs(60);
        for failures in [1, 2, 10, u32::MAX] {
            let d = backoff(long, failures);
            assert!(d >= long, "{failures}: {d:?}");
            let d = backoff(SECOND, failures);
            assert!(d >= SECOND && d <= BACKOFF_CAP, "{failures}: {d:?}");
        }
    }
}
