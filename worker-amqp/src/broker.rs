//! [`AmqpBroker`]: the `Broker` contract on RabbitMQ.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Consumer};
use tokio::sync::Notify;
use worker_core::job::now_ms;
use worker_core::{
    Broker, BrokerError, DeadLetter, Delivery, Envelope, FetchPlan, JobId, Lease, LeaseToken,
    NewJob, QueueDepth, WorkerInfo,
};

use crate::config::{AmqpConfig, FetchMode};
use crate::error::{from_lapin, is_ack_timeout};
use crate::management::Management;
use crate::message::{dead_fields, decode, properties, release_field};
use crate::session::{passive_count, Session, Sessions};
use crate::settle::{Copy, SettleError, Settler};
use crate::topology::{self, QueueType};

mod get;
mod later;
mod ready;

/// How long `close` tries to reach the broker to store copies it refused before.
const STRANDED_CLOSE_WAIT: Duration = Duration::from_secs(10);

/// How long a fetch waits for deliveries the broker has said are on their way.
const ARRIVAL_WAIT: Duration = Duration::from_millis(200);

/// How long a registry listing waits before it reads an empty worker queue again.
const REGISTRY_LOOK_AGAIN: Duration = Duration::from_millis(20);

/// How long a fetch that holds nothing waits for a delivery already owed to it (the
/// consumer has room under its prefetch) before it asks the broker what is ready.
const OWED_WAIT: Duration = Duration::from_millis(2);

/// A delivery received from RabbitMQ and not settled yet.
struct Received {
    tag: u64,
    channel: Channel,
    /// Commits the settles of `channel`.
    settler: Settler,
    gen: u64,
    envelope: Envelope,
}

/// A delivery handed out by `fetch`, under its lease token.
struct Held {
    received: Received,
    deadline: Instant,
}

/// Where a published job goes.
#[derive(Clone, Copy)]
enum Target<'a> {
    /// Its work queue.
    Queue,
    /// Its work queue after this delay (through its later queues).
    Delayed(Duration),
    /// Its dead-letter queue, with this reason.
    Dead(&'a str),
}

struct Consuming {
    gen: u64,
    channel: Channel,
    settler: Settler,
    consumer: Consumer,
    tag: String,
}

#[derive(Default)]
struct QueueState {
    /// Shared with a fetch or wait polling it, cheaply.
    consuming: Option<Arc<Consuming>>,
    /// Received, not handed out yet, oldest first.
    ready: VecDeque<Received>,
    /// `stop_fetching` was called: consume no more.
    stopped: bool,
}

/// What became of a job moved in a transaction.
enum Moved {
    /// The broker holds its copy, and its delivery is acked.
    Stored,
    /// The commit did not take effect, or its answer was lost: the broker holds the
    /// job either way (its delivery, given to a consumer again, or its copy).
    NotCommitted,
    /// The delivery is acked and the broker refused the copy: this process keeps the
    /// copy and publishes it again at each reap (see `Inner::strand`).
    Kept(BrokerError),
}

/// A job's copy the broker refused after its delivery was acked: it exists only here
/// until a publish of it is confirmed.
struct Stranded {
    id: JobId,
    queue: String,
    route: String,
    props: BasicProperties,
    payload: bytes::Bytes,
}

/// How long this process remembers a job it held unstarted when its channel closed.
const RETURNED_KEPT: Duration = Duration::from_secs(3600);

/// At most this many such jobs are remembered.
const RETURNED_MAX: usize = 65_536;

/// Jobs this process received and never started, on a channel that closed since. The
/// broker gives each to a consumer again marked redelivered (on a quorum queue, its
/// `x-delivery-count` raised), which reads as an attempt spent; when this process gets
/// one back, it takes that attempt back.
#[derive(Default)]
struct Returned(HashMap<(String, JobId), (u32, Instant)>);

impl Returned {
    /// Drop from `ready` what a closed channel held (the broker has it back), noting each.
    fn drop_closed(&mut self, ready: &mut VecDeque<Received>) {
        let mut closed = Vec::new();
        ready.retain(|r| {
            let open = r.channel.status().connected();
            if !open {
                closed.push((
                    r.envelope.queue.clone(),
                    r.envelope.id.clone(),
                    r.envelope.attempt,
                ));
            }
            open
        });
        for (queue, id, attempt) in closed {
            self.note(queue, id, attempt);
        }
    }

    /// Note that the job `id` of `queue`, at `attempt`, went back unstarted.
    fn note(&mut self, queue: String, id: JobId, attempt: u32) {
        if self.0.len() >= RETURNED_MAX {
            self.0.retain(|_, (_, at)| at.elapsed() < RETURNED_KEPT);
            if self.0.len() >= RETURNED_MAX {
                // Jobs other processes took long ago: nothing to take back for them.
                self.0.clear();
            }
        }
        self.0.insert((queue, id), (attempt, Instant::now()));
    }

    /// Take back the attempt the broker counted for `env`'s unstarted return, if this
    /// process returned it.
    fn correct(&mut self, env: &mut Envelope) {
        if let Some((attempt, at)) = self.0.remove(&(env.queue.clone(), env.id.clone())) {
            if at.elapsed() < RETURNED_KEPT {
                // One return is ours; any other (a crash elsewhere) still counts.
                env.attempt = env.attempt.saturating_sub(1).max(attempt);
            }
        }
    }
}

#[derive(Default)]
struct State {
    queues: HashMap<String, QueueState>,
    /// Jobs returned unstarted when their channel closed.
    returned: Returned,
    leases: HashMap<LeaseToken, Held>,
    /// Copies refused by the broker, published again at each reap and at close.
    stranded: Vec<Stranded>,
    /// Get mode: the channel of every get and doorbell.
    pull: Option<get::PullChannel>,
}

impl State {
    /// How many deliveries each of `queues` has ready here.
    fn ready_counts(&self, queues: &[String]) -> Vec<u64> {
        queues
            .iter()
            .map(|q| self.queues.get(q).map_or(0, |qs| qs.ready.len() as u64))
            .collect()
    }

    /// Lease `r` until `deadline`: the delivery the runtime gets.
    fn lease(&mut self, r: Received, deadline: Instant) -> Delivery {
        let token = LeaseToken::random();
        let delivery = Delivery::new(r.envelope.clone(), token);
        self.leases.insert(
            token,
            Held {
                received: r,
                deadline,
            },
        );
        delivery
    }
}

struct Inner {
    /// This, for the tasks it starts.
    me: Weak<Inner>,
    config: AmqpConfig,
    sessions: Sessions,
    /// The connection that moves delayed jobs: apart, so that a broker error on it
    /// (RabbitMQ 3.10 fails a consume of a quorum queue still starting with a
    /// connection error) takes no delivery of a worker with it.
    movers: Sessions,
    management: Option<Management>,
    state: Mutex<State>,
    arrived: Notify,
    /// Get mode: one doorbell change at a time.
    turn: tokio::sync::Mutex<()>,
    /// Get mode: fetches in progress.
    fetching: std::sync::atomic::AtomicUsize,
    /// Move delayed jobs on when their time comes.
    later: later::Movers,
}

/// A [`Broker`] on RabbitMQ.
///
/// Each consumed queue has one consumer on its own channel with manual acks and a
/// prefetch of [`AmqpConfig::prefetch`]: RabbitMQ sends at most that many deliveries
/// ahead, counting those running, and `fetch` hands them out. Enqueues, retries and
/// dead letters are published with confirms: each returns once the broker has the
/// message. See the crate documentation for where AMQP's semantics differ from the
/// contract.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use worker_amqp::{AmqpBroker, AmqpConfig};
/// use worker_core::{Broker, NewJob};
///
/// let broker = AmqpConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .prefetch(16)
///     .connect()
///     .await?;
/// broker.enqueue(vec![NewJob::json("emails", &"hello")?]).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("config", &self.inner.config)
            .finish()
    }
}

