//! Redis errors as [`BrokerError`]s, each classified transient or permanent.
//!
//! Transient: the connection (lost, refused, timed out) and every refusal by a server
//! that is fine but cannot serve the call now: out of memory under `noeviction`, busy
//! running a script, loading its data, a replica or a demoted master, a failover or a
//! cluster reshuffle under way, too few replicas to write. The runtime backs off on
//! these and keeps its leases. Permanent: replies that a retry would repeat (a bad
//! command, a wrong type, a denied permission). A lost lease is never an error reply: it
//! is a script's own `0`, turned into [`BrokerError::LeaseLost`] by its caller.

use redis::{ErrorKind, RedisError, RetryMethod, ServerErrorKind};
use worker_core::BrokerError;

/// Map a Redis error, keeping it as the cause.
pub(crate) fn from_redis(op: &str, e: RedisError) -> BrokerError {
    if is_transient(&e) {
        BrokerError::unavailable(format!("redis {op}"), e)
    } else {
        BrokerError::Protocol(format!("redis {op}: {e}"))
    }
}

/// Whether waiting may cure `e`.
fn is_transient(e: &RedisError) -> bool {
    match e.kind() {
        ErrorKind::Server(kind) => server_kind_is_transient(kind).unwrap_or_else(|| retries(e)),
        // Codes redis-rs has no kind for (OOM, BUSY, NOREPLICAS, ...): a pipeline's
        // error carries one per failed command.
        ErrorKind::Extension => e
            .clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, s)| code_is_transient(s.code()))),
        // The connection: dropped, refused, timed out, or a reply cut short (Parse:
        // the connection is reset). A reconnect may cure it; an I/O error redis-rs will
        // not retry (permission denied, unsupported) is the setup's.
        ErrorKind::Io | ErrorKind::Parse => {
            retries(e) || e.is_connection_refusal() || e.is_timeout()
        }
        // A password rotated while the worker runs is accepted again after a reconnect.
        ErrorKind::AuthenticationFailed => true,
        // The sentinels or the cluster have no master for us yet (a failover).
        ErrorKind::MasterNameNotFoundBySentinel
        | ErrorKind::NoValidReplicasFoundBySentinel
        | ErrorKind::ClusterConnectionNotFound => true,
        // Refused by the client before sending, or a reply of the wrong shape: the
        // same call fails the same way again.
        ErrorKind::UnexpectedReturnType
        | ErrorKind::InvalidClientConfig
        | ErrorKind::Client
        | ErrorKind::EmptySentinelList
        | ErrorKind::RESP3NotSupported => false,
        // Kinds added after redis-rs 1.8 (and `Serialize`, behind its `json` feature):
        // redis-rs's own retry hint says whether waiting helps.
        _ => retries(e),
    }
}

/// Whether redis-rs would try `e` again in some way.
fn retries(e: &RedisError) -> bool {
    !matches!(e.retry_method(), RetryMethod::NoRetry)
}

/// The kinds redis-rs names (`None` for one added after 1.8). Each one's code is what
/// the server sends, e.g. `-LOADING Redis is loading the dataset in memory`.
fn server_kind_is_transient(kind: ServerErrorKind) -> Option<bool> {
    Some(match kind {
        // LOADING, TRYAGAIN, CLUSTERDOWN, MASTERDOWN: the server or the cluster is
        // starting, resharding or failing over.
        ServerErrorKind::BusyLoading
        | ServerErrorKind::TryAgain
        | ServerErrorKind::ClusterDown
        | ServerErrorKind::MasterDown
        // READONLY: the node was a master and is a replica now (a failover); the
        // client reconnects to the new master.
        | ServerErrorKind::ReadOnly
        // MOVED, ASK: a slot is moving; the cluster client follows the redirect, so
        // one that reaches us was seen mid-move.
        | ServerErrorKind::Moved
        | ServerErrorKind::Ask => true,
        // ERR and EXECABORT: the command itself is wrong. NOSCRIPT: the script client
        // loads the script and calls again, so one that reaches us was refused twice.
        // CROSSSLOT: our keys share one hash tag, so it is a bug. NOPERM: an ACL denies
        // the command until an operator changes it. NOTBUSY, NOSUB: not ours to send.
        ServerErrorKind::ResponseError
        | ServerErrorKind::ExecAbort
        | ServerErrorKind::NoScript
        | ServerErrorKind::CrossSlot
        | ServerErrorKind::NoPerm
        | ServerErrorKind::NotBusy
        | ServerErrorKind::NoSub => false,
        // Kinds added after redis-rs 1.8: the caller asks redis-rs's own retry hint.
        _ => return None,
    })
}

