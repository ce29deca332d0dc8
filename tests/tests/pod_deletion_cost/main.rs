//! `WORKER_POD_DELETION_COST=true`: a real `demo-worker` on the real Redis keeps its
//! pod's `controller.kubernetes.io/pod-deletion-cost` annotation equal to its jobs in
//! flight, through an HTTPS API server the test owns (a certificate made with
//! `openssl`, the CA and a token in a service-account directory of the test's own).
//! A refused request (403) is logged with the RBAC hint and retried without touching
//! jobs; a missing setting stops the worker at start with exit code 2.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use system_tests::kube_api::{ApiRequest, FakeCluster};
use system_tests::DemoWorker;
use worker_core::testing::{eventually, unique};
use worker_core::Broker;
use worker_redis::RedisBroker;

const URL: &str = "redis://127.0.0.1:6379";
const NAMESPACE: &str = FakeCluster::NAMESPACE;

/// The API server with its service-account directory, and a pod.
struct Cluster {
    fake: FakeCluster,
    pod: String,
}

impl std::ops::Deref for Cluster {
    type Target = FakeCluster;
    fn deref(&self) -> &FakeCluster {
        &self.fake
    }
}

impl Cluster {
    async fn start(refusing: bool) -> Self {
        Self {
            fake: FakeCluster::start(refusing).await,
            pod: unique("pod"),
        }
    }

    /// A worker on the real Redis under `prefix`, pod-deletion cost on.
    fn worker(&self, prefix: &str, extra: &[(&str, &str)]) -> DemoWorker {
        let pod_env = self.worker_env(&self.pod);
        let mut env = vec![
            ("REDIS_URL", URL),
            ("REDIS_PREFIX", prefix),
            ("WORKER_QUEUES", "jobs"),
        ];
        env.extend(pod_env.iter().map(|(k, v)| (*k, v.as_str())));
        env.extend_from_slice(extra);
        DemoWorker::start(&env)
    }

    /// The annotation values of the requests the API accepted, in order.
    fn accepted(&self) -> Vec<String> {
        self.api
            .requests()
            .iter()
            .filter(|r| r.status == 200)
            .map(annotation)
            .collect()
    }

    /// Check one request is exactly the merge patch of this pod's annotation.
    fn check(&self, r: &ApiRequest) {
        assert_eq!(r.method, "PATCH", "{r:?}");
        assert_eq!(
            r.path,
            format!("/api/v1/namespaces/{NAMESPACE}/pods/{}", self.pod),
            "{r:?}"
        );
        let bearer = format!("Bearer {}", self.token);
        assert_eq!(r.header("authorization"), Some(bearer.as_str()), "{r:?}");
        assert_eq!(
            r.header("content-type"),
            Some("application/merge-patch+json"),
            "{r:?}"
        );
        let body: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {r:?}"));
        let value = annotation(r);
        assert!(value.parse::<u32>().is_ok(), "{r:?}");
        assert_eq!(
            body,
            json!({"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": value}}}),
            "{r:?}"
        );
    }
}

/// The annotation's value in a request's body, which must be a JSON string.
fn annotation(r: &ApiRequest) -> String {
    let body: Value = serde_json::from_str(&r.body).unwrap_or_default();
    match &body["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"] {
        Value::String(s) => s.clone(),
        other => panic!("the annotation is not a string: {other:?} in {r:?}"),
    }
}

