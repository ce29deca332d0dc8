//! Reconciliation: every planned job against the workers' event lines and the
//! broker's final state.
//!
//! Definitions the verdict uses:
//!
//! - **acked**: a `settled` event with outcome `ok`. The worker prints it after the
//!   broker confirmed the ack of that job's current lease (`Worker::on_settled`).
//! - **lost**: a job meant to succeed with no ack, no dead letter, and nothing left in
//!   the broker — except when its last run printed `end ok`, then no `settled` (its
//!   process was killed with SIGKILL, or exited at its drain deadline while the ack
//!   was on the wire) or `settled failed` (an ack whose reply was lost to a cut
//!   connection, retried and refused because the first try had removed the job), and
//!   no run followed: that ack landed unseen (had it not, the lease would have
//!   expired and the job run again), and it is counted as `acked_unseen`.
//! - **completed twice by live workers**: two acks of one job id. Both were
//!   confirmed by the broker with the lease token of their run, so no kill -9 or lost
//!   lease of the first run's process can explain the second: a confirmed ack removes
//!   the job, and a stale token is refused. (A handler that *returned* `Ok` twice is
//!   fine when the first run's ack never landed: its process was killed with SIGKILL,
//!   or its outcome was `failed`, i.e. its lease was lost; those are counted.) Both
//!   backends confirm an ack: Redis answers it, RabbitMQ commits it.
//! - **an Ok thrown away**: an `end ok` whose run settled as `retried`, `released`
//!   or `dead`.
//! - **stuck**: pending, in flight or delayed not all 0 at the end.
//! - **dead letters**: exactly the jobs meant to die (fatal, or failing every
//!   attempt), each once.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use serde_json::Value;
use worker_core::{DeadLetter, QueueDepth};

/// What a job is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Succeed at once.
    Ok,
    /// Ask for a retry on its first `n` attempts, then succeed.
    RetryThenOk(u32),
    /// Fail with a fatal error: dead on its first finished run.
    Fatal,
    /// Ask for a retry on every attempt: dead when its attempts are spent.
    Exhaust,
    /// Succeed after running longer than a lease.
    Long,
}

impl Kind {
    /// Whether it should end as a dead letter.
    pub fn meant_to_die(self) -> bool {
        matches!(self, Self::Fatal | Self::Exhaust)
    }

    fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::RetryThenOk(_) => "retry-then-ok",
            Self::Fatal => "fatal",
            Self::Exhaust => "exhaust",
            Self::Long => "long",
        }
    }
}

/// One planned job.
#[derive(Clone, Debug)]
pub struct Planned {
    /// Its id.
    pub id: String,
    /// Its queue.
    pub queue: String,
    /// What it is asked to do.
    pub kind: Kind,
}

/// One worker process as the soak saw it.
#[derive(Clone, Debug, Default)]
pub struct ProcRecord {
    /// Its event lines, in order.
    pub events: Vec<Value>,
    /// When it was sent SIGKILL (ms on the events' clock).
    pub killed_at_ms: Option<u64>,
}

/// The broker at the end, and what the run knows about its acks.
#[derive(Clone, Debug, Default)]
pub struct FinalState {
    /// Each queue's depth.
    pub depth: BTreeMap<String, QueueDepth>,
    /// Every dead letter of the soak's queues.
    pub dead: Vec<DeadLetter>,
}

/// The outcome of a reconciliation: figures, and what broke a promise.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Named counts, printed as the soak's figures.
    pub figures: BTreeMap<&'static str, u64>,
    /// One entry per broken promise, naming the job and its history.
    pub problems: Vec<String>,
}

impl Verdict {
    fn add(&mut self, figure: &'static str, n: u64) {
        *self.figures.entry(figure).or_default() += n;
    }
}

struct Ev<'a> {
    proc: usize,
    at: u64,
    v: &'a Value,
}

impl Ev<'_> {
    fn name(&self) -> &str {
        self.v["event"].as_str().unwrap_or("")
    }
    fn attempt(&self) -> u64 {
        self.v["attempt"].as_u64().unwrap_or(0)
    }
}

