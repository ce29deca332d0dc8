//! Helpers for system tests: build and start real worker processes, follow their
//! event lines, send them signals, and wait for their exit.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

/// Path of a workspace binary, built once per test process.
pub fn binary(package: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|p| p == package) {
        // Without the variables cargo sets for this test process: build scripts that
        // watch them (ring's watches CARGO_MANIFEST_DIR) would rebuild here, and again
        // in the next `cargo test`.
        let mut cargo = std::process::Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet", "-p", package]);
        for (key, _) in std::env::vars_os() {
            let set_for_tests = key.to_str().is_some_and(|k| {
                k.starts_with("CARGO_PKG_")
                    || k.starts_with("CARGO_MANIFEST_")
                    || [
                        "CARGO_CRATE_NAME",
                        "CARGO_PRIMARY_PACKAGE",
                        "CARGO_TARGET_TMPDIR",
                    ]
                    .contains(&k)
            });
            if set_for_tests {
                cargo.env_remove(key);
            }
        }
        let status = cargo
            .status()
            .unwrap_or_else(|e| panic!("cannot run cargo build -p {package}: {e}"));
        assert!(status.success(), "cargo build -p {package} failed");
        built.push(package.to_owned());
    }
    // Test binaries live in target/<profile>/deps, workspace binaries one level up,
    // beside this crate's own binaries.
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let dir = exe
        .parent()
        .and_then(|dir| {
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.parent()
            } else {
                Some(dir)
            }
        })
        .unwrap_or_else(|| panic!("unexpected binary path {exe:?}"));
    dir.join(package)
}

pub mod external_scaler;
pub mod kube_api;
pub mod sim;
pub mod soak;

/// Milliseconds from the first call in this process to `at`: the `_at_ms` field each
/// [`DemoWorker`] event gets when it is read (0 for instants before the first call).
pub fn since_epoch_ms(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(at.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
}

/// Start `workerctl exporter args --listen <free port>` with `env` (and no other broker
/// variable); return it, once `/livez` answers, and its address.
pub async fn start_exporter(args: &[&str], env: &[(&str, &str)]) -> (Child, SocketAddr) {
    let addr = free_addr();
    let child = Command::new(binary("workerctl"))
        .arg("exporter")
        .args(args)
        .args(["--listen", &addr.to_string()])
        .env_remove("REDIS_URL")
        .env_remove("AMQP_URL")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("workerctl exporter: {e}"));
    worker_core::testing::eventually(Duration::from_secs(30), "exporter answers", || async {
        worker_core::testing::http_get(addr, "/livez")
            .await
            .is_ok_and(|(status, _)| status == 200)
    })
    .await;
    (child, addr)
}

/// A free loopback port (bound and released; good enough for a test's own process).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    l.local_addr().unwrap_or_else(|e| panic!("local_addr: {e}"))
}

/// A running `demo-worker` process.
pub struct DemoWorker {
    child: Child,
    /// Its HTTP listener.
    pub http: SocketAddr,
    events: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
}

impl DemoWorker {
    /// Start `demo-worker` with these environment variables (plus an HTTP port of its own).
    pub fn start(env: &[(&str, &str)]) -> Self {
        Self::start_binary("demo-worker", env)
    }

