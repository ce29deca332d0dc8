//! Which queues the next fetch takes from.
//!
//! Weighted fairness is stride scheduling: each queue has a *pass* that advances by
//! `1 / weight` for every job it starts, and free slots go to the lowest pass. Over any
//! stretch in which queues stay backlogged, starts follow the weights exactly. A queue
//! that ran dry has its pass lifted to the busy queues' floor when it is seen empty, so
//! coming back it gets its share, not a burst repaying the time it was idle.
//! Strict priority gives every slot to the first queue with room, in configured order.
//! Either way the plan's fallback order lets a backend give an empty queue's slots to
//! the others in the same round trip (work-conserving).

use std::time::Duration;

use crate::broker::{FetchPlan, FetchShare};
use crate::config::{QueueSpec, Scheduling};

/// Pass advance for weight 1; large so integer strides stay exact for small weights.
const STRIDE_ONE: u64 = 1 << 32;

#[derive(Debug)]
struct Slot {
    name: String,
    stride: u64,
    pass: u64,
    limit: Option<u32>,
    in_flight: u32,
    /// Jobs that plans still on the wire may bring (their shares' maxima), so that
    /// fetches running side by side never take more than a queue's limit together.
    reserved: u32,
    /// The last fetch gave this queue fewer jobs than its share: it has no work.
    dry: bool,
}

/// Plans fetches and tracks what each queue has in flight in this process.
#[derive(Debug)]
pub(crate) struct Scheduler {
    mode: Scheduling,
    slots: Vec<Slot>,
}

impl Scheduler {
    pub(crate) fn new(queues: &[QueueSpec], mode: Scheduling) -> Self {
        Self {
            mode,
            slots: queues
                .iter()
                .map(|q| Slot {
                    name: q.name.clone(),
                    stride: STRIDE_ONE / u64::from(q.weight.max(1)),
                    pass: 0,
                    limit: q.max_in_flight,
                    in_flight: 0,
                    reserved: 0,
                    dry: false,
                })
                .collect(),
        }
    }

    fn room(&self, i: usize, n: u32) -> u32 {
        let s = &self.slots[i];
        s.limit
            .map_or(n, |l| l.saturating_sub(s.in_flight + s.reserved).min(n))
    }

