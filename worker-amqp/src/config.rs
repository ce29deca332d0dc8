//! How to reach RabbitMQ and how to declare its queues: a builder, and
//! [`AmqpConfig::from_env`] for the same settings from the environment.

use std::collections::HashMap;
use std::time::Duration;

use worker_core::{redact, ConfigError, SecretSource};

use crate::management::{self, Endpoint, CA_FORM};
use crate::topology::QueueType;

/// The default broker: a local RabbitMQ, default virtual host.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// RabbitMQ's own limit on a message body (`max_message_size`, 128 MiB by default).
pub const DEFAULT_MAX_PAYLOAD: usize = 128 * 1024 * 1024;

/// RabbitMQ's own default `consumer_timeout`: how long a delivery may stay unacked
/// before the broker closes its channel (30 minutes).
pub const BROKER_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How a worker takes jobs from its queues.
///
/// ```
/// use worker_amqp::{AmqpConfig, FetchMode};
/// use worker_core::WorkerConfig;
///
/// let one = WorkerConfig::builder().queue("render").build()?;
/// let two = WorkerConfig::builder().queue("interactive").queue("batch").build()?;
/// let amqp = AmqpConfig::new(worker_amqp::DEFAULT_URL);
/// assert_eq!(amqp.clone().worker(&one).fetch_mode_in_effect(), FetchMode::Consume);
/// assert_eq!(amqp.worker(&two).fetch_mode_in_effect(), FetchMode::Get);
/// # Ok::<(), worker_core::ConfigError>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FetchMode {
    /// One consumer per queue, whose prefetch is the worker's concurrency plus its
    /// fetch-ahead: RabbitMQ streams deliveries ahead, the fastest way to take jobs.
    /// Exact for one queue; a process consuming N queues may hold N times the
    /// prefetch, because RabbitMQ's prefetch is per consumer.
    #[default]
    Consume,
    /// `basic.get` of exactly the jobs the worker can start, as its weighted plan
    /// divides them between queues; while it finds none, a consumer of prefetch 1 per
    /// queue waits for the next job, and those consumers are cancelled as soon as one
    /// delivers. The process never holds more jobs than it can start, across any
    /// number of queues. Each fetch is one round trip.
    Get,
}

impl FetchMode {
    /// Parse `consume` or `get`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "consume" => Some(Self::Consume),
            "get" => Some(Self::Get),
            _ => None,
        }
    }
}

/// How long the worker may keep a delivery unacked, from its [`WorkerConfig`](worker_core::WorkerConfig).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Holding {
    lease: Duration,
    drain: Duration,
    job_timeout: Option<Duration>,
}

/// Settings of an [`AmqpBroker`](crate::AmqpBroker).
///
/// ```
/// use worker_amqp::{AmqpConfig, QueueType};
///
/// let config = AmqpConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .management_url("http://guest:guest@127.0.0.1:15672")
///     .queue_type("payments", QueueType::Quorum)
///     .prefetch(16);
/// assert_eq!(config.prefetch_count(), 16);
/// ```
#[derive(Clone)]
pub struct AmqpConfig {
    pub(crate) url: String,
    /// The file `AMQP_URL_FILE` named: read again at each connect.
    pub(crate) url_file: Option<SecretSource>,
    /// With copies of `management_allow_http` and `ca_cert_pem`: the client is made
    /// from this alone.
    pub(crate) management_url: Option<Endpoint>,
    pub(crate) management_allow_http: bool,
    pub(crate) depth_from_management: bool,
    pub(crate) move_delayed: bool,
    pub(crate) default_type: QueueType,
    pub(crate) queue_types: HashMap<String, QueueType>,
    pub(crate) prefetch: u16,
    pub(crate) prefetch_set: bool,
    pub(crate) fetch_mode: FetchMode,
    pub(crate) fetch_mode_set: bool,
    pub(crate) max_payload: usize,
    pub(crate) ca_cert_pem: Option<String>,
    /// PEM certificate chain and private key presented for `amqps://`.
    pub(crate) client_cert_pem: Option<(String, String)>,
    pub(crate) consumer_timeout: Option<Duration>,
    pub(crate) holding: Option<Holding>,
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &self.shown_url())
            .field("url_file", &self.url_file)
            .field(
                "management_url",
                &self.management_url.as_ref().map(|m| redact(&m.url)),
            )
            .field("management_allow_http", &self.management_allow_http)
            .field("depth_from_management", &self.depth_from_management)
            .field("move_delayed", &self.move_delayed)
            .field("default_type", &self.default_type)
            .field("queue_types", &self.queue_types)
            .field("prefetch", &self.prefetch)
            .field("fetch_mode", &self.fetch_mode)
            .field("max_payload", &self.max_payload)
            .field("ca_cert", &self.ca_cert_pem.is_some())
            .field("client_cert", &self.client_cert_pem.is_some())
            .field("consumer_timeout", &self.consumer_timeout)
            .finish()
    }
}

