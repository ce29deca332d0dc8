//! [`RedisConfig::from_env`]: the settings a worker, `workerctl` and the exporter of a
//! pool read from the same environment.

use std::time::Duration;

use worker_core::{redact, ConfigError, SecretSource};

use crate::RedisConfig;

/// How long an enqueue waits for its replicas when `REDIS_WAIT_TIMEOUT` is unset.
const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(1);

impl RedisConfig {
    /// Read the settings from the environment:
    ///
    /// | variable | meaning | default |
    /// |---|---|---|
    /// | `REDIS_URL` | one server: `redis://[user:password@]host:port[/db]`, `rediss://` for TLS | |
    /// | `REDIS_URL_FILE` | a file holding `REDIS_URL` (a mounted Secret), instead of it; see [`url_file`](Self::url_file) | |
    /// | `REDIS_CLUSTER_NODES` | a Redis Cluster: its seed nodes, comma-separated URLs (`redis://host:7000,redis://host:7001`); instead of `REDIS_URL` | |
    /// | `REDIS_PREFIX` | key prefix | `wp` |
    /// | `REDIS_CA_FILE` | PEM file of the CA that signed the server's certificate | system roots |
    /// | `REDIS_CLIENT_CERT_FILE`, `REDIS_CLIENT_KEY_FILE` | PEM files of the certificate and key this client presents (mutual TLS); both or neither | none |
    /// | `REDIS_WAIT_REPLICAS` | replicas that must confirm an enqueue, see [`wait_replicas`](Self::wait_replicas) | `0` (off) |
    /// | `REDIS_WAIT_TIMEOUT` | how long an enqueue waits for them | `1s` |
    ///
    /// Exactly one of `REDIS_URL` and `REDIS_CLUSTER_NODES` must be set. A bad value is
    /// an error naming the variable and the accepted form.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) with the variables looked up by `var` (a map,
    /// a configuration file, command-line flags) instead of the environment.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let url_source = SecretSource::lookup(&var, "REDIS_URL")?;
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let url = url_source.as_ref().map(SecretSource::read).transpose()?;
        let mut config = match (url, var("REDIS_CLUSTER_NODES")) {
            (Some(url), None) => {
                let variable = match url_source.as_ref().and_then(SecretSource::file_variable) {
                    Some(file) => format!("REDIS_URL (from {file})"),
                    None => "REDIS_URL".to_owned(),
                };
                check_url(
                    &variable,
                    &url,
                    &url,
                    "redis://[user:password@]host:port[/db] or rediss://…",
                )?;
                let mut config = Self::new(url);
                config.url_file = url_source.filter(|s| s.file_variable().is_some());
                config
            }
            (None, Some(list)) => {
                let nodes: Vec<String> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect();
                let form = "comma-separated seed node URLs: redis://host:7000,redis://host:7001 \
                            (rediss:// for TLS)";
                if nodes.is_empty() {
                    return Err(ConfigError::invalid("REDIS_CLUSTER_NODES", &list, form));
                }
                for node in &nodes {
                    check_url("REDIS_CLUSTER_NODES", node, &list, form)?;
                }
                Self::cluster(nodes)
            }
            (Some(url), Some(_)) => {
                return Err(ConfigError::invalid(
                    "REDIS_URL",
                    redact(&url),
                    "unset while REDIS_CLUSTER_NODES is set (both name the one Redis)",
                ))
            }
            (None, None) => {
                return Err(ConfigError::missing(
                    "Redis",
                    vec!["REDIS_URL (one server) or REDIS_CLUSTER_NODES (a cluster)".into()],
                ))
            }
        };
        if let Some(prefix) = var("REDIS_PREFIX") {
            config = config.prefix(prefix);
        }
        if let Some(path) = var("REDIS_CA_FILE") {
            let pem = std::fs::read(&path).map_err(|e| {
                ConfigError::invalid("REDIS_CA_FILE", &path, format!("a readable PEM file ({e})"))
            })?;
            config = config.ca_cert_pem(pem);
        }
        match (var("REDIS_CLIENT_CERT_FILE"), var("REDIS_CLIENT_KEY_FILE")) {
            (Some(cert), Some(key)) => {
                let read = |variable: &str, path: &str| {
                    std::fs::read(path).map_err(|e| {
                        ConfigError::invalid(variable, path, format!("a readable PEM file ({e})"))
                    })
                };
                config = config.client_cert_pem(
                    read("REDIS_CLIENT_CERT_FILE", &cert)?,
                    read("REDIS_CLIENT_KEY_FILE", &key)?,
                );
            }
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::missing(
                    "Redis client certificate",
                    vec!["REDIS_CLIENT_CERT_FILE and REDIS_CLIENT_KEY_FILE, both".into()],
                ))
            }
        }
        let replicas = match var("REDIS_WAIT_REPLICAS") {
            Some(v) => v.trim().parse::<u32>().map_err(|_| {
                ConfigError::invalid("REDIS_WAIT_REPLICAS", &v, "a non-negative integer")
            })?,
            None => 0,
        };
        let timeout = match var("REDIS_WAIT_TIMEOUT") {
            Some(v) => humantime::parse_duration(v.trim())
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    ConfigError::invalid("REDIS_WAIT_TIMEOUT", &v, "a duration such as 500ms or 2s")
                })?,
            None => DEFAULT_WAIT_TIMEOUT,
        };
        Ok(config.wait_replicas(replicas, timeout))
    }
}

