//! `workerctl`: what an operator needs from a pool's broker without a worker running —
//! queue depth, the live workers, enqueueing, the dead letters, and the pool's depth
//! exporter.
//!
//! The broker is the one a worker of the pool uses: `REDIS_URL` (with `REDIS_PREFIX`)
//! or `AMQP_URL` (with the other `AMQP_*` variables, as for a worker). Tables by
//! default, `--json` for scripts. Exit codes: 0 done, 1 the broker failed, 2 bad usage
//! or configuration (nothing was changed).
//!
//! What the broker holds is written by others (a dead letter's reason is a handler's
//! error text): every string is printed escaped, so nothing in it reaches the terminal
//! as a control sequence (see `escape`).
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 workerctl depth gpu,gpu-low
//! echo '{"prompt":"hi"}' | workerctl enqueue gpu
//! workerctl dead list gpu --json
//! workerctl dead requeue gpu --yes
//! workerctl exporter --pool gpu --queues gpu,gpu-low --capacity 4 --listen 0.0.0.0:9090 \
//!     --grpc-listen 0.0.0.0:9091
//! ```

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use worker_core::telemetry::exporter::{Exporter, Opened};
use worker_core::{Broker, JobId, NewJob, QueueDepth};

mod escape;
mod scaler;
use escape::{escape, escape_json};

/// Jobs per enqueue call.
const BATCH: usize = 500;

#[derive(Parser)]
#[command(
    name = "workerctl",
    version,
    about = "Queue depth, live workers, enqueue and dead letters of a worker pool's broker"
)]
struct Cli {
    /// Redis of the pool (`redis://host:6379`), without a password: a command line is
    /// visible to every user of the machine. Put credentials in REDIS_URL or in a file
    /// named by REDIS_URL_FILE. For RabbitMQ set AMQP_URL (or AMQP_URL_FILE).
    #[arg(long, global = true)]
    redis_url: Option<String>,
    /// Prefix of the pool's Redis keys.
    #[arg(long, env = "REDIS_PREFIX", default_value = "wp", global = true)]
    redis_prefix: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pending, in-flight, delayed, due and dead jobs per queue.
    Depth {
        /// Queues (comma-separated or repeated).
        #[arg(required = true, value_delimiter = ',')]
        queues: Vec<String>,
    },
    /// Live workers, from their heartbeats.
    Workers {
        /// Only this pool's.
        #[arg(long)]
        pool: Option<String>,
    },
    /// Enqueue jobs: each PAYLOAD argument is one job's JSON payload; with none, each
    /// non-empty line of stdin is one. Prints the new job ids.
    Enqueue {
        /// Queue.
        queue: String,
        /// JSON payloads.
        payloads: Vec<String>,
        /// Start no earlier than this from now (e.g. 30s, 5m).
        #[arg(long)]
        delay: Option<humantime::Duration>,
        /// Attempts before the job is dead-lettered (the worker's setting otherwise).
        #[arg(long)]
        max_attempts: Option<u32>,
        /// Budget units each job holds while it runs (MiB under WORKER_MEMORY_BUDGET).
        #[arg(long)]
        cost: Option<u32>,
    },
    /// Serve `/scaling` and `/metrics` for a pool from the broker alone (for KEDA's
    /// `metrics-api` trigger: it exists at zero replicas), and with --grpc-listen KEDA's
    /// external scaler service (`external-push` trigger). It never touches a job; when
    /// it cannot read the broker it answers 503 (gRPC: UNAVAILABLE), never a 0.
    Exporter {
        /// Pool name.
        #[arg(long, env = "WORKER_POOL", default_value = "default")]
        pool: String,
        /// Every queue that feeds the pool (comma-separated).
        #[arg(long, env = "WORKER_QUEUES", value_delimiter = ',', required = true)]
        queues: Vec<String>,
        /// Jobs one replica runs at once (the pool's `WORKER_CONCURRENCY`).
        #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 4)]
        capacity: u32,
        /// Lower bound of `desired_replicas`.
        #[arg(long, default_value_t = 0)]
        min_replicas: u64,
        /// Upper bound of `desired_replicas`.
        #[arg(long)]
        max_replicas: Option<u64>,
        /// Listen on.
        #[arg(long, env = "EXPORTER_ADDR", default_value = "0.0.0.0:9090")]
        listen: std::net::SocketAddr,
        /// Serve KEDA's external scaler gRPC service here (`host:port`), or `off`.
        #[arg(long, env = "EXPORTER_GRPC_ADDR", default_value = "off", value_parser = grpc_addr)]
        grpc_listen: GrpcAddr,
        /// The pool is active (gRPC IsActive, StreamIsActive) while its backlog is above this.
        #[arg(long, env = "EXPORTER_ACTIVATION_BACKLOG", default_value_t = 0)]
        activation_backlog: u64,
        /// While a StreamIsActive stream is open: how often the depth is read besides the
        /// wake-ups on new work (e.g. 5s); a return to idle is pushed on such a reading.
        #[arg(long, env = "EXPORTER_WATCH_INTERVAL", default_value = "5s")]
        watch_interval: humantime::Duration,
    },
    /// Inspect, requeue or drop dead letters.
    Dead {
        #[command(subcommand)]
        action: Dead,
    },
}

