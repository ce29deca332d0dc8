//! Jobs as they travel: what a producer enqueues ([`NewJob`]), what a broker stores
//! ([`Envelope`]), and what a handler receives ([`Job`] with its [`JobContext`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::BrokerError;

/// A job's stable identity, kept across retries, releases and redeliveries, so a
/// handler can make its side effects idempotent under at-least-once delivery.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(Arc<str>);

impl JobId {
    /// A new random id: 128 random bits in hex.
    pub fn random() -> Self {
        Self(format!("{:032x}", fastrand::u128(..)).into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for JobId {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<String> for JobId {
    fn from(s: String) -> Self {
        Self(s.into())
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A job to enqueue.
///
/// ```
/// use std::time::Duration;
/// use worker_core::NewJob;
///
/// let job = NewJob::json("emails", &serde_json::json!({"to": "a@example.com"}))?
///     .delay(Duration::from_secs(10))
///     .max_attempts(3)
///     .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
/// assert_eq!(job.queue, "emails");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct NewJob {
    /// Queue to put the job on.
    pub queue: String,
    /// Encoded payload (JSON unless the producer chose otherwise).
    pub payload: Bytes,
    /// Id to use; a random one when `None`.
    pub id: Option<JobId>,
    /// Do not start before this much time has passed.
    pub delay: Option<Duration>,
    /// Attempts before dead-lettering; the worker's setting when `None`.
    pub max_attempts: Option<u32>,
    /// Units of the pool's weighted budget this job holds while it runs (0 = none).
    pub cost: u32,
    /// Free-form headers, e.g. trace context.
    pub headers: BTreeMap<String, String>,
}

impl NewJob {
    /// A job with raw payload bytes.
    pub fn new(queue: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            queue: queue.into(),
            payload: payload.into(),
            id: None,
            delay: None,
            max_attempts: None,
            cost: 0,
            headers: BTreeMap::new(),
        }
    }

    /// A job whose payload is `value` encoded as JSON.
    pub fn json<T: Serialize + ?Sized>(
        queue: impl Into<String>,
        value: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self::new(queue, serde_json::to_vec(value)?))
    }

    /// Use this id instead of a random one.
    pub fn id(mut self, id: impl Into<JobId>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Make the job due only after `delay`.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Dead-letter after this many attempts.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// Units of the pool budget this job needs (see `WorkerConfig::budget`).
    pub fn cost(mut self, units: u32) -> Self {
        self.cost = units;
        self
    }

    /// Add a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }
}

/// One failed attempt, kept in the envelope so a dead letter shows its whole story.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AttemptRecord {
    /// Which attempt failed (1-based).
    pub attempt: u32,
    /// What went wrong.
    pub error: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl AttemptRecord {
    /// A record of `attempt` failing with `error` now.
    pub fn now(attempt: u32, error: impl Into<String>) -> Self {
        Self {
            attempt,
            error: clip(error.into(), MAX_ERROR_TEXT),
            at_ms: now_ms(),
        }
    }
}

/// The most bytes of one failure's error text a job keeps (cut at a character
/// boundary, marked with `…`): a job carries its history through every state, and
/// a handler's error may quote a whole input.
pub const MAX_ERROR_TEXT: usize = 2048;

/// `text` cut to at most `max` bytes at a character boundary, `…` marking the cut.
pub fn clip(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
    text
}

/// How many failures an envelope's history keeps; older ones are dropped first.
pub const MAX_HISTORY: usize = 16;

/// A job as a broker stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Envelope {
    /// Stable id.
    pub id: JobId,
    /// Queue it belongs to.
    pub queue: String,
    /// Encoded payload.
    #[serde(with = "payload_serde")]
    pub payload: Bytes,
    /// The attempt this delivery is (1 on first delivery). A retry or an expired
    /// lease counts an attempt; a release does not.
    pub attempt: u32,
    /// Attempts before dead-lettering; the worker's setting when `None`.
    pub max_attempts: Option<u32>,
    /// Budget units the job holds while running.
    pub cost: u32,
    /// Enqueue time, ms since the Unix epoch.
    pub enqueued_at_ms: u64,
    /// When it became (or becomes) due, ms since the Unix epoch: enqueue time, or the
    /// end of its delay or retry backoff.
    pub due_at_ms: u64,
    /// Headers given at enqueue.
    pub headers: BTreeMap<String, String>,
    /// The most recent failures, oldest first (at most [`MAX_HISTORY`]).
    pub history: Vec<AttemptRecord>,
    /// The progress a handler last saved with [`JobContext::checkpoint`]; it stays with
    /// the job through a release, a reclaimed lease and a retry, until the job is acked.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "checkpoint_serde"
    )]
    pub checkpoint: Option<Bytes>,
}

impl Envelope {
    /// The envelope a broker stores for `job` at enqueue time.
    pub fn from_new(job: NewJob) -> Self {
        let now = now_ms();
        let delay = job.delay.map_or(0, |d| d.as_millis() as u64);
        Self {
            id: job.id.unwrap_or_else(JobId::random),
            queue: job.queue,
            payload: job.payload,
            attempt: 1,
            max_attempts: job.max_attempts,
            cost: job.cost,
            enqueued_at_ms: now,
            due_at_ms: now + delay,
            headers: job.headers,
            history: Vec::new(),
            checkpoint: None,
        }
    }

