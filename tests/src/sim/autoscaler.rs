//! KEDA's scale loop and the HPA it feeds, as two loops with their own readings.
//!
//! - KEDA's polling loop ([`Autoscaler::poll`], every `pollingInterval`) decides only
//!   between zero and one: it activates a pool at zero when the metric exceeds the
//!   activation value, and scales an active pool to zero once it has been inactive for
//!   the cooldown period (KEDA `scaleHandler.checkScalers` → `getScaledObjectState` →
//!   `scaleExecutor.RequestScale`, pkg/scaling/).
//! - The HPA controller ([`Autoscaler::sync`], every `--horizontal-pod-autoscaler-sync-period`,
//!   15 s by default) reads the metric through KEDA's metrics adapter and sets the
//!   replicas of a pool above zero (Kubernetes `HorizontalController.reconcileAutoscaler`,
//!   pkg/controller/podautoscaler/horizontal.go). A target at zero replicas is not
//!   scaled by the HPA.
//!
//! Failed reads and KEDA's `fallback` follow the release chosen by [`KedaVersion`].

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Which KEDA release's fallback rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KedaVersion {
    /// KEDA 2.17 and 2.18: only the HPA's metric queries count failures and get the
    /// fallback (`GetMetricsWithFallback` on the metrics-adapter path); a polling-loop
    /// error holds the pool as it is, so a pool at zero stays at zero.
    V2_17,
    /// KEDA 2.19 and later: every metrics fetch counts (the polling loop and each HPA
    /// query; any success resets the count), and the fallback applies in the polling
    /// loop too: an active fallback counts as active, so it wakes a pool from zero and
    /// keeps it up for one more cooldown after the outage (kedacore/keda#7239, #7244).
    V2_19,
}

impl KedaVersion {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            KedaVersion::V2_17 => "KEDA 2.17/2.18",
            KedaVersion::V2_19 => "KEDA 2.19+",
        }
    }
}

/// How the autoscaler decides: the fields of a KEDA `ScaledObject`, its HPA, and the
/// controllers' periods.
#[derive(Debug, Clone)]
pub struct ScalerSpec {
    /// KEDA's rules.
    pub keda: KedaVersion,
    /// KEDA's `pollingInterval`.
    pub polling: Duration,
    /// The HPA controller's sync period (15 s by default).
    pub hpa_sync: Duration,
    /// The `AverageValue` target per replica (the workers' concurrency).
    pub target: f64,
    /// KEDA's `activationTargetValue`: active while the metric is above it.
    pub activation: f64,
    /// `minReplicaCount` (0 lets the pool scale to zero).
    pub min: u32,
    /// `maxReplicaCount`.
    pub max: u32,
    /// KEDA's `cooldownPeriod`: inactive this long before going to zero.
    pub cooldown: Duration,
    /// The HPA's scale-down `stabilizationWindowSeconds`.
    pub scale_down_window: Duration,
    /// The HPA's tolerance (0.1 by default).
    pub tolerance: f64,
    /// KEDA's `fallback` with `behavior: currentReplicasIfHigher`.
    pub fallback: Option<Fallback>,
    /// The `periodSeconds` of the HPA's default scale-up policies (15 s): within one
    /// period the replicas grow to at most `max(2 × start, start + 4)`.
    pub scale_up_period: Duration,
}

impl ScalerSpec {
    /// KEDA 2.19's and the HPA's rules on a clock compressed five times for the
    /// controllers (the chart's polling of 5 s becomes 1 s; the HPA's sync period and
    /// scale-up period of 15 s become 3 s), with a 4 s cooldown, a 6 s scale-down
    /// window, the 10 % tolerance, 0 to 8 replicas, activation on any backlog, and a
    /// fallback holding at least one replica once more than three fetches in a row
    /// have failed. `target` is the jobs one replica runs at once.
    pub fn compressed(target: u32) -> Self {
        Self {
            keda: KedaVersion::V2_19,
            polling: Duration::from_secs(1),
            hpa_sync: Duration::from_secs(3),
            target: f64::from(target),
            activation: 0.0,
            min: 0,
            max: 8,
            cooldown: Duration::from_secs(4),
            scale_down_window: Duration::from_secs(6),
            tolerance: 0.1,
            fallback: Some(Fallback {
                failure_threshold: 3,
                replicas: 1,
            }),
            scale_up_period: Duration::from_secs(3),
        }
    }
}

/// KEDA's `fallback` section.
#[derive(Debug, Clone, Copy)]
pub struct Fallback {
    /// Failed fetches in a row before the fallback applies.
    pub failure_threshold: u32,
    /// The replicas it holds at least.
    pub replicas: u32,
}

