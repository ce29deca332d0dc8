//! What a worker author writes: a [`Handler`], or a closure through [`handler_fn`].

use std::future::Future;
use std::marker::PhantomData;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::error::JobError;
use crate::job::Job;

/// Handles one job at a time; the runtime runs many at once up to its limits.
///
/// The payload is decoded from JSON into [`Handler::Payload`] before the handler runs;
/// a payload that does not decode is dead-lettered with the decode error and the
/// handler never sees it. The raw bytes stay available as [`Job::raw`].
///
/// A handler runs as its own tokio task. Lease extension runs on another task, but a
/// handler that computes for long stretches without reaching an `.await` holds a
/// runtime thread; put such work in [`tokio::task::spawn_blocking`] so leases, drain
/// and metrics stay on time.
///
/// ```
/// use worker_core::{async_trait, Handler, Job, JobError};
///
/// #[derive(serde::Deserialize)]
/// struct Resize { url: String, width: u32 }
///
/// struct Thumbnails;
///
/// #[async_trait]
/// impl Handler for Thumbnails {
///     type Payload = Resize;
///     async fn handle(&self, job: Job<Resize>) -> Result<(), JobError> {
///         if job.payload.width == 0 {
///             return Err(JobError::fatal("width must be positive"));
///         }
///         let _ = &job.payload.url; // fetch, resize, store...
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
#[diagnostic::on_unimplemented(
    note = "write `impl Handler for {Self}` with `type Payload`, or wrap an async closure with `worker_core::handler_fn`"
)]
pub trait Handler: Send + Sync + 'static {
    /// The payload type, decoded from JSON.
    type Payload: DeserializeOwned + Send + 'static;

    /// Run one job. `Ok` acks it; a [`JobError`] retries or dead-letters it.
    async fn handle(&self, job: Job<Self::Payload>) -> Result<(), JobError>;
}

/// A handler made from an async closure taking a [`Job<T>`].
///
/// ```
/// use worker_core::{handler_fn, Job, JobError};
///
/// let handler = handler_fn(|job: Job<String>| async move {
///     tracing::info!(greeting = %job.payload, "hello");
///     Ok::<(), JobError>(())
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn<T, F, Fut>(f: F) -> HandlerFn<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(Job<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), JobError>> + Send + 'static,
{
    HandlerFn {
        f,
        _payload: PhantomData,
    }
}

/// See [`handler_fn`].
pub struct HandlerFn<T, F> {
    f: F,
    _payload: PhantomData<fn() -> T>,
}

#[async_trait]
impl<T, F, Fut> Handler for HandlerFn<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(Job<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), JobError>> + Send + 'static,
{
    type Payload = T;

    async fn handle(&self, job: Job<T>) -> Result<(), JobError> {
        (self.f)(job).await
    }
}
