//! Conformance cases found by the model-based tests ([`model`](super::model)): each is
//! a shrunk sequence on which a backend disagreed with the model, kept as a named case
//! of the [`Broker`] contract.

use std::time::Duration;

use super::{eventually, unique};
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
    b.enqueue(vec![NewJob::new(&q, "p0").id("x0")])
        .await
        .unwrap();
    let got = b.fetch(&FetchPlan::single(&q, 1, LONG)).await.unwrap();
    assert_eq!(got.len(), 1);
    b.dead_letter(&got[0].lease, "dead 0").await.unwrap();
    let again = b.enqueue(vec![NewJob::new(&q, "p1").id("x0")]).await;
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

/// Enqueue a job with a delay to a queue nothing has used yet, and let the delay pass:
/// the job is then due (pending, or delayed and due) and a fetch returns it. Nothing
/// but the delayed job has made the queue exist.
pub async fn delayed_job_of_a_new_queue_is_not_lost(b: &dyn Broker) {
    let q = unique("new-delayed");
    b.enqueue(vec![NewJob::new(&q, "p0").delay(Duration::from_millis(300))])
        .await
        .unwrap();
    // On RabbitMQ a message whose delay ended is moved between queues by the broker
    // itself, so for a moment it may show in neither; it must arrive.
    eventually(
        Duration::from_secs(5),
        "the job is due once its delay passed",
        || async {
            let d = b.depth(&q).await.unwrap();
            d.pending + d.delayed_due == 1
        },
    )
    .await;
    let d = b.depth(&q).await.unwrap();
    assert_eq!(
        (d.pending + d.delayed_due, d.in_flight, d.dead),
        (1, 0, 0),
        "the job once its delay passed: {d:?}"
    );
    let got = b.fetch(&FetchPlan::single(&q, 1, LONG)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].envelope.payload, "p0".as_bytes());
    b.ack(&got[0].lease).await.unwrap();
}
