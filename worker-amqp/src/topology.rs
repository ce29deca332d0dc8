//! Queue names and the arguments each is declared with. Declaring is idempotent: the
//! same name with the same arguments is a no-op on the broker, so every process
//! declares what it uses, after every reconnect.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString};

/// How RabbitMQ stores a queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueType {
    /// One node's queue: the fastest; durable with persistent messages.
    #[default]
    Classic,
    /// Replicated by Raft across the cluster; counts deliveries itself
    /// (`x-delivery-count`), so a job that crashes its workers is counted exactly.
    Quorum,
}

impl QueueType {
    fn as_arg(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }

    /// Parse `classic` or `quorum`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "classic" => Some(Self::Classic),
            "quorum" => Some(Self::Quorum),
            _ => None,
        }
    }
}

/// The queue of dead letters of `queue`.
pub(crate) fn dead_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// Prefix of the delay queues of `queue`.
pub(crate) fn delay_prefix(queue: &str) -> String {
    format!("{queue}.delay.")
}

/// The delay queue that holds messages of `queue` for about `delay`.
pub(crate) fn delay_queue(queue: &str, delay_ms: u64) -> String {
    format!("{}{delay_ms}", delay_prefix(queue))
}

/// The delay levels: a delay is rounded to two significant digits (at most 5 % off),
/// so retries with jittered backoff share a bounded set of delay queues.
pub(crate) fn delay_level(delay: Duration) -> u64 {
    let ms = delay.as_millis().min(u128::from(u32::MAX)) as u64;
    if ms < 100 {
        return ms.max(1);
    }
    let mut scale = 1;
    while ms / scale >= 100 {
        scale *= 10;
    }
    ((ms + scale / 2) / scale) * scale
}

/// An unused delay queue disappears after its own delay plus this.
const DELAY_QUEUE_IDLE: Duration = Duration::from_secs(3600);

/// Re-declare a delay queue before publishing when the last declaration is older than
/// this, so its expiry (counted from the last declaration) never catches a message.
pub(crate) const DELAY_REDECLARE: Duration = Duration::from_secs(1800);

/// Prefix of the registry queues (one per live worker).
pub(crate) const WORKERS_PREFIX: &str = "wp.workers.";

/// The registry queue of worker `id`.
pub(crate) fn worker_queue(id: &str) -> String {
    format!("{WORKERS_PREFIX}{id}")
}

fn typed(kind: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(kind.as_arg().into()),
    );
    args
}

/// A work queue.
pub(crate) fn work_args(kind: QueueType) -> FieldTable {
    typed(kind)
}

/// A dead-letter queue.
pub(crate) fn dead_args(kind: QueueType) -> FieldTable {
    typed(kind)
}

/// A delay queue: every message waits `level_ms`, then RabbitMQ dead-letters it
/// through the default exchange back to `queue`.
pub(crate) fn delay_args(kind: QueueType, queue: &str, level_ms: u64) -> FieldTable {
    let mut args = typed(kind);
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(level_ms as i64),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(queue.into()),
    );
    if kind == QueueType::Quorum {
        // Without it a quorum queue dead-letters at most once (and may drop on a
        // leader change); at-least-once needs reject-publish overflow.
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
    let idle = DELAY_QUEUE_IDLE.as_millis() as u64 + level_ms * 2;
    args.insert("x-expires".into(), AMQPValue::LongLongInt(idle as i64));
    args
}

/// An unused registry queue disappears after this.
const WORKER_QUEUE_IDLE: Duration = Duration::from_secs(600);

/// A registry queue: holds one message, the worker's latest beat, which expires with
/// the beat's TTL. A worker that vanished without deregistering leaves an empty queue
/// behind; listing deletes it, and so does the broker once nobody declared or read it
/// for [`WORKER_QUEUE_IDLE`].
pub(crate) fn worker_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(WORKER_QUEUE_IDLE.as_millis() as i64),
    );
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_levels_keep_two_significant_digits() {
        let level = |ms| delay_level(Duration::from_millis(ms));
        assert_eq!(level(0), 1);
        assert_eq!(level(42), 42);
        assert_eq!(level(300), 300);
        assert_eq!(level(1234), 1200);
        assert_eq!(level(1250), 1300);
        assert_eq!(level(98_765), 99_000);
        for ms in [150u64, 777, 12_345, 3_600_000, 86_400_000] {
            let l = level(ms);
            assert!(l.abs_diff(ms) * 20 <= ms, "{ms} -> {l}");
        }
    }

    #[test]
    fn names_hang_off_the_work_queue() {
        assert_eq!(dead_queue("emails"), "emails.dead");
        assert_eq!(delay_queue("emails", 300), "emails.delay.300");
        assert!(delay_queue("emails", 300).starts_with(&delay_prefix("emails")));
    }
}