impl AmqpConfig {
    /// Connect (once, to check the settings; later losses reconnect by themselves).
    pub async fn connect(self) -> Result<AmqpBroker, BrokerError> {
        let management = match &self.management_url {
            Some(url) => Some(Management::new(url, &self.vhost())?),
            None => None,
        };
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            later: later::Movers::default(),
            sessions: Sessions::new(self.clone(), None),
            movers: Sessions::new(self.clone(), Some("delayed jobs")),
            config: self,
            management,
            state: Mutex::new(State::default()),
            arrived: Notify::new(),
            turn: tokio::sync::Mutex::new(()),
            fetching: std::sync::atomic::AtomicUsize::new(0),
        });
        inner.sessions.get().await?;
        for warning in inner.config.consumer_timeout_warnings() {
            tracing::warn!("amqp: {warning}");
        }
        Ok(AmqpBroker { inner })
    }
}

impl AmqpBroker {
    /// Connect to `url` with default settings.
    pub async fn connect(url: &str) -> Result<Self, BrokerError> {
        AmqpConfig::new(url).connect().await
    }

    /// The settings in use.
    pub fn config(&self) -> &AmqpConfig {
        &self.inner.config
    }
}

/// A consumer tag of this process.
fn consumer_tag() -> String {
    format!("wp-{}-{:08x}", std::process::id(), fastrand::u32(..))
}

