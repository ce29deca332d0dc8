//! Redis errors as [`BrokerError`]s, each classified transient or permanent.

use redis::{RedisError, RetryMethod};
use worker_core::BrokerError;

/// Map a Redis error: anything a reconnect, a wait or a retry can cure is transient.
pub(crate) fn from_redis(op: &str, e: RedisError) -> BrokerError {
    let transient = match e.retry_method() {
        RetryMethod::Reconnect
        | RetryMethod::RetryImmediately
        | RetryMethod::WaitAndRetry
        | RetryMethod::AskRedirect
        | RetryMethod::MovedRedirect
        | RetryMethod::ReconnectFromInitialConnections
        | RetryMethod::RefreshSlotsAndRetry => true,
        RetryMethod::NoRetry => e.is_connection_refusal() || e.is_timeout(),
        // Methods added in later versions are all ways of retrying.
        _ => true,
    };
    if transient {
        BrokerError::unavailable(format!("redis {op}"), e)
    } else {
        BrokerError::Protocol(format!("redis {op}: {e}"))
    }
}

/// A copy of `e` for each of several callers that shared one failed call: the same
/// message and the same transience (the source itself cannot be shared).
pub(crate) fn for_each_waiter(e: &BrokerError) -> BrokerError {
    match e {
        BrokerError::Protocol(m) => BrokerError::Protocol(m.clone()),
        e if e.is_transient() => {
            let message = match std::error::Error::source(e) {
                Some(source) => format!("{e}: {source}"),
                None => e.to_string(),
            };
            BrokerError::Unavailable {
                message,
                source: None,
            }
        }
        e => BrokerError::Protocol(e.to_string()),
    }
}

/// `url` with any password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}")
            } else {
                format!("{scheme}://{user}@{host}")
            }
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_leave_redacted_urls() {
        assert_eq!(
            redact("redis://:s3cret@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(redact("rediss://app:s3cret@h:1"), "rediss://app:***@h:1");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("redis://app@h"), "redis://app@h");
    }
}
