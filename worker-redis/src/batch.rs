//! Calls of one kind to one queue travel together. While one batch is on the wire, the
//! calls that arrive wait and go as the next batch: one round trip and one script call
//! for many of them under load, and no added wait when calls are sparse (a lone call
//! goes at once). Acks and enqueues are batched this way. Acks waiting behind a batch
//! may instead be taken by the next fetch of their queue, which carries them in its
//! own script call ([`Batches::take`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use worker_core::{BrokerError, JobId, LeaseToken};

use crate::broker::Conn;
use crate::error::{for_each_waiter, from_redis};
use crate::replicas::{self, WaitReplicas};
use crate::scripts;

/// An ack: the job and the token of its delivery.
pub(crate) type AckItem = (JobId, LeaseToken);
/// What an ack learns: `true` acked, `false` the token no longer owns the job.
pub(crate) type AckOutcome = bool;

/// One caller's enqueue to one queue: (id, envelope, delay in ms) of each job.
pub(crate) type EnqueueItem = Vec<(JobId, Vec<u8>, u64)>;
/// An enqueue's weight: its envelopes' bytes.
pub(crate) fn enqueue_bytes(item: &EnqueueItem) -> usize {
    item.iter().map(|(_, env, _)| env.len()).sum()
}

/// What an enqueue learns: `None` written, `Some(id)` refused as a duplicate of `id`
/// (nothing of that caller's jobs written).
pub(crate) type EnqueueOutcome = Option<String>;

struct Waiting<I, O> {
    item: I,
    done: oneshot::Sender<Result<O, BrokerError>>,
}

struct Queue<I, O> {
    waiting: Vec<Waiting<I, O>>,
}

/// Calls waiting to be sent, per queue. A queue has an entry exactly while a flush
/// task runs for it.
pub(crate) struct Batches<I, O> {
    queues: Mutex<HashMap<String, Queue<I, O>>>,
    /// Most calls in one script call.
    max: usize,
    /// Most weight (e.g. bytes) in one script call; a single call may exceed it.
    max_weight: usize,
    weight: fn(&I) -> usize,
}

