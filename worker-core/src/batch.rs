//! Dynamic micro-batching: a [`BatchHandler`] receives up to `max_size` jobs, or
//! whatever arrived within `max_wait` of the first, runs them together, and reports an
//! outcome per job.
//!
//! [`Batched`] turns a batch handler into a [`Handler`], so every job keeps the
//! runtime's guarantees on its own: its lease is extended while it waits and while its
//! batch runs, its outcome is acked, retried or dead-lettered on its own (one failure
//! does not fail the batch), and a drain or crash hands it back like any other job.
//!
//! At most `streams` batches run at once (one per GPU, say). Jobs that arrive while
//! every stream is busy wait, and form the next batch as soon as a stream frees, so
//! under load batches fill up; when the worker begins to drain, the batch being formed
//! runs at once with what it has, rather than waiting for jobs that will not come.
//!
//! Each waiting job holds one of the worker's concurrency permits, so set
//! `WORKER_CONCURRENCY` to `max_size × streams` ([`BatchConfig::concurrency`]): fewer,
//! and batches cannot fill; more, and jobs wait in the worker for a stream.
//!
//! ```
//! use worker_core::batch::{Batch, BatchConfig, BatchHandler, Batched};
//! use worker_core::{async_trait, JobError};
//! use std::time::Duration;
//!
//! #[derive(serde::Deserialize)]
//! struct Prompt { text: String }
//!
//! struct Model;
//!
//! #[async_trait]
//! impl BatchHandler for Model {
//!     type Payload = Prompt;
//!     async fn handle_batch(&self, batch: Batch<Prompt>) -> Vec<Result<(), JobError>> {
//!         // One forward pass for the whole batch; one outcome per job, in order.
//!         batch
//!             .jobs
//!             .iter()
//!             .map(|job| {
//!                 if job.payload.text.is_empty() {
//!                     Err(JobError::fatal("empty prompt"))
//!                 } else {
//!                     Ok(())
//!                 }
//!             })
//!             .collect()
//!     }
//! }
//!
//! let config = BatchConfig::new(8, Duration::from_millis(20)).streams(2);
//! assert_eq!(config.concurrency(), 16);
//! let handler = Batched::new(Model, config); // a Handler, for Worker::new
//! # let _ = handler;
//! ```

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::error::{ConfigError, JobError};
use crate::handler::Handler;
use crate::job::Job;

/// How batches form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most jobs in one batch.
    pub max_size: usize,
    /// Longest a batch waits to fill, from the arrival of its first job.
    pub max_wait: Duration,
    /// Batches running at once.
    pub streams: usize,
}

impl BatchConfig {
    /// Batches of up to `max_size` jobs, waiting at most `max_wait` to fill, one at a
    /// time. A `max_size` of 0 counts as 1.
    pub fn new(max_size: usize, max_wait: Duration) -> Self {
        Self {
            max_size: max_size.max(1),
            max_wait,
            streams: 1,
        }
    }

    /// Run up to `n` batches at once (at least 1).
    pub fn streams(mut self, n: usize) -> Self {
        self.streams = n.max(1);
        self
    }

    /// From `BATCH_MAX_SIZE` (default 8), `BATCH_MAX_WAIT` (default `20ms`) and
    /// `BATCH_STREAMS` (default `default_streams`). A bad value names the variable.
    pub fn from_env(default_streams: usize) -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok(), default_streams)
    }

    pub(crate) fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
        default_streams: usize,
    ) -> Result<Self, ConfigError> {
        let get = |k: &str| {
            lookup(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let positive = |k: &str, default: usize| -> Result<usize, ConfigError> {
            match get(k) {
                None => Ok(default),
                Some(v) => match v.parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(ConfigError::invalid(k, v, "a positive integer")),
                },
            }
        };
        let max_wait = match get("BATCH_MAX_WAIT") {
            None => Duration::from_millis(20),
            Some(v) => humantime::parse_duration(&v).map_err(|_| {
                ConfigError::invalid("BATCH_MAX_WAIT", v, "a duration such as 20ms or 1s")
            })?,
        };
        Ok(Self::new(positive("BATCH_MAX_SIZE", 8)?, max_wait)
            .streams(positive("BATCH_STREAMS", default_streams.max(1))?))
    }

    /// The worker concurrency that lets every stream run a full batch:
    /// `max_size × streams`.
    pub fn concurrency(&self) -> u32 {
        u32::try_from(self.max_size.saturating_mul(self.streams)).unwrap_or(u32::MAX)
    }
}

