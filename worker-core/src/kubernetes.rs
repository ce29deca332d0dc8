//! The one Kubernetes API call the worker makes: a merge patch of its own pod's
//! `controller.kubernetes.io/pod-deletion-cost` annotation, authenticated with the
//! pod's service-account token and trusting only the cluster CA.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::Url;

use crate::config::{PodDeletionCost, POD_DELETION_COST_SETTING};
use crate::error::{chain, ConfigError};

/// A refused or failed request can take this long before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Enough of an error answer to see the API server's reason, little enough for a log line.
const BODY_EXCERPT: usize = 300;

/// Why setting the annotation failed. Every kind is worth retrying: a token being
/// rotated, an API server restarting, RBAC being fixed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PatchError {
    /// The token file could not be read (or is empty).
    #[error("cannot read the service-account token {path}: {reason}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No answer: connection refused, TLS failure, timeout.
    #[error("no answer from the Kubernetes API: {0}")]
    Unreachable(String),
    /// The API server answered with an error status.
    #[error("the Kubernetes API answered HTTP {status}: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The start of the answer's body.
        body: String,
    },
}

impl PatchError {
    /// What an operator can do about it, when the status says.
    pub(crate) fn hint(&self) -> Option<&'static str> {
        match self {
            Self::Status { status: 403, .. } => Some(
                "the pod's service account may not patch pods: the chart's RBAC \
                 (podDeletionCost.enabled) grants `patch` on pods in the release's namespace",
            ),
            Self::Status { status: 401, .. } => {
                Some("the API server refused the service-account token")
            }
            Self::Status { .. } | Self::Token { .. } | Self::Unreachable(_) => None,
        }
    }
}

/// The pod's own API object, reachable with its token.
#[derive(Debug)]
pub(crate) struct PodApi {
    http: reqwest::Client,
    url: Url,
    token_path: PathBuf,
}

