//! The `/scaling` document: one number per pool that counts in-flight work.
//!
//! `backlog = pending + in_flight + delayed that is due`, summed over every queue that
//! feeds the pool, and `desired_replicas = ceil(backlog / capacity_per_replica)`.
//! With KEDA's `metrics-api` trigger and `AverageValue` target = capacity per replica,
//! the HPA computes `ceil(backlog / target)` replicas — the same number — so a pool
//! whose work is all in flight keeps exactly the replicas running it, and a pool at
//! zero wakes on its first pending job.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::broker::{Broker, QueueDepth};
use crate::error::BrokerError;

/// One queue's numbers in the document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QueueScaling {
    /// Ready to start.
    pub pending: u64,
    /// Leased to workers.
    pub in_flight: u64,
    /// Delayed whose time has come.
    pub delayed_due: u64,
    /// All delayed.
    pub delayed: u64,
    /// Dead letters.
    pub dead: u64,
    /// Age of the oldest pending job in seconds (0 when none).
    pub oldest_age_s: f64,
    /// Where each number was read (see [`QueueDepth::sources`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sources: BTreeMap<String, String>,
}

impl From<&QueueDepth> for QueueScaling {
    fn from(d: &QueueDepth) -> Self {
        Self {
            pending: d.pending,
            in_flight: d.in_flight,
            delayed_due: d.delayed_due,
            delayed: d.delayed,
            dead: d.dead,
            oldest_age_s: d.oldest_pending_age.map_or(0.0, |a| a.as_secs_f64()),
            sources: d.sources.clone(),
        }
    }
}

/// The document KEDA's `metrics-api` trigger reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ScalingDoc {
    /// Pool name.
    pub pool: String,
    /// Pending + in flight + delayed that is due, over all the pool's queues.
    pub backlog: u64,
    /// Jobs one replica runs at once.
    pub capacity_per_replica: u32,
    /// `ceil(backlog / capacity_per_replica)`.
    pub desired_replicas: u64,
    /// Per-queue numbers.
    pub queues: BTreeMap<String, QueueScaling>,
}

impl ScalingDoc {
    /// The document for `pool` from each queue's depth.
    pub fn new<'a>(
        pool: &str,
        capacity_per_replica: u32,
        depths: impl IntoIterator<Item = (&'a str, &'a QueueDepth)>,
    ) -> Self {
        let mut backlog = 0;
        let mut queues = BTreeMap::new();
        for (name, depth) in depths {
            backlog += depth.backlog();
            queues.insert(name.to_owned(), QueueScaling::from(depth));
        }
        let capacity = u64::from(capacity_per_replica.max(1));
        Self {
            pool: pool.to_owned(),
            backlog,
            capacity_per_replica,
            desired_replicas: backlog.div_ceil(capacity),
            queues,
        }
    }

    /// Read every queue's depth from `broker` and build the document. Any failed
    /// read fails the whole document: a partial sum would undercount the pool.
    pub async fn read(
        broker: &dyn Broker,
        pool: &str,
        capacity_per_replica: u32,
        queues: &[String],
    ) -> Result<(Self, Vec<(String, QueueDepth)>), BrokerError> {
        let mut depths = Vec::with_capacity(queues.len());
        for q in queues {
            depths.push((q.clone(), broker.depth(q).await?));
        }
        let doc = Self::new(
            pool,
            capacity_per_replica,
            depths.iter().map(|(n, d)| (n.as_str(), d)),
        );
        Ok((doc, depths))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_counts_in_flight_and_due_and_rounds_replicas_up() {
        let a = QueueDepth {
            pending: 12,
            in_flight: 4,
            delayed: 3,
            delayed_due: 1,
            ..QueueDepth::default()
        };
        let b = QueueDepth {
            in_flight: 2,
            ..QueueDepth::default()
        };
        let doc = ScalingDoc::new("gpu", 4, [("a", &a), ("b", &b)]);
        assert_eq!(doc.backlog, 19);
        assert_eq!(doc.desired_replicas, 5);
        let idle = ScalingDoc::new("gpu", 4, [("a", &QueueDepth::default())]);
        assert_eq!(idle.desired_replicas, 0);
    }
}
