//! Jobs as AMQP messages. The body is the payload as enqueued, so any AMQP client can
//! produce or read it; the job's state travels in `x-wp-*` headers. A message without
//! them (published by another producer) is a job on its first attempt.

use std::collections::BTreeMap;

use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use worker_core::job::{now_ms, AttemptRecord};
use worker_core::{Envelope, JobId};

const ATTEMPT: &str = "x-wp-attempt";
const MAX_ATTEMPTS: &str = "x-wp-max-attempts";
const COST: &str = "x-wp-cost";
const ENQUEUED_AT: &str = "x-wp-enqueued-at";
const DUE_AT: &str = "x-wp-due-at";
const HISTORY: &str = "x-wp-history";
const HEADERS: &str = "x-wp-headers";
const REASON: &str = "x-wp-reason";
const DIED_AT: &str = "x-wp-died-at";
/// In a later queue: when the job's hold there ends.
const RELEASE_AT: &str = "x-wp-release-at";
/// Quorum queues count the times a message went back to the queue unsettled.
const DELIVERY_COUNT: &str = "x-delivery-count";

/// Persistent (survives a broker restart on a durable queue).
const PERSISTENT: u8 = 2;

/// The properties that carry `env`'s state. `extra` adds dead-letter fields.
pub(crate) fn properties(env: &Envelope, extra: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert(ATTEMPT.into(), AMQPValue::LongLongInt(env.attempt as i64));
    if let Some(max) = env.max_attempts {
        h.insert(MAX_ATTEMPTS.into(), AMQPValue::LongLongInt(max as i64));
    }
    if env.cost > 0 {
        h.insert(COST.into(), AMQPValue::LongLongInt(env.cost as i64));
    }
    h.insert(
        ENQUEUED_AT.into(),
        AMQPValue::LongLongInt(env.enqueued_at_ms as i64),
    );
    h.insert(DUE_AT.into(), AMQPValue::LongLongInt(env.due_at_ms as i64));
    if !env.history.is_empty() {
        // A list of plain records: encoding cannot fail.
        let json = serde_json::to_string(&env.history).unwrap_or_default();
        h.insert(HISTORY.into(), AMQPValue::LongString(json.into()));
    }
    if !env.headers.is_empty() {
        let mut user = FieldTable::default();
        for (k, v) in &env.headers {
            user.insert(
                ShortString::from(k.as_str()),
                AMQPValue::LongString(v.as_str().into()),
            );
        }
        h.insert(HEADERS.into(), AMQPValue::FieldTable(user));
    }
    for (k, v) in extra {
        h.insert((*k).into(), v.clone());
    }
    BasicProperties::default()
        .with_message_id(env.id.as_str().into())
        .with_timestamp(env.enqueued_at_ms / 1000)
        .with_delivery_mode(PERSISTENT)
        .with_headers(h)
}

/// The headers a dead letter adds to its envelope's.
pub(crate) fn dead_fields(reason: &str, died_at_ms: u64) -> [(&'static str, AMQPValue); 2] {
    [
        (REASON, AMQPValue::LongString(reason.into())),
        (DIED_AT, AMQPValue::LongLongInt(died_at_ms as i64)),
    ]
}

/// The header a job in a later queue carries: its hold there ends at `at_ms`.
pub(crate) fn release_field(at_ms: u64) -> (&'static str, AMQPValue) {
    (RELEASE_AT, AMQPValue::LongLongInt(at_ms as i64))
}

/// When the hold of a job in a later queue ends: its release header, else its due time.
pub(crate) fn release_at(props: &BasicProperties, env: &Envelope) -> u64 {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(RELEASE_AT))
        .and_then(number)
        .unwrap_or(env.due_at_ms)
}

