//! One connection to RabbitMQ and the channels every operation shares, replaced as a
//! whole when the connection is lost. Reconnects back off exponentially with jitter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use worker_core::{redact, BrokerError};

use crate::config::AmqpConfig;
use crate::error::{from_lapin, is_not_found};
use crate::tls::Tls;

/// Waits between connection attempts: up to 200 ms after the first failure, doubling
/// to 10 s.
const BACKOFF: worker_core::Backoff =
    worker_core::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));

/// A live connection, numbered so that what belonged to an earlier one is told apart.
pub(crate) struct Session {
    pub gen: u64,
    pub conn: Connection,
    /// In confirm mode: every publish is awaited until the broker has the message.
    pub publisher: Channel,
    /// For passive declares and other short calls; replaced when the broker closes it
    /// (a passive declare of a missing queue does).
    admin: tokio::sync::Mutex<Option<Channel>>,
    /// Queues declared on this connection, and when.
    declared: Mutex<HashMap<String, Instant>>,
}

impl Session {
    pub(crate) fn alive(&self) -> bool {
        self.conn.status().connected() && self.publisher.status().connected()
    }

    /// A channel for short calls.
    pub(crate) async fn admin(&self) -> Result<Channel, BrokerError> {
        let mut slot = self.admin.lock().await;
        if let Some(ch) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(ch.clone());
        }
        let ch = self
            .conn
            .create_channel()
            .await
            .map_err(|e| from_lapin("open channel", e))?;
        *slot = Some(ch.clone());
        Ok(ch)
    }

    /// Messages ready in `queue`, or `None` when it does not exist.
    pub(crate) async fn ready_count(&self, queue: &str) -> Result<Option<u64>, BrokerError> {
        let ch = self.admin().await?;
        passive_count(&ch, queue).await
    }

    /// When `queue` was last declared on this connection.
    pub(crate) fn declared_at(&self, queue: &str) -> Option<Instant> {
        self.declared.lock().ok()?.get(queue).copied()
    }

    /// Names declared on this connection that start with `prefix`.
    pub(crate) fn declared_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.declared.lock().map_or_else(
            |_| Vec::new(),
            |d| {
                d.keys()
                    .filter(|k| k.starts_with(prefix))
                    .cloned()
                    .collect()
            },
        )
    }

    /// Declare a durable `queue` with `args` (idempotent), unless done on this connection
    /// less than `fresh` ago.
    pub(crate) async fn declare(
        &self,
        queue: &str,
        args: FieldTable,
        fresh: Duration,
    ) -> Result<(), BrokerError> {
        if self
            .declared_at(queue)
            .is_some_and(|at| at.elapsed() < fresh)
        {
            return Ok(());
        }
        let ch = self.admin().await?;
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(queue, options, args)
            .await
            .map_err(|e| from_lapin(&format!("declare queue {queue}"), e))?;
        if let Ok(mut d) = self.declared.lock() {
            d.insert(queue.to_owned(), Instant::now());
        }
        Ok(())
    }

    /// Forget that `queue` was declared (it was deleted).
    pub(crate) fn forget(&self, queue: &str) {
        if let Ok(mut d) = self.declared.lock() {
            d.remove(queue);
        }
    }
}

/// The ready count of `queue` by a passive declare on `ch`; `None` when it does not
/// exist (the broker then closes `ch`).
pub(crate) async fn passive_count(ch: &Channel, queue: &str) -> Result<Option<u64>, BrokerError> {
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match ch
        .queue_declare(queue, options, FieldTable::default())
        .await
    {
        Ok(q) => Ok(Some(u64::from(q.message_count()))),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(from_lapin(&format!("count queue {queue}"), e)),
    }
}

/// The current session, reconnecting when it is gone.
pub(crate) struct Sessions {
    config: AmqpConfig,
    /// What this connection is for, in its name as the broker shows it.
    purpose: Option<&'static str>,
    /// Index of the address that answered last (see `AmqpConfig::urls`).
    preferred: AtomicUsize,
    current: std::sync::RwLock<Option<std::sync::Arc<Session>>>,
    connecting: tokio::sync::Mutex<Backoff>,
}

/// Numbers every session of the process, so no two share one.
static NEXT_GEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

struct Backoff {
    /// A session was connected before.
    connected: bool,
    failures: u32,
    not_before: Option<Instant>,
    /// The last session was closed on purpose: the next connect is not a reconnect.
    closed: bool,
}

impl Sessions {
    pub(crate) fn new(config: AmqpConfig, purpose: Option<&'static str>) -> Self {
        Self {
            config,
            purpose,
            preferred: AtomicUsize::new(0),
            current: std::sync::RwLock::new(None),
            connecting: tokio::sync::Mutex::new(Backoff {
                connected: false,
                failures: 0,
                not_before: None,
                closed: false,
            }),
        }
    }

    /// The live session, if there is one, without connecting.
    pub(crate) fn live(&self) -> Option<std::sync::Arc<Session>> {
        let s = self.current.read().ok()?.clone()?;
        s.alive().then_some(s)
    }