    /// A plan for `n` jobs, or `None` when every queue is at its own limit.
    pub(crate) fn plan(&mut self, n: u32, lease: Duration) -> Option<FetchPlan> {
        let eligible: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.room(i, n) > 0)
            .collect();
        if n == 0 || eligible.is_empty() {
            return None;
        }
        let shares = match self.mode {
            Scheduling::Priority => eligible
                .iter()
                .enumerate()
                .map(|(rank, &i)| {
                    let room = self.room(i, n);
                    FetchShare::new(
                        self.slots[i].name.clone(),
                        if rank == 0 { room } else { 0 },
                        room,
                    )
                })
                .collect(),
            Scheduling::Weighted => self.weighted_shares(&eligible, n),
        };
        for share in &shares {
            if let Some(slot) = self.slots.iter_mut().find(|s| s.name == share.queue) {
                slot.reserved += share.max;
            }
        }
        Some(FetchPlan::new(shares, n, lease).partial_ok())
    }

    fn weighted_shares(&mut self, eligible: &[usize], n: u32) -> Vec<FetchShare> {
        // Lift dry queues to the floor of the busy ones, so they cannot bank idle time.
        if let Some(floor) = eligible
            .iter()
            .filter(|&&i| !self.slots[i].dry)
            .map(|&i| self.slots[i].pass)
            .min()
        {
            for &i in eligible {
                let s = &mut self.slots[i];
                if s.dry && s.pass < floor {
                    s.pass = floor;
                }
            }
        }
        let mut tentative: Vec<(usize, u64, u32)> = eligible
            .iter()
            .map(|&i| (i, self.slots[i].pass, 0))
            .collect();
        for _ in 0..n {
            let pick = tentative
                .iter_mut()
                .filter(|(i, _, share)| *share < self.room(*i, n))
                .min_by_key(|(_, pass, _)| *pass);
            let Some((i, pass, share)) = pick else { break };
            *share += 1;
            *pass += self.slots[*i].stride;
        }
        // Most deserving first: that is also the order in which empty slots are refilled.
        let mut order: Vec<usize> = eligible.to_vec();
        order.sort_by_key(|&i| self.slots[i].pass);
        order
            .into_iter()
            .map(|i| {
                let share = tentative.iter().find(|t| t.0 == i).map_or(0, |t| t.2);
                FetchShare::new(self.slots[i].name.clone(), share, self.room(i, n))
            })
            .collect()
    }

    /// Account what a fetch of `plan` returned: `got` jobs per queue name (nothing
    /// when the fetch failed). Every plan must be accounted exactly once.
    pub(crate) fn fetched(&mut self, plan: &FetchPlan, got: &[&str]) {
        for share in &plan.shares {
            let Some(slot) = self.slots.iter_mut().find(|s| s.name == share.queue) else {
                continue;
            };
            let count = got.iter().filter(|q| **q == share.queue).count() as u32;
            slot.reserved = slot.reserved.saturating_sub(share.max);
            slot.pass += slot.stride * u64::from(count);
            slot.in_flight += count;
            slot.dry = count < share.share || (share.share == 0 && count == 0 && slot.dry);
        }
    }

    /// A fetch of `plan` failed: give back what it had reserved, change nothing else.
    pub(crate) fn abandoned(&mut self, plan: &FetchPlan) {
        for share in &plan.shares {
            if let Some(slot) = self.slots.iter_mut().find(|s| s.name == share.queue) {
                slot.reserved = slot.reserved.saturating_sub(share.max);
            }
        }
    }

    /// A job of `queue` has settled.
    pub(crate) fn finished(&mut self, queue: &str) {
        if let Some(slot) = self.slots.iter_mut().find(|s| s.name == queue) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Simulate `rounds` fetches of `n` against backlogs, finishing everything at once.
    fn simulate(
        sched: &mut Scheduler,
        backlog: &mut HashMap<String, u64>,
        n: u32,
        rounds: usize,
    ) -> HashMap<String, u64> {
        let mut started: HashMap<String, u64> = HashMap::new();
        for _ in 0..rounds {
            let Some(plan) = sched.plan(n, Duration::from_secs(1)) else {
                break;
            };
            let available: Vec<u64> = plan.shares.iter().map(|s| backlog[&s.queue]).collect();
            let counts = plan.allocate(&available);
            let mut got = Vec::new();
            for (s, c) in plan.shares.iter().zip(counts) {
                *backlog.get_mut(&s.queue).unwrap() -= u64::from(c);
                *started.entry(s.queue.clone()).or_default() += u64::from(c);
                got.extend(std::iter::repeat_n(s.queue.as_str(), c as usize));
            }
            sched.fetched(&plan, &got);
            for q in got {
                sched.finished(q);
            }
        }
        started
    }

    fn queues(spec: &[(&str, u32)]) -> Vec<QueueSpec> {
        spec.iter()
            .map(|(n, w)| QueueSpec::new(*n).weight(*w))
            .collect()
    }

    #[test]
    fn weighted_shares_follow_weights_for_any_batch_size() {
        for n in [1, 2, 3, 7, 16] {
            let mut s = Scheduler::new(&queues(&[("a", 3), ("b", 1)]), Scheduling::Weighted);
            let mut backlog = HashMap::from([("a".into(), 1_000_000), ("b".into(), 1_000_000)]);
            let started = simulate(&mut s, &mut backlog, n, 4000);
            let ratio = started["a"] as f64 / started["b"] as f64;
            assert!((ratio - 3.0).abs() < 0.05, "n={n}: {started:?}");
        }
    }

    #[test]
    fn an_empty_queue_gives_its_share_away_and_does_not_burst_on_return() {
        let mut s = Scheduler::new(&queues(&[("a", 3), ("b", 1)]), Scheduling::Weighted);
        let mut backlog = HashMap::from([("a".into(), 0), ("b".into(), 1_000_000)]);
        let started = simulate(&mut s, &mut backlog, 4, 100);
        assert_eq!(started.get("a").copied().unwrap_or(0), 0);
        assert_eq!(started["b"], 400);
        // A comes back: from the very next rounds it gets 3:1, not everything.
        backlog.insert("a".into(), 1_000_000);
        let started = simulate(&mut s, &mut backlog, 4, 10);
        assert_eq!((started["a"], started["b"]), (30, 10));
    }

    #[test]
    fn priority_takes_the_first_queue_with_work() {
        let mut s = Scheduler::new(&queues(&[("hi", 1), ("lo", 1)]), Scheduling::Priority);
        let mut backlog = HashMap::from([("hi".into(), 10), ("lo".into(), 100)]);
        let started = simulate(&mut s, &mut backlog, 4, 3);
        assert_eq!((started["hi"], started["lo"]), (10, 2));
    }

    #[test]
    fn per_queue_limit_caps_shares_and_blocks_planning_when_full() {
        let specs = vec![QueueSpec::new("a").max_in_flight(2)];
        let mut s = Scheduler::new(&specs, Scheduling::Weighted);
        let plan = s.plan(8, Duration::from_secs(1)).unwrap();
        assert_eq!((plan.shares[0].share, plan.shares[0].max), (2, 2));
        s.fetched(&plan, &["a", "a"]);
        assert!(s.plan(8, Duration::from_secs(1)).is_none());
        s.finished("a");
        assert_eq!(s.plan(8, Duration::from_secs(1)).unwrap().shares[0].max, 1);
    }

    #[test]
    fn plans_on_the_wire_together_never_exceed_a_queue_limit() {
        let specs = vec![QueueSpec::new("a").max_in_flight(3), QueueSpec::new("b")];
        let mut s = Scheduler::new(&specs, Scheduling::Weighted);
        let first = s.plan(2, Duration::from_secs(1)).unwrap();
        let second = s.plan(4, Duration::from_secs(1)).unwrap();
        let max_of =
            |p: &FetchPlan, q: &str| p.shares.iter().find(|s| s.queue == q).map_or(0, |s| s.max);
        assert!(max_of(&first, "a") + max_of(&second, "a") <= 3);
        // A failed fetch gives its room back; a returned one keeps only what it got.
        s.abandoned(&first);
        s.fetched(&second, &["a"]);
        let third = s.plan(8, Duration::from_secs(1)).unwrap();
        assert_eq!(max_of(&third, "a"), 2);
    }
}
