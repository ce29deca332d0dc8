//! Tasks beside the fetch loop: the worker registry heartbeat and the lease reaper.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::error::chain;
use crate::handler::Handler;

/// Register, beat every `heartbeat` with TTL = 3 × heartbeat, deregister at the end.
/// The entry is written at once, between beats, when the drain begins or the quiet
/// state changes: peers rank themselves by it.
pub(crate) async fn heartbeat<H: Handler>(shared: Arc<Shared<H>>, stop: CancellationToken) {
    let ttl = shared.config.heartbeat * 3;
    let mut registered = false;
    let mut drain_written = false;
    let mut tick = tokio::time::interval(shared.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
            _ = shared.beat_now.notified() => {}
            _ = shared.life.drain.cancelled(), if !drain_written => drain_written = true,
        }
        let info = shared.worker_info();
        let result = if registered {
            shared.broker.beat_worker(&info, ttl).await
        } else {
            shared.broker.register_worker(&info, ttl).await
        };
        // A heartbeat is a write that needs memory: one that lands tells that the broker
        // accepts writes again when no lease is being extended. One that fails pauses
        // nothing: the registry may live apart from the jobs (on RabbitMQ, a queue whose
        // node is down while the job queues are served elsewhere), and a pause would
        // strand the deliveries a consumer already holds. Lease extensions, which touch
        // the jobs themselves, are what pause fetching.
        match result {
            Ok(()) => {
                registered = true;
                if shared.life.set_writes_accepted(true) {
                    tracing::info!("heartbeat written: the broker accepts writes again");
                }
            }
            Err(e) => {
                shared.broker_error("heartbeat");
                tracing::warn!(error = %chain(&e), "worker heartbeat failed");
            }
        }
    }
    if let Err(e) = shared.broker.deregister_worker(&shared.worker_id).await {
        tracing::warn!(error = %e, "could not deregister; the entry expires with its TTL");
    }
}

/// Reclaim expired leases of this worker's queues. Every worker runs one; the
/// broker guarantees each expired lease is reclaimed once.
pub(crate) async fn reaper<H: Handler>(shared: Arc<Shared<H>>, stop: CancellationToken) {
    let queues = shared.config.queue_names();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(shared.config.reap_interval) => {}
        }
        match shared.broker.reap_expired(&queues).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(reclaimed = n, "expired leases returned to pending"),
            Err(e) => {
                shared.broker_error("reap");
                tracing::warn!(error = %e, "reaping expired leases failed");
            }
        }
    }
}
