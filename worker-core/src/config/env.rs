//! `from_env`: the environment variables of the README's configuration table.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use super::{Backoff, QueueSpec, Scheduling, WorkerConfig};
use crate::error::ConfigError;

const DURATION: &str = "a duration such as 30s, 500ms, 2m or 1h";
const POSITIVE: &str = "a positive integer";
const QUEUES: &str = "name[:weight][,name[:weight]...] with positive integer weights";

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
    c.validate().map_err(|e| match e {
        // Name the variable behind the setting that failed.
        ConfigError::Invalid {
            variable,
            value,
            expected,
        } => ConfigError::invalid(env_name(&variable), value, expected),
    })?;
    Ok(c)
}

fn env_name(setting: &str) -> String {
    match setting {
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn read(vars: &[(&str, &str)]) -> Result<WorkerConfig, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_lookup(|k| map.get(k).cloned())
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
}