/// `value` (one URL of `whole`, the variable's value) must be a `redis://` or
/// `rediss://` URL; the error shows `whole` without its passwords.
fn check_url(variable: &str, value: &str, whole: &str, form: &str) -> Result<(), ConfigError> {
    let scheme_ok = value.starts_with("redis://") || value.starts_with("rediss://");
    if scheme_ok && redis::parse_redis_url(value).is_some() {
        return Ok(());
    }
    let shown: Vec<String> = whole.split(',').map(|u| redact(u.trim())).collect();
    Err(ConfigError::invalid(variable, shown.join(","), form))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<RedisConfig, ConfigError> {
        RedisConfig::from_vars(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn cluster_nodes_are_a_comma_separated_list() {
        let c = from(&[
            (
                "REDIS_CLUSTER_NODES",
                "redis://127.0.0.1:7000, redis://127.0.0.1:7001",
            ),
            ("REDIS_PREFIX", "jobs"),
        ])
        .unwrap();
        assert_eq!(
            c.cluster_nodes,
            ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        );
        assert_eq!(c.prefix, "jobs");
        assert_eq!(c.wait_replicas, None);
    }

    #[test]
    fn a_bad_value_names_its_variable_and_the_accepted_form() {
        for (vars, variable, form) in [
            (
                vec![("REDIS_CLUSTER_NODES", "127.0.0.1:7000,redis://h:7001")],
                "REDIS_CLUSTER_NODES",
                "comma-separated seed node URLs",
            ),
            (
                vec![("REDIS_CLUSTER_NODES", " , ")],
                "REDIS_CLUSTER_NODES",
                "comma-separated",
            ),
            (
                vec![
                    ("REDIS_URL", "redis://h"),
                    ("REDIS_CLUSTER_NODES", "redis://h:7000"),
                ],
                "REDIS_URL",
                "unset while REDIS_CLUSTER_NODES is set",
            ),
            (
                vec![("REDIS_URL", "redis://h"), ("REDIS_WAIT_REPLICAS", "one")],
                "REDIS_WAIT_REPLICAS",
                "a non-negative integer",
            ),
            (
                vec![("REDIS_URL", "redis://h"), ("REDIS_WAIT_TIMEOUT", "soon")],
                "REDIS_WAIT_TIMEOUT",
                "a duration",
            ),
            (vec![("REDIS_URL", "http://h")], "REDIS_URL", "redis://"),
        ] {
            let e = from(&vars).unwrap_err().to_string();
            assert!(e.contains(variable) && e.contains(form), "{vars:?}: {e}");
        }
    }

    #[test]
    fn a_password_in_a_bad_list_is_not_shown() {
        let e = from(&[("REDIS_CLUSTER_NODES", "redis://u:secret@h:7000,h:7001")])
            .unwrap_err()
            .to_string();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn waiting_for_replicas_is_off_unless_asked() {
        let c = from(&[
            ("REDIS_URL", "redis://h:6379"),
            ("REDIS_WAIT_REPLICAS", "1"),
            ("REDIS_WAIT_TIMEOUT", "250ms"),
        ])
        .unwrap();
        assert_eq!(
            c.wait_replicas,
            Some(crate::WaitReplicas {
                replicas: 1,
                timeout: Duration::from_millis(250)
            })
        );
        let off = from(&[
            ("REDIS_URL", "redis://h:6379"),
            ("REDIS_WAIT_REPLICAS", "0"),
        ])
        .unwrap();
        assert_eq!(off.wait_replicas, None);
    }
}
