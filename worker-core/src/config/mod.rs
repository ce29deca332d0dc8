//! Worker configuration: a builder in code, and [`WorkerConfig::from_env`] reading the
//! same settings from environment variables, so a pool is configured by its chart alone.

mod deletion_cost;
mod env;
mod gpu;
mod secret;

use std::net::SocketAddr;
use std::time::Duration;

use crate::broker::validate_queue_name;
use crate::error::ConfigError;

/// A variable lookup over `pairs`, for tests of the readers that take one.
#[cfg(test)]
pub(crate) fn lookup_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |k| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    }
}

pub use deletion_cost::PodDeletionCost;
pub(crate) use deletion_cost::SETTING as POD_DELETION_COST_SETTING;
pub use gpu::{visible_gpus, visible_gpus_from};
pub use secret::SecretSource;

/// How the scheduler shares free capacity between queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scheduling {
    /// Each queue gets capacity in proportion to its weight while it has work; an
    /// empty queue's share goes to the others.
    #[default]
    Weighted,
    /// Queues in the order given: a later queue gets capacity only when every
    /// earlier one has no work (or is at its own limit).
    Priority,
}

/// One queue the worker consumes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueSpec {
    /// Queue name.
    pub name: String,
    /// Share of capacity under weighted scheduling (at least 1).
    pub weight: u32,
    /// At most this many of this queue's jobs in flight in this process.
    pub max_in_flight: Option<u32>,
}

impl QueueSpec {
    /// A queue of weight 1 with no own limit.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            weight: 1,
            max_in_flight: None,
        }
    }

    /// Set the weight.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Limit this queue's jobs in flight.
    pub fn max_in_flight(mut self, limit: u32) -> Self {
        self.max_in_flight = Some(limit);
        self
    }
}

/// Retry backoff: exponential with full jitter. Attempt `n` (1-based) waits a
/// uniformly random time in `[0, min(cap, base × 2^(n-1))]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backoff {
    /// Upper bound of the first retry's delay.
    pub base: Duration,
    /// Upper bound of any delay.
    pub cap: Duration,
}

impl Backoff {
    /// A backoff from `base` up to `cap`.
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap }
    }

    /// The largest delay after failed attempt `attempt`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A delay after failed attempt `attempt`, drawn with full jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt).as_millis() as u64;
        Duration::from_millis(fastrand::u64(0..=ceiling))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(300))
    }
}

/// Everything a worker process needs to know. Build it with [`WorkerConfig::builder`]
/// or read it with [`WorkerConfig::from_env`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// Pool name, for metrics labels and the registry.
    pub pool: String,
    /// Queues consumed.
    pub queues: Vec<QueueSpec>,
    /// Weighted fair (default) or strict priority.
    pub scheduling: Scheduling,
    /// Jobs running at once in this process.
    pub concurrency: u32,
    /// Jobs fetched ahead of free permits (0: fetch only what can start now).
    pub prefetch: u32,
    /// Pool budget in units (e.g. MiB); each job holds its `cost` of it while running.
    pub budget: Option<u32>,
    /// How long in-flight jobs may finish after the first signal.
    pub drain_timeout: Duration,
    /// Job lease; extended every lease/3 while the job runs.
    pub lease: Duration,
    /// Worker registry beat interval; the registry entry lives 3 × this.
    pub heartbeat: Duration,
    /// Attempts before a failing job is dead-lettered.
    pub max_attempts: u32,
    /// Retry backoff.
    pub backoff: Backoff,
    /// Cancel and retry a job running longer than this.
    pub job_timeout: Option<Duration>,
    /// Where to serve `/livez /readyz /metrics /scaling`; `None` serves nothing.
    pub http_addr: Option<SocketAddr>,
    /// How often this worker reaps expired leases of its queues.
    pub reap_interval: Duration,
    /// Longest idle wait before fetching again when the broker gives no wake-up.
    pub idle_wait: Duration,
    /// Keep this pod's pod-deletion-cost annotation current (see [`PodDeletionCost`]);
    /// `None` (the default) leaves the pod alone.
    pub pod_deletion_cost: Option<PodDeletionCost>,
    /// Go quiet when the pool needs fewer replicas than are live and this worker is
    /// among those a ReplicaSet would delete first: take no new jobs (running ones
    /// finish), stay ready, and take jobs again when the need comes back. Checked
    /// every `min(heartbeat, 1 s)`. Off by default.
    pub quiet_surplus: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            pool: "default".into(),
            queues: vec![QueueSpec::new("default")],
            scheduling: Scheduling::Weighted,
            concurrency: 4,
            prefetch: 0,
            budget: None,
            drain_timeout: Duration::from_secs(30),
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
            max_attempts: 5,
            backoff: Backoff::default(),
            job_timeout: None,
            http_addr: Some(SocketAddr::from(([0, 0, 0, 0], 9090))),
            reap_interval: Duration::from_secs(5),
            idle_wait: Duration::from_secs(1),
            pod_deletion_cost: None,
            quiet_surplus: false,
        }
    }
}