async fn broker(prefix: &str) -> RedisBroker {
    system_tests::redis_broker(prefix).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_annotation_follows_the_jobs_in_flight() {
    let cluster = Cluster::start(false).await;
    let prefix = unique("podcost");
    let b = broker(&prefix).await;
    // 3 run at once and 2 more are held: the count the annotation must follow (jobs
    // running, at most 3) differs from the jobs held (5), the backlog and the jobs
    // enqueued (7), so a cost computed from any of those shows.
    let mut w = cluster.worker(
        &prefix,
        &[("WORKER_CONCURRENCY", "3"), ("WORKER_PREFETCH", "2")],
    );
    eventually(Duration::from_secs(30), "the first PATCH, 0", || async {
        cluster.accepted() == ["0"]
    })
    .await;

    system_tests::enqueue_json(&b, "jobs", &json!({"sleep_ms": 1500}), 7).await;
    eventually(
        Duration::from_secs(30),
        "3 running, 5 held, 2 pending",
        || async {
            let d = b.depth("jobs").await.unwrap_or_else(|e| panic!("{e}"));
            (d.in_flight, d.pending) == (5, 2) && system_tests::most_at_once(&w.events()) == 3
        },
    )
    .await;
    w.wait_for(Duration::from_secs(60), "the seven jobs ended", |e| {
        e.iter().filter(|e| e["event"] == "end").count() == 7
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "the annotation back at 0",
        || async {
            cluster.accepted().last().map(String::as_str) == Some("0")
                && cluster.accepted().len() > 2
        },
    )
    .await;

    let requests = cluster.api.requests();
    for r in &requests {
        cluster.check(r);
    }
    let values: Vec<u32> = cluster
        .accepted()
        .iter()
        .filter_map(|v| v.parse().ok())
        .collect();
    assert_eq!(
        system_tests::most_at_once(&w.events()),
        3,
        "{:?}",
        w.events()
    );
    assert_eq!(
        values.iter().max(),
        Some(&3),
        "jobs running at most 3: {values:?}"
    );
    assert_eq!(values.first(), Some(&0), "{values:?}");
    assert!(
        values.windows(2).all(|p| p[0] != p[1]),
        "a value the API already holds was sent again: {values:?}"
    );
    // At most one request per interval (1 s). Measured where they arrive, so a new
    // connection's handshake can shorten a gap; a burst sent uncoalesced would
    // arrive milliseconds apart.
    for pair in requests.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(500), "{gap:?} in {requests:?}");
    }
    assert!(!w.stderr().contains(&cluster.token), "the token was logged");

    w.signal("TERM");
    assert_eq!(w.wait_exit(Duration::from_secs(10)).await.code(), Some(0));
    assert_eq!(cluster.accepted().last().map(String::as_str), Some("0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_patch_is_retried_with_a_hint_and_jobs_go_on() {
    let cluster = Cluster::start(true).await;
    let prefix = unique("podcost403");
    let b = broker(&prefix).await;
    let ids = system_tests::enqueue_json(&b, "jobs", &json!({"sleep_ms": 200}), 4).await;
    let mut w = cluster.worker(&prefix, &[("WORKER_CONCURRENCY", "2")]);

    w.wait_for(
        Duration::from_secs(30),
        "every job done while refused",
        |e| {
            ids.iter().all(|id| {
                e.iter()
                    .any(|e| e["event"] == "end" && e["id"] == id.as_str() && e["ok"] == true)
            })
        },
    )
    .await;
    eventually(Duration::from_secs(30), "two refused requests", || async {
        cluster.api.requests().len() >= 2
    })
    .await;
    assert!(cluster.accepted().is_empty());
    let log = w.stderr();
    assert!(log.contains("HTTP 403"), "{log}");
    assert!(log.contains("podDeletionCost.enabled"), "{log}");
    assert!(log.contains("cannot patch resource"), "{log}");
    assert!(!log.contains(&cluster.token), "the token was logged");

    // RBAC fixed: the next retry sets the annotation.
    cluster.api.refuse(false);
    eventually(Duration::from_secs(40), "the annotation set", || async {
        cluster.accepted() == ["0"]
    })
    .await;
    for r in cluster.api.requests() {
        cluster.check(&r);
    }
    w.signal("TERM");
    assert_eq!(w.wait_exit(Duration::from_secs(10)).await.code(), Some(0));
    assert_eq!(w.stopped()["report"]["ok"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_without_pod_name_the_worker_exits_2_naming_it() {
    let mut w = DemoWorker::start(&[
        ("WORKER_POD_DELETION_COST", "true"),
        ("POD_NAMESPACE", NAMESPACE),
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
        ("KUBERNETES_SERVICE_PORT", "6443"),
    ]);
    let status = w.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(2), "{}", w.stderr());
    let log = w.stderr();
    assert!(log.contains("WORKER_POD_DELETION_COST=true"), "{log}");
    assert!(log.contains("POD_NAME (not set"), "{log}");
    assert!(!log.contains("POD_NAMESPACE (not set"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_without_a_token_file_the_worker_exits_2_naming_it() {
    let cluster = Cluster::start(false).await;
    let token = PathBuf::from(&cluster.sa_dir).join("token");
    std::fs::remove_file(&token).unwrap_or_else(|e| panic!("{e}"));
    let port = cluster.api.port.to_string();
    // The in-memory broker: the check comes before any job could run.
    let mut w = DemoWorker::start(&[
        ("WORKER_POD_DELETION_COST", "1"),
        ("POD_NAME", cluster.pod.as_str()),
        ("POD_NAMESPACE", NAMESPACE),
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
        ("KUBERNETES_SERVICE_PORT", port.as_str()),
        ("KUBERNETES_SERVICEACCOUNT_DIR", cluster.sa_dir.as_str()),
    ]);
    let status = w.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(2), "{}", w.stderr());
    let log = w.stderr();
    assert!(
        log.contains(&format!("the service-account token {}", token.display())),
        "{log}"
    );
    assert!(cluster.api.requests().is_empty());
}
