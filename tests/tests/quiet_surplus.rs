//! `WORKER_QUIET_SURPLUS=true`: three real `demo-worker` processes of one pool on the
//! real Redis. With one long job the pool needs one replica: the two others go quiet
//! (the registry and `worker_quiet` say so, `/readyz` stays 200) and take nothing, and
//! the busy one is never among them. Twelve more jobs bring them back; once those are
//! done they go quiet again. With `WORKER_POD_DELETION_COST=true` as well, the fake
//! Kubernetes API holds 0 for the quiet idle pods and at least 1 for the busy one.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use system_tests::kube_api::FakeCluster;
use system_tests::DemoWorker;
use worker_core::testing::{eventually, unique};
use worker_core::Broker;
use worker_redis::RedisBroker;

const URL: &str = "redis://127.0.0.1:6379";
/// Outlasts the whole scenario after it starts.
const LONG_MS: u64 = 40_000;
const SHORT_MS: u64 = 1_500;
const PATIENCE: Duration = Duration::from_secs(30);

/// One worker's registry entry: `(quiet, in_flight)`.
type Entry = (bool, u32);

struct Pool {
    broker: RedisBroker,
    workers: Vec<DemoWorker>,
    /// Each worker's pod name (with the fake API).
    pods: Vec<String>,
}

impl Pool {
    async fn start(cluster: Option<&FakeCluster>) -> Self {
        let prefix = unique("quiet");
        let broker = system_tests::redis_broker(&prefix).await;
        let (mut workers, mut pods) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let pod = unique("pod");
            let mut env: Vec<(&str, String)> = vec![
                ("REDIS_URL", URL.into()),
                ("REDIS_PREFIX", prefix.clone()),
                ("WORKER_QUEUES", "jobs".into()),
                ("WORKER_QUIET_SURPLUS", "true".into()),
                ("WORKER_HEARTBEAT", "300ms".into()),
                ("WORKER_CONCURRENCY", "2".into()),
                ("WORKER_DRAIN_TIMEOUT", "1s".into()),
            ];
            if let Some(cluster) = cluster {
                env.extend(cluster.worker_env(&pod));
            }
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            workers.push(DemoWorker::start(&env));
            pods.push(pod);
        }
        for w in &workers {
            w.wait_listening().await;
        }
        Self {
            broker,
            workers,
            pods,
        }
    }

    /// Each worker's registry entry, in the order they were started (`None` while it
    /// is not registered).
    async fn registry(&self) -> Vec<Option<Entry>> {
        let listed = self
            .broker
            .list_workers(Some("default"))
            .await
            .unwrap_or_else(|e| panic!("list workers: {e}"));
        let by_pid: HashMap<u32, Entry> = listed
            .iter()
            .map(|w| (w.pid, (w.quiet, w.in_flight)))
            .collect();
        self.workers
            .iter()
            .map(|w| by_pid.get(&w.pid()).copied())
            .collect()
    }

    /// Which workers the registry shows quiet (`None` while one is missing).
    async fn quiet(&self) -> Option<Vec<bool>> {
        self.registry()
            .await
            .into_iter()
            .map(|e| e.map(|(quiet, _)| quiet))
            .collect()
    }

    /// Wait until exactly the workers other than `busy` are quiet.
    async fn wait_all_quiet_but(&self, busy: usize, what: &str) {
        let want: Vec<bool> = (0..self.workers.len()).map(|i| i != busy).collect();
        eventually(PATIENCE, what, || async {
            self.quiet().await.as_ref() == Some(&want)
        })
        .await;
    }

    /// `/readyz` status and the `worker_quiet` gauge of worker `i`.
    async fn http(&self, i: usize) -> (u16, Option<f64>) {
        let w = &self.workers[i];
        let (ready, _) = w.get("/readyz").await;
        let (_, metrics) = w.get("/metrics").await;
        let gauge = metrics
            .lines()
            .find(|l| l.starts_with("worker_quiet{") || l.starts_with("worker_quiet "))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok());
        (ready, gauge)
    }

    /// Jobs worker `i` started so far.
    fn starts(&self, i: usize) -> usize {
        self.workers[i].count("start")
    }

    async fn stop(mut self) {
        for w in &self.workers {
            w.signal("TERM");
        }
        for w in &mut self.workers {
            // The long job outlasts the drain timeout (1 s): it is released.
            let status = w.wait_exit(Duration::from_secs(60)).await;
            assert_eq!(status.code(), Some(0), "{}", w.stderr());
        }
    }
}

