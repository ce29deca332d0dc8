//! Which pods a ReplicaSet deletes when it scales down: Kubernetes `getPodsToDelete`
//! (pkg/controller/replicaset/replica_set.go) sorts the active pods with
//! `ActivePodsWithRanks.Less` (pkg/controller/controller_utils.go, Kubernetes 1.31,
//! `PodDeletionCost` and `LogarithmicScaleDown` on, as by default) and deletes the
//! first ones.

use std::cmp::Ordering;
use std::time::Duration;

/// What the controller sees of one pod. Times are since a common origin, as the API
/// keeps them: whole seconds (`metav1.Time` is serialized to the second).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    /// Scheduled to a node (`spec.nodeName` set).
    pub assigned: bool,
    /// Its phase.
    pub phase: Phase,
    /// The `Ready` condition is true.
    pub ready: bool,
    /// When `Ready` last became true (`None`: not ready).
    pub ready_since: Option<Duration>,
    /// `controller.kubernetes.io/pod-deletion-cost` (0 when absent).
    pub deletion_cost: i32,
    /// Active pods of the same ReplicaSet on its node, itself included.
    pub on_same_node: u32,
    /// The most restarts of any of its containers.
    pub restarts: u32,
    /// `metadata.creationTimestamp`.
    pub created: Duration,
    /// `metadata.uid`.
    pub uid: String,
}

/// A pod's phase, as far as the ranking cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// `Pending`.
    Pending,
    /// `Unknown`.
    Unknown,
    /// `Running`.
    Running,
}

/// The whole seconds of `t`, as a `metav1.Time` holds it.
fn seconds(t: Duration) -> Duration {
    Duration::from_secs(t.as_secs())
}

/// `logarithmicRankDiff`: the difference of `floor(log2(now - t))` in nanoseconds,
/// -1 for a time not before `now`.
fn log_rank_diff(t1: Duration, t2: Duration, now: Duration) -> i64 {
    let rank = |t: Duration| match now.checked_sub(t) {
        Some(d) if !d.is_zero() => i64::from(127 - d.as_nanos().leading_zeros()),
        _ => -1,
    };
    rank(t1) - rank(t2)
}

/// `ActivePodsWithRanks.Less(i, j)`: whether `a` goes before `b` (is deleted first).
pub fn less(a: &PodFacts, b: &PodFacts, now: Duration) -> bool {
    // 1. Unassigned < assigned.
    if a.assigned != b.assigned {
        return !a.assigned;
    }
    // 2. Pending < Unknown < Running.
    if a.phase != b.phase {
        return a.phase < b.phase;
    }
    // 3. Not ready < ready.
    if a.ready != b.ready {
        return !a.ready;
    }
    // 4. Lower pod-deletion-cost < higher.
    if a.deletion_cost != b.deletion_cost {
        return a.deletion_cost < b.deletion_cost;
    }
    // 5. Doubled up < not doubled up: more pods of the ReplicaSet on its node first.
    if a.on_same_node != b.on_same_node {
        return a.on_same_node > b.on_same_node;
    }
    // 6. Ready for less time < more time, by log2 buckets; the UID breaks a tie.
    if a.ready && b.ready {
        if let (Some(ra), Some(rb)) = (a.ready_since, b.ready_since) {
            let (ra, rb) = (seconds(ra), seconds(rb));
            if ra != rb {
                return match log_rank_diff(ra, rb, now) {
                    0 => a.uid < b.uid,
                    d => d < 0,
                };
            }
        }
    }
    // 7. More restarts < fewer.
    if a.restarts != b.restarts {
        return a.restarts > b.restarts;
    }
    // 8. Newer < older, by log2 buckets; the UID breaks a tie.
    let (ca, cb) = (seconds(a.created), seconds(b.created));
    if ca != cb {
        return match log_rank_diff(ca, cb, now) {
            0 => a.uid < b.uid,
            d => d < 0,
        };
    }
    false
}

