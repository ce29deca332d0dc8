//! [`PodDeletionCost`]: where this worker's pod is and how to reach the Kubernetes API
//! to keep its `controller.kubernetes.io/pod-deletion-cost` annotation current.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::ConfigError;

/// Keep this pod's `controller.kubernetes.io/pod-deletion-cost` annotation current, so
/// that a ReplicaSet scaling down removes idle pods first. Off unless set
/// ([`WorkerConfigBuilder::pod_deletion_cost`], or `WORKER_POD_DELETION_COST=true`).
///
/// The value is the worker's number of jobs in flight. With
/// [`quiet_surplus`](crate::WorkerConfigBuilder::quiet_surplus) on it is
/// `2 × in_flight + (0 if quiet else 1)`: a quiet idle pod 0, an active idle pod 1, a
/// quiet pod running one job 2, an active one 3. Quiet idle pods then go first, and a
/// pod running jobs never goes before an idle one.
///
/// The worker patches its own pod through the Kubernetes API with the pod's
/// service-account token, trusting only the cluster CA beside it. The token file is
/// read again for every request, as bound tokens rotate. The service account needs
/// `patch` on `pods` in the pod's namespace.
///
/// Changes are coalesced: at most one request per [`interval`](Self::interval), always
/// with the latest value, and none while the value equals the one the API last
/// accepted. A refused request is logged and retried with backoff; it never affects
/// jobs.
///
/// ```
/// use worker_core::{PodDeletionCost, WorkerConfig};
///
/// let config = WorkerConfig::builder()
///     .pod_deletion_cost(PodDeletionCost::new("gpu-7d9f-x2k4", "workers", "10.96.0.1", 443))
///     .build()?;
/// assert!(config.pod_deletion_cost.is_some());
/// # Ok::<(), worker_core::ConfigError>(())
/// ```
///
/// [`WorkerConfigBuilder::pod_deletion_cost`]: crate::WorkerConfigBuilder::pod_deletion_cost
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PodDeletionCost {
    /// This pod's name (`POD_NAME`, from the downward API's `metadata.name`).
    pub pod_name: String,
    /// This pod's namespace (`POD_NAMESPACE`, from `metadata.namespace`).
    pub namespace: String,
    /// The API server's host: a name, an IPv4 or an IPv6 address, without brackets
    /// (`KUBERNETES_SERVICE_HOST`).
    pub api_host: String,
    /// The API server's HTTPS port (`KUBERNETES_SERVICE_PORT`).
    pub api_port: u16,
    /// The directory holding `token` and `ca.crt` (`KUBERNETES_SERVICEACCOUNT_DIR`).
    pub service_account_dir: PathBuf,
    /// At most one request per this interval.
    pub interval: Duration,
}

impl PodDeletionCost {
    /// Where Kubernetes mounts a pod's service-account token and cluster CA.
    pub const DEFAULT_SERVICE_ACCOUNT_DIR: &'static str =
        "/var/run/secrets/kubernetes.io/serviceaccount";

    /// The annotation kept current.
    pub const ANNOTATION: &'static str = "controller.kubernetes.io/pod-deletion-cost";

    /// Pod `pod_name` in `namespace`, with the API server at `api_host:api_port`; the
    /// default service-account directory and an interval of 1 s.
    pub fn new(
        pod_name: impl Into<String>,
        namespace: impl Into<String>,
        api_host: impl Into<String>,
        api_port: u16,
    ) -> Self {
        Self {
            pod_name: pod_name.into(),
            namespace: namespace.into(),
            api_host: api_host.into(),
            api_port,
            service_account_dir: PathBuf::from(Self::DEFAULT_SERVICE_ACCOUNT_DIR),
            interval: Duration::from_secs(1),
        }
    }

