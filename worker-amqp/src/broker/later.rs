//! Delayed jobs, moved by workers rather than by RabbitMQ's dead-lettering.
//!
//! A delayed job (a retry with backoff, an enqueue with a delay) waits in one of its
//! work queue's later queues, `q.later.<level>`. Every job a level receives waits
//! there the same time, its hold ([`topology::later_hold`]: 250 ms × 4^level), so each
//! later queue is in the order its jobs are due to leave it. A mover consumes the
//! later queues of one work queue, keeps what it receives until its hold ends, then
//! moves it in one transaction (its copy published, its delivery acked): to the work
//! queue when it is due, else to the later queue its remaining delay calls for. A
//! process killed while it holds jobs leaves them in their later queue; RabbitMQ gives
//! them to another mover. Every process that consumes, fetches, counts or delays jobs
//! of a queue runs its mover, so a job moves on time while anything of its queue runs.
//!
//! The levels are declared together, the first time a job of the queue is delayed. A
//! mover that did not declare them looks for level 0 on the process's connection (a
//! passive declare, an error line in RabbitMQ's log when it is missing) at start and
//! then at growing intervals up to [`PROBE_MAX`]; once they exist it consumes them on
//! a connection of its own, so that a broker error there (RabbitMQ 3.10 answers a
//! consume of a quorum queue still starting with a connection error) takes no job of
//! a worker with it.
//!
//! RabbitMQ's dead-lettering moves a message at most once on a classic queue (it can
//! drop one when its node stops mid-move) and at least once on a quorum queue (it can
//! duplicate one); moves in transactions do neither. The later queues still carry a
//! message TTL and a dead-letter route to the work queue, a minute past their hold, as
//! the fallback for when no process of the queue runs at all.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::stream::{self, BoxStream, FuturesUnordered, SelectAll};
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::Channel;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use worker_core::job::now_ms;
use worker_core::{Backoff, BrokerError};

use super::{consumer_tag, Inner, Moved, Received, Target};
use crate::message::{decode_waiting, release_at};
use crate::session::{passive_count, Session};
use crate::settle::Settler;
use crate::topology;

/// How many jobs a mover holds at most per later queue.
const HAND: u16 = 1000;

/// How often a mover looks for later queues other processes declared: at first, and
/// at most while it finds none (each look at a missing queue is an error line in
/// RabbitMQ's log).
const PROBE: Duration = Duration::from_secs(5);
const PROBE_MAX: Duration = Duration::from_secs(300);

/// Between rounds that failed in a row: from 200 ms up to this.
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// What a mover counted for `depth`, with no move of its own in flight; it starts none
/// until this is dropped (or a few seconds passed), so that what `depth` counts next
/// (the work queue) agrees with it.
pub(super) struct Synced {
    /// Ready in the later queues it consumes.
    pub ready: u64,
    /// Received from them, not moved on yet.
    pub held: u64,
    /// The later queues it consumes.
    pub levels: Vec<usize>,
    _resume: oneshot::Sender<()>,
}

type SyncRequest = oneshot::Sender<Result<Synced, BrokerError>>;

/// How long a mover waits for `depth` to finish counting before it moves again.
const PAUSE_MAX: Duration = Duration::from_secs(2);

struct Handle {
    /// The later queues were declared in this process: the mover consumes them.
    found: mpsc::UnboundedSender<()>,
    /// `found` was sent.
    declared: AtomicBool,
    syncs: mpsc::UnboundedSender<SyncRequest>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The movers of this process, one per work queue.
#[derive(Default)]
pub(super) struct Movers {
    running: Mutex<HashMap<String, Handle>>,
    closed: AtomicBool,
}

impl Movers {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Handle>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start the mover of `queue` unless it runs; tell it that the later queues exist,
    /// when `declared`.
    /// `on`: the process moves delayed jobs at all ([`AmqpConfig::move_delayed`]).
    /// Called on every fetch: a running mover costs a lookup.
    ///
    /// [`AmqpConfig::move_delayed`]: crate::AmqpConfig::move_delayed
    pub(super) fn ensure(&self, inner: &Weak<Inner>, on: bool, queue: &str, declared: bool) {
        if !on || self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut running = self.running();
        if !running.contains_key(queue) {
            running.insert(queue.to_owned(), start(inner, queue));
        }
        let Some(handle) = running.get(queue) else {
            return;
        };
        if declared && !handle.declared.swap(true, Ordering::AcqRel) {
            let _ = handle.found.send(());
        }
    }