/// The indices of the `count` pods of `pods` the ReplicaSet deletes, first first.
pub fn pods_to_delete(pods: &[PodFacts], count: usize, now: Duration) -> Vec<usize> {
    let mut order: Vec<usize> = (0..pods.len()).collect();
    if count < pods.len() {
        order.sort_by(|&i, &j| {
            if less(&pods[i], &pods[j], now) {
                Ordering::Less
            } else if less(&pods[j], &pods[i], now) {
                Ordering::Greater
            } else {
                Ordering::Equal
            }
        });
    }
    order.truncate(count);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, created_s: u64) -> PodFacts {
        PodFacts {
            assigned: true,
            phase: Phase::Running,
            ready: true,
            ready_since: Some(Duration::from_secs(created_s + 2)),
            deletion_cost: 0,
            on_same_node: 1,
            restarts: 0,
            created: Duration::from_secs(created_s),
            uid: uid.into(),
        }
    }

    const NOW: Duration = Duration::from_secs(1_000);

    #[test]
    fn readiness_outranks_the_deletion_cost() {
        let idle = pod("a", 100);
        let unready_busy = PodFacts {
            ready: false,
            ready_since: None,
            deletion_cost: 5,
            ..pod("b", 100)
        };
        assert_eq!(pods_to_delete(&[idle, unready_busy], 1, NOW), vec![1]);
    }

    #[test]
    fn unassigned_then_pending_then_unknown_go_first() {
        let running = pod("a", 100);
        let pending = PodFacts {
            phase: Phase::Pending,
            ..pod("b", 100)
        };
        let unknown = PodFacts {
            phase: Phase::Unknown,
            ..pod("c", 100)
        };
        let unassigned = PodFacts {
            assigned: false,
            phase: Phase::Pending,
            ..pod("d", 100)
        };
        let pods = [running, pending, unknown, unassigned];
        assert_eq!(pods_to_delete(&pods, 3, NOW), vec![3, 1, 2]);
    }

    #[test]
    fn the_lower_cost_goes_first_then_the_pod_doubled_up() {
        let busy = PodFacts {
            deletion_cost: 3,
            ..pod("a", 900)
        };
        let idle_old = pod("b", 100);
        assert_eq!(pods_to_delete(&[busy, idle_old.clone()], 1, NOW), vec![1]);
        let doubled = PodFacts {
            on_same_node: 2,
            ..pod("c", 100)
        };
        assert_eq!(pods_to_delete(&[idle_old, doubled], 1, NOW), vec![1]);
    }

    #[test]
    fn ready_time_counts_by_log2_buckets_and_the_uid_breaks_ties() {
        // Ready 10 s and 600 s ago: different buckets, the newer first.
        let new = PodFacts {
            ready_since: Some(NOW - Duration::from_secs(10)),
            ..pod("z", 0)
        };
        let old = PodFacts {
            ready_since: Some(NOW - Duration::from_secs(600)),
            ..pod("a", 0)
        };
        assert_eq!(pods_to_delete(&[old.clone(), new], 1, NOW), vec![1]);
        // Ready 600 s and 601 s ago: one bucket (2^39 ns ≈ 550 s to 1,100 s), so the
        // lower UID goes first whatever else differs, restarts included.
        let other = PodFacts {
            ready_since: Some(NOW - Duration::from_secs(601)),
            restarts: 9,
            ..pod("b", 0)
        };
        assert_eq!(pods_to_delete(&[other, old], 1, NOW), vec![1]);
    }

    #[test]
    fn then_restarts_then_newer_pods() {
        let calm = pod("a", 100);
        let restarted = PodFacts {
            restarts: 2,
            ..pod("b", 100)
        };
        assert_eq!(pods_to_delete(&[calm.clone(), restarted], 1, NOW), vec![1]);
        // Same ready time, created 900 s and 10 s ago.
        let newer = PodFacts {
            created: NOW - Duration::from_secs(10),
            ..pod("z", 100)
        };
        assert_eq!(pods_to_delete(&[calm, newer], 1, NOW), vec![1]);
    }

    #[test]
    fn times_count_in_whole_seconds() {
        // Ready within the same second: equal, so the ranking goes on to creation.
        let a = PodFacts {
            ready_since: Some(Duration::from_millis(500_100)),
            created: Duration::from_secs(10),
            ..pod("a", 0)
        };
        let b = PodFacts {
            ready_since: Some(Duration::from_millis(500_900)),
            created: Duration::from_secs(900),
            ..pod("b", 0)
        };
        assert_eq!(pods_to_delete(&[a, b], 1, NOW), vec![1]);
    }

    #[test]
    fn log2_ranks() {
        assert_eq!(log_rank_diff(NOW, NOW, NOW), 0);
        // 1 ns ago: rank 0; not before now: -1.
        assert_eq!(log_rank_diff(NOW - Duration::from_nanos(1), NOW, NOW), 1);
        // 2^30 ns and 2^31 - 1 ns: the same bucket.
        let a = NOW - Duration::from_nanos(1 << 30);
        let b = NOW - Duration::from_nanos((1 << 31) - 1);
        assert_eq!(log_rank_diff(a, b, NOW), 0);
        assert_eq!(
            log_rank_diff(b, NOW - Duration::from_nanos(1 << 31), NOW),
            -1
        );
    }
}
