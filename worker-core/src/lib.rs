//! # worker-core
//!
//! The runtime for queue-consuming worker pools that autoscale. A worker author writes
//! a [`Handler`]; the runtime fetches fairly across queues, enforces concurrency,
//! per-queue and weighted-budget limits, keeps job leases alive, retries with backoff,
//! dead-letters what cannot succeed, drains gracefully on SIGTERM, and publishes the
//! queue depth — counting in-flight work — that autoscalers act on.
//!
//! ```no_run
//! use worker_core::{handler_fn, Job, JobError, MemoryBroker, Worker, WorkerConfig};
//!
//! #[derive(serde::Deserialize)]
//! struct Embed { doc_id: u64 }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let config = WorkerConfig::from_env()?;
//!     let handler = handler_fn(|job: Job<Embed>| async move {
//!         tracing::info!(doc = job.payload.doc_id, attempt = job.ctx.attempt(), "embedding");
//!         Ok::<_, JobError>(())
//!     });
//!     Worker::new(MemoryBroker::new(), config, handler).run_until_signal().await?;
//!     Ok(())
//! }
//! ```
//!
//! A [`batch::BatchHandler`] runs jobs in dynamic micro-batches (up to a size, or
//! what arrived within a wait), with an outcome per job; [`batch::Batched`] makes it a
//! [`Handler`].
//!
//! A long job can save its progress with [`JobContext::checkpoint`]; the job's next
//! delivery, after a drain, a crash or a retry, reads it back with
//! [`JobContext::last_checkpoint`] and resumes there. A handler that saved its place
//! when the drain began returns [`JobError::interrupted`] to hand the job back at once.
//!
//! On Kubernetes, a worker can also keep its pod's `controller.kubernetes.io/pod-deletion-cost`
//! annotation equal to its jobs in flight, so a scale-down removes idle pods first
//! ([`PodDeletionCost`], `WORKER_POD_DELETION_COST=true`; off by default).
//!
//! Backends implement [`Broker`]; [`MemoryBroker`] is the in-process one. With the
//! `testing` feature, `worker_core::testing` holds the conformance suite every backend
//! passes unchanged.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod batch;
pub mod broker;
pub mod config;
pub mod error;
pub mod handler;
pub mod job;
mod kubernetes;
pub mod lifecycle;
mod runtime;
mod scheduler;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

pub use async_trait::async_trait;
pub use broker::memory::MemoryBroker;
pub use broker::{
    Broker, DeadLetter, Delivery, FetchPlan, FetchShare, Lease, LeaseToken, QueueDepth, WorkerInfo,
};
pub use config::{
    redact, Backoff, PodDeletionCost, QueueSpec, Scheduling, SecretSource, WorkerConfig,
    WorkerConfigBuilder,
};
pub use error::{BrokerError, ConfigError, JobError, Transience, WorkerError};
pub use handler::{handler_fn, Handler, HandlerFn};
pub use job::{Envelope, Job, JobContext, JobId, NewJob};
pub use lifecycle::{ShutdownHandle, State};
pub use runtime::{RunReport, RunningWorker, Settled, Worker};
pub use telemetry::scaling::ScalingDoc;
pub use tokio_util::sync::CancellationToken;

/// The README's code blocks, compiled and run as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