    /// What the mover of `queue` holds and sees ready, counted exactly; `None` when it
    /// does not run or is not connected.
    pub(super) async fn sync(&self, queue: &str) -> Option<Synced> {
        let (reply, answer) = oneshot::channel();
        self.running().get(queue)?.syncs.send(reply).ok()?;
        match tokio::time::timeout(PAUSE_MAX, answer).await {
            Ok(Ok(Ok(synced))) => Some(synced),
            Ok(Ok(Err(e))) => {
                tracing::debug!(queue, error = %worker_core::error::chain(&e), "amqp: the mover could not count its later queues");
                None
            }
            _ => None,
        }
    }

    /// Stop every mover and wait until each has settled what it was moving; what they
    /// held goes back to its later queue.
    pub(super) async fn stop(&self) {
        self.closed.store(true, Ordering::Release);
        let handles: Vec<Handle> = self.running().drain().map(|(_, h)| h).collect();
        for h in &handles {
            h.stop.cancel();
        }
        for h in handles {
            let _ = h.task.await;
        }
    }
}

/// Start the mover of `queue`.
fn start(inner: &Weak<Inner>, queue: &str) -> Handle {
    let (found, found_rx) = mpsc::unbounded_channel();
    let (syncs, syncs_rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(
        inner.clone(),
        queue.to_owned(),
        Inbox {
            found: found_rx,
            syncs: syncs_rx,
        },
        stop.clone(),
    ));
    Handle {
        found,
        declared: AtomicBool::new(false),
        syncs,
        stop,
        task,
    }
}

/// What a mover is told.
struct Inbox {
    found: mpsc::UnboundedReceiver<()>,
    syncs: mpsc::UnboundedReceiver<SyncRequest>,
}

/// How a mover's round ended.
enum Ended {
    Stopped,
    Lost(BrokerError),
}

async fn run(inner: Weak<Inner>, queue: String, mut inbox: Inbox, stop: CancellationToken) {
    let backoff = Backoff::new(Duration::from_millis(200), BACKOFF_CAP);
    let mut failures = 0;
    // The later queues exist, as far as this mover knows.
    let mut known = false;
    let mut probe_every = PROBE;
    let mut probe_channel = None;
    loop {
        if !known {
            // Until they exist, look for them on the process's own connection: a pool
            // that delays nothing opens no connection for moving.
            let session = match inner.upgrade() {
                Some(i) => i.sessions.get().await,
                None => return,
            };
            let found = match session {
                Ok(s) => probe_level(&s, &mut probe_channel, &queue, 0)
                    .await
                    .unwrap_or(false),
                Err(_) => false,
            };
            if found {
                known = true;
                probe_every = PROBE;
            } else {
                let wait = tokio::time::sleep(probe_every);
                tokio::pin!(wait);
                probe_every = (probe_every * 2).min(PROBE_MAX);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = &mut wait => break,
                        Some(()) = inbox.found.recv() => {
                            known = true;
                            break;
                        }
                        // Nothing held: `depth` counts the later queues by itself.
                        Some(reply) = inbox.syncs.recv() => drop(reply),
                    }
                }
                continue;
            }
        }
        if let Some(c) = probe_channel.take().filter(|c| c.status().connected()) {
            let _ = c.close(200, "found").await;
        }
        let session = match inner.upgrade() {
            Some(i) => i.movers.get().await,
            None => return,
        };
        let started = tokio::time::Instant::now();
        let why = match session {
            Ok(s) => match round(&inner, &s, &queue, &mut inbox, &stop, &mut known).await {
                Ended::Stopped => return,
                Ended::Lost(e) => e,
            },
            Err(e) => e,
        };
        failures = if started.elapsed() > BACKOFF_CAP {
            1
        } else {
            failures + 1
        };
        let wait = backoff.delay(failures);
        if why.is_transient() {
            tracing::debug!(queue, error = %worker_core::error::chain(&why), retry_in = ?wait, "amqp: moving delayed jobs paused");
        } else {
            tracing::warn!(queue, error = %worker_core::error::chain(&why), retry_in = ?wait, "amqp: cannot move delayed jobs (AMQP_MOVE_DELAYED=false turns it off where the user may only read)");
        }
        let pause = tokio::time::sleep(wait);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = &mut pause => break,
                // Not connected: nothing to count (the broker has what it held).
                Some(reply) = inbox.syncs.recv() => drop(reply),
            }
        }
    }
}