/// Why the autoscaler chose a replica count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// At zero and still inactive.
    Idle,
    /// From zero: the metric went above the activation value.
    Activate,
    /// To zero: inactive for the cooldown period.
    Deactivate,
    /// KEDA's polling loop found the pool active (or within its cooldown) above zero:
    /// the count is the HPA's to set.
    Keep,
    /// The HPA's arithmetic and stabilization.
    Hpa,
    /// The read failed and no fallback applies: nothing changes.
    Hold,
    /// The read failed more than `failure_threshold` times in a row: the fallback
    /// applies (in the HPA, as its metric; in 2.19's polling loop, as activity).
    Fallback,
}

/// Which loop a decision came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    /// KEDA's polling loop.
    Keda,
    /// An `external-push` scaler's push, handled at once.
    Push,
    /// The HPA controller's sync.
    Hpa,
}

/// KEDA's scale loop and the HPA, with the state each keeps between readings.
#[derive(Debug)]
pub struct Autoscaler {
    spec: ScalerSpec,
    /// KEDA's failure count of the trigger (the ScaledObject's `status.health`).
    failures: u32,
    last_active: Option<Instant>,
    recommendations: VecDeque<(Instant, u32)>,
    /// The HPA's scale-up events: when, and how many replicas each added.
    scale_ups: VecDeque<(Instant, u32)>,
}

impl Autoscaler {
    /// An autoscaler with no history.
    pub fn new(spec: ScalerSpec) -> Self {
        Self {
            spec,
            failures: 0,
            last_active: None,
            recommendations: VecDeque::new(),
            scale_ups: VecDeque::new(),
        }
    }

    /// Its spec.
    pub fn spec(&self) -> &ScalerSpec {
        &self.spec
    }

    /// Whether the fallback applies after one more failed fetch: KEDA
    /// `GetMetricsWithFallback` (pkg/fallback/fallback.go) counts the failure, then
    /// falls back once the count exceeds the threshold (the 4th failure for 3).
    fn fail(&mut self) -> Option<Fallback> {
        self.failures += 1;
        self.spec
            .fallback
            .filter(|f| self.failures > f.failure_threshold)
    }

    /// KEDA's polling loop, from a `reading` of the metric (`None`: the fetch failed)
    /// at `now` with `current` replicas: 0 → `max(min, 1)` on activity, → 0 after the
    /// cooldown, else `current` (the HPA's to change). KEDA `scaleExecutor.RequestScale`
    /// (pkg/scaling/executor/scale_scaledobjects.go), with 2.19's fallback in
    /// `getScaledObjectState`.
    pub fn poll(&mut self, now: Instant, reading: Option<f64>, current: u32) -> (u32, Why) {
        let (active, fallback) = match reading {
            Some(metric) => {
                if self.spec.keda == KedaVersion::V2_19 {
                    self.failures = 0;
                }
                (metric > self.spec.activation, false)
            }
            None => match self.spec.keda {
                // 2.17/2.18: a scaler error in the polling loop changes nothing, and is
                // not counted toward the fallback.
                KedaVersion::V2_17 => return (current, Why::Hold),
                KedaVersion::V2_19 => match self.fail() {
                    // An active fallback makes the scaler active.
                    Some(_) => (true, true),
                    None => return (current, Why::Hold),
                },
            },
        };
        self.request_scale(now, active, fallback, current)
    }

    /// An `external-push` scaler's push: KEDA hands `active` to the scale executor at
    /// once, without reading the metric (KEDA `scaleHandler.startPushScalers`,
    /// pkg/scaling/scale_handler.go), then goes on polling as before.
    pub fn push(&mut self, now: Instant, active: bool, current: u32) -> (u32, Why) {
        self.request_scale(now, active, false, current)
    }

    /// `scaleExecutor.RequestScale` for an activity that is not an error.
    fn request_scale(
        &mut self,
        now: Instant,
        active: bool,
        fallback: bool,
        current: u32,
    ) -> (u32, Why) {
        if active {
            self.last_active = Some(now);
        }
        let spec = &self.spec;
        if current == 0 {
            return match (active, fallback) {
                (true, true) => (spec.min.max(1), Why::Fallback),
                (true, false) => (spec.min.max(1), Why::Activate),
                _ => (0, Why::Idle),
            };
        }
        if !active && spec.min == 0 {
            let cooled = self
                .last_active
                .is_none_or(|t| now.duration_since(t) >= spec.cooldown);
            if cooled {
                // The HPA keeps its recommendations while KEDA holds the pool at zero
                // (Kubernetes `stabilizeRecommendationWithBehaviors` reads them again
                // when the HPA runs next).
                return (0, Why::Deactivate);
            }
        }
        if fallback {
            (current, Why::Fallback)
        } else {
            (current, Why::Keep)
        }
    }