impl AmqpConfig {
    /// Settings for the broker at `url` (`amqp://` or `amqps://`; the path is the
    /// URL-encoded virtual host, `%2f` for `/`). For a cluster, `url` may list the
    /// address of each node, comma-separated
    /// (`amqp://u:p@node-a:5672/%2f,amqp://u:p@node-b:5672/%2f`): each connect and
    /// reconnect tries them in turn, starting with the last one that answered. Every
    /// address names the same virtual host; a comma inside a password is written `%2C`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            url_file: None,
            management_url: None,
            management_allow_http: false,
            depth_from_management: true,
            move_delayed: true,
            default_type: QueueType::Classic,
            queue_types: HashMap::new(),
            prefetch: 16,
            prefetch_set: false,
            fetch_mode: FetchMode::Consume,
            fetch_mode_set: false,
            max_payload: DEFAULT_MAX_PAYLOAD,
            ca_cert_pem: None,
            client_cert_pem: None,
            consumer_timeout: None,
            holding: None,
        }
    }

    /// Read the settings from the environment:
    ///
    /// | variable | meaning | default |
    /// |---|---|---|
    /// | `AMQP_URL` | broker URL, or the comma-separated URLs of a cluster's nodes (see [`new`](Self::new)) | `amqp://guest:guest@127.0.0.1:5672/%2f` |
    /// | `AMQP_MANAGEMENT_URL` | management API, `https://user:password@host:15671` (user and password percent-encoded), or `http://…` to this machine (see [`management_url`](Self::management_url)) | none |
    /// | `AMQP_MANAGEMENT_ALLOW_HTTP` | `true` or `false`, see [`management_allow_http`](Self::management_allow_http) | `false` |
    /// | `AMQP_QUEUE_TYPE` | `classic` or `quorum`, for every queue | `classic` |
    /// | `AMQP_QUORUM_QUEUES` | comma-separated queues declared as quorum queues | none |
    /// | `AMQP_PREFETCH` | deliveries held per queue | see [`worker`](Self::worker), else 16 |
    /// | `AMQP_FETCH` | `consume` or `get`, see [`FetchMode`] | see [`worker`](Self::worker), else `consume` |
    /// | `AMQP_CA_FILE` | PEM file of the CA that signed the broker's certificate, and the only roots an `https://` management API is trusted by | system roots |
    /// | `AMQP_CONSUMER_TIMEOUT` | see [`consumer_timeout`](Self::consumer_timeout) | the broker's |
    /// | `AMQP_MOVE_DELAYED` | `true` or `false`, see [`move_delayed`](Self::move_delayed) | `true` |
    ///
    /// `AMQP_URL_FILE` and `AMQP_MANAGEMENT_URL_FILE` may name a file holding the URL
    /// instead (a mounted Secret); the URL file is read again at every connect, so a
    /// rotated password is picked up by the next reconnect.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) with the variables looked up by `var` (a map,
    /// a configuration file, a test's settings) instead of the environment.
    pub fn from_vars(var: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let url = SecretSource::lookup(var, "AMQP_URL")?;
        let management = SecretSource::lookup(var, "AMQP_MANAGEMENT_URL")?;
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let mut config = Self::new(match &url {
            Some(source) => source.read()?,
            None => DEFAULT_URL.to_owned(),
        });
        config.url_file = url.filter(|u| u.file_variable().is_some());
        config.check_urls()?;
        if let Some(url) = management.as_ref().map(SecretSource::read).transpose()? {
            config = config.management_url(url);
            if let Some(m) = &mut config.management_url {
                m.file = management.clone().filter(|s| s.file_variable().is_some());
            }
        }
        if let Some(kind) = var("AMQP_QUEUE_TYPE") {
            config.default_type = QueueType::parse(&kind).ok_or_else(|| {
                ConfigError::invalid("AMQP_QUEUE_TYPE", &kind, "classic or quorum")
            })?;
        }
        if let Some(list) = var("AMQP_QUORUM_QUEUES") {
            for q in list.split(',').map(str::trim).filter(|q| !q.is_empty()) {
                config.queue_types.insert(q.to_owned(), QueueType::Quorum);
            }
        }
        if let Some(v) = var("AMQP_PREFETCH") {
            let n = v
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    ConfigError::invalid("AMQP_PREFETCH", &v, "an integer from 1 to 65535")
                })?;
            config = config.prefetch(n);
        }
        if let Some(v) = var("AMQP_FETCH") {
            let mode = FetchMode::parse(&v)
                .ok_or_else(|| ConfigError::invalid("AMQP_FETCH", &v, "consume or get"))?;
            config = config.fetch_mode(mode);
        }
        if let Some(path) = var("AMQP_CA_FILE") {
            let pem = std::fs::read_to_string(&path).map_err(|e| {
                ConfigError::invalid("AMQP_CA_FILE", &path, format!("a readable PEM file ({e})"))
            })?;
            management::ca_certificates(&pem).map_err(|why| {
                ConfigError::invalid("AMQP_CA_FILE", &path, format!("{CA_FORM} ({why})"))
            })?;
            config = config.ca_cert_pem(pem);
        }
        match (var("AMQP_CLIENT_CERT_FILE"), var("AMQP_CLIENT_KEY_FILE")) {
            (Some(cert), Some(key)) => {
                let read = |variable: &str, path: &str| {
                    std::fs::read_to_string(path).map_err(|e| {
                        ConfigError::invalid(variable, path, format!("a readable PEM file ({e})"))
                    })
                };
                let (cert_pem, key_pem) = (
                    read("AMQP_CLIENT_CERT_FILE", &cert)?,
                    read("AMQP_CLIENT_KEY_FILE", &key)?,
                );
                crate::tls::certificates(&cert_pem).map_err(|why| {
                    ConfigError::invalid(
                        "AMQP_CLIENT_CERT_FILE",
                        &cert,
                        format!("a PEM certificate file ({why})"),
                    )
                })?;
                config = config.client_cert_pem(cert_pem, key_pem);
            }
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::missing(
                    "RabbitMQ client certificate",
                    vec!["AMQP_CLIENT_CERT_FILE and AMQP_CLIENT_KEY_FILE, both".into()],
                ))
            }
        }
        if let Some(v) = var("AMQP_CONSUMER_TIMEOUT") {
            let d = humantime::parse_duration(v.trim())
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    ConfigError::invalid(
                        "AMQP_CONSUMER_TIMEOUT",
                        &v,
                        "a duration such as 45m, 2h or 90s",
                    )
                })?;
            config = config.consumer_timeout(d);
        }
        if let Some(v) = var("AMQP_MOVE_DELAYED") {
            config.move_delayed = switch("AMQP_MOVE_DELAYED", &v)?;
        }
        if let Some(v) = var("AMQP_MANAGEMENT_ALLOW_HTTP") {
            config = config.management_allow_http(switch("AMQP_MANAGEMENT_ALLOW_HTTP", &v)?);
        }
        if let Some(m) = &config.management_url {
            // At start, as the client will read it at connect.
            if let Err(why) = management::parse_url(&m.url, m.allow_http) {
                let variable = management
                    .as_ref()
                    .and_then(SecretSource::file_variable)
                    .map_or("AMQP_MANAGEMENT_URL".to_owned(), |v| {
                        format!("AMQP_MANAGEMENT_URL (from {v})")
                    });
                return Err(ConfigError::invalid(
                    variable,
                    redact(&m.url),
                    format!("{} ({why})", management::URL_FORM),
                ));
            }
        }
        Ok(config)
    }

    /// Read depth figures that AMQP cannot give (unacked across all consumers, the
    /// later queues of other processes) from the management API at `url`; the worker
    /// registry needs it too.
    ///
    /// `url` is `https://user:password@host:port`, with the user and password
    /// percent-encoded as in any URL (`p%40ss` for `p@ss`); a CA set with
    /// [`ca_cert_pem`](Self::ca_cert_pem) is then the only one its certificate is
    /// trusted by. `http://` sends the password in clear: [`connect`](Self::connect)
    /// refuses it unless the host is this machine (`127.0.0.0/8`, `::1`,
    /// `localhost`) or [`management_allow_http`](Self::management_allow_http) is set.
    pub fn management_url(mut self, url: impl Into<String>) -> Self {
        self.management_url = Some(Endpoint {
            url: url.into(),
            allow_http: self.management_allow_http,
            ca_cert_pem: self.ca_cert_pem.clone(),
            file: None,
        });
        self
    }

    /// Accept an `http://` management URL to a host other than this machine, whose
    /// password then crosses the network in clear (off by default): for a network
    /// trusted otherwise, such as a sidecar's or a service mesh's.
    pub fn management_allow_http(mut self, on: bool) -> Self {
        self.management_allow_http = on;
        if let Some(m) = &mut self.management_url {
            m.allow_http = on;
        }
        self
    }

    /// Whether [`depth`](worker_core::Broker::depth) adds the unacked count of other
    /// processes from the management API (on by default when it is configured). Its
    /// counts lag by the broker's statistics interval.
    pub fn depth_from_management(mut self, on: bool) -> Self {
        self.depth_from_management = on;
        self
    }

    /// Whether this process moves delayed jobs of the queues it consumes, fetches from,
    /// counts or delays jobs of, when their time comes (on by default; see the crate
    /// documentation's topology). A process that only reads (a read-only exporter, an
    /// observer) turns it off; it then also counts only what the later queues hold
    /// ready, plus what the management API says every mover holds.
    pub fn move_delayed(mut self, on: bool) -> Self {
        self.move_delayed = on;
        self
    }

    /// Declare `queue` (and its later and dead-letter queues) as `kind`.
    pub fn queue_type(mut self, queue: impl Into<String>, kind: QueueType) -> Self {
        self.queue_types.insert(queue.into(), kind);
        self
    }

    /// The type of every queue not named in [`queue_type`](Self::queue_type).
    pub fn default_queue_type(mut self, kind: QueueType) -> Self {
        self.default_type = kind;
        self
    }

    /// Deliveries RabbitMQ may send ahead per consumed queue, counting those running,
    /// with [`FetchMode::Consume`] ([`FetchMode::Get`] takes exactly what the worker
    /// asks for). Set it to the worker's concurrency (or the queue's limit): the broker
    /// then never sends a replica more than it can start.
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n.max(1);
        self.prefetch_set = true;
        self
    }

    /// How jobs are taken (see [`FetchMode`]).
    pub fn fetch_mode(mut self, mode: FetchMode) -> Self {
        self.fetch_mode = mode;
        self.fetch_mode_set = true;
        self
    }

    /// The fetch mode in effect.
    pub fn fetch_mode_in_effect(&self) -> FetchMode {
        self.fetch_mode
    }

    /// Fit the prefetch to the worker that will consume: its concurrency plus its
    /// fetch-ahead (`WORKER_PREFETCH`), unless a prefetch was set explicitly; and,
    /// unless a fetch mode was set, take jobs with [`FetchMode::Get`] when the worker
    /// consumes more than one queue, so that it never holds more than it can start.
    /// Its job timeout, lease and drain timeout are checked against the consumer
    /// timeout (see [`consumer_timeout_warnings`](Self::consumer_timeout_warnings)).
    ///
    /// ```
    /// use worker_amqp::AmqpConfig;
    /// use worker_core::WorkerConfig;
    ///
    /// let worker = WorkerConfig::builder().queue("jobs").concurrency(8).build()?;
    /// let amqp = AmqpConfig::new(worker_amqp::DEFAULT_URL).worker(&worker);
    /// assert_eq!(amqp.prefetch_count(), 8);
    /// # Ok::<(), worker_core::ConfigError>(())
    /// ```
    pub fn worker(mut self, worker: &worker_core::WorkerConfig) -> Self {
        if !self.prefetch_set {
            let n = worker.concurrency.saturating_add(worker.prefetch);
            self.prefetch = n.clamp(1, u32::from(u16::MAX)) as u16;
        }
        if !self.fetch_mode_set {
            self.fetch_mode = if worker.queues.len() > 1 {
                FetchMode::Get
            } else {
                FetchMode::Consume
            };
        }
        self.holding = Some(Holding {
            lease: worker.lease,
            drain: worker.drain_timeout,
            job_timeout: worker.job_timeout,
        });
        self
    }

    /// The prefetch in effect.
    pub fn prefetch_count(&self) -> u16 {
        self.prefetch
    }

    /// Refuse payloads over `bytes` at enqueue.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// How long RabbitMQ may let a delivery of this worker stay unacked before it closes
    /// the channel (and delivers the job again elsewhere). The worker asks for it on each
    /// consumer (`x-consumer-timeout`), which RabbitMQ honours from 3.12 (and 3.11.15);
    /// older brokers ignore the argument and apply their server-wide
    /// `consumer_timeout`, so there set this to the broker's value. Unset, the worker
    /// asks for nothing and assumes RabbitMQ's default, 30 minutes. With
    /// [`FetchMode::Get`] most jobs come from `basic.get`, which has no consumer to carry
    /// the argument: there the queue's `consumer-timeout` policy or the broker's setting
    /// applies, so set this to that value.
    ///
    /// Start-up warns when the worker may hold a delivery longer than this: a
    /// `WORKER_JOB_TIMEOUT`, lease or drain timeout beyond it.
    pub fn consumer_timeout(mut self, limit: Duration) -> Self {
        self.consumer_timeout = Some(limit);
        self
    }

    /// The consumer timeout the worker runs under: the one set, else RabbitMQ's default.
    pub fn consumer_timeout_in_effect(&self) -> Duration {
        self.consumer_timeout.unwrap_or(BROKER_CONSUMER_TIMEOUT)
    }

    /// What in the worker's settings lets a delivery stay unacked past the consumer
    /// timeout, one sentence each (empty when nothing does, or when
    /// [`worker`](Self::worker) was not called). [`connect`](Self::connect) logs them.
    ///
    /// ```
    /// use std::time::Duration;
    /// use worker_amqp::AmqpConfig;
    /// use worker_core::WorkerConfig;
    ///
    /// let worker = WorkerConfig::builder()
    ///     .queue("render")
    ///     .job_timeout(Duration::from_secs(3 * 3600))
    ///     .build()?;
    /// let config = AmqpConfig::new(worker_amqp::DEFAULT_URL).worker(&worker);
    /// assert!(config.consumer_timeout_warnings()[0].starts_with("WORKER_JOB_TIMEOUT"));
    /// let raised = config.consumer_timeout(Duration::from_secs(4 * 3600));
    /// assert!(raised.consumer_timeout_warnings().is_empty());
    /// # Ok::<(), worker_core::ConfigError>(())
    /// ```
    pub fn consumer_timeout_warnings(&self) -> Vec<String> {
        let Some(h) = self.holding else {
            return Vec::new();
        };
        let limit = self.consumer_timeout_in_effect();
        let whose = if self.consumer_timeout.is_some() {
            "AMQP_CONSUMER_TIMEOUT"
        } else {
            "RabbitMQ's default consumer_timeout"
        };
        let fix = "RabbitMQ then closes the channel and delivers the job again; raise \
                   AMQP_CONSUMER_TIMEOUT (RabbitMQ 3.12 or later) or the broker's \
                   consumer_timeout, or lower the worker's setting";
        let mut out = Vec::new();
        let mut over = |name: &str, d: Duration| {
            if d > limit {
                out.push(format!(
                    "{name} ({}) is longer than {whose} ({}): {fix}",
                    humantime::format_duration(d),
                    humantime::format_duration(limit)
                ));
            }
        };
        if let Some(t) = h.job_timeout {
            over("WORKER_JOB_TIMEOUT", t);
        }
        over("WORKER_DRAIN_TIMEOUT", h.drain);
        over("WORKER_LEASE", h.lease);
        out
    }

    /// Trust the CA in `pem` for `amqps://`; for an `https://` management API, trust
    /// only it (not the system's roots). A `pem` without a certificate is refused at
    /// [`connect`](Self::connect) when a management URL is set.
    pub fn ca_cert_pem(mut self, pem: impl Into<String>) -> Self {
        let pem = pem.into();
        if let Some(m) = &mut self.management_url {
            m.ca_cert_pem = Some(pem.clone());
        }
        self.ca_cert_pem = Some(pem);
        self
    }

    /// Present this PEM certificate chain and private key to an `amqps://` broker that
    /// checks its clients (RabbitMQ's `ssl_options.verify = verify_peer`).
    pub fn client_cert_pem(mut self, cert: impl Into<String>, key: impl Into<String>) -> Self {
        self.client_cert_pem = Some((cert.into(), key.into()));
        self
    }

    /// The type `queue` is declared with.
    pub(crate) fn type_of(&self, queue: &str) -> QueueType {
        self.queue_types
            .get(queue)
            .copied()
            .unwrap_or(self.default_type)
    }

    /// The virtual host named by the (first) URL's path (`/` when it has none).
    pub(crate) fn vhost(&self) -> String {
        vhost_of(self.urls()[0])
    }

    /// The broker's addresses, in the order given (at least one, maybe empty).
    pub(crate) fn urls(&self) -> Vec<&str> {
        self.url.split(',').map(str::trim).collect()
    }

    /// Each address an `amqp://` or `amqps://` URL, all of one virtual host; the error
    /// names `AMQP_URL` and the accepted form.
    fn check_urls(&self) -> Result<(), ConfigError> {
        let urls = self.urls();
        let vhost = vhost_of(urls[0]);
        let bad = |u: &&str| {
            !(u.starts_with("amqp://") || u.starts_with("amqps://")) || vhost_of(u) != vhost
        };
        if urls.iter().any(bad) {
            let variable = self
                .url_file
                .as_ref()
                .and_then(SecretSource::file_variable)
                .map_or("AMQP_URL".to_owned(), |v| format!("AMQP_URL (from {v})"));
            return Err(ConfigError::invalid(
                variable,
                self.shown_url(),
                "amqp://user:password@host:port/vhost or amqps://…, or several such URLs \
                 of one cluster's nodes, comma-separated, all with one virtual host",
            ));
        }
        Ok(())
    }

    /// The URL to connect with now: the URL file read again when there is one (a
    /// rotated Secret), else the URL configured.
    pub(crate) fn current_url(&self) -> String {
        match &self.url_file {
            Some(file) => match file.read() {
                Ok(url) => url,
                Err(e) => {
                    tracing::warn!(error = %e, "amqp: cannot read the URL file again; connecting with the URL read before");
                    self.url.clone()
                }
            },
            None => self.url.clone(),
        }
    }

    /// The addresses as a log line may show them: without passwords.
    pub(crate) fn shown_url(&self) -> String {
        self.urls()
            .into_iter()
            .map(redact)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `true` or `false` (also `1`/`0`, `yes`/`no`) in `variable`.
fn switch(variable: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::invalid(variable, value, "true or false")),
    }
}