/// Held jobs by the end of their hold, then by arrival.
type Hand = BTreeMap<(u64, u64), Received>;

/// A move in flight: the job, and whether it could not be moved.
type Move = futures::future::BoxFuture<'static, (Received, Result<(), BrokerError>)>;

type Arrivals =
    SelectAll<BoxStream<'static, (usize, Option<lapin::Result<lapin::message::Delivery>>)>>;

/// One connection's worth of moving: consume the later queues of `queue` on a channel
/// of its own, keep each job until its hold ends, move it.
async fn round(
    weak: &Weak<Inner>,
    s: &Arc<Session>,
    queue: &str,
    inbox: &mut Inbox,
    stop: &CancellationToken,
    known: &mut bool,
) -> Ended {
    let Some(inner) = weak.upgrade() else {
        return Ended::Stopped;
    };
    let usable = inner.later_usable();
    let opened = inner.open_channel(s, &format!("{queue} later"), HAND).await;
    drop(inner);
    let (channel, settler) = match opened {
        Ok(c) => c,
        Err(e) => return Ended::Lost(e),
    };
    let mut arrivals: Arrivals = SelectAll::new();
    let mut consumed = vec![false; topology::LATER_LEVELS];
    let mut probe_channel: Option<Channel> = None;
    // Held jobs by the end of their hold (then by arrival).
    let mut hand = Hand::new();
    let mut seq = 0u64;
    let mut moving = FuturesUnordered::new();
    // Consume what this process declared at once; look for what others did now and
    // then, less often while there is nothing to find.
    if *known {
        for (level, done) in consumed.iter_mut().enumerate().take(usable) {
            if let Err(e) = consume(weak, s, &channel, &settler, queue, level, &mut arrivals).await
            {
                return finish(Ended::Lost(e), channel, moving).await;
            }
            *done = true;
        }
    }
    let mut probe_every = PROBE;
    let mut next_probe = tokio::time::Instant::now();
    let ended = loop {
        let next = hand.keys().next().map(|(at, _)| *at);
        let sleep = async {
            match next {
                Some(at) => {
                    let wait = Duration::from_millis(at.saturating_sub(now_ms()));
                    tokio::time::sleep(wait).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => break Ended::Stopped,
            Some(()) = inbox.found.recv() => {
                *known = true;
                next_probe = tokio::time::Instant::now();
            }
            () = tokio::time::sleep_until(next_probe) => {
                if !channel.status().connected() {
                    break Ended::Lost(super::protocol(format!("amqp: the channel moving delayed jobs of {queue} closed")));
                }
                if weak.strong_count() == 0 {
                    break Ended::Stopped;
                }
                let mut found = false;
                for (level, done) in consumed.iter_mut().enumerate().take(usable) {
                    if *done {
                        continue;
                    }
                    // Level 0 stands for all: they are declared together.
                    let exists = if *known && level > 0 {
                        Ok(true)
                    } else {
                        probe_level(s, &mut probe_channel, queue, level).await
                    };
                    match exists {
                        Ok(true) => {
                            *known = true;
                            found = true;
                            if let Err(e) = consume(weak, s, &channel, &settler, queue, level, &mut arrivals).await {
                                return finish(Ended::Lost(e), channel, moving).await;
                            }
                            *done = true;
                        }
                        Ok(false) if level == 0 => {
                            *known = false;
                            break;
                        }
                        Ok(false) => {}
                        Err(e) => return finish(Ended::Lost(e), channel, moving).await,
                    }
                }
                probe_every = if found { PROBE } else { (probe_every * 2).min(PROBE_MAX) };
                next_probe = tokio::time::Instant::now() + probe_every;
            }
            Some(reply) = inbox.syncs.recv() => {
                // Settle the moves in flight, so that each job counts in one place.
                let mut failed = None;
                while let Some((r, outcome)) = moving.next().await {
                    if let Err(e) = settled(r, outcome, queue) {
                        failed.get_or_insert(e);
                    }
                }
                if let Some(e) = failed {
                    drop(reply);
                    break Ended::Lost(e);
                }
                let levels: Vec<usize> = (0..consumed.len()).filter(|&l| consumed[l]).collect();
                let counted = {
                    let _calm = settler.calm().await;
                    // A passive declare on the consumer's channel answers after the broker
                    // looked at each queue; the no-op qos after every delivery the channel
                    // took from them by then.
                    let names: Vec<String> = levels.iter().map(|&l| topology::later_queue(queue, l)).collect();
                    let (counts, qos) = tokio::join!(
                        futures::future::join_all(names.iter().map(|n| passive_count(&channel, n))),
                        channel.basic_qos(HAND, BasicQosOptions::default())
                    );
                    qos.map_err(|e| crate::error::from_lapin("qos", e)).and_then(|()| {
                        counts.into_iter().try_fold(0, |sum, c| Ok(sum + c?.unwrap_or(0)))
                    })
                };
                let mut counted = counted;
                while let Some(Some((level, delivery))) = arrivals.next().now_or_never() {
                    if let Err(e) = arrive(&mut hand, &mut seq, &mut consumed, level, delivery, &channel, &settler, s.gen, queue) {
                        counted = Err(e);
                        break;
                    }
                }
                match counted {
                    Ok(ready) => {
                        let (resume, resumed) = oneshot::channel();
                        let synced = Synced { ready, held: hand.len() as u64, levels, _resume: resume };
                        if reply.send(Ok(synced)).is_ok() {
                            let _ = tokio::time::timeout(PAUSE_MAX, resumed).await;
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(super::protocol(format!(
                            "amqp: counting the later queues of {queue} failed: {}",
                            worker_core::error::chain(&e)
                        ))));
                        break Ended::Lost(e);
                    }
                }
            }
            Some((level, delivery)) = arrivals.next(), if !arrivals.is_empty() => {
                if let Err(e) = arrive(&mut hand, &mut seq, &mut consumed, level, delivery, &channel, &settler, s.gen, queue) {
                    break Ended::Lost(e);
                }
            }
            () = sleep => {
                let now = now_ms();
                let Some(inner) = weak.upgrade() else { break Ended::Stopped };
                while let Some(entry) = hand.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    let r = entry.remove();
                    moving.push(move_on(inner.clone(), s.clone(), r));
                }
            }
            Some((r, outcome)) = moving.next(), if !moving.is_empty() => {
                if let Err(e) = settled(r, outcome, queue) {
                    break Ended::Lost(e);
                }
            }
        }
    };
    finish(ended, channel, moving).await
}

/// Hold what a later queue delivered until its hold ends; note a cancelled consumer.
#[allow(clippy::too_many_arguments)]
fn arrive(
    hand: &mut Hand,
    seq: &mut u64,
    consumed: &mut [bool],
    level: usize,
    delivery: Option<lapin::Result<lapin::message::Delivery>>,
    channel: &Channel,
    settler: &Settler,
    gen: u64,
    queue: &str,
) -> Result<(), BrokerError> {
    match delivery {
        Some(Ok(d)) => {
            let env = decode_waiting(queue, d.data, &d.properties).envelope;
            let at = release_at(&d.properties, &env);
            *seq += 1;
            hand.insert(
                (at, *seq),
                Received {
                    tag: d.delivery_tag,
                    channel: channel.clone(),
                    settler: settler.clone(),
                    gen,
                    envelope: env,
                },
            );
            Ok(())
        }
        Some(Err(e)) => Err(crate::error::from_lapin(
            &format!("receive from the later queues of {queue}"),
            e,
        )),
        None => {
            // The broker cancelled the consumer (its queue expired or was deleted):
            // the next probe looks for the queue again.
            consumed[level] = false;
            Ok(())
        }
    }
}

/// Note how a move ended. A job whose target could not be declared (the connection
/// failed, or this process may not declare or write there) ends the round: what the
/// mover holds goes back to its later queue, for another process to move.
fn settled(r: Received, outcome: Result<(), BrokerError>, queue: &str) -> Result<(), BrokerError> {
    outcome.inspect_err(|e| {
        tracing::warn!(job = %r.envelope.id, queue, error = %worker_core::error::chain(e), "amqp: cannot move a delayed job on; what this process holds of the later queues goes back to them");
    })
}

/// Let the moves in flight settle, then close the channel: what it still holds goes
/// back to its later queue.
async fn finish(ended: Ended, channel: Channel, mut moving: FuturesUnordered<Move>) -> Ended {
    while moving.next().await.is_some() {}
    if channel.status().connected() {
        let _ = channel.close(200, "mover stopped").await;
    }
    ended
}

/// Whether later queue `level` of `queue` exists, by a passive declare on a channel
/// kept for it (the broker closes it when the queue does not exist).
async fn probe_level(
    s: &Session,
    slot: &mut Option<Channel>,
    queue: &str,
    level: usize,
) -> Result<bool, BrokerError> {
    let ch = match slot.as_ref().filter(|c| c.status().connected()) {
        Some(c) => c.clone(),
        None => {
            let c = s
                .conn
                .create_channel()
                .await
                .map_err(|e| crate::error::from_lapin("open channel", e))?;
            *slot = Some(c.clone());
            c
        }
    };
    Ok(passive_count(&ch, &topology::later_queue(queue, level))
        .await?
        .is_some())
}

/// Consume later queue `level` of `queue` on the mover's `channel`.
async fn consume(
    weak: &Weak<Inner>,
    s: &Session,
    channel: &Channel,
    settler: &Settler,
    queue: &str,
    level: usize,
    arrivals: &mut Arrivals,
) -> Result<(), BrokerError> {
    let name = topology::later_queue(queue, level);
    let args = weak
        .upgrade()
        .map(|i| i.consumer_args())
        .unwrap_or_default();
    let consumer = {
        let _calm = settler.calm().await;
        channel
            .basic_consume(&name, &consumer_tag(), BasicConsumeOptions::default(), args)
            .await
            .map_err(|e| crate::error::from_lapin(&format!("consume {name}"), e))?
    };
    tracing::debug!(queue, later = %name, gen = s.gen, "amqp: moving delayed jobs");
    let tagged = consumer
        .map(move |d| (level, Some(d)))
        .chain(stream::once(async move { (level, None) }));
    arrivals.push(tagged.boxed());
    Ok(())
}

/// Move `r`, whose hold has ended: to its work queue when due, else to the later queue
/// its remaining delay calls for. `Err` leaves `r` held as it was.
fn move_on(inner: Arc<Inner>, s: Arc<Session>, r: Received) -> Move {
    async move {
        let env = r.envelope.clone();
        let left = Duration::from_millis(env.due_at_ms.saturating_sub(now_ms()));
        let target = if left < Duration::from_millis(1) {
            Target::Queue
        } else {
            Target::Delayed(left)
        };
        let outcome = match inner.move_to(&s, &r, target, &env).await {
            Ok(Moved::Stored) => {
                tracing::trace!(job = %env.id, queue = %env.queue, "amqp: delayed job moved on");
                Ok(())
            }
            // The broker holds the job: its delivery goes back to the later queue.
            Ok(Moved::NotCommitted) => Ok(()),
            // Published again from this process at each reap and at close.
            Ok(Moved::Kept(_)) => Ok(()),
            Err(e) => Err(e),
        };
        (r, outcome)
    }
    .boxed()
}