async fn scenario(cluster: Option<&FakeCluster>) {
    let pool = Pool::start(cluster).await;
    // Nothing to do: the pool needs 1 of 3 replicas, so 2 are quiet already.
    eventually(PATIENCE, "2 of 3 quiet with nothing to do", || async {
        pool.quiet()
            .await
            .is_some_and(|q| q.iter().filter(|q| **q).count() == 2)
    })
    .await;

    system_tests::enqueue_json(&pool.broker, "jobs", &json!({"sleep_ms": LONG_MS}), 1).await;
    eventually(PATIENCE, "the long job started", || async {
        (0..3).any(|i| pool.starts(i) == 1)
    })
    .await;
    let busy = (0..3)
        .find(|i| pool.starts(*i) == 1)
        .unwrap_or_else(|| panic!("no worker started the long job"));
    let want: Vec<Option<Entry>> = (0..3)
        .map(|i| Some(if i == busy { (false, 1) } else { (true, 0) }))
        .collect();
    eventually(
        PATIENCE,
        "the two idle workers quiet, the busy one not",
        || async { pool.registry().await == want },
    )
    .await;
    // It holds, and everything a quiet worker shows says so.
    for _ in 0..5 {
        assert_eq!(pool.registry().await, want, "busy: {busy}");
        for i in 0..3 {
            let (ready, gauge) = pool.http(i).await;
            assert_eq!(ready, 200, "worker {i}: /readyz");
            let gauge_want = if i == busy { 0.0 } else { 1.0 };
            assert_eq!(gauge, Some(gauge_want), "worker {i}: worker_quiet");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if let Some(cluster) = cluster {
        check_costs(cluster, &pool, busy, "one long job").await;
    }

    // 13 in the backlog: the pool needs 7 replicas, all 3 take jobs.
    let before: Vec<usize> = (0..3).map(|i| pool.starts(i)).collect();
    system_tests::enqueue_json(&pool.broker, "jobs", &json!({"sleep_ms": SHORT_MS}), 12).await;
    eventually(PATIENCE, "every worker taking jobs again", || async {
        (0..3).all(|i| pool.starts(i) > before[i])
    })
    .await;
    eventually(PATIENCE, "the twelve short jobs done", || async {
        pool.workers
            .iter()
            .map(|w| {
                w.events()
                    .iter()
                    .filter(|e| e["event"] == "end" && e["ok"] == true)
                    .count()
            })
            .sum::<usize>()
            == 12
    })
    .await;
    pool.wait_all_quiet_but(busy, "the idle workers quiet again")
        .await;
    for i in (0..3).filter(|i| *i != busy) {
        let log = pool.workers[i].stderr();
        assert!(
            log.contains("quiet: the pool needs 1 of 3 replicas"),
            "{log}"
        );
        assert!(log.contains("resumed: the pool needs"), "{log}");
    }
    if let Some(cluster) = cluster {
        check_costs(cluster, &pool, busy, "after the short jobs").await;
    }
    let d = pool
        .broker
        .depth("jobs")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((d.pending, d.in_flight), (0, 1), "only the long job left");
    pool.stop().await;
}

/// The fake API holds 0 for each quiet idle pod and at least 1 for the busy one.
async fn check_costs(cluster: &FakeCluster, pool: &Pool, busy: usize, when: &str) {
    eventually(PATIENCE, &format!("the annotations {when}"), || async {
        let costs = cluster.api.deletion_costs();
        pool.pods.iter().enumerate().all(|(i, pod)| {
            let cost = costs.get(pod).copied();
            if i == busy {
                cost.is_some_and(|c| c >= 1)
            } else {
                cost == Some(0)
            }
        })
    })
    .await;
    let costs = cluster.api.deletion_costs();
    // The busy pod runs one job and is active: 2 × 1 + 1.
    assert_eq!(costs.get(&pool.pods[busy]), Some(&3), "{costs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn surplus_workers_go_quiet_and_take_jobs_again_when_needed() {
    scenario(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_idle_pods_cost_0_and_the_busy_one_more() {
    let cluster = FakeCluster::start(false).await;
    scenario(Some(&cluster)).await;
    let requests = cluster.api.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.status == 200 && r.pod().is_some()),
        "{requests:?}"
    );
}