/// Why a batch started when it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Formed {
    /// It reached `max_size`.
    Full,
    /// `max_wait` passed since its first job arrived.
    Waited,
    /// The worker began to drain: it runs with what it has.
    Draining,
}

/// The jobs of one batch and how it formed.
#[derive(Debug)]
#[non_exhaustive]
pub struct Batch<T> {
    /// The jobs, in arrival order; the outcomes must follow this order.
    pub jobs: Vec<Job<T>>,
    /// Which stream runs it, `0..streams` (a GPU index, say). No two batches run on
    /// the same stream at once.
    pub stream: usize,
    /// From the arrival of its first job to its start.
    pub formed_in: Duration,
    /// Why it started.
    pub formed: Formed,
}

/// Runs batches of jobs.
#[async_trait]
pub trait BatchHandler: Send + Sync + 'static {
    /// The payload type, decoded from JSON (a job that does not decode is
    /// dead-lettered before it reaches a batch).
    type Payload: DeserializeOwned + Send + 'static;

    /// Run one batch; return one outcome per job, in the order of `batch.jobs`. `Ok`
    /// acks a job, a [`JobError`] retries or dead-letters it alone. A job without an
    /// outcome (the list is short, or the handler panicked) is retried.
    ///
    /// Long batches should watch the jobs' [`cancellation`](crate::job::JobContext::cancellation):
    /// a job cancelled by the drain deadline is released by the runtime whatever the
    /// batch later says of it.
    async fn handle_batch(&self, batch: Batch<Self::Payload>) -> Vec<Result<(), JobError>>;
}

/// A job waiting for its batch, and where its outcome goes.
struct Waiting<T> {
    job: Job<T>,
    arrived: Instant,
    outcome: oneshot::Sender<Result<(), JobError>>,
}

/// A [`BatchHandler`] as a [`Handler`]: see the [module](self) docs.
pub struct Batched<B: BatchHandler> {
    handler: Arc<B>,
    config: BatchConfig,
    queue: OnceLock<mpsc::UnboundedSender<Waiting<B::Payload>>>,
}

impl<B: BatchHandler> Batched<B> {
    /// Batch the jobs of `handler` as `config` says.
    pub fn new(handler: B, config: BatchConfig) -> Self {
        Self {
            handler: Arc::new(handler),
            config,
            queue: OnceLock::new(),
        }
    }

    /// How its batches form.
    pub fn config(&self) -> BatchConfig {
        self.config
    }

    /// The batcher's queue, started on the first job (inside the worker's runtime).
    fn queue(&self) -> &mpsc::UnboundedSender<Waiting<B::Payload>> {
        self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(form_batches(self.handler.clone(), self.config, rx));
            tx
        })
    }
}

#[async_trait]
impl<B: BatchHandler> Handler for Batched<B> {
    type Payload = B::Payload;

    async fn handle(&self, job: Job<B::Payload>) -> Result<(), JobError> {
        let cancel = job.ctx.cancel.clone();
        let (outcome, rx) = oneshot::channel();
        let waiting = Waiting {
            job,
            arrived: Instant::now(),
            outcome,
        };
        if self.queue().send(waiting).is_err() {
            return Err(JobError::retry("the batcher has stopped"));
        }
        tokio::select! {
            outcome = rx => outcome.unwrap_or_else(|_| {
                Err(JobError::retry("its batch ended without an outcome for it"))
            }),
            // The runtime releases a cancelled job whatever this says.
            _ = cancel.cancelled() => Err(JobError::retry("cancelled while batched")),
        }
    }
}

