//! A three-node RabbitMQ cluster of the test's own (node names, ports and data
//! directories of its own, joined with `rabbitmqctl join_cluster`), a quorum queue,
//! and workers given every node's address: the node leading the queue is stopped
//! under load, and every job, by id, still runs.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use system_tests::{DemoWorker, RabbitCluster};
use worker_amqp::{AmqpBroker, AmqpConfig, QueueType};
use worker_core::testing::unique;
use worker_core::{Broker, NewJob};

/// Enqueue `n` jobs with ids `{tag}-0…`, one call each, retrying transient failures
/// (the node the broker talks to may be stopping) with the same ids.
async fn enqueue(b: &AmqpBroker, queue: &str, tag: &str, n: usize) -> Result<Vec<String>, String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{tag}-{i}");
        let started = Instant::now();
        let mut tries = 0;
        loop {
            tries += 1;
            let job = NewJob::new(queue, json!({"sleep_ms": 100}).to_string()).id(id.as_str());
            match b.enqueue(vec![job]).await {
                Ok(_) => break,
                Err(e) if e.is_transient() && started.elapsed() < Duration::from_secs(60) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(format!(
                        "enqueue {id}: {} (after {tries} tries in {:?})",
                        worker_core::error::chain(&e),
                        started.elapsed()
                    ))
                }
            }
        }
        ids.push(id);
    }
    Ok(ids)
}

/// The last lines of every node's log, for a failure's message.
fn node_logs(cluster: &RabbitCluster) -> String {
    let mut out = String::new();
    for node in &cluster.nodes {
        let Ok(dir) = std::fs::read_dir(node.log_dir()) else {
            continue;
        };
        for entry in dir.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            out.push_str(&format!("--- {} {:?}\n{tail}\n", node.name(), entry.path()));
        }
    }
    out
}

fn ended_ok(workers: &[DemoWorker]) -> HashSet<String> {
    workers
        .iter()
        .flat_map(|w| w.events())
        .filter(|e| e["event"] == "end" && e["ok"] == true)
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_node_that_leads_a_quorum_queue_loses_no_job() {
    let started = Instant::now();
    let mut cluster = RabbitCluster::start(3).await;
    let formed = started.elapsed();
    let queue = unique("qq");
    let broker = Arc::new(
        AmqpConfig::new(cluster.urls_from(0))
            .default_queue_type(QueueType::Quorum)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let mut ids = enqueue(&broker, &queue, "before", 300)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node_logs(&cluster)));
    let leader = cluster.leader_of(0, &queue).await;

    // The first worker is connected to the leader, the second to another node.
    let lists: Vec<String> = [leader, (leader + 1) % 3]
        .iter()
        .map(|&i| cluster.urls_from(i))
        .collect();
    let workers: Vec<DemoWorker> = lists
        .iter()
        .map(|urls| {
            DemoWorker::start(&[
                ("AMQP_URL", urls.as_str()),
                ("AMQP_QUEUE_TYPE", "quorum"),
                ("WORKER_QUEUES", queue.as_str()),
                ("WORKER_CONCURRENCY", "4"),
            ])
        })
        .collect();
    worker_core::testing::eventually(Duration::from_secs(60), "jobs flow", || async {
        ended_ok(&workers).len() >= 40
    })
    .await;

    // Under load: jobs running and waiting, and a producer enqueueing, when the
    // leader stops.
    let producer = {
        let (broker, queue) = (broker.clone(), queue.clone());
        tokio::spawn(async move { enqueue(&broker, &queue, "during", 100).await })
    };
    let stopped_name = cluster.nodes[leader].name();
    let done_before = ended_ok(&workers).len();
    let t = Instant::now();
    cluster.nodes[leader].stop();
    let stop_took = t.elapsed();
    let survivor = (leader + 1) % 3;
    let new_leader = cluster.leader_of(survivor, &queue).await;
    assert_ne!(new_leader, leader, "a surviving node leads the queue");
    let during = producer.await.unwrap_or_else(|e| panic!("{e}"));
    ids.extend(during.unwrap_or_else(|e| panic!("{e}\n{}", node_logs(&cluster))));

    let want: HashSet<String> = ids.iter().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !want.is_subset(&ended_ok(&workers)) {
        if Instant::now() > deadline {
            let done = ended_ok(&workers);
            let missing: Vec<&String> = ids.iter().filter(|id| !done.contains(*id)).collect();
            let depth = broker.depth(&queue).await;
            panic!(
                "{} of {} jobs never ended ok within 120 s: {missing:?}; depth {depth:?}; \
                 worker logs:\n{}\n---\n{}",
                missing.len(),
                ids.len(),
                workers[0].stderr(),
                workers[1].stderr()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = ended_ok(&workers);
    let lost: Vec<&String> = ids.iter().filter(|id| !done.contains(*id)).collect();
    let starts: usize = workers.iter().map(|w| w.count("start")).sum();
    println!(
        "rabbitmq cluster: formed in {formed:?}; stopped {stopped_name} (leader of {queue}) with \
         {done_before} of {} jobs done, in {stop_took:?}; {} leads now; {} jobs ended ok, \
         {} starts in all, lost {}; test took {:?}",
        ids.len(),
        cluster.nodes[new_leader].name(),
        done.len(),
        starts,
        lost.len(),
        started.elapsed()
    );
    assert!(lost.is_empty(), "lost {lost:?}");
    let log = workers[0].stderr();
    assert!(
        log.contains("amqp: reconnected"),
        "the worker on the stopped node moved to another address:\n{log}"
    );
    let depth = broker.depth(&queue).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (depth.pending, depth.delayed, depth.dead),
        (0, 0, 0),
        "{depth:?}"
    );
    for mut w in workers {
        let log = w.stderr();
        assert!(!log.contains("panicked"), "{log}");
        w.signal("TERM");
        assert_eq!(
            w.wait_exit(Duration::from_secs(30)).await.code(),
            Some(0),
            "{log}"
        );
    }
}
