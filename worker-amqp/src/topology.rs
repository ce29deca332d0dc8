//! Queue names and the arguments each is declared with. Declaring is idempotent: the
//! same name with the same arguments is a no-op on the broker, so every process
//! declares what it uses, after every reconnect.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString};
use worker_core::broker::validate_queue_name;
use worker_core::BrokerError;

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

/// A work queue's name as this backend accepts it: the rules every backend shares
/// ([`validate_queue_name`]), and none of the names of the queues it keeps beside
/// work queues (`<q>.dead`, `<q>.later.<n>`, the `<q>.delay.<n>` of earlier
/// versions, `wp.workers.<id>`), which a work queue of that name would collide with.
pub(crate) fn check_queue(name: &str) -> Result<(), BrokerError> {
    validate_queue_name(name)?;
    let numbered = |marker: &str| {
        name.rsplit_once(marker).is_some_and(|(base, n)| {
            !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
        })
    };
    let reason = if name.ends_with(".dead") {
        Some("it ends in .dead, the name of a queue's dead letters")
    } else if numbered(".later.") || numbered(".delay.") {
        Some("it ends in .later.<n> or .delay.<n>, the names of a queue's delayed jobs")
    } else if name.starts_with(WORKERS_PREFIX) {
        Some("it starts with wp.workers., the names of the worker registry")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(BrokerError::InvalidQueueName {
            name: name.to_owned(),
            reason: format!("{reason} on RabbitMQ"),
        }),
        None => Ok(()),
    }
}

/// The queue of dead letters of `queue`.
pub(crate) fn dead_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// Prefix of the later queues of `queue`.
pub(crate) fn later_prefix(queue: &str) -> String {
    format!("{queue}.later.")
}

/// Later queue `level` of `queue`.
pub(crate) fn later_queue(queue: &str, level: usize) -> String {
    format!("{}{level}", later_prefix(queue))
}

/// How many later queues a work queue may have.
pub(crate) const LATER_LEVELS: usize = 7;

/// How long a job waits in later queue `level` before it moves on: 250 ms × 4^level,
/// up to 1024 s (about 17 minutes, below RabbitMQ's default consumer timeout, since a
/// mover holds a job unacked while it waits).
pub(crate) fn later_hold(level: usize) -> Duration {
    Duration::from_millis(250) * 4u32.pow(level.min(LATER_LEVELS - 1) as u32)
}

/// The later queue for a job due in `remaining`: the highest level whose hold is not
/// longer than that (level 0 for less than its hold), among the `usable` lowest.
pub(crate) fn later_level(remaining: Duration, usable: usize) -> usize {
    (1..usable.clamp(1, LATER_LEVELS))
        .take_while(|&l| later_hold(l) <= remaining)
        .last()
        .unwrap_or(0)
}

/// How long after its hold RabbitMQ moves a job out of a later queue by itself (a
/// message TTL and a dead-letter route to the work queue), should no process move it
/// first: a job waits that much longer when no worker, exporter or producer of its
/// queue runs.
pub(crate) const LATER_FALLBACK: Duration = Duration::from_secs(60);

/// An unused later queue disappears after its hold, its fallback and this.
const LATER_QUEUE_IDLE: Duration = Duration::from_secs(3600);

/// Re-declare a later queue before publishing when the last declaration is older than
/// this, so its expiry (counted from the last use) never catches a message.
pub(crate) const LATER_REDECLARE: Duration = Duration::from_secs(1800);

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

/// Later queue `level` of `queue`: a process moves each job on when its hold ends
/// (see `broker::later`); the message TTL and dead-letter route back to `queue` are
/// only the fallback for when none does.
pub(crate) fn later_args(kind: QueueType, queue: &str, level: usize) -> FieldTable {
    let mut args = typed(kind);
    let ttl = later_hold(level) + LATER_FALLBACK;
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(ttl.as_millis() as i64),
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
    let idle = LATER_QUEUE_IDLE + ttl * 2;
    args.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(idle.as_millis() as i64),
    );
    args
}

/// An unused registry queue disappears after this.
const WORKER_QUEUE_IDLE: Duration = Duration::from_secs(600);

/// A registry queue: holds one message, the worker's latest beat, which expires with
/// the beat's TTL. A worker that vanished without deregistering leaves an empty queue
/// behind, which listings skip and the broker deletes once nobody declared or read it
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
    fn work_queues_cannot_take_the_names_of_the_queues_kept_beside_them() {
        for taken in [
            "jobs.dead",
            "jobs.later.0",
            "jobs.later.12",
            "jobs.delay.60000",
            "wp.workers.w1",
        ] {
            let e = check_queue(taken).unwrap_err();
            assert!(
                matches!(e, BrokerError::InvalidQueueName { .. }),
                "{taken}: {e}"
            );
        }
        for fine in [
            "jobs",
            "dead",
            "jobs.deadline",
            "jobs.later",
            "jobs.later.x",
            "wp.work",
        ] {
            assert!(check_queue(fine).is_ok(), "{fine}");
        }
        assert!(check_queue("has space").is_err());
    }

    #[test]
    fn a_job_waits_in_the_highest_level_not_longer_than_its_delay() {
        let level = |ms| later_level(Duration::from_millis(ms), LATER_LEVELS);
        assert_eq!(later_hold(0), Duration::from_millis(250));
        assert_eq!(later_hold(LATER_LEVELS - 1), Duration::from_secs(1024));
        assert_eq!(level(0), 0);
        assert_eq!(level(249), 0);
        assert_eq!(level(999), 0);
        assert_eq!(level(1000), 1);
        assert_eq!(level(5000), 2);
        assert_eq!(level(86_400_000), LATER_LEVELS - 1);
        assert_eq!(later_level(Duration::from_secs(3600), 3), 2);
        assert_eq!(later_level(Duration::from_secs(3600), 0), 0);
        for ms in [1u64, 300, 4_100, 70_000, 5_000_000] {
            let l = level(ms);
            assert!(
                l == 0 || later_hold(l) <= Duration::from_millis(ms),
                "{ms} -> {l}"
            );
        }
    }

    #[test]
    fn names_hang_off_the_work_queue() {
        assert_eq!(dead_queue("emails"), "emails.dead");
        assert_eq!(later_queue("emails", 3), "emails.later.3");
        assert!(later_queue("emails", 3).starts_with(&later_prefix("emails")));
    }
}