#[derive(Subcommand)]
enum Dead {
    /// The oldest dead letters, with their reason.
    List {
        /// Queue.
        queue: String,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Put dead letters back to pending with a fresh attempt count: these ids, or all.
    Requeue {
        /// Queue.
        queue: String,
        /// Job ids (all when none).
        ids: Vec<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Drop dead letters for good: these ids, or all.
    Purge {
        /// Queue.
        queue: String,
        /// Job ids (all when none).
        ids: Vec<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// Why a command did not complete.
enum Failure {
    /// Bad usage or configuration: exit 2, nothing changed.
    Usage(String),
    /// The broker failed: exit 1.
    Broker(String),
}

impl From<worker_core::BrokerError> for Failure {
    fn from(e: worker_core::BrokerError) -> Self {
        Failure::Broker(e.to_string())
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Broker(format!("i/o: {e}"))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,lapin=off")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        // A message may quote the broker or an argument.
        Err(Failure::Usage(m)) => {
            eprintln!("workerctl: {}", escape(&m));
            ExitCode::from(2)
        }
        Err(Failure::Broker(m)) => {
            eprintln!("workerctl: {}", escape(&m));
            ExitCode::from(1)
        }
    }
}

/// The pool's broker, as configured; opened by [`Spec::open`].
#[derive(Clone)]
enum Spec {
    Redis(worker_redis::RedisConfig),
    Amqp(worker_amqp::AmqpConfig),
}

impl Spec {
    /// Which broker the settings name; a usage error when they name none, or two.
    fn from_cli(cli: &Cli) -> Result<Self, Failure> {
        let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
        let amqp = set("AMQP_URL") || set("AMQP_URL_FILE");
        let redis = cli.redis_url.is_some()
            || set("REDIS_URL")
            || set("REDIS_URL_FILE")
            || set("REDIS_CLUSTER_NODES");
        if let Some(url) = &cli.redis_url {
            if worker_core::redact(url) != *url {
                return Err(Failure::Usage(format!(
                    "--redis-url {} carries a password, which every user of this machine can \
                     read on the command line: set REDIS_URL or REDIS_URL_FILE instead",
                    worker_core::redact(url)
                )));
            }
        }
        match (redis, amqp) {
            (true, true) => Err(Failure::Usage(
                "both Redis (REDIS_URL, REDIS_URL_FILE, REDIS_CLUSTER_NODES or --redis-url) and \
                 RabbitMQ (AMQP_URL or AMQP_URL_FILE) are set: set the one broker the pool uses"
                    .into(),
            )),
            (true, false) => {
                // The flags stand in for their variables; the rest (the CA file, a
                // cluster, WAIT) comes from the environment as a worker reads it.
                let config = worker_redis::RedisConfig::from_vars(|name| match name {
                    "REDIS_URL" if cli.redis_url.is_some() => cli.redis_url.clone(),
                    "REDIS_URL_FILE" if cli.redis_url.is_some() => None,
                    "REDIS_PREFIX" => Some(cli.redis_prefix.clone()),
                    _ => std::env::var(name).ok(),
                })
                .map_err(|e| Failure::Usage(e.to_string()))?;
                Ok(Spec::Redis(config))
            }
            (false, true) => Ok(Spec::Amqp(
                worker_amqp::AmqpConfig::from_env().map_err(|e| Failure::Usage(e.to_string()))?,
            )),
            (false, false) => Err(Failure::Usage(
                "no broker: set REDIS_URL (redis://host:6379) or AMQP_URL \
                 (amqp://user:password@host:5672/vhost), or REDIS_URL_FILE or AMQP_URL_FILE \
                 naming a file that holds one"
                    .into(),
            )),
        }
    }

    async fn open(self) -> Result<Arc<dyn Broker>, worker_core::BrokerError> {
        Ok(match self {
            Spec::Redis(config) => Arc::new(config.connect().await?),
            Spec::Amqp(config) => Arc::new(config.connect().await?),
        })
    }

    /// The broker, with the wake-up the exporter's activity watcher waits on.
    async fn open_watched(self) -> Result<Opened, worker_core::BrokerError> {
        Ok(match self {
            Spec::Redis(config) => {
                let broker = Arc::new(config.connect().await?);
                Opened::new(broker.clone()).with_wake(Arc::new(scaler::RedisWake(broker)))
            }
            Spec::Amqp(config) => {
                let broker = Arc::new(config.connect().await?);
                Opened::new(broker.clone()).with_wake(Arc::new(scaler::AmqpWake(broker)))
            }
        })
    }
}

/// Where the external scaler service listens; `None` for `off`.
#[derive(Clone, Copy, Debug)]
struct GrpcAddr(Option<std::net::SocketAddr>);

fn grpc_addr(value: &str) -> Result<GrpcAddr, String> {
    if value.trim().eq_ignore_ascii_case("off") {
        return Ok(GrpcAddr(None));
    }
    value
        .parse()
        .map(|addr| GrpcAddr(Some(addr)))
        .map_err(|e| format!("{e}: expected host:port (e.g. 0.0.0.0:9091) or off"))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    // Payloads are checked before anything connects: bad input changes nothing.
    if let Command::Enqueue { payloads, .. } = &cli.command {
        check_json(payloads.iter().map(String::as_str), "argument")?;
    }
    let spec = Spec::from_cli(&cli)?;
    if let Command::Exporter {
        pool,
        queues,
        capacity,
        min_replicas,
        max_replicas,
        listen,
        grpc_listen,
        activation_backlog,
        watch_interval,
    } = &cli.command
    {
        // The exporter opens the broker on the first request, and again on each one
        // until it can: a broker down at start is a 503, not an exit.
        let connect: worker_core::telemetry::exporter::Connect = Arc::new(move || {
            let spec = spec.clone();
            Box::pin(spec.open_watched())
        });
        let exporter =
            Exporter::connecting(connect, pool.as_str(), (*capacity).max(1), queues.clone())
                .replicas(*min_replicas, *max_replicas)
                .activation(*activation_backlog)
                .watch_interval((*watch_interval).into());
        return serve_exporter(exporter, *listen, grpc_listen.0).await;
    }
    // A command runs for a moment: delayed jobs are the long-running processes' to move.
    let spec = match spec {
        Spec::Amqp(config) => Spec::Amqp(config.move_delayed(false)),
        other => other,
    };
    let broker = spec.open().await?;
    let out = match &cli.command {
        Command::Depth { queues } => depth(broker.as_ref(), queues, cli.json).await?,
        Command::Workers { pool } => workers(broker.as_ref(), pool.as_deref(), cli.json).await?,
        Command::Enqueue {
            queue,
            payloads,
            delay,
            max_attempts,
            cost,
        } => {
            let payloads = if payloads.is_empty() {
                let lines = stdin_lines().await?;
                check_json(lines.iter().map(String::as_str), "line")?;
                lines
            } else {
                payloads.clone()
            };
            let mut ids = Vec::with_capacity(payloads.len());
            for chunk in payloads.chunks(BATCH) {
                let jobs = chunk
                    .iter()
                    .map(|p| {
                        let mut job = NewJob::new(queue.as_str(), p.clone().into_bytes());
                        if let Some(d) = delay {
                            job = job.delay((*d).into());
                        }
                        if let Some(n) = max_attempts {
                            job = job.max_attempts(*n);
                        }
                        if let Some(units) = cost {
                            job = job.cost(*units);
                        }
                        job
                    })
                    .collect();
                ids.extend(broker.enqueue(jobs).await?);
            }
            if cli.json {
                json!(ids.iter().map(JobId::as_str).collect::<Vec<_>>()).to_string()
            } else {
                ids.iter()
                    .map(|id| format!("{}\n", escape(id.as_str())))
                    .collect::<String>()
            }
        }
        Command::Dead { action } => dead(broker.as_ref(), action, cli.json).await?,
        // Served above; it does not return here.
        Command::Exporter { .. } => String::new(),
    };
    broker.close().await;
    let out = if cli.json {
        escape_json(&out).into_owned()
    } else {
        out
    };
    let mut stdout = tokio::io::stdout();
    stdout.write_all(out.as_bytes()).await?;
    if !out.is_empty() && !out.ends_with('\n') {
        stdout.write_all(b"\n").await?;
    }
    stdout.flush().await?;
    Ok(())
}

async fn serve_exporter(
    exporter: Exporter,
    listen: std::net::SocketAddr,
    grpc: Option<std::net::SocketAddr>,
) -> Result<(), Failure> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Failure::Usage(format!("cannot listen on {listen}: {e}")))?;
    let grpc_listener = match grpc {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Failure::Usage(format!("cannot listen on {addr} (gRPC): {e}")))?,
        ),
        None => None,
    };
    let stop = worker_core::CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    #[cfg(unix)]
    {
        let on_term = stop.clone();
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::spawn(async move {
                term.recv().await;
                on_term.cancel();
            });
        }
    }
    // One listener gone ends the other: the process exits rather than half-serves.
    let grpc = async {
        let Some(listener) = grpc_listener else {
            return Ok(());
        };
        let served = scaler::serve(exporter.clone(), listener, stop.clone()).await;
        stop.cancel();
        served.map_err(|e| {
            Failure::Broker(format!(
                "gRPC listener failed: {}",
                worker_core::error::chain(&e)
            ))
        })
    };
    let http = async {
        let served = exporter.clone().serve(listener, stop.clone()).await;
        stop.cancel();
        served.map_err(Failure::from)
    };
    let (http, grpc) = tokio::join!(http, grpc);
    http?;
    grpc
}

