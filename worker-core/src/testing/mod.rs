//! The backend conformance suite: the [`Broker`](crate::Broker) contract as tests.
//!
//! A backend crate runs every case with one macro call in an integration test:
//!
//! ```no_run
//! async fn make() -> worker_core::MemoryBroker { worker_core::MemoryBroker::new() }
//! // A second handle on the same store, for the cases that play two workers.
//! async fn peer(b: &worker_core::MemoryBroker) -> worker_core::MemoryBroker { b.clone() }
//! worker_core::conformance_suite!(make(), peer = peer);
//! ```
//!
//! Each case names its own queues and pools with a random prefix, so cases run in
//! parallel against one shared server. Cases use real time with short leases, as a
//! real backend's clock cannot be paused.

// The cases are assertions: a broker error must fail the test loudly, with its text.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod found;
pub mod model;
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "cases.rs"]
mod spec;

/// Every conformance case: one public async function per behaviour of the
/// [`Broker`](crate::Broker) contract. Those written as its specification come first;
/// then those the model-based tests ([`model`]) found, each the shrunk sequence of
/// operations on which a backend disagreed with the model.
pub mod cases {
    pub use super::found::*;
    pub use super::spec::*;
}

use std::future::Future;
use std::time::Duration;

/// A random, valid queue (or pool) name for one test: `t<hex>-<name>`.
pub fn unique(name: &str) -> String {
    format!("t{:012x}-{name}", fastrand::u64(..) & 0xffff_ffff_ffff)
}

/// Wait until `check` returns true, polling every 10 ms; panics after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Run every conformance case against one broker, all at once (each case names its
/// own queues). For a backend whose server a test must own for the whole run, such as
/// a cluster it starts and stops; otherwise prefer [`conformance_suite!`](crate::conformance_suite), which gives
/// each case its own test. Cases over two workers get `b` as both, so a backend that
/// holds deliveries ahead of `fetch` (AMQP consumers) needs the macro and a peer.
pub async fn run_all(b: &dyn crate::Broker) {
    crate::__conformance_cases!(__conformance_join, b);
}

/// The one list of conformance cases; hands it to `$crate::$callback!(args; cases;
/// pairs)`. `cases` take one broker; `pairs` take two handles on one store, as two
/// workers have.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($callback:ident, $($args:tt)*) => {
        $crate::$callback! {$($args)*;
            enqueue_fetch_ack,
            fetch_is_fifo_and_bounded,
            fetch_plan_keeps_shares_and_conserves_work,
            envelope_round_trips,
            batch_enqueue_is_all_or_nothing,
            invalid_queue_names_are_refused,
            jobs_out_of_bounds_are_refused_and_nothing_is_written,
            expired_lease_is_reaped_with_attempt_counted,
            extended_lease_is_not_reaped,
            extending_many_leases_refuses_each_stale_one_alone,
            concurrent_reapers_reclaim_each_lease_once,
            stale_token_is_refused_everywhere,
            retry_after_delays_and_counts_the_attempt,
            retry_without_delay_is_pending_at_once,
            release_keeps_the_attempt_and_goes_first,
            checkpoint_travels_with_the_job_until_ack,
            a_refused_checkpoint_changes_nothing,
            dead_letters_keep_reason_and_history,
            a_dead_id_is_refused_by_enqueue,
            requeue_never_makes_two_live_copies,
            requeue_of_a_running_id_leaves_its_lease_alone,
            a_purged_or_acked_id_may_be_enqueued_again,
            delayed_enqueue_waits_for_its_time,
            depth_counts_every_state,
            worker_registry_lives_by_ttl,
            worker_registry_renews_on_beat_and_lists_what_was_written,
            settled_job_cannot_be_settled_again,
            wait_for_work_wakes_on_enqueue,
            later_calls_work_after_close,
            id_of_a_dead_letter_is_not_reused,
            delayed_job_of_a_new_queue_is_not_lost;
            stop_fetching_leaves_the_rest_to_other_workers
        }
    };
}

/// Runs the listed cases concurrently against one broker (see [`run_all`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_join {
    ($b:expr; $($case:ident),* $(,)?; $($pair:ident),* $(,)?) => {
        ::futures::future::join_all(::std::vec![
            $(::std::boxed::Box::pin($crate::testing::cases::$case($b))
                as ::futures::future::BoxFuture<'_, ()>,)*
            $(::std::boxed::Box::pin($crate::testing::cases::$pair($b, $b))
                as ::futures::future::BoxFuture<'_, ()>,)*
        ])
        .await
    };
}

/// Generate one `#[tokio::test]` per conformance case. `$make` is an expression whose
/// value is a future resolving to a fresh broker; it is evaluated once per case.
///
/// Some cases play two workers on one store. `peer = f` gives the second: `f(&broker)`
/// is a future resolving to another handle on the same store as `broker` (for a
/// server, a second connection with the same key prefix or virtual host). Without it
/// the broker plays both, which only a backend that holds nothing ahead of `fetch` may do.
#[macro_export]
macro_rules! conformance_suite {
    (@cases ($make:expr) $peer:tt; $($case:ident),* $(,)?; $($pair:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let broker = $make.await;
                $crate::testing::cases::$case(&broker).await;
            }
        )*
        $(
            $crate::conformance_suite!(@pair $pair ($make) $peer);
        )*
    };
    (@pair $case:ident ($make:expr) ()) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let broker = $make.await;
            $crate::testing::cases::$case(&broker, &broker).await;
        }
    };
    (@pair $case:ident ($make:expr) ($peer:expr)) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let broker = $make.await;
            let other = ($peer)(&broker).await;
            $crate::testing::cases::$case(&broker, &other).await;
        }
    };
    ($make:expr, peer = $peer:expr $(,)?) => {
        $crate::__conformance_cases!(conformance_suite, @cases ($make) ($peer));
    };
    ($make:expr) => {
        $crate::__conformance_cases!(conformance_suite, @cases ($make) ());
    };
}

/// A minimal HTTP/1.0 GET for tests: the status code and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    Ok((status, body))
}
