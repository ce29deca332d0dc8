//! The fault-injection soak (see `system_tests::soak`): real `demo-worker` processes,
//! thousands of jobs, random faults, every job reconciled, on Redis, RabbitMQ classic
//! queues and RabbitMQ quorum queues at once (each on a broker of its own). The seed
//! is printed first; `SOAK_SEED=<seed>` replays a run, `SOAK_MINUTES` changes its
//! length, `SOAK_BACKENDS` (a comma-separated subset of `redis,classic,quorum`) picks
//! the backends. The short runs are part of the test suite; the long one is
//! `#[ignore]`d:
//!
//! ```sh
//! cargo test -p system-tests --test soak -- --ignored --nocapture long_soak
//! ```

use system_tests::soak::{Backend, Soak};

/// Minutes of faults in the test suite.
const SHORT: f64 = 1.0;

/// Minutes of faults of the long run, unless `SOAK_MINUTES` says otherwise.
const LONG: f64 = 30.0;

/// The backends `SOAK_BACKENDS` names, else `default`.
fn backends(default: &str) -> Vec<Backend> {
    let chosen = std::env::var("SOAK_BACKENDS").unwrap_or_else(|_| default.into());
    chosen
        .split(',')
        .map(|b| match b.trim() {
            "redis" => Backend::Redis,
            "classic" => Backend::RabbitClassic,
            "quorum" => Backend::RabbitQuorum,
            other => panic!("SOAK_BACKENDS: unknown backend {other:?} (redis, classic, quorum)"),
        })
        .collect()
}

/// Run a soak of `minutes` on every chosen backend at once, `jobs_per_minute` each
/// (the default when `None`), and fail with every backend's problems.
async fn soak_every_backend(default: &str, minutes: f64, jobs_per_minute: Option<u64>) {
    let mut runs = tokio::task::JoinSet::new();
    for backend in backends(default) {
        let mut soak = Soak::new(backend, minutes);
        if let Some(n) = jobs_per_minute {
            soak.jobs = (soak.duration.as_secs() * n / 60) as usize;
        }
        runs.spawn(soak.run());
    }
    let mut failures = Vec::new();
    while let Some(outcome) = runs.join_next().await {
        let outcome = outcome.unwrap_or_else(|e| panic!("soak task: {e}"));
        failures.extend(outcome.failure());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_redis_for_a_minute() {
    soak_every_backend("redis", SHORT, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_rabbitmq_for_a_minute() {
    soak_every_backend("classic,quorum", SHORT, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "30 minutes; run on purpose"]
async fn long_soak() {
    soak_every_backend("redis,classic,quorum", LONG, Some(1000)).await;
}
