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