impl PodApi {
    /// Load the CA and check the token can be read. The error names every file that
    /// is missing or unusable.
    pub(crate) async fn connect(cost: &PodDeletionCost) -> Result<Self, ConfigError> {
        let url = pod_url(cost)?;
        let token_path = cost.token_path();
        let ca_path = cost.ca_path();
        let mut missing = Vec::new();
        if let Err(e) = read_token(&token_path).await {
            missing.push(format!(
                "the service-account token {} ({e})",
                token_path.display()
            ));
        }
        let ca = match tokio::fs::read(&ca_path).await {
            Ok(pem) => match reqwest::Certificate::from_pem_bundle(&pem) {
                Ok(certs) if !certs.is_empty() => Some(certs),
                Ok(_) => {
                    missing.push(format!(
                        "the cluster CA {} (no PEM certificate in it)",
                        ca_path.display()
                    ));
                    None
                }
                Err(e) => {
                    missing.push(format!(
                        "the cluster CA {} ({})",
                        ca_path.display(),
                        chain(&e)
                    ));
                    None
                }
            },
            Err(e) => {
                missing.push(format!("the cluster CA {} ({e})", ca_path.display()));
                None
            }
        };
        let Some(ca) = ca.filter(|_| missing.is_empty()) else {
            return Err(ConfigError::missing(POD_DELETION_COST_SETTING, missing));
        };
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            // The cluster CA only: the API server's certificate is signed by it.
            .tls_built_in_root_certs(false)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        for cert in ca {
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build().map_err(|e| {
            ConfigError::missing(
                POD_DELETION_COST_SETTING,
                vec![format!(
                    "a usable cluster CA in {} ({})",
                    ca_path.display(),
                    chain(&e)
                )],
            )
        })?;
        Ok(Self {
            http,
            url,
            token_path,
        })
    }

    /// Set the annotation to `cost`. The token is read again for each request: bound
    /// service-account tokens are rotated in place.
    pub(crate) async fn set_deletion_cost(&self, cost: u32) -> Result<(), PatchError> {
        let token = read_token(&self.token_path)
            .await
            .map_err(|reason| PatchError::Token {
                path: self.token_path.clone(),
                reason,
            })?;
        let mut response = self
            .http
            .patch(self.url.clone())
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(CONTENT_TYPE, "application/merge-patch+json")
            .body(patch_body(cost))
            .send()
            .await
            .map_err(|e| PatchError::Unreachable(chain(&e)))?;
        let status = response.status();
        if status.is_success() {
            // Read the answer (the pod) to the end so the connection can be reused.
            while let Ok(Some(_)) = response.chunk().await {}
            return Ok(());
        }
        let mut body = Vec::new();
        while body.len() < BODY_EXCERPT * 4 {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        Err(PatchError::Status {
            status: status.as_u16(),
            body: excerpt(&body),
        })
    }
}

/// `https://host:port/api/v1/namespaces/{namespace}/pods/{name}`, an IPv6 host in
/// brackets, each path segment escaped.
fn pod_url(cost: &PodDeletionCost) -> Result<Url, ConfigError> {
    let host = if cost.api_host.contains(':') {
        format!("[{}]", cost.api_host)
    } else {
        cost.api_host.clone()
    };
    let bad_host = || {
        ConfigError::invalid(
            "KUBERNETES_SERVICE_HOST",
            cost.api_host.as_str(),
            "a host name, an IPv4 or an IPv6 address",
        )
    };
    let mut url =
        Url::parse(&format!("https://{host}:{}/", cost.api_port)).map_err(|_| bad_host())?;
    url.path_segments_mut()
        .map_err(|()| bad_host())?
        .clear()
        .extend([
            "api",
            "v1",
            "namespaces",
            cost.namespace.as_str(),
            "pods",
            cost.pod_name.as_str(),
        ]);
    Ok(url)
}

/// `{"metadata":{"annotations":{"controller.kubernetes.io/pod-deletion-cost":"<n>"}}}`:
/// annotation values are strings.
fn patch_body(cost: u32) -> String {
    serde_json::json!({
        "metadata": {"annotations": {PodDeletionCost::ANNOTATION: cost.to_string()}}
    })
    .to_string()
}

async fn read_token(path: &std::path::Path) -> Result<String, String> {
    let token = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| e.to_string())?;
    let token = token.trim();
    if token.is_empty() {
        return Err("the file is empty".into());
    }
    Ok(token.to_owned())
}

/// The start of an answer's body, on one line.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .chars()
        .take(BODY_EXCERPT)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > BODY_EXCERPT {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_a_merge_patch_of_one_string_annotation() {
        assert_eq!(
            patch_body(3),
            r#"{"metadata":{"annotations":{"controller.kubernetes.io/pod-deletion-cost":"3"}}}"#
        );
    }

    #[test]
    fn the_url_names_the_pod_and_brackets_an_ipv6_host() {
        let cost = PodDeletionCost::new("gpu-0", "workers", "10.96.0.1", 6443);
        assert_eq!(
            pod_url(&cost).unwrap().as_str(),
            "https://10.96.0.1:6443/api/v1/namespaces/workers/pods/gpu-0"
        );
        let cost = PodDeletionCost::new("gpu-0", "workers", "fd00:10:96::1", 443);
        assert_eq!(
            pod_url(&cost).unwrap().as_str(),
            "https://[fd00:10:96::1]/api/v1/namespaces/workers/pods/gpu-0"
        );
        let cost = PodDeletionCost::new("a/b", "w s", "kubernetes.default.svc", 443);
        assert_eq!(
            pod_url(&cost).unwrap().path(),
            "/api/v1/namespaces/w%20s/pods/a%2Fb"
        );
        let cost = PodDeletionCost::new("p", "n", "bad host", 443);
        assert!(pod_url(&cost).is_err());
    }

    #[test]
    fn an_excerpt_is_short_and_on_one_line() {
        let long = format!("{{\"message\":\"forbidden\"}}\n{}", "x".repeat(1000));
        let e = excerpt(long.as_bytes());
        assert!(e.starts_with("{\"message\":\"forbidden\"} x"), "{e}");
        assert_eq!(e.chars().count(), BODY_EXCERPT + 1);
    }

    #[test]
    fn a_403_carries_the_rbac_hint() {
        let e = PatchError::Status {
            status: 403,
            body: String::new(),
        };
        assert!(e
            .hint()
            .is_some_and(|h| h.contains("podDeletionCost.enabled")));
        assert!(PatchError::Unreachable("refused".into()).hint().is_none());
    }

    #[tokio::test]
    async fn connect_names_every_missing_file() {
        let dir = std::env::temp_dir().join(format!("wp-sa-{:016x}", fastrand::u64(..)));
        let cost = PodDeletionCost::new("p", "n", "127.0.0.1", 443).service_account_dir(&dir);
        let e = PodApi::connect(&cost).await.unwrap_err().to_string();
        assert!(e.starts_with("WORKER_POD_DELETION_COST=true needs"), "{e}");
        assert!(
            e.contains(&format!("token {}", dir.join("token").display())),
            "{e}"
        );
        assert!(
            e.contains(&format!("CA {}", dir.join("ca.crt").display())),
            "{e}"
        );

        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "  \n").unwrap();
        std::fs::write(dir.join("ca.crt"), "not a certificate").unwrap();
        let e = PodApi::connect(&cost).await.unwrap_err().to_string();
        assert!(e.contains("the file is empty"), "{e}");
        assert!(e.contains("no PEM certificate"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
