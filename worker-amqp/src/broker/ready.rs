//! Jobs ready in a set of queues, counted without a consumer: what an exporter polls
//! while an idle pool waits for its first job.
//!
//! A consumer that received a job to learn of it would have to give the delivery
//! back: a `basic.nack` with requeue marks it redelivered, which this backend counts
//! as an attempt on classic queues, and which raises `x-delivery-count` (towards a
//! quorum queue's delivery limit) on RabbitMQ before 4.3; republishing it instead
//! would move it to the back of its queue and need write permission. A passive
//! declare counts the ready messages and touches none.

use super::*;

impl AmqpBroker {
    /// Jobs ready to start in `queues`, summed: one passive declare per queue on this
    /// broker's connection (opened if need be). A queue that does not exist counts 0.
    /// No job is received, held or marked, so polling this changes no attempt count;
    /// jobs in flight, delayed or dead are not counted.
    pub async fn ready(&self, queues: &[String]) -> Result<u64, BrokerError> {
        let s = self.inner.sessions.get().await?;
        let mut ready = 0u64;
        for queue in queues {
            topology::check_queue(queue)?;
            ready = ready.saturating_add(s.ready_count(queue).await?.unwrap_or(0));
        }
        Ok(ready)
    }
}
