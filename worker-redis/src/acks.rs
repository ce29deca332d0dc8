//! Acks of one queue travel together. While one batch is on the wire, the acks that
//! arrive wait and go as the next batch: one round trip and one script call for many
//! jobs under load, and no added wait when acks are sparse (a lone ack goes at once).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use worker_core::{BrokerError, JobId, LeaseToken};

use crate::broker::Conn;
use crate::error::{for_each_waiter, from_redis};
use crate::scripts;

/// Most acks in one script call (the script slices its own commands further).
const MAX_BATCH: usize = 1000;

/// What an ack learns: `true` acked, `false` the token no longer owns the job.
type Outcome = Result<bool, BrokerError>;

struct Waiting {
    id: JobId,
    token: LeaseToken,
    done: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// A flush task is running for this queue.
    flushing: bool,
}

/// Acks waiting to be sent, per queue.
#[derive(Default)]
pub(crate) struct AckBatches {
    queues: Mutex<HashMap<String, Queue>>,
}

impl AckBatches {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Queue>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue one ack. Returns its outcome's receiver, and whether the caller must
    /// start the flush task (none is running for this queue).
    pub(crate) fn push(
        &self,
        queue: &str,
        id: JobId,
        token: LeaseToken,
    ) -> (oneshot::Receiver<Outcome>, bool) {
        let (done, rx) = oneshot::channel();
        let mut queues = self.lock();
        let q = queues.entry(queue.to_owned()).or_default();
        q.waiting.push(Waiting { id, token, done });
        let start = !q.flushing;
        q.flushing = true;
        (rx, start)
    }

    /// The next batch of `queue`, or `None` (and the flush task ends) when none waits.
    fn next_batch(&self, queue: &str) -> Option<Vec<Waiting>> {
        let mut queues = self.lock();
        let q = queues.get_mut(queue)?;
        if q.waiting.is_empty() {
            queues.remove(queue);
            return None;
        }
        let n = q.waiting.len().min(MAX_BATCH);
        Some(q.waiting.drain(..n).collect())
    }

    /// Fail every waiting ack of `queue` with `error` (no connection to send them on).
    pub(crate) fn fail_all(&self, queue: &str, error: &BrokerError) {
        while let Some(batch) = self.next_batch(queue) {
            for w in batch {
                let _ = w.done.send(Err(for_each_waiter(error)));
            }
        }
    }

    /// Send batches of `queue` until none waits.
    pub(crate) async fn flush(self: Arc<Self>, queue: String, conn: Conn, keys: Vec<String>) {
        while let Some(batch) = self.next_batch(&queue) {
            let mut inv = scripts::ACK.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            for w in &batch {
                inv.arg(w.id.as_str()).arg(w.token.0.to_string());
            }
            let result: Result<Vec<i64>, redis::RedisError> = match conn.clone() {
                Conn::Single(mut c) => inv.invoke_async(&mut c).await,
                Conn::Cluster(mut c) => inv.invoke_async(&mut c).await,
            };
            match result {
                Ok(acked) if acked.len() == batch.len() => {
                    for (w, a) in batch.into_iter().zip(acked) {
                        let _ = w.done.send(Ok(a == 1));
                    }
                }
                Ok(acked) => {
                    let e = BrokerError::Protocol(format!(
                        "ack reply of {} items for {} acks",
                        acked.len(),
                        batch.len()
                    ));
                    for w in batch {
                        let _ = w.done.send(Err(for_each_waiter(&e)));
                    }
                }
                Err(e) => {
                    let e = from_redis("ack", e);
                    for w in batch {
                        let _ = w.done.send(Err(for_each_waiter(&e)));
                    }
                }
            }
        }
    }
}
