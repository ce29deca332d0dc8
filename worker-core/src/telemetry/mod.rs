//! Metrics, the `/scaling` document, and the HTTP listener that serves them.
//!
//! The worker and the [`exporter`] serve on one listener implementation: HTTP/1.1 with
//! a 5 s header-read timeout (idle kept-alive connections included) and at most 64
//! open connections, each one over closed as soon as it is accepted. Their depth
//! routes share one broker reading per second, and their error bodies name the kind of
//! failure, never the broker error's text (which the log keeps, with its causes).
//!
//! Every metric name and label is defined once, in [`names`].

pub mod exporter;
pub(crate) mod http;
mod listener;
pub use listener::accept_within;
mod reading;
pub mod scaling;
#[cfg(test)]
mod test_broker;
#[cfg(test)]
mod tests;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Metric and label names (the contract in the README's metrics table).
pub mod names {
    /// Counter of settled jobs, label `outcome`.
    pub const JOBS_TOTAL: &str = "worker_jobs_total";
    /// Histogram of handler run time.
    pub const JOB_DURATION: &str = "worker_job_duration_seconds";
    /// Histogram of enqueue (or due time) to start.
    pub const JOB_WAIT: &str = "worker_job_wait_seconds";
    /// Gauge of jobs running in this process.
    pub const IN_FLIGHT: &str = "worker_in_flight";
    /// Gauge of busy permits / total permits.
    pub const UTILIZATION: &str = "worker_utilization";
    /// Gauge, 1 while draining.
    pub const DRAINING: &str = "worker_draining";
    /// Gauge, 1 while quiet: the pool needs fewer replicas than are live and this
    /// worker takes no new jobs.
    pub const QUIET: &str = "worker_quiet";
    /// Gauge of queue depth, label `state`.
    pub const QUEUE_DEPTH: &str = "worker_queue_depth";
    /// Gauge of pending + in flight + delayed that is due.
    pub const QUEUE_BACKLOG: &str = "worker_queue_backlog";
    /// Gauge of the oldest pending job's age.
    pub const QUEUE_OLDEST_AGE: &str = "worker_queue_oldest_age_seconds";
    /// Gauge of budget units held by running jobs.
    pub const BUDGET_USED: &str = "worker_budget_used";
    /// Gauge of the pool budget in units.
    pub const BUDGET_TOTAL: &str = "worker_budget_total";
    /// Counter of failed broker calls, label `op`.
    pub const BROKER_ERRORS: &str = "worker_broker_errors_total";

    /// Label: pool name.
    pub const POOL: &str = "pool";
    /// Label: queue name.
    pub const QUEUE: &str = "queue";
    /// Label: job outcome.
    pub const OUTCOME: &str = "outcome";
    /// Label: queue state.
    pub const STATE: &str = "state";
    /// Label: broker operation.
    pub const OP: &str = "op";
}

/// How a job ended, as counted by `worker_jobs_total{outcome}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Succeeded and acked.
    Ok,
    /// Failed and scheduled for another attempt.
    Retried,
    /// Dead-lettered.
    Dead,
    /// Given back to pending, attempt not counted: the worker is draining.
    Released,
    /// Its outcome could not be recorded: the lease was lost or the broker refused;
    /// the broker will redeliver it.
    Failed,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Retried => "retried",
            Self::Dead => "dead",
            Self::Released => "released",
            Self::Failed => "failed",
        }
    }
}

/// Seconds buckets for the duration and wait histograms: 1 ms to 1 h.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use. `None` when the
/// application installed another `metrics` recorder first; then `/metrics` says so
/// and the application's own exporter carries the same names.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a metrics recorder is already installed; /metrics will not render");
                    None
                }
            }
        })
        .as_ref()
}

/// The `# HELP` line of every metric the runtime records.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(names::JOBS_TOTAL, "Jobs settled, by outcome.");
    describe_histogram!(names::JOB_DURATION, "Handler run time in seconds.");
    describe_histogram!(
        names::JOB_WAIT,
        "Seconds from enqueue (or due time) to start."
    );
    describe_gauge!(names::IN_FLIGHT, "Jobs running in this process.");
    describe_gauge!(names::UTILIZATION, "Busy run slots over all run slots.");
    describe_gauge!(names::DRAINING, "1 while this worker drains.");
    describe_gauge!(
        names::QUIET,
        "1 while this worker is quiet: the pool needs fewer replicas than are live, and it takes no new jobs."
    );
    describe_gauge!(names::QUEUE_DEPTH, "Jobs of a queue by state.");
    describe_gauge!(
        names::QUEUE_BACKLOG,
        "Pending + in flight + delayed that is due, of a queue."
    );
    describe_gauge!(
        names::QUEUE_OLDEST_AGE,
        "Age in seconds of a queue's oldest pending job."
    );
    describe_gauge!(names::BUDGET_USED, "Budget units held by running jobs.");
    describe_gauge!(names::BUDGET_TOTAL, "This worker's budget in units.");
    describe_counter!(names::BROKER_ERRORS, "Failed broker calls, by operation.");
}
