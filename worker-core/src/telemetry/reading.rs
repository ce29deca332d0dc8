//! One broker reading shared by every request that arrives while it is in flight or
//! fresh, so that scrapers do not multiply the broker's load: on RabbitMQ each depth
//! reading is a passive declare and management-API calls per queue.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::BrokerError;

/// How long a reading answers requests: long enough that a burst of requests costs
/// one reading, short enough that an autoscaler never acts on an old one. A reading a
/// second old once made a pool go to zero while jobs were arriving: KEDA's poll read
/// the backlog from before them, as if it had polled a second early.
pub(crate) const DEFAULT_TTL: Duration = Duration::from_millis(100);

/// What a reading gave: shared, since one reading answers many requests.
pub(crate) type Shared<T> = Result<Arc<T>, Arc<BrokerError>>;

/// The last reading and when it was taken. A failed reading is kept as long as a good
/// one (no longer), and is answered as the error it was: never as an empty reading.
pub(crate) struct SharedReading<T> {
    ttl: Duration,
    last: Mutex<Option<(Instant, Shared<T>)>>,
}

impl<T> SharedReading<T> {
    /// Readings that answer requests for `ttl` after they finish.
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            last: Mutex::new(None),
        }
    }

    /// The last reading if younger than the TTL; else the one in flight, or a new one
    /// taken by `read`.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future that is taking a reading drops that reading; the next caller
    /// waiting takes one of its own.
    pub(crate) async fn get<F, Fut>(&self, read: F) -> Shared<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, BrokerError>>,
    {
        // Held across the read: callers that come meanwhile queue on the lock (fairly, in
        // arrival order) and find the fresh reading when their turn comes.
        let mut last = self.last.lock().await;
        if let Some((at, reading)) = last.as_ref() {
            if at.elapsed() < self.ttl {
                return reading.clone();
            }
        }
        let reading = read().await.map(Arc::new).map_err(Arc::new);
        *last = Some((Instant::now(), reading.clone()));
        reading
    }

    /// A new reading taken by `read`, however young the last one is (after one in
    /// flight, if any); it then answers requests for the TTL like any other.
    pub(crate) async fn fresh<F, Fut>(&self, read: F) -> Shared<T>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, BrokerError>>,
    {
        let mut last = self.last.lock().await;
        let reading = read().await.map(Arc::new).map_err(Arc::new);
        *last = Some((Instant::now(), reading.clone()));
        reading
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A read that takes 100 ms and counts itself; it fails while `fail` is set.
    async fn read(reads: &AtomicU32, fail: bool) -> Result<u32, BrokerError> {
        // Counted on entry, as a broker call is: the count is read after the calls end.
        let n = reads.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if fail {
            return Err(BrokerError::Protocol(format!("reading {n} failed")));
        }
        Ok(n)
    }

    #[tokio::test(start_paused = true)]
    async fn callers_during_a_read_share_it_and_a_read_after_the_ttl_is_new() {
        let shared = SharedReading::new(Duration::from_secs(1));
        let reads = AtomicU32::new(0);
        let got =
            futures::future::join_all((0..20).map(|_| shared.get(|| read(&reads, false)))).await;
        assert_eq!(reads.load(Ordering::Relaxed), 1);
        assert!(got.iter().all(|r| matches!(r, Ok(n) if **n == 1)));

        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(*shared.get(|| read(&reads, false)).await.unwrap(), 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(*shared.get(|| read(&reads, false)).await.unwrap(), 2);
        assert_eq!(reads.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_is_shared_as_an_error_and_kept_no_longer_than_the_ttl() {
        let shared = SharedReading::new(Duration::from_secs(1));
        let reads = AtomicU32::new(0);
        let got =
            futures::future::join_all((0..5).map(|_| shared.get(|| read(&reads, true)))).await;
        assert_eq!(reads.load(Ordering::Relaxed), 1);
        assert!(got
            .iter()
            .all(|r| matches!(r, Err(e) if e.to_string().contains("reading 1 failed"))));

        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(*shared.get(|| read(&reads, false)).await.unwrap(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_leaves_mid_read_does_not_wedge_the_others() {
        let shared = SharedReading::new(Duration::from_secs(1));
        let reads = AtomicU32::new(0);
        // Its read starts, then it is dropped (a client that hung up).
        let left = tokio::time::timeout(
            Duration::from_millis(50),
            shared.get(|| read(&reads, false)),
        )
        .await;
        assert!(left.is_err());
        assert_eq!(*shared.get(|| read(&reads, false)).await.unwrap(), 2);
    }
}