    /// Start another worker binary of the workspace that prints event lines the same
    /// way (`gpu-inference`, say).
    pub fn start_binary(package: &str, env: &[(&str, &str)]) -> Self {
        let http = free_addr();
        let mut cmd = Command::new(binary(package));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("WORKER_HTTP_ADDR", http.to_string())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {package}: {e}"));
        let events = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(out) = child.stdout.take() {
            let events = events.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(mut v) = serde_json::from_str::<Value>(&line) {
                        if let Some(fields) = v.as_object_mut() {
                            fields.insert(
                                "_at_ms".into(),
                                Value::from(since_epoch_ms(Instant::now())),
                            );
                        }
                        events.lock().unwrap_or_else(|p| p.into_inner()).push(v);
                    }
                }
            });
        }
        if let Some(mut err) = child.stderr.take() {
            let stderr = stderr.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    stderr
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Self {
            child,
            http,
            events,
            stderr,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Its exit status if it has exited, without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Every event line so far.
    pub fn events(&self) -> Vec<Value> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Events named `name` so far.
    pub fn count(&self, name: &str) -> usize {
        self.events().iter().filter(|e| e["event"] == name).count()
    }

    /// `(id, attempt)` of every job start it reported, in order.
    pub fn starts(&self) -> Vec<(String, u64)> {
        self.events()
            .iter()
            .filter(|e| e["event"] == "start")
            .map(|e| {
                (
                    e["id"].as_str().unwrap_or("").to_owned(),
                    e["attempt"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Wait until `check` holds on the events; panics with the worker's log after `limit`.
    pub async fn wait_for(&self, limit: Duration, what: &str, check: impl Fn(&[Value]) -> bool) {
        let deadline = tokio::time::Instant::now() + limit;
        while !check(&self.events()) {
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{what}: not seen within {limit:?}\nevents: {:?}\nstderr:\n{}",
                    self.events(),
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Send a signal by name (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args(["-s", name, &self.pid().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("kill: {e}"));
        assert!(status.success(), "kill -s {name} failed");
    }

    /// `GET path` on its HTTP listener: status and body (status 0 when it does not answer).
    pub async fn get(&self, path: &str) -> (u16, String) {
        worker_core::testing::http_get(self.http, path)
            .await
            .unwrap_or((0, String::new()))
    }

    /// Wait until its HTTP listener answers `/livez`.
    pub async fn wait_listening(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.get("/livez").await.0 != 200 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no /livez\nstderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait for the process to exit; panics after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => {
                // Let the readers drain the pipes.
                tokio::time::sleep(Duration::from_millis(50)).await;
                status
            }
            Ok(Err(e)) => panic!("wait: {e}"),
            Err(_) => panic!("did not exit within {limit:?}\nstderr:\n{}", self.stderr()),
        }
    }

    /// The final `stopped` event.
    pub fn stopped(&self) -> Value {
        self.events()
            .into_iter()
            .find(|e| e["event"] == "stopped")
            .unwrap_or_else(|| panic!("no stopped event\nstderr:\n{}", self.stderr()))
    }
}

/// A broker on the shared Redis (127.0.0.1:6379) under key prefix `prefix`.
pub async fn redis_broker(prefix: &str) -> worker_redis::RedisBroker {
    worker_redis::RedisConfig::new("redis://127.0.0.1:6379")
        .prefix(prefix)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("redis: {e}"))
}

/// The shared RabbitMQ on 127.0.0.1:5672, as guest.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The broker of a pool's test, and the variables that point a worker process at it:
/// the shared Redis under a key prefix of the test's own, or the shared RabbitMQ,
/// where the test's queue names (from `unique`) keep it apart.
pub struct PoolBroker {
    /// For the test's own enqueues and checks.
    pub broker: Arc<dyn worker_core::Broker>,
    env: Vec<(&'static str, String)>,
    /// Queue-name prefix to delete from RabbitMQ when the test is done.
    rabbit_queues: Option<String>,
}

impl PoolBroker {
    /// The shared Redis under `prefix`.
    pub async fn redis(prefix: &str) -> Self {
        Self {
            broker: Arc::new(redis_broker(prefix).await),
            env: vec![
                ("REDIS_URL", "redis://127.0.0.1:6379".into()),
                ("REDIS_PREFIX", prefix.into()),
            ],
            rabbit_queues: None,
        }
    }

    /// The shared RabbitMQ (classic queues); `queues` is the prefix of every queue
    /// the test uses, deleted by [`cleanup`](Self::cleanup).
    pub async fn rabbitmq(queues: &str) -> Self {
        let broker = worker_amqp::AmqpConfig::new(AMQP_URL)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("rabbitmq: {e}"));
        Self {
            broker: Arc::new(broker),
            env: vec![("AMQP_URL", AMQP_URL.into())],
            rabbit_queues: Some(queues.into()),
        }
    }

    /// The broker's variables followed by `extra`, for `DemoWorker::start_binary`.
    pub fn env<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        self.env
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain(extra.iter().copied())
            .collect()
    }

    /// Delete the test's RabbitMQ queues (nothing to do on Redis: its keys are the
    /// test's own prefix).
    pub async fn cleanup(&self) {
        if let Some(prefix) = &self.rabbit_queues {
            RabbitAdmin::new().delete_queues(prefix).await;
        }
    }
}

/// Most jobs running at once, counted from a worker's start and end events.
pub fn most_at_once<'a>(events: impl IntoIterator<Item = &'a Value>) -> usize {
    let (mut now, mut most) = (0usize, 0usize);
    for e in events {
        if e["event"] == "start" {
            now += 1;
            most = most.max(now);
        } else if e["event"] == "end" {
            now = now.saturating_sub(1);
        }
    }
    most
}

/// Enqueue `n` jobs with `payload` (JSON) to `queue`; their ids.
pub async fn enqueue_json(
    b: &dyn worker_core::Broker,
    queue: &str,
    payload: &Value,
    n: usize,
) -> Vec<String> {
    let jobs = (0..n)
        .map(|_| worker_core::NewJob::json(queue, payload).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let ids = b
        .enqueue(jobs)
        .await
        .unwrap_or_else(|e| panic!("enqueue: {e}"));
    ids.into_iter().map(|id| id.to_string()).collect()
}

/// `n` copies of a demo payload, as a `DEMO_JOBS` value.
pub fn demo_jobs(n: usize, payload: Value) -> String {
    Value::Array(std::iter::repeat_n(payload, n).collect()).to_string()
}

/// Run `redis-cli -p port args`; its stdout, trimmed (an error reply included).
pub async fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = tokio::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("redis-cli {args:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// How a [`RedisServer`] persists its data: its append-only file's `appendfsync`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Aof {
    /// Every write on disk before its reply: a kill -9 loses nothing acknowledged.
    #[default]
    Always,
    /// Written at once, flushed to disk every second.
    EverySec,
    /// No persistence: a restart starts empty.
    Off,
}

/// A `redis-server` owned by one test: its own loopback port and data directory,
/// append-only persistence on (see [`Aof`]), stopped and removed on drop.
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    tls: bool,
    aof: Aof,
    child: Option<std::process::Child>,
}

impl RedisServer {
    /// Start one and wait until it answers PING.
    pub fn start() -> Self {
        Self::start_with(&[], false)
    }

    /// Start one persisting as `aof` says, with extra `redis-server` arguments.
    pub fn start_with_aof(aof: Aof, extra: &[String]) -> Self {
        Self::launch(extra, false, aof)
    }

    /// Start one with extra `redis-server` arguments. With `tls`, the port is its TLS
    /// port (the arguments must name the certificate files) and the plain port is off.
    pub fn start_with(extra: &[String], tls: bool) -> Self {
        Self::launch(extra, tls, Aof::Always)
    }

    fn launch(extra: &[String], tls: bool, aof: Aof) -> Self {
        let port = free_addr().port();
        let dir = Self::scratch_dir(port);
        let mut server = Self {
            port,
            dir,
            extra: extra.to_vec(),
            tls,
            aof,
            child: None,
        };
        server.spawn();
        server
    }

    /// Start one with `maxmemory` (e.g. `4mb`) and `noeviction`, so writes that need
    /// memory are refused past it, and with `DEBUG` open to local clients: `DEBUG
    /// POPULATE` is not refused for memory, so a test can push the server past its limit.
    pub fn start_with_maxmemory(maxmemory: &str) -> Self {
        let args = [
            "--maxmemory",
            maxmemory,
            "--maxmemory-policy",
            "noeviction",
            "--enable-debug-command",
            "local",
        ];
        Self::start_with(&args.map(str::to_owned), false)
    }

    /// A fresh directory for a server on `port` (data, certificates).
    pub fn scratch_dir(port: u16) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wp-redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {dir:?}: {e}"));
        dir
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let ports: Vec<&str> = if self.tls {
            vec!["--port", "0", "--tls-port", &port]
        } else {
            vec!["--port", &port]
        };
        let aof: &[&str] = match self.aof {
            Aof::Always => &["--appendonly", "yes", "--appendfsync", "always"],
            Aof::EverySec => &["--appendonly", "yes", "--appendfsync", "everysec"],
            Aof::Off => &["--appendonly", "no"],
        };
        let child = std::process::Command::new("redis-server")
            .args(ports)
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(aof)
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server: {e}"));
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !self.answers() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server on {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers(&self) -> bool {
        if self.tls {
            return std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
        }
        std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "ping"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG")
    }

    /// Stop it (cleanly, so the append-only file is complete), stay down for `down`,
    /// and start it again on the same port and data.
    pub fn restart(&mut self, down: Duration) {
        self.stop();
        std::thread::sleep(down);
        self.spawn();
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Kill it with SIGKILL, no shutdown: what its append-only file holds is what
    /// [`RedisServer::start_again`] finds.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again after [`RedisServer::stop`], on the same port and data.
    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// Stop it; [`RedisServer::start_again`] brings it back.
    pub fn stop(&mut self) {
        // A clean SHUTDOWN completes the append-only file; servers with TLS or extra
        // settings (passwords) hold nothing a test restarts, so they are just killed.
        if !self.tls && self.extra.is_empty() {
            let _ = std::process::Command::new("redis-cli")
                .args(["-p", &self.port.to_string(), "shutdown"])
                .output();
        } else if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
        if let Some(mut child) = self.child.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A RabbitMQ node owned by one test, run from the installed server: a node name,
/// loopback port and data directory of its own, with the test's settings; stopped
/// and removed on drop. For what the shared broker must not be changed for.
pub struct RabbitNode {
    /// Its AMQP port on 127.0.0.1.
    pub port: u16,
    dist: u16,
    /// Its management API port on 127.0.0.1, when the plugin is on.
    pub management: Option<u16>,
    dir: PathBuf,
    /// Extra environment of the server process, kept for restarts.
    env: Vec<(String, std::ffi::OsString)>,
    child: Option<std::process::Child>,
}

impl RabbitNode {
    /// Start one with `settings` (`rabbitmq.conf` lines) and `advanced` (the terms of
    /// `advanced.config`, `[]` for none), and wait until it accepts connections.
    pub fn start(settings: &[&str], advanced: &str) -> Self {
        Self::launch(settings, advanced, false, &[])
    }

    /// [`start`](Self::start) with extra environment variables for the server (they
    /// override the node's own, e.g. a `HOME` shared with other nodes for one cookie).
    pub fn start_with_env(settings: &[&str], advanced: &str, env: &[(&str, &OsStr)]) -> Self {
        Self::launch(settings, advanced, false, env)
    }

    /// Start one with the management plugin on (statistics every 500 ms), and wait
    /// until both its AMQP port and its management API accept connections.
    pub fn start_with_management() -> Self {
        Self::launch(&["collect_statistics_interval = 500"], "[]", true, &[])
    }

    fn launch(settings: &[&str], advanced: &str, management: bool, env: &[(&str, &OsStr)]) -> Self {
        let port = free_addr().port();
        let dist = free_addr().port();
        let management = management.then(|| free_addr().port());
        let dir = std::env::temp_dir().join(format!("wp-rabbit-{port}-{}", std::process::id()));
        for sub in ["mnesia", "log", "home"] {
            std::fs::create_dir_all(dir.join(sub))
                .unwrap_or_else(|e| panic!("mkdir {dir:?}/{sub}: {e}"));
        }
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("write {name}: {e}"))
        };
        let mut settings: Vec<String> = settings.iter().map(|s| (*s).to_owned()).collect();
        if let Some(m) = management {
            write("enabled_plugins", "[rabbitmq_management].".into());
            settings.push(format!("management.tcp.port = {m}"));
            settings.push("management.tcp.ip = 127.0.0.1".into());
        } else {
            write("enabled_plugins", "[].".into());
        }
        write(
            "rabbitmq.conf",
            format!(
                "listeners.tcp.default = 127.0.0.1:{port}\n{}\n",
                settings.join("\n")
            ),
        );
        write("advanced.config", format!("{advanced}.\n"));
        let mut node = Self {
            port,
            dist,
            management,
            dir,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            child: None,
        };
        node.spawn();
        node
    }

    /// The packaged script (run as this user: the wrapper in /usr/sbin would switch
    /// to the rabbitmq user and drop the environment), or what is on `PATH`.
    fn script(name: &str) -> PathBuf {
        let script = PathBuf::from("/usr/lib/rabbitmq/bin").join(name);
        if script.exists() {
            script
        } else {
            PathBuf::from(name)
        }
    }

    fn spawn(&mut self) {
        let dir = &self.dir;
        let child = std::process::Command::new(Self::script("rabbitmq-server"))
            .env("HOME", dir.join("home"))
            .env("RABBITMQ_NODENAME", self.name())
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("rabbitmq-server: {e}"));
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        for port in std::iter::once(self.port).chain(self.management) {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "rabbitmq-server port {port} did not open (log in {:?})",
                    self.dir.join("log")
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Its URL, as guest on the default virtual host.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Its management API's URL with guest's credentials, as a worker takes it
    /// (empty when the plugin is off).
    pub fn management_url(&self) -> String {
        self.management
            .map(|m| format!("http://guest:guest@127.0.0.1:{m}"))
            .unwrap_or_default()
    }

    /// The node's processes: the start script and every process under it.
    pub fn pids(&self) -> Vec<u32> {
        let Some(root) = self.child.as_ref().map(std::process::Child::id) else {
            return Vec::new();
        };
        let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
            .map(|dir| {
                dir.filter_map(|e| {
                    let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
                    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                    // The field after the parenthesised command name is the state,
                    // then the parent's pid.
                    let after = &stat[stat.rfind(')')? + 1..];
                    let ppid = after.split_whitespace().nth(1)?.parse().ok()?;
                    Some((pid, ppid))
                })
                .collect()
            })
            .unwrap_or_default();
        let mut found = vec![root];
        let mut i = 0;
        while i < found.len() {
            let parent = found[i];
            found.extend(
                parents
                    .iter()
                    .filter(|(_, pp)| *pp == parent)
                    .map(|(p, _)| *p),
            );
            i += 1;
        }
        found
    }

    /// Stop it cleanly, stay down for `down`, and start it again on the same data.
    pub fn restart(&mut self, down: Duration) {
        self.stop();
        std::thread::sleep(down);
        self.spawn();
    }

    /// Raise its memory alarm (`on`: the high watermark set near 0, so publishers are
    /// blocked) or lift it (the default watermark again).
    pub fn memory_alarm(&self, on: bool) {
        let watermark = if on { "0.000001" } else { "0.4" };
        let out = std::process::Command::new(Self::script("rabbitmqctl"))
            .env("HOME", self.dir.join("home"))
            .args([
                "-n",
                &self.name(),
                "set_vm_memory_high_watermark",
                watermark,
            ])
            .output()
            .unwrap_or_else(|e| panic!("rabbitmqctl: {e}"));
        assert!(
            out.status.success(),
            "rabbitmqctl set_vm_memory_high_watermark: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The shared RabbitMQ's management API, for what a test must do from outside a
/// worker: find and close its connections, and delete the queues it made.
pub struct RabbitAdmin {
    http: reqwest::Client,
    base: String,
}

impl Default for RabbitAdmin {
    fn default() -> Self {
        Self::new()
    }
}

impl RabbitAdmin {
    /// The management API at `AMQP_MANAGEMENT_API` (default `http://127.0.0.1:15672`,
    /// user guest).
    pub fn new() -> Self {
        Self {
            http: reqwest::Client::new(),
            base: std::env::var("AMQP_MANAGEMENT_API")
                .unwrap_or_else(|_| "http://127.0.0.1:15672".into()),
        }
    }

    /// The management URL with credentials, as a worker takes it.
    pub fn url(&self) -> String {
        self.base.replacen("://", "://guest:guest@", 1)
    }

    async fn send(&self, method: reqwest::Method, path: &str) -> reqwest::Response {
        self.http
            .request(method, format!("{}/api/{path}", self.base))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "management API (enable it: rabbitmq-plugins enable rabbitmq_management): {e}"
                )
            })
    }

    async fn get(&self, path: &str) -> Value {
        self.send(reqwest::Method::GET, path)
            .await
            .json()
            .await
            .unwrap_or_else(|e| panic!("management API reply: {e}"))
    }

    async fn delete(&self, path: &str) -> u16 {
        self.send(reqwest::Method::DELETE, path)
            .await
            .status()
            .as_u16()
    }

    /// Names of the connections a process with `pid` opened (by the name the AMQP
    /// backend gives its connections).
    pub async fn connections_of(&self, pid: u32) -> Vec<String> {
        let want = format!("worker-pools pid {pid}");
        let all = self.get("connections?columns=name,client_properties").await;
        all.as_array()
            .map(|list| {
                list.iter()
                    .filter(|c| c["client_properties"]["connection_name"] == want.as_str())
                    .filter_map(|c| c["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Wait (up to 30 s) until the management API lists a connection of process `pid`
    /// not in `except`, and return its name. The listing trails the broker by its
    /// statistics interval.
    pub async fn wait_connection_of(&self, pid: u32, except: &[String]) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let found = self.connections_of(pid).await;
            if let Some(name) = found.into_iter().find(|n| !except.contains(n)) {
                return name;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no new connection of pid {pid} listed within 30 s (seen before: {except:?})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Close the connection `name` from the broker side; false when it was already gone.
    pub async fn close_connection(&self, name: &str) -> bool {
        match self.delete(&format!("connections/{}", encode(name))).await {
            404 => false,
            s if s < 300 => true,
            s => panic!("close connection {name}: HTTP {s}"),
        }
    }

    /// Names of the queues of the default vhost that start with `prefix`.
    pub async fn queues(&self, prefix: &str) -> Vec<String> {
        let all = self.get("queues/%2F?columns=name").await;
        all.as_array()
            .map(|list| {
                list.iter()
                    .filter_map(|q| q["name"].as_str())
                    .filter(|n| n.starts_with(prefix))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Delete the queues of the default vhost that start with `prefix`.
    pub async fn delete_queues(&self, prefix: &str) {
        for q in self.queues(prefix).await {
            self.delete(&format!("queues/%2F/{}", encode(&q))).await;
        }
    }
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("openssl: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Write a CA (`ca.crt`, `ca.key`) and a server certificate for localhost and
/// 127.0.0.1 signed by it (`server.crt`, `server.key`) into `dir`, with `openssl`.
pub fn make_certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=worker-pools test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}

/// Write `<name>.key` and `<name>.crt` into `dir`, a certificate for `cn` signed by
/// the CA there (see [`make_certificates`]), with `san` as its subjectAltName when
/// given (e.g. `DNS:other.invalid`): a client certificate, or a server certificate
/// for another name than the one a client connects to.
pub fn make_signed_certificate(dir: &Path, name: &str, cn: &str, san: Option<&str>) {
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    let subject = format!("/CN={cn}");
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
            &subject,
        ],
    );
    let mut args = vec![
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        &crt,
        "-days",
        "2",
    ];
    // Extensions make it an X.509 v3 certificate, the only version rustls accepts.
    let ext = format!("{name}.ext");
    let mut lines = String::from("basicConstraints=CA:FALSE\n");
    if let Some(san) = san {
        lines.push_str(&format!("subjectAltName={san}\n"));
    }
    std::fs::write(dir.join(&ext), lines).unwrap_or_else(|e| panic!("{e}"));
    args.extend(["-extfile", ext.as_str()]);
    openssl(dir, &args);
}

/// A TLS acceptor serving `server.crt` / `server.key` of `certs` (see
/// [`make_certificates`]).
pub fn tls_acceptor(certs: &Path) -> tokio_rustls::TlsAcceptor {
    tls_acceptor_with(certs, "server", false)
}

/// A TLS acceptor serving `<name>.crt` / `<name>.key` of `certs`; with
/// `verify_clients`, it takes only clients whose certificate its `ca.crt` signed.
pub fn tls_acceptor_with(
    certs: &Path,
    name: &str,
    verify_clients: bool,
) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;

    let pem = |file: String| -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(certs.join(&file))
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    let chain = pem(format!("{name}.crt"));
    let key = PrivateKeyDer::from_pem_file(certs.join(format!("{name}.key")))
        .unwrap_or_else(|e| panic!("{name}.key: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("tls versions: {e}"));
    let builder = if verify_clients {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(pem("ca.crt".into()));
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap_or_else(|e| panic!("client verifier: {e}"));
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(chain, key)
        .unwrap_or_else(|e| panic!("tls certificate: {e}"));
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A TLS endpoint on a port of its own that forwards each connection, decrypted, to a
/// plain TCP server: `amqps://` in front of the shared RabbitMQ without touching its
/// configuration. It stops when dropped.
pub struct TlsProxy {
    /// Where it accepts TLS.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    /// Serve the certificate `server.crt` / `server.key` of `certs` (see
    /// [`make_certificates`]) and forward to `upstream`.
    pub async fn start(certs: &Path, upstream: SocketAddr) -> Self {
        Self::start_with(tls_acceptor(certs), upstream).await
    }

    /// Accept with `acceptor` (see [`tls_acceptor_with`]) and forward to `upstream`.
    pub async fn start_with(acceptor: tokio_rustls::TlsAcceptor, upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local addr: {e}"));
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                conns.spawn(async move {
                    // A client that gives up on the handshake (an untrusted
                    // certificate) just ends its connection.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RedisServer {
    /// Send it a signal by name (`STOP`, `CONT`).
    pub fn signal(&self, name: &str) {
        if let Some(child) = &self.child {
            let status = std::process::Command::new("kill")
                .args(["-s", name, &child.id().to_string()])
                .status()
                .unwrap_or_else(|e| panic!("kill: {e}"));
            assert!(status.success(), "kill -s {name} failed");
        }
    }

    /// `redis-cli -p <port> args…`: its reply as text (empty when it does not answer).
    pub fn cli(&self, args: &[&str]) -> String {
        std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }
}

/// A Redis Cluster owned by one test: masters and replicas started from the installed
/// `redis-server` on loopback ports of their own ([`RedisServer`]), joined with
/// `redis-cli --cluster create`; stopped and removed on drop.
pub struct RedisCluster {
    /// Every node, masters first as `redis-cli` was given them.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// `masters` masters with `replicas` replicas each, failing over after
    /// `node_timeout`; returns once every node reports the cluster ok and every
    /// replica's link to its master is up.
    pub async fn start(masters: usize, replicas: usize, node_timeout: Duration) -> Self {
        let args: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &node_timeout.as_millis().to_string(),
            "--appendonly",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let n = masters * (1 + replicas);
        let nodes = tokio::task::spawn_blocking(move || {
            (0..n)
                .map(|_| RedisServer::start_with(&args, false))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_else(|e| panic!("start redis nodes: {e}"));
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .await
            .unwrap_or_else(|e| panic!("redis-cli --cluster create: {e}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Self { nodes };
        worker_core::testing::eventually(Duration::from_secs(60), "the cluster is ok", || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            cluster.nodes.iter().all(|n| {
                n.cli(&["cluster", "info"]).contains("cluster_state:ok")
                    && (n.cli(&["role"]).starts_with("master")
                        || n.cli(&["info", "replication"])
                            .contains("master_link_status:up"))
            })
        })
        .await;
        cluster
    }

    /// The seed node URLs, every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The node on `port`.
    pub fn node(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// The port of the master serving `key`'s slot and the ports of its replicas, as a
    /// live node that is not `except` sees them.
    pub fn master_of(&self, key: &str, except: &[u16]) -> (u16, Vec<u16>) {
        let asker = self
            .nodes
            .iter()
            .find(|n| !except.contains(&n.port) && n.child.is_some())
            .unwrap_or_else(|| panic!("no live node"));
        let slot: u16 = asker
            .cli(&["cluster", "keyslot", key])
            .parse()
            .unwrap_or_else(|e| panic!("cluster keyslot {key}: {e}"));
        // CLUSTER NODES lines: id addr flags master-id ping pong epoch state slots...
        let table = asker.cli(&["cluster", "nodes"]);
        let rows: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let port = |row: &[&str]| -> u16 {
            row[1]
                .split(['@', ':'])
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0)
        };
        let serves = |row: &[&str]| {
            row[8..].iter().any(|range| match range.split_once('-') {
                Some((a, b)) => {
                    a.parse::<u16>().is_ok_and(|a| a <= slot)
                        && b.parse::<u16>().is_ok_and(|b| slot <= b)
                }
                None => range.parse::<u16>() == Ok(slot),
            })
        };
        let master = rows
            .iter()
            .find(|r| r.len() > 8 && r[2].contains("master") && !r[2].contains("fail") && serves(r))
            .unwrap_or_else(|| panic!("no master serves slot {slot}:\n{table}"));
        let replicas = rows
            .iter()
            .filter(|r| r.len() > 3 && r[3] == master[0])
            .map(|r| port(r))
            .collect();
        (port(master), replicas)
    }

    /// Wait until `port` reports itself a master and every live node the cluster ok.
    pub async fn wait_promoted(&self, port: u16, limit: Duration) {
        worker_core::testing::eventually(limit, "the replica is promoted", || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let promoted = self
                .nodes
                .iter()
                .find(|n| n.port == port)
                .is_some_and(|n| n.cli(&["role"]).starts_with("master"));
            promoted
                && self
                    .nodes
                    .iter()
                    .filter(|n| n.child.is_some())
                    .all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok"))
        })
        .await;
    }
}

impl RabbitNode {
    /// Its Erlang node name.
    pub fn name(&self) -> String {
        format!("wp{}@localhost", self.port)
    }

    /// Where its logs are.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// Stop it cleanly and wait until it is gone (drop does it too).
    pub fn stop(&mut self) {
        // The script runs the VM as a child of its own: killing the script alone would
        // leave the node running, half stopped.
        let tree = self.pids();
        if let Some(mut child) = self.child.take() {
            // The script stops the node cleanly on SIGTERM.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            if child.try_wait().ok().flatten().is_none() {
                eprintln!(
                    "{} did not stop within 30 s of SIGTERM; killing it (log in {:?})",
                    self.name(),
                    self.log_dir()
                );
                for pid in &tree {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A RabbitMQ cluster owned by one test: [`RabbitNode`]s sharing an Erlang cookie (one
/// `HOME` of the test's own), the others joined to the first with `rabbitmqctl
/// join_cluster`. Each node runs one scheduler thread, to stay light on a small
/// machine. Stopped and removed on drop.
pub struct RabbitCluster {
    /// The nodes; the first is the one the others joined.
    pub nodes: Vec<RabbitNode>,
    home: PathBuf,
}

impl RabbitCluster {
    /// Start `n` nodes and join them into one cluster.
    pub async fn start(n: usize) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let home = std::env::temp_dir().join(format!(
            "wp-rabbit-cluster-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&home).unwrap_or_else(|e| panic!("mkdir {home:?}: {e}"));
        let cookie = home.join(".erlang.cookie");
        let value: String = (0..20).map(|_| fastrand::uppercase()).collect();
        std::fs::write(&cookie, value).unwrap_or_else(|e| panic!("write cookie: {e}"));
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
            .unwrap_or_else(|e| panic!("chmod cookie: {e}"));
        let starts: Vec<_> = (0..n)
            .map(|_| {
                let home = home.clone();
                tokio::task::spawn_blocking(move || {
                    RabbitNode::start_with_env(
                        &[],
                        "[]",
                        &[
                            ("HOME", home.as_os_str()),
                            (
                                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                                OsStr::new("+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none"),
                            ),
                        ],
                    )
                })
            })
            .collect();
        let mut nodes = Vec::new();
        for s in starts {
            nodes.push(s.await.unwrap_or_else(|e| panic!("start node: {e}")));
        }
        let cluster = Self { nodes, home };
        // The AMQP port opens before the node has finished booting, and `stop_app` on
        // a node still booting stops the whole node: wait for every boot to finish.
        for node in &cluster.nodes {
            cluster.ctl(node, &["await_startup"]).await;
        }
        let first = cluster.nodes[0].name();
        for node in &cluster.nodes[1..] {
            for args in [
                vec!["stop_app"],
                vec!["join_cluster", first.as_str()],
                vec!["start_app"],
            ] {
                cluster.ctl(node, &args).await;
            }
        }
        cluster
    }

    /// `rabbitmqctl -n <node> args…` with the cluster's cookie; its stdout. Panics
    /// with its output when it fails.
    pub async fn ctl(&self, node: &RabbitNode, args: &[&str]) -> String {
        self.cli("rabbitmqctl", node, args).await
    }

    /// A CLI tool of the installed server (`rabbitmqctl`, `rabbitmq-queues`) run
    /// against `node` with the cluster's cookie; its stdout.
    pub async fn cli(&self, tool: &str, node: &RabbitNode, args: &[&str]) -> String {
        let packaged = PathBuf::from("/usr/lib/rabbitmq/bin").join(tool);
        let exe = if packaged.exists() {
            packaged
        } else {
            PathBuf::from(tool)
        };
        let out = Command::new(exe)
            .env("HOME", &self.home)
            .args(["-q", "-n", &node.name()])
            .args(args)
            .output()
            .await
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} -n {} {args:?}: {}{}",
            node.name(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every node's AMQP URL, comma-separated, starting with node `first`.
    pub fn urls_from(&self, first: usize) -> String {
        let n = self.nodes.len();
        (0..n)
            .map(|i| self.nodes[(first + i) % n].url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Index of the node that leads quorum queue `queue`, as `asker` sees it.
    pub async fn leader_of(&self, asker: usize, queue: &str) -> usize {
        let table = self
            .ctl(&self.nodes[asker], &["list_queues", "name", "leader"])
            .await;
        let leader = table
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| name.trim() == queue)
            .map(|(_, leader)| leader.trim().to_owned())
            .unwrap_or_else(|| panic!("no leader listed for {queue}:\n{table}"));
        self.nodes
            .iter()
            .position(|n| n.name() == leader)
            .unwrap_or_else(|| panic!("leader {leader} is not a node of the cluster"))
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

/// A reader of the shared RabbitMQ that holds nothing and sees, through the management
/// API, every process's unacked deliveries and every later queue.
pub async fn rabbit_observer() -> worker_amqp::AmqpBroker {
    worker_amqp::AmqpConfig::new(AMQP_URL)
        .management_url(RabbitAdmin::new().url())
        .move_delayed(false)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("rabbitmq: {e}"))
}

/// How long a reading of the management API must hold before it is taken as settled:
/// longer than the broker's statistics interval (5 s by default), so that a reading
/// from before the last delivery cannot pass.
const RABBIT_STATS_WINDOW: Duration = Duration::from_secs(6);

/// Wait until `queue` of the shared RabbitMQ holds exactly `want` = (pending, in
/// flight, delayed, dead), in flight read from the management API (every process's
/// unacked deliveries), and holds it for a whole statistics interval; panics after
/// 60 s with the last reading.
pub async fn rabbit_exact(queue: &str, want: (u64, u64, u64, u64)) {
    use worker_core::Broker;
    let b = rabbit_observer().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut since: Option<Instant> = None;
    loop {
        let last = match b.depth(queue).await {
            Ok(d) => {
                let got = (d.pending, d.in_flight, d.delayed, d.dead);
                let from_api = d
                    .sources
                    .get("in_flight")
                    .is_some_and(|s| s.starts_with("management API"));
                if from_api && got == want {
                    let at = *since.get_or_insert_with(Instant::now);
                    if at.elapsed() >= RABBIT_STATS_WINDOW {
                        b.close().await;
                        return;
                    }
                } else {
                    since = None;
                }
                format!("{got:?} from {:?}", d.sources)
            }
            Err(e) => {
                since = None;
                format!("error: {e}")
            }
        };
        assert!(
            Instant::now() < deadline,
            "{queue}: (pending, in flight, delayed, dead) never settled at {want:?}; last {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl PoolBroker {
    /// Wait until `queue` holds exactly `want` = (pending, in flight, delayed, dead): on
    /// RabbitMQ read from the broker itself ([`rabbit_exact`]), on Redis from its keys.
    pub async fn settled(&self, queue: &str, want: (u64, u64, u64, u64)) {
        if self.rabbit_queues.is_some() {
            return rabbit_exact(queue, want).await;
        }
        let what = format!("{queue} settled at {want:?}");
        worker_core::testing::eventually(Duration::from_secs(30), &what, || async {
            self.broker
                .depth(queue)
                .await
                .is_ok_and(|d| (d.pending, d.in_flight, d.delayed, d.dead) == want)
        })
        .await;
    }
}
