//! Redis Cluster, each cluster the test's own (started from the installed
//! `redis-server` on loopback ports of its own, stopped afterwards): the conformance
//! suite on three masters; a master killed with -9 under load on three masters with a
//! replica each, where the workers follow the promoted replica and every job lost to
//! asynchronous replication is named; and `RedisConfig::wait_replicas`, which closes
//! that window for enqueues.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use system_tests::{DemoWorker, RedisCluster};
use worker_core::testing::unique;
use worker_core::{Broker, BrokerError, FetchPlan, FetchShare, NewJob};
use worker_redis::{RedisBroker, RedisConfig};

/// How long a silent master takes to be failed over: short, for a quick test, and
/// long enough that a loaded machine does not fail masters over by itself.
const NODE_TIMEOUT: Duration = Duration::from_millis(1500);

fn cluster_broker(cluster: &RedisCluster, prefix: &str) -> RedisConfig {
    RedisConfig::cluster(cluster.urls()).prefix(prefix)
}

async fn connect(config: RedisConfig) -> RedisBroker {
    config.connect().await.unwrap_or_else(|e| panic!("{e}"))
}

/// A key of `queue`'s slot (every key of a queue shares its hash tag).
fn queue_key(prefix: &str, queue: &str) -> String {
    format!("{{{prefix}:{queue}}}:pending")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes_on_a_three_master_cluster() {
    let cluster = RedisCluster::start(3, 0, Duration::from_secs(5)).await;
    let b = connect(cluster_broker(&cluster, &unique("cluster"))).await;
    worker_core::testing::run_all(&b).await;

    // Queues hash to different slots, so they spread over the masters.
    for i in 0..30 {
        b.enqueue(vec![NewJob::new(format!("spread-{i}"), "x")])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let used = cluster
        .nodes
        .iter()
        .filter(|n| n.cli(&["dbsize"]).parse::<u64>().unwrap_or(0) > 0)
        .count();
    assert_eq!(used, 3, "every master should hold some queues");
}

/// One acknowledged enqueue of a producer: the job, its queue, and whether its
/// replicas confirmed it.
#[derive(Clone, Debug)]
struct Acked {
    id: String,
    queue: String,
    waited: bool,
    /// Acknowledged after the promotion was seen.
    after_promotion: bool,
}

#[derive(Default)]
struct Produced {
    acked: Mutex<Vec<Acked>>,
    /// Ids whose enqueue failed (not acknowledged: they may or may not exist).
    refused: Mutex<Vec<String>>,
    promoted: AtomicBool,
    stop: AtomicBool,
}

/// Enqueue 4 jobs per call, round robin over `queues`, until told to stop.
async fn produce(broker: RedisBroker, name: &'static str, queues: Vec<String>, out: Arc<Produced>) {
    let waited = broker_waits(name);
    let mut i = 0usize;
    while !out.stop.load(Ordering::Relaxed) {
        let queue = &queues[i % queues.len()];
        let ids: Vec<String> = (0..4).map(|k| format!("{name}-{i}-{k}")).collect();
        let jobs = ids
            .iter()
            .map(|id| {
                NewJob::new(queue.as_str(), json!({"sleep_ms": 5}).to_string()).id(id.as_str())
            })
            .collect();
        match broker.enqueue(jobs).await {
            Ok(_) => {
                let after_promotion = out.promoted.load(Ordering::SeqCst);
                out.acked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(ids.into_iter().map(|id| Acked {
                        id,
                        queue: queue.clone(),
                        waited,
                        after_promotion,
                    }));
            }
            Err(e) => {
                assert!(e.is_transient(), "{name}: {e}");
                out.refused
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(ids);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        i += 1;
        // Keep the backlog small enough for two workers to follow.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn broker_waits(name: &str) -> bool {
    name == "waited"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_fails_over_and_only_unconfirmed_enqueues_are_lost() {
    let started = Instant::now();
    let mut cluster = RedisCluster::start(3, 1, NODE_TIMEOUT).await;
    let prefix = unique("failover");
    let queues: Vec<String> = (0..6).map(|i| format!("q{i}")).collect();
    let nodes = cluster.urls().join(",");
    let joined = queues.join(",");
    let workers: Vec<DemoWorker> = (0..2)
        .map(|_| {
            DemoWorker::start(&[
                ("REDIS_CLUSTER_NODES", nodes.as_str()),
                ("REDIS_PREFIX", prefix.as_str()),
                ("WORKER_QUEUES", joined.as_str()),
                ("WORKER_CONCURRENCY", "8"),
                ("WORKER_LEASE", "3s"),
                ("WORKER_MAX_ATTEMPTS", "20"),
            ])
        })
        .collect();
    for w in &workers {
        w.wait_listening().await;
    }
    let plain = connect(cluster_broker(&cluster, &prefix)).await;
    let waited =
        connect(cluster_broker(&cluster, &prefix).wait_replicas(1, Duration::from_secs(1))).await;
    let out = Arc::new(Produced::default());
    let producers = [
        tokio::spawn(produce(plain, "plain", queues.clone(), out.clone())),
        tokio::spawn(produce(waited, "waited", queues.clone(), out.clone())),
    ];
    let ended = |workers: &[DemoWorker]| -> usize { workers.iter().map(|w| w.count("end")).sum() };
    worker_core::testing::eventually(Duration::from_secs(60), "jobs flow", || async {
        ended(&workers) >= 300
    })
    .await;

    // The master of q0's slot dies without a word; its replica takes over.
    let (master, replicas) = cluster.master_of(&queue_key(&prefix, "q0"), &[]);
    let replica = replicas[0];
    let dead_queues: HashSet<String> = queues
        .iter()
        .filter(|q| cluster.master_of(&queue_key(&prefix, q), &[]).0 == master)
        .cloned()
        .collect();
    let before_kill = ended(&workers);
    let killed_at = Instant::now();
    cluster.node(master).kill();
    cluster
        .wait_promoted(replica, Duration::from_secs(60))
        .await;
    out.promoted.store(true, Ordering::SeqCst);
    let failover = killed_at.elapsed();
    let (now_master, _) = cluster.master_of(&queue_key(&prefix, "q0"), &[master]);
    assert_eq!(
        now_master, replica,
        "q0's slot moved to the promoted replica"
    );

    // The workers carry on on the new topology: jobs of the dead master's queues
    // enqueued after the promotion run.
    let promoted_at = ended(&workers);
    worker_core::testing::eventually(
        Duration::from_secs(60),
        "jobs flow after the failover",
        || async {
            let acked = out.acked.lock().unwrap().clone();
            let after: HashSet<&str> = acked
                .iter()
                .filter(|a| a.after_promotion && dead_queues.contains(&a.queue))
                .map(|a| a.id.as_str())
                .collect();
            let ran = workers
                .iter()
                .flat_map(|w| w.events())
                .filter(|e| e["event"] == "end" && after.contains(e["id"].as_str().unwrap_or("")))
                .count();
            ran >= 50
        },
    )
    .await;
    out.stop.store(true, Ordering::SeqCst);
    for p in producers {
        p.await.unwrap();
    }

    // Settle: the jobs whose leases died with the master come back after the lease.
    let check = connect(cluster_broker(&cluster, &prefix)).await;
    worker_core::testing::eventually(Duration::from_secs(90), "every queue settled", || async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut busy = 0;
        for q in &queues {
            match check.depth(q).await {
                Ok(d) => busy += d.pending + d.in_flight + d.delayed,
                Err(e) => {
                    assert!(e.is_transient(), "{e}");
                    return false;
                }
            }
        }
        busy == 0
    })
    .await;

    // Account for every acknowledged job by id: ended ok, dead, or lost.
    let acked = out.acked.lock().unwrap().clone();
    let refused = out.refused.lock().unwrap().clone();
    let mut ok: HashMap<String, usize> = HashMap::new();
    for w in &workers {
        for e in w.events() {
            if e["event"] == "end" && e["ok"] == true {
                *ok.entry(e["id"].as_str().unwrap_or("").to_owned())
                    .or_default() += 1;
            }
        }
    }
    let mut dead = HashSet::new();
    for q in &queues {
        for d in check.dead_letters(q, 100_000).await.unwrap() {
            dead.insert(d.envelope.id.to_string());
        }
    }
    let lost: Vec<&Acked> = acked
        .iter()
        .filter(|a| !ok.contains_key(&a.id) && !dead.contains(&a.id))
        .collect();
    let waited_total = acked.iter().filter(|a| a.waited).count();
    let refused_ran = refused.iter().filter(|id| ok.contains_key(*id)).count();
    let twice = ok.values().filter(|n| **n > 1).count();
    println!(
        "failover: {} jobs acknowledged ({} confirmed by a replica, {} not), {} refused during \
         the failover ({} of them ran anyway); killed master {master} with {before_kill} jobs \
         done, replica {replica} promoted after {failover:?} ({promoted_at} done by then); \
         lost {} (ids {:?}), dead {}, run more than once {twice}; test took {:?}",
        acked.len(),
        waited_total,
        acked.len() - waited_total,
        refused.len(),
        refused_ran,
        lost.len(),
        lost.iter().map(|a| a.id.as_str()).collect::<BTreeSet<_>>(),
        dead.len(),
        started.elapsed()
    );
    for a in &lost {
        assert!(!a.waited, "a job its replica had confirmed was lost: {a:?}");
        assert!(
            dead_queues.contains(&a.queue),
            "a job of a master that stayed up was lost: {a:?}"
        );
        assert!(
            !a.after_promotion,
            "a job acknowledged after the failover was lost: {a:?}"
        );
    }
    assert!(dead.is_empty(), "no job should die: {dead:?}");
    for w in &workers {
        let log = w.stderr();
        assert!(!log.contains("panicked"), "{log}");
    }
    for mut w in workers {
        w.signal("TERM");
        let status = w.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(status.code(), Some(0), "{}", w.stderr());
    }
}

/// Cut `master`'s link to its stopped replica: the master drops a replica whose
/// output buffer passes 256 KiB, so write whole-megabyte values to a key of its own
/// until it reports no replica.
fn cut_replication(cluster: &RedisCluster, master: u16, key_tag: &str) {
    let node = cluster
        .nodes
        .iter()
        .find(|n| n.port == master)
        .unwrap_or_else(|| panic!("no node {master}"));
    assert_eq!(
        node.cli(&[
            "config",
            "set",
            "client-output-buffer-limit",
            "replica 256kb 0 0"
        ]),
        "OK"
    );
    let filler = format!("{key_tag}:filler");
    let mb = vec![b'x'; 1 << 20];
    for _ in 0..200 {
        if node
            .cli(&["info", "replication"])
            .contains("connected_slaves:0")
        {
            return;
        }
        let mut child = std::process::Command::new("redis-cli")
            .args(["-p", &master.to_string(), "-x", "append", &filler])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-cli: {e}"));
        use std::io::Write;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&mb)
                .unwrap_or_else(|e| panic!("redis-cli stdin: {e}"));
        }
        child.wait().unwrap_or_else(|e| panic!("redis-cli: {e}"));
    }
    panic!("the master kept its replica after 200 MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enqueue_its_replica_confirmed_survives_the_masters_kill() {
    let started = Instant::now();
    let mut cluster = RedisCluster::start(3, 1, NODE_TIMEOUT).await;
    let prefix = unique("wait");
    let queue = "jobs";
    let plain = connect(cluster_broker(&cluster, &prefix)).await;
    let waited =
        connect(cluster_broker(&cluster, &prefix).wait_replicas(1, Duration::from_millis(500)))
            .await;
    let job = |id: &str| vec![NewJob::new(queue, "{}").id(id)];

    // What the wait costs, on a healthy cluster: one job per call in turn, and 32
    // callers at once (their enqueues share script calls and waits).
    for (name, b) in [("plain", &plain), ("waited", &waited)] {
        let n = 300;
        let t = Instant::now();
        for i in 0..n {
            b.enqueue(job(&format!("{name}-seq-{i}"))).await.unwrap();
        }
        let sequential = t.elapsed() / n;
        let t = Instant::now();
        let calls = (0..n).map(|i| b.enqueue(job(&format!("{name}-par-{i}"))));
        let all = futures_join(calls, 32).await;
        assert!(all.iter().all(Result::is_ok), "{all:?}");
        println!(
            "enqueue cost ({name}): {sequential:?} per job one at a time, {:?} per job with 32 \
             callers at once",
            t.elapsed() / n
        );
    }

    let (master, replicas) = cluster.master_of(&queue_key(&prefix, queue), &[]);
    let replica = replicas[0];
    waited.enqueue(job("confirmed")).await.unwrap();

    // The replica stops taking the master's stream; the master drops it. From here
    // on the master acknowledges writes its replica never receives.
    cluster.node(replica).signal("STOP");
    cut_replication(&cluster, master, &format!("{{{prefix}:{queue}}}"));
    plain.enqueue(job("unconfirmed")).await.unwrap();
    let refused = waited.enqueue(job("refused")).await;
    match &refused {
        Err(e @ BrokerError::Unavailable { .. }) => {
            assert!(e.to_string().contains("confirmed by 0 of the 1"), "{e}")
        }
        other => panic!("an enqueue no replica confirmed was acknowledged: {other:?}"),
    }

    cluster.node(master).kill();
    cluster.node(replica).signal("CONT");
    cluster
        .wait_promoted(replica, Duration::from_secs(60))
        .await;

    let check = connect(cluster_broker(&cluster, &prefix)).await;
    let mut present = BTreeSet::new();
    worker_core::testing::eventually(
        Duration::from_secs(30),
        "the new master answers",
        || async {
            match check.depth(queue).await {
                Ok(_) => true,
                Err(e) => {
                    assert!(e.is_transient(), "{e}");
                    false
                }
            }
        },
    )
    .await;
    let plan = worker_core::FetchPlan::single(queue, 10_000, Duration::from_secs(60));
    for d in check.fetch(&plan).await.unwrap() {
        present.insert(d.envelope.id.to_string());
    }
    println!(
        "after the kill: confirmed survived {}, unconfirmed survived {}, refused present {} \
         (test took {:?})",
        present.contains("confirmed"),
        present.contains("unconfirmed"),
        present.contains("refused"),
        started.elapsed()
    );
    assert!(
        present.contains("confirmed"),
        "the enqueue its replica confirmed was lost"
    );
    assert!(
        !present.contains("unconfirmed"),
        "the replica had the write it never received: the test did not open the window"
    );
}

/// Run `calls` with at most `width` at once; their results in order.
async fn futures_join<F, T>(calls: impl Iterator<Item = F>, width: usize) -> Vec<T>
where
    F: std::future::Future<Output = T>,
{
    use futures::stream::StreamExt;
    futures::stream::iter(calls).buffered(width).collect().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_cluster_node_list_stops_the_worker_naming_the_variable() {
    let mut w = DemoWorker::start(&[
        ("REDIS_CLUSTER_NODES", "127.0.0.1:7000,127.0.0.1:7001"),
        ("WORKER_QUEUES", "jobs"),
    ]);
    let status = w.wait_exit(Duration::from_secs(30)).await;
    let log = w.stderr();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("REDIS_CLUSTER_NODES") && log.contains("redis://host:7000,redis://host:7001"),
        "{log}"
    );
}

/// A cluster fetch calls one queue at a time, and each call leases what it returns: a
/// later queue's failing call must not drop what the earlier calls leased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_queue_does_not_drop_jobs_leased_from_the_queues_before_it() {
    let cluster = RedisCluster::start(3, 0, Duration::from_secs(5)).await;
    let prefix = unique("partial");
    let b = connect(cluster_broker(&cluster, &prefix)).await;
    b.enqueue(vec![NewJob::new("good", "x"), NewJob::new("good", "y")])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The broken queue's pending list is a string, so its fetch script fails with
    // WRONGTYPE on whichever master holds it.
    let out = std::process::Command::new("redis-cli")
        .args(["-c", "-p", &cluster.nodes[0].port.to_string()])
        .args(["set", &format!("{{{prefix}:broken}}:pending"), "not a list"])
        .output()
        .unwrap_or_else(|e| panic!("redis-cli: {e}"));
    assert!(out.status.success(), "{out:?}");
    let lease = Duration::from_secs(30);
    let plan = |first: &str, second: &str| {
        FetchPlan::new(
            vec![FetchShare::new(first, 2, 2), FetchShare::new(second, 2, 2)],
            4,
            lease,
        )
    };

    // The broken queue first: nothing is leased, so the fetch fails and the good
    // queue is untouched.
    let e = b
        .fetch(&plan("broken", "good"))
        .await
        .expect_err("a fetch that leased nothing reports the failure");
    assert!(e.to_string().contains("WRONGTYPE"), "{e}");
    let d = b.depth("good").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((d.pending, d.in_flight), (2, 0));

    // The broken queue second: the jobs leased from the good queue are handed out.
    let got = b
        .fetch(&plan("good", "broken"))
        .await
        .unwrap_or_else(|e| panic!("the jobs leased before the failing queue are lost: {e}"));
    assert_eq!(got.len(), 2);
    for d in &got {
        assert_eq!(d.envelope.attempt, 1);
        b.ack(&d.lease).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let d = b.depth("good").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d.backlog(), 0);
    drop(cluster);
}