impl WorkerConfig {
    /// A builder starting from the defaults.
    ///
    /// ```
    /// use std::time::Duration;
    /// use worker_core::{QueueSpec, WorkerConfig};
    ///
    /// let config = WorkerConfig::builder()
    ///     .pool("gpu")
    ///     .queue(QueueSpec::new("inference").weight(3))
    ///     .queue(QueueSpec::new("embeddings").max_in_flight(2))
    ///     .concurrency(8)
    ///     .drain_timeout(Duration::from_secs(120))
    ///     .build()?;
    /// assert_eq!(config.queues.len(), 2);
    /// # Ok::<(), worker_core::ConfigError>(())
    /// ```
    pub fn builder() -> WorkerConfigBuilder {
        WorkerConfigBuilder {
            config: Self {
                queues: Vec::new(),
                ..Self::default()
            },
            reap_interval_set: false,
        }
    }

    /// Read the configuration from the environment (see the README's table).
    /// A bad value is an error that names the variable and the accepted form.
    pub fn from_env() -> Result<Self, ConfigError> {
        env::from_lookup(|key| std::env::var(key).ok())
    }

    /// Read the configuration from `lookup` instead of the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        env::from_lookup(lookup)
    }

    /// Capacity this replica offers the autoscaler: its concurrency.
    pub fn capacity_per_replica(&self) -> u32 {
        self.concurrency
    }

    /// The names of the consumed queues.
    pub fn queue_names(&self) -> Vec<String> {
        self.queues.iter().map(|q| q.name.clone()).collect()
    }

    /// Check every setting; the builder and `from_env` call this.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = |name: &str, v: u32| {
            if v == 0 {
                Err(ConfigError::invalid(name, "0", "a positive integer"))
            } else {
                Ok(())
            }
        };
        positive("concurrency", self.concurrency)?;
        positive("max_attempts", self.max_attempts)?;
        if let Some(b) = self.budget {
            positive("budget", b)?;
        }
        if self.queues.is_empty() {
            return Err(ConfigError::invalid(
                "queues",
                "",
                "at least one queue, as name[:weight][,name[:weight]...]",
            ));
        }
        for (i, q) in self.queues.iter().enumerate() {
            validate_queue_name(&q.name)
                .map_err(|e| ConfigError::invalid("queues", q.name.clone(), e.to_string()))?;
            positive(&format!("weight of queue {}", q.name), q.weight)?;
            if let Some(limit) = q.max_in_flight {
                positive(&format!("max_in_flight of queue {}", q.name), limit)?;
            }
            if self.queues[..i].iter().any(|o| o.name == q.name) {
                return Err(ConfigError::invalid(
                    "queues",
                    q.name.clone(),
                    "each queue named once",
                ));
            }
        }
        for (name, d) in [
            ("lease", self.lease),
            ("heartbeat", self.heartbeat),
            ("reap_interval", self.reap_interval),
            ("idle_wait", self.idle_wait),
        ] {
            if d < Duration::from_millis(3) {
                return Err(ConfigError::invalid(
                    name,
                    format!("{d:?}"),
                    "a duration of at least 3ms",
                ));
            }
        }
        if self.backoff.cap < self.backoff.base {
            return Err(ConfigError::invalid(
                "backoff",
                format!("base {:?} > cap {:?}", self.backoff.base, self.backoff.cap),
                "a retry base no larger than the retry cap",
            ));
        }
        if let Some(cost) = &self.pod_deletion_cost {
            cost.validate()?;
        }
        Ok(())
    }
}