fn protocol(what: impl Into<String>) -> BrokerError {
    BrokerError::Protocol(what.into())
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kind(&self, queue: &str) -> QueueType {
        self.config.type_of(queue)
    }

    /// Declare `queue` and its dead-letter queue on `s`.
    async fn declare_work(&self, s: &Session, queue: &str) -> Result<(), BrokerError> {
        let kind = self.kind(queue);
        s.declare(queue, topology::work_args(kind), Duration::MAX)
            .await?;
        s.declare(
            &topology::dead_queue(queue),
            topology::dead_args(kind),
            Duration::MAX,
        )
        .await
    }

    /// How many later queues a job may wait in: the hold of each is well under the
    /// consumer timeout, since a mover holds a job unacked while it waits.
    fn later_usable(&self) -> usize {
        let limit = self.config.consumer_timeout_in_effect();
        (1..topology::LATER_LEVELS)
            .take_while(|&l| {
                let hold = topology::later_hold(l);
                hold + hold / 4 <= limit
            })
            .count()
            + 1
    }

    /// Start moving the delayed jobs of `queue` in this process, unless it does.
    fn move_delayed(&self, queue: &str) {
        self.later
            .ensure(&self.me, self.config.move_delayed, queue, false);
    }

    /// The later queue for a job of `queue` due in `delay`, declared, and when its hold
    /// there ends.
    async fn declare_later(
        &self,
        s: &Session,
        queue: &str,
        delay: Duration,
    ) -> Result<(String, u64), BrokerError> {
        let usable = self.later_usable();
        // All or none: a mover that finds level 0 consumes every level.
        for l in 0..usable {
            s.declare(
                &topology::later_queue(queue, l),
                topology::later_args(self.kind(queue), queue, l),
                topology::LATER_REDECLARE,
            )
            .await?;
        }
        self.later
            .ensure(&self.me, self.config.move_delayed, queue, true);
        let level = topology::later_level(delay, usable);
        let name = topology::later_queue(queue, level);
        let hold = delay.min(topology::later_hold(level));
        Ok((name, now_ms() + hold.as_millis() as u64))
    }

    /// Where `env` goes for `target` and the properties it carries there, declaring
    /// that queue (and its work queue) first.
    async fn route(
        &self,
        s: &Session,
        target: Target<'_>,
        env: &Envelope,
    ) -> Result<(String, BasicProperties), BrokerError> {
        let queue = env.queue.as_str();
        // A later queue dead-letters into the work queue (its fallback), and RabbitMQ
        // drops a message routed to a queue that does not exist yet.
        self.declare_work(s, queue).await?;
        Ok(match target {
            Target::Delayed(d) if !d.is_zero() => {
                let (name, release) = self.declare_later(s, queue, d).await?;
                (name, properties(env, &[release_field(release)]))
            }
            Target::Queue | Target::Delayed(_) => (queue.to_owned(), properties(env, &[])),
            Target::Dead(reason) => (
                topology::dead_queue(queue),
                properties(env, &dead_fields(reason, now_ms())),
            ),
        })
    }

    /// Put `env` on the wire to where `target` says, declaring that queue first;
    /// the returned confirm resolves when the broker has it.
    async fn send(
        &self,
        s: &Session,
        target: Target<'_>,
        env: &Envelope,
    ) -> Result<lapin::publisher_confirm::PublisherConfirm, BrokerError> {
        let (route, props) = self.route(s, target, env).await?;
        s.publisher
            .basic_publish(
                "",
                &route,
                BasicPublishOptions::default(),
                &env.payload,
                props,
            )
            .await
            .map_err(|e| self.failed(s, "publish", e))
    }

    /// Publish `env` to `target` and wait for the broker's confirm.
    async fn publish(
        &self,
        s: &Session,
        target: Target<'_>,
        env: &Envelope,
    ) -> Result<(), BrokerError> {
        let confirm = self.send(s, target, env).await?;
        confirmed(confirm.await.map_err(|e| self.failed(s, "publish", e))?)
    }

    /// Move `r` to `target` as `env`: its copy published and its delivery acked in one
    /// transaction (see [`crate::settle`]). `Err` (the target could not be declared)
    /// leaves `r` as it was; otherwise the caller holds `r` no more.
    async fn move_to(
        &self,
        s: &Session,
        r: &Received,
        target: Target<'_>,
        env: &Envelope,
    ) -> Result<Moved, BrokerError> {
        let (route, props) = self.route(s, target, env).await?;
        let copy = Copy {
            route,
            payload: env.payload.to_vec(),
            props,
        };
        let kept = Stranded {
            id: env.id.clone(),
            queue: env.queue.clone(),
            route: copy.route.clone(),
            props: copy.props.clone(),
            payload: env.payload.clone(),
        };
        match r.settler.settle(r.tag, Some(copy)).await {
            Ok(()) => Ok(Moved::Stored),
            Err(SettleError::Failed(e)) => {
                tracing::debug!(job = %env.id, error = %e, "amqp: move not committed; the broker holds the job");
                Ok(Moved::NotCommitted)
            }
            Err(e @ SettleError::Refused(_)) => {
                tracing::warn!(job = %env.id, queue = %env.queue, error = %worker_core::error::chain(&e), "amqp: the job's copy was refused; publishing it again from this worker");
                Ok(match self.strand(s, kept).await {
                    Ok(()) => Moved::Stored,
                    Err(e) => Moved::Kept(e),
                })
            }
        }
    }

    /// Settle `lease` by moving its job, changed by `change`, to `target`. If the
    /// target cannot be declared the lease stays held and nothing changed.
    async fn replace(
        &self,
        lease: &Lease,
        target: Target<'_>,
        change: impl FnOnce(&mut Envelope),
    ) -> Result<(), BrokerError> {
        let held = self.take_lease(lease)?;
        if !held.received.channel.status().connected() {
            return Err(lost(lease));
        }
        let mut env = held.received.envelope.clone();
        change(&mut env);
        let moved = match self.sessions.get().await {
            Ok(s) => self.move_to(&s, &held.received, target, &env).await,
            Err(e) => Err(e),
        };
        match moved {
            // A kept copy is this worker's to store: the lease is settled.
            Ok(Moved::Stored | Moved::Kept(_)) => Ok(()),
            Ok(Moved::NotCommitted) => Err(lost(lease)),
            Err(e) => {
                self.put_lease(lease.token, held);
                Err(e)
            }
        }
    }

    /// Map a lapin error, noting a lost connection so the next call reconnects.
    fn failed(&self, s: &Session, op: &str, e: lapin::Error) -> BrokerError {
        if !s.alive() {
            self.sessions.lost(s.gen);
            self.arrived.notify_waiters();
        }
        from_lapin(op, e)
    }

    /// Start consuming each of `queues` that is not consumed on the current session.
    async fn ensure_consuming(&self, s: &Session, queues: &[String]) -> Result<(), BrokerError> {
        for q in queues {
            self.move_delayed(q);
            let (needed, old) = {
                let mut guard = self.state();
                let State {
                    queues, returned, ..
                } = &mut *guard;
                let qs = queues.entry(q.clone()).or_default();
                if qs.stopped {
                    (false, None)
                } else {
                    let current = qs
                        .consuming
                        .as_ref()
                        .is_some_and(|c| c.gen == s.gen && c.channel.status().connected());
                    let mut old = None;
                    if !current {
                        // What an earlier connection or channel held, the broker
                        // gives to a consumer again.
                        old = qs.consuming.take();
                        returned.drop_closed(&mut qs.ready);
                    }
                    (!current, old)
                }
            };
            if let Some(old) = old {
                self.forget_consumer(q, &old);
            }
            if needed {
                self.consume(s, q).await?;
            }
        }
        Ok(())
    }

    /// Note what the closed consumer `c` of `queue` received and nobody took: the
    /// broker has each back, and this process never started it.
    fn forget_consumer(&self, queue: &str, c: &Consuming) {
        if c.channel.status().connected() {
            return;
        }
        let mut consumer = c.consumer.clone();
        while let Some(Some(Ok(d))) = consumer.next().now_or_never() {
            let env = decode(queue, d.data, &d.properties, d.redelivered).envelope;
            self.state().returned.note(env.queue, env.id, env.attempt);
        }
    }

    /// The arguments of every consumer: the consumer timeout, when one is set.
    fn consumer_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if let Some(limit) = self.config.consumer_timeout {
            // Honoured from RabbitMQ 3.12 (3.11.15); older brokers ignore it.
            let ms = i64::try_from(limit.as_millis()).unwrap_or(i64::MAX);
            args.insert("x-consumer-timeout".into(), AMQPValue::LongLongInt(ms));
        }
        args
    }

    /// A new channel on `s` whose consumers get `prefetch`, for `what` (a queue's
    /// consumer, or get mode's), in transaction mode with its settler. A close by the
    /// broker for the consumer timeout is logged the moment it comes, whether or not a
    /// fetch is waiting on the channel.
    async fn open_channel(
        &self,
        s: &Session,
        what: &str,
        prefetch: u16,
    ) -> Result<(Channel, Settler), BrokerError> {
        let channel = s
            .conn
            .create_channel()
            .await
            .map_err(|e| self.failed(s, "open channel", e))?;
        let what = what.to_owned();
        let limit = self.config.consumer_timeout_in_effect();
        channel.on_error(move |e| {
            if is_ack_timeout(&e) {
                tracing::error!(
                    channel = %what,
                    error = %e,
                    consumer_timeout = ?limit,
                    "amqp: RabbitMQ closed the channel because a delivery stayed unacknowledged \
                     past its consumer timeout; the broker delivers that channel's jobs again. \
                     Set WORKER_JOB_TIMEOUT below the consumer timeout, or raise it \
                     (AMQP_CONSUMER_TIMEOUT on RabbitMQ 3.12 or later, else the broker's \
                     consumer_timeout or the queue's consumer-timeout policy)"
                );
            }
        });
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| self.failed(s, "qos", e))?;
        let settler = Settler::start(&channel)
            .await
            .map_err(|e| self.failed(s, "tx.select", e))?;
        Ok((channel, settler))
    }

    async fn consume(&self, s: &Session, queue: &str) -> Result<(), BrokerError> {
        topology::check_queue(queue)?;
        self.declare_work(s, queue).await?;
        let (channel, settler) = self.open_channel(s, queue, self.config.prefetch).await?;
        let tag = consumer_tag();
        let args = self.consumer_args();
        let consumer = channel
            .basic_consume(queue, &tag, BasicConsumeOptions::default(), args)
            .await
            .map_err(|e| self.failed(s, &format!("consume {queue}"), e))?;
        let unneeded = {
            let mut st = self.state();
            let qs = st.queues.entry(queue.to_owned()).or_default();
            if qs.stopped || qs.consuming.is_some() {
                // Stopped, or another call won the race: this consumer is not needed.
                Some(channel)
            } else {
                tracing::debug!(
                    queue,
                    tag,
                    prefetch = self.config.prefetch,
                    "amqp: consuming"
                );
                qs.consuming = Some(Arc::new(Consuming {
                    gen: s.gen,
                    channel,
                    settler,
                    consumer,
                    tag,
                }));
                None
            }
        };
        if let Some(channel) = unneeded {
            let _ = channel.close(200, "not needed").await;
        }
        Ok(())
    }

    /// Move what the consumer of `queue` has received into its ready list, without
    /// waiting. Returns how many moved.
    fn pull(&self, queue: &str) -> usize {
        let from = {
            let st = self.state();
            match st.queues.get(queue).and_then(|q| q.consuming.as_ref()) {
                Some(c) => c.clone(),
                None => return 0,
            }
        };
        let mut consumer = from.consumer.clone();
        let mut moved = 0;
        while let Some(item) = consumer.next().now_or_never() {
            let more = matches!(item, Some(Ok(_)));
            self.accept(queue, &from, item);
            if !more {
                break;
            }
            moved += 1;
        }
        moved
    }

    /// Put what the consumer `from` of `queue` yielded where it belongs: a delivery at
    /// the back of the ready list; an error or the consumer's end drops the consumer,
    /// to be started again (the broker redelivers what it held).
    fn accept(
        &self,
        queue: &str,
        from: &Consuming,
        item: Option<lapin::Result<lapin::message::Delivery>>,
    ) {
        let mut guard = self.state();
        let State {
            queues, returned, ..
        } = &mut *guard;
        let Some(qs) = queues.get_mut(queue) else {
            // Every consumed queue has its state from the consume on.
            return;
        };
        let current = qs.consuming.as_ref().is_some_and(|c| c.tag == from.tag);
        match item {
            Some(Ok(d)) if current || from.channel.status().connected() => {
                // From a consumer being cancelled, on a channel still open, the job is
                // ours all the same: whoever cancels hands it out or back.
                let mut envelope = decode(queue, d.data, &d.properties, d.redelivered).envelope;
                returned.correct(&mut envelope);
                let received = Received {
                    tag: d.delivery_tag,
                    channel: from.channel.clone(),
                    settler: from.settler.clone(),
                    gen: from.gen,
                    envelope,
                };
                qs.ready.push_back(received);
            }
            Some(Ok(d)) => {
                // From a consumer already replaced whose channel is closed: the broker
                // delivers the message again, and this process never started it.
                let env = decode(queue, d.data, &d.properties, d.redelivered).envelope;
                returned.note(env.queue, env.id, env.attempt);
            }
            _ if !current => {}
            Some(Err(e)) if is_ack_timeout(&e) => {
                // Logged by the channel's error handler when the broker closed it.
                qs.consuming = None;
                returned.drop_closed(&mut qs.ready);
            }
            Some(Err(e)) => {
                tracing::warn!(queue, error = %e, "amqp: consumer failed; it will be restarted");
                qs.consuming = None;
                returned.drop_closed(&mut qs.ready);
            }
            None => {
                tracing::warn!(queue, "amqp: the broker cancelled the consumer (queue deleted?); it will be restarted");
                qs.consuming = None;
                returned.drop_closed(&mut qs.ready);
            }
        }
    }

    /// Move what the consumer `c` of `queue` received before its cancel-ok (after it
    /// nothing more arrives) to the ready list.
    fn take_cancelled(&self, queue: &str, c: &Consuming) {
        let mut consumer = c.consumer.clone();
        while let Some(Some(Ok(d))) = consumer.next().now_or_never() {
            let mut st = self.state();
            let mut envelope = decode(queue, d.data, &d.properties, d.redelivered).envelope;
            st.returned.correct(&mut envelope);
            let received = Received {
                tag: d.delivery_tag,
                channel: c.channel.clone(),
                settler: c.settler.clone(),
                gen: c.gen,
                envelope,
            };
            let qs = st.queues.entry(queue.to_owned()).or_default();
            qs.ready.push_back(received);
        }
    }

    /// Make the ready list of `queue` exact: every delivery the broker sent before this
    /// call is in it. Returns the count still ready in the broker.
    ///
    /// A passive declare on the consumer's own channel answers after the broker has
    /// looked at the queue; a second call on the same channel (a no-op qos) answers
    /// after every delivery the channel had taken from the queue by then.
    async fn sync(&self, s: &Session, queue: &str) -> Result<u64, BrokerError> {
        // A consumer on a closed channel holds nothing: the broker's count is exact.
        let channel = {
            let st = self.state();
            st.queues
                .get(queue)
                .and_then(|q| q.consuming.as_ref())
                .filter(|c| c.channel.status().connected())
                .map(|c| (c.channel.clone(), c.settler.clone()))
        };
        let Some((channel, settler)) = channel else {
            return Ok(s.ready_count(queue).await?.unwrap_or(0));
        };
        let calm = settler.calm().await;
        // Both on the wire before either answer is awaited: one round trip.
        let (ready, qos) = tokio::join!(
            passive_count(&channel, queue),
            channel.basic_qos(self.config.prefetch, BasicQosOptions::default())
        );
        drop(calm);
        let ready = ready?.unwrap_or(0);
        qos.map_err(|e| self.failed(s, "qos", e))?;
        self.pull(queue);
        Ok(ready)
    }

    /// Deliveries of `queue` this process holds (ready and leased) on its current
    /// consumer: the broker sends no more while it equals the prefetch.
    fn held_on_consumer(&self, queue: &str) -> usize {
        let st = self.state();
        let Some(qs) = st.queues.get(queue) else {
            return 0;
        };
        let Some(c) = qs.consuming.as_ref() else {
            return 0;
        };
        let leased = st
            .leases
            .values()
            .filter(|h| h.received.gen == c.gen && h.received.channel.id() == c.channel.id())
            .count();
        qs.ready.len() + leased
    }

    fn ready_len(&self, queue: &str) -> usize {
        self.state().queues.get(queue).map_or(0, |q| q.ready.len())
    }

    /// Wait until a delivery arrives on any of `queues`' consumers (it goes to its
    /// ready list), the connection is lost, or `deadline`.
    async fn arrival(&self, queues: &[String], deadline: tokio::time::Instant) {
        let consumers: Vec<(String, Arc<Consuming>)> = {
            let st = self.state();
            queues
                .iter()
                .filter_map(|q| {
                    st.queues
                        .get(q)
                        .and_then(|qs| qs.consuming.as_ref())
                        .map(|c| (q.clone(), c.clone()))
                })
                .collect()
        };
        if consumers.is_empty() {
            tokio::time::sleep_until(deadline).await;
            return;
        }
        // A pending `next()` that is dropped takes nothing: only the winner's item is
        // taken, and it goes to the ready list.
        let next = futures::future::select_all(consumers.into_iter().map(|(q, from)| {
            Box::pin(async move {
                let mut c = from.consumer.clone();
                let item = c.next().await;
                (q, from, item)
            })
        }));
        tokio::select! {
            ((q, from, item), _, _) = next => self.accept(&q, &from, item),
            _ = self.arrived.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }

    /// Give `r` back to the broker for another worker: moved to its queue with its
    /// attempt unchanged. (A requeue through AMQP would mark it redelivered, which
    /// counts an attempt.) When its queue cannot be declared, `r` is still held and
    /// comes back with the error, for the caller to keep.
    async fn hand_back(&self, s: &Session, r: Received) -> Result<(), (BrokerError, Received)> {
        if !r.channel.status().connected() {
            // The broker already took it back when that channel closed.
            let e = &r.envelope;
            self.state()
                .returned
                .note(e.queue.clone(), e.id.clone(), e.attempt);
            return Ok(());
        }
        let env = r.envelope.clone();
        match self.move_to(s, &r, Target::Queue, &env).await {
            Ok(_) => Ok(()),
            Err(e) => Err((e, r)),
        }
    }

    /// Lease what the ready lists of `queues` (the plan's, in order) hold, as `plan`
    /// divides it.
    fn hand_out(&self, plan: &FetchPlan, queues: &[String]) -> Vec<Delivery> {
        let lease_until = Instant::now() + plan.lease;
        let mut st = self.state();
        let take = plan.allocate(&st.ready_counts(queues));
        let mut out = Vec::with_capacity(take.iter().sum::<u32>() as usize);
        for (q, n) in queues.iter().zip(take) {
            for _ in 0..n {
                let Some(r) = st.queues.get_mut(q).and_then(|qs| qs.ready.pop_front()) else {
                    break;
                };
                out.push(st.lease(r, lease_until));
            }
        }
        out
    }

    /// Take the lease `lease` out of the table, checking it names the job.
    fn take_lease(&self, lease: &Lease) -> Result<Held, BrokerError> {
        let mut st = self.state();
        match st.leases.get(&lease.token) {
            Some(h)
                if h.received.envelope.id == lease.job_id
                    && h.received.envelope.queue == lease.queue =>
            {
                st.leases.remove(&lease.token).ok_or_else(|| lost(lease))
            }
            _ => Err(lost(lease)),
        }
    }

    fn put_lease(&self, token: LeaseToken, held: Held) {
        self.state().leases.insert(token, held);
    }

    /// Put `leases` back in the table, under their own tokens and deadlines.
    fn keep_leases(&self, leases: Vec<(LeaseToken, Held)>) {
        self.state().leases.extend(leases);
    }

    /// Publish `job`, whose copy the broker refused in a move, with a confirm; when the
    /// broker refuses it again, keep it for the next reap (the job exists nowhere else).
    async fn strand(&self, s: &Session, job: Stranded) -> Result<(), BrokerError> {
        let published = self.publish_stranded(s, &job).await;
        if let Err(e) = &published {
            tracing::error!(job = %job.id, queue = %job.queue, to = %job.route, error = %worker_core::error::chain(e), "amqp: the broker refuses the job's copy (a full queue under reject-publish?); the job is held only by this worker, which publishes it again at each reap until the broker takes it");
            self.state().stranded.push(job);
        }
        published
    }

    async fn publish_stranded(&self, s: &Session, job: &Stranded) -> Result<(), BrokerError> {
        let confirm = s
            .publisher
            .basic_publish(
                "",
                &job.route,
                BasicPublishOptions::default(),
                &job.payload,
                job.props.clone(),
            )
            .await
            .map_err(|e| self.failed(s, "publish", e))?;
        confirmed(confirm.await.map_err(|e| self.failed(s, "publish", e))?)
    }

    /// Publish again the copies the broker refused, of `queues` (all when `None`).
    /// Returns how many it now holds, and the first error.
    async fn flush_stranded(
        &self,
        s: &Session,
        queues: Option<&[String]>,
    ) -> (u64, Option<BrokerError>) {
        let jobs: Vec<Stranded> = {
            let mut st = self.state();
            let (take, keep) = std::mem::take(&mut st.stranded)
                .into_iter()
                .partition(|j| queues.is_none_or(|q| q.contains(&j.queue)));
            st.stranded = keep;
            take
        };
        let mut stored = 0;
        let mut failure = None;
        for job in jobs {
            match self.publish_stranded(s, &job).await {
                Ok(()) => {
                    tracing::warn!(job = %job.id, queue = %job.queue, "amqp: the broker took a copy it had refused");
                    stored += 1;
                }
                Err(e) => {
                    failure.get_or_insert(e);
                    self.state().stranded.push(job);
                }
            }
        }
        (stored, failure)
    }
}

