//! Each refusal a Redis server that is up can send, produced on test-owned servers and
//! read through the Redis broker: every one is a transient error that keeps the server's
//! reply as its cause, and none reads as a lost lease.

use std::error::Error as _;
use std::time::Duration;

use serde_json::json;
use system_tests::{redis_cli, RedisServer};
use worker_core::{Broker, BrokerError, FetchPlan, NewJob};
use worker_redis::{RedisBroker, RedisConfig};

fn server(args: &[&str]) -> RedisServer {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    RedisServer::start_with(&args, false)
}

async fn broker(port: u16) -> RedisBroker {
    RedisConfig::new(format!("redis://127.0.0.1:{port}"))
        .prefix("refusals")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `result` failed as a transient error whose causes hold `words` of the server's reply.
fn assert_refused<T: std::fmt::Debug>(result: Result<T, BrokerError>, words: &str) {
    let e = match result {
        Ok(v) => panic!("expected a refusal with {words:?}, got {v:?}"),
        Err(e) => e,
    };
    assert!(e.is_transient(), "{words}: permanent: {e}");
    assert!(!matches!(e, BrokerError::LeaseLost { .. }), "{e}");
    let mut causes = String::new();
    let mut source = e.source();
    while let Some(cause) = source {
        causes.push_str(&cause.to_string());
        source = cause.source();
    }
    assert!(causes.contains(words), "{e}: causes {causes:?}");
}

fn job() -> Vec<NewJob> {
    vec![NewJob::json("jobs", &json!({})).unwrap_or_else(|e| panic!("{e}"))]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_refuses_extend_and_enqueue_as_transient() {
    let s = RedisServer::start_with_maxmemory("4mb");
    let b = broker(s.port).await;
    b.enqueue(job()).await.unwrap_or_else(|e| panic!("{e}"));
    let plan = FetchPlan::single("jobs", 1, Duration::from_secs(30));
    let got = b.fetch(&plan).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.len(), 1);
    let reply = redis_cli(s.port, &["debug", "populate", "40", "filler", "100000"]).await;
    assert_eq!(reply, "OK");

    let words = "command not allowed when used memory > 'maxmemory'";
    assert_refused(
        b.extend_lease(&got[0].lease, Duration::from_secs(30)).await,
        words,
    );
    assert_refused(b.enqueue(job()).await, words);
    // The lease is still this delivery's: deletes need no memory, so the ack lands.
    b.ack(&got[0].lease).await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_running_long_makes_every_call_a_transient_busy() {
    let s = server(&["--busy-reply-threshold", "100"]);
    let b = broker(s.port).await;
    b.depth("jobs").await.unwrap_or_else(|e| panic!("{e}"));
    // A script that spins for 2 s on the server's clock.
    let spin = "local t = redis.call('TIME') local s = tonumber(t[1]) \
                while tonumber(redis.call('TIME')[1]) < s + 2 do end return 1";
    let port = s.port;
    let script = tokio::spawn(async move { redis_cli(port, &["eval", spin, "0"]).await });
    worker_core::testing::eventually(Duration::from_secs(5), "the server is busy", || async {
        redis_cli(port, &["ping"]).await.starts_with("BUSY")
    })
    .await;
    assert_refused(b.depth("jobs").await, "Redis is busy running a script");
    assert_eq!(script.await.unwrap_or_else(|e| panic!("{e}")), "1");
    b.depth("jobs").await.unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_refuses_writes_as_transient_readonly() {
    let master = server(&[]);
    let port = master.port.to_string();
    let replica = server(&["--replicaof", "127.0.0.1", &port]);
    let b = broker(replica.port).await;
    assert_refused(
        b.enqueue(job()).await,
        "You can't write against a read only replica",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_replicas_refuse_writes_as_transient_noreplicas() {
    let s = server(&["--min-replicas-to-write", "1"]);
    let b = broker(s.port).await;
    assert_refused(b.enqueue(job()).await, "Not enough good replicas to write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_its_master_refuses_reads_as_transient_masterdown() {
    // Its master's port answers nothing: the link never comes up.
    let gone = system_tests::free_addr().port().to_string();
    let replica = server(&["--replicaof", "127.0.0.1", &gone]);
    let b = broker(replica.port).await;
    b.depth("jobs").await.unwrap_or_else(|e| panic!("{e}"));
    // Set once it answers: a server started with it refuses even the PING that tells
    // it is up.
    let set = ["config", "set", "replica-serve-stale-data", "no"];
    assert_eq!(redis_cli(replica.port, &set).await, "OK");
    assert_refused(b.depth("jobs").await, "Link with MASTER is down");
}
