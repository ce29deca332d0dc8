//! Errors, each named for what went wrong and classified as transient or permanent.

use std::fmt;
use std::time::Duration;

use crate::job::JobId;

/// What a handler returns when a job did not succeed.
///
/// Any `std::error::Error` converts into a retryable `JobError`, so `?` works in
/// handlers; use [`JobError::fatal`] for failures a retry cannot fix.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobError {
    /// Try again: after `after` if given, else after the worker's backoff.
    Retry {
        /// What went wrong, kept in the job's history.
        reason: String,
        /// Exact delay to use instead of the backoff.
        after: Option<Duration>,
    },
    /// Do not try again: dead-letter the job now with this reason.
    Fatal {
        /// What went wrong, kept in the dead letter.
        reason: String,
    },
    /// Not a failure: the handler stopped at a safe point because the worker is
    /// draining (see [`JobContext::drain_started`](crate::JobContext::drain_started)),
    /// usually right after a [`checkpoint`](crate::JobContext::checkpoint). The job
    /// goes back to its queue at once with its attempt unchanged, for another worker
    /// to resume. Returned while the worker is not draining, it counts as a retry, so
    /// a handler cannot hand a job back forever.
    Interrupted {
        /// Where the handler stopped, for the log.
        reason: String,
    },
}

impl JobError {
    /// A retryable failure; the worker's backoff picks the delay.
    pub fn retry(reason: impl fmt::Display) -> Self {
        Self::Retry {
            reason: reason.to_string(),
            after: None,
        }
    }

    /// A retryable failure to try again after exactly `after`.
    pub fn retry_after(reason: impl fmt::Display, after: Duration) -> Self {
        Self::Retry {
            reason: reason.to_string(),
            after: Some(after),
        }
    }

    /// A failure no retry can fix: the job is dead-lettered at once.
    pub fn fatal(reason: impl fmt::Display) -> Self {
        Self::Fatal {
            reason: reason.to_string(),
        }
    }

    /// The handler stopped early at a safe point because the worker is draining: the
    /// job is released, attempt unchanged, to resume elsewhere from its checkpoint.
    pub fn interrupted(reason: impl fmt::Display) -> Self {
        Self::Interrupted {
            reason: reason.to_string(),
        }
    }

    /// The failure's text.
    pub fn reason(&self) -> &str {
        match self {
            Self::Retry { reason, .. } | Self::Fatal { reason } | Self::Interrupted { reason } => {
                reason
            }
        }
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retry { reason, .. } => write!(f, "retryable: {reason}"),
            Self::Fatal { reason } => write!(f, "fatal: {reason}"),
            Self::Interrupted { reason } => write!(f, "interrupted: {reason}"),
        }
    }
}

impl<E: std::error::Error> From<E> for JobError {
    fn from(e: E) -> Self {
        Self::retry(e)
    }
}

/// Whether an error may go away by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transience {
    /// Back off and try again (connection lost, broker busy).
    Transient,
    /// Trying again will not help (bad input, a refused lease).
    Permanent,
}

/// An error from a [`Broker`](crate::Broker) operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The lease token no longer owns the job: the lease expired and the job was
    /// reclaimed, or the job was already settled. The operation changed nothing.
    #[error("lease lost for job {job_id}: the job is no longer owned by this delivery")]
    LeaseLost {
        /// The job concerned.
        job_id: JobId,
    },
    /// A payload over the configured size limit; nothing was written.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Payload size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A queue name the backend cannot accept; nothing was written.
    #[error("invalid queue name {name:?}: {reason}")]
    InvalidQueueName {
        /// The name given.
        name: String,
        /// Why it is refused.
        reason: String,
    },
    /// A job the backend cannot store as given (an id or header out of bounds, see
    /// [`validate_new_job`](crate::broker::validate_new_job)); nothing was written.
    #[error("invalid job {job:?}: {reason}")]
    InvalidJob {
        /// The job's id, or its position in the batch when it has none.
        job: String,
        /// Why it is refused.
        reason: String,
    },
    /// A job id already present in the queue; nothing was written.
    #[error("job {job_id} already exists")]
    DuplicateJob {
        /// The id given.
        job_id: JobId,
    },
    /// The broker could not be reached or answered with a passing failure.
    #[error("broker unavailable: {message}")]
    Unavailable {
        /// What happened (never includes credentials).
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The broker answered something the backend did not expect.
    #[error("broker protocol error: {0}")]
    Protocol(String),
    /// The backend cannot do this operation; nothing was changed.
    #[error("{operation} is not supported by this broker: {reason}")]
    Unsupported {
        /// The operation asked for.
        operation: &'static str,
        /// Why the backend cannot do it.
        reason: String,
    },
}