    /// The live session, connecting first when there is none. While the broker is
    /// unreachable, attempts are spaced by an exponential backoff with jitter; a call
    /// inside the wait fails at once.
    pub(crate) async fn get(&self) -> Result<std::sync::Arc<Session>, BrokerError> {
        if let Some(s) = self.live() {
            return Ok(s);
        }
        let mut backoff = self.connecting.lock().await;
        if let Some(s) = self.live() {
            return Ok(s);
        }
        if let Some(at) = backoff.not_before {
            if Instant::now() < at {
                return Err(BrokerError::Unavailable {
                    message: format!(
                        "amqp: reconnecting to {} (next attempt in {:?})",
                        self.config.shown_url(),
                        at - Instant::now()
                    ),
                    source: None,
                });
            }
        }
        match self.connect(NEXT_GEN.fetch_add(1, Ordering::Relaxed)).await {
            Ok(s) => {
                if backoff.connected && !backoff.closed {
                    tracing::info!(url = %self.config.shown_url(), failed_attempts = backoff.failures, "amqp: reconnected");
                }
                backoff.closed = false;
                backoff.connected = true;
                backoff.failures = 0;
                backoff.not_before = None;
                let s = std::sync::Arc::new(s);
                if let Ok(mut cur) = self.current.write() {
                    *cur = Some(s.clone());
                }
                Ok(s)
            }
            Err(e) => {
                backoff.failures += 1;
                let wait = BACKOFF.delay(backoff.failures);
                backoff.not_before = Some(Instant::now() + wait);
                tracing::warn!(url = %self.config.shown_url(), error = %worker_core::error::chain(&e), retry_in = ?wait, failures = backoff.failures, "amqp: cannot connect");
                Err(e)
            }
        }
    }

    /// Drop the session numbered `gen` (its connection failed); the next call connects.
    pub(crate) fn lost(&self, gen: u64) {
        if let Ok(mut cur) = self.current.write() {
            if cur.as_ref().is_some_and(|s| s.gen == gen) {
                tracing::warn!(gen, "amqp: connection lost");
                *cur = None;
            }
        }
    }

    /// Close the current session cleanly.
    pub(crate) async fn close(&self) {
        self.connecting.lock().await.closed = true;
        let taken = self.current.write().ok().and_then(|mut c| c.take());
        if let Some(s) = taken {
            if s.conn.status().connected() {
                if let Err(e) = s.conn.close(200, "worker stopped").await {
                    tracing::debug!(error = %e, "amqp: close");
                }
            }
        }
    }

    async fn connect(&self, gen: u64) -> Result<Session, BrokerError> {
        let props = ConnectionProperties::default()
            .with_connection_name(
                match self.purpose {
                    Some(p) => format!("worker-pools pid {} ({p})", std::process::id()),
                    None => format!("worker-pools pid {}", std::process::id()),
                }
                .into(),
            )
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio);
        // A cluster's nodes in turn, from the last one that answered.
        let url = self.config.current_url();
        let urls: Vec<&str> = url.split(',').map(str::trim).collect();
        let tls = if urls.iter().any(|u| u.starts_with("amqps://")) {
            let client = self
                .config
                .client_cert_pem
                .as_ref()
                .map(|(c, k)| (c.as_str(), k.as_str()));
            let tls = Tls::new(self.config.ca_cert_pem.as_deref(), client)
                .map_err(|e| BrokerError::Protocol(format!("amqps: {e}")))?;
            Some(tls)
        } else {
            None
        };
        let first = self.preferred.load(Ordering::Relaxed) % urls.len();
        let mut failures = Vec::new();
        let mut connected = None;
        for i in (0..urls.len()).map(|k| (first + k) % urls.len()) {
            let shown = redact(urls[i]);
            let attempt = match &tls {
                Some(tls) => match urls[i].parse::<lapin::uri::AMQPUri>() {
                    Ok(uri) => {
                        let tls = tls.clone();
                        // The result type is the one lapin's connector takes.
                        #[allow(clippy::result_large_err)]
                        let connect = Box::new(move |uri: &lapin::uri::AMQPUri| tls.connect(uri));
                        Connection::connector(uri, connect, props.clone()).await
                    }
                    Err(e) => Err(lapin::Error::IOError(std::sync::Arc::new(
                        std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
                    ))),
                },
                None => Connection::connect(urls[i], props.clone()).await,
            };
            match attempt {
                Ok(conn) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    connected = Some((conn, shown));
                    break;
                }
                // lapin's errors carry no URL, so the cause can be shown: an operator
                // needs "UnknownIssuer" or "connection refused" in the one log line.
                Err(e) => failures.push((shown, e)),
            }
        }
        let Some((conn, shown)) = connected else {
            let message = failures
                .iter()
                .map(|(url, e)| format!("{url}: {e}"))
                .collect::<Vec<_>>()
                .join("; ");
            let (_, last) = failures
                .pop()
                .ok_or_else(|| BrokerError::Protocol("amqp connect: no broker address".into()))?;
            return Err(BrokerError::unavailable(
                format!("amqp connect to {message}"),
                last,
            ));
        };
        let publisher = conn
            .create_channel()
            .await
            .map_err(|e| from_lapin("open channel", e))?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| from_lapin("confirm select", e))?;
        tracing::debug!(url = %shown, gen, "amqp: connected");
        Ok(Session {
            gen,
            conn,
            publisher,
            admin: tokio::sync::Mutex::new(None),
            declared: Mutex::new(HashMap::new()),
        })
    }
}