    /// Read the pod and the API server from the environment a pod has: `POD_NAME`,
    /// `POD_NAMESPACE` (the chart sets them from the downward API),
    /// `KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT` (Kubernetes sets them), and
    /// `KUBERNETES_SERVICEACCOUNT_DIR` if set. The error names every variable missing.
    ///
    /// The token and CA files are read when the worker starts
    /// ([`Worker::spawn`](crate::Worker::spawn)), which fails if they cannot be.
    pub fn in_cluster() -> Result<Self, ConfigError> {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// [`in_cluster`](Self::in_cluster), reading variables from `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |key: &str| {
            lookup(key)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut missing = Vec::new();
        let mut need = |key: &str, why: &str| {
            let value = get(key);
            if value.is_none() {
                missing.push(format!("{key} (not set; {why})"));
            }
            value.unwrap_or_default()
        };
        const DOWNWARD: &str = "the chart sets it from the downward API";
        const EVERY_POD: &str = "Kubernetes sets it in every pod";
        let pod_name = need("POD_NAME", &format!("{DOWNWARD}, metadata.name"));
        let namespace = need("POD_NAMESPACE", &format!("{DOWNWARD}, metadata.namespace"));
        let api_host = need("KUBERNETES_SERVICE_HOST", EVERY_POD);
        let port = need("KUBERNETES_SERVICE_PORT", EVERY_POD);
        if !missing.is_empty() {
            return Err(ConfigError::missing(SETTING, missing));
        }
        let api_port = port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
            ConfigError::invalid("KUBERNETES_SERVICE_PORT", &port, "a port from 1 to 65535")
        })?;
        let mut cost = Self::new(
            pod_name,
            namespace,
            api_host.trim_start_matches('[').trim_end_matches(']'),
            api_port,
        );
        if let Some(dir) = get("KUBERNETES_SERVICEACCOUNT_DIR") {
            cost.service_account_dir = PathBuf::from(dir);
        }
        Ok(cost)
    }

    /// Read the token and CA from `dir` instead of the default directory.
    pub fn service_account_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.service_account_dir = dir.into();
        self
    }

    /// At most one request per `every` (default 1 s).
    pub fn interval(mut self, every: Duration) -> Self {
        self.interval = every;
        self
    }

    /// The service-account token file.
    pub fn token_path(&self) -> PathBuf {
        self.service_account_dir.join("token")
    }

    /// The cluster CA file.
    pub fn ca_path(&self) -> PathBuf {
        self.service_account_dir.join("ca.crt")
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("POD_NAME", &self.pod_name),
            ("POD_NAMESPACE", &self.namespace),
            ("KUBERNETES_SERVICE_HOST", &self.api_host),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::invalid(
                    name,
                    value.as_str(),
                    "a non-empty name",
                ));
            }
        }
        if self.api_port == 0 {
            return Err(ConfigError::invalid(
                "KUBERNETES_SERVICE_PORT",
                "0",
                "a port from 1 to 65535",
            ));
        }
        if self.interval < Duration::from_millis(10) {
            return Err(ConfigError::invalid(
                "pod_deletion_cost interval",
                format!("{:?}", self.interval),
                "a duration of at least 10ms",
            ));
        }
        Ok(())
    }
}

/// How the setting is named in errors about what it needs.
pub(crate) const SETTING: &str = "WORKER_POD_DELETION_COST=true";

#[cfg(test)]
mod tests {
    use super::*;

    fn read(vars: &[(&str, &str)]) -> Result<PodDeletionCost, ConfigError> {
        PodDeletionCost::from_lookup(crate::config::lookup_of(vars))
    }

    const ALL: [(&str, &str); 4] = [
        ("POD_NAME", "gpu-0"),
        ("POD_NAMESPACE", "workers"),
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("KUBERNETES_SERVICE_PORT", "443"),
    ];

    #[test]
    fn reads_the_pod_and_the_api_server() {
        let c = read(&ALL).unwrap();
        assert_eq!(
            c,
            PodDeletionCost::new("gpu-0", "workers", "10.96.0.1", 443)
        );
        assert_eq!(
            c.token_path(),
            PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
        let mut vars = ALL.to_vec();
        vars.push(("KUBERNETES_SERVICEACCOUNT_DIR", "/tmp/sa"));
        vars[2] = ("KUBERNETES_SERVICE_HOST", "[fd00::1]");
        let c = read(&vars).unwrap();
        assert_eq!(c.ca_path(), PathBuf::from("/tmp/sa/ca.crt"));
        assert_eq!(c.api_host, "fd00::1");
    }

    #[test]
    fn names_every_missing_variable() {
        let e = read(&ALL[1..3]).unwrap_err();
        match &e {
            ConfigError::Missing { setting, missing } => {
                assert_eq!(setting, SETTING);
                assert_eq!(missing.len(), 2, "{missing:?}");
                assert!(missing[0].starts_with("POD_NAME ("), "{e}");
                assert!(missing[1].starts_with("KUBERNETES_SERVICE_PORT ("), "{e}");
            }
            other => panic!("{other:?}"),
        }
        let mut vars = ALL.to_vec();
        vars[3] = ("KUBERNETES_SERVICE_PORT", "https");
        let e = read(&vars).unwrap_err();
        assert!(e.to_string().starts_with("KUBERNETES_SERVICE_PORT="), "{e}");
    }
}