fn number(v: &AMQPValue) -> Option<u64> {
    match *v {
        AMQPValue::ShortShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(n.into()),
        AMQPValue::ShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortUInt(n) => Some(n.into()),
        AMQPValue::LongInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongUInt(n) => Some(n.into()),
        AMQPValue::LongLongInt(n) => u64::try_from(n).ok(),
        AMQPValue::Timestamp(n) => Some(n),
        _ => None,
    }
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// What a received message says about its job.
pub(crate) struct Decoded {
    /// The job, with its attempt as of this delivery.
    pub envelope: Envelope,
    /// For a dead letter: why, and when.
    pub dead: Option<(String, u64)>,
}

/// Read a job from a message of `queue`. `redelivered` is AMQP's flag: the message
/// went back to the queue without being settled (its consumer's channel closed), so
/// an attempt was spent unless the queue counts deliveries itself (quorum queues'
/// `x-delivery-count`, which is exact).
pub(crate) fn decode(
    queue: &str,
    data: Vec<u8>,
    props: &BasicProperties,
    redelivered: bool,
) -> Decoded {
    read(queue, data, props, Some(redelivered))
}

/// Read a job of `queue` from a message of one of its later queues, where no attempt
/// runs: going back unsettled spends none.
pub(crate) fn decode_waiting(queue: &str, data: Vec<u8>, props: &BasicProperties) -> Decoded {
    read(queue, data, props, None)
}

/// `redelivered`: `None` where a return spends no attempt.
fn read(queue: &str, data: Vec<u8>, props: &BasicProperties, redelivered: Option<bool>) -> Decoded {
    let empty = FieldTable::default();
    let h = props.headers().as_ref().unwrap_or(&empty).inner();
    let get = |k: &str| h.get(k);
    let now = now_ms();
    let id = props
        .message_id()
        .as_ref()
        .map(|s| JobId::from(s.as_str()))
        .unwrap_or_else(JobId::random);
    let base = get(ATTEMPT).and_then(number).unwrap_or(1).max(1);
    let returned = match (redelivered, get(DELIVERY_COUNT).and_then(number)) {
        (None, _) => 0,
        (Some(_), Some(count)) => count,
        (Some(flag), None) => u64::from(flag),
    };
    let enqueued_at = get(ENQUEUED_AT)
        .and_then(number)
        .or_else(|| props.timestamp().map(|s| s * 1000))
        .unwrap_or(now);
    let history: Vec<AttemptRecord> = match get(HISTORY).and_then(text) {
        Some(json) => serde_json::from_str(&json).unwrap_or_else(|e| {
            tracing::warn!(job = %id, error = %e, "unreadable attempt history header; starting a new one");
            Vec::new()
        }),
        None => Vec::new(),
    };
    let mut headers = BTreeMap::new();
    if let Some(AMQPValue::FieldTable(user)) = get(HEADERS) {
        for (k, v) in user.inner() {
            if let Some(v) = text(v) {
                headers.insert(k.as_str().to_owned(), v);
            }
        }
    }
    let mut envelope = Envelope::from_new(worker_core::NewJob::new(queue, Bytes::from(data)));
    envelope.id = id;
    envelope.attempt = (base + returned).min(u64::from(u32::MAX)) as u32;
    envelope.max_attempts = get(MAX_ATTEMPTS)
        .and_then(number)
        .map(|n| n.min(u64::from(u32::MAX)) as u32);
    envelope.cost = get(COST)
        .and_then(number)
        .map_or(0, |n| n.min(u64::from(u32::MAX)) as u32);
    envelope.enqueued_at_ms = enqueued_at;
    envelope.due_at_ms = get(DUE_AT).and_then(number).unwrap_or(enqueued_at);
    envelope.headers = headers;
    envelope.history = history;
    let dead = get(REASON).and_then(text).map(|reason| {
        let at = get(DIED_AT).and_then(number).unwrap_or(now);
        (reason, at)
    });
    Decoded { envelope, dead }
}

#[cfg(test)]
mod tests {
    use super::*;
    use worker_core::NewJob;

    fn round_trip(env: &Envelope, redelivered: bool) -> Envelope {
        let props = properties(env, &[]);
        decode(&env.queue, env.payload.to_vec(), &props, redelivered).envelope
    }

    #[test]
    fn every_field_survives_the_headers() {
        let mut env = Envelope::from_new(
            NewJob::new("q", vec![0u8, 255, 7])
                .id("job-1")
                .cost(3)
                .max_attempts(9)
                .header("traceparent", "00-1-2-01"),
        );
        env.attempt = 4;
        env.record_failure("boom");
        assert_eq!(round_trip(&env, false), env);
    }

    #[test]
    fn a_redelivery_counts_an_attempt() {
        let env = Envelope::from_new(NewJob::new("q", "x"));
        assert_eq!(round_trip(&env, true).attempt, 2);
    }

    #[test]
    fn quorum_delivery_count_is_used_instead_of_the_flag() {
        let env = Envelope::from_new(NewJob::new("q", "x"));
        let mut props = properties(&env, &[]);
        let mut h = props.headers().clone().unwrap_or_default();
        h.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(3));
        props = props.with_headers(h);
        assert_eq!(decode("q", b"x".to_vec(), &props, true).envelope.attempt, 4);
    }

    #[test]
    fn a_foreign_message_is_a_first_attempt_of_its_body() {
        let props = BasicProperties::default().with_message_id("m-1".into());
        let d = decode("q", b"{\"a\":1}".to_vec(), &props, false);
        assert_eq!(d.envelope.id.as_str(), "m-1");
        assert_eq!(d.envelope.attempt, 1);
        assert_eq!(&d.envelope.payload[..], b"{\"a\":1}");
        assert!(d.dead.is_none());
    }

    #[test]
    fn a_waiting_job_spends_no_attempt_going_back_and_keeps_its_release() {
        let mut env = Envelope::from_new(NewJob::new("q", "x"));
        env.attempt = 2;
        let props = properties(&env, &[release_field(1234)]);
        let mut h = props.headers().clone().unwrap_or_default();
        h.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(3));
        let props = props.with_headers(h);
        let d = decode_waiting("q", b"x".to_vec(), &props);
        assert_eq!(d.envelope.attempt, 2);
        assert_eq!(release_at(&props, &d.envelope), 1234);
        let plain = properties(&env, &[]);
        assert_eq!(release_at(&plain, &env), env.due_at_ms);
    }

    #[test]
    fn dead_letters_carry_reason_and_time() {
        let env = Envelope::from_new(NewJob::new("q", "x"));
        let props = properties(&env, &dead_fields("poison", 42));
        let d = decode("q", b"x".to_vec(), &props, false);
        assert_eq!(d.dead, Some(("poison".to_owned(), 42)));
    }
}
