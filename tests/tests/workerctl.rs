//! The real `workerctl` binary against the real Redis: bad input changes nothing and
//! exits 2, jobs enqueued from stdin show in the depth, and dead letters are listed,
//! refused without `--yes` when no one can confirm, and requeued with it; what a job's
//! input wrote into them reaches the terminal escaped.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use system_tests::binary;
use tokio::io::AsyncWriteExt;
use worker_core::testing::unique;
use worker_core::{Broker, FetchPlan, NewJob};
use worker_redis::RedisConfig;

const URL: &str = "redis://127.0.0.1:6379";

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Run `workerctl args` with `env` (and no other broker variable), feeding `stdin`.
async fn workerctl(env: &[(&str, &str)], args: &[&str], stdin: &str) -> Out {
    let mut cmd = tokio::process::Command::new(binary("workerctl"));
    cmd.args(args)
        .env_remove("REDIS_URL")
        .env_remove("AMQP_URL")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("workerctl: {e}"));
    let mut input = child.stdin.take().unwrap_or_else(|| panic!("stdin"));
    input
        .write_all(stdin.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("stdin: {e}"));
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("workerctl {args:?} did not finish"))
        .unwrap_or_else(|e| panic!("workerctl: {e}"));
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn json(out: &Out) -> Value {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", out.stdout, out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workerctl_enqueues_shows_depth_and_manages_dead_letters() {
    let prefix = unique("ctl");
    let queue = "jobs";
    let env = [("REDIS_URL", URL), ("REDIS_PREFIX", prefix.as_str())];

    let none = workerctl(&[], &["depth", queue], "").await;
    assert_eq!(none.code, Some(2), "{}", none.stderr);
    assert!(none.stderr.contains("REDIS_URL"), "{}", none.stderr);

    // One bad payload refuses the whole batch, before anything is sent.
    let bad = workerctl(&env, &["enqueue", queue, r#"{"a":1}"#, "not json"], "").await;
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
    assert!(
        bad.stderr.contains("payload argument 2 is not JSON"),
        "{}",
        bad.stderr
    );
    let depth = workerctl(&env, &["depth", queue, "--json"], "").await;
    assert_eq!(depth.code, Some(0), "{}", depth.stderr);
    assert_eq!(json(&depth)["queues"][queue]["pending"], 0);

    let added = workerctl(
        &env,
        &["enqueue", queue],
        "{\"n\":1}\n\n{\"n\":2}\n{\"n\":3}\n",
    )
    .await;
    assert_eq!(added.code, Some(0), "{}", added.stderr);
    let ids: Vec<&str> = added.stdout.lines().collect();
    assert_eq!(ids.len(), 3, "{}", added.stdout);
    let table = workerctl(&env, &["depth", queue], "").await;
    assert!(
        table
            .stdout
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("jobs") && l.split_whitespace().nth(1) == Some("3")),
        "{}",
        table.stdout
    );

    // A dead letter, made the way a worker makes one.
    let b = RedisConfig::new(URL)
        .prefix(&prefix)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let got = b
        .fetch(&FetchPlan::single(queue, 1, Duration::from_secs(30)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.dead_letter(&got[0].lease, "handler said the input was wrong")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let list = workerctl(&env, &["dead", "list", queue, "--json"], "").await;
    assert_eq!(list.code, Some(0), "{}", list.stderr);
    let dead = json(&list);
    assert_eq!(dead[0]["id"], got[0].envelope.id.as_str());
    assert_eq!(dead[0]["reason"], "handler said the input was wrong");

    // No terminal to ask and no --yes: refused, nothing changed.
    let refused = workerctl(&env, &["dead", "purge", queue], "y\n").await;
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    assert!(refused.stderr.contains("--yes"), "{}", refused.stderr);
    assert_eq!(b.depth(queue).await.map(|d| d.dead).ok(), Some(1));

    let requeued = workerctl(&env, &["dead", "requeue", queue, "--yes", "--json"], "").await;
    assert_eq!(requeued.code, Some(0), "{}", requeued.stderr);
    assert_eq!(json(&requeued)["count"], 1);
    let d = json(&workerctl(&env, &["depth", queue, "--json"], "").await);
    assert_eq!(d["queues"][queue]["pending"], 3);
    assert_eq!(d["queues"][queue]["dead"], 0);

    let workers = workerctl(&env, &["workers", "--json"], "").await;
    assert_eq!(workers.code, Some(0), "{}", workers.stderr);
    assert_eq!(json(&workers), serde_json::json!([]));

    // A broker that does not answer: exit 1 with the reason, not a panic.
    let down = workerctl(
        &[("REDIS_URL", "redis://127.0.0.1:1"), ("REDIS_PREFIX", "x")],
        &["depth", queue],
        "",
    )
    .await;
    assert_eq!(down.code, Some(1), "{}", down.stderr);
    assert!(down.stderr.contains("workerctl:"), "{}", down.stderr);
}

/// What a job's input controls reaches the operator's terminal escaped: a dead
/// letter's reason and payload with escape sequences (retitle, clear, clipboard, a C1
/// CSI), a line separator and bidi overrides. The table shows them as visible escapes
/// on one line; `--json` carries them exactly, as JSON escapes, never as raw bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workerctl_shows_terminal_escapes_from_a_dead_letter_escaped_never_raw() {
    let prefix = unique("ctl-esc");
    let queue = "jobs";
    let env = [("REDIS_URL", URL), ("REDIS_PREFIX", prefix.as_str())];
    let reason = "\x1b]0;pwned\x07\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07\u{9b}31m \
                  \u{202e}gnp.exe\u{2069} line\u{2028}two\nthree\x7f";
    let payload = "{\"note\":\"\x1b[2J\u{202e}\x07\"}";

    let b = system_tests::redis_broker(&prefix).await;
    b.enqueue(vec![NewJob::new(queue, payload.as_bytes().to_vec())])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let got = b
        .fetch(&FetchPlan::single(queue, 1, Duration::from_secs(30)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.dead_letter(&got[0].lease, reason)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let raw = |out: &str| {
        [
            '\x1b', '\x07', '\x7f', '\u{9b}', '\u{2028}', '\u{202e}', '\u{2069}',
        ]
        .into_iter()
        .filter(|c| out.contains(*c))
        .map(|c| format!("{c:?}"))
        .collect::<Vec<_>>()
    };
    let table = workerctl(&env, &["dead", "list", queue], "").await;
    assert_eq!(table.code, Some(0), "{}", table.stderr);
    assert_eq!(
        raw(&table.stdout),
        Vec::<String>::new(),
        "{:?}",
        table.stdout
    );
    assert_eq!(table.stdout.lines().count(), 2, "{:?}", table.stdout);
    let row = table.stdout.lines().nth(1).unwrap_or_default();
    assert!(row.starts_with(got[0].envelope.id.as_str()), "{row:?}");
    assert!(
        row.ends_with(
            r"\x1b]0;pwned\x07\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07\u{9b}31m \u{202e}gnp.exe\u{2069} line\u{2028}two\nthree\x7f"
        ),
        "{row:?}"
    );

    let list = workerctl(&env, &["dead", "list", queue, "--json"], "").await;
    assert_eq!(list.code, Some(0), "{}", list.stderr);
    assert_eq!(raw(&list.stdout), Vec::<String>::new(), "{:?}", list.stdout);
    let dead = json(&list);
    assert_eq!(dead[0]["id"], got[0].envelope.id.as_str());
    assert_eq!(dead[0]["reason"], reason, "{dead}");
    assert_eq!(dead[0]["payload"], payload, "{dead}");
}

/// A GET on the exporter: status and body (status 0 when it does not answer).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    worker_core::testing::http_get(addr, path)
        .await
        .unwrap_or((0, String::new()))
}

async fn exporter(
    args: &[&str],
    env: &[(&str, &str)],
) -> (tokio::process::Child, std::net::SocketAddr) {
    system_tests::start_exporter(args, env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exporter_serves_the_pool_s_backlog_and_an_error_while_the_broker_is_down() {
    let mut redis = system_tests::RedisServer::start();
    let url = redis.url();
    let b = RedisConfig::new(&url)
        .prefix("exp")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    system_tests::enqueue_json(&b, "a", &serde_json::json!({}), 4).await;
    system_tests::enqueue_json(&b, "b", &serde_json::json!({}), 3).await;
    // One job of `a` in flight: it counts.
    b.fetch(&FetchPlan::single("a", 1, Duration::from_secs(300)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let (mut exporter, addr) = exporter(
        &[
            "--pool",
            "gpu",
            "--queues",
            "a,b",
            "--capacity",
            "2",
            "--max-replicas",
            "3",
        ],
        &[("REDIS_URL", url.as_str()), ("REDIS_PREFIX", "exp")],
    )
    .await;

    let (status, body) = get(addr, "/scaling").await;
    assert_eq!(status, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(doc["pool"], "gpu");
    assert_eq!(doc["backlog"], 7, "{doc}");
    assert_eq!(doc["queues"]["a"]["in_flight"], 1, "{doc}");
    assert_eq!(doc["capacity_per_replica"], 2);
    // ceil(7 / 2) = 4, clamped to --max-replicas 3.
    assert_eq!(doc["desired_replicas"], 3, "{doc}");
    let (status, metrics) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("worker_queue_backlog{")
                && l.contains("queue=\"b\"")
                && l.ends_with(" 3")),
        "{metrics}"
    );

    // The broker goes away: an error the autoscaler sees as one, never a 0.
    redis.stop();
    // A reading is shared for up to a second: the error shows within a few.
    worker_core::testing::eventually(Duration::from_secs(10), "503 while down", || async {
        let (status, body) = get(addr, "/scaling").await;
        status == 503 && body.contains("error")
    })
    .await;
    assert_eq!(get(addr, "/livez").await.0, 200);
    redis.start_again();
    worker_core::testing::eventually(Duration::from_secs(30), "recovers", || async {
        let (status, body) = get(addr, "/scaling").await;
        status == 200 && body.contains("\"backlog\":7")
    })
    .await;

    // It never touches a job: the queues are as they were.
    worker_core::testing::eventually(
        Duration::from_secs(20),
        "3 pending, 1 in flight",
        || async {
            // The test's own connection reconnects on its first call after the restart.
            b.depth("a")
                .await
                .is_ok_and(|d| (d.pending, d.in_flight) == (3, 1))
        },
    )
    .await;
    let _ = exporter.start_kill();
    let _ = exporter.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exporter_started_while_rabbitmq_is_unreachable_answers_503_and_stays_up() {
    // Nothing listens on port 1.
    let (mut exporter, addr) = exporter(
        &["--queues", "jobs"],
        &[("AMQP_URL", "amqp://guest:s3cret@127.0.0.1:1/%2f")],
    )
    .await;
    for _ in 0..2 {
        let (status, body) = get(addr, "/scaling").await;
        assert_eq!(status, 503, "{body}");
        // Generic: the broker's address and user stay in the exporter's log.
        assert!(body.contains("broker unavailable"), "{body}");
        assert!(
            !body.contains("s3cret") && !body.contains("127.0.0.1"),
            "{body}"
        );
    }
    assert!(
        exporter.try_wait().ok().flatten().is_none(),
        "the exporter exited"
    );
    let _ = exporter.start_kill();
    let _ = exporter.wait().await;
}

/// The registry as `workerctl workers` shows it: a live worker is listed with what it
/// wrote, is still listed after its first TTL has passed (its beats renew it), and is
/// gone once it has drained and deregistered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workerctl_lists_live_workers_while_they_beat_and_not_after_they_leave() {
    let prefix = unique("ctlw");
    let env = [("REDIS_URL", URL), ("REDIS_PREFIX", prefix.as_str())];
    let listed = || async {
        let out = workerctl(&env, &["workers", "--json"], "").await;
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        json(&out)
    };
    assert_eq!(listed().await, serde_json::json!([]));

    // A heartbeat of 300 ms gives a TTL of 900 ms.
    let mut worker = system_tests::DemoWorker::start(&[
        ("REDIS_URL", URL),
        ("REDIS_PREFIX", prefix.as_str()),
        ("WORKER_POOL", "ctl-pool"),
        ("WORKER_QUEUES", "alpha,beta"),
        ("WORKER_CONCURRENCY", "3"),
        ("WORKER_HEARTBEAT", "300ms"),
    ]);
    worker_core::testing::eventually(Duration::from_secs(30), "the worker is listed", || async {
        listed().await.as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
    let first = listed().await;
    let w = &first[0];
    assert_eq!(w["pool"], "ctl-pool", "{first}");
    assert_eq!(w["queues"], serde_json::json!(["alpha", "beta"]), "{first}");
    assert_eq!(w["concurrency"], 3, "{first}");
    assert_eq!(w["pid"], worker.pid(), "{first}");
    assert_eq!(w["draining"], false, "{first}");
    assert_eq!(w["quiet"], false, "{first}");

    // Three TTLs later it is still there, beaten within the last TTL: the beats renew
    // its entry, which would have expired 900 ms after a single registration.
    tokio::time::sleep(Duration::from_millis(2700)).await;
    let later = listed().await;
    assert_eq!(
        later.as_array().map(Vec::len),
        Some(1),
        "{first} then {later}"
    );
    assert_eq!(later[0]["id"], w["id"], "{first} then {later}");
    assert!(
        later[0]["beat_age_s"].as_f64().unwrap_or(f64::MAX) < 0.9,
        "the beat was not renewed: {first} then {later}"
    );

    worker.signal("TERM");
    worker.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(listed().await, serde_json::json!([]));
}

/// Passwords reach neither the help text, nor an error about a malformed URL, nor the
/// command line; a URL in a mounted file works like one in the variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workerctl_never_shows_a_password_and_reads_the_url_from_a_file() {
    let secret = "s3cret-Pa55";
    let with_secret = format!("redis://app:{secret}@127.0.0.1:6379");
    let help = workerctl(&[("REDIS_URL", with_secret.as_str())], &["--help"], "").await;
    assert_eq!(help.code, Some(0), "{}", help.stderr);
    assert!(!help.stdout.contains(secret), "{}", help.stdout);

    for (variable, bad) in [
        ("REDIS_URL", format!("redis:/app:{secret}@127.0.0.1:6379")),
        (
            "AMQP_URL",
            format!("amqp:/guest:{secret}@127.0.0.1:5672/%2f"),
        ),
    ] {
        let out = workerctl(&[(variable, bad.as_str())], &["depth", "q"], "").await;
        assert_eq!(out.code, Some(2), "{variable}: {}", out.stderr);
        assert!(out.stderr.contains(variable), "{}", out.stderr);
        assert!(!out.stderr.contains(secret), "{}", out.stderr);
    }

    let flag = workerctl(&[], &["--redis-url", &with_secret, "depth", "q"], "").await;
    assert_eq!(flag.code, Some(2), "{}", flag.stderr);
    assert!(flag.stderr.contains("REDIS_URL_FILE"), "{}", flag.stderr);
    assert!(!flag.stderr.contains(secret), "{}", flag.stderr);

    let dir = std::env::temp_dir().join(unique("ctl-secret"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let file = dir.join("url");
    std::fs::write(&file, format!("{URL}\n")).unwrap_or_else(|e| panic!("{e}"));
    let path = file.display().to_string();
    let prefix = unique("ctl-file");
    let env = [
        ("REDIS_URL_FILE", path.as_str()),
        ("REDIS_PREFIX", prefix.as_str()),
    ];
    let enqueued = workerctl(&env, &["enqueue", "jobs", "{}"], "").await;
    assert_eq!(enqueued.code, Some(0), "{}", enqueued.stderr);
    let depth = workerctl(&env, &["depth", "jobs", "--json"], "").await;
    assert_eq!(depth.code, Some(0), "{}", depth.stderr);
    assert_eq!(
        json(&depth)["queues"]["jobs"]["pending"],
        1,
        "{}",
        depth.stdout
    );
    let both = [("REDIS_URL_FILE", path.as_str()), ("REDIS_URL", URL)];
    let out = workerctl(&both, &["depth", "jobs"], "").await;
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("REDIS_URL_FILE"), "{}", out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}
