//! The fault-injection soak (see `system_tests::soak`): real `demo-worker` processes,
//! thousands of jobs, random faults, every job reconciled. The seed is printed first;
//! `SOAK_SEED=<seed>` replays a run, `SOAK_MINUTES` changes its length. The short
//! runs are part of the test suite; the long one is `#[ignore]`d:
//!
//! ```sh
//! cargo test -p system-tests --test soak -- --ignored --nocapture long_soak
//! ```

use system_tests::soak::{Backend, Soak};

/// Minutes of faults per backend in the test suite: the three backends run in
/// parallel, each with its own broker, within the suite's three minutes.
const SHORT: f64 = 1.0;

/// Minutes of faults of the long run, unless `SOAK_MINUTES` says otherwise.
const LONG: f64 = 30.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_redis() {
    Soak::new(Backend::Redis, SHORT).run().await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_rabbitmq_classic() {
    Soak::new(Backend::RabbitClassic, SHORT)
        .run()
        .await
        .assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_rabbitmq_quorum() {
    Soak::new(Backend::RabbitQuorum, SHORT)
        .run()
        .await
        .assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "30 minutes per backend; run on purpose"]
async fn long_soak() {
    for backend in [
        Backend::Redis,
        Backend::RabbitClassic,
        Backend::RabbitQuorum,
    ] {
        Soak::new(backend, LONG).run().await.assert_clean();
    }
}
