//! The RabbitMQ management HTTP API: what AMQP itself cannot tell — the unacked count
//! of a queue across every consumer, and which queues exist by name.
//!
//! Its message counts are statistics that the broker refreshes every few seconds
//! (`collect_statistics_interval`, 5 s by default), not a live reading.

use std::net::IpAddr;
use std::time::Duration;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use worker_core::{redact, BrokerError, SecretSource};

/// A client of one broker's management API, scoped to one virtual host.
#[derive(Clone)]
pub(crate) struct Management {
    http: reqwest::Client,
    base: String,
    user: String,
    password: String,
    /// `AMQP_MANAGEMENT_URL_FILE`: the user and password are read from it again for
    /// each request, so a rotated Secret is picked up.
    file: Option<SecretSource>,
    allow_http: bool,
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

/// Where the management API is and how to trust it: [`AmqpConfig`](crate::AmqpConfig)'s
/// management settings as [`Management::new`] takes them. The CA and the http switch are
/// copies of the config's own, kept in step by its builder methods.
#[derive(Clone)]
pub(crate) struct Endpoint {
    /// `http[s]://user:password@host:port`, as configured (never logged as it is).
    pub(crate) url: String,
    /// Send the password in clear to a host other than this machine.
    pub(crate) allow_http: bool,
    /// The only roots an `https://` URL is trusted by, when set (`AMQP_CA_FILE`).
    pub(crate) ca_cert_pem: Option<String>,
    /// The file the URL was read from, read again for each request's credentials.
    pub(crate) file: Option<SecretSource>,
}

/// The accepted form of a management URL, for errors.
pub(crate) const URL_FORM: &str = "https://user:password@host:port, user and password \
     percent-encoded; http:// sends the password in clear, so only to this machine \
     (127.0.0.0/8, ::1, localhost) unless AMQP_MANAGEMENT_ALLOW_HTTP=true \
     (AmqpConfig::management_allow_http)";

/// The accepted form of a CA file, for errors.
pub(crate) const CA_FORM: &str =
    "a PEM file holding at least one -----BEGIN CERTIFICATE----- block";

/// What a management URL says, checked: where requests go and as whom.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// Scheme, host, port and path prefix, without credentials or a trailing `/`.
    pub base: String,
    pub user: String,
    pub password: String,
}

/// Read `url` as the URL parser that sends the requests will (a hand-made split can
/// disagree with it about which part is the host), percent-decode its credentials, and
/// refuse `http://` to another machine unless `allow_http`. The error is why, without
/// the URL; the accepted form is [`URL_FORM`].
pub(crate) fn parse_url(url: &str, allow_http: bool) -> Result<Parsed, String> {
    let mut parsed = reqwest::Url::parse(url.trim()).map_err(|e| e.to_string())?;
    let host = match parsed.host_str() {
        Some(h) if !h.is_empty() => h.to_owned(),
        _ => return Err("no host".to_owned()),
    };
    match parsed.scheme() {
        "https" => {}
        "http" if allow_http || is_this_machine(&host) => {}
        "http" => {
            return Err(format!(
                "http:// to {host} would send the password in clear"
            ))
        }
        other => return Err(format!("the scheme {other} is neither http nor https")),
    }
    let decode = |part: &str, what: &str| {
        percent_decode_str(part)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| format!("the {what} is not UTF-8 once percent-decoded"))
    };
    let (user, password) = match (parsed.username(), parsed.password()) {
        ("", None) => ("guest".to_owned(), "guest".to_owned()),
        (user, password) => (
            decode(user, "user")?,
            decode(password.unwrap_or(""), "password")?,
        ),
    };
    parsed
        .set_username("")
        .and_then(|()| parsed.set_password(None))
        .map_err(|()| "the URL cannot carry credentials".to_owned())?;
    parsed.set_query(None);
    parsed.set_fragment(None);
    Ok(Parsed {
        base: parsed.as_str().trim_end_matches('/').to_owned(),
        user,
        password,
    })
}

