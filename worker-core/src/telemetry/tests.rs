//! The listener under a hostile or heavy client: half-sent requests, more connections
//! than it admits, many scrapers at once, and a broker whose errors name credentials.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::exporter::Exporter;
use super::http::{self, HttpState};
use super::listener::{self, Limits};
use super::test_broker::{CountingBroker, SECRET};
use crate::lifecycle::{Lifecycle, State};

/// Long enough for any loaded machine; the behaviours tested end far sooner.
const PATIENCE: Duration = Duration::from_secs(5);

/// A running worker's routes; `connected` is what its last broker call said.
fn worker_router(broker: &CountingBroker) -> Router {
    worker_router_connected(broker, true)
}

fn worker_router_connected(broker: &CountingBroker, connected: bool) -> Router {
    let life = Lifecycle::new();
    life.advance(State::Running);
    life.set_connected(connected);
    http::router(HttpState::new(
        life,
        Arc::new(broker.clone()),
        "gpu".into(),
        4,
        vec!["a".into(), "b".into()],
    ))
}

fn exporter_router(broker: &CountingBroker) -> Router {
    Exporter::new(
        Arc::new(broker.clone()),
        "gpu",
        4,
        vec!["a".into(), "b".into()],
    )
    .router()
}

async fn get(router: &Router, path: &str) -> (StatusCode, String) {
    let request = Request::get(path).body(Body::empty()).unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Serve the exporter's routes on a free port within `limits`, until the token fires.
async fn serve(limits: Limits) -> (SocketAddr, CancellationToken, JoinHandle<io::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let router = exporter_router(&CountingBroker::default());
    let served = tokio::spawn(listener::serve(listener, router, limits, stop.clone()));
    (addr, stop, served)
}

fn limits(max_connections: usize, header_read_timeout: Duration) -> Limits {
    Limits {
        header_read_timeout,
        max_connections,
    }
}

/// Whether the server closes `stream` (end of stream or reset) within [`PATIENCE`].
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut buf))
        .await
        .is_ok()
}

async fn livez(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[tokio::test]
async fn a_half_sent_request_is_closed_after_the_header_timeout() {
    let timeout = Duration::from_millis(200);
    let (addr, stop, _) = serve(limits(8, timeout)).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let sent = tokio::time::Instant::now();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        closed_by_server(&mut stream).await,
        "a request whose headers never end keeps its connection"
    );
    // Closed by the timeout, not at once: a slow but honest client gets the whole of it.
    assert!(
        sent.elapsed() >= timeout,
        "closed after {:?}",
        sent.elapsed()
    );
    // A whole request on a fresh connection is still answered.
    assert!(livez(addr).await.unwrap().ends_with("ok\n"));
    stop.cancel();
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_and_a_freed_slot_serves_again() {
    // A header timeout far beyond the test: only the cap closes anything here.
    let (addr, stop, _) = serve(limits(4, Duration::from_secs(600))).await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut over = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_by_server(&mut over).await,
        "the connection over the cap was kept"
    );
    // One idle client leaves: its slot serves the next request.
    drop(idle.pop());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match livez(addr).await {
            Ok(body) if body.ends_with("ok\n") => break,
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!("no slot freed for /livez: {other:?}"),
        }
    }
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn concurrent_scaling_requests_share_one_broker_read() {
    for (name, router) in [
        ("worker", worker_router as fn(&CountingBroker) -> Router),
        ("exporter", exporter_router),
    ] {
        let broker = CountingBroker::new(Duration::from_millis(100));
        let router = router(&broker);
        let answers = futures::future::join_all((0..20).map(|_| get(&router, "/scaling"))).await;
        assert!(
            answers.iter().all(|(s, _)| *s == StatusCode::OK),
            "{name}: {answers:?}"
        );
        // Two queues, one reading: one depth call each.
        assert_eq!(broker.depth_reads(), 2, "{name}: 20 requests, one reading");
        get(&router, "/metrics").await;
        assert_eq!(
            broker.depth_reads(),
            2,
            "{name}: /metrics within the TTL is cached"
        );
        tokio::time::advance(Duration::from_millis(1001)).await;
        get(&router, "/scaling").await;
        assert_eq!(
            broker.depth_reads(),
            4,
            "{name}: after the TTL, a new reading"
        );
    }
}

/// A job enqueued after a reading is in the backlog a request sees 150 ms later: an
/// autoscaler polling then must not read the backlog from before it (with a reading
/// that answered for a second, a KEDA poll returned a pool to zero under arriving
/// jobs).
#[tokio::test(start_paused = true)]
async fn a_reading_older_than_100_ms_is_not_served() {
    for (name, router) in [
        ("worker", worker_router as fn(&CountingBroker) -> Router),
        ("exporter", exporter_router),
    ] {
        let broker = CountingBroker::default();
        let router = router(&broker);
        let backlog = |body: &str| -> u64 {
            let doc: serde_json::Value = serde_json::from_str(body).unwrap();
            doc["backlog"].as_u64().unwrap()
        };
        let (status, body) = get(&router, "/scaling").await;
        assert_eq!(
            (status, backlog(&body)),
            (StatusCode::OK, 0),
            "{name}: {body}"
        );
        crate::Broker::enqueue(&broker, vec![crate::NewJob::new("a", b"{}".to_vec())])
            .await
            .unwrap();
        tokio::time::advance(Duration::from_millis(150)).await;
        let (status, body) = get(&router, "/scaling").await;
        assert_eq!(
            (status, backlog(&body)),
            (StatusCode::OK, 1),
            "{name}: {body}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn broker_error_text_stays_out_of_response_bodies() {
    let broker = CountingBroker::new(Duration::ZERO);
    broker.fail(true);
    let worker = worker_router_connected(&broker, false);
    let exporter = exporter_router(&broker);
    for (router, path, status) in [
        (&worker, "/readyz", StatusCode::SERVICE_UNAVAILABLE),
        (&worker, "/scaling", StatusCode::SERVICE_UNAVAILABLE),
        (&exporter, "/scaling", StatusCode::SERVICE_UNAVAILABLE),
        (&exporter, "/metrics", StatusCode::SERVICE_UNAVAILABLE),
        // The worker's /metrics still renders its own counters when depth fails.
        (&worker, "/metrics", StatusCode::OK),
    ] {
        let (got, body) = get(router, path).await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(
            !body.contains("secret"),
            "{path} names the broker's credentials: {body}"
        );
        assert!(!body.contains(SECRET), "{path}: {body}");
    }
    // What failed, in a word: the autoscaler and on-call see the kind, the log the text.
    for router in [&worker, &exporter] {
        let (_, body) = get(router, "/scaling").await;
        assert_eq!(body, r#"{"error":"broker unavailable"}"#);
    }
}

#[tokio::test]
async fn stopping_closes_idle_connections_and_returns() {
    let (addr, stop, served) = serve(limits(4, Duration::from_secs(600))).await;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    // The connection is served (not merely queued) before the stop.
    assert!(livez(addr).await.unwrap().ends_with("ok\n"));
    stop.cancel();
    assert!(
        closed_by_server(&mut idle).await,
        "an idle connection outlived the stop"
    );
    tokio::time::timeout(PATIENCE, served)
        .await
        .expect("the listener did not return")
        .unwrap()
        .unwrap();
}
