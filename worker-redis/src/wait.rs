//! Idle without polling: a worker with nothing to do waits on the pub/sub channels of
//! its queues (every script that makes a job startable publishes there), bounded by
//! the time the next delayed job falls due.

use std::time::Duration;

use futures::{FutureExt, StreamExt};
use redis::aio::PubSubStream;
use redis::Client;
use tokio::sync::Mutex;

use crate::broker::RedisBroker;

/// Makes a client for each new subscription (its credentials read again).
pub(crate) type ClientSource = Box<dyn Fn() -> redis::RedisResult<Client> + Send + Sync>;

pub(crate) struct Waiter {
    client: Client,
    fresh: Option<ClientSource>,
    sub: Mutex<Option<Subscription>>,
}

struct Subscription {
    channels: Vec<String>,
    stream: PubSubStream,
}

impl Waiter {
    pub(crate) fn new(client: Client, fresh: Option<ClientSource>) -> Self {
        Self {
            client,
            fresh,
            sub: Mutex::new(None),
        }
    }

    async fn subscribe(&self, channels: &[String]) -> Result<Subscription, redis::RedisError> {
        let client = match &self.fresh {
            Some(make) => make()?,
            None => self.client.clone(),
        };
        let mut pubsub = client.get_async_pubsub().await?;
        for ch in channels {
            pubsub.subscribe(ch).await?;
        }
        Ok(Subscription {
            channels: channels.to_vec(),
            stream: pubsub.into_on_message(),
        })
    }

    pub(crate) async fn wait(&self, broker: &RedisBroker, queues: &[String], timeout: Duration) {
        let channels: Vec<String> = queues.iter().map(|q| broker.channel(q)).collect();
        let mut guard = self.sub.lock().await;
        let fresh = guard.as_ref().is_none_or(|s| s.channels != channels);
        if fresh {
            match self.subscribe(&channels).await {
                // A job enqueued before the subscription existed sent its notice to
                // nobody: return so the caller fetches once more before really waiting.
                Ok(sub) => *guard = Some(sub),
                Err(e) => {
                    *guard = None;
                    drop(guard);
                    tracing::warn!(error = %e, "cannot subscribe to queue notifications; polling");
                    tokio::time::sleep(timeout.min(Duration::from_secs(1))).await;
                }
            }
            return;
        }
        let Some(sub) = guard.as_mut() else { return };
        // Notices that arrived while the caller was busy mean there may be work now.
        let mut ended = false;
        let mut noticed = false;
        while let Some(next) = sub.stream.next().now_or_never() {
            match next {
                Some(_) => noticed = true,
                None => {
                    ended = true;
                    break;
                }
            }
        }
        if ended {
            *guard = None;
            return;
        }
        if noticed {
            return;
        }
        let limit = queues
            .iter()
            .filter_map(|q| broker.next_due(q))
            .fold(timeout, Duration::min);
        match tokio::time::timeout(limit, sub.stream.next()).await {
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => *guard = None,
        }
    }
}