/// Stream indexes not in use, and the permits that bound them.
struct Streams {
    permits: Arc<Semaphore>,
    free: Mutex<Vec<usize>>,
}

impl Streams {
    fn new(n: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(n)),
            free: Mutex::new((0..n).rev().collect()),
        }
    }

    async fn acquire(self: &Arc<Self>) -> Option<StreamGuard> {
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        let index = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
        Some(StreamGuard {
            streams: self.clone(),
            index,
            _permit: permit,
        })
    }
}

/// One stream in use; given back when dropped.
struct StreamGuard {
    streams: Arc<Streams>,
    index: usize,
    _permit: OwnedSemaphorePermit,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.streams
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.index);
    }
}

/// Form batches until every sender is gone: wait for a first job and a free stream,
/// take what is waiting, wait for more until the batch is full or `max_wait` has
/// passed since the first job arrived (or the worker drains), then run it.
async fn form_batches<B: BatchHandler>(
    handler: Arc<B>,
    config: BatchConfig,
    mut queue: mpsc::UnboundedReceiver<Waiting<B::Payload>>,
) {
    let streams = Arc::new(Streams::new(config.streams));
    while let Some(first) = queue.recv().await {
        let Some(stream) = streams.acquire().await else {
            return;
        };
        let deadline = first.arrived + config.max_wait;
        let drain = first.job.ctx.drain.clone();
        let mut batch = vec![first];
        let formed = loop {
            if batch.len() >= config.max_size {
                break Formed::Full;
            }
            if let Ok(next) = queue.try_recv() {
                batch.push(next);
                continue;
            }
            if drain.is_cancelled() {
                break Formed::Draining;
            }
            tokio::select! {
                next = queue.recv() => match next {
                    Some(next) => batch.push(next),
                    None => break Formed::Draining,
                },
                () = tokio::time::sleep_until(deadline) => break Formed::Waited,
                () = drain.cancelled() => break Formed::Draining,
            }
        };
        // A job whose wait was cut short (cancelled) is no longer the batch's.
        batch.retain(|w| !w.outcome.is_closed());
        if batch.is_empty() {
            continue;
        }
        let formed_in = batch
            .first()
            .map_or(Duration::ZERO, |w| w.arrived.elapsed());
        tracing::debug!(
            size = batch.len(),
            stream = stream.index,
            ?formed,
            ?formed_in,
            "batch formed"
        );
        tokio::spawn(run_batch(handler.clone(), batch, stream, formed_in, formed));
    }
}

