//! Conformance cases found by the model-based tests ([`model`](super::model)): each is
//! a shrunk sequence on which a backend disagreed with the model, kept as a named case
//! of the [`Broker`] contract.

use std::time::Duration;

use super::unique;
use crate::broker::{Broker, FetchPlan};
use crate::error::BrokerError;
use crate::job::NewJob;

const LONG: Duration = Duration::from_secs(60);

/// Enqueue X, fetch it, dead-letter it, enqueue X again: the second enqueue is refused
/// with `DuplicateJob` and writes nothing, as the dead letter still holds the id. A
/// backend that cannot refuse duplicate ids stores the second job beside the dead
/// letter.
pub async fn id_of_a_dead_letter_is_not_reused(b: &dyn Broker) {
    let q = unique("dead-id");
    b.enqueue(vec![NewJob::new(&q, "p0").id("x2")])
        .await
        .unwrap();
    let got = b.fetch(&FetchPlan::single(&q, 1, LONG)).await.unwrap();
    assert_eq!(got.len(), 1);
    b.dead_letter(&got[0].lease, "dead 0").await.unwrap();
    let again = b.enqueue(vec![NewJob::new(&q, "p1").id("x2")]).await;
    let d = b.depth(&q).await.unwrap();
    if b.refuses_duplicate_ids() {
        assert!(
            matches!(again, Err(BrokerError::DuplicateJob { .. })),
            "enqueue of a dead letter's id: {again:?}"
        );
        assert_eq!((d.pending, d.in_flight, d.delayed, d.dead), (0, 0, 0, 1));
    } else {
        assert_eq!(again.unwrap().len(), 1);
        assert_eq!((d.pending, d.in_flight, d.delayed, d.dead), (1, 0, 0, 1));
    }
    let dead = b.dead_letters(&q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.payload, "p0".as_bytes());
    assert_eq!(dead[0].reason, "dead 0");
}
