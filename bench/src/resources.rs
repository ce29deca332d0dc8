//! What a worker process costs: CPU and broker commands while idle, peak memory
//! under load, how long it takes to exit after a SIGTERM, and how long from its start
//! to its first job.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::backend::{connect, fill, namespace, Kind, Management, Raw, Urls};
use crate::child::{cpu_ticks, report, Child};
use crate::clock::unix_ns;
use crate::report::{median, Table};
use crate::Result;

fn worker_args(kind: Kind, urls: &Urls, prefix: &str, queue: &str, c: u32) -> Vec<String> {
    let mut args = vec!["worker".into(), "--backend".into(), kind.name().into()];
    args.extend(urls.args());
    args.extend(
        [
            "--prefix",
            prefix,
            "--queue",
            queue,
            "--concurrency",
            &c.to_string(),
        ]
        .map(str::to_owned),
    );
    args
}

/// Clock ticks per second, as `/proc/<pid>/stat` counts CPU time.
async fn clock_ticks() -> f64 {
    let out = tokio::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .await;
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A Redis server of the scenario's own on a free loopback port, so that the
/// commands counted are the worker's alone.
struct OwnRedis {
    _child: tokio::process::Child,
    url: String,
    port: u16,
}

impl OwnRedis {
    async fn start() -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--logfile", ""])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!("cannot start redis-server (needed for the idle scenario): {e}")
            })?;
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(Self {
                    _child: child,
                    url: format!("redis://127.0.0.1:{port}"),
                    port,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("the scenario's own redis-server did not start".into())
    }

    /// Count the commands clients send (not those scripts run inside the server)
    /// for `window`, by `MONITOR`. Returns the count and the count by command name.
    async fn monitor(&self, window: Duration) -> Result<(u64, Vec<(String, u64)>)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await?;
        s.write_all(b"MONITOR\r\n").await?;
        let mut lines = BufReader::new(s).lines();
        let mut by_name = std::collections::BTreeMap::<String, u64>::new();
        let mut total = 0;
        let end = tokio::time::Instant::now() + window;
        loop {
            let line = match tokio::time::timeout_at(end, lines.next_line()).await {
                Err(_) => break,
                Ok(line) => line?.ok_or("MONITOR connection closed")?,
            };
            // `+<time> [<db> <client>] "<COMMAND>" ...`; a script's own commands show
            // `lua` as the client.
            let Some((client, rest)) = line.split_once("] ") else {
                continue;
            };
            if client.ends_with("lua") {
                continue;
            }
            let name = rest.split('"').nth(1).unwrap_or("?").to_ascii_uppercase();
            total += 1;
            *by_name.entry(name).or_default() += 1;
        }
        let mut by_name: Vec<_> = by_name.into_iter().collect();
        by_name.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        Ok((total, by_name))
    }
}

