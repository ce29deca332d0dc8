//! Real `demo-worker` processes against the real RabbitMQ on 127.0.0.1:5672: a worker
//! killed with SIGKILL mid-job, its connection closed by the broker while busy, a
//! drain handing jobs to another worker, retries through the later queues into the
//! dead letters, delayed jobs held by a worker killed with SIGKILL, and poison and
//! undecodable messages. Each test uses queues of its own
//! and deletes them at the end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use system_tests::{DemoWorker, RabbitAdmin, RabbitNode};
use worker_amqp::{AmqpBroker, AmqpConfig, QueueType};
use worker_core::testing::unique;
use worker_core::{Broker, NewJob};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

async fn broker(kind: QueueType) -> AmqpBroker {
    AmqpConfig::new(URL)
        .default_queue_type(kind)
        .prefetch(1)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("rabbitmq: {e}"))
}

async fn enqueue(b: &AmqpBroker, queue: &str, payload: Value, n: usize) -> Vec<String> {
    system_tests::enqueue_json(b, queue, &payload, n).await
}

fn kind_name(kind: QueueType) -> &'static str {
    match kind {
        QueueType::Quorum => "quorum",
        _ => "classic",
    }
}

fn worker(queue: &str, kind: QueueType, extra: &[(&str, &str)]) -> DemoWorker {
    let mut env = vec![
        ("AMQP_URL", URL),
        ("AMQP_QUEUE_TYPE", kind_name(kind)),
        ("WORKER_QUEUES", queue),
    ];
    env.extend_from_slice(extra);
    DemoWorker::start(&env)
}

fn ended_ok(w: &DemoWorker, id: &str) -> bool {
    w.events()
        .iter()
        .any(|e| e["event"] == "end" && e["id"] == id && e["ok"] == true)
}

/// Wait until `queue` holds exactly (pending, in flight, delayed, dead) = `want`, read
/// from the broker itself: every process's unacked deliveries and later queue count.
async fn settled(queue: &str, want: (u64, u64, u64, u64)) {
    system_tests::rabbit_exact(queue, want).await;
}

