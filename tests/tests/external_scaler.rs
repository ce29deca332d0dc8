//! KEDA's external scaler service of a real `workerctl exporter`, through a client
//! built from the same proto, on the real Redis and RabbitMQ:
//!
//! - `GetMetricSpec`, `GetMetrics` and `IsActive` give the pool's backlog, target and
//!   activity as `/scaling` does; a broker outage is `UNAVAILABLE`, never a 0.
//! - `StreamIsActive` sends the current activity when it opens, pushes `true` when the
//!   first job reaches an idle pool, and `false` again once its jobs are done, on the
//!   same stream; several streams share what they see.
//! - The enqueue-to-`true` latency over 20 idle pools per broker is printed (p50, p99,
//!   max). Each `true` is asserted to come from the wake-up path: the exporter's
//!   periodic reading is set to 10 s, and the `true` must arrive sooner than that
//!   after the stream opened. No bound on the latency itself is asserted.
//!
//! ```sh
//! cargo test -p system-tests --test external_scaler -- --nocapture --test-threads 1
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use system_tests::{enqueue_json, free_addr, start_exporter, PoolBroker, RedisServer};
use tokio::process::Child;
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use worker_core::testing::{eventually, unique};
use worker_core::{Broker, FetchPlan, NewJob};

use system_tests::external_scaler::pb::{GetMetricsRequest, IsActiveResponse, ScaledObjectRef};
use system_tests::external_scaler::{connect, ExternalScalerClient};

/// The exporter's periodic reading in the latency runs: a `true` that arrives sooner
/// after the stream opened came from the wake-up.
const LONG_INTERVAL: &str = "10s";

/// Tries per broker in the latency runs.
const TRIES: usize = 20;

/// Jobs one replica runs at once, as the exporter is told.
const CAPACITY: i64 = 4;

/// A running exporter and a client of its gRPC service.
struct Scaler {
    child: Child,
    client: ExternalScalerClient<Channel>,
}

impl Scaler {
    /// `workerctl exporter` for pool `gpu` on `queues` of `broker`, reading every
    /// `interval` while a stream is open.
    async fn start(broker: &PoolBroker, queues: &str, interval: &str) -> Self {
        Self::start_env(&broker.env(&[]), queues, interval).await
    }

    async fn start_env(env: &[(&str, &str)], queues: &str, interval: &str) -> Self {
        let grpc = free_addr();
        let capacity = CAPACITY.to_string();
        let grpc_arg = grpc.to_string();
        let (child, _http) = start_exporter(
            &[
                "--pool",
                "gpu",
                "--queues",
                queues,
                "--capacity",
                &capacity,
                "--grpc-listen",
                &grpc_arg,
                "--watch-interval",
                interval,
            ],
            env,
        )
        .await;
        Self {
            child,
            client: connect(grpc).await,
        }
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    async fn is_active(&mut self) -> Result<bool, tonic::Status> {
        Ok(self
            .client
            .is_active(object(&[]))
            .await?
            .into_inner()
            .result)
    }

    async fn backlog(&mut self) -> Result<(i64, f64), tonic::Status> {
        let values = self
            .client
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(object(&[])),
                metric_name: "backlog".into(),
            })
            .await?
            .into_inner()
            .metric_values;
        assert_eq!(values.len(), 1, "{values:?}");
        assert_eq!(values[0].metric_name, "backlog");
        Ok((values[0].metric_value, values[0].metric_value_float))
    }

    async fn stream(&mut self) -> Streaming<IsActiveResponse> {
        self.client
            .stream_is_active(object(&[("pool", "gpu")]))
            .await
            .unwrap_or_else(|e| panic!("StreamIsActive: {e}"))
            .into_inner()
    }
}

