//! The autoscaling simulation from the command line: the same bursty load on real
//! `demo-worker` processes and the real Redis (127.0.0.1:6379), once scaled on the
//! exporter's backlog and once on pending jobs only, side by side.
//!
//! ```sh
//! cargo run -p system-tests --bin autoscale-sim -- --drain 12s --long 9s --seed 7
//! ```
//!
//! Options: `--drain` (WORKER_DRAIN_TIMEOUT), `--long` (the long jobs' length),
//! `--concurrency`, `--polling`, `--window` (scale-down stabilization), `--cooldown`,
//! `--max`, `--seed`, `--limit`, and `--idle-first` (scale-down stops the replica with
//! the fewest jobs in flight, as with pod-deletion costs; else a random one). Prints the
//! table, then one JSON line per run.

use std::process::ExitCode;
use std::time::Duration;

use system_tests::sim::{self, ScalerSpec, Scenario, Signal, Victims};

struct Args {
    drain: Duration,
    long: Duration,
    concurrency: u32,
    polling: Duration,
    window: Duration,
    cooldown: Duration,
    max: u32,
    seed: u64,
    limit: Duration,
    idle_first: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        drain: Duration::from_secs(12),
        long: Duration::from_secs(9),
        concurrency: 4,
        polling: Duration::from_secs(1),
        window: Duration::from_secs(6),
        cooldown: Duration::from_secs(4),
        max: 8,
        seed: 7,
        limit: Duration::from_secs(120),
        idle_first: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--idle-first" {
            a.idle_first = true;
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
    let scenario = |name: &str, signal| Scenario {
        name: name.into(),
        signal,
        scaler: ScalerSpec {
            polling: a.polling,
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
        victims: if a.idle_first {
            Victims::IdleFirst
        } else {
            Victims::Random
        },
        limit: a.limit,
    };
    let exact = scenario("backlog", Signal::Backlog);
    let naive = scenario("pending only", Signal::PendingOnly);
    let (exact, naive) = tokio::join!(sim::run(&exact), sim::run(&naive));
    println!("{}", sim::table(&[&exact, &naive]));
    println!("{}", exact.json());
    println!("{}", naive.json());
    if exact.lost + naive.lost > 0 {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