/// Whether `host` (as the URL parser writes it: lower case, IPv6 in brackets) is a
/// loopback address or `localhost`.
fn is_this_machine(host: &str) -> bool {
    let ip = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match ip.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// The certificates of a CA file; an error when it holds none (a file that is not
/// PEM, or a key without its certificate, would otherwise trust nothing in silence).
pub(crate) fn ca_certificates(pem: &str) -> Result<Vec<reqwest::Certificate>, String> {
    let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
        .map_err(|e| format!("unreadable PEM ({})", worker_core::error::chain(&e)))?;
    if certs.is_empty() {
        return Err("no certificate in it".to_owned());
    }
    Ok(certs)
}

impl Management {
    /// A client for `endpoint` on `vhost`.
    pub(crate) fn new(endpoint: &Endpoint, vhost: &str) -> Result<Self, BrokerError> {
        let shown = redact(&endpoint.url);
        let Parsed {
            base,
            user,
            password,
        } = parse_url(&endpoint.url, endpoint.allow_http).map_err(|why| {
            BrokerError::Protocol(format!(
                "management URL {shown} (AMQP_MANAGEMENT_URL) is refused, {why}: expected {URL_FORM}"
            ))
        })?;
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(5));
        if let Some(pem) = &endpoint.ca_cert_pem {
            let certs = ca_certificates(pem).map_err(|why| {
                BrokerError::Protocol(format!(
                    "the CA certificate (AMQP_CA_FILE) for the management API {shown} is \
                     refused, {why}: expected {CA_FORM}"
                ))
            })?;
            // The CA file replaces the built-in roots rather than joining them: a
            // certificate any public CA issued for the host is not enough.
            http = http.tls_built_in_root_certs(false);
            for cert in certs {
                http = http.add_root_certificate(cert);
            }
        }
        // Building fails only on its settings (a CA certificate that does not parse):
        // trying again will not help.
        let http = http.build().map_err(|e| {
            let what = match endpoint.ca_cert_pem {
                Some(_) => " with the CA certificate (AMQP_CA_FILE)",
                None => "",
            };
            BrokerError::Protocol(format!(
                "management API client for {shown}{what}: {}",
                worker_core::error::chain(&e)
            ))
        })?;
        Ok(Self {
            http,
            base,
            user,
            password,
            file: endpoint.file.clone(),
            allow_http: endpoint.allow_http,
            vhost: vhost.to_owned(),
            shown,
        })
    }

    async fn get<T: for<'de> Deserialize<'de>>(&self, path: &str) -> Result<T, BrokerError> {
        let url = format!("{}{path}", self.base);
        let (user, password) = self.credentials();
        let res = self
            .http
            .get(&url)
            .basic_auth(user, Some(password))
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

    /// The user and password to send: the URL file's as it reads now when there is
    /// one (its host stays the one read at start), else those configured.
    fn credentials(&self) -> (String, String) {
        let fresh = self.file.as_ref().and_then(|file| {
            let read = file
                .read()
                .map_err(|e| e.to_string())
                .and_then(|url| parse_url(&url, self.allow_http));
            match read {
                Ok(p) => Some((p.user, p.password)),
                Err(why) => {
                    tracing::warn!(error = %why, "amqp: cannot read the management URL file again; using the credentials read before");
                    None
                }
            }
        });
        fresh.unwrap_or_else(|| (self.user.clone(), self.password.clone()))
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

    fn endpoint(url: &str) -> Endpoint {
        Endpoint {
            url: url.to_owned(),
            allow_http: false,
            ca_cert_pem: None,
            file: None,
        }
    }

    #[test]
    fn credentials_come_from_the_url_and_never_show() {
        let m = Management::new(&endpoint("http://ops:s3cret@127.0.0.1:15672/"), "/").unwrap();
        assert_eq!((m.user.as_str(), m.password.as_str()), ("ops", "s3cret"));
        assert_eq!(m.base, "http://127.0.0.1:15672");
        assert!(!m.shown.contains("s3cret"));
        assert!(Management::new(&endpoint("ftp://x"), "/").is_err());
        let m = Management::new(&endpoint("http://localhost:15672"), "/").unwrap();
        assert_eq!((m.user.as_str(), m.password.as_str()), ("guest", "guest"));
    }

    #[test]
    fn credentials_are_percent_decoded() {
        let url = "http://o%70s:p%40ss%25%3A%2F@127.0.0.1:15672";
        let m = Management::new(&endpoint(url), "/").unwrap();
        assert_eq!((m.user.as_str(), m.password.as_str()), ("ops", "p@ss%:/"));
        assert!(!m.shown.contains("p%40ss"), "{}", m.shown);
        // An `@` left unencoded belongs to the password: the host follows the last one.
        let m = Management::new(&endpoint("http://ops:p@ss@localhost:15672"), "/").unwrap();
        assert_eq!(
            (m.password.as_str(), m.base.as_str()),
            ("p@ss", "http://localhost:15672")
        );
        let bad = parse_url("http://ops:%FF@localhost", false).unwrap_err();
        assert!(bad.contains("password") && bad.contains("UTF-8"), "{bad}");
    }

    #[test]
    fn the_base_keeps_a_path_prefix_and_drops_the_rest() {
        let p = parse_url(
            "https://u:p@rabbit.internal:15671/rabbitmq/?x=1#frag",
            false,
        )
        .unwrap();
        assert_eq!(p.base, "https://rabbit.internal:15671/rabbitmq");
        let p = parse_url("http://u:p@[::1]:15672", false).unwrap();
        assert_eq!(p.base, "http://[::1]:15672");
    }

    #[test]
    fn http_goes_only_to_this_machine_unless_allowed() {
        for host in [
            "127.0.0.1",
            "127.255.0.9",
            "[::1]",
            "localhost",
            "LOCALHOST",
        ] {
            let url = format!("http://u:p@{host}:15672");
            assert!(parse_url(&url, false).is_ok(), "{url}");
        }
        for url in [
            "http://u:p@rabbit:15672",
            "http://u:p@10.1.2.3:15672",
            "http://u:p@[::ffff:127.0.0.1]:15672",
            "http://u:p@localhost.example.com",
            "http://u:p@rabbit:15672/#@127.0.0.1",
            "http://u:p@rabbit:15672/?@127.0.0.1",
        ] {
            let why = parse_url(url, false).unwrap_err();
            assert!(why.contains("in clear"), "{url}: {why}");
            assert!(parse_url(url, true).is_ok(), "{url}");
        }
        assert!(parse_url("https://u:p@rabbit:15671", false).is_ok());
        let e = Management::new(&endpoint("http://u:s3cret@rabbit:15672"), "/")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("AMQP_MANAGEMENT_URL")
                && e.contains("AMQP_MANAGEMENT_ALLOW_HTTP=true")
                && e.contains("management_allow_http")
                && !e.contains("s3cret"),
            "{e}"
        );
        let allowed = Endpoint {
            allow_http: true,
            ..endpoint("http://u:s3cret@rabbit:15672")
        };
        assert!(Management::new(&allowed, "/").is_ok());
    }

    #[test]
    fn a_ca_without_a_certificate_is_refused() {
        for pem in [
            "",
            "not a certificate\n",
            "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
        ] {
            let with_ca = Endpoint {
                ca_cert_pem: Some(pem.to_owned()),
                ..endpoint("https://u:p@rabbit:15671")
            };
            let e = Management::new(&with_ca, "/").err().unwrap().to_string();
            assert!(
                e.contains("AMQP_CA_FILE") && e.contains("BEGIN CERTIFICATE"),
                "{pem:?}: {e}"
            );
        }
        // A certificate block that holds no certificate.
        let with_ca = Endpoint {
            ca_cert_pem: Some(
                "-----BEGIN CERTIFICATE-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END CERTIFICATE-----\n"
                    .to_owned(),
            ),
            ..endpoint("https://u:p@rabbit:15671")
        };
        let e = Management::new(&with_ca, "/").err().unwrap();
        assert!(!e.is_transient(), "{e}");
        assert!(e.to_string().contains("AMQP_CA_FILE"), "{e}");
    }
}
