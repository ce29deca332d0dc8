//! Helpers for system tests: build and start real worker processes, follow their
//! event lines, send them signals, and wait for their exit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

/// Path of a workspace binary, built once per test process.
pub fn binary(package: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    if !built.iter().any(|p| p == package) {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", package])
            .status()
            .unwrap_or_else(|e| panic!("cannot run cargo build -p {package}: {e}"));
        assert!(status.success(), "cargo build -p {package} failed");
        built.push(package.to_owned());
    }
    // Test binaries live in target/<profile>/deps; workspace binaries one level up.
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap_or_else(|| panic!("unexpected test binary path {exe:?}"));
    dir.join(package)
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
        let http = free_addr();
        let mut cmd = Command::new(binary("demo-worker"));
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
            .unwrap_or_else(|e| panic!("spawn demo-worker: {e}"));
        let events = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(out) = child.stdout.take() {
            let events = events.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
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

/// `n` copies of a demo payload, as a `DEMO_JOBS` value.
pub fn demo_jobs(n: usize, payload: Value) -> String {
    Value::Array(std::iter::repeat_n(payload, n).collect()).to_string()
}

/// A `redis-server` owned by one test: its own loopback port and data directory,
/// append-only persistence on, stopped and removed on drop.
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    tls: bool,
    child: Option<std::process::Child>,
}

impl RedisServer {
    /// Start one and wait until it answers PING.
    pub fn start() -> Self {
        Self::start_with(&[], false)
    }

    /// Start one with extra `redis-server` arguments. With `tls`, the port is its TLS
    /// port (the arguments must name the certificate files) and the plain port is off.
    pub fn start_with(extra: &[String], tls: bool) -> Self {
        let port = free_addr().port();
        let dir = Self::scratch_dir(port);
        let mut server = Self {
            port,
            dir,
            extra: extra.to_vec(),
            tls,
            child: None,
        };
        server.spawn();
        server
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
        let child = std::process::Command::new("redis-server")
            .args(ports)
            .args(["--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
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

    fn stop(&mut self) {
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
