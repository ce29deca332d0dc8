//! `from_env`: the environment variables of the README's configuration table.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use super::{Backoff, PodDeletionCost, QueueSpec, Scheduling, WorkerConfig};
use crate::error::ConfigError;

const DURATION: &str = "a duration such as 30s, 500ms, 2m or 1h";
const POSITIVE: &str = "a positive integer";
const QUEUES: &str = "name[:weight][,name[:weight]...] with positive integer weights";
const SWITCH: &str = "true or false (or 1 or 0)";

pub(super) fn from_lookup(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<WorkerConfig, ConfigError> {
    let get = |key: &str| {
        lookup(key)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let mut c = WorkerConfig::default();

    if let Some(v) = get("WORKER_POOL") {
        c.pool = v;
    }
    if let Some(v) = get("WORKER_QUEUES") {
        c.queues = parse_queues(&v)?;
    }
    if let Some(v) = get("WORKER_QUEUE_LIMITS") {
        apply_queue_limits(&mut c.queues, &v)?;
    }
    if let Some(v) = get("WORKER_SCHEDULING") {
        c.scheduling = match v.to_ascii_lowercase().as_str() {
            "weighted" => Scheduling::Weighted,
            "priority" => Scheduling::Priority,
            _ => {
                return Err(ConfigError::invalid(
                    "WORKER_SCHEDULING",
                    v,
                    "weighted or priority",
                ))
            }
        };
    }
    let positive = |key: &str| -> Result<Option<u32>, ConfigError> {
        get(key)
            .map(|v| match u32::from_str(&v) {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(ConfigError::invalid(key, v, POSITIVE)),
            })
            .transpose()
    };
    let duration = |key: &str| -> Result<Option<Duration>, ConfigError> {
        get(key)
            .map(|v| {
                humantime::parse_duration(&v).map_err(|_| ConfigError::invalid(key, v, DURATION))
            })
            .transpose()
    };
    if let Some(n) = positive("WORKER_CONCURRENCY")? {
        c.concurrency = n;
    }
    if let Some(v) = get("WORKER_PREFETCH") {
        c.prefetch = u32::from_str(&v)
            .map_err(|_| ConfigError::invalid("WORKER_PREFETCH", v, "a non-negative integer"))?;
    }
    c.budget = positive("WORKER_BUDGET")?;
    if let Some(v) = get("WORKER_MEMORY_BUDGET") {
        if c.budget.is_some() {
            return Err(ConfigError::invalid(
                "WORKER_MEMORY_BUDGET",
                v,
                "unset while WORKER_BUDGET is set (both set the one budget)",
            ));
        }
        c.budget = Some(parse_mib(&v).ok_or_else(|| {
            ConfigError::invalid(
                "WORKER_MEMORY_BUDGET",
                v,
                "a size such as 512MiB, 8GiB or 2048 (MiB), at least 1MiB",
            )
        })?);
    }
    if let Some(n) = positive("WORKER_MAX_ATTEMPTS")? {
        c.max_attempts = n;
    }
    if let Some(d) = duration("WORKER_DRAIN_TIMEOUT")? {
        c.drain_timeout = d;
    }
    if let Some(d) = duration("WORKER_LEASE")? {
        c.lease = d;
    }
    if let Some(d) = duration("WORKER_HEARTBEAT")? {
        c.heartbeat = d;
    }
    if let Some(d) = duration("WORKER_REAP_INTERVAL")? {
        c.reap_interval = d;
    } else {
        c.reap_interval = super::default_reap_interval(c.lease);
    }
    c.job_timeout = duration("WORKER_JOB_TIMEOUT")?;
    let base = duration("WORKER_RETRY_BASE")?.unwrap_or(c.backoff.base);
    let cap = duration("WORKER_RETRY_CAP")?.unwrap_or(c.backoff.cap);
    c.backoff = Backoff::new(base, cap);
    if let Some(v) = get("WORKER_HTTP_ADDR") {
        c.http_addr = if v.eq_ignore_ascii_case("off") {
            None
        } else {
            Some(SocketAddr::from_str(&v).map_err(|_| {
                ConfigError::invalid(
                    "WORKER_HTTP_ADDR",
                    v,
                    "host:port such as 0.0.0.0:9090, or off",
                )
            })?)
        };
    }
    let switch = |key: &str| -> Result<Option<bool>, ConfigError> {
        get(key)
            .map(|v| match v.to_ascii_lowercase().as_str() {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(ConfigError::invalid(key, v, SWITCH)),
            })
            .transpose()
    };
    if switch("WORKER_POD_DELETION_COST")? == Some(true) {
        c.pod_deletion_cost = Some(PodDeletionCost::from_lookup(&lookup)?);
    }
    if let Some(on) = switch("WORKER_QUIET_SURPLUS")? {
        c.quiet_surplus = on;
    }
    c.validate().map_err(|e| match e {
        // Name the variable behind the setting that failed.
        ConfigError::Invalid {
            variable,
            value,
            expected,
        } => ConfigError::invalid(env_name(&variable), value, expected),
        other @ ConfigError::Missing { .. } => other,
    })?;
    Ok(c)
}

fn env_name(setting: &str) -> String {
    match setting {
        // Already a variable's name (the pod-deletion-cost settings).
        s if s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') => s.into(),
        "queues" => "WORKER_QUEUES".into(),
        "backoff" => "WORKER_RETRY_BASE/WORKER_RETRY_CAP".into(),
        s if s.starts_with("max_in_flight") => "WORKER_QUEUE_LIMITS".into(),
        s if s.starts_with("weight") => "WORKER_QUEUES".into(),
        s => format!("WORKER_{}", s.to_ascii_uppercase()),
    }
}

fn parse_queues(v: &str) -> Result<Vec<QueueSpec>, ConfigError> {
    let bad = || ConfigError::invalid("WORKER_QUEUES", v, QUEUES);
    v.split(',')
        .map(|item| {
            let item = item.trim();
            let (name, weight) = match item.split_once(':') {
                Some((n, w)) => (
                    n,
                    u32::from_str(w.trim())
                        .ok()
                        .filter(|w| *w > 0)
                        .ok_or_else(bad)?,
                ),
                None => (item, 1),
            };
            if name.trim().is_empty() {
                return Err(bad());
            }
            Ok(QueueSpec::new(name.trim()).weight(weight))
        })
        .collect()
}

fn apply_queue_limits(queues: &mut [QueueSpec], v: &str) -> Result<(), ConfigError> {
    const FORM: &str = "name:limit[,name:limit...] naming queues of WORKER_QUEUES";
    let bad = || ConfigError::invalid("WORKER_QUEUE_LIMITS", v, FORM);
    for item in v.split(',') {
        let (name, limit) = item.trim().split_once(':').ok_or_else(bad)?;
        let limit = u32::from_str(limit.trim())
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(bad)?;
        let q = queues
            .iter_mut()
            .find(|q| q.name == name.trim())
            .ok_or_else(bad)?;
        q.max_in_flight = Some(limit);
    }
    Ok(())
}

/// A size in MiB: `512MiB`, `8GiB`, `1TiB` (also `M`, `G`, `T`, `MB`, `GB`, `TB`, read
/// as powers of 1024), or a bare number of MiB. `None` below 1 MiB or above `u32::MAX` MiB.
fn parse_mib(v: &str) -> Option<u32> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (number, unit) = v.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mi" | "mib" => 1,
        "g" | "gb" | "gi" | "gib" => 1024,
        "t" | "tb" | "ti" | "tib" => 1024 * 1024,
        _ => return None,
    };
    let mib = number.checked_mul(factor)?;
    u32::try_from(mib).ok().filter(|&m| m > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(vars: &[(&str, &str)]) -> Result<WorkerConfig, ConfigError> {
        from_lookup(crate::config::lookup_of(vars))
    }

    #[test]
    fn defaults_match_the_design_table() {
        let c = read(&[]).unwrap();
        assert_eq!(c.pool, "default");
        assert_eq!(c.queue_names(), vec!["default"]);
        assert_eq!(c.concurrency, 4);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.lease, Duration::from_secs(30));
        assert_eq!(c.heartbeat, Duration::from_secs(5));
        assert_eq!(c.max_attempts, 5);
        assert_eq!(c.http_addr, Some(SocketAddr::from(([0, 0, 0, 0], 9090))));
    }

    #[test]
    fn reads_every_variable() {
        let c = read(&[
            ("WORKER_POOL", "gpu"),
            ("WORKER_QUEUES", "a:3, b"),
            ("WORKER_QUEUE_LIMITS", "b:2"),
            ("WORKER_SCHEDULING", "priority"),
            ("WORKER_CONCURRENCY", "16"),
            ("WORKER_PREFETCH", "2"),
            ("WORKER_BUDGET", "4096"),
            ("WORKER_DRAIN_TIMEOUT", "2m"),
            ("WORKER_LEASE", "500ms"),
            ("WORKER_HEARTBEAT", "1s"),
            ("WORKER_MAX_ATTEMPTS", "3"),
            ("WORKER_JOB_TIMEOUT", "10s"),
            ("WORKER_RETRY_BASE", "10ms"),
            ("WORKER_RETRY_CAP", "1s"),
            ("WORKER_HTTP_ADDR", "off"),
        ])
        .unwrap();
        assert_eq!(c.pool, "gpu");
        assert_eq!(
            c.queues,
            vec![
                QueueSpec::new("a").weight(3),
                QueueSpec::new("b").max_in_flight(2)
            ]
        );
        assert_eq!(c.scheduling, Scheduling::Priority);
        assert_eq!((c.concurrency, c.prefetch, c.budget), (16, 2, Some(4096)));
        assert_eq!(c.drain_timeout, Duration::from_secs(120));
        assert_eq!(c.lease, Duration::from_millis(500));
        assert_eq!(c.reap_interval, Duration::from_millis(250));
        assert_eq!(c.job_timeout, Some(Duration::from_secs(10)));
        assert_eq!(
            c.backoff,
            Backoff::new(Duration::from_millis(10), Duration::from_secs(1))
        );
        assert_eq!(c.http_addr, None);
    }

    #[test]
    fn bad_values_name_the_variable_and_the_form() {
        let cases = [
            ("WORKER_CONCURRENCY", "zero", POSITIVE),
            ("WORKER_CONCURRENCY", "0", POSITIVE),
            ("WORKER_LEASE", "30 parsecs", DURATION),
            ("WORKER_QUEUES", "a:x", QUEUES),
            ("WORKER_QUEUES", "a,,b", QUEUES),
            ("WORKER_SCHEDULING", "random", "weighted or priority"),
            ("WORKER_POD_DELETION_COST", "yes", SWITCH),
            ("WORKER_QUIET_SURPLUS", "on", SWITCH),
            (
                "WORKER_HTTP_ADDR",
                "nowhere",
                "host:port such as 0.0.0.0:9090, or off",
            ),
        ];
        for (key, value, form) in cases {
            match read(&[(key, value)]) {
                Err(ConfigError::Invalid {
                    variable, expected, ..
                }) => {
                    assert_eq!(variable, key, "{key}={value}");
                    assert_eq!(expected, form, "{key}={value}");
                }
                other => panic!("{key}={value}: {other:?}"),
            }
        }
        let e = read(&[("WORKER_QUEUES", "ok,a{b}")]).unwrap_err();
        assert!(e.to_string().starts_with("WORKER_QUEUES="), "{e}");
        let e = read(&[("WORKER_QUEUE_LIMITS", "nope:3")]).unwrap_err();
        assert!(e.to_string().starts_with("WORKER_QUEUE_LIMITS="), "{e}");
    }

    #[test]
    fn pod_deletion_cost_is_off_unless_switched_on() {
        assert_eq!(read(&[]).unwrap().pod_deletion_cost, None);
        // Off: the pod's variables are not needed.
        for off in ["false", "0", "FALSE"] {
            let c = read(&[("WORKER_POD_DELETION_COST", off)]).unwrap();
            assert_eq!(c.pod_deletion_cost, None, "{off}");
        }
        let pod = [
            ("POD_NAME", "gpu-0"),
            ("POD_NAMESPACE", "workers"),
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
            ("KUBERNETES_SERVICEACCOUNT_DIR", "/tmp/sa"),
        ];
        for on in ["true", "1", "True"] {
            let mut vars = pod.to_vec();
            vars.push(("WORKER_POD_DELETION_COST", on));
            let cost = read(&vars).unwrap().pod_deletion_cost.unwrap();
            assert_eq!(
                cost,
                PodDeletionCost::new("gpu-0", "workers", "10.96.0.1", 443)
                    .service_account_dir("/tmp/sa")
            );
        }
    }

    #[test]
    fn quiet_surplus_is_off_unless_switched_on() {
        assert!(!read(&[]).unwrap().quiet_surplus);
        for (v, on) in [
            ("true", true),
            ("1", true),
            ("TRUE", true),
            ("false", false),
            ("0", false),
        ] {
            assert_eq!(
                read(&[("WORKER_QUIET_SURPLUS", v)]).unwrap().quiet_surplus,
                on,
                "{v}"
            );
        }
    }

    #[test]
    fn pod_deletion_cost_on_names_what_is_missing() {
        let e = read(&[
            ("WORKER_POD_DELETION_COST", "true"),
            ("POD_NAMESPACE", "workers"),
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ])
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("WORKER_POD_DELETION_COST=true needs what is missing: POD_NAME ("),
            "{text}"
        );
        assert!(!text.contains("POD_NAMESPACE"), "{text}");
    }

    #[test]
    fn a_memory_budget_is_read_in_mib_and_excludes_the_unit_budget() {
        let lookup = crate::config::lookup_of;
        for (v, mib) in [
            ("512MiB", 512),
            ("8GiB", 8192),
            ("2048", 2048),
            ("1 G", 1024),
        ] {
            let pairs: &'static [(&'static str, &'static str)] =
                Box::leak(vec![("WORKER_MEMORY_BUDGET", v)].into_boxed_slice());
            let c = from_lookup(lookup(pairs)).unwrap();
            assert_eq!(c.budget, Some(mib), "{v}");
        }
        for v in ["0", "12KiB", "lots", "99999999TiB"] {
            let pairs: &'static [(&'static str, &'static str)] =
                Box::leak(vec![("WORKER_MEMORY_BUDGET", v)].into_boxed_slice());
            let e = from_lookup(lookup(pairs)).unwrap_err().to_string();
            assert!(
                e.contains("WORKER_MEMORY_BUDGET") && e.contains("MiB"),
                "{e}"
            );
        }
        let e = from_lookup(lookup(&[
            ("WORKER_BUDGET", "10"),
            ("WORKER_MEMORY_BUDGET", "1GiB"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("WORKER_BUDGET"), "{e}");
    }
}