/// Idle cost: a worker process with nothing to do for `seconds`.
pub async fn idle(kind: Kind, urls: &Urls, seconds: f64, c: u32) -> Result<Value> {
    let own = match kind {
        Kind::Redis => Some(OwnRedis::start().await?),
        Kind::Memory | Kind::Amqp => None,
    };
    let mut urls = urls.clone();
    if let Some(own) = &own {
        urls.redis_url = own.url.clone();
    }
    let prefix = namespace("idle");
    let mut child = Child::spawn(&worker_args(kind, &urls, &prefix, "idle", c))?;
    child
        .next_event("ready", Duration::from_secs(30), &mut Vec::new())
        .await?;
    // Past start-up: registration, the first fetch, the subscription.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // RabbitMQ: frames received on the run's virtual host, from the management
    // statistics (refreshed every few seconds), once its connection is listed.
    let management = match kind {
        Kind::Amqp => {
            let m = Management::new(&urls.amqp_management_url)?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while m.frames_received(&prefix).await?.1 == 0 {
                if tokio::time::Instant::now() > deadline {
                    return Err("the idle worker's connection was never listed".into());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Some(m)
        }
        _ => None,
    };
    let window = Duration::from_secs_f64(seconds);
    let before = cpu_ticks(child.pid).ok_or("cannot read the worker's CPU time")?;
    let (commands, by_name) = match (&own, &management) {
        (Some(own), _) => own.monitor(window).await?,
        (None, Some(m)) => {
            let (from, _) = m.frames_received(&prefix).await?;
            tokio::time::sleep(window).await;
            let (to, _) = m.frames_received(&prefix).await?;
            let n = to.saturating_sub(from);
            (n, vec![("AMQP frames".to_owned(), n)])
        }
        (None, None) => {
            tokio::time::sleep(window).await;
            (0, Vec::new())
        }
    };
    let after = cpu_ticks(child.pid).ok_or("cannot read the worker's CPU time")?;
    child.signal("TERM").await?;
    child.wait(Duration::from_secs(30)).await?;
    let cpu_pct = (after - before) as f64 / clock_ticks().await / seconds * 100.0;
    let per_s = commands as f64 / seconds;
    println!(
        "idle cost on {}: one worker (C = {c}) with nothing to do for {seconds} s",
        kind.name()
    );
    let mut t = Table::new(&["CPU % of one core", "broker commands/s", "commands by name"]);
    t.row(vec![
        format!("{cpu_pct:.3}"),
        if kind == Kind::Memory {
            "in-process".into()
        } else {
            format!("{per_s:.2}")
        },
        by_name
            .iter()
            .map(|(n, k)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
    ]);
    t.print();
    let out = json!({"scenario": "idle", "backend": kind.name(), "seconds": seconds,
        "cpu_pct": cpu_pct, "commands_per_s": (kind != Kind::Memory).then_some(per_s),
        "commands": by_name});
    println!("{out}");
    Ok(out)
}

/// Peak RSS of a worker process (and of the raw loop) running `c` jobs at once
/// with `payload`-byte payloads.
pub async fn memory(kind: Kind, urls: &Urls, c: u32, payload: usize, jobs: u64) -> Result<Value> {
    let prefix = namespace("memory");
    let mut args = worker_args(kind, urls, &prefix, "memory", c);
    args.extend(
        [
            "--sleep-ms",
            "20",
            "--expect",
            &jobs.to_string(),
            "--payload",
            &payload.to_string(),
        ]
        .map(str::to_owned),
    );
    if kind == Kind::Memory {
        // The in-memory broker holds every job in the worker's own process.
        args.extend(["--seed".to_owned(), jobs.to_string()]);
    } else {
        fill(
            connect(kind, urls, &prefix, c).await?.as_ref(),
            "memory",
            jobs,
            payload,
        )
        .await?;
    }
    let (_, lines) = Child::spawn(&args)?.wait(Duration::from_secs(600)).await?;
    let fw_kib = report(&lines)?["peak_rss_kib"].as_u64().unwrap_or(0);
    let raw_kib = if kind == Kind::Memory {
        None
    } else {
        let name = namespace("raw-memory");
        let raw = Raw::new(kind, urls, &name, c).await?;
        raw.push((0..jobs).map(|_| vec![b'x'; payload]).collect())
            .await?;
        let mut args = vec!["raw-worker".into(), "--backend".into(), kind.name().into()];
        args.extend(urls.args());
        args.extend(
            [
                "--name",
                &name,
                "--concurrency",
                &c.to_string(),
                "--sleep-ms",
                "20",
            ]
            .map(str::to_owned),
        );
        let (_, lines) = Child::spawn(&args)?.wait(Duration::from_secs(600)).await?;
        report(&lines)?["peak_rss_kib"].as_u64()
    };
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "peak RSS on {}: C = {c}, {jobs} jobs of {payload} B, handler sleep 20 ms",
        kind.name()
    );
    let mut t = Table::new(&["framework MiB", "raw loop MiB", "payloads in flight MiB"]);
    t.row(vec![
        format!("{:.1}", mib(fw_kib)),
        raw_kib.map_or("-".into(), |k| format!("{:.1}", mib(k))),
        format!("{:.1}", (c as f64 * payload as f64) / 1048576.0),
    ]);
    t.print();
    let out = json!({"scenario": "memory", "backend": kind.name(), "concurrency": c,
        "payload": payload, "jobs": jobs, "peak_rss_mib": mib(fw_kib),
        "raw_peak_rss_mib": raw_kib.map(mib)});
    println!("{out}");
    Ok(out)
}

/// Drain time: SIGTERM to a worker with `c` jobs in flight, each sleeping
/// `sleep_ms`; the time from the last job's end to the process's exit.
pub async fn drain_time(
    kind: Kind,
    urls: &Urls,
    c: u32,
    sleep_ms: u64,
    runs: u32,
) -> Result<Value> {
    let mut samples = Vec::new();
    for _ in 0..runs {
        let prefix = namespace("drain-time");
        let mut args = worker_args(kind, urls, &prefix, "drain", c);
        args.extend(["--sleep-ms".into(), sleep_ms.to_string(), "--events".into()]);
        if kind == Kind::Memory {
            args.extend(["--seed".into(), c.to_string()]);
        } else {
            fill(
                connect(kind, urls, &prefix, c).await?.as_ref(),
                "drain",
                u64::from(c),
                100,
            )
            .await?;
        }
        let mut child = Child::spawn(&args)?;
        let mut seen = Vec::new();
        for _ in 0..c {
            child
                .next_event("start", Duration::from_secs(30), &mut seen)
                .await?;
        }
        let termed = unix_ns();
        child.signal("TERM").await?;
        let (exited, rest) = child.wait(Duration::from_secs(60)).await?;
        seen.extend(rest);
        let ends: Vec<u64> = seen
            .iter()
            .filter(|v| v["event"] == "end")
            .filter_map(|v| v["unix_ns"].as_u64())
            .collect();
        if ends.len() != c as usize {
            return Err(format!("{} of {c} jobs ended before the exit", ends.len()).into());
        }
        let last_end = ends.iter().copied().max().unwrap_or(termed).max(termed);
        samples.push(exited.saturating_sub(last_end) as f64 / 1e6);
    }
    println!(
        "drain time on {}: SIGTERM with {c} jobs in flight (each {sleep_ms} ms); exit after the last job ended, median of {runs}",
        kind.name()
    );
    let ms = print_median("ms after last job", &samples);
    let out = json!({"scenario": "drain-time", "backend": kind.name(), "concurrency": c,
        "sleep_ms": sleep_ms, "ms_after_last_job": ms, "runs": samples});
    println!("{out}");
    Ok(out)
}

/// From a worker process's start to its first job started, with jobs waiting: what a
/// pool woken from zero pays on top of scheduling its pod. Timed from outside: the
/// clock starts just before the process is spawned (a release build of this binary's
/// `worker`) and stops at the first start event it prints.
pub async fn cold_start(kind: Kind, urls: &Urls, c: u32, runs: u32) -> Result<Value> {
    if kind == Kind::Memory {
        return Err("cold start needs a broker outside the process: redis or amqp".into());
    }
    let mut samples = Vec::new();
    for _ in 0..runs {
        let prefix = namespace("cold-start");
        let broker = connect(kind, urls, &prefix, c).await?;
        fill(broker.as_ref(), "cold", u64::from(c), 100).await?;
        let mut args = worker_args(kind, urls, &prefix, "cold", c);
        args.push("--events".into());
        let spawned = unix_ns();
        let mut child = Child::spawn(&args)?;
        let mut seen = Vec::new();
        let first = child
            .next_event("start", Duration::from_secs(30), &mut seen)
            .await?;
        let started = first["unix_ns"]
            .as_u64()
            .ok_or("a start event without its time")?;
        samples.push(started.saturating_sub(spawned) as f64 / 1e6);
        child.signal("TERM").await?;
        child.wait(Duration::from_secs(60)).await?;
    }
    println!(
        "cold start on {}: process start to first job started, {c} jobs waiting, median of {runs}",
        kind.name()
    );
    let ms = print_median("ms to first start", &samples);
    let out = json!({"scenario": "cold-start", "backend": kind.name(), "concurrency": c,
        "ms_to_first_start": ms, "runs": samples});
    println!("{out}");
    Ok(out)
}

/// Print the median of `samples` under `header`, then every sample; returns the median.
fn print_median(header: &str, samples: &[f64]) -> f64 {
    let ms = median(samples);
    let mut t = Table::new(&[header, "runs"]);
    t.row(vec![
        format!("{ms:.1}"),
        samples
            .iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
            .join(" "),
    ]);
    t.print();
    ms
}