    /// The HPA's sync, from a `reading` of the metric through KEDA's metrics adapter
    /// (`None`: the fetch failed) at `now` with `current` replicas. A target at zero is
    /// left alone (the HPA does not scale it: `ScalingDisabled`).
    pub fn sync(&mut self, now: Instant, reading: Option<f64>, current: u32) -> (u32, Why) {
        if current == 0 {
            return (0, Why::Idle);
        }
        let (metric, why) = match reading {
            Some(metric) => {
                self.failures = 0;
                (metric, Why::Hpa)
            }
            None => match self.fail() {
                // `currentReplicasIfHigher`: the adapter answers the target times
                // max(current, fallback replicas), normalised for an AverageValue
                // target (KEDA `doFallback`), and the HPA computes from it as usual.
                Some(f) => (
                    self.spec.target * f64::from(current.max(f.replicas)),
                    Why::Fallback,
                ),
                // The adapter answers an error: the HPA cannot compute and holds.
                None => return (current, Why::Hold),
            },
        };
        (self.hpa(now, metric, current), why)
    }

    /// The HPA's replica count for `metric` on an External `AverageValue` target:
    /// `ceil(metric / target)` outside the tolerance, clamped to `[max(min, 1), max]`,
    /// stabilized on the way down and rate-limited on the way up (Kubernetes
    /// `computeReplicasForMetrics`, then `normalizeDesiredReplicasWithBehaviors`:
    /// `stabilizeRecommendationWithBehaviors`, `convertDesiredReplicasWithBehaviorRate`).
    fn hpa(&mut self, now: Instant, metric: f64, current: u32) -> u32 {
        let spec = &self.spec;
        let ratio = metric / (spec.target * f64::from(current));
        let raw = if (ratio - 1.0).abs() <= spec.tolerance {
            current
        } else {
            // Bounded by the clamp below; the cast saturates.
            (metric / spec.target).ceil() as u32
        };
        let recommendation = raw.clamp(spec.min.max(1), spec.max);
        let window = spec.scale_down_window;
        self.recommendations.push_back((now, recommendation));
        while let Some(&(at, _)) = self.recommendations.front() {
            if now.duration_since(at) > window {
                self.recommendations.pop_front();
            } else {
                break;
            }
        }
        let highest = self
            .recommendations
            .iter()
            .map(|&(_, r)| r)
            .max()
            .unwrap_or(recommendation);
        // Up at once (window 0) within the scale-up limit; down only to the highest
        // recommendation in the window.
        let desired = if recommendation >= current {
            recommendation.min(self.scale_up_limit(now, current).max(current))
        } else {
            current.min(highest)
        };
        if desired > current {
            self.scale_ups.push_back((now, desired - current));
        }
        desired
    }

