//! lapin errors as [`BrokerError`]s.

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use worker_core::BrokerError;

/// Whether the broker answered "no such queue" (which also closes the channel).
pub(crate) fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e, lapin::Error::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
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