impl BrokerError {
    /// A transient error with a message and a source.
    pub fn unavailable(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Unavailable {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// Whether backing off and retrying may succeed.
    pub fn transience(&self) -> Transience {
        match self {
            Self::Unavailable { .. } => Transience::Transient,
            Self::LeaseLost { .. }
            | Self::PayloadTooLarge { .. }
            | Self::InvalidQueueName { .. }
            | Self::InvalidJob { .. }
            | Self::DuplicateJob { .. }
            | Self::Protocol(_)
            | Self::Unsupported { .. } => Transience::Permanent,
        }
    }

    /// Shorthand for `transience() == Transient`.
    pub fn is_transient(&self) -> bool {
        self.transience() == Transience::Transient
    }
}

/// An error and its causes on one line, for logs and messages: the text of many
/// errors leaves out their cause (reqwest's "Connection refused", the server's reply
/// behind a [`BrokerError::Unavailable`]).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A configuration value that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// An environment variable (or builder setting) with a value outside its form.
    #[error("{variable}={value:?} is invalid: expected {expected}")]
    Invalid {
        /// The variable or setting name, e.g. `WORKER_CONCURRENCY`.
        variable: String,
        /// The value given.
        value: String,
        /// The accepted form.
        expected: String,
    },
    /// A setting that is on needs things that are not there: variables unset, files
    /// that cannot be read.
    #[error("{setting} needs what is missing: {}", .missing.join("; "))]
    Missing {
        /// The setting that needs them, e.g. `WORKER_POD_DELETION_COST=true`.
        setting: String,
        /// Each missing thing, named with why it is needed or why it cannot be used.
        missing: Vec<String>,
    },
}

impl ConfigError {
    /// `variable` had `value`, which is not of the `expected` form.
    pub fn invalid(
        variable: impl Into<String>,
        value: impl Into<String>,
        expected: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            variable: variable.into(),
            value: value.into(),
            expected: expected.into(),
        }
    }

    /// `setting` is on but needs each of `missing`.
    pub fn missing(setting: impl Into<String>, missing: Vec<String>) -> Self {
        Self::Missing {
            setting: setting.into(),
            missing,
        }
    }
}

/// Why a worker could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// The worker's supervising task ended abnormally.
    #[error("worker task crashed: {0}")]
    Crashed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_mark_makes_a_retryable_error() {
        fn parse() -> Result<u32, JobError> {
            Ok("x".parse::<u32>()?)
        }
        assert!(matches!(parse(), Err(JobError::Retry { after: None, .. })));
    }

    #[test]
    fn only_unavailable_is_transient() {
        assert!(BrokerError::Unavailable {
            message: "down".into(),
            source: None
        }
        .is_transient());
        assert!(!BrokerError::LeaseLost { job_id: "a".into() }.is_transient());
    }

    #[test]
    fn config_error_names_variable_and_form() {
        let e = ConfigError::invalid("WORKER_CONCURRENCY", "lots", "a positive integer");
        assert_eq!(
            e.to_string(),
            "WORKER_CONCURRENCY=\"lots\" is invalid: expected a positive integer"
        );
        let e = ConfigError::missing(
            "WORKER_POD_DELETION_COST=true",
            vec![
                "POD_NAME (not set)".into(),
                "POD_NAMESPACE (not set)".into(),
            ],
        );
        assert_eq!(
            e.to_string(),
            "WORKER_POD_DELETION_COST=true needs what is missing: POD_NAME (not set); POD_NAMESPACE (not set)"
        );
    }
}
