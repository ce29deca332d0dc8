//! # worker-redis
//!
//! A Redis backend for `worker-core`: [`RedisBroker`] implements the whole `Broker`
//! contract. Every state change is one atomic Lua script, fenced by the delivery's
//! lease token and timed by the Redis server's clock. Every key of a queue carries one
//! hash tag (`{prefix:queue}`), so a queue lives on one Redis Cluster slot. Idle
//! workers wait on pub/sub notifications rather than polling.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use worker_core::{Broker, NewJob};
//! use worker_redis::RedisBroker;
//!
//! let broker = RedisBroker::connect("redis://127.0.0.1:6379").await?;
//! broker.enqueue(vec![NewJob::json("emails", &"hello")?]).await?;
//! # Ok(()) }
//! ```
//!
//! ## Data model
//!
//! For queue `q` under prefix `p` (all keys tagged `{p:q}`): `pending` LIST of ids,
//! `inflight` ZSET id → lease deadline, `jobs` HASH with three fields a job
//! (`e:<id>` the envelope, `m:<id>` "attempt|due|lease token", `h:<id>` the attempt
//! history), `delayed` ZSET id → due time, `dead` ZSET id → time of death, and
//! `dead_jobs` HASH with a dead job's fields and `r:<id>` its reason. Keeping a job's
//! state in one hash keeps every step to a few commands per batch: a fetch is six
//! commands and an ack three, however many jobs they carry. Wake-ups go to the
//! pub/sub channel `{p:q}:notify`. The worker registry lives under `{p:workers}`.
//!
//! ## Cluster and replicas
//!
//! [`RedisConfig::cluster`] (or `REDIS_CLUSTER_NODES`, see [`RedisConfig::from_env`])
//! reaches a Redis Cluster through its seed nodes; the client follows failovers and
//! slot moves. Replication is asynchronous, so a master that dies right after
//! acknowledging an enqueue can take the jobs with it;
//! [`RedisConfig::wait_replicas`] acknowledges an enqueue only once replicas hold it.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod batch;
mod broker;
mod credentials;
mod env;
mod error;
mod replicas;
mod scripts;
mod wait;

pub use broker::{RedisBroker, RedisConfig, WaitReplicas};
pub use worker_core::redact;