async fn run_batch<B: BatchHandler>(
    handler: Arc<B>,
    batch: Vec<Waiting<B::Payload>>,
    stream: StreamGuard,
    formed_in: Duration,
    formed: Formed,
) {
    let size = batch.len();
    let (jobs, outcomes): (Vec<_>, Vec<_>) = batch.into_iter().map(|w| (w.job, w.outcome)).unzip();
    let batch = Batch {
        jobs,
        stream: stream.index,
        formed_in,
        formed,
    };
    let results = handler.handle_batch(batch).await;
    drop(stream);
    if results.len() != size {
        tracing::warn!(
            jobs = size,
            outcomes = results.len(),
            "the batch handler returned the wrong number of outcomes; jobs without one are retried"
        );
    }
    let mut results = results.into_iter();
    for outcome in outcomes {
        let result = results.next().unwrap_or_else(|| {
            Err(JobError::retry(format!(
                "the batch handler returned no outcome for this job (batch of {size})"
            )))
        });
        // The job's wait may have ended (cancelled): its outcome is then the runtime's.
        let _ = outcome.send(result);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::SystemTime;

    use bytes::Bytes;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::job::{JobContext, JobId};

    fn job(n: u32, drain: &CancellationToken) -> Job<u32> {
        Job {
            payload: n,
            raw: Bytes::new(),
            ctx: JobContext {
                id: JobId::random(),
                queue: "q".into(),
                attempt: 1,
                max_attempts: 3,
                cost: 1,
                enqueued_at: SystemTime::now(),
                headers: Arc::new(BTreeMap::new()),
                cancel: CancellationToken::new(),
                drain: drain.clone(),
                progress: None,
            },
        }
    }

    /// One batch as the handler saw it: payloads, stream, formed in, why.
    type Seen = (Vec<u32>, usize, Duration, Formed);

    /// Records each batch; fails odd payloads when asked; runs for `run`.
    struct Recorder {
        batches: Mutex<Vec<Seen>>,
        running: AtomicUsize,
        most_running: AtomicUsize,
        run: Duration,
        fail_odd: bool,
        short_by: usize,
    }

    impl Recorder {
        fn new(run: Duration) -> Self {
            Self {
                batches: Mutex::new(Vec::new()),
                running: AtomicUsize::new(0),
                most_running: AtomicUsize::new(0),
                run,
                fail_odd: false,
                short_by: 0,
            }
        }
    }

    #[async_trait]
    impl BatchHandler for Recorder {
        type Payload = u32;
        async fn handle_batch(&self, batch: Batch<u32>) -> Vec<Result<(), JobError>> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_running.fetch_max(now, Ordering::SeqCst);
            let payloads: Vec<u32> = batch.jobs.iter().map(|j| j.payload).collect();
            self.batches.lock().unwrap().push((
                payloads.clone(),
                batch.stream,
                batch.formed_in,
                batch.formed,
            ));
            tokio::time::sleep(self.run).await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            let keep = payloads.len().saturating_sub(self.short_by);
            payloads
                .into_iter()
                .take(keep)
                .map(|p| {
                    if self.fail_odd && p % 2 == 1 {
                        Err(JobError::fatal(format!("odd {p}")))
                    } else {
                        Ok(())
                    }
                })
                .collect()
        }
    }

    async fn submit_all(
        handler: &Arc<Batched<Recorder>>,
        n: u32,
        drain: &CancellationToken,
    ) -> Vec<Result<(), JobError>> {
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let handler = handler.clone();
                let job = job(i, drain);
                tokio::spawn(async move { handler.handle(job).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn batches_fill_up_to_the_size_and_the_rest_waits_for_the_stream() {
        let handler = Arc::new(Batched::new(
            Recorder::new(Duration::from_millis(100)),
            BatchConfig::new(4, Duration::from_millis(50)),
        ));
        let drain = CancellationToken::new();
        let results = submit_all(&handler, 10, &drain).await;
        assert!(results.iter().all(Result::is_ok));
        let batches = handler.handler.batches.lock().unwrap().clone();
        let sizes: Vec<usize> = batches.iter().map(|b| b.0.len()).collect();
        assert_eq!(sizes, vec![4, 4, 2]);
        assert_eq!(batches[0].3, Formed::Full);
        assert_eq!(batches[1].3, Formed::Full);
        // The last two waited for the stream (100 ms), which is past max_wait: they run
        // at once when it frees, formed by the wait.
        assert_eq!(batches[2].3, Formed::Waited);
        assert_eq!(batches[2].2, Duration::from_millis(200));
        assert_eq!(handler.handler.most_running.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_job_waits_max_wait_then_runs_alone() {
        let handler = Arc::new(Batched::new(
            Recorder::new(Duration::from_millis(5)),
            BatchConfig::new(8, Duration::from_millis(30)),
        ));
        let drain = CancellationToken::new();
        let started = Instant::now();
        let results = submit_all(&handler, 1, &drain).await;
        assert!(results[0].is_ok());
        let batches = handler.handler.batches.lock().unwrap().clone();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].0, vec![0]);
        assert_eq!(batches[0].2, Duration::from_millis(30));
        assert_eq!(batches[0].3, Formed::Waited);
        assert_eq!(started.elapsed(), Duration::from_millis(35));
    }

    #[tokio::test(start_paused = true)]
    async fn each_job_gets_its_own_outcome_and_missing_ones_are_retried() {
        let mut recorder = Recorder::new(Duration::from_millis(1));
        recorder.fail_odd = true;
        recorder.short_by = 1;
        let handler = Arc::new(Batched::new(
            recorder,
            BatchConfig::new(6, Duration::from_millis(10)),
        ));
        let drain = CancellationToken::new();
        let results = submit_all(&handler, 6, &drain).await;
        for (i, r) in results.iter().enumerate().take(5) {
            match r {
                Ok(()) => assert_eq!(i % 2, 0, "job {i}"),
                Err(e) => {
                    assert_eq!(i % 2, 1, "job {i}");
                    assert!(matches!(e, JobError::Fatal { .. }), "{e:?}");
                }
            }
        }
        // The handler returned five outcomes for six jobs: the sixth is retried.
        assert!(
            matches!(&results[5], Err(JobError::Retry { .. })),
            "{:?}",
            results[5]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn streams_run_batches_side_by_side_on_distinct_indexes() {
        let handler = Arc::new(Batched::new(
            Recorder::new(Duration::from_millis(100)),
            BatchConfig::new(2, Duration::from_millis(10)).streams(3),
        ));
        let drain = CancellationToken::new();
        let results = submit_all(&handler, 6, &drain).await;
        assert!(results.iter().all(Result::is_ok));
        let batches = handler.handler.batches.lock().unwrap().clone();
        assert_eq!(batches.len(), 3);
        assert_eq!(handler.handler.most_running.load(Ordering::SeqCst), 3);
        let mut streams: Vec<usize> = batches.iter().map(|b| b.1).collect();
        streams.sort_unstable();
        assert_eq!(streams, vec![0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_runs_the_forming_batch_at_once() {
        let handler = Arc::new(Batched::new(
            Recorder::new(Duration::from_millis(1)),
            BatchConfig::new(8, Duration::from_secs(60)),
        ));
        let drain = CancellationToken::new();
        let h = handler.clone();
        let d = drain.clone();
        let task = tokio::spawn(async move { submit_all(&h, 3, &d).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        drain.cancel();
        let results = task.await.unwrap();
        assert!(results.iter().all(Result::is_ok));
        let batches = handler.handler.batches.lock().unwrap().clone();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].0.len(), 3);
        assert_eq!(batches[0].3, Formed::Draining);
        assert_eq!(batches[0].2, Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_cancelled_while_waiting_leaves_its_batch() {
        let handler = Arc::new(Batched::new(
            Recorder::new(Duration::from_millis(1)),
            BatchConfig::new(8, Duration::from_millis(50)),
        ));
        let drain = CancellationToken::new();
        let cancelled = job(1, &drain);
        let token = cancelled.ctx.cancel.clone();
        let h = handler.clone();
        let waiting = tokio::spawn(async move { h.handle(cancelled).await });
        let h = handler.clone();
        let other = job(2, &drain);
        let kept = tokio::spawn(async move { h.handle(other).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        token.cancel();
        assert!(waiting.await.unwrap().is_err());
        assert!(kept.await.unwrap().is_ok());
        let batches = handler.handler.batches.lock().unwrap().clone();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].0, vec![2]);
    }

    #[test]
    fn config_from_the_environment_names_a_bad_variable() {
        let env = crate::config::lookup_of;
        let c = BatchConfig::from_lookup(env(&[]), 2).unwrap();
        assert_eq!(c, BatchConfig::new(8, Duration::from_millis(20)).streams(2));
        let c = BatchConfig::from_lookup(
            env(&[
                ("BATCH_MAX_SIZE", "16"),
                ("BATCH_MAX_WAIT", "5ms"),
                ("BATCH_STREAMS", "4"),
            ]),
            1,
        )
        .unwrap();
        assert_eq!(c.concurrency(), 64);
        for (k, v) in [
            ("BATCH_MAX_SIZE", "0"),
            ("BATCH_MAX_WAIT", "soon"),
            ("BATCH_STREAMS", "-1"),
        ] {
            let pairs: &'static [(&'static str, &'static str)] =
                Box::leak(vec![(k, v)].into_boxed_slice());
            let e = BatchConfig::from_lookup(env(pairs), 1).unwrap_err();
            assert!(e.to_string().contains(k), "{e}");
        }
    }
}
