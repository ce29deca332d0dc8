//! The RabbitMQ management HTTP API: what AMQP itself cannot tell — the unacked count
//! of a queue across every consumer, and which queues exist by name.
//!
//! Its message counts are statistics that the broker refreshes every few seconds
//! (`collect_statistics_interval`, 5 s by default), not a live reading.

use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use worker_core::{redact, BrokerError};

/// A client of one broker's management API, scoped to one virtual host.
#[derive(Clone)]
pub(crate) struct Management {
    http: reqwest::Client,
    base: String,
    user: String,
    password: String,
    vhost: String,
    shown: String,
}

/// One queue as the management API lists it.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct QueueStats {
    pub name: String,
    #[serde(default)]
    pub messages_unacknowledged: u64,
    /// Seconds since the epoch of the oldest ready message's `timestamp` property.
    #[serde(default)]
    pub head_message_timestamp: Option<u64>,
}

/// `s` as one path segment: everything but unreserved characters percent-encoded.
fn encode(s: &str) -> String {
    const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// `text` with every regular-expression metacharacter escaped.
pub(crate) fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Management {
    /// A client for `url` (`http[s]://user:password@host:15672`) on `vhost`.
    pub(crate) fn new(url: &str, vhost: &str) -> Result<Self, BrokerError> {
        let shown = redact(url);
        let bad = |why: &str| BrokerError::Protocol(format!("management URL {shown}: {why}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected http[s]://user:password@host:port"))?;
        if scheme != "http" && scheme != "https" {
            return Err(bad("the scheme must be http or https"));
        }
        let (userinfo, host) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (user.to_owned(), pass.to_owned()),
                None => (u.to_owned(), String::new()),
            },
            None => ("guest".to_owned(), "guest".to_owned()),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| BrokerError::unavailable("management API client", e))?;
        Ok(Self {
            http,
            base: format!("{scheme}://{}", host.trim_end_matches('/')),
            user,
            password,
            vhost: vhost.to_owned(),
            shown,
        })
    }

    async fn get<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<T, BrokerError> {
        let url = format!("{}{path}", self.base);
        let res = self
            .http
            .get(&url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| BrokerError::unavailable(format!("management API {}", self.shown), e))?;
        let status = res.status();
        if !status.is_success() {
            let message = format!("management API {} answered {status} to {path}", self.shown);
            return Err(if status.is_server_error() {
                BrokerError::Unavailable {
                    message,
                    source: None,
                }
            } else {
                BrokerError::Protocol(message)
            });
        }
        res.json().await.map_err(|e| {
            BrokerError::unavailable(
                format!("management API {}: unreadable reply", self.shown),
                e,
            )
        })
    }

    /// Every queue of the virtual host whose name starts with `prefix`.
    pub(crate) async fn queues_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<QueueStats>, BrokerError> {
        let regex = format!("^{}", regex_escape(prefix));
        let path = format!(
            "/api/queues/{}?use_regex=true&name={}&columns=name,messages_unacknowledged,head_message_timestamp",
            encode(&self.vhost),
            encode(&regex)
        );
        let all: Vec<QueueStats> = self.get(&path).await?;
        // The filter is a regular expression matched anywhere: check the prefix again.
        Ok(all
            .into_iter()
            .filter(|q| q.name.starts_with(prefix))
            .collect())
    }

    /// One queue's statistics, or `None` when it does not exist.
    pub(crate) async fn queue(&self, name: &str) -> Result<Option<QueueStats>, BrokerError> {
        let path = format!(
            "/api/queues/{}/{}?columns=name,messages_unacknowledged,head_message_timestamp",
            encode(&self.vhost),
            encode(name)
        );
        match self.get::<QueueStats>(&path).await {
            Ok(q) => Ok(Some(q)),
            Err(BrokerError::Protocol(m)) if m.contains("404") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_for_paths_and_patterns() {
        assert_eq!(encode("/"), "%2F");
        assert_eq!(encode("a b.c"), "a%20b.c");
        assert_eq!(regex_escape("t1.pool-x"), "t1\\.pool\\-x");
    }

    #[test]
    fn credentials_come_from_the_url_and_never_show() {
        let m = Management::new("http://ops:s3cret@127.0.0.1:15672/", "/").unwrap();
        assert_eq!((m.user.as_str(), m.password.as_str()), ("ops", "s3cret"));
        assert_eq!(m.base, "http://127.0.0.1:15672");
        assert!(!m.shown.contains("s3cret"));
        assert!(Management::new("ftp://x", "/").is_err());
    }
}
