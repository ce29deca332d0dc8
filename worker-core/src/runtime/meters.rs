//! The runtime's metric handles, resolved once when the worker starts: each job
//! records through them without building labels or looking the metric up again.
//!
//! They come from the `metrics` recorder installed when the worker starts (its own
//! Prometheus recorder when it serves HTTP, or the application's); a recorder installed
//! later does not see them.

use std::borrow::Cow;
use std::collections::HashMap;

use metrics::{Counter, Gauge, Histogram};

use crate::telemetry::{names, Outcome};

const OUTCOMES: [Outcome; 5] = [
    Outcome::Ok,
    Outcome::Retried,
    Outcome::Dead,
    Outcome::Released,
    Outcome::Failed,
];

/// One queue's handles.
#[derive(Clone)]
pub(crate) struct QueueMeters {
    /// `worker_job_wait_seconds`.
    pub(crate) wait: Histogram,
    /// `worker_job_duration_seconds`.
    pub(crate) duration: Histogram,
    /// `worker_jobs_total`, by [`Outcome`] (its discriminant).
    outcomes: [Counter; 5],
}

impl QueueMeters {
    fn new(pool: &str, queue: &str) -> Self {
        let labels = [
            (names::POOL, pool.to_owned()),
            (names::QUEUE, queue.to_owned()),
        ];
        Self {
            wait: metrics::histogram!(names::JOB_WAIT, &labels),
            duration: metrics::histogram!(names::JOB_DURATION, &labels),
            outcomes: OUTCOMES.map(|o| {
                metrics::counter!(
                    names::JOBS_TOTAL,
                    names::POOL => pool.to_owned(),
                    names::QUEUE => queue.to_owned(),
                    names::OUTCOME => o.as_str()
                )
            }),
        }
    }

    /// Count a settled job.
    pub(crate) fn settled(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].increment(1);
    }
}

/// Every handle the runtime records through per job.
pub(crate) struct Meters {
    pub(crate) in_flight: Gauge,
    pub(crate) utilization: Gauge,
    pub(crate) budget_used: Gauge,
    pub(crate) budget_total: Gauge,
    pool: String,
    queues: HashMap<String, QueueMeters>,
}

impl Meters {
    pub(crate) fn new(pool: &str, queues: &[String]) -> Self {
        let gauge = |name: &'static str| metrics::gauge!(name, names::POOL => pool.to_owned());
        Self {
            in_flight: gauge(names::IN_FLIGHT),
            utilization: gauge(names::UTILIZATION),
            budget_used: gauge(names::BUDGET_USED),
            budget_total: gauge(names::BUDGET_TOTAL),
            pool: pool.to_owned(),
            queues: queues
                .iter()
                .map(|q| (q.clone(), QueueMeters::new(pool, q)))
                .collect(),
        }
    }

    /// The handles of `queue`, one of the worker's queues.
    pub(crate) fn queue(&self, queue: &str) -> Cow<'_, QueueMeters> {
        match self.queues.get(queue) {
            Some(m) => Cow::Borrowed(m),
            None => Cow::Owned(QueueMeters::new(&self.pool, queue)),
        }
    }
}
