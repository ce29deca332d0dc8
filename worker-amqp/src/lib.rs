//! # worker-amqp
//!
//! A RabbitMQ backend for `worker-core`: [`AmqpBroker`] implements the `Broker`
//! contract with manual acks, a prefetch bounded by the worker's concurrency, retries
//! through later queues, dead letters that keep their reason and history, publisher
//! confirms on every enqueue, and transactions that move a job in one step.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use worker_amqp::AmqpConfig;
//! use worker_core::{Broker, NewJob};
//!
//! let broker = AmqpConfig::from_env()?.connect().await?;
//! broker.enqueue(vec![NewJob::json("emails", &"hello")?]).await?;
//! # Ok(()) }
//! ```
//!
//! ## Topology
//!
//! For a work queue `q` (durable; classic or quorum per [`AmqpConfig::queue_type`]):
//!
//! - `q.dead` holds dead letters; each carries `x-wp-reason` and `x-wp-died-at`.
//! - `q.later.0` … `q.later.6` hold delayed jobs and retries. Every job a level gets
//!   waits there the same time, its hold (250 ms × 4^level: 250 ms up to 1024 s), so
//!   each later queue is in the order its jobs leave it. Every process that consumes,
//!   fetches, counts or delays jobs of `q` runs a mover: once the later queues exist
//!   (it looks at start, then every few minutes; a look at a missing queue is an error
//!   line in RabbitMQ's log), it consumes them on a connection of its own, keeps each job until its hold ends, then moves it in
//!   one transaction to `q` when it is due, else to the level its remaining delay
//!   calls for (a job delayed an hour moves a few times). A mover killed while it
//!   holds jobs leaves them in their later queue for another. Should no process of `q`
//!   run at all, each later queue's message TTL (its hold plus a minute) and
//!   dead-letter route to `q` move a job anyway, by RabbitMQ's dead-lettering, which
//!   is at most once on classic queues across a node stop. The levels are declared
//!   together when a job is first delayed, and expire after an hour unused; levels
//!   whose hold reaches the consumer timeout are not used.
//! - `wp.workers.<worker id>` holds a worker's latest beat (`x-max-length` 1, the
//!   beat's TTL as the message's expiration).
//!
//! Every queue is declared idempotently by the process that first uses it on a
//! connection, and again after a reconnect. Messages are persistent. The body is the
//! payload as enqueued, so any AMQP client can produce jobs; the job's state travels in
//! `x-wp-*` headers, and a message without them is a first attempt.
//!
//! ## TLS
//!
//! `amqps://` connections are made by this crate with rustls: the server's name is
//! checked against its certificate; [`AmqpConfig::ca_cert_pem`] (`AMQP_CA_FILE`) is
//! then the only trusted authority, else the system's trust store (none at all is an
//! error that names `AMQP_CA_FILE`); [`AmqpConfig::client_cert_pem`]
//! (`AMQP_CLIENT_CERT_FILE`, `AMQP_CLIENT_KEY_FILE`) is presented to a broker that
//! checks its clients.
//!
//! ## Where AMQP differs from the contract
//!
//! - **The lease is the channel.** A job is owned by the consumer channel it was
//!   delivered on until it is acked; when the process dies or its connection drops,
//!   RabbitMQ delivers the job again. `extend_lease` moves a deadline kept in this
//!   process, and `reap_expired` returns this process's own expired jobs (republished
//!   with the attempt counted, in one transaction); one whose channel closed is the
//!   broker's again. No process can reclaim another's jobs; the broker
//!   does that when the owner's connection closes. AMQP heartbeats keep a long job's
//!   connection alive.
//! - **A move is one transaction.** Every channel that receives jobs is in
//!   transaction mode: a retry, a dead letter, a hand-back and a reaped lease publish
//!   the job's next copy and ack its delivery in one commit, so a worker killed at any
//!   point leaves the job once in the broker (its delivery or its copy, never both);
//!   acks are committed too, many per commit on a busy channel. RabbitMQ does not
//!   promise that a commit is atomic, though: a connection lost while a commit is in
//!   flight can leave part of it applied (a 30-minute soak saw it once on quorum
//!   queues: the ack without the copy, the job gone). RabbitMQ applies a
//!   transaction's acks even when it refuses its publish (a full queue under a
//!   `max-length` + `reject-publish` limit) and then closes the channel: the refused
//!   copy then lives only in the worker, which counts it in flight, logs an error and
//!   publishes it again at each reap until the broker takes it (lost only if the worker
//!   dies meanwhile); the other jobs on that channel go back to the broker with it. Do
//!   not put `reject-publish` limits on a pool's own queues.
//! - **Attempts after a crash.** A redelivered message counts an attempt. Quorum
//!   queues count every redelivery exactly (`x-delivery-count`); classic queues only
//!   flag a message as redelivered, so a job that crashes its worker twice counts one
//!   extra attempt, not two. Prefer quorum queues where a crash loop must end in the
//!   dead letters.
//! - **Jobs that never ran, after a reconnect.** What the consumer had received
//!   ahead (its prefetch) and not handed out when its channel or connection closed
//!   comes back marked redelivered (on a quorum queue, `x-delivery-count` raised),
//!   which reads as an attempt spent. The process remembers what it held unstarted (up
//!   to an hour) and, when it gets such a job back, takes that attempt back. Two
//!   returns are still counted: a job that another process gets instead, and a job
//!   the runtime had fetched and held unstarted (`WORKER_PREFETCH`), which the broker
//!   cannot tell from a job that ran. A pool whose connection drops often and whose
//!   jobs must not be dead-lettered early keeps the prefetch small or raises
//!   `WORKER_MAX_ATTEMPTS` by the drops it expects.
//! - **Prefetch is per consumer.** RabbitMQ bounds what it sends ahead per consumer
//!   (global QoS is deprecated and refused by quorum queues), so the worker takes jobs
//!   one of two ways ([`FetchMode`], `AMQP_FETCH`):
//!   - `consume`, the default for one queue: a consumer whose prefetch is the worker's
//!     concurrency plus its fetch-ahead. RabbitMQ streams deliveries ahead and never
//!     sends a replica more than it can start. A process consuming N queues this way
//!     may hold N times that.
//!   - `get`, the default for several queues: each fetch takes with `basic.get`
//!     exactly what the worker can start, split between queues by its weights. While
//!     it finds nothing, a consumer of prefetch 1 per queue waits for the next job;
//!     the next fetch cancels them, keeps what they delivered that it can start and
//!     hands the rest back. The replica holds only what it runs, across any number of
//!     queues, at the price of a round trip per fetch and of RabbitMQ's cost per
//!     `basic.get` (see BENCHMARKS.md). A pool of several high-rate queues that can
//!     afford to hold a prefetch per queue may set `AMQP_FETCH=consume`.
//! - **Release and hand-back.** A job released while this process still consumes its
//!   queue goes first in this process's ready list (in get mode: the next fetch starts
//!   it, or hands it back when it cannot). At drain, jobs received but not
//!   started, and jobs released, are moved to their queue with their attempt
//!   unchanged, in one transaction like a retry: they go to the back of the queue (a
//!   requeue through AMQP would put them in front but mark them redelivered, which
//!   counts an attempt).
//! - **Duplicate ids are not refused.** RabbitMQ cannot look a message up by id, so
//!   two jobs with one explicit id are both stored ([`Broker::refuses_duplicate_ids`]
//!   is false). Handlers must be idempotent by job id anyway.
//! - **Delayed jobs are moved by RabbitMQ itself** when due, so `delayed_due` is 0.
//! - **Depth.** `pending` is the ready count from a passive declare plus what this
//!   process holds unstarted (in get mode, nothing: the age of the oldest pending job
//!   then comes from the management API only); `in_flight` is this process's leases plus, with the
//!   management API configured, the unacked count beyond them (other processes',
//!   refreshed every statistics interval). Deliveries held on a closed channel are not
//!   counted: the broker has them back. Delay queues of other processes are found
//!   through the management API. Each [`QueueDepth`](worker_core::QueueDepth) says in
//!   its `sources` where every number came from, and `/scaling` shows them.
//! - **Consumer timeout.** RabbitMQ closes a channel whose delivery stays unacked past
//!   its consumer timeout (30 minutes by default) and delivers that channel's jobs
//!   again. The worker asks for [`AmqpConfig::consumer_timeout`] on each consumer
//!   (`x-consumer-timeout`, honoured from RabbitMQ 3.12), warns at start-up when its job
//!   timeout, lease or drain timeout is longer, and logs an error naming the cause
//!   when the broker closes a channel for it.
//! - **No checkpoints.** A published message cannot be changed, so
//!   `JobContext::checkpoint` is refused with `BrokerError::Unsupported` and changes
//!   nothing; a job redelivered from RabbitMQ starts from the beginning. Pools whose
//!   jobs must resume where they stopped (preemptible batch) run on Redis.
//! - **The worker registry** needs the management API to list queues by name.
//! - **Atomicity.** A batch is refused as a whole for an invalid queue name or an
//!   oversized payload; once publishing starts, a broker failure may leave part of a
//!   batch stored (enqueue is at least once).
//!
//! [`Broker::refuses_duplicate_ids`]: worker_core::Broker::refuses_duplicate_ids

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod broker;
mod config;
mod error;
mod management;
mod message;
mod session;
mod settle;
mod tls;
mod topology;

pub use broker::AmqpBroker;
pub use config::{
    AmqpConfig, FetchMode, BROKER_CONSUMER_TIMEOUT, DEFAULT_MAX_PAYLOAD, DEFAULT_URL,
};
pub use topology::QueueType;