impl<I, O> Batches<I, O> {
    /// At most `max` calls and about `max_weight` by `weight` per script call.
    pub(crate) fn new(max: usize, max_weight: usize, weight: fn(&I) -> usize) -> Self {
        Self {
            queues: Mutex::new(HashMap::new()),
            max,
            max_weight,
            weight,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Queue<I, O>>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue one call. Returns its outcome's receiver, and whether the caller must
    /// start the flush task (none is running for this queue).
    pub(crate) fn push(
        &self,
        queue: &str,
        item: I,
    ) -> (oneshot::Receiver<Result<O, BrokerError>>, bool) {
        let (done, rx) = oneshot::channel();
        let mut queues = self.lock();
        let start = !queues.contains_key(queue);
        queues
            .entry(queue.to_owned())
            .or_insert_with(|| Queue {
                waiting: Vec::new(),
            })
            .waiting
            .push(Waiting { item, done });
        (rx, start)
    }

    /// The next batch of `queue`, or `None` (and the flush task ends) when none waits.
    fn next_batch(&self, queue: &str) -> Option<Vec<Waiting<I, O>>> {
        let mut queues = self.lock();
        let q = queues.get_mut(queue)?;
        if q.waiting.is_empty() {
            queues.remove(queue);
            return None;
        }
        let n = self.batch_len(&q.waiting);
        Some(q.waiting.drain(..n).collect())
    }

    /// How many of `waiting`, from the front, fit in one script call.
    fn batch_len(&self, waiting: &[Waiting<I, O>]) -> usize {
        let mut n = 0;
        let mut weight = 0;
        for w in waiting.iter().take(self.max) {
            weight += (self.weight)(&w.item);
            if n > 0 && weight > self.max_weight {
                break;
            }
            n += 1;
        }
        n
    }

    /// The calls of `queue` waiting behind a batch on the wire, taken to travel with
    /// another script call now instead. The flush task, finding none left, ends.
    pub(crate) fn take(&self, queue: &str) -> Taken<I, O> {
        let mut queues = self.lock();
        let waiting = match queues.get_mut(queue) {
            Some(q) if !q.waiting.is_empty() => {
                let n = self.batch_len(&q.waiting);
                q.waiting.drain(..n).collect()
            }
            _ => Vec::new(),
        };
        Taken { waiting }
    }

    /// Fail every waiting call of `queue` with `error` (no connection to send them on).
    pub(crate) fn fail_all(&self, queue: &str, error: &BrokerError) {
        while let Some(batch) = self.next_batch(queue) {
            for w in batch {
                let _ = w.done.send(Err(for_each_waiter(error)));
            }
        }
    }

    /// Send batches of `queue` with `send` until none waits. `send` returns one
    /// outcome per item, in order.
    async fn flush_with<F, Fut>(self: Arc<Self>, queue: String, send: F)
    where
        F: Fn(Vec<&I>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<O>, BrokerError>>,
    {
        while let Some(batch) = self.next_batch(&queue) {
            let items: Vec<&I> = batch.iter().map(|w| &w.item).collect();
            let outcome = send(items).await;
            Taken { waiting: batch }.settle(outcome);
        }
    }
}

/// Calls taken from a queue's waiting list by [`Batches::take`]: the sender owes each
/// one its outcome through [`Taken::settle`].
pub(crate) struct Taken<I, O> {
    waiting: Vec<Waiting<I, O>>,
}

impl<I, O> Taken<I, O> {
    /// The calls, in order.
    pub(crate) fn items(&self) -> impl Iterator<Item = &I> {
        self.waiting.iter().map(|w| &w.item)
    }

    /// How many calls were taken.
    pub(crate) fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Hand each call its outcome: one per call, in order, or the error of the script
    /// call that carried them.
    pub(crate) fn settle(self, outcome: Result<Vec<O>, BrokerError>) {
        let n = self.waiting.len();
        let outcome = outcome.and_then(|outcomes| {
            if outcomes.len() == n {
                Ok(outcomes)
            } else {
                Err(BrokerError::Protocol(format!(
                    "reply of {} items for {n} calls",
                    outcomes.len()
                )))
            }
        });
        match outcome {
            Ok(outcomes) => {
                for (w, o) in self.waiting.into_iter().zip(outcomes) {
                    let _ = w.done.send(Ok(o));
                }
            }
            Err(e) => {
                for w in self.waiting {
                    let _ = w.done.send(Err(for_each_waiter(&e)));
                }
            }
        }
    }
}

async fn invoke<T: redis::FromRedisValue>(
    conn: &Conn,
    inv: &redis::ScriptInvocation<'_>,
) -> Result<T, redis::RedisError> {
    match conn.clone() {
        Conn::Single(mut c) => inv.invoke_async(&mut c).await,
        Conn::Cluster(mut c) => inv.invoke_async(&mut c).await,
    }
}

/// What an ack sends beside the job id: `|` and the token, the end of the meta of a
/// job leased with it (see `leased_by` in `lua/prelude.lua`).
pub(crate) fn ack_suffix(token: LeaseToken) -> String {
    format!("|{}", token.0)
}

/// Send acks of `queue` until none waits.
pub(crate) async fn flush_acks(
    batches: Arc<Batches<AckItem, AckOutcome>>,
    queue: String,
    conn: Conn,
    keys: Vec<String>,
) {
    let send = |items: Vec<&AckItem>| {
        let mut inv = scripts::ACK.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        for (id, token) in items {
            inv.arg(id.as_str()).arg(ack_suffix(*token));
        }
        let conn = conn.clone();
        async move {
            let acked: Vec<i64> = invoke(&conn, &inv)
                .await
                .map_err(|e| from_redis("ack", e))?;
            Ok(acked.into_iter().map(|a| a == 1).collect())
        }
    };
    batches.flush_with(queue, send).await;
}

/// Send enqueues of `queue` until none waits; with `wait`, each is acknowledged only
/// once that many replicas confirm it.
pub(crate) async fn flush_enqueues(
    batches: Arc<Batches<EnqueueItem, EnqueueOutcome>>,
    queue: String,
    conn: Conn,
    keys: Vec<String>,
    channel: String,
    wait: Option<WaitReplicas>,
) {
    let send = |items: Vec<&EnqueueItem>| {
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(2 + items.len() * 4);
        args.push(channel.clone().into_bytes());
        args.push(items.len().to_string().into_bytes());
        for group in &items {
            args.push(group.len().to_string().into_bytes());
        }
        for group in &items {
            for (id, env, delay) in group.iter() {
                args.push(id.as_str().as_bytes().to_vec());
                args.push(env.clone());
                args.push(delay.to_string().into_bytes());
            }
        }
        let conn = conn.clone();
        let keys = &keys;
        async move {
            let reply: Vec<String> =
                replicas::eval("enqueue", &conn, &scripts::ENQUEUE, keys, &args, wait).await?;
            // One item per group: empty when written, else the duplicate id.
            Ok(reply
                .into_iter()
                .map(|r| if r.is_empty() { None } else { Some(r) })
                .collect())
        }
    };
    batches.flush_with(queue, send).await;
}