    /// Record a failure of the current attempt.
    pub fn record_failure(&mut self, error: &str) {
        self.history.push(AttemptRecord::now(self.attempt, error));
        if self.history.len() > MAX_HISTORY {
            let extra = self.history.len() - MAX_HISTORY;
            self.history.drain(..extra);
        }
    }

    /// Encode for storage (JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        // A map of strings, numbers and base64-free byte arrays cannot fail to encode.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decode from storage.
    pub fn from_bytes(raw: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(raw)
    }
}

mod payload_serde {
    //! Payloads are stored as a UTF-8 string when they are valid UTF-8 (the common JSON
    //! case, readable in `redis-cli`), and as `{"base64": "..."}` otherwise: a third
    //! larger than the bytes, where a JSON array of numbers was four times larger and
    //! far costlier to parse. Arrays written by earlier versions are still read.
    use base64::Engine as _;
    use bytes::Bytes;
    use serde::ser::SerializeMap;
    use serde::{Deserialize, Deserializer, Serializer};

    const ENGINE: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(b) {
            Ok(text) => s.serialize_str(text),
            Err(_) => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("base64", &ENGINE.encode(b))?;
                map.end()
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Text(String),
        Encoded { base64: String },
        Bytes(Vec<u8>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        Ok(match Stored::deserialize(d)? {
            Stored::Text(s) => Bytes::from(s),
            Stored::Encoded { base64 } => Bytes::from(
                ENGINE
                    .decode(base64.as_bytes())
                    .map_err(serde::de::Error::custom)?,
            ),
            Stored::Bytes(b) => Bytes::from(b),
        })
    }
}

mod checkpoint_serde {
    //! A checkpoint is stored as the payload is: text when it is UTF-8, bytes otherwise.
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Option<Bytes>, s: S) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => super::payload_serde::serialize(b, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bytes>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super::payload_serde")] Bytes);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a handler knows about the job it runs.
#[derive(Clone, Debug)]
pub struct JobContext {
    pub(crate) id: JobId,
    pub(crate) queue: String,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) cost: u32,
    pub(crate) enqueued_at: SystemTime,
    pub(crate) headers: Arc<BTreeMap<String, String>>,
    pub(crate) cancel: CancellationToken,
    pub(crate) drain: CancellationToken,
    pub(crate) progress: Option<Arc<Progress>>,
}

/// What a job's context needs to save checkpoints: its broker, its lease and the
/// envelope it was delivered as.
pub(crate) struct Progress {
    broker: Arc<dyn crate::Broker>,
    /// The delivery's lease token (the lease's job and queue are the envelope's).
    token: crate::broker::LeaseToken,
    envelope: Arc<Envelope>,
    /// Held across a save, so saves are taken one at a time, in order.
    saving: tokio::sync::Mutex<()>,
    /// The checkpoint last saved, or the one delivered.
    last: std::sync::Mutex<Option<Bytes>>,
}

impl Progress {
    pub(crate) fn new(
        broker: Arc<dyn crate::Broker>,
        token: crate::broker::LeaseToken,
        envelope: Arc<Envelope>,
    ) -> Self {
        let last = std::sync::Mutex::new(envelope.checkpoint.clone());
        Self {
            broker,
            token,
            envelope,
            saving: tokio::sync::Mutex::new(()),
            last,
        }
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Progress")
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl JobContext {
    /// The job's stable id.
    pub fn id(&self) -> &JobId {
        &self.id
    }

    /// Queue the job came from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// This attempt's number, 1 on first delivery.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Attempts allowed before the job is dead-lettered.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Budget units the job declared (it holds them while running when the worker
    /// has a budget).
    pub fn cost(&self) -> u32 {
        self.cost
    }

    /// When the job was enqueued.
    pub fn enqueued_at(&self) -> SystemTime {
        self.enqueued_at
    }

    /// Headers given at enqueue.
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    /// Fires when the handler must stop: the drain deadline passed, the job's
    /// timeout ran out, or the lease was lost to another worker. Long handlers should
    /// watch this token and return early: a handler still running a short grace later
    /// is aborted at its next await. A success returned after it fired is still acked
    /// (unless the lease was lost); what an error means then is in the runtime's
    /// docs on cancelled handlers.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Whether [`cancellation`](Self::cancellation) has fired.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Fires when the worker begins to drain (the first SIGTERM): the job may still
    /// finish, until [`cancellation`](Self::cancellation) fires at the drain deadline.
    /// A handler that can stop at a safe point (a checkpoint, a batch boundary) may
    /// use it to stop early instead of being cut short.
    pub fn drain_started(&self) -> &CancellationToken {
        &self.drain
    }

    /// The progress saved by the latest [`checkpoint`](Self::checkpoint) of this job,
    /// on this attempt or an earlier one; `None` when the job starts from the beginning.
    ///
    /// A job released by a drain, reclaimed after its worker crashed, or retried after
    /// a failure is delivered with its last checkpoint, so a handler reads it first and
    /// resumes from there.
    pub fn last_checkpoint(&self) -> Option<Bytes> {
        let progress = self.progress.as_ref()?;
        progress
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Save the job's progress with the job itself, so that its next delivery (after a
    /// drain released it, a crash, or a retry) can resume from here through
    /// [`last_checkpoint`](Self::last_checkpoint) instead of starting over.
    ///
    /// Returns once the broker has stored it. Fenced by the job's lease: after the
    /// lease was lost to another worker it fails with [`BrokerError::LeaseLost`] and
    /// changes nothing, and the handler should stop. A backend that cannot store
    /// progress (AMQP) answers [`BrokerError::Unsupported`]; the job then runs on
    /// without checkpoints. Saves from one job are taken one at a time, in the order
    /// they are made. The checkpoint is stored as the payload is, so keep it small: a
    /// position, a cursor, a partial result, not the work itself.
    ///
    /// ```no_run
    /// use worker_core::{async_trait, Handler, Job, JobError};
    ///
    /// struct Count;
    ///
    /// #[async_trait]
    /// impl Handler for Count {
    ///     type Payload = u64;
    ///
    ///     async fn handle(&self, job: Job<u64>) -> Result<(), JobError> {
    ///         // Resume after the last item saved, or start at 0.
    ///         let mut next: u64 = match job.ctx().last_checkpoint() {
    ///             Some(saved) => std::str::from_utf8(&saved)?.parse()?,
    ///             None => 0,
    ///         };
    ///         while next < job.payload {
    ///             next += 1; // one unit of real work
    ///             if next % 100 == 0 || job.ctx().drain_started().is_cancelled() {
    ///                 job.ctx().checkpoint(next.to_string()).await?;
    ///             }
    ///         }
    ///         Ok(())
    ///     }
    /// }
    /// ```
    pub async fn checkpoint(&self, progress: impl Into<Bytes>) -> Result<(), BrokerError> {
        let Some(p) = &self.progress else {
            return Err(BrokerError::Unsupported {
                operation: "checkpoint",
                reason: "this job context has no broker behind it".into(),
            });
        };
        let data = progress.into();
        let _one_at_a_time = p.saving.lock().await;
        let lease = crate::Lease::new(p.envelope.id.clone(), p.envelope.queue.clone(), p.token);
        let mut job = Envelope::clone(&p.envelope);
        job.checkpoint = Some(data.clone());
        p.broker.checkpoint(&lease, &job).await?;
        *p.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(data);
        Ok(())
    }
}

/// A job handed to a handler: its decoded payload, raw bytes and context.
#[derive(Debug)]
#[non_exhaustive]
pub struct Job<T> {
    /// The decoded payload.
    pub payload: T,
    /// The payload bytes as enqueued.
    pub raw: Bytes,
    /// Id, queue, attempt, headers and cancellation.
    pub ctx: JobContext,
}

impl<T> Job<T> {
    /// The job's context.
    pub fn ctx(&self) -> &JobContext {
        &self.ctx
    }

    /// The job's id.
    pub fn id(&self) -> &JobId {
        &self.ctx.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_text_and_binary_payloads() {
        for payload in [
            Bytes::from_static(b"{\"a\":1}"),
            Bytes::from_static(&[0xff, 0, 7]),
        ] {
            let env = Envelope::from_new(NewJob::new("q", payload.clone()).cost(3));
            let back = Envelope::from_bytes(&env.to_bytes()).unwrap();
            assert_eq!(back, env);
            assert_eq!(back.payload, payload);
        }
    }

    #[test]
    fn binary_payloads_are_stored_compactly_and_old_arrays_still_read() {
        let payload = Bytes::from((0..=255u8).cycle().take(3000).collect::<Vec<u8>>());
        let env = Envelope::from_new(NewJob::new("q", payload.clone()));
        let stored = env.to_bytes();
        // base64: 4 bytes per 3, plus the envelope's other fields.
        assert!(
            stored.len() < payload.len() * 4 / 3 + 512,
            "{} bytes",
            stored.len()
        );
        assert_eq!(Envelope::from_bytes(&stored).unwrap().payload, payload);
        let mut old: serde_json::Value = serde_json::from_slice(&stored).unwrap();
        old["payload"] = serde_json::json!([0xff, 0, 7]);
        let back = Envelope::from_bytes(&serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(back.payload, Bytes::from_static(&[0xff, 0, 7]));
    }

    #[test]
    fn error_text_in_the_history_is_bounded() {
        let mut env = Envelope::from_new(NewJob::new("q", "x"));
        env.record_failure(&"é".repeat(10_000));
        let kept = &env.history[0].error;
        assert!(kept.len() <= MAX_ERROR_TEXT, "{}", kept.len());
        assert!(kept.ends_with('…'));
        env.record_failure("short");
        assert_eq!(env.history[1].error, "short");
    }

    #[test]
    fn history_is_bounded() {
        let mut env = Envelope::from_new(NewJob::new("q", "x"));
        for i in 0..40 {
            env.attempt = i + 1;
            env.record_failure("boom");
        }
        assert_eq!(env.history.len(), MAX_HISTORY);
        assert_eq!(env.history[0].attempt, 40 - MAX_HISTORY as u32 + 1);
    }
}