fn check_json<'a>(payloads: impl Iterator<Item = &'a str>, what: &str) -> Result<(), Failure> {
    for (i, p) in payloads.enumerate() {
        if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(p) {
            return Err(Failure::Usage(format!(
                "payload {what} {} is not JSON ({e}); nothing was enqueued",
                i + 1
            )));
        }
    }
    Ok(())
}

async fn stdin_lines() -> Result<Vec<String>, Failure> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = Vec::new();
    while let Some(line) = lines.next_line().await? {
        if !line.trim().is_empty() {
            out.push(line);
        }
    }
    if out.is_empty() {
        return Err(Failure::Usage(
            "no payloads: give them as arguments or as JSON lines on stdin".into(),
        ));
    }
    Ok(out)
}

fn depth_json(d: &QueueDepth) -> Value {
    json!({
        "pending": d.pending,
        "in_flight": d.in_flight,
        "delayed": d.delayed,
        "delayed_due": d.delayed_due,
        "dead": d.dead,
        "backlog": d.backlog(),
        "oldest_age_s": d.oldest_pending_age.map_or(0.0, |a| a.as_secs_f64()),
        "sources": d.sources,
    })
}

async fn depth(broker: &dyn Broker, queues: &[String], as_json: bool) -> Result<String, Failure> {
    let mut rows = Vec::with_capacity(queues.len());
    for q in queues {
        rows.push((q.as_str(), broker.depth(q).await?));
    }
    if as_json {
        let map: serde_json::Map<String, Value> = rows
            .iter()
            .map(|(q, d)| ((*q).to_owned(), depth_json(d)))
            .collect();
        return Ok(json!({ "queues": map }).to_string());
    }
    let mut t = Table::new(&[
        "queue",
        "pending",
        "in flight",
        "delayed",
        "due",
        "dead",
        "backlog",
        "oldest s",
    ]);
    for (q, d) in &rows {
        t.row(vec![
            (*q).to_owned(),
            d.pending.to_string(),
            d.in_flight.to_string(),
            d.delayed.to_string(),
            d.delayed_due.to_string(),
            d.dead.to_string(),
            d.backlog().to_string(),
            format!(
                "{:.1}",
                d.oldest_pending_age.map_or(0.0, |a| a.as_secs_f64())
            ),
        ]);
    }
    Ok(t.render())
}

