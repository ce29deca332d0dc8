//! Reaping expired leases when RabbitMQ refuses the copy: a queue under a
//! `max-length` + `reject-publish` policy refuses the republished job. A reap moves a
//! job in one transaction (copy published, delivery acked); RabbitMQ applies the ack
//! of a transaction whose publish it refuses, and closes the channel. Nothing is
//! lost: the refused copy stays in the worker, counted in flight, and is published
//! again at each reap; the jobs still on that channel go back to the broker with it.
//! Once the broker accepts, every job is delivered once more, its attempt counted.
//! Runs on the shared RabbitMQ (`AMQP_URL`'s host, management API on 15672); the
//! policy matches the test's own queue only and is deleted at the end.

use std::time::Duration;

use serde_json::{json, Value};
use worker_amqp::{AmqpBroker, AmqpConfig};
use worker_core::testing::{eventually, unique};
use worker_core::{Broker, FetchPlan, NewJob};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const API: &str = "http://127.0.0.1:15672/api";

fn api() -> String {
    std::env::var("AMQP_MANAGEMENT_API")
        .map(|base| format!("{base}/api"))
        .unwrap_or_else(|_| API.into())
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A queue's entry in the management API (`Null` while it is not listed).
async fn queue_stats(http: &reqwest::Client, queue: &str) -> Value {
    let res = http
        .get(format!("{}/queues/%2F/{}", api(), encode(queue)))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("management API: {e}"));
    if !res.status().is_success() {
        return Value::Null;
    }
    res.json()
        .await
        .unwrap_or_else(|e| panic!("management reply: {e}"))
}

/// The regular expression that matches `name` and nothing else.
fn exactly(name: &str) -> String {
    let mut out = String::from("^");
    for c in name.chars() {
        if !c.is_ascii_alphanumeric() {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('$');
    out
}

/// Make `queue` refuse every publish (`max-length` 0, `reject-publish`), and wait
/// until the queue applies it.
async fn refuse_publishes(http: &reqwest::Client, policy: &str, queue: &str) {
    let res = http
        .put(format!("{}/policies/%2F/{}", api(), encode(policy)))
        .basic_auth("guest", Some("guest"))
        .json(&json!({
            "pattern": exactly(queue),
            "apply-to": "queues",
            "priority": 100,
            "definition": {"max-length": 0, "overflow": "reject-publish"},
        }))
        .send()
        .await
        .unwrap_or_else(|e| panic!("put policy: {e}"));
    assert!(res.status().is_success(), "put policy: {}", res.status());
    eventually(Duration::from_secs(20), "policy in effect", || async {
        queue_stats(http, queue).await["effective_policy_definition"]["overflow"]
            == "reject-publish"
    })
    .await;
}

async fn delete_policy(http: &reqwest::Client, policy: &str) {
    http.delete(format!("{}/policies/%2F/{}", api(), encode(policy)))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("delete policy: {e}"));
}

/// Deletes the policy when the test ends, passed or not.
struct PolicyGuard(String);

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        let policy = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("runtime: {e}"));
            rt.block_on(delete_policy(&reqwest::Client::new(), &policy));
        })
        .join();
    }
}

async fn accept_publishes(http: &reqwest::Client, policy: &str, queue: &str) {
    delete_policy(http, policy).await;
    eventually(Duration::from_secs(20), "policy lifted", || async {
        queue_stats(http, queue).await["effective_policy_definition"]["overflow"].is_null()
    })
    .await;
}

async fn delete_queue(http: &reqwest::Client, queue: &str) {
    for q in [queue.to_owned(), format!("{queue}.dead")] {
        let _ = http
            .delete(format!("{}/queues/%2F/{}", api(), encode(&q)))
            .basic_auth("guest", Some("guest"))
            .send()
            .await;
    }
}

async fn broker() -> AmqpBroker {
    AmqpConfig::new(URL)
        .prefetch(10)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("rabbitmq: {e}"))
}

// Classic queues only: a quorum queue applies `reject-publish` once it is over its
// limit, so an empty one accepts the copy. The reaper's code is the same for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_republish_keeps_reaped_jobs_until_the_broker_accepts() {
    let queue = unique("reap-refused");
    let policy = format!("{queue}-full");
    let _guard = PolicyGuard(policy.clone());
    let http = reqwest::Client::new();
    let b = broker().await;
    let n = 3;
    let jobs = (0..n)
        .map(|i| NewJob::new(&queue, format!("job {i}")))
        .collect();
    let mut ids = b.enqueue(jobs).await.unwrap_or_else(|e| panic!("{e}"));
    let lease = Duration::from_millis(200);
    let got = b
        .fetch(&FetchPlan::single(&queue, n as u32, lease))
        .await
        .unwrap_or_else(|e| panic!("fetch: {e}"));
    assert_eq!(got.len(), n);
    refuse_publishes(&http, &policy, &queue).await;
    // Past every lease (fixed: the deadline is ours, not the broker's).
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    let q = std::slice::from_ref(&queue);
    let refused = b.reap_expired(q).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("refused")),
        "a reap whose copy was refused reports it: {refused:?}"
    );
    // One copy held here, in flight; the others are the broker's again, ready. None is
    // lost and none is counted twice.
    let d = b
        .depth(&queue)
        .await
        .unwrap_or_else(|e| panic!("depth: {e}"));
    assert_eq!(
        (d.pending, d.in_flight, d.delayed, d.dead),
        (n as u64 - 1, 1, 0, 0),
        "after the refused reap (sources: {:?})",
        d.sources
    );
    // Refused again: still kept, nothing lost.
    assert!(b.reap_expired(q).await.is_err());
    let d = b
        .depth(&queue)
        .await
        .unwrap_or_else(|e| panic!("depth: {e}"));
    assert_eq!((d.pending, d.in_flight), (n as u64 - 1, 1));

    accept_publishes(&http, &policy, &queue).await;
    assert_eq!(
        b.reap_expired(q).await.unwrap_or_else(|e| panic!("{e}")),
        1,
        "the first reap once the broker accepts stores the kept copy"
    );
    assert_eq!(b.reap_expired(q).await.unwrap_or_else(|e| panic!("{e}")), 0);
    let again = b
        .fetch(&FetchPlan::single(
            &queue,
            2 * n as u32,
            Duration::from_secs(60),
        ))
        .await
        .unwrap_or_else(|e| panic!("fetch: {e}"));
    let mut seen: Vec<_> = again.iter().map(|d| d.envelope.id.clone()).collect();
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "each job delivered once more");
    assert!(
        again.iter().all(|d| d.envelope.attempt == 2),
        "attempt counted once"
    );
    for d in &again {
        b.ack(&d.lease).await.unwrap_or_else(|e| panic!("ack: {e}"));
    }
    // Settled in the broker itself: nothing ready, nothing unacked.
    eventually(
        Duration::from_secs(30),
        "nothing ready or unacked",
        || async {
            let s = queue_stats(&http, &queue).await;
            s["messages_ready"] == 0 && s["messages_unacknowledged"] == 0
        },
    )
    .await;
    let d = b
        .depth(&queue)
        .await
        .unwrap_or_else(|e| panic!("depth: {e}"));
    assert_eq!((d.pending, d.in_flight, d.delayed, d.dead), (0, 0, 0, 0));
    b.close().await;
    delete_queue(&http, &queue).await;
}
