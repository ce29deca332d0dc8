//! Autoscaling on real processes: KEDA's and the HPA's rules (see `system_tests::sim`)
//! drive real `demo-worker` replicas on the real Redis through a bursty load of mixed
//! job lengths, some longer than the scale-down stabilization window. Scale-down sends
//! SIGTERM to the pods a ReplicaSet deletes first.
//!
//! Time is compressed: KEDA polling 1 s, HPA sync 3 s, stabilization window 6 s,
//! cooldown 4 s, long jobs 9 s. Each test prints its report.

use std::time::Duration;

use system_tests::sim::{
    self, KedaVersion, Loop, Report, ScalerSpec, Scenario, Signal, Victims, Wake, Why,
};

/// One run at a time: their timings should not share the machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONCURRENCY: u32 = 4;
const LONG_JOB_MS: u64 = 9_000;

fn scaler() -> ScalerSpec {
    ScalerSpec::compressed(CONCURRENCY)
}

fn scenario(name: &str, signal: Signal, drain: Duration) -> Scenario {
    Scenario {
        name: name.into(),
        signal,
        scaler: scaler(),
        concurrency: CONCURRENCY,
        drain_timeout: drain,
        load: sim::bursty_load(7, LONG_JOB_MS),
        outage: None,
        seed: 11,
        victims: Victims::Age,
        wake: Wake::Poll,
        limit: Duration::from_secs(120),
    }
}

fn print(reports: &[&Report]) {
    eprintln!("\n{}", sim::table(reports));
    for r in reports {
        eprintln!("{}", r.json());
    }
}

/// Nothing lost, nothing done twice, and the run ended with the pool back at zero.
fn assert_sound(r: &Report) {
    assert!(r.finished, "{}: did not finish: {}", r.name, r.json());
    assert_eq!(r.lost, 0, "{}: lost jobs: {}", r.name, r.json());
    assert_eq!(r.dead, 0, "{}: dead-lettered jobs: {}", r.name, r.json());
    assert_eq!(r.duplicated, 0, "{}: {}", r.name, r.json());
    assert_eq!(r.completed, r.jobs, "{}: {}", r.name, r.json());
    assert_eq!(r.polls.last().map(|p| p.desired), Some(0), "{}", r.name);
}