async fn killed_worker_s_job_completes_elsewhere(kind: QueueType) {
    let queue = unique("kill");
    let b = broker(kind).await;
    let ids = enqueue(&b, &queue, json!({"sleep_ms": 1500}), 1).await;
    let a = worker(&queue, kind, &[("WORKER_CONCURRENCY", "1")]);
    a.wait_for(Duration::from_secs(20), "first start", |ev| {
        ev.iter().any(|e| e["event"] == "start")
    })
    .await;
    a.signal("KILL");
    let mut bw = worker(&queue, kind, &[("WORKER_CONCURRENCY", "1")]);
    bw.wait_for(
        Duration::from_secs(20),
        "the job completes elsewhere",
        |_| ended_ok(&bw, &ids[0]),
    )
    .await;
    assert_eq!(
        bw.starts(),
        vec![(ids[0].clone(), 2)],
        "attempt raised once"
    );
    settled(&queue, (0, 0, 0, 0)).await;
    bw.signal("TERM");
    assert!(bw.wait_exit(Duration::from_secs(20)).await.success());
    RabbitAdmin::new().delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_s_job_completes_elsewhere_with_its_attempt_raised() {
    killed_worker_s_job_completes_elsewhere(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_quorum_queue_a_killed_worker_s_job_completes_elsewhere() {
    killed_worker_s_job_completes_elsewhere(QueueType::Quorum).await;
}

async fn connection_cut(fetch: &str) {
    let queue = unique("cut");
    let b = broker(QueueType::Classic).await;
    let mut w = worker(
        &queue,
        QueueType::Classic,
        &[("WORKER_CONCURRENCY", "4"), ("AMQP_FETCH", fetch)],
    );
    w.wait_listening().await;
    let admin = RabbitAdmin::new();
    // The management API lists a connection some seconds after it opens: find the
    // worker's before it has work, so that the cut lands while it is busy.
    let first = admin.wait_connection_of(w.pid(), &[]).await;
    let n = 40;
    let mut ids = enqueue(&b, &queue, json!({"sleep_ms": 250}), n).await;
    w.wait_for(Duration::from_secs(20), "busy", |ev| {
        ev.iter().filter(|e| e["event"] == "end").count() >= 8
    })
    .await;
    assert!(admin.close_connection(&first).await, "cut while busy");
    // Cut again, the new connection this time, whether busy or idle.
    let second = admin
        .wait_connection_of(w.pid(), std::slice::from_ref(&first))
        .await;
    assert!(admin.close_connection(&second).await, "second cut");
    admin.wait_connection_of(w.pid(), &[first, second]).await;
    // Jobs enqueued after the cuts prove the worker consumes again.
    ids.extend(enqueue(&b, &queue, json!({"sleep_ms": 10}), 8).await);
    w.wait_for(Duration::from_secs(60), "every job completes", |_| {
        ids.iter().all(|id| ended_ok(&w, id))
    })
    .await;
    settled(&queue, (0, 0, 0, 0)).await;
    // A job whose ack was lost with the connection runs again; no other job does.
    let runs = w.starts().len();
    let total = ids.len();
    assert!(
        runs >= total && runs <= total + 2 * 4,
        "{runs} starts for {total} jobs"
    );
    let log = w.stderr();
    assert!(
        log.matches("amqp: reconnected").count() >= 2,
        "two reconnects logged:\n{log}"
    );
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(20)).await.success());
    admin.delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_by_the_broker_is_reopened_and_every_job_completes() {
    connection_cut("consume").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taking_jobs_with_gets_a_closed_connection_is_reopened_and_every_job_completes() {
    connection_cut("get").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_hands_jobs_to_another_worker_at_once_and_exits_cleanly() {
    let queue = unique("drain");
    let b = broker(QueueType::Classic).await;
    let ids = enqueue(&b, &queue, json!({"sleep_ms": 4000}), 2).await;
    let mut a = worker(
        &queue,
        QueueType::Classic,
        &[
            ("WORKER_CONCURRENCY", "2"),
            ("WORKER_DRAIN_TIMEOUT", "300ms"),
        ],
    );
    a.wait_for(Duration::from_secs(20), "both jobs start", |ev| {
        ev.iter().filter(|e| e["event"] == "start").count() == 2
    })
    .await;
    let other = worker(&queue, QueueType::Classic, &[("WORKER_CONCURRENCY", "2")]);
    other.wait_listening().await;
    let signalled = Instant::now();
    a.signal("TERM");
    assert!(a.wait_exit(Duration::from_secs(20)).await.success());
    let report = &a.stopped()["report"];
    assert_eq!(report["released"], 2, "{report}");
    other
        .wait_for(
            Duration::from_secs(5),
            "the released jobs start elsewhere",
            |ev| ev.iter().filter(|e| e["event"] == "start").count() == 2,
        )
        .await;
    assert!(signalled.elapsed() < Duration::from_secs(4), "not at once");
    let mut got = other.starts();
    got.sort();
    let mut want: Vec<(String, u64)> = ids.iter().map(|id| (id.clone(), 1)).collect();
    want.sort();
    assert_eq!(got, want, "released jobs keep their attempt");
    other
        .wait_for(Duration::from_secs(20), "both complete", |_| {
            ids.iter().all(|id| ended_ok(&other, id))
        })
        .await;
    settled(&queue, (0, 0, 0, 0)).await;
    assert!(
        RabbitAdmin::new().connections_of(a.pid()).await.is_empty(),
        "the drained worker's connection is closed"
    );
    other.signal("TERM");
    RabbitAdmin::new().delete_queues(&queue).await;
}

async fn retries_go_through_later_queues_then_die(kind: QueueType) {
    let queue = unique("retry");
    let b = broker(kind).await;
    let ids = enqueue(&b, &queue, json!({"outcome": "retry"}), 1).await;
    let w = worker(
        &queue,
        kind,
        &[
            ("WORKER_MAX_ATTEMPTS", "3"),
            ("WORKER_RETRY_BASE", "400ms"),
            ("WORKER_RETRY_CAP", "800ms"),
        ],
    );
    w.wait_for(Duration::from_secs(30), "three attempts", |ev| {
        ev.iter().filter(|e| e["event"] == "start").count() == 3
    })
    .await;
    let attempts: Vec<u64> = w.starts().into_iter().map(|(_, a)| a).collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    worker_core::testing::eventually(Duration::from_secs(10), "dead letter", || async {
        b.depth(&queue).await.map(|d| d.dead).unwrap_or(0) == 1
    })
    .await;
    let dead = b
        .dead_letters(&queue, 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.id.as_str(), ids[0]);
    assert!(
        dead[0].reason.contains("3 of 3") && dead[0].reason.contains("asked to retry"),
        "{}",
        dead[0].reason
    );
    assert_eq!(dead[0].envelope.history.len(), 3, "{:?}", dead[0].envelope);
    // The backoffs went through the queue's later queues.
    let delays = RabbitAdmin::new().queues(&format!("{queue}.later.")).await;
    assert!(!delays.is_empty(), "no later queue was used");
    settled(&queue, (0, 0, 0, 1)).await;
    w.signal("TERM");
    RabbitAdmin::new().delete_queues(&queue).await;
}

/// Delayed jobs held by a worker's mover when the worker is killed with SIGKILL go back
/// to their later queue; another worker's mover moves each on when it is due, once,
/// and each job runs once, on its first attempt, not before its time.
async fn delayed_jobs_held_by_a_killed_worker_move_once_elsewhere(kind: QueueType) {
    const JOBS: usize = 20;
    const DELAY: Duration = Duration::from_secs(6);
    let queue = unique("later-kill");
    // A producer that moves nothing, so that only the workers hold the delayed jobs.
    let producer = AmqpConfig::new(URL)
        .default_queue_type(kind)
        .move_delayed(false)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("rabbitmq: {e}"));
    // Built before the clock starts: the jobs' delay is the first worker's window.
    system_tests::binary("demo-worker");
    let jobs = (0..JOBS)
        .map(|i| {
            NewJob::new(&queue, json!({"n": i}).to_string())
                .id(format!("later-{i}"))
                .delay(DELAY)
        })
        .collect();
    let enqueued = Instant::now();
    producer
        .enqueue(jobs)
        .await
        .unwrap_or_else(|e| panic!("enqueue: {e}"));
    let a = worker(&queue, kind, &[]);
    // Every job held by the first worker's mover: none ready in a later queue, none
    // pending, none started.
    worker_core::testing::eventually(
        Duration::from_secs(20),
        "the first worker holds every delayed job",
        || async {
            producer
                .depth(&queue)
                .await
                .is_ok_and(|d| d.delayed == 0 && d.pending == 0)
        },
    )
    .await;
    assert!(
        enqueued.elapsed() < DELAY,
        "the jobs came due before the first worker held them ({:?}); its log:\n{}",
        enqueued.elapsed(),
        a.stderr()
    );
    assert_eq!(a.count("start"), 0, "a job started before its time");
    a.signal("KILL");
    let b = worker(&queue, kind, &[]);
    b.wait_for(Duration::from_secs(60), "every delayed job ends ok", |ev| {
        ev.iter()
            .filter(|e| e["event"] == "end" && e["ok"] == true)
            .count()
            >= JOBS
    })
    .await;
    assert!(enqueued.elapsed() >= DELAY);
    let mut starts = b.starts();
    starts.sort();
    let mut want: Vec<(String, u64)> = (0..JOBS).map(|i| (format!("later-{i}"), 1)).collect();
    want.sort();
    assert_eq!(starts, want, "each job ran once, on its first attempt");
    settled(&queue, (0, 0, 0, 0)).await;
    b.signal("TERM");
    producer.close().await;
    RabbitAdmin::new().delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_jobs_held_by_a_killed_worker_move_once_on_classic_queues() {
    delayed_jobs_held_by_a_killed_worker_move_once_elsewhere(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_jobs_held_by_a_killed_worker_move_once_on_quorum_queues() {
    delayed_jobs_held_by_a_killed_worker_move_once_elsewhere(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_wait_in_later_queues_then_dead_letter_with_the_reason() {
    retries_go_through_later_queues_then_die(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_quorum_queues_retries_wait_in_later_queues_then_dead_letter() {
    retries_go_through_later_queues_then_die(QueueType::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_and_undecodable_messages_are_dead_lettered_not_redelivered() {
    let queue = unique("poison");
    let b = broker(QueueType::Classic).await;
    let fatal = enqueue(&b, &queue, json!({"outcome": "fatal"}), 1).await;
    let garbage = b
        .enqueue(vec![NewJob::new(&queue, vec![0xffu8, 0x00, 0x13])])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let w = worker(&queue, QueueType::Classic, &[]);
    worker_core::testing::eventually(Duration::from_secs(20), "two dead letters", || async {
        b.depth(&queue).await.map(|d| d.dead).unwrap_or(0) == 2
    })
    .await;
    let reasons: HashMap<String, String> = b
        .dead_letters(&queue, 10)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|d| (d.envelope.id.to_string(), d.reason))
        .collect();
    assert_eq!(reasons[&fatal[0]], "asked to fail");
    assert!(
        reasons[garbage[0].as_str()].contains("undecodable"),
        "{reasons:?}"
    );
    // A job enqueued behind them ends only after whatever was put back ahead of it.
    let marker = enqueue(&b, &queue, json!({"sleep_ms": 10}), 1).await;
    w.wait_for(Duration::from_secs(20), "the job behind them ends", |_| {
        ended_ok(&w, &marker[0])
    })
    .await;
    let starts = w.starts();
    assert_eq!(
        starts,
        vec![(fatal[0].clone(), 1), (marker[0].clone(), 1)],
        "the poison job ran once, the undecodable one never"
    );
    // Nothing held, nothing put back, each dead-lettered once.
    settled(&queue, (0, 0, 0, 2)).await;
    assert_eq!(w.starts(), starts, "no start since");
    w.signal("TERM");
    RabbitAdmin::new().delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_jobs_of_every_worker_are_counted_through_the_management_api() {
    let queue = unique("depth");
    let admin = RabbitAdmin::new();
    let management = admin.url();
    let outside = AmqpConfig::new(URL)
        .management_url(&management)
        .prefetch(1)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("rabbitmq: {e}"));
    // Jobs far longer than the test: the counts hold still while the statistics catch up.
    let ids = enqueue(&outside, &queue, json!({"sleep_ms": 120_000}), 5).await;
    let w = worker(
        &queue,
        QueueType::Classic,
        &[
            ("WORKER_CONCURRENCY", "2"),
            ("AMQP_MANAGEMENT_URL", management.as_str()),
        ],
    );
    w.wait_for(Duration::from_secs(20), "two jobs start", |ev| {
        ev.iter().filter(|e| e["event"] == "start").count() == 2
    })
    .await;
    // A reader that holds nothing (as `workerctl exporter` does) sees the worker's two
    // running jobs once the management statistics catch up.
    worker_core::testing::eventually(
        Duration::from_secs(40),
        "2 in flight and 3 pending from outside",
        || async {
            let d = outside
                .depth(&queue)
                .await
                .unwrap_or_else(|e| panic!("depth: {e}"));
            d.in_flight == 2 && d.pending == 3
        },
    )
    .await;
    let d = outside
        .depth(&queue)
        .await
        .unwrap_or_else(|e| panic!("depth: {e}"));
    assert!(
        d.sources["in_flight"].starts_with("management API"),
        "{:?}",
        d.sources
    );
    assert!(
        d.sources["pending"].contains("passive declare"),
        "{:?}",
        d.sources
    );
    // The worker's own /scaling document: the whole backlog, and where each number came from.
    let deadline = Instant::now() + Duration::from_secs(40);
    let doc = loop {
        let (status, body) = w.get("/scaling").await;
        let doc: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if status == 200 && doc["backlog"] == 5 {
            break doc;
        }
        assert!(
            Instant::now() < deadline,
            "/scaling never showed backlog 5: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let q = &doc["queues"][queue.as_str()];
    assert_eq!(q["in_flight"], 2, "{doc}");
    assert!(
        q["sources"]["in_flight"]
            .as_str()
            .is_some_and(|s| s.starts_with("management API")),
        "{doc}"
    );
    assert_eq!(ids.len(), 5);
    w.signal("KILL");
    admin.delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_timeout_beyond_the_consumer_timeout_is_warned_at_start_up() {
    let queue = unique("ctimeout");
    let b = broker(QueueType::Classic).await;
    let ids = enqueue(&b, &queue, json!({"sleep_ms": 10}), 3).await;
    // The worker asks RabbitMQ for a consumer timeout of 1 h per consumer (brokers
    // before 3.12 ignore the argument), and its 2 h job timeout is beyond it.
    let w = worker(
        &queue,
        QueueType::Classic,
        &[
            ("AMQP_CONSUMER_TIMEOUT", "1h"),
            ("WORKER_JOB_TIMEOUT", "2h"),
        ],
    );
    w.wait_for(Duration::from_secs(20), "the jobs complete", |_| {
        ids.iter().all(|id| ended_ok(&w, id))
    })
    .await;
    settled(&queue, (0, 0, 0, 0)).await;
    let log = w.stderr();
    assert!(
        log.contains("WORKER_JOB_TIMEOUT (2h) is longer than AMQP_CONSUMER_TIMEOUT (1h)"),
        "{log}"
    );
    w.signal("TERM");
    // A value that is not a duration stops the worker with the variable named.
    let mut bad = worker(
        &queue,
        QueueType::Classic,
        &[("AMQP_CONSUMER_TIMEOUT", "soon")],
    );
    let status = bad.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(2));
    let log = bad.stderr();
    assert!(
        log.contains("AMQP_CONSUMER_TIMEOUT") && log.contains("45m"),
        "{log}"
    );
    RabbitAdmin::new().delete_queues(&queue).await;
}

/// A worker of concurrency 2 on queues `<base>-hi` (weight 3) and `<base>-lo`
/// (weight 1), 8 one-second jobs each: how many jobs it held while its first two
/// ran, sampled; the worker; `base`.
async fn holds_only_what_it_can_start(fetch: &str) -> (Vec<u64>, DemoWorker, String) {
    let base = unique("hold");
    let (hi, lo) = (format!("{base}-hi"), format!("{base}-lo"));
    let b = broker(QueueType::Classic).await;
    let n = 8;
    enqueue(&b, &hi, json!({"sleep_ms": 1000}), n).await;
    enqueue(&b, &lo, json!({"sleep_ms": 1000}), n).await;
    let mut env = vec![("WORKER_CONCURRENCY", "2")];
    if !fetch.is_empty() {
        env.push(("AMQP_FETCH", fetch));
    }
    let w = worker(&format!("{hi}:3,{lo}:1"), QueueType::Classic, &env);
    w.wait_for(Duration::from_secs(20), "two jobs running", |ev| {
        ev.iter().filter(|e| e["event"] == "start").count() >= 2
    })
    .await;
    // Until a job ends, each job is ready in RabbitMQ or held by the worker.
    let mut held = Vec::new();
    for _ in 0..4 {
        let ready = b.depth(&hi).await.map(|d| d.pending).unwrap_or(0)
            + b.depth(&lo).await.map(|d| d.pending).unwrap_or(0);
        if w.count("end") > 0 {
            break;
        }
        held.push(2 * n as u64 - ready);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!held.is_empty(), "sampled before the first job ended");
    (held, w, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_consuming_two_queues_holds_only_the_jobs_it_can_start() {
    let (held, mut w, base) = holds_only_what_it_can_start("").await;
    assert!(
        held.iter().all(|&h| h == 2),
        "a worker running 2 jobs held {held:?}"
    );
    let (hi, lo) = (format!("{base}-hi"), format!("{base}-lo"));
    w.wait_for(Duration::from_secs(30), "every job ends", |ev| {
        ev.iter().filter(|e| e["event"] == "end").count() == 16
    })
    .await;
    let order: Vec<String> = w
        .events()
        .iter()
        .filter(|e| e["event"] == "start")
        .map(|e| e["queue"].as_str().unwrap_or_default().to_owned())
        .collect();
    let first_hi = order[..8].iter().filter(|q| **q == hi).count();
    assert!(
        first_hi >= 5,
        "weights 3:1, the first 8 starts: {first_hi} from {hi}"
    );
    assert_eq!(
        system_tests::most_at_once(w.events().iter().filter(|e| e["queue"] == lo.as_str())),
        2,
        "once {hi} is empty, {lo} has both slots"
    );
    settled(&hi, (0, 0, 0, 0)).await;
    settled(&lo, (0, 0, 0, 0)).await;
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(20)).await.success());
    RabbitAdmin::new().delete_queues(&base).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consuming_two_queues_holds_a_prefetch_per_queue() {
    // What AMQP_FETCH=get (the default for several queues) avoids: RabbitMQ's
    // prefetch is per consumer, so two consumers hold 2 + 2.
    let (held, mut w, base) = holds_only_what_it_can_start("consume").await;
    assert!(
        held.iter().all(|&h| h == 4),
        "two consumers of prefetch 2 held {held:?}"
    );
    w.signal("TERM");
    assert!(w.wait_exit(Duration::from_secs(20)).await.success());
    RabbitAdmin::new().delete_queues(&base).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_closed_for_the_consumer_timeout_is_named_and_its_job_redelivered() {
    // A node of the test's own: the shared broker's settings must not change. It
    // checks unacked deliveries every half second against a 2 s timeout.
    let node = tokio::task::spawn_blocking(|| {
        RabbitNode::start(
            &["consumer_timeout = 2000"],
            "[{rabbit, [{channel_tick_interval, 500}]}]",
        )
    })
    .await
    .unwrap_or_else(|e| panic!("node: {e}"));
    let url = node.url();
    let b = AmqpConfig::new(&url)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("rabbitmq: {e}"));
    // Two queues, consumed, then taken with gets.
    for fetch in ["consume", "get"] {
        let queue = unique("ctimeout");
        let ids = enqueue(&b, &queue, json!({"sleep_ms": 3000}), 1).await;
        let queues = format!("{queue},{queue}-other");
        let w = DemoWorker::start(&[
            ("AMQP_URL", url.as_str()),
            ("AMQP_FETCH", fetch),
            ("AMQP_CONSUMER_TIMEOUT", "2s"),
            ("WORKER_QUEUES", queues.as_str()),
            ("WORKER_CONCURRENCY", "1"),
        ]);
        w.wait_for(Duration::from_secs(30), "the job delivered again", |ev| {
            ev.iter().filter(|e| e["event"] == "start").count() >= 2
        })
        .await;
        assert_eq!(
            w.starts()[..2],
            [(ids[0].clone(), 1), (ids[0].clone(), 2)],
            "{fetch}: delivered again with its attempt raised"
        );
        let log = w.stderr();
        assert!(
            log.contains("past its consumer timeout") && log.contains("PRECONDITION_FAILED"),
            "{fetch}: the cause is named\n{log}"
        );
        w.signal("KILL");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_releases_everything_and_exits_at_once() {
    let queue = unique("second");
    let b = broker(QueueType::Classic).await;
    let ids = enqueue(&b, &queue, json!({"sleep_ms": 600_000}), 2).await;
    // A drain that would wait ten minutes for the running jobs.
    let mut w = worker(
        &queue,
        QueueType::Classic,
        &[("WORKER_CONCURRENCY", "2"), ("WORKER_DRAIN_TIMEOUT", "10m")],
    );
    w.wait_for(Duration::from_secs(20), "both jobs start", |ev| {
        ev.iter().filter(|e| e["event"] == "start").count() == 2
    })
    .await;
    w.signal("INT");
    worker_core::testing::eventually(Duration::from_secs(10), "draining", || async {
        w.get("/readyz").await.0 == 503
    })
    .await;
    w.signal("TERM");
    // Far inside the ten minutes the first signal would have waited.
    let status = w.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", w.stderr());
    let report = &w.stopped()["report"];
    assert_eq!(report["released"], 2, "{report}");
    assert_eq!(report["ok"], 0, "{report}");
    // Both back in the queue, nothing held by the gone worker.
    settled(&queue, (2, 0, 0, 0)).await;
    let other = worker(&queue, QueueType::Classic, &[("WORKER_CONCURRENCY", "2")]);
    other
        .wait_for(Duration::from_secs(20), "both start elsewhere", |ev| {
            ev.iter().filter(|e| e["event"] == "start").count() == 2
        })
        .await;
    let mut got = other.starts();
    got.sort();
    let mut want: Vec<(String, u64)> = ids.iter().map(|id| (id.clone(), 1)).collect();
    want.sort();
    assert_eq!(got, want, "released jobs keep their attempt");
    other.signal("KILL");
    RabbitAdmin::new().delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_while_reconnecting_is_an_error_or_exact_never_zero() {
    use worker_core::FetchPlan;

    let queue = unique("redepth");
    let upstream = "127.0.0.1:5672"
        .parse()
        .unwrap_or_else(|e| panic!("address: {e}"));
    let proxy = system_tests::soak::ChaosProxy::start(upstream).await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    // Without the management API: every number is this process's or exact.
    let b = AmqpConfig::new(&url)
        .prefetch(4)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("rabbitmq: {e}"));
    let n = 6u64;
    enqueue(&b, &queue, json!({}), n as usize).await;
    // Two leased, two more received and held unstarted, two ready in the broker.
    let held = b
        .fetch(&FetchPlan::single(&queue, 2, Duration::from_secs(60)))
        .await
        .unwrap_or_else(|e| panic!("fetch: {e}"));
    assert_eq!(held.len(), 2);
    let exact =
        |d: &worker_core::QueueDepth| (d.pending + d.in_flight, d.delayed, d.dead) == (n, 0, 0);
    let before = b
        .depth(&queue)
        .await
        .unwrap_or_else(|e| panic!("depth: {e}"));
    assert!(exact(&before) && before.in_flight == 2, "{before:?}");

    proxy.set_down(true);
    let mut readings = Vec::new();
    // Unreachable: errors; then reachable again: exact readings.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut reopened = false;
    loop {
        let reading = b.depth(&queue).await;
        if let Ok(d) = &reading {
            assert!(
                exact(d),
                "a reading while reconnecting: {d:?}; readings before: {readings:?}"
            );
        }
        let errors = readings
            .iter()
            .filter(|r: &&String| r.starts_with("error"))
            .count();
        readings.push(match &reading {
            Ok(d) => format!("{:?}", (d.pending, d.in_flight, d.delayed, d.dead)),
            Err(e) => format!("error: {e}"),
        });
        if !reopened && errors >= 3 {
            proxy.set_down(false);
            reopened = true;
        }
        let exact_after = readings
            .iter()
            .rev()
            .take_while(|r| !r.starts_with("error"))
            .count();
        if reopened && exact_after >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never exact again after the reconnect: {readings:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What the lost connection held went back to the queue, whole.
    let last = b
        .depth(&queue)
        .await
        .unwrap_or_else(|e| panic!("depth: {e}"));
    assert_eq!((last.pending, last.in_flight), (n, 0), "{readings:?}");
    for d in &held {
        assert!(
            b.ack(&d.lease).await.is_err(),
            "a lease of the lost connection"
        );
    }
    let mut taken = 0;
    while taken < n {
        let got = b
            .fetch(&FetchPlan::single(
                &queue,
                n as u32,
                Duration::from_secs(60),
            ))
            .await
            .unwrap_or_else(|e| panic!("fetch: {e}"));
        for d in &got {
            b.ack(&d.lease).await.unwrap_or_else(|e| panic!("ack: {e}"));
        }
        taken += got.len() as u64;
    }
    b.close().await;
    settled(&queue, (0, 0, 0, 0)).await;
    RabbitAdmin::new().delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exporter_serves_the_backlog_the_broker_holds() {
    let queue = unique("exporter");
    let admin = RabbitAdmin::new();
    let management = admin.url();
    let b = broker(QueueType::Classic).await;
    // One to die, five to run far longer than the test, and one waiting for ten minutes.
    let fatal = enqueue(&b, &queue, json!({"outcome": "fatal"}), 1).await;
    let long = enqueue(&b, &queue, json!({"sleep_ms": 600_000}), 5).await;
    let later = NewJob::json(&queue, &json!({})).unwrap_or_else(|e| panic!("{e}"));
    b.enqueue(vec![later.delay(Duration::from_secs(600))])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Holds only what it runs: two jobs.
    let w = worker(
        &queue,
        QueueType::Classic,
        &[("WORKER_CONCURRENCY", "2"), ("WORKER_PREFETCH", "0")],
    );
    w.wait_for(Duration::from_secs(30), "the poison ends, two run", |ev| {
        ev.iter().filter(|e| e["event"] == "start").count() == 3
            && ev.iter().filter(|e| e["event"] == "end").count() == 1
    })
    .await;
    // What the test counts: from the worker's events, and from the broker itself.
    let running = w.count("start") - w.count("end");
    let pending = long.len() - running;
    assert!(
        w.starts().contains(&(fatal[0].clone(), 1)),
        "{:?}",
        w.starts()
    );
    let want = (pending as u64, running as u64, 1, 1);
    assert_eq!(want, (3, 2, 1, 1));
    settled(&queue, want).await;

    let (mut exporter, addr) = system_tests::start_exporter(
        &["--pool", "p", "--queues", &queue, "--capacity", "2"],
        &[
            ("AMQP_URL", URL),
            ("AMQP_MANAGEMENT_URL", management.as_str()),
        ],
    )
    .await;
    let (status, body) = worker_core::testing::http_get(addr, "/scaling")
        .await
        .unwrap_or_else(|e| panic!("/scaling: {e}"));
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let q = &doc["queues"][queue.as_str()];
    assert_eq!(
        (&q["pending"], &q["in_flight"], &q["delayed"], &q["dead"]),
        (&json!(3), &json!(2), &json!(1), &json!(1)),
        "{doc}"
    );
    assert_eq!(doc["backlog"], 5, "{doc}");
    // ceil(5 / 2).
    assert_eq!(doc["desired_replicas"], 3, "{doc}");
    w.signal("KILL");
    let _ = exporter.start_kill();
    let _ = exporter.wait().await;
    admin.delete_queues(&queue).await;
}

/// A worker running one job at a time holds three more received and not started when
/// its connection is closed: each comes back once; the job that ran counts an attempt,
/// the three that never ran count none (the worker remembers what it held unstarted).
async fn prefetched_jobs_after_a_reconnect(kind: QueueType) {
    let queue = unique("unstarted");
    let b = broker(kind).await;
    let w = worker(
        &queue,
        kind,
        &[
            ("WORKER_CONCURRENCY", "1"),
            ("WORKER_PREFETCH", "0"),
            ("AMQP_PREFETCH", "4"),
        ],
    );
    w.wait_listening().await;
    let admin = RabbitAdmin::new();
    let conn = admin.wait_connection_of(w.pid(), &[]).await;
    // First in the queue, a job that runs through the cut; then three short ones.
    let first = enqueue(&b, &queue, json!({"sleep_ms": 15_000}), 1)
        .await
        .remove(0);
    let short = enqueue(&b, &queue, json!({"sleep_ms": 10}), 3).await;
    w.wait_for(Duration::from_secs(20), "the first job starts", |_| {
        w.starts() == [(first.clone(), 1)]
    })
    .await;
    // The consumer holds the other three by now: RabbitMQ sends up to the prefetch.
    settled(&queue, (0, 4, 0, 0)).await;
    assert_eq!(w.starts(), [(first.clone(), 1)], "nothing else started");
    assert!(admin.close_connection(&conn).await, "cut");
    w.wait_for(
        Duration::from_secs(60),
        "each job starts again after the cut",
        |ev| {
            short.iter().all(|id| ended_ok(&w, id))
                && ev
                    .iter()
                    .filter(|e| e["event"] == "start" && e["id"] == first.as_str())
                    .count()
                    == 2
        },
    )
    .await;
    let mut starts = w.starts();
    starts.sort();
    let mut want: Vec<(String, u64)> = short.iter().map(|id| (id.clone(), 1)).collect();
    want.push((first.clone(), 1));
    want.push((first.clone(), 2));
    want.sort();
    assert_eq!(
        starts, want,
        "the job that ran counts one attempt; those that never ran, none"
    );
    w.wait_for(
        Duration::from_secs(60),
        "the first job ends its second run",
        |ev| {
            // Its first run ended, or was cancelled when its lease was lost.
            ev.iter()
                .filter(|e| {
                    e["id"] == first.as_str() && (e["event"] == "end" || e["event"] == "cancelled")
                })
                .count()
                == 2
        },
    )
    .await;
    settled(&queue, (0, 0, 0, 0)).await;
    w.signal("KILL");
    admin.delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_jobs_redelivered_after_a_reconnect_count_no_attempt() {
    prefetched_jobs_after_a_reconnect(QueueType::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_quorum_queue_prefetched_jobs_after_a_reconnect_count_no_attempt() {
    prefetched_jobs_after_a_reconnect(QueueType::Quorum).await;
}