/// The virtual host named by `url`'s path (`/` when it has none).
fn vhost_of(url: &str) -> String {
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    let rest = rest.split_once('?').map_or(rest, |(p, _)| p);
    match rest.split_once('/') {
        Some((_, path)) if !path.is_empty() => percent_encoding::percent_decode_str(path)
            .decode_utf8_lossy()
            .into_owned(),
        Some(_) => String::new(),
        None => "/".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_may_come_from_a_file_and_errors_never_show_its_password() {
        let dir = std::env::temp_dir().join(format!("wp-amqp-url-{:016x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("url");
        std::fs::write(&file, "amqp://app:s3cret@h:5672/jobs\n").unwrap();
        let path = file.display().to_string();
        let c = AmqpConfig::from_vars(&|n| (n == "AMQP_URL_FILE").then(|| path.clone())).unwrap();
        assert_eq!(c.vhost(), "jobs");
        assert_eq!(c.current_url(), "amqp://app:s3cret@h:5672/jobs");
        assert!(!format!("{c:?}").contains("s3cret"));
        std::fs::write(&file, "amqp:/app:s3cret@h:5672/jobs").unwrap();
        let e = AmqpConfig::from_vars(&|n| (n == "AMQP_URL_FILE").then(|| path.clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("AMQP_URL_FILE") && !e.contains("s3cret"), "{e}");
        let e = AmqpConfig::from_vars(&|n| {
            (n == "AMQP_URL").then(|| "amqp:/guest:s3cret@h:5672/%2f".to_owned())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("AMQP_URL") && !e.contains("s3cret"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn vhost_comes_from_the_path() {
        assert_eq!(AmqpConfig::new("amqp://h:5672").vhost(), "/");
        assert_eq!(AmqpConfig::new("amqp://h:5672/%2f").vhost(), "/");
        assert_eq!(AmqpConfig::new("amqp://u:p@h/jobs").vhost(), "jobs");
        assert_eq!(AmqpConfig::new("amqp://h/").vhost(), "");
        assert_eq!(
            AmqpConfig::new("amqps://h/a%2Fb?heartbeat=10").vhost(),
            "a/b"
        );
    }

    #[test]
    fn several_addresses_are_a_comma_separated_list() {
        let c = AmqpConfig::new("amqp://u:s3cret@a:5672/jobs, amqp://u:s3cret@b:5673/jobs");
        assert_eq!(
            c.urls(),
            ["amqp://u:s3cret@a:5672/jobs", "amqp://u:s3cret@b:5673/jobs"]
        );
        assert_eq!(c.vhost(), "jobs");
        assert_eq!(
            c.shown_url(),
            "amqp://u:***@a:5672/jobs,amqp://u:***@b:5673/jobs"
        );
        assert!(c.check_urls().is_ok());
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn a_bad_address_list_names_the_variable_and_the_form() {
        for bad in [
            "amqp://a:5672/%2f,b:5672",
            "amqp://a:5672/%2f,amqp://b:5672/other",
            "amqp://u:s3cret@a/%2f,",
        ] {
            let e = AmqpConfig::new(bad).check_urls().unwrap_err().to_string();
            assert!(
                e.contains("AMQP_URL") && e.contains("comma-separated") && !e.contains("s3cret"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn debug_output_hides_passwords() {
        let c = AmqpConfig::new("amqp://app:s3cret@h/%2f").management_url("http://a:b2@h:15672");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("b2@"),
            "{shown}"
        );
    }

    fn vars(pairs: &[(&str, &str)]) -> Result<AmqpConfig, ConfigError> {
        AmqpConfig::from_vars(&|name| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn plain_http_to_the_management_api_is_only_for_this_machine() {
        for url in [
            "http://guest:guest@127.0.0.1:15672",
            "http://guest:guest@127.10.20.30:15672/",
            "http://guest:guest@[::1]:15672",
            "http://guest:guest@localhost:15672",
            "http://guest:guest@LocalHost:15672",
            "https://ops:s3cret@rabbit.internal:15671",
        ] {
            assert!(vars(&[("AMQP_MANAGEMENT_URL", url)]).is_ok(), "{url}");
        }
        for url in [
            "http://ops:s3cret@rabbit:15672",
            "http://ops:s3cret@10.0.0.7:15672",
            "http://ops:s3cret@localhost.example.com:15672",
            "http://ops:s3cret@127.0.0.1.nip.io:15672",
            "http://127.0.0.1:s3cret@rabbit:15672",
            // The host is rabbit: what follows `#` is a fragment.
            "http://ops:s3cret@rabbit:15672/#@127.0.0.1",
            "http://[::ffff:10.0.0.7]:15672",
        ] {
            let e = vars(&[("AMQP_MANAGEMENT_URL", url)])
                .err()
                .unwrap_or_else(|| panic!("{url} must be refused"))
                .to_string();
            assert!(
                e.contains("AMQP_MANAGEMENT_URL")
                    && e.contains("AMQP_MANAGEMENT_ALLOW_HTTP=true")
                    && e.contains("https://")
                    && !e.contains("s3cret"),
                "{url}: {e}"
            );
            let allowed = vars(&[
                ("AMQP_MANAGEMENT_URL", url),
                ("AMQP_MANAGEMENT_ALLOW_HTTP", "true"),
            ]);
            assert!(allowed.is_ok(), "{url}: {:?}", allowed.err());
        }
        let e = vars(&[
            ("AMQP_MANAGEMENT_URL", "http://rabbit:15672"),
            ("AMQP_MANAGEMENT_ALLOW_HTTP", "maybe"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("AMQP_MANAGEMENT_ALLOW_HTTP") && e.contains("true or false"),
            "{e}"
        );
        for bad in ["ftp://guest:s3cret@127.0.0.1", "127.0.0.1:15672", "http://"] {
            let e = vars(&[("AMQP_MANAGEMENT_URL", bad)])
                .err()
                .unwrap_or_else(|| panic!("{bad} must be refused"))
                .to_string();
            assert!(
                e.contains("AMQP_MANAGEMENT_URL") && !e.contains("s3cret"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused() {
        let dir = std::env::temp_dir().join(format!("wp-amqp-ca-{:016x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ca.crt");
        let path = file.display().to_string();
        for content in [
            "",
            "not a certificate\n",
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
        ] {
            std::fs::write(&file, content).unwrap();
            let e = vars(&[("AMQP_CA_FILE", &path)])
                .err()
                .unwrap_or_else(|| panic!("{content:?} must be refused"))
                .to_string();
            assert!(
                e.contains("AMQP_CA_FILE") && e.contains("BEGIN CERTIFICATE"),
                "{e}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn queue_types_default_and_override() {
        let c = AmqpConfig::new(DEFAULT_URL)
            .default_queue_type(QueueType::Quorum)
            .queue_type("fast", QueueType::Classic);
        assert_eq!(c.type_of("fast"), QueueType::Classic);
        assert_eq!(c.type_of("other"), QueueType::Quorum);
    }
}