/// The pool woke from zero at the first poll after the first enqueue.
fn assert_woke_within_one_poll(r: &Report) {
    assert!(r.woke_on_first_poll, "{}: {}", r.name, r.json());
    let wake = r.wake_ms.unwrap_or(u64::MAX);
    assert!(
        wake <= u64::try_from(scaler().polling.as_millis()).unwrap_or(u64::MAX),
        "{}: woke {wake} ms after the first enqueue",
        r.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_signal_interrupts_nothing_when_the_drain_covers_the_longest_job() {
    let _serial = SERIAL.lock().await;
    let drain = Duration::from_secs(12);
    let exact = scenario("backlog, drain 12 s", Signal::Backlog, drain);
    let naive = scenario("pending only, drain 12 s", Signal::PendingOnly, drain);
    let (exact, naive) = tokio::join!(sim::run(&exact), sim::run(&naive));
    print(&[&exact, &naive]);

    assert_sound(&exact);
    assert_woke_within_one_poll(&exact);
    assert_eq!(exact.interrupted, 0, "{}", exact.json());
    assert_eq!(exact.released, 0, "{}", exact.json());
    assert_eq!(exact.restarts, 0, "{}", exact.json());
    assert!(exact.max_replicas >= 2, "{}", exact.json());
    assert!(exact.replica_seconds >= exact.ideal_replica_seconds);

    // The pending-only signal loses nothing either (the drain covers every job), but
    // it stops replicas in the middle of their jobs: with the long jobs in flight and
    // nothing pending it sees an idle pool.
    assert_sound(&naive);
    assert!(naive.stopped_busy >= 1, "{}", naive.json());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_drain_shorter_than_the_longest_job_the_pending_only_signal_interrupts_jobs() {
    let _serial = SERIAL.lock().await;
    let drain = Duration::from_secs(3);
    let exact = scenario("backlog, drain 3 s", Signal::Backlog, drain);
    let mut naive = scenario("pending only, drain 3 s", Signal::PendingOnly, drain);
    naive.limit = Duration::from_secs(60);
    let (exact, naive) = tokio::join!(sim::run(&exact), sim::run(&naive));
    print(&[&exact, &naive]);

    // Interrupted jobs are released and run again: nothing is lost either way.
    assert_sound(&exact);
    // The pending-only signal sees the pool idle whenever only long jobs run, stops
    // it after the cooldown, and the drain cuts those jobs short; released, they wake
    // the pool again, and the cycle repeats. Jobs it never finishes stay in the queue.
    // Whether a stopped job outlives the 3 s drain depends on when in its run the
    // pool went to zero; that a busy replica is stopped does not.
    assert!(naive.stopped_busy >= 1, "{}", naive.json());
    assert!(naive.restarts >= naive.interrupted, "{}", naive.json());
    assert_eq!(naive.lost, 0, "{}", naive.json());
    assert_eq!(naive.dead, 0, "{}", naive.json());
    assert_eq!(naive.duplicated, 0, "{}", naive.json());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_broker_holds_the_pool_and_it_recovers_when_the_broker_returns() {
    let _serial = SERIAL.lock().await;
    let mut s = scenario(
        "backlog, exporter cut 3-9 s",
        Signal::Backlog,
        Duration::from_secs(12),
    );
    s.outage = Some((Duration::from_secs(3), Duration::from_secs(9)));
    let r = sim::run(&s).await;
    print(&[&r]);

    assert_sound(&r);
    assert_woke_within_one_poll(&r);
    assert_eq!(r.interrupted, 0, "{}", r.json());
    let failed: Vec<_> = r.polls.iter().filter(|p| p.reading.is_none()).collect();
    assert!(
        failed.len() >= 4,
        "{} failed reads: {}",
        failed.len(),
        r.json()
    );
    for p in &failed {
        // The exporter answers an error, never a 0: the pool is held, never shrunk.
        assert!(p.desired >= p.current, "{p:?}");
        assert!(matches!(p.why, Why::Hold | Why::Fallback), "{p:?}");
    }
    let fallbacks: Vec<_> = failed.iter().filter(|p| p.why == Why::Fallback).collect();
    assert!(!fallbacks.is_empty(), "no fallback: {:?}", r.polls);
    for p in fallbacks {
        assert_eq!(p.desired, p.current.max(1), "{p:?}");
    }
    // Readings came back after the outage and drove the pool again.
    let last_failure = failed.last().map_or(0, |p| p.at_ms);
    assert!(
        r.polls
            .iter()
            .any(|p| p.at_ms > last_failure && p.reading.is_some() && p.why == Why::Hpa),
        "{:?}",
        r.polls
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_keda_2_19_a_fallback_wakes_a_pool_at_zero_during_an_outage() {
    let _serial = SERIAL.lock().await;
    // The exporter is cut off from the start for 7 s; the first jobs arrive at 0.5 s.
    let outage = Some((Duration::ZERO, Duration::from_secs(7)));
    let mut new = scenario(
        "KEDA 2.19, cut 0-7 s",
        Signal::Backlog,
        Duration::from_secs(12),
    );
    new.outage = outage;
    let mut old = scenario(
        "KEDA 2.17, cut 0-7 s",
        Signal::Backlog,
        Duration::from_secs(12),
    );
    old.outage = outage;
    old.scaler.keda = KedaVersion::V2_17;
    let (new, old) = tokio::join!(sim::run(&new), sim::run(&old));
    print(&[&new, &old]);
    assert_sound(&new);
    assert_sound(&old);
    let outage_end_ms = 7_000;
    // 2.19: the 4th failed fetch falls back, which wakes the pool during the outage.
    let at = new
        .polls
        .iter()
        .position(|p| p.current == 0 && p.desired > 0)
        .unwrap_or_else(|| panic!("never woke: {:?}", new.polls));
    let woke = &new.polls[at];
    assert_eq!(woke.why, Why::Fallback, "{woke:?}");
    assert!(woke.at_ms < outage_end_ms, "{woke:?}");
    // The polls up to it all failed: the 4th woke the pool.
    assert_eq!(at, 3, "{:?}", new.polls);
    assert!(new.polls[..=at].iter().all(|p| p.reading.is_none()));
    // 2.17: failed polls neither count nor wake; the pool stays at zero until the
    // exporter answers again.
    let first = old
        .polls
        .iter()
        .find(|p| p.desired > 0)
        .unwrap_or_else(|| panic!("never woke: {:?}", old.polls));
    assert_eq!(first.why, Why::Activate, "{first:?}");
    assert!(first.at_ms >= outage_end_ms, "{first:?}");
    assert!(
        old.polls
            .iter()
            .filter(|p| p.reading.is_none())
            .all(|p| p.by == Loop::Keda && p.why == Why::Hold && p.desired == 0),
        "{:?}",
        old.polls
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_surplus_replicas_let_scale_down_stop_no_busy_replica() {
    let _serial = SERIAL.lock().await;
    // A drain shorter than the long jobs: a busy replica stopped cuts its jobs short.
    let drain = Duration::from_secs(3);
    let mut cost = scenario("deletion cost, drain 3 s", Signal::Backlog, drain);
    cost.victims = Victims::Cost;
    let mut quiet = scenario("quiet surplus, drain 3 s", Signal::Backlog, drain);
    quiet.victims = Victims::Quiet;
    let (cost, quiet) = tokio::join!(sim::run(&cost), sim::run(&quiet));
    print(&[&cost, &quiet]);
    assert_sound(&cost);
    assert_sound(&quiet);
    assert!(quiet.stopped >= 1, "{}", quiet.json());
    assert_eq!(quiet.stopped_busy, 0, "{}", quiet.json());
    assert_eq!(quiet.interrupted, 0, "{}", quiet.json());
    assert_eq!(quiet.released, 0, "{}", quiet.json());
    assert_eq!(quiet.restarts, 0, "{}", quiet.json());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_push_wakes_the_pool_before_the_next_poll() {
    let _serial = SERIAL.lock().await;
    let drain = Duration::from_secs(12);
    let polled = scenario("metrics-api", Signal::Backlog, drain);
    let mut pushed = scenario("external-push", Signal::Backlog, drain);
    pushed.wake = Wake::Push;
    let (polled, pushed) = tokio::join!(sim::run(&polled), sim::run(&pushed));
    print(&[&polled, &pushed]);
    assert_sound(&polled);
    assert_sound(&pushed);
    assert_woke_within_one_poll(&polled);
    // Every wake from zero of the push run came from a push, none from a poll.
    let wakes: Vec<_> = pushed
        .polls
        .iter()
        .filter(|p| p.current == 0 && p.desired > 0)
        .collect();
    assert!(!wakes.is_empty(), "{:?}", pushed.polls);
    for p in wakes {
        assert_eq!((p.by, p.why), (Loop::Push, Why::Activate), "{p:?}");
    }
    assert!(pushed.wake_ms.is_some(), "{}", pushed.json());
}