async fn workers(
    broker: &dyn Broker,
    pool: Option<&str>,
    as_json: bool,
) -> Result<String, Failure> {
    let list = broker.list_workers(pool).await?;
    if as_json {
        let v: Vec<Value> = list
            .iter()
            .map(|w| {
                json!({"id": w.id, "pool": w.pool, "queues": w.queues, "host": w.host,
                    "pid": w.pid, "concurrency": w.concurrency, "in_flight": w.in_flight,
                    "draining": w.draining, "quiet": w.quiet,
                    "beat_age_s": w.beat_age().as_secs_f64()})
            })
            .collect();
        return Ok(Value::Array(v).to_string());
    }
    let mut t = Table::new(&[
        "worker",
        "pool",
        "queues",
        "in flight",
        "draining",
        "quiet",
        "last beat s",
        "host",
        "pid",
    ]);
    for w in &list {
        t.row(vec![
            w.id.clone(),
            w.pool.clone(),
            w.queues.join(","),
            format!("{}/{}", w.in_flight, w.concurrency),
            if w.draining { "yes" } else { "no" }.into(),
            if w.quiet { "yes" } else { "no" }.into(),
            format!("{:.1}", w.beat_age().as_secs_f64()),
            w.host.clone(),
            w.pid.to_string(),
        ]);
    }
    Ok(t.render())
}