fn lost(lease: &Lease) -> BrokerError {
    BrokerError::LeaseLost {
        job_id: lease.job_id.clone(),
    }
}

fn confirmed(c: Confirmation) -> Result<(), BrokerError> {
    match c {
        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
        Confirmation::Nack(_) => Err(BrokerError::Unavailable {
            message: "amqp: the broker refused the message (nack); it was not stored".into(),
            source: None,
        }),
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<JobId>, BrokerError> {
        let inner = &self.inner;
        for (i, job) in jobs.iter().enumerate() {
            worker_core::broker::validate_new_job(job, i + 1)?;
            topology::check_queue(&job.queue)?;
            if job.payload.len() > inner.config.max_payload {
                return Err(BrokerError::PayloadTooLarge {
                    size: job.payload.len(),
                    limit: inner.config.max_payload,
                });
            }
        }
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let s = inner.sessions.get().await?;
        let mut ids = Vec::with_capacity(jobs.len());
        let mut confirms = Vec::with_capacity(jobs.len());
        for job in jobs {
            let delay = job.delay.unwrap_or_default();
            let env = Envelope::from_new(job);
            confirms.push(inner.send(&s, Target::Delayed(delay), &env).await?);
            ids.push(env.id);
        }
        // Every publish is on the wire before the first confirm is awaited.
        for c in futures::future::join_all(confirms).await {
            confirmed(c.map_err(|e| inner.failed(&s, "publish", e))?)?;
        }
        Ok(ids)
    }

    async fn fetch(&self, plan: &FetchPlan) -> Result<Vec<Delivery>, BrokerError> {
        let inner = &self.inner;
        if inner.getting() {
            return inner.fetch_by_get(plan).await;
        }
        let s = inner.sessions.get().await?;
        let queues: Vec<String> = plan.shares.iter().map(|sh| sh.queue.clone()).collect();
        inner.ensure_consuming(&s, &queues).await?;
        for q in &queues {
            inner.pull(q);
        }
        let enough = |inner: &Inner| {
            let have: usize = queues.iter().map(|q| inner.ready_len(q)).sum();
            have >= plan.total as usize
        };
        let holding = |inner: &Inner| queues.iter().any(|q| inner.ready_len(q) > 0);
        // Checked only when nothing is here: it walks the leases.
        let owed = || {
            queues
                .iter()
                .any(|q| inner.held_on_consumer(q) < inner.config.prefetch as usize)
        };
        if !holding(inner) && owed() {
            // Under load, the delivery that replaces an acked one is usually on the
            // wire: give it a moment before asking the broker what is ready.
            let deadline = tokio::time::Instant::now() + OWED_WAIT;
            while queues.iter().all(|q| inner.ready_len(q) == 0)
                && tokio::time::Instant::now() < deadline
            {
                inner.arrival(&queues, deadline).await;
                for q in &queues {
                    inner.pull(q);
                }
            }
        }
        // A caller that takes part of its plan gets what is here without a round trip.
        let settled = plan.partial && holding(inner);
        if !settled && !enough(inner) {
            // Short: make each ready list exact, then wait for what the broker has
            // said is ready and may still send (it sends no more than the prefetch).
            let mut expect = Vec::with_capacity(queues.len());
            for (q, share) in queues.iter().zip(&plan.shares) {
                let have = inner.ready_len(q);
                if have >= share.max as usize {
                    expect.push(have);
                    continue;
                }
                let waiting = inner.sync(&s, q).await? as usize;
                let room =
                    (inner.config.prefetch as usize).saturating_sub(inner.held_on_consumer(q));
                let have = inner.ready_len(q);
                expect.push((have + waiting.min(room)).min(share.max as usize));
            }
            let deadline = tokio::time::Instant::now() + ARRIVAL_WAIT;
            loop {
                for q in &queues {
                    inner.pull(q);
                }
                let arrived_all = queues
                    .iter()
                    .zip(&expect)
                    .all(|(q, &want)| inner.ready_len(q) >= want);
                if arrived_all || enough(inner) || tokio::time::Instant::now() >= deadline {
                    break;
                }
                inner.arrival(&queues, deadline).await;
            }
        }
        Ok(inner.hand_out(plan, &queues))
    }

    async fn ack(&self, lease: &Lease) -> Result<(), BrokerError> {
        let held = self.inner.take_lease(lease)?;
        let r = &held.received;
        if !r.channel.status().connected() {
            return Err(lost(lease));
        }
        r.settler.settle(r.tag, None).await.map_err(|e| {
            tracing::debug!(job = %lease.job_id, error = %worker_core::error::chain(&e), "amqp: ack not committed; the broker delivers the job again");
            lost(lease)
        })
    }

    async fn retry_after(
        &self,
        lease: &Lease,
        delay: Duration,
        error: &str,
    ) -> Result<(), BrokerError> {
        self.inner
            .replace(lease, Target::Delayed(delay), |env| {
                env.record_failure(error);
                env.attempt = env.attempt.saturating_add(1);
                env.due_at_ms = now_ms() + delay.as_millis() as u64;
            })
            .await
    }

    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<(), BrokerError> {
        self.inner
            .replace(lease, Target::Dead(reason), |env| {
                env.record_failure(reason)
            })
            .await
    }

    async fn release(&self, lease: &Lease) -> Result<(), BrokerError> {
        let inner = &self.inner;
        let Held {
            received: r,
            deadline,
        } = inner.take_lease(lease)?;
        if !r.channel.status().connected() {
            return Err(lost(lease));
        }
        // Still consuming on that channel: the job goes first in this process's
        // ready list, untouched in the broker.
        // In get mode, on the channel it came from: the next fetch starts it, or
        // hands it back when it cannot.
        let r = {
            let mut st = inner.state();
            let on_pull = inner.getting() && st.pull.as_ref().is_some_and(|p| p.holds(&r));
            let qs = st.queues.entry(lease.queue.clone()).or_default();
            let same = !qs.stopped
                && (on_pull
                    || qs.consuming.as_ref().is_some_and(|c| {
                        !inner.getting() && c.gen == r.gen && c.channel.id() == r.channel.id()
                    }));
            if same {
                qs.ready.push_front(r);
                drop(st);
                inner.arrived.notify_waiters();
                return Ok(());
            }
            r
        };
        let handed = match inner.sessions.get().await {
            Ok(s) => inner.hand_back(&s, r).await,
            Err(e) => Err((e, r)),
        };
        handed.map_err(|(e, r)| {
            // Still held: the lease stays, for a later release, ack or reap.
            inner.put_lease(
                lease.token,
                Held {
                    received: r,
                    deadline,
                },
            );
            e
        })
    }

    /// Refused: a published message cannot be changed, and storing progress beside it
    /// would need a second store that RabbitMQ does not have. A redelivered job starts
    /// from the beginning (see the crate documentation).
    async fn checkpoint(&self, lease: &Lease, job: &Envelope) -> Result<(), BrokerError> {
        let _ = (lease, job);
        Err(BrokerError::Unsupported {
            operation: "checkpoint",
            reason: "a RabbitMQ message cannot be changed once published, so a job \
                     redelivered from RabbitMQ starts from the beginning"
                .into(),
        })
    }

    async fn extend_lease(&self, lease: &Lease, lease_for: Duration) -> Result<(), BrokerError> {
        let mut st = self.inner.state();
        match st.leases.get_mut(&lease.token) {
            Some(h)
                if h.received.envelope.id == lease.job_id
                    && h.received.channel.status().connected() =>
            {
                h.deadline = Instant::now() + lease_for;
                Ok(())
            }
            _ => Err(lost(lease)),
        }
    }

    /// Each expired lease is moved back to its queue with its attempt counted, in one
    /// transaction (see the crate documentation). A copy the broker refused earlier is
    /// published again first. A lease on a closed channel is the broker's already. When the connection
    /// is down, the expired leases stay here for the next reap.
    async fn reap_expired(&self, queues: &[String]) -> Result<u64, BrokerError> {
        let inner = &self.inner;
        let now = Instant::now();
        // Out of the table while being reaped, so no ack or extension races the copy.
        let expired: Vec<(LeaseToken, Held)> = {
            let mut st = inner.state();
            let tokens: Vec<LeaseToken> = st
                .leases
                .iter()
                .filter(|(_, h)| h.deadline <= now && queues.contains(&h.received.envelope.queue))
                .map(|(t, _)| *t)
                .collect();
            tokens
                .into_iter()
                .filter_map(|t| st.leases.remove(&t).map(|h| (t, h)))
                .collect()
        };
        let stranded = inner
            .state()
            .stranded
            .iter()
            .any(|j| queues.contains(&j.queue));
        if expired.is_empty() && !stranded {
            return Ok(0);
        }
        let s = match inner.sessions.get().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(jobs = expired.len(), error = %e, "amqp: expired leases not reaped: no connection; the jobs stay leased here until the next reap");
                inner.keep_leases(expired);
                return Err(e);
            }
        };
        let (mut reclaimed, mut failure) = inner.flush_stranded(&s, Some(queues)).await;
        let mut left = expired.into_iter();
        while let Some((token, held)) = left.next() {
            let r = &held.received;
            if !r.channel.status().connected() {
                tracing::debug!(job = %r.envelope.id, "amqp: expired lease on a closed channel; the broker took the job back");
                continue;
            }
            let mut env = r.envelope.clone();
            env.attempt = env.attempt.saturating_add(1);
            match inner.move_to(&s, r, Target::Queue, &env).await {
                Ok(Moved::Stored) => {
                    tracing::warn!(job = %env.id, queue = %env.queue, "amqp: lease expired; job returned to its queue");
                    reclaimed += 1;
                }
                Ok(Moved::NotCommitted) => {
                    tracing::warn!(job = %env.id, queue = %env.queue, "amqp: lease expired; the broker takes the job back with its channel");
                }
                Ok(Moved::Kept(e)) => {
                    failure.get_or_insert(e);
                }
                Err(e) => {
                    tracing::warn!(job = %env.id, queue = %env.queue, error = %e, "amqp: lease expired but its queue cannot be declared; it stays leased here until the next reap");
                    inner.put_lease(token, held);
                    failure.get_or_insert(e);
                    if !s.alive() {
                        // The rest would fail the same way; they wait for the next reap.
                        inner.keep_leases(left.by_ref().collect());
                    }
                }
            }
        }
        let still = inner
            .state()
            .stranded
            .iter()
            .any(|j| queues.contains(&j.queue));
        match failure {
            Some(e) if reclaimed == 0 || still => Err(e),
            _ => Ok(reclaimed),
        }
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        let inner = &self.inner;
        topology::check_queue(queue)?;
        let s = inner.sessions.get().await?;
        // A doorbell holds nothing it has not delivered: a passive declare is exact.
        let consumed = !inner.getting()
            && inner.state().queues.get(queue).is_some_and(|q| {
                q.consuming
                    .as_ref()
                    .is_some_and(|c| c.channel.status().connected())
            });
        let ready = if consumed {
            inner.sync(&s, queue).await?
        } else {
            s.ready_count(queue).await?.unwrap_or(0)
        };
        let dead = s
            .ready_count(&topology::dead_queue(queue))
            .await?
            .unwrap_or(0);
        // The mover first, and it moves nothing until this count is done: a job it moves
        // meanwhile would count twice, or not at all.
        inner.move_delayed(queue);
        let mover = inner.later.sync(queue).await;
        let prefix = topology::later_prefix(queue);
        let mut later_queues: HashSet<String> =
            s.declared_with_prefix(&prefix).into_iter().collect();
        let mut remote_unacked = None;
        let mut head_timestamp = None;
        let mut later_unacked = 0;
        if let Some(m) = &inner.management {
            for q in m.queues_with_prefix(&prefix).await? {
                if inner.config.depth_from_management {
                    later_unacked += q.messages_unacknowledged;
                }
                later_queues.insert(q.name);
            }
            if inner.config.depth_from_management {
                if let Some(q) = m.queue(queue).await? {
                    remote_unacked = Some(q.messages_unacknowledged);
                    head_timestamp = q.head_message_timestamp;
                }
            }
        }
        // Ready in the later queues, and what movers hold: this process's own, or every
        // process's as the management API last counted them.
        let (mut delayed, held) = match &mover {
            Some(m) => {
                for &l in &m.levels {
                    later_queues.remove(&topology::later_queue(queue, l));
                }
                (m.ready, m.held)
            }
            None => (0, 0),
        };
        delayed += held.max(later_unacked);
        for name in later_queues {
            match s.ready_count(&name).await? {
                Some(n) => delayed += n,
                None => s.forget(&name),
            }
        }
        // What a closed channel held, the broker has taken back and counts itself.
        let st = inner.state();
        let local_ready = st.queues.get(queue).map_or(0, |q| {
            q.ready
                .iter()
                .filter(|r| r.channel.status().connected())
                .count() as u64
        });
        let leased = st
            .leases
            .values()
            .filter(|h| {
                h.received.envelope.queue == queue && h.received.channel.status().connected()
            })
            .count() as u64
            + st.stranded.iter().filter(|j| j.queue == queue).count() as u64;
        let oldest = st
            .queues
            .get(queue)
            .and_then(|q| q.ready.iter().map(|r| r.envelope.due_at_ms).min());
        drop(st);
        // Other processes' deliveries: unacked in the broker beyond what this one holds.
        let others = remote_unacked.map_or(0, |u| u.saturating_sub(leased + local_ready));
        let mut d = QueueDepth::default();
        d.pending = ready + local_ready;
        d.in_flight = leased + others;
        d.delayed = delayed;
        d.delayed_due = 0;
        d.dead = dead;
        let now = now_ms();
        let oldest = match (oldest, head_timestamp) {
            (Some(a), Some(b)) => Some(a.min(b * 1000)),
            (a, b) => a.or(b.map(|t| t * 1000)),
        };
        d.oldest_pending_age = oldest
            .filter(|_| d.pending > 0)
            .map(|t| Duration::from_millis(now.saturating_sub(t)));
        d.read_from(
            &["pending"],
            "amqp: passive declare of the queue (ready) + deliveries this process holds unstarted",
        );
        d.read_from(
            &["delayed"],
            "amqp: passive declare of each later queue (ready) + the jobs movers hold \
             (this process's, or every process's by the management API)",
        );
        d.read_from(
            &["delayed_due"],
            "none: always 0, a mover moves a job on the moment its hold ends",
        );
        d.read_from(&["dead"], "amqp: passive declare of the dead-letter queue");
        if remote_unacked.is_some() {
            d.read_from(
                &["in_flight"],
                "management API: messages_unacknowledged (statistics, refreshed every few seconds)",
            );
            d.read_from(
                &["oldest_age"],
                "management API: head_message_timestamp, and deliveries this process holds",
            );
        } else {
            let why = if inner.management.is_none() {
                "no management URL"
            } else if !inner.config.depth_from_management {
                "depth from the management API turned off"
            } else {
                "the management API does not list the queue yet"
            };
            d.read_from(
                &["in_flight"],
                &format!("this process's leases only ({why}: other workers' jobs are not counted)"),
            );
            let age = if d.oldest_pending_age.is_none() && d.pending > 0 {
                // Get mode holds no pending job to read its age from.
                format!("unknown: no delivery of this process is pending ({why})")
            } else {
                format!("deliveries this process holds ({why})")
            };
            d.read_from(&["oldest_age"], &age);
        }
        Ok(d)
    }

    async fn dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        topology::check_queue(queue)?;
        let s = self.inner.sessions.get().await?;
        let reader = DeadReader::open(&self.inner, &s, queue).await?;
        let mut out = Vec::new();
        let result = async {
            while out.len() < limit {
                match reader.next().await? {
                    Some((_, letter)) => out.push(letter),
                    None => break,
                }
            }
            Ok(())
        }
        .await;
        reader.close().await;
        result.map(|()| out)
    }

    async fn requeue_dead(&self, queue: &str, ids: &[JobId]) -> Result<u64, BrokerError> {
        topology::check_queue(queue)?;
        let inner = &self.inner;
        let s = inner.sessions.get().await?;
        let reader = DeadReader::open(inner, &s, queue).await?;
        let wanted: HashSet<&JobId> = ids.iter().collect();
        let mut moved = 0;
        let result = async {
            while let Some((tag, letter)) = reader.next().await? {
                if !wanted.is_empty() && !wanted.contains(&letter.envelope.id) {
                    continue;
                }
                let mut env = letter.envelope.clone();
                env.attempt = 1;
                env.due_at_ms = now_ms();
                let (route, props) = inner.route(&s, Target::Queue, &env).await?;
                let copy = Copy {
                    route,
                    payload: env.payload.to_vec(),
                    props,
                };
                match reader.settler.settle(tag, Some(copy)).await {
                    Ok(()) => {}
                    Err(SettleError::Failed(e)) => {
                        return Err(from_lapin("requeue dead letter", e));
                    }
                    Err(refused @ SettleError::Refused(_)) => {
                        // The dead letter is gone and its queue refused the job: it
                        // goes back among the dead letters.
                        let back = inner
                            .publish(&s, Target::Dead(&letter.reason), &letter.envelope)
                            .await;
                        if let Err(e) = &back {
                            tracing::error!(job = %letter.envelope.id, queue, error = %worker_core::error::chain(e), "amqp: a requeued dead letter was refused by its queue and could not be put back among the dead letters: it is lost");
                        }
                        back?;
                        return Err(BrokerError::unavailable(
                            format!("amqp: requeue of {} refused by its queue; it stays dead", letter.envelope.id),
                            refused,
                        ));
                    }
                }
                moved += 1;
            }
            Ok(())
        }
        .await;
        reader.close().await;
        result.map(|()| moved)
    }

    async fn purge_dead(&self, queue: &str, ids: &[JobId]) -> Result<u64, BrokerError> {
        topology::check_queue(queue)?;
        let inner = &self.inner;
        let s = inner.sessions.get().await?;
        if ids.is_empty() {
            let dead = topology::dead_queue(queue);
            if s.ready_count(&dead).await?.is_none() {
                return Ok(0);
            }
            let ch = s.admin().await?;
            let n = ch
                .queue_purge(&dead, QueuePurgeOptions::default())
                .await
                .map_err(|e| from_lapin("purge dead letters", e))?;
            return Ok(u64::from(n));
        }
        let reader = DeadReader::open(inner, &s, queue).await?;
        let wanted: HashSet<&JobId> = ids.iter().collect();
        let mut dropped = 0;
        let result = async {
            while let Some((tag, letter)) = reader.next().await? {
                if wanted.contains(&letter.envelope.id) {
                    reader.remove(tag).await?;
                    dropped += 1;
                }
            }
            Ok(())
        }
        .await;
        reader.close().await;
        result.map(|()| dropped)
    }

    async fn register_worker(&self, info: &WorkerInfo, ttl: Duration) -> Result<(), BrokerError> {
        let inner = &self.inner;
        let s = inner.sessions.get().await?;
        let name = topology::worker_queue(&info.id);
        s.declare(&name, topology::worker_args(), Duration::from_secs(60))
            .await?;
        let body = serde_json::to_vec(info).map_err(|e| protocol(format!("worker info: {e}")))?;
        let props = BasicProperties::default()
            .with_expiration(ttl.as_millis().max(1).to_string().into())
            .with_content_type("application/json".into());
        let confirm = s
            .publisher
            .basic_publish("", &name, BasicPublishOptions::default(), &body, props)
            .await
            .map_err(|e| inner.failed(&s, "publish beat", e))?;
        confirmed(
            confirm
                .await
                .map_err(|e| inner.failed(&s, "publish beat", e))?,
        )
    }

    async fn list_workers(&self, pool: Option<&str>) -> Result<Vec<WorkerInfo>, BrokerError> {
        let inner = &self.inner;
        let m = inner.management.as_ref().ok_or_else(|| {
            protocol(
                "listing workers on RabbitMQ needs its management API: set AMQP_MANAGEMENT_URL",
            )
        })?;
        let s = inner.sessions.get().await?;
        let names = m.queues_with_prefix(topology::WORKERS_PREFIX).await?;
        let mut ch = s
            .conn
            .create_channel()
            .await
            .map_err(|e| inner.failed(&s, "open channel", e))?;
        let mut out = Vec::new();
        for q in names {
            let mut got = None;
            // Another listing holds the beat for a moment while it reads it: a queue
            // found empty is read once more before its worker counts as gone.
            for look in 0..2 {
                if look > 0 {
                    tokio::time::sleep(REGISTRY_LOOK_AGAIN).await;
                }
                match ch.basic_get(&q.name, BasicGetOptions::default()).await {
                    Ok(Some(msg)) => {
                        // Back at once, for the next reader.
                        let back = BasicRejectOptions { requeue: true };
                        if let Err(e) = ch.basic_reject(msg.delivery.delivery_tag, back).await {
                            tracing::debug!(queue = %q.name, error = %e, "amqp: registry read");
                        }
                        got = Some(msg);
                        break;
                    }
                    Ok(None) => {}
                    Err(e) if crate::error::is_not_found(&e) => {
                        // Deleted since it was listed; the broker closed the channel.
                        ch = s
                            .conn
                            .create_channel()
                            .await
                            .map_err(|e| inner.failed(&s, "open channel", e))?;
                        break;
                    }
                    Err(e) => return Err(from_lapin("read worker registry", e)),
                }
            }
            // An empty queue is a worker whose last beat expired: gone. Its queue is
            // left to expire (`x-expires`): deleting it here could race a beat.
            let Some(msg) = got else { continue };
            match serde_json::from_slice::<WorkerInfo>(&msg.delivery.data) {
                Ok(info) if pool.is_none_or(|p| info.pool == p) => out.push(info),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(queue = %q.name, error = %e, "amqp: unreadable worker beat")
                }
            }
        }
        let _ = ch.close(200, "listed").await;
        Ok(out)
    }

    async fn deregister_worker(&self, worker_id: &str) -> Result<(), BrokerError> {
        let s = self.inner.sessions.get().await?;
        let name = topology::worker_queue(worker_id);
        let ch = s.admin().await?;
        match ch.queue_delete(&name, QueueDeleteOptions::default()).await {
            Ok(_) => {}
            Err(e) if crate::error::is_not_found(&e) => {}
            Err(e) => return Err(from_lapin("deregister worker", e)),
        }
        s.forget(&name);
        Ok(())
    }

    async fn wait_for_work(&self, queues: &[String], timeout: Duration) {
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + timeout;
        let s = match inner.sessions.get().await {
            Ok(s) => s,
            Err(_) => {
                // The fetch that follows reports the error; do not spin meanwhile.
                tokio::time::sleep(timeout.min(Duration::from_secs(1))).await;
                return;
            }
        };
        let listening = if inner.getting() {
            // In a task of its own: a caller that stops waiting must not leave a
            // doorbell started in the broker and unknown here.
            let ring = {
                let inner = inner.clone();
                let queues = queues.to_vec();
                tokio::spawn(async move { inner.ring_on(&queues).await })
            };
            ring.await
                .unwrap_or_else(|e| Err(protocol(format!("doorbells: {e}"))))
        } else {
            inner.ensure_consuming(&s, queues).await
        };
        if let Err(e) = listening {
            tracing::debug!(error = %e, "amqp: cannot consume yet");
            tokio::time::sleep(timeout.min(Duration::from_secs(1))).await;
            return;
        }
        for q in queues {
            inner.pull(q);
        }
        if queues.iter().any(|q| inner.ready_len(q) > 0) {
            return;
        }
        inner.arrival(queues, deadline).await;
    }

    async fn stop_fetching(&self, queues: &[String]) {
        let inner = &self.inner;
        // Get mode: after any doorbell change still running.
        let _turn = if inner.getting() {
            Some(inner.turn.lock().await)
        } else {
            None
        };
        let mut stopped = Vec::new();
        {
            let mut st = inner.state();
            for q in queues {
                let qs = st.queues.entry(q.clone()).or_default();
                qs.stopped = true;
                if let Some(c) = qs.consuming.take() {
                    stopped.push((q.clone(), c));
                }
            }
        }
        inner.arrived.notify_waiters();
        let Some(s) = inner.sessions.live() else {
            return;
        };
        for (q, c) in stopped {
            let calm = c.settler.calm().await;
            let cancelled = c
                .channel
                .basic_cancel(&c.tag, BasicCancelOptions::default())
                .await;
            drop(calm);
            if let Err(e) = cancelled {
                tracing::debug!(queue = %q, error = %e, "amqp: cancel consumer");
            }
            inner.take_cancelled(&q, &c);
        }
        for q in queues {
            let left: Vec<Received> = {
                let mut st = inner.state();
                st.queues
                    .get_mut(q)
                    .map(|qs| qs.ready.drain(..).collect())
                    .unwrap_or_default()
            };
            let count = left.len();
            for r in left {
                if let Err((e, r)) = inner.hand_back(&s, r).await {
                    // Kept: a later fetch starts it, or close hands it back.
                    tracing::warn!(queue = %q, error = %e, "amqp: could not hand a job back yet; kept");
                    inner
                        .state()
                        .queues
                        .entry(q.clone())
                        .or_default()
                        .ready
                        .push_back(r);
                }
            }
            if count > 0 {
                tracing::info!(queue = %q, jobs = count, "amqp: handed back jobs received but not started");
            }
        }
    }

    async fn resume_fetching(&self, queues: &[String]) {
        let inner = &self.inner;
        // Get mode: after any doorbell change still running.
        let _turn = if inner.getting() {
            Some(inner.turn.lock().await)
        } else {
            None
        };
        let mut st = inner.state();
        for q in queues {
            // The next fetch or wait consumes (or rings) again.
            st.queues.entry(q.clone()).or_default().stopped = false;
        }
    }

    async fn close(&self) {
        let inner = &self.inner;
        let queues: Vec<String> = inner.state().queues.keys().cloned().collect();
        self.stop_fetching(&queues).await;
        inner.later.stop().await;
        let left = inner.state().leases.len();
        if left > 0 {
            tracing::warn!(
                jobs = left,
                "amqp: closing with unsettled jobs; the broker delivers them again"
            );
        }
        if !inner.state().stranded.is_empty() {
            // Worth a reconnect: these jobs exist nowhere else.
            let session = tokio::time::timeout(STRANDED_CLOSE_WAIT, inner.sessions.get()).await;
            if let Ok(Ok(s)) = session {
                inner.flush_stranded(&s, None).await;
            }
            let st = inner.state();
            for job in &st.stranded {
                tracing::error!(job = %job.id, queue = %job.queue, to = %job.route, "amqp: closing while the broker still refuses this job's copy: it is lost");
            }
        }
        inner.sessions.close().await;
        inner.movers.close().await;
    }

    fn refuses_duplicate_ids(&self) -> bool {
        false
    }
}

