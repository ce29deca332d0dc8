//! A stand-in for the Kubernetes API server: HTTPS with a test certificate, HTTP/1.1
//! with keep-alive, every request recorded with its answer. It answers 403 (a
//! Kubernetes `Status`, as RBAC does) while told to refuse, else 200. It follows the
//! pod-deletion-cost annotation of each pod it was asked to patch
//! ([`FakeKubeApi::deletion_costs`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// One request the server received, and its answer.
#[derive(Clone, Debug)]
pub struct ApiRequest {
    /// When it arrived.
    pub at: Instant,
    /// `PATCH`, `GET`, ...
    pub method: String,
    /// The request target, e.g. `/api/v1/namespaces/ns/pods/name`.
    pub path: String,
    /// Header names in lower case, with their values, in order.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
    /// The status answered.
    pub status: u16,
}

impl ApiRequest {
    /// The value of header `name` (any case), if sent once or more.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The pod a `PATCH` of `/api/v1/namespaces/{namespace}/pods/{name}` names.
    pub fn pod(&self) -> Option<&str> {
        if self.method != "PATCH" {
            return None;
        }
        let mut parts = self.path.strip_prefix("/api/v1/namespaces/")?.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(ns), Some("pods"), Some(name), None) if !ns.is_empty() && !name.is_empty() => {
                Some(name)
            }
            _ => None,
        }
    }

    /// The pod-deletion-cost annotation's value in the body, when it is a string
    /// holding a number (as Kubernetes requires).
    pub fn deletion_cost(&self) -> Option<i64> {
        let body: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        body["metadata"]["annotations"][DELETION_COST]
            .as_str()?
            .parse()
            .ok()
    }
}

/// The annotation a ReplicaSet ranks pods by when it scales down.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// A fake API server and what a worker needs to reach it: a scratch directory with the
/// server's certificate and a service-account directory holding its CA and a token.
/// The directory goes when this is dropped.
pub struct FakeCluster {
    /// The API server.
    pub api: FakeKubeApi,
    /// The scratch directory (certificates, the service-account directory).
    pub dir: PathBuf,
    /// The service-account directory (`ca.crt`, `token`).
    pub sa_dir: String,
    /// The service-account token.
    pub token: String,
}

impl FakeCluster {
    /// Namespace of the pods the workers patch.
    pub const NAMESPACE: &'static str = "workers";

    /// Start the API server (answering 403 while `refusing`) with fresh certificates.
    pub async fn start(refusing: bool) -> Self {
        let dir = crate::RedisServer::scratch_dir(crate::free_addr().port());
        crate::make_certificates(&dir);
        let api = FakeKubeApi::start(&dir, refusing).await;
        let sa = dir.join("serviceaccount");
        std::fs::create_dir_all(&sa).unwrap_or_else(|e| panic!("{e}"));
        std::fs::copy(dir.join("ca.crt"), sa.join("ca.crt")).unwrap_or_else(|e| panic!("{e}"));
        let token = worker_core::testing::unique("token");
        std::fs::write(sa.join("token"), format!("{token}\n")).unwrap_or_else(|e| panic!("{e}"));
        Self {
            api,
            sa_dir: sa.to_string_lossy().into_owned(),
            dir,
            token,
        }
    }

    /// The variables that make a worker of pod `pod` keep its pod-deletion cost on
    /// this server (`WORKER_POD_DELETION_COST=true` and the pod's and API's settings).
    pub fn worker_env(&self, pod: &str) -> Vec<(&'static str, String)> {
        vec![
            ("WORKER_POD_DELETION_COST", "true".into()),
            ("POD_NAME", pod.into()),
            ("POD_NAMESPACE", Self::NAMESPACE.into()),
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1".into()),
            ("KUBERNETES_SERVICE_PORT", self.api.port.to_string()),
            ("KUBERNETES_SERVICEACCOUNT_DIR", self.sa_dir.clone()),
        ]
    }
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The fake API server; it stops when dropped.
pub struct FakeKubeApi {
    /// Its port on 127.0.0.1.
    pub port: u16,
    requests: Arc<Mutex<Vec<ApiRequest>>>,
    refuse: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeKubeApi {
    /// Serve the certificate `server.crt` / `server.key` of `certs` (see
    /// [`make_certificates`](crate::make_certificates)) on a free port,
    /// answering 403 while `refusing`.
    pub async fn start(certs: &Path, refusing: bool) -> Self {
        let acceptor = crate::tls_acceptor(certs);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local addr: {e}"))
            .port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let refuse = Arc::new(AtomicBool::new(refusing));
        let (recorded, refused) = (requests.clone(), refuse.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let (recorded, refused) = (recorded.clone(), refused.clone());
                conns.spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve(tls, recorded, refused).await;
                    }
                });
            }
        });
        Self {
            port,
            requests,
            refuse,
            task,
        }
    }

    /// Answer 403 from now on (`true`) or 200 (`false`).
    pub fn refuse(&self, refusing: bool) {
        self.refuse.store(refusing, Ordering::SeqCst);
    }

    /// Every request so far, in order of arrival.
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The pod-deletion cost each pod has now: per pod name, the annotation value of
    /// the last `PATCH` of `/api/v1/namespaces/{namespace}/pods/{name}` the server
    /// accepted (a pod never patched, or whose value is not a number, is absent).
    pub fn deletion_costs(&self) -> HashMap<String, i64> {
        let mut costs = HashMap::new();
        for r in self.requests() {
            if let (200, Some(pod), Some(cost)) = (r.status, r.pod(), r.deletion_cost()) {
                costs.insert(pod.to_owned(), cost);
            }
        }
        costs
    }
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Requests on one connection, one after another, until the client closes it.
async fn serve(
    mut conn: impl AsyncRead + AsyncWrite + Unpin,
    recorded: Arc<Mutex<Vec<ApiRequest>>>,
    refuse: Arc<AtomicBool>,
) {
    let mut buf = Vec::new();
    loop {
        let Some(head_end) = read_until_head_end(&mut conn, &mut buf).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let method = first.next().unwrap_or("").to_owned();
        let path = first.next().unwrap_or("").to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        let body_start = head_end + 4;
        while buf.len() < body_start + length {
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = String::from_utf8_lossy(&buf[body_start..body_start + length]).into_owned();
        buf.drain(..body_start + length);

        let (status, answer) = if refuse.load(Ordering::SeqCst) {
            (
                403,
                r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods is forbidden: User \"system:serviceaccount:test:default\" cannot patch resource \"pods\"","reason":"Forbidden","code":403}"#,
            )
        } else {
            (200, r#"{"kind":"Pod","apiVersion":"v1","metadata":{}}"#)
        };
        recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ApiRequest {
                at: Instant::now(),
                method,
                path,
                headers,
                body,
                status,
            });
        let reason = if status == 200 { "OK" } else { "Forbidden" };
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if conn.write_all(response.as_bytes()).await.is_err() || conn.flush().await.is_err() {
            return;
        }
    }
}

/// Read until `buf` holds a whole request head; the offset of its `\r\n\r\n`.
async fn read_until_head_end(
    conn: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i);
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