/// Builds a [`WorkerConfig`]; see [`WorkerConfig::builder`].
#[derive(Clone, Debug)]
pub struct WorkerConfigBuilder {
    config: WorkerConfig,
    reap_interval_set: bool,
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {$(
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.config.$name = value;
            self
        }
    )*};
}

impl WorkerConfigBuilder {
    /// Pool name.
    pub fn pool(mut self, pool: impl Into<String>) -> Self {
        self.config.pool = pool.into();
        self
    }

    /// Add a queue (a name converts into a queue of weight 1).
    pub fn queue(mut self, queue: impl Into<QueueSpec>) -> Self {
        self.config.queues.push(queue.into());
        self
    }

    /// Budget units for weighted permits.
    pub fn budget(mut self, units: u32) -> Self {
        self.config.budget = Some(units);
        self
    }

    /// Per-job timeout.
    pub fn job_timeout(mut self, timeout: Duration) -> Self {
        self.config.job_timeout = Some(timeout);
        self
    }

    setters! {
        /// Weighted or priority scheduling.
        scheduling: Scheduling,
        /// Jobs running at once.
        concurrency: u32,
        /// Jobs fetched ahead of free permits.
        prefetch: u32,
        /// Drain timeout.
        drain_timeout: Duration,
        /// Job lease.
        lease: Duration,
        /// Registry beat interval.
        heartbeat: Duration,
        /// Attempts before dead-lettering.
        max_attempts: u32,
        /// Retry backoff.
        backoff: Backoff,
        /// HTTP listener address, `None` for none.
        http_addr: Option<SocketAddr>,
        /// Longest idle wait between fetches.
        idle_wait: Duration,
    }

    /// Go quiet while the pool needs fewer replicas than are live and this worker is
    /// among the surplus, ranked as a ReplicaSet deletes pods: quiet workers first,
    /// then those with fewer jobs in flight, then the newest. A quiet worker takes no
    /// new jobs, lets its running jobs finish, stays ready, and takes jobs again as
    /// soon as the pool needs it. Each worker decides alone, every `min(heartbeat,
    /// 1 s)`, from the worker registry and the pool's depth (the `/scaling`
    /// arithmetic). With [`pod_deletion_cost`](Self::pod_deletion_cost) the annotation
    /// then ranks quiet pods first (see [`PodDeletionCost`]). Off by default.
    ///
    /// ```
    /// use worker_core::WorkerConfig;
    ///
    /// let config = WorkerConfig::builder().quiet_surplus(true).build()?;
    /// assert!(config.quiet_surplus);
    /// # Ok::<(), worker_core::ConfigError>(())
    /// ```
    pub fn quiet_surplus(mut self, on: bool) -> Self {
        self.config.quiet_surplus = on;
        self
    }

    /// Keep this pod's `controller.kubernetes.io/pod-deletion-cost` annotation current
    /// (its jobs in flight, or with [`quiet_surplus`](Self::quiet_surplus) also its
    /// quiet state), so a ReplicaSet scaling down removes idle pods first (see
    /// [`PodDeletionCost`]). Off by default.
    ///
    /// ```no_run
    /// use worker_core::{PodDeletionCost, WorkerConfig};
    ///
    /// // In a pod: POD_NAME and POD_NAMESPACE from the downward API.
    /// let config = WorkerConfig::builder()
    ///     .pod_deletion_cost(PodDeletionCost::in_cluster()?)
    ///     .build()?;
    /// # Ok::<(), worker_core::ConfigError>(())
    /// ```
    pub fn pod_deletion_cost(mut self, cost: PodDeletionCost) -> Self {
        self.config.pod_deletion_cost = Some(cost);
        self
    }