/// The ScaledObject as KEDA sends it, with this trigger metadata.
fn object(metadata: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "gpu".into(),
        namespace: "default".into(),
        scaler_metadata: metadata
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

/// The next activity a stream sends, within `limit`.
async fn next(stream: &mut Streaming<IsActiveResponse>, limit: Duration, what: &str) -> bool {
    tokio::time::timeout(limit, stream.message())
        .await
        .unwrap_or_else(|_| panic!("{what}: no activity within {limit:?}"))
        .unwrap_or_else(|e| panic!("stream failed: {e}"))
        .unwrap_or_else(|| panic!("stream ended"))
        .result
}

/// Start every job of `queue` there is and ack it, until the queue is empty (a
/// RabbitMQ consumer's first fetch may find its deliveries still on their way).
async fn run_all(b: &dyn Broker, queue: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = b
            .fetch(&FetchPlan::single(queue, 16, Duration::from_secs(60)))
            .await
            .unwrap_or_else(|e| panic!("fetch: {e}"));
        let idle = got.is_empty();
        for d in got {
            b.ack(&d.lease).await.unwrap_or_else(|e| panic!("ack: {e}"));
        }
        if idle {
            let depth = b
                .depth(queue)
                .await
                .unwrap_or_else(|e| panic!("depth: {e}"));
            if depth.backlog() == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "{queue} not drained: {depth:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn the_service_reports_backlog_target_and_activity(pb: &PoolBroker, a: &str, b: &str) {
    let broker = pb.broker.as_ref();
    let queues = format!("{a},{b}");
    let mut scaler = Scaler::start(pb, &queues, "500ms").await;

    let spec = scaler
        .client
        .get_metric_spec(object(&[]))
        .await
        .unwrap_or_else(|e| panic!("GetMetricSpec: {e}"))
        .into_inner()
        .metric_specs;
    assert_eq!(spec.len(), 1, "{spec:?}");
    assert_eq!(spec[0].metric_name, "backlog");
    assert_eq!(spec[0].target_size, CAPACITY);
    assert_eq!(spec[0].target_size_float, CAPACITY as f64);

    assert_eq!(
        scaler.backlog().await.unwrap_or_else(|e| panic!("{e}")),
        (0, 0.0)
    );
    assert!(!scaler.is_active().await.unwrap_or_else(|e| panic!("{e}")));

    enqueue_json(broker, a, &json!({}), 5).await;
    enqueue_json(broker, b, &json!({}), 2).await;
    // One reading answers for up to a second.
    eventually(Duration::from_secs(10), "backlog 7", || async {
        scaler
            .client
            .clone()
            .get_metrics(GetMetricsRequest {
                scaled_object_ref: Some(object(&[])),
                metric_name: "backlog".into(),
            })
            .await
            .is_ok_and(|r| r.into_inner().metric_values[0].metric_value == 7)
    })
    .await;
    assert_eq!(
        scaler.backlog().await.unwrap_or_else(|e| panic!("{e}")),
        (7, 7.0)
    );
    assert!(scaler.is_active().await.unwrap_or_else(|e| panic!("{e}")));

    // Wired to another pool's exporter, or asked for another metric: refused.
    let wrong = scaler
        .client
        .is_active(object(&[("pool", "cpu")]))
        .await
        .err()
        .unwrap_or_else(|| panic!("answered"));
    assert_eq!(wrong.code(), Code::InvalidArgument, "{wrong:?}");
    let unknown = scaler
        .client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object(&[])),
            metric_name: "queueLength".into(),
        })
        .await
        .err()
        .unwrap_or_else(|| panic!("answered"));
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    // It never touches a job.
    let depth = broker.depth(a).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((depth.pending, depth.in_flight), (5, 0));
    scaler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_the_service_reports_backlog_target_and_activity() {
    let pb = PoolBroker::redis(&unique("xs")).await;
    the_service_reports_backlog_target_and_activity(&pb, "a", "b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_the_service_reports_backlog_target_and_activity() {
    let prefix = unique("xs");
    let pb = PoolBroker::rabbitmq(&prefix).await;
    the_service_reports_backlog_target_and_activity(
        &pb,
        &format!("{prefix}-a"),
        &format!("{prefix}-b"),
    )
    .await;
    pb.cleanup().await;
}

/// Opens a connection of its own to the test's broker: a worker that comes and goes.
type Open = fn(String) -> Pin<Box<dyn Future<Output = Arc<dyn Broker>> + Send>>;

/// Two streams open on an idle pool: both say `false`, then `true` when jobs come,
/// `false` once a worker has run them, and `true` again: the streams stay open
/// throughout.
async fn streams_follow_the_pool_from_idle_to_busy_and_back(
    pb: &PoolBroker,
    queue: &str,
    prefix: &str,
    open: Open,
) {
    let b = pb.broker.as_ref();
    let mut scaler = Scaler::start(pb, queue, "300ms").await;
    let mut first = scaler.stream().await;
    let mut second = scaler.stream().await;
    let patience = Duration::from_secs(10);
    assert!(!next(&mut first, patience, "first opens").await);
    assert!(!next(&mut second, patience, "second opens").await);

    for round in 0..2 {
        enqueue_json(b, queue, &json!({}), 3).await;
        assert!(next(&mut first, patience, &format!("first busy {round}")).await);
        assert!(next(&mut second, patience, &format!("second busy {round}")).await);
        // A worker runs them and leaves (on RabbitMQ a consumer left attached would
        // take the next jobs before the exporter could count them ready).
        let worker = open(prefix.to_owned()).await;
        run_all(worker.as_ref(), queue).await;
        worker.close().await;
        assert!(!next(&mut first, patience, &format!("first idle {round}")).await);
        assert!(!next(&mut second, patience, &format!("second idle {round}")).await);
    }
    // A stream opened now starts from the current state.
    let mut third = scaler.stream().await;
    assert!(!next(&mut third, patience, "third opens").await);
    scaler.stop().await;
}

fn open_redis(prefix: String) -> Pin<Box<dyn Future<Output = Arc<dyn Broker>> + Send>> {
    Box::pin(async move {
        let b: Arc<dyn Broker> = Arc::new(system_tests::redis_broker(&prefix).await);
        b
    })
}

fn open_rabbitmq(_: String) -> Pin<Box<dyn Future<Output = Arc<dyn Broker>> + Send>> {
    Box::pin(async {
        let b = worker_amqp::AmqpConfig::new(system_tests::AMQP_URL)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("rabbitmq: {e}"));
        Arc::new(b) as Arc<dyn Broker>
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_streams_follow_the_pool_from_idle_to_busy_and_back() {
    let prefix = unique("xs");
    let pb = PoolBroker::redis(&prefix).await;
    streams_follow_the_pool_from_idle_to_busy_and_back(&pb, "jobs", &prefix, open_redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_streams_follow_the_pool_from_idle_to_busy_and_back() {
    let prefix = unique("xs");
    let pb = PoolBroker::rabbitmq(&prefix).await;
    let queue = format!("{prefix}-jobs");
    streams_follow_the_pool_from_idle_to_busy_and_back(&pb, &queue, &prefix, open_rabbitmq).await;
    pb.cleanup().await;
}

/// Enqueue-to-`true` on a fresh stream of an idle pool, `TRIES` times, each on an
/// exporter of its own (its periodic reading 10 s away); the latencies, sorted.
async fn push_latencies(
    name: &str,
    pool_broker: impl Fn(
        usize,
    )
        -> std::pin::Pin<Box<dyn std::future::Future<Output = (PoolBroker, String)>>>,
) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(TRIES);
    let mut enqueue_calls = Vec::with_capacity(TRIES);
    for i in 0..TRIES {
        let (pb, queue) = pool_broker(i).await;
        let mut scaler = Scaler::start(&pb, &queue, LONG_INTERVAL).await;
        let opened = Instant::now();
        let mut stream = scaler.stream().await;
        let what = format!("{name} try {i}");
        assert!(!next(&mut stream, Duration::from_secs(10), &what).await);
        // Let the wake-up settle (Redis: the subscription), as on a pool idle for long.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sent = Instant::now();
        pb.broker
            .enqueue(vec![NewJob::new(queue.as_str(), b"{}".to_vec())])
            .await
            .unwrap_or_else(|e| panic!("enqueue: {e}"));
        enqueue_calls.push(sent.elapsed());
        assert!(next(&mut stream, Duration::from_secs(30), &what).await);
        let latency = sent.elapsed();
        // The periodic reading is at least 10 s after the stream opened: sooner, the
        // `true` came from the wake-up.
        assert!(
            opened.elapsed() < Duration::from_secs(10),
            "{name} try {i}: true after {:?}, not before the periodic reading",
            opened.elapsed()
        );
        latencies.push(latency);
        // The exporter only looked: the job is pending, its first attempt unspent.
        let got = pb
            .broker
            .fetch(&FetchPlan::single(
                queue.as_str(),
                1,
                Duration::from_secs(60),
            ))
            .await
            .unwrap_or_else(|e| panic!("fetch: {e}"));
        assert_eq!(got.len(), 1, "{name} try {i}");
        assert_eq!(
            got[0].envelope.attempt, 1,
            "{name} try {i}: the attempt was counted"
        );
        pb.broker
            .ack(&got[0].lease)
            .await
            .unwrap_or_else(|e| panic!("ack: {e}"));
        scaler.stop().await;
        pb.cleanup().await;
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let longest_call = enqueue_calls.iter().max().copied().unwrap_or_default();
    println!(
        "{name}: enqueue-to-true over {TRIES} idle pools: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
         (the enqueue call itself took up to {:.1} ms); each: {:?}",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(at(1.0)),
        ms(longest_call),
        latencies.iter().map(|d| (ms(*d) * 10.0).round() / 10.0).collect::<Vec<_>>(),
    );
    latencies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pushes_true_on_the_first_job_of_an_idle_pool() {
    let latencies = push_latencies("redis", |_| {
        Box::pin(async {
            let pb = PoolBroker::redis(&unique("xs")).await;
            (pb, "jobs".to_owned())
        })
    })
    .await;
    assert_eq!(latencies.len(), TRIES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_pushes_true_on_the_first_job_of_an_idle_pool() {
    let latencies = push_latencies("rabbitmq", |_| {
        Box::pin(async {
            let prefix = unique("xs");
            let pb = PoolBroker::rabbitmq(&prefix).await;
            (pb, format!("{prefix}-jobs"))
        })
    })
    .await;
    assert_eq!(latencies.len(), TRIES);
}

/// Redis goes away: calls answer UNAVAILABLE (never a 0 or a `false`), the stream
/// stays open and sends nothing false, and once Redis is back it pushes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_is_an_error_and_the_stream_outlives_it() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let b = Arc::new(
        worker_redis::RedisConfig::new(&url)
            .prefix("xs")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let mut scaler = Scaler::start_env(
        &[("REDIS_URL", url.as_str()), ("REDIS_PREFIX", "xs")],
        "jobs",
        "200ms",
    )
    .await;
    let mut stream = scaler.stream().await;
    assert!(!next(&mut stream, Duration::from_secs(10), "opens idle").await);

    redis.stop();
    eventually(
        Duration::from_secs(10),
        "UNAVAILABLE while down",
        || async {
            let mut client = scaler.client.clone();
            let active = client.is_active(object(&[])).await;
            let metrics = client
                .get_metrics(GetMetricsRequest {
                    scaled_object_ref: Some(object(&[])),
                    metric_name: "backlog".into(),
                })
                .await;
            matches!((active, metrics), (Err(a), Err(m))
            if a.code() == Code::Unavailable && m.code() == Code::Unavailable
                && !a.message().contains("127.0.0.1"))
        },
    )
    .await;
    // Several failed readings later the stream has said nothing.
    let quiet = tokio::time::timeout(Duration::from_secs(1), stream.message()).await;
    assert!(
        quiet.is_err(),
        "the stream sent {quiet:?} while Redis was down"
    );

    redis.start_again();
    // The test's own connection reconnects on a later call.
    eventually(
        Duration::from_secs(30),
        "enqueue after the restart",
        || async {
            b.enqueue(vec![NewJob::new("jobs", b"{}".to_vec())])
                .await
                .is_ok()
        },
    )
    .await;
    assert!(
        next(
            &mut stream,
            Duration::from_secs(30),
            "busy after the restart"
        )
        .await
    );
    eventually(Duration::from_secs(10), "IsActive true", || async {
        let mut client = scaler.client.clone();
        client
            .is_active(object(&[]))
            .await
            .is_ok_and(|r| r.into_inner().result)
    })
    .await;
    scaler.stop().await;
}