async fn dead(broker: &dyn Broker, action: &Dead, as_json: bool) -> Result<String, Failure> {
    match action {
        Dead::List { queue, limit } => {
            let list = broker.dead_letters(queue, *limit).await?;
            if as_json {
                let v: Vec<Value> = list
                    .iter()
                    .map(|d| {
                        json!({"id": d.envelope.id.as_str(), "queue": d.envelope.queue,
                            "attempt": d.envelope.attempt, "reason": d.reason,
                            "died_at_ms": d.died_at_ms,
                            "payload": String::from_utf8_lossy(&d.envelope.payload)})
                    })
                    .collect();
                return Ok(Value::Array(v).to_string());
            }
            let mut t = Table::new(&["id", "attempt", "died at (UTC)", "reason"]);
            for d in &list {
                let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(d.died_at_ms);
                t.row(vec![
                    d.envelope.id.as_str().to_owned(),
                    d.envelope.attempt.to_string(),
                    humantime::format_rfc3339_seconds(at).to_string(),
                    d.reason.clone(),
                ]);
            }
            Ok(t.render())
        }
        Dead::Requeue { queue, ids, yes } | Dead::Purge { queue, ids, yes } => {
            let requeue = matches!(action, Dead::Requeue { .. });
            let verb = if requeue { "requeue" } else { "purge" };
            let shown = escape(queue);
            let what = if ids.is_empty() {
                "every dead letter".to_owned()
            } else {
                format!("{} dead letter(s)", ids.len())
            };
            if !yes {
                confirm(&format!("{verb} {what} of {shown}?")).await?;
            }
            let ids: Vec<JobId> = ids.iter().map(|i| JobId::from(i.as_str())).collect();
            let n = if requeue {
                broker.requeue_dead(queue, &ids).await?
            } else {
                broker.purge_dead(queue, &ids).await?
            };
            Ok(if as_json {
                json!({ "action": verb, "queue": queue, "count": n }).to_string()
            } else {
                format!("{verb}: {n} dead letter(s) of {shown}")
            })
        }
    }
}

/// Ask on the terminal; without one, refuse (a script must say `--yes`).
async fn confirm(question: &str) -> Result<(), Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(Failure::Usage(format!(
            "{question} refused: stdin is not a terminal; pass --yes"
        )));
    }
    let mut stderr = tokio::io::stderr();
    stderr
        .write_all(format!("{question} [y/N] ").as_bytes())
        .await?;
    stderr.flush().await?;
    let mut line = String::new();
    BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await?;
    if matches!(line.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(Failure::Usage("not confirmed; nothing changed".into()))
    }
}

/// A plain text table: a header, then right-aligned columns. Each cell is escaped
/// (its text comes from the broker), so a row stays one line and lines up.
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows
            .push(cells.into_iter().map(|c| escape(&c).into_owned()).collect());
    }

    fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            cells
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (c, w))| {
                    if i == 0 {
                        format!("{c:<w$}")
                    } else {
                        format!("{c:>w$}")
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        };
        let mut out = line(&self.header);
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Table;

    #[test]
    fn a_cell_from_the_broker_stays_on_its_row_and_sends_no_escape() {
        let mut t = Table::new(&["id", "reason"]);
        t.row(vec!["j\u{202e}1".into(), "bad\n\x1b[2J\x07input".into()]);
        let shown = t.render();
        assert_eq!(shown.lines().count(), 2, "{shown:?}");
        assert!(!shown.contains(['\x1b', '\x07', '\u{202e}']), "{shown:?}");
        assert!(
            shown.ends_with("j\\u{202e}1  bad\\n\\x1b[2J\\x07input\n"),
            "{shown:?}"
        );
    }
}
