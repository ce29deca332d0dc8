//! lapin errors as [`BrokerError`]s.

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use worker_core::BrokerError;

/// Whether the broker answered "no such queue" (which also closes the channel).
pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e, lapin::Error::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Whether the broker closed the channel because a delivery stayed unacked past the
/// consumer timeout (`PRECONDITION_FAILED`, "delivery acknowledgement on channel N
/// timed out").
pub(crate) fn is_ack_timeout(e: &lapin::Error) -> bool {
    match e {
        lapin::Error::ProtocolError(p) => {
            matches!(
                p.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            ) && {
                let text = p.get_message().as_str().to_ascii_lowercase();
                text.contains("acknowledgement") && text.contains("timed out")
            }
        }
        _ => false,
    }
}

/// Map a lapin error. A refusal by the broker (a precondition, access, a bad frame)
/// cannot be cured by trying again; everything else — a lost connection, a closed
/// channel, I/O — can, after a reconnect.
pub(crate) fn from_lapin(op: &str, e: lapin::Error) -> BrokerError {
    let refused = match &e {
        lapin::Error::ProtocolError(p) => matches!(
            p.kind(),
            AMQPErrorKind::Soft(
                AMQPSoftError::PRECONDITIONFAILED
                    | AMQPSoftError::ACCESSREFUSED
                    | AMQPSoftError::RESOURCELOCKED
            )
        ),
        lapin::Error::InvalidProtocolVersion(_)
        | lapin::Error::ParsingError(_)
        | lapin::Error::SerialisationError(_) => true,
        _ => false,
    };
    if refused {
        BrokerError::Protocol(format!("amqp {op}: {e}"))
    } else {
        BrokerError::unavailable(format!("amqp {op}"), e)
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};

    use super::*;

    fn soft(kind: AMQPSoftError, text: &str) -> lapin::Error {
        lapin::Error::ProtocolError(AMQPError::new(AMQPErrorKind::Soft(kind), text.into()))
    }

    #[test]
    fn the_consumer_timeout_is_told_apart_from_other_refusals() {
        // The text RabbitMQ sends when it closes a channel for an unacked delivery.
        let timeout = soft(
            AMQPSoftError::PRECONDITIONFAILED,
            "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. \
             Timeout value used: 1800000 ms. This timeout value can be configured, \
             see consumers doc guide to learn more",
        );
        assert!(is_ack_timeout(&timeout));
        let other = soft(
            AMQPSoftError::PRECONDITIONFAILED,
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type'",
        );
        assert!(!is_ack_timeout(&other));
        assert!(!is_ack_timeout(&soft(AMQPSoftError::NOTFOUND, "timed out")));
    }
}