    /// How often to reap expired leases (default: half the lease, 100 ms to 5 s).
    pub fn reap_interval(mut self, every: Duration) -> Self {
        self.config.reap_interval = every;
        self.reap_interval_set = true;
        self
    }

    /// Validate and finish. With no queue added, the queue is `default`.
    pub fn build(mut self) -> Result<WorkerConfig, ConfigError> {
        if !self.reap_interval_set {
            self.config.reap_interval = default_reap_interval(self.config.lease);
        }
        if self.config.queues.is_empty() {
            self.config.queues.push(QueueSpec::new("default"));
        }
        self.config.validate()?;
        Ok(self.config)
    }
}

impl From<&str> for QueueSpec {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl From<String> for QueueSpec {
    fn from(name: String) -> Self {
        Self::new(name)
    }
}

/// Reclaim a dead worker's jobs within about half a lease of their expiry.
pub(crate) fn default_reap_interval(lease: Duration) -> Duration {
    (lease / 2).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// `url` with any password replaced, for logs and errors: `redis://app:***@host`.
///
/// Malformed input is redacted too: without `://`, everything before the last `@` but
/// a scheme goes (`redis:/app:pw@host` shows as `redis:***@host`), and a `password=`
/// query parameter's value is replaced.
pub fn redact(url: &str) -> String {
    let shown = match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => format!("{scheme}://{userinfo}@{host}"),
            },
            None => url.to_owned(),
        },
        None => match url.rsplit_once('@') {
            Some((before, host)) => {
                let scheme = before.split_once(':').map(|(s, _)| s).filter(|s| {
                    !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
                });
                match scheme {
                    Some(scheme) => format!("{scheme}:***@{host}"),
                    None => format!("***@{host}"),
                }
            }
            None => url.to_owned(),
        },
    };
    redact_query_password(&shown)
}

/// `url` with the value of each `password=` query parameter replaced.
fn redact_query_password(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => p.to_owned(),
        })
        .collect();
    format!("{base}?{}", params.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_leave_redacted_urls() {
        assert_eq!(
            redact("redis://:s3cret@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(
            redact("amqps://app:s3cret@h:1/%2f"),
            "amqps://app:***@h:1/%2f"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("redis://app@h"), "redis://app@h");
    }

    #[test]
    fn passwords_never_leave_malformed_urls() {
        for (url, shown) in [
            ("redis:/app:s3cret@h:6379", "redis:***@h:6379"),
            ("amqp:/guest:s3cret@h:5672/%2f", "amqp:***@h:5672/%2f"),
            ("app:s3cret@h", "app:***@h"),
            (":s3cret@h", "***@h"),
            ("redis//app:s3cret@h", "***@h"),
            (
                "redis://h:6379/0?password=s3cret&db=1",
                "redis://h:6379/0?password=***&db=1",
            ),
        ] {
            assert_eq!(redact(url), shown, "{url}");
            assert!(!redact(url).contains("s3cret"));
        }
    }

    #[test]
    fn backoff_ceiling_doubles_up_to_cap() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings: Vec<u128> = (1..=6).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.ceiling(200), Duration::from_secs(1));
    }

    #[test]
    fn backoff_delay_stays_within_ceiling_and_uses_the_range() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let draws: Vec<Duration> = (0..2000).map(|_| b.delay(3)).collect();
        assert!(draws.iter().all(|d| *d <= Duration::from_millis(400)));
        // Full jitter: both halves of the range are drawn.
        assert!(draws.iter().any(|d| *d < Duration::from_millis(100)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(300)));
    }

    #[test]
    fn builder_refuses_duplicate_and_bad_queues() {
        assert!(WorkerConfig::builder()
            .queue("a")
            .queue("a")
            .build()
            .is_err());
        assert!(WorkerConfig::builder().queue("a b").build().is_err());
        assert!(WorkerConfig::builder().concurrency(0).build().is_err());
        let c = WorkerConfig::builder().build().unwrap();
        assert_eq!(c.queue_names(), vec!["default"]);
    }
}
