//! Settling deliveries in AMQP transactions.
//!
//! Every channel that receives jobs (a queue's consumer, get mode's channel, a dead
//! letter reader) is in transaction mode (`tx.select`). Moving a job (a retry, a dead
//! letter, a release to another worker, a reaped lease) publishes its next copy and
//! acks its delivery in one transaction, so that a worker killed between the two
//! leaves the job exactly once in the broker: its delivery, or its copy, never both.
//! A plain ack is committed the same way.
//!
//! One task per channel writes what callers hand it and commits: what arrives while a
//! commit is in flight goes into the next one (group commit), so a busy channel pays
//! one round trip for many acks. RabbitMQ closes the whole connection when a channel
//! gets any other command while it processes a commit ("unexpected command while
//! processing 'tx.commit'"), so every other command on such a channel (a get, a qos, a
//! consume or cancel, a passive declare) runs under [`Settler::calm`], which no
//! commit overlaps. A commit holds at most one copy: when the broker
//! refuses a copy (a full queue under `reject-publish`) it still applies the
//! transaction's acks and closes the channel ("partial tx completion"), and only with
//! one copy per commit is it known which job then lives in the worker's hands alone.

use lapin::options::{BasicAckOptions, BasicPublishOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use std::sync::Arc;

use lapin::{BasicProperties, Channel};
use tokio::sync::{mpsc, oneshot, OwnedRwLockReadGuard, RwLock};

/// A job's next copy, published in the transaction that acks its delivery.
pub(crate) struct Copy {
    /// The queue it goes to, through the default exchange.
    pub route: String,
    pub payload: Vec<u8>,
    pub props: BasicProperties,
}

/// Why a settle did not take effect as asked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SettleError {
    /// The ack took effect and the broker refused the copy: the job now exists only in
    /// the caller's hands, which must store it another way.
    #[error("amqp: the broker took the delivery back but refused the job's copy")]
    Refused(#[source] lapin::Error),
    /// Nothing took effect, or the commit's answer was lost: either way the broker holds
    /// the job (its delivery, which it gives a consumer again, or its copy).
    #[error("amqp: settle not committed")]
    Failed(#[source] lapin::Error),
}

struct Unit {
    tag: u64,
    copy: Option<Copy>,
    done: oneshot::Sender<Result<(), SettleError>>,
}

/// Hands settles to the committing task of one transactional channel.
#[derive(Clone)]
pub(crate) struct Settler {
    units: mpsc::UnboundedSender<Unit>,
    /// Held for writing while a commit is on the wire.
    gate: Arc<RwLock<()>>,
}

impl Settler {
    /// Put `channel` in transaction mode and start its committing task.
    pub(crate) async fn start(channel: &Channel) -> lapin::Result<Self> {
        channel.tx_select().await?;
        let (units, rx) = mpsc::unbounded_channel();
        let gate = Arc::new(RwLock::new(()));
        tokio::spawn(commit_loop(channel.clone(), rx, gate.clone()));
        Ok(Self { units, gate })
    }

    /// Hold while sending any command other than an ack or a publish on the channel,
    /// until its reply: no commit is in flight meanwhile.
    pub(crate) async fn calm(&self) -> OwnedRwLockReadGuard<()> {
        self.gate.clone().read_owned().await
    }

    /// Ack the delivery `tag` and, when `copy` is given, publish it, in one
    /// transaction. Returns once the broker has committed it.
    pub(crate) async fn settle(&self, tag: u64, copy: Option<Copy>) -> Result<(), SettleError> {
        let (done, answer) = oneshot::channel();
        let gone = || {
            SettleError::Failed(lapin::Error::InvalidChannelState(
                lapin::ChannelState::Closed,
            ))
        };
        self.units
            .send(Unit { tag, copy, done })
            .map_err(|_| gone())?;
        answer.await.unwrap_or_else(|_| Err(gone()))
    }
}

/// Whether `e` is RabbitMQ's answer to a commit whose publish was refused after its
/// acks took effect.
fn is_partial_commit(e: &lapin::Error) -> bool {
    matches!(e, lapin::Error::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))
            && p.get_message().as_str().contains("partial tx completion"))
}

async fn commit_loop(
    channel: Channel,
    mut rx: mpsc::UnboundedReceiver<Unit>,
    gate: Arc<RwLock<()>>,
) {
    let mut next_move: Option<Unit> = None;
    loop {
        let first = match next_move.take() {
            Some(u) => u,
            None => match rx.recv().await {
                Some(u) => u,
                None => return,
            },
        };
        let mut batch = vec![first];
        let mut moves = usize::from(batch[0].copy.is_some());
        while let Ok(u) = rx.try_recv() {
            if u.copy.is_some() {
                if moves == 1 {
                    next_move = Some(u);
                    break;
                }
                moves += 1;
            }
            batch.push(u);
        }
        let outcome = commit(&channel, &batch, &gate).await;
        for u in batch {
            let answer = match &outcome {
                Ok(()) => Ok(()),
                // The acks took effect; only the copy was refused.
                Err(e) if is_partial_commit(e) => match u.copy {
                    Some(_) => Err(SettleError::Refused(e.clone())),
                    None => Ok(()),
                },
                Err(e) => Err(SettleError::Failed(e.clone())),
            };
            let _ = u.done.send(answer);
        }
    }
}

/// Write `batch` on `channel` and commit it.
async fn commit(channel: &Channel, batch: &[Unit], gate: &RwLock<()>) -> lapin::Result<()> {
    // Every frame is on the wire before the first is awaited; within a transaction
    // their order does not matter, only that all precede the commit.
    let writes = batch.iter().map(|u| async move {
        if let Some(c) = &u.copy {
            channel
                .basic_publish(
                    "",
                    &c.route,
                    BasicPublishOptions::default(),
                    &c.payload,
                    c.props.clone(),
                )
                .await?;
        }
        channel.basic_ack(u.tag, BasicAckOptions::default()).await
    });
    for written in futures::future::join_all(writes).await {
        // The channel is closed: nothing written on it will be committed.
        written?;
    }
    let _alone = gate.write().await;
    channel.tx_commit().await
}
