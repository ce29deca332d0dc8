//! Writes confirmed by replicas before they are acknowledged: a script call and a
//! `WAIT` in one pipeline, so both travel on the connection that made the write (a
//! `WAIT` on another connection would count that connection's writes, not these).

use std::time::Duration;

use redis::{ErrorKind, FromRedisValue, Script, ServerErrorKind, Value};
use worker_core::BrokerError;

use crate::broker::Conn;
use crate::error::from_redis;

/// How many replicas must confirm a write, and how long to wait for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WaitReplicas {
    /// Replicas that must hold the write (1 or more).
    pub replicas: u32,
    /// The longest wait for them; past it the call fails as transient.
    pub timeout: Duration,
}

/// Call `script` with `keys` and `args` (the arguments of an `EVALSHA` after the key
/// count); with `wait`, then `WAIT` for its replicas on the same connection. The
/// script's reply, or `Unavailable` when fewer replicas confirmed in time.
pub(crate) async fn eval<T: FromRedisValue>(
    op: &'static str,
    conn: &Conn,
    script: &Script,
    keys: &[String],
    args: &[Vec<u8>],
    wait: Option<WaitReplicas>,
) -> Result<T, BrokerError> {
    let mut pipe = redis::pipe();
    pipe.cmd("EVALSHA")
        .arg(script.get_hash())
        .arg(keys.len())
        .arg(keys)
        .arg(args);
    if let Some(wait) = wait {
        pipe.cmd("WAIT").arg(wait.replicas).arg(
            u64::try_from(wait.timeout.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
        );
    }
    let mut loaded = false;
    let replies: Vec<Value> = loop {
        let sent = match conn.clone() {
            Conn::Single(mut c) => pipe.query_async(&mut c).await,
            Conn::Cluster(mut c) => pipe.query_async(&mut c).await,
        };
        match sent {
            // A server that does not have the script yet (restarted, or a replica just
            // promoted): load it and send again. The failed EVALSHA wrote nothing.
            Err(e) if !loaded && e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                let load = match conn.clone() {
                    Conn::Single(mut c) => script.load_async(&mut c).await,
                    Conn::Cluster(mut c) => script.load_async(&mut c).await,
                };
                load.map_err(|e| from_redis(op, e))?;
                loaded = true;
            }
            Err(e) => return Err(from_redis(op, e)),
            Ok(reply) => break reply,
        }
    };
    let mut replies = replies.into_iter();
    let reply = replies
        .next()
        .ok_or_else(|| BrokerError::Protocol(format!("redis {op}: empty pipeline reply")))?;
    if let Some(wait) = wait {
        let confirmed = match replies.next() {
            Some(Value::Int(n)) => n,
            other => {
                return Err(BrokerError::Protocol(format!(
                    "redis {op}: WAIT answered {other:?}"
                )))
            }
        };
        if confirmed < i64::from(wait.replicas) {
            return Err(BrokerError::Unavailable {
                message: format!(
                    "redis {op}: written on the master, but confirmed by {confirmed} of the {} \
                 replicas asked for within {:?}; it may not survive a failover of that \
                 master (sending the same job ids again is safe)",
                    wait.replicas, wait.timeout
                ),
                source: None,
            });
        }
    }
    T::from_redis_value(reply).map_err(|e| BrokerError::Protocol(format!("redis {op}: {e}")))
}
