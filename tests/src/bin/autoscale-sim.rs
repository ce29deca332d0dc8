//! The autoscaling simulation from the command line: the same bursty load on real
//! `demo-worker` processes and the real Redis (127.0.0.1:6379), under several
//! autoscaling set-ups side by side, two runs at a time.
//!
//! ```sh
//! cargo run -p system-tests --bin autoscale-sim -- --drain 3s \
//!     --columns backlog,pending,backlog+cost,backlog+quiet,backlog+quiet+push
//! ```
//!
//! A column is a signal (`backlog`, the exporter's; `pending`, pending jobs only)
//! followed by what the workers tell the ReplicaSet (`+cost`: pod-deletion cost;
//! `+quiet`: deletion cost and quiet surplus replicas; neither: nothing) and, for
//! `backlog`, `+push` (wake from zero by the external scaler's `StreamIsActive`; else
//! by polling). Other options: `--drain` (WORKER_DRAIN_TIMEOUT), `--long` (the long
//! jobs' length), `--concurrency`, `--polling`, `--hpa-sync`, `--window` (scale-down
//! stabilization), `--cooldown`, `--max`, `--keda 2.17|2.19`, `--seed`, `--limit`,
//! `--polls` (then every reading and decision of each run, with the need).
//! Prints the table, then one JSON line per run; exits 1 if a run lost a job.

use std::process::ExitCode;
use std::time::Duration;

use system_tests::sim::{self, KedaVersion, ScalerSpec, Scenario, Signal, Victims, Wake};

struct Args {
    drain: Duration,
    long: Duration,
    concurrency: u32,
    polling: Duration,
    hpa_sync: Duration,
    window: Duration,
    cooldown: Duration,
    max: u32,
    seed: u64,
    limit: Duration,
    keda: KedaVersion,
    polls: bool,
    columns: Vec<(Signal, Victims, Wake)>,
}

/// One column: `backlog` or `pending`, then `+cost` or `+quiet`, then `+push`.
fn column(spec: &str) -> Result<(Signal, Victims, Wake), String> {
    let bad = || {
        format!(
            "--columns: {spec:?} is not a column such as backlog, pending+cost or \
             backlog+quiet+push"
        )
    };
    let mut parts = spec.split('+');
    let signal = match parts.next() {
        Some("backlog") => Signal::Backlog,
        Some("pending") => Signal::PendingOnly,
        _ => return Err(bad()),
    };
    let (mut victims, mut wake) = (Victims::Age, Wake::Poll);
    for part in parts {
        match part {
            "cost" if victims == Victims::Age => victims = Victims::Cost,
            "quiet" if victims == Victims::Age => victims = Victims::Quiet,
            "push" if signal == Signal::Backlog && wake == Wake::Poll => wake = Wake::Push,
            _ => return Err(bad()),
        }
    }
    Ok((signal, victims, wake))
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        drain: Duration::from_secs(12),
        long: Duration::from_secs(9),
        concurrency: 4,
        polling: Duration::from_secs(1),
        hpa_sync: Duration::from_secs(3),
        window: Duration::from_secs(6),
        cooldown: Duration::from_secs(4),
        max: 8,
        seed: 7,
        limit: Duration::from_secs(120),
        keda: KedaVersion::V2_19,
        polls: false,
        columns: vec![
            (Signal::Backlog, Victims::Age, Wake::Poll),
            (Signal::PendingOnly, Victims::Age, Wake::Poll),
        ],
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--polls" {
            a.polls = true;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let duration = || {
            humantime::parse_duration(&value)
                .map_err(|_| format!("{flag}: {value:?} is not a duration such as 9s or 500ms"))
        };
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{flag}: {value:?} is not a non-negative integer"))
        };
        let positive = || match number()? {
            0 => Err(format!("{flag}: must be at least 1")),
            n => u32::try_from(n).map_err(|_| format!("{flag}: {n} is too large")),
        };
        match flag.as_str() {
            "--drain" => a.drain = duration()?,
            "--long" => a.long = duration()?,
            "--concurrency" => a.concurrency = positive()?,
            "--polling" => a.polling = duration()?,
            "--hpa-sync" => a.hpa_sync = duration()?,
            "--keda" => {
                a.keda = match value.as_str() {
                    "2.17" | "2.18" => KedaVersion::V2_17,
                    "2.19" => KedaVersion::V2_19,
                    _ => return Err(format!("--keda: {value:?} is not 2.17, 2.18 or 2.19")),
                }
            }
            "--columns" => {
                a.columns = value.split(',').map(column).collect::<Result<_, _>>()?;
            }
            "--window" => a.window = duration()?,
            "--cooldown" => a.cooldown = duration()?,
            "--max" => a.max = positive()?,
            "--seed" => a.seed = number()?,
            "--limit" => a.limit = duration()?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(a)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("autoscale-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let scenario = |(signal, victims, wake): (Signal, Victims, Wake)| {
        let mut name = match signal {
            Signal::Backlog => "backlog".to_owned(),
            Signal::PendingOnly => "pending only".to_owned(),
        };
        match victims {
            Victims::Age => {}
            Victims::Cost => name.push_str(", cost"),
            Victims::Quiet => name.push_str(", quiet"),
        }
        if wake == Wake::Push {
            name.push_str(", push");
        }
        Scenario {
            name,
            signal,
            scaler: ScalerSpec {
                keda: a.keda,
                polling: a.polling,
                hpa_sync: a.hpa_sync,
                max: a.max,
                cooldown: a.cooldown,
                scale_down_window: a.window,
                ..ScalerSpec::compressed(a.concurrency)
            },
            concurrency: a.concurrency,
            drain_timeout: a.drain,
            load: sim::bursty_load(
                a.seed,
                u64::try_from(a.long.as_millis()).unwrap_or(u64::MAX),
            ),
            outage: None,
            seed: a.seed,
            victims,
            wake,
            limit: a.limit,
        }
    };
    let mut reports = Vec::new();
    for pair in a.columns.chunks(2) {
        let runs: Vec<Scenario> = pair.iter().copied().map(scenario).collect();
        reports.extend(futures::future::join_all(runs.iter().map(sim::run)).await);
    }
    let refs: Vec<&sim::Report> = reports.iter().collect();
    println!("{}", sim::table(&refs));
    for r in &reports {
        println!("{}", r.json());
    }
    if a.polls {
        for r in &reports {
            println!("{}", sim::trace(r));
        }
    }
    if reports.iter().any(|r| r.lost > 0) {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