/// Reads the dead letters of one queue on a channel of its own, unacked: what is not
/// acked goes back where it was when the reader closes.
struct DeadReader {
    ch: Channel,
    settler: Settler,
    queue: String,
    dead: String,
}

impl DeadReader {
    async fn open(inner: &Inner, s: &Session, queue: &str) -> Result<Self, BrokerError> {
        let ch = s
            .conn
            .create_channel()
            .await
            .map_err(|e| inner.failed(s, "open channel", e))?;
        let settler = Settler::start(&ch)
            .await
            .map_err(|e| inner.failed(s, "tx.select", e))?;
        Ok(Self {
            ch,
            settler,
            queue: queue.to_owned(),
            dead: topology::dead_queue(queue),
        })
    }

    /// The next dead letter and its delivery tag; `None` when all were read.
    async fn next(&self) -> Result<Option<(u64, DeadLetter)>, BrokerError> {
        match self
            .ch
            .basic_get(&self.dead, BasicGetOptions::default())
            .await
        {
            Ok(Some(m)) => Ok(Some((
                m.delivery.delivery_tag,
                dead_letter_of(&self.queue, m.delivery),
            ))),
            Ok(None) => Ok(None),
            Err(e) if crate::error::is_not_found(&e) => Ok(None),
            Err(e) => Err(from_lapin("read dead letters", e)),
        }
    }

    /// Remove the dead letter read under `tag`.
    async fn remove(&self, tag: u64) -> Result<(), BrokerError> {
        self.settler.settle(tag, None).await.map_err(|e| match e {
            SettleError::Failed(e) | SettleError::Refused(e) => from_lapin("ack dead letter", e),
        })
    }

    /// Put back every dead letter read and not removed.
    async fn close(self) {
        let _ = self.ch.close(200, "done").await;
    }
}

/// A message of a dead-letter queue as a [`DeadLetter`] of `queue`.
fn dead_letter_of(queue: &str, d: lapin::message::Delivery) -> DeadLetter {
    let decoded = decode(queue, d.data, &d.properties, false);
    let (reason, at) = decoded
        .dead
        .unwrap_or_else(|| ("unknown (no reason header)".to_owned(), now_ms()));
    DeadLetter::new(decoded.envelope, reason, at)
}