/// Reconcile `plan` against what `procs` printed and the broker's `end` state.
pub fn reconcile(plan: &[Planned], procs: &[ProcRecord], end: &FinalState) -> Verdict {
    let mut v = Verdict::default();
    let mut by_job: HashMap<&str, Vec<Ev<'_>>> = HashMap::new();
    for (proc, rec) in procs.iter().enumerate() {
        for e in &rec.events {
            if let Some(id) = e["id"].as_str() {
                let at = e["_at_ms"].as_u64().unwrap_or(0);
                by_job.entry(id).or_default().push(Ev { proc, at, v: e });
            }
        }
    }
    let mut dead: HashMap<&str, Vec<&DeadLetter>> = HashMap::new();
    for d in &end.dead {
        dead.entry(d.envelope.id.as_str()).or_default().push(d);
    }
    let planned: HashMap<&str, &Planned> = plan.iter().map(|p| (p.id.as_str(), p)).collect();
    for id in by_job.keys().chain(dead.keys()) {
        if !planned.contains_key(id) {
            v.problems.push(format!(
                "job {id}: not planned, yet seen in events or dead letters"
            ));
        }
    }
    let stuck: u64 = end
        .depth
        .values()
        .map(|d| d.pending + d.in_flight + d.delayed)
        .sum();
    if stuck > 0 {
        v.problems
            .push(format!("stuck at the end: {:?}", end.depth));
    }
    v.add("stuck", stuck);
    v.add("jobs", plan.len() as u64);
    let none = Vec::new();
    for p in plan {
        let evs = by_job.get(p.id.as_str()).unwrap_or(&none);
        let deaths = dead.get(p.id.as_str()).map_or(&[][..], Vec::as_slice);
        v.add(p.kind.name(), 1);
        let runs = evs.iter().filter(|e| e.name() == "start").count() as u64;
        v.add("runs", runs);
        let acks = settled(evs, "ok").count() as u64;
        v.add("acked", acks);
        let mut trouble = Vec::new();
        for outcome in ["retried", "released", "failed", "dead"] {
            v.add(
                match outcome {
                    "retried" => "settled_retried",
                    "released" => "settled_released",
                    "failed" => "settled_failed",
                    _ => "settled_dead",
                },
                settled(evs, outcome).count() as u64,
            );
        }
        // Each run that returned Ok: acked, or explained, or an Ok thrown away.
        for end_ok in evs
            .iter()
            .filter(|e| e.name() == "end" && e.v["ok"] == true)
        {
            let outcome = evs
                .iter()
                .find(|s| {
                    s.proc == end_ok.proc
                        && s.name() == "settled"
                        && s.attempt() == end_ok.attempt()
                })
                .and_then(|s| s.v["outcome"].as_str());
            match outcome {
                Some("ok") => {}
                Some("failed") => v.add("ok_not_recorded", 1),
                Some(other) => trouble.push(format!("an Ok was settled as {other}")),
                None if procs[end_ok.proc].killed_at_ms.is_some() => {
                    v.add("ok_unsettled_killed", 1)
                }
                None => v.add("ok_unsettled_stopped", 1),
            }
        }
        if acks > 1 {
            trouble.push(format!("completed {acks} times by live workers"));
        }
        if deaths.len() > 1 {
            trouble.push(format!("dead-lettered {} times", deaths.len()));
        }
        if p.kind.meant_to_die() {
            if deaths.is_empty() {
                trouble.push("meant to die but not dead-lettered".into());
            }
            if acks > 0 {
                trouble.push("meant to die but acked".into());
            }
        } else if !deaths.is_empty() {
            trouble.push("meant to succeed but dead-lettered".into());
        } else if acks == 0 {
            if stuck == 0 && acked_unseen(evs) {
                v.add("acked_unseen", 1);
            } else if stuck == 0 {
                v.add("lost", 1);
                trouble.push("lost: never acked, not dead, not in the broker".into());
            }
        }
        if !trouble.is_empty() {
            v.problems.push(format!(
                "job {} ({}, queue {}): {}\n{}",
                p.id,
                p.kind.name(),
                p.queue,
                trouble.join("; "),
                history(evs, deaths, procs)
            ));
        }
    }
    let meant: u64 = plan.iter().filter(|p| p.kind.meant_to_die()).count() as u64;
    let dead_depth: u64 = end.depth.values().map(|d| d.dead).sum();
    v.add("dead_letters", end.dead.len() as u64);
    if dead_depth != meant {
        v.problems.push(format!(
            "depth counts {dead_depth} dead letters, {meant} jobs were meant to die"
        ));
    }
    v.figures.entry("lost").or_default();
    v
}

fn settled<'a>(evs: &'a [Ev<'a>], outcome: &'a str) -> impl Iterator<Item = &'a Ev<'a>> {
    evs.iter()
        .filter(move |e| e.name() == "settled" && e.v["outcome"] == outcome)
}

/// The last run printed `end ok`, then no `settled` (its process was killed, or
/// exited at its drain deadline with the ack on the wire) or `settled failed` (the
/// ack's reply was lost, and its retry was refused because the first try had
/// landed), and nothing ran the job after it.
fn acked_unseen(evs: &[Ev<'_>]) -> bool {
    let Some(last_start) = evs
        .iter()
        .filter(|e| e.name() == "start")
        .max_by_key(|e| e.at)
    else {
        return false;
    };
    let same_run = |e: &&Ev<'_>| e.proc == last_start.proc && e.attempt() == last_start.attempt();
    let ended_ok = evs
        .iter()
        .filter(same_run)
        .any(|e| e.name() == "end" && e.v["ok"] == true);
    let settled: Vec<&str> = evs
        .iter()
        .filter(same_run)
        .filter(|e| e.name() == "settled")
        .filter_map(|e| e.v["outcome"].as_str())
        .collect();
    ended_ok && (settled.is_empty() || settled == ["failed"])
}

/// A job's events across every process, in time order, and its dead letters.
fn history(evs: &[Ev<'_>], deaths: &[&DeadLetter], procs: &[ProcRecord]) -> String {
    let mut lines: Vec<(u64, String)> = evs
        .iter()
        .map(|e| {
            let detail = match e.name() {
                "settled" => e.v["outcome"].as_str().unwrap_or("").to_owned(),
                "end" => format!("ok={}", e.v["ok"]),
                _ => String::new(),
            };
            (
                e.at,
                format!(
                    "worker#{} {} attempt {} {detail}",
                    e.proc,
                    e.name(),
                    e.attempt()
                ),
            )
        })
        .collect();
    let mut seen = Vec::new();
    for e in evs {
        if let Some(at) = procs[e.proc].killed_at_ms {
            if !seen.contains(&e.proc) {
                seen.push(e.proc);
                lines.push((at, format!("worker#{} killed with SIGKILL", e.proc)));
            }
        }
    }
    lines.sort();
    let mut out = String::new();
    for (at, line) in lines {
        let _ = writeln!(out, "    {at:>8} ms  {line}");
    }
    for d in deaths {
        let _ = writeln!(
            out,
            "    dead letter at attempt {}: {} (history: {:?})",
            d.envelope.attempt,
            d.reason,
            d.envelope
                .history
                .iter()
                .map(|h| format!("{}: {}", h.attempt, h.error))
                .collect::<Vec<_>>()
        );
    }
    out
}