    /// The most replicas the HPA may scale up to now, from `current`: its default
    /// scale-up policies (100 % and 4 pods per period, `selectPolicy: Max`), from the
    /// replicas at the start of the period. Kubernetes
    /// `calculateScaleUpLimitWithScalingRules` with `getReplicasChangePerPeriod`
    /// (pkg/controller/podautoscaler/horizontal.go).
    fn scale_up_limit(&mut self, now: Instant, current: u32) -> u32 {
        let period = self.spec.scale_up_period;
        while let Some(&(at, _)) = self.scale_ups.front() {
            if now.duration_since(at) >= period {
                self.scale_ups.pop_front();
            } else {
                break;
            }
        }
        let added: u32 = self.scale_ups.iter().map(|&(_, n)| n).sum();
        let start = current.saturating_sub(added);
        (start * 2).max(start + 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ScalerSpec {
        ScalerSpec::compressed(4)
    }

    fn v2_17() -> ScalerSpec {
        ScalerSpec {
            keda: KedaVersion::V2_17,
            ..spec()
        }
    }

    async fn advance(secs: u64) -> Instant {
        tokio::time::advance(Duration::from_secs(secs)).await;
        Instant::now()
    }

    #[tokio::test(start_paused = true)]
    async fn the_polling_loop_only_activates_and_deactivates() {
        let mut a = Autoscaler::new(spec());
        let now = Instant::now();
        assert_eq!(a.poll(now, Some(0.0), 0), (0, Why::Idle));
        assert_eq!(a.poll(now, Some(13.0), 0), (1, Why::Activate));
        // Above zero the count is the HPA's: a backlog of 13 does not make it 4 here.
        assert_eq!(a.poll(now, Some(13.0), 1), (1, Why::Keep));
        assert_eq!(a.poll(now, Some(13.0), 5), (5, Why::Keep));
        // Inactive, but within the cooldown since the last activity.
        assert_eq!(a.poll(advance(3).await, Some(0.0), 5), (5, Why::Keep));
        assert_eq!(a.poll(advance(1).await, Some(0.0), 5), (0, Why::Deactivate));
    }

    #[tokio::test(start_paused = true)]
    async fn the_hpa_scales_a_pool_above_zero_at_once_within_the_tolerance() {
        let mut a = Autoscaler::new(spec());
        let now = Instant::now();
        // The HPA leaves a pool at zero to KEDA.
        assert_eq!(a.sync(now, Some(13.0), 0), (0, Why::Idle));
        // ceil(13 / 4) = 4, at once.
        assert_eq!(a.sync(now, Some(13.0), 1), (4, Why::Hpa));
        // Within the 10 % tolerance: 4 replicas for a backlog of 17 stay 4.
        assert_eq!(a.sync(now, Some(17.0), 4), (4, Why::Hpa));
    }

    #[tokio::test(start_paused = true)]
    async fn scale_up_grows_at_most_by_the_default_policies_per_period() {
        let mut a = Autoscaler::new(ScalerSpec { max: 20, ..spec() });
        // From 1: max(2 × 1, 1 + 4) = 5, though the backlog asks for 20.
        assert_eq!(a.sync(Instant::now(), Some(80.0), 1), (5, Why::Hpa));
        // Within the same period the start is still 1: no more.
        assert_eq!(a.sync(advance(1).await, Some(80.0), 5), (5, Why::Hpa));
        // A new period from 5: max(10, 9) = 10, then 20.
        assert_eq!(a.sync(advance(2).await, Some(80.0), 5), (10, Why::Hpa));
        assert_eq!(a.sync(advance(3).await, Some(80.0), 10), (20, Why::Hpa));
        // Clamped to the maximum.
        assert_eq!(a.sync(advance(3).await, Some(800.0), 20), (20, Why::Hpa));
    }

    #[tokio::test(start_paused = true)]
    async fn scales_down_only_after_the_stabilization_window() {
        let mut a = Autoscaler::new(spec());
        assert_eq!(a.sync(Instant::now(), Some(16.0), 4), (4, Why::Hpa));
        // The backlog drops to 4: the window still holds the recommendation of 4.
        for _ in 0..6 {
            assert_eq!(a.sync(advance(1).await, Some(4.0), 4), (4, Why::Hpa));
        }
        assert_eq!(a.sync(advance(1).await, Some(4.0), 4), (1, Why::Hpa));
        // Idle: one replica (the HPA's floor); going to zero is KEDA's.
        assert_eq!(a.sync(advance(1).await, Some(0.0), 1), (1, Why::Hpa));
    }

    #[tokio::test(start_paused = true)]
    async fn recommendations_outlive_a_stay_at_zero() {
        let mut a = Autoscaler::new(spec());
        assert_eq!(a.sync(Instant::now(), Some(16.0), 4), (4, Why::Hpa));
        assert_eq!(a.poll(advance(4).await, Some(0.0), 1), (0, Why::Deactivate));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(a.poll(Instant::now(), Some(0.5), 0), (1, Why::Activate));
        // Three replicas (scaled by hand, say): the recommendation of 4 from 4.5 s ago
        // is still in the 6 s window, so the HPA holds them.
        assert_eq!(a.sync(Instant::now(), Some(0.5), 3), (3, Why::Hpa));
    }

    #[tokio::test(start_paused = true)]
    async fn the_hpa_falls_back_from_the_failure_after_the_threshold() {
        for version in [KedaVersion::V2_17, KedaVersion::V2_19] {
            let mut a = Autoscaler::new(ScalerSpec {
                keda: version,
                ..spec()
            });
            let now = Instant::now();
            // More than three failures: the 4th applies the fallback.
            for _ in 0..3 {
                assert_eq!(a.sync(now, None, 3), (3, Why::Hold), "{version:?}");
            }
            // currentReplicasIfHigher at 3 replicas: a metric of 3 × target holds 3.
            assert_eq!(a.sync(now, None, 3), (3, Why::Fallback), "{version:?}");
        }
        // Below the fallback's count: the fallback's count.
        let mut b = Autoscaler::new(ScalerSpec {
            fallback: Some(Fallback {
                failure_threshold: 1,
                replicas: 2,
            }),
            ..spec()
        });
        let now = Instant::now();
        assert_eq!(b.sync(now, None, 1), (1, Why::Hold));
        assert_eq!(b.sync(now, None, 1), (2, Why::Fallback));
        // A good read resets the count: at target, two replicas stay two.
        assert_eq!(b.sync(now, Some(8.0), 2), (2, Why::Hpa));
        assert_eq!(b.sync(now, None, 2), (2, Why::Hold));
        assert_eq!(b.sync(now, None, 2), (2, Why::Fallback));
    }

    #[tokio::test(start_paused = true)]
    async fn before_2_19_polling_failures_neither_count_nor_wake_a_pool_at_zero() {
        let mut a = Autoscaler::new(v2_17());
        for _ in 0..10 {
            assert_eq!(a.poll(Instant::now(), None, 0), (0, Why::Hold));
        }
        // The HPA's failures alone count: its first failure is the first of three.
        assert_eq!(a.sync(Instant::now(), None, 2), (2, Why::Hold));
        assert_eq!(a.sync(Instant::now(), None, 2), (2, Why::Hold));
        assert_eq!(a.sync(Instant::now(), None, 2), (2, Why::Hold));
        assert_eq!(a.sync(Instant::now(), None, 2), (2, Why::Fallback));
        // A good poll does not reset the HPA's count before 2.19.
        assert_eq!(a.poll(Instant::now(), Some(8.0), 2), (2, Why::Keep));
        assert_eq!(a.sync(Instant::now(), None, 2), (2, Why::Fallback));
    }

    #[tokio::test(start_paused = true)]
    async fn from_2_19_a_fallback_wakes_a_pool_at_zero_and_holds_it_one_cooldown() {
        let mut a = Autoscaler::new(spec());
        let now = Instant::now();
        // Three failed polls hold the pool at zero; the 4th falls back and wakes it.
        for _ in 0..3 {
            assert_eq!(a.poll(now, None, 0), (0, Why::Hold));
        }
        assert_eq!(a.poll(now, None, 0), (1, Why::Fallback));
        // The outage goes on: the fallback keeps the pool active.
        assert_eq!(a.poll(advance(3).await, None, 1), (1, Why::Fallback));
        // The broker answers an empty queue: active until one cooldown after the last
        // fallback.
        assert_eq!(a.poll(advance(1).await, Some(0.0), 1), (1, Why::Keep));
        assert_eq!(a.poll(advance(2).await, Some(0.0), 1), (1, Why::Keep));
        assert_eq!(a.poll(advance(1).await, Some(0.0), 1), (0, Why::Deactivate));
    }

    #[tokio::test(start_paused = true)]
    async fn from_2_19_both_loops_share_one_count_and_any_success_resets_it() {
        let mut a = Autoscaler::new(spec());
        let now = Instant::now();
        assert_eq!(a.poll(now, None, 2), (2, Why::Hold));
        assert_eq!(a.sync(now, None, 2), (2, Why::Hold));
        assert_eq!(a.poll(now, None, 2), (2, Why::Hold));
        // The 4th fetch, whichever loop makes it.
        assert_eq!(a.sync(now, None, 2), (2, Why::Fallback));
        // A good poll resets it for the HPA too.
        assert_eq!(a.poll(now, Some(8.0), 2), (2, Why::Keep));
        assert_eq!(a.sync(now, None, 2), (2, Why::Hold));
    }

    #[tokio::test(start_paused = true)]
    async fn a_push_wakes_at_once_and_counts_as_activity() {
        let mut a = Autoscaler::new(spec());
        let now = Instant::now();
        assert_eq!(a.push(now, false, 0), (0, Why::Idle));
        assert_eq!(a.push(now, true, 0), (1, Why::Activate));
        // Above zero the count stays the HPA's; an inactive push within the cooldown
        // of the last activity changes nothing, one after it returns the pool to zero.
        assert_eq!(a.push(advance(3).await, false, 3), (3, Why::Keep));
        assert_eq!(a.push(advance(1).await, false, 3), (0, Why::Deactivate));
    }

    #[tokio::test(start_paused = true)]
    async fn without_fallback_failed_reads_only_hold() {
        for keda in [KedaVersion::V2_17, KedaVersion::V2_19] {
            let mut a = Autoscaler::new(ScalerSpec {
                keda,
                fallback: None,
                ..spec()
            });
            for _ in 0..10 {
                assert_eq!(a.sync(Instant::now(), None, 2), (2, Why::Hold));
                assert_eq!(a.poll(Instant::now(), None, 0), (0, Why::Hold));
                assert_eq!(a.poll(Instant::now(), None, 2), (2, Why::Hold));
            }
        }
    }
}