/// Error codes of Redis (7.x) that redis-rs has no kind for.
fn code_is_transient(code: &str) -> bool {
    matches!(
        code,
        // Out of memory under `maxmemory-policy noeviction`: writes that need memory
        // are refused until memory is freed.
        "OOM"
        // A script or function runs past `busy-reply-threshold`.
        | "BUSY"
        // `min-replicas-to-write` is not met: too few replicas are connected.
        | "NOREPLICAS"
        // An RDB save failed and `stop-writes-on-bgsave-error` is on: writes are
        // refused until a save succeeds.
        | "MISCONF"
        // A blocked call was released by a role change or CLIENT UNBLOCK.
        | "UNBLOCKED"
    )
    // Everything else is the command's own fault and repeats: WRONGTYPE, NOAUTH,
    // WRONGPASS, NOPROTO, and BUSYKEY (RESTORE onto a key that exists).
}

/// A copy of `e` for each of several callers that shared one failed call: the same
/// message, the same transience, and the same cause when it is a Redis error.
pub(crate) fn for_each_waiter(e: &BrokerError) -> BrokerError {
    match e {
        BrokerError::Protocol(m) => BrokerError::Protocol(m.clone()),
        BrokerError::Unavailable { message, source } => {
            match source
                .as_deref()
                .and_then(|s| s.downcast_ref::<RedisError>())
            {
                Some(redis) => BrokerError::unavailable(message.clone(), redis.clone()),
                None => BrokerError::Unavailable {
                    message: match source {
                        Some(source) => format!("{message}: {source}"),
                        None => message.clone(),
                    },
                    source: None,
                },
            }
        }
        e => BrokerError::Protocol(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;

    /// A reply as a Redis 7.0 server sent it (inside a script, the server appends the
    /// script and line), as redis-rs hands it over.
    fn reply(line: &str) -> RedisError {
        match redis::parse_redis_value(format!("-{line}\r\n").as_bytes()) {
            Ok(v) => v.extract_error().expect_err("an error reply"),
            Err(e) => e,
        }
    }

    const REFUSALS: &[&str] = &[
        "OOM command not allowed when used memory > 'maxmemory'. script: f432f892433df20249e53692d6e4006fa2f47d8e, on @user_script:1.",
        "OOM command not allowed when used memory > 'maxmemory'.",
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
        "READONLY You can't write against a read only replica. script: 085b95535bfb0e3e20f6f8e5223bfb3be0ad3db7, on @user_script:1.",
        "NOREPLICAS Not enough good replicas to write. script: 085b95535bfb0e3e20f6f8e5223bfb3be0ad3db7, on @user_script:1.",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "LOADING Redis is loading the dataset in memory",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN The cluster is down",
        "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
        "UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)",
    ];

    const MISTAKES: &[&str] = &[
        "ERR unknown command 'NOPE', with args beginning with: ",
        "WRONGTYPE Operation against a key holding the wrong kind of value",
        "NOPERM User worker has no permissions to run the 'evalsha' command",
        "NOSCRIPT No matching script. Please use EVAL.",
        "CROSSSLOT Keys in request don't hash to the same slot",
        "BUSYKEY Target key name already exists.",
        "NOAUTH Authentication required.",
        "EXECABORT Transaction discarded because of previous errors.",
    ];

    #[test]
    fn server_refusals_are_transient_and_keep_the_reply_as_their_cause() {
        for line in REFUSALS {
            let e = from_redis("extend_lease", reply(line));
            assert!(e.is_transient(), "{line}: {e}");
            // The server's words, after its code (redis-rs names known codes its own way).
            let detail = line.split_once(' ').map_or("", |(_, d)| d);
            let cause = e.source().map(|s| s.to_string()).unwrap_or_default();
            assert!(cause.contains(detail), "{line}: cause {cause:?}");
        }
    }

    #[test]
    fn replies_a_retry_would_repeat_are_permanent() {
        for line in MISTAKES {
            let e = from_redis("extend_lease", reply(line));
            assert!(!e.is_transient(), "{line}: {e}");
            assert!(!matches!(e, BrokerError::LeaseLost { .. }), "{line}");
        }
    }

    #[test]
    fn a_lost_connection_is_transient() {
        for kind in [
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::TimedOut,
            std::io::ErrorKind::BrokenPipe,
        ] {
            let e = from_redis("fetch", std::io::Error::from(kind).into());
            assert!(e.is_transient(), "{kind:?}: {e}");
        }
    }

    #[test]
    fn each_waiter_of_a_shared_call_gets_the_cause() {
        let shared = from_redis("ack", reply(REFUSALS[0]));
        let copy = for_each_waiter(&shared);
        assert!(copy.is_transient());
        let cause = copy.source().map(|s| s.to_string()).unwrap_or_default();
        assert!(cause.contains("OOM"), "{cause}");
        let permanent = for_each_waiter(&from_redis("ack", reply(MISTAKES[1])));
        assert!(!permanent.is_transient());
        assert!(permanent.to_string().contains("WRONGTYPE"), "{permanent}");
    }
}
