//! A broker for the listener's tests: the in-memory broker behind a wrapper that
//! counts depth reads, can make them slow, and can make them fail with an error whose
//! text names a user, a password and a host.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::broker::{Broker, DeadLetter, Delivery, FetchPlan, Lease, QueueDepth, WorkerInfo};
use crate::job::{Envelope, JobId, NewJob};
use crate::{BrokerError, MemoryBroker};

/// The text a failing depth read carries, in its message and in its cause.
pub(crate) const SECRET: &str = "user:secret@host";

#[derive(Clone, Default)]
pub(crate) struct CountingBroker {
    inner: MemoryBroker,
    depth_reads: Arc<AtomicU32>,
    failing: Arc<AtomicBool>,
    /// How long each depth read takes, so concurrent requests overlap one read.
    delay: Duration,
}

impl CountingBroker {
    pub(crate) fn new(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }

    pub(crate) fn depth_reads(&self) -> u32 {
        // A test counter read after the requests finished; nothing else is published.
        self.depth_reads.load(Ordering::Relaxed)
    }

    pub(crate) fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }
}

#[async_trait]
impl Broker for CountingBroker {
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, BrokerError> {
        self.inner.enqueue(jobs).await
    }
    async fn fetch(&self, plan: &FetchPlan) -> Result<Vec<Delivery>, BrokerError> {
        self.inner.fetch(plan).await
    }
    async fn ack(&self, lease: &Lease) -> Result<(), BrokerError> {
        self.inner.ack(lease).await
    }
    async fn retry_after(&self, l: &Lease, d: Duration, e: &str) -> Result<(), BrokerError> {
        self.inner.retry_after(l, d, e).await
    }
    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), BrokerError> {
        self.inner.dead_letter(lease, reason).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), BrokerError> {
        self.inner.release(lease).await
    }
    async fn extend_lease(&self, lease: &Lease, d: Duration) -> Result<(), BrokerError> {
        self.inner.extend_lease(lease, d).await
    }
    async fn checkpoint(&self, lease: &Lease, job: &Envelope) -> Result<(), BrokerError> {
        self.inner.checkpoint(lease, job).await
    }
    async fn reap_expired(&self, queues: &[String]) -> Result<u64, BrokerError> {
        self.inner.reap_expired(queues).await
    }
    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        self.depth_reads.fetch_add(1, Ordering::Relaxed);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if self.failing.load(Ordering::Relaxed) {
            return Err(BrokerError::unavailable(
                format!("cannot open amqp://{SECRET}:5672"),
                std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!("{SECRET} refused the connection"),
                ),
            ));
        }
        self.inner.depth(queue).await
    }
    async fn dead_letters(&self, q: &str, n: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        self.inner.dead_letters(q, n).await
    }
    async fn requeue_dead(&self, q: &str, ids: &[JobId]) -> Result<u64, BrokerError> {
        self.inner.requeue_dead(q, ids).await
    }
    async fn purge_dead(&self, q: &str, ids: &[JobId]) -> Result<u64, BrokerError> {
        self.inner.purge_dead(q, ids).await
    }
    async fn register_worker(&self, w: &WorkerInfo, ttl: Duration) -> Result<(), BrokerError> {
        self.inner.register_worker(w, ttl).await
    }
    async fn list_workers(&self, pool: Option<&str>) -> Result<Vec<WorkerInfo>, BrokerError> {
        self.inner.list_workers(pool).await
    }
    async fn deregister_worker(&self, id: &str) -> Result<(), BrokerError> {
        self.inner.deregister_worker(id).await
    }
}
