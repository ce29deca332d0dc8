//! Model-based tests of the [`Broker`] contract.
//!
//! [`check`] generates random sequences of [`Op`]s with proptest, runs each sequence
//! against a backend and against a small reference model of the contract, and after
//! every step compares what can be observed: the result of the step (accepted,
//! refused with `LeaseLost` or `DuplicateJob`), which jobs a fetch returns with their
//! attempt and checkpoint, the depth by state, and the dead letters with their reason.
//! A disagreement fails the case; proptest then shrinks the sequence and prints the
//! smallest one it found together with the trace of what each step did.
//!
//! **Ids.** An id belongs to one job per queue from its enqueue until that job is
//! acked or its dead letter purged: while it is pending, delayed, in flight or dead,
//! an enqueue of the same id in that queue is refused with `DuplicateJob`, writing
//! nothing, and `requeue_dead` skips a dead letter whose id is live. A backend that
//! cannot refuse duplicate ids ([`Broker::refuses_duplicate_ids`] is false) stores
//! every job, and requeues every dead letter asked for.
//!
//! **Time.** Leases and delays are either short ([`ModelConfig::short`]) or long
//! enough never to pass during a case. The [`Op::Wait`] step sleeps past every short
//! lease and delay: on a tokio runtime whose clock is paused the sleep is instant, on
//! a real broker it is a real, bounded wait. A short timer never expires between
//! steps without a wait: when one has run for half its length the driver inserts a
//! wait first, and says so in the trace.
//!
//! **Order.** Jobs pending at once leave in the order they were made pending, released
//! jobs first; jobs made pending by one step (promoted delays, a reap, a requeue of
//! several dead letters) may leave in any order among themselves.
//!
//! Each case uses a queue of its own, so one broker serves every case. Set
//! `PROPTEST_CASES` to change the number of cases; a failing case is saved in
//! `proptest-regressions/model.txt` of the crate under test and replayed first on the
//! next run.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};

use super::unique;
use crate::broker::{Broker, DeadLetter, Delivery, FetchPlan};
use crate::error::BrokerError;
use crate::job::{JobId, NewJob};

/// A lease or delay that never passes within a case.
const LONG: Duration = Duration::from_secs(3600);
/// Explicit ids a sequence draws from, so that ids repeat.
const NAMES: u8 = 2;

/// What a backend does differently from the reference model, and how long its
/// cases may run.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ModelConfig {
    /// Name in the failure message.
    pub name: &'static str,
    /// Whether `enqueue` refuses an id that is live or dead in the queue
    /// (see [`Broker::refuses_duplicate_ids`]).
    pub refuses_duplicate_ids: bool,
    /// Whether `checkpoint` stores progress; when false it must be refused with
    /// `Unsupported` and change nothing.
    pub checkpoints: bool,
    /// Whether the broker moves a due delayed job to pending by itself (AMQP); when
    /// false, it is promoted by the next fetch and counted as `delayed_due` until then.
    pub moves_due_delays: bool,
    /// The short lease and delay.
    pub short: Duration,
    /// How long past `short` a wait step sleeps, for the broker to act on its timers.
    pub settle: Duration,
    /// Sequences to run (`PROPTEST_CASES` overrides).
    pub cases: u32,
    /// Most steps in a sequence.
    pub max_steps: usize,
}

impl ModelConfig {
    /// The reference contract, for a backend named `name`: duplicate ids refused,
    /// checkpoints stored, delayed jobs promoted by fetch; 64 sequences of at most 40
    /// steps with a 200 ms short lease.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            refuses_duplicate_ids: true,
            checkpoints: true,
            moves_due_delays: false,
            short: Duration::from_millis(200),
            settle: Duration::from_millis(50),
            cases: 64,
            max_steps: 40,
        }
    }

    /// The model's view of `broker`'s documented differences (duplicate ids).
    pub fn for_broker(name: &'static str, broker: &dyn Broker) -> Self {
        Self {
            refuses_duplicate_ids: broker.refuses_duplicate_ids(),
            ..Self::new(name)
        }
    }

    /// Whether checkpoints are stored (false: refused with `Unsupported`).
    pub fn checkpoints(mut self, yes: bool) -> Self {
        self.checkpoints = yes;
        self
    }

    /// Whether the broker moves due delayed jobs to pending by itself.
    pub fn moves_due_delays(mut self, yes: bool) -> Self {
        self.moves_due_delays = yes;
        self
    }

    /// The short lease and delay, and how long a wait step sleeps beyond it.
    pub fn short(mut self, short: Duration, settle: Duration) -> Self {
        self.short = short;
        self.settle = settle;
        self
    }

    /// How many sequences, of at most how many steps.
    pub fn cases(mut self, cases: u32, max_steps: usize) -> Self {
        self.cases = cases;
        self.max_steps = max_steps;
        self
    }
}

/// Which id an enqueue gives its job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdChoice {
    /// None: the broker picks a fresh one.
    Auto,
    /// `x0`, `x1`, ...: may repeat an earlier job's id.
    Named(u8),
}

/// How long a lease or delay lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Span {
    /// No delay (a lease is never zero: it is then short).
    Zero,
    /// [`ModelConfig::short`]: passes at the next wait.
    Short,
    /// Never passes within a case.
    Long,
}

/// One step of a sequence. A step that names a lease (`pick`) takes one of the
/// deliveries fetched so far in the case, stale ones included, counting back from the
/// latest (0 is the latest; `pick` modulo their number), so that removing an earlier
/// step while shrinking rarely changes which one; with none yet, it does nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Enqueue one job.
    Enqueue {
        /// Its id.
        id: IdChoice,
        /// Its delay.
        delay: Span,
    },
    /// Fetch up to `n` jobs.
    Fetch {
        /// Most jobs to take.
        n: u8,
        /// Short or long lease.
        lease: Span,
    },
    /// Ack a delivery.
    Ack {
        /// Which delivery.
        pick: u8,
    },
    /// Retry a delivery.
    Retry {
        /// Which delivery.
        pick: u8,
        /// After how long.
        delay: Span,
    },
    /// Dead-letter a delivery.
    DeadLetter {
        /// Which delivery.
        pick: u8,
    },
    /// Release a delivery.
    Release {
        /// Which delivery.
        pick: u8,
    },
    /// Extend a delivery's lease.
    Extend {
        /// Which delivery.
        pick: u8,
        /// Short or long.
        lease: Span,
    },
    /// Save a checkpoint with a delivery.
    Checkpoint {
        /// Which delivery.
        pick: u8,
    },
    /// Let every short lease and delay pass.
    Wait,
    /// Reap expired leases.
    Reap,
    /// Requeue dead letters: all, or those of one id seen in the case.
    RequeueDead {
        /// Which id (modulo the ids seen), or all.
        id: Option<u8>,
    },
    /// Purge dead letters: all, or those of one id seen in the case.
    PurgeDead {
        /// Which id (modulo the ids seen), or all.
        id: Option<u8>,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let id = prop_oneof![Just(IdChoice::Auto), (0..NAMES).prop_map(IdChoice::Named)];
    let delay = prop_oneof![4 => Just(Span::Zero), 3 => Just(Span::Short), 1 => Just(Span::Long)];
    let lease = prop_oneof![2 => Just(Span::Long), 1 => Just(Span::Short)];
    let pick = 0u8..8;
    let which = proptest::option::of(0u8..4);
    prop_oneof![
        5 => (id, delay.clone()).prop_map(|(id, delay)| Op::Enqueue { id, delay }),
        4 => (1u8..=3, lease.clone()).prop_map(|(n, lease)| Op::Fetch { n, lease }),
        2 => pick.clone().prop_map(|pick| Op::Ack { pick }),
        2 => (pick.clone(), delay).prop_map(|(pick, delay)| Op::Retry { pick, delay }),
        2 => pick.clone().prop_map(|pick| Op::DeadLetter { pick }),
        1 => pick.clone().prop_map(|pick| Op::Release { pick }),
        1 => (pick.clone(), lease).prop_map(|(pick, lease)| Op::Extend { pick, lease }),
        1 => pick.prop_map(|pick| Op::Checkpoint { pick }),
        2 => Just(Op::Wait),
        1 => Just(Op::Reap),
        1 => which.clone().prop_map(|id| Op::RequeueDead { id }),
        1 => which.prop_map(|id| Op::PurgeDead { id }),
    ]
}

/// Run `config.cases` random sequences against `broker` on `rt` and the model; panic
/// with the shrunk sequence and its trace at the first disagreement.
///
/// `rt` is the runtime the broker lives on (the memory broker's tests pause its
/// clock). Failing cases are saved in `proptest-regressions/model.txt`, relative to
/// the working directory (the crate's, under `cargo test`), and replayed first.
pub fn check(rt: &tokio::runtime::Runtime, broker: &dyn Broker, config: &ModelConfig) {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(config.cases);
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 2048,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/model.txt",
        ))),
        ..Config::default()
    });
    let strategy = proptest::collection::vec(op_strategy(), 1..=config.max_steps);
    let result = runner.run(&strategy, |ops| {
        rt.block_on(run(broker, config, &ops))
            .map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{}: the broker disagrees with the model.\n{e}", config.name);
    }
}

/// Run one sequence against `broker` and the model, on a queue of its own: `Ok` when
/// they agree at every step, else the first disagreement with the trace up to it.
pub async fn run(broker: &dyn Broker, config: &ModelConfig, ops: &[Op]) -> Result<(), String> {
    let mut h = Harness::new(broker, config);
    for &op in ops {
        if let Err(e) = h.step(op).await {
            return Err(format!(
                "{e}\nqueue {}; trace:\n{}",
                h.queue,
                h.trace.join("\n")
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The model.

#[derive(Clone, Debug, PartialEq)]
enum State {
    Pending,
    Delayed {
        due: bool,
        short: bool,
    },
    InFlight {
        delivery: usize,
        short: bool,
        expired: bool,
    },
    Dead {
        reason: String,
    },
    Gone,
}

#[derive(Clone, Debug)]
struct Job {
    id: String,
    payload: String,
    attempt: u32,
    checkpoint: Option<String>,
    state: State,
}

#[derive(Default)]
struct Model {
    jobs: Vec<Job>,
    /// Pending jobs, front first, in groups whose members may leave in any order.
    pending: VecDeque<Vec<usize>>,
    /// Delayed jobs in the order their delays began (short ones pass in that order).
    delayed: Vec<usize>,
}

impl Model {
    fn live_or_dead(&self, id: &str) -> bool {
        self.jobs
            .iter()
            .any(|j| j.id == id && !matches!(j.state, State::Gone))
    }

    fn is_live(&self, id: &str) -> bool {
        self.jobs
            .iter()
            .any(|j| j.id == id && !matches!(j.state, State::Gone | State::Dead { .. }))
    }

    fn push_back(&mut self, group: Vec<usize>) {
        for &j in &group {
            self.jobs[j].state = State::Pending;
        }
        if !group.is_empty() {
            self.pending.push_back(group);
        }
    }

    fn delay(&mut self, job: usize, span: Span) {
        match span {
            Span::Zero => self.push_back(vec![job]),
            Span::Short | Span::Long => {
                self.jobs[job].state = State::Delayed {
                    due: false,
                    short: span == Span::Short,
                };
                self.delayed.push(job);
            }
        }
    }

    /// Due delayed jobs become pending, as one group.
    fn promote(&mut self) {
        let (due, rest): (Vec<usize>, Vec<usize>) = self
            .delayed
            .iter()
            .partition(|&&j| matches!(self.jobs[j].state, State::Delayed { due: true, .. }));
        self.delayed = rest;
        self.push_back(due);
    }

    /// Every short lease and delay passes.
    fn wait(&mut self, moves_due_delays: bool) {
        for j in &mut self.jobs {
            match &mut j.state {
                State::Delayed { due, short: true } => *due = true,
                State::InFlight {
                    short: true,
                    expired,
                    ..
                } => *expired = true,
                _ => {}
            }
        }
        if moves_due_delays {
            self.promote();
        }
    }

    fn count(&self, f: impl Fn(&State) -> bool) -> u64 {
        self.jobs.iter().filter(|j| f(&j.state)).count() as u64
    }

    /// (pending, in flight, delayed, delayed due, dead)
    fn depth(&self) -> (u64, u64, u64, u64, u64) {
        (
            self.count(|s| matches!(s, State::Pending)),
            self.count(|s| matches!(s, State::InFlight { .. })),
            self.count(|s| matches!(s, State::Delayed { .. })),
            self.count(|s| matches!(s, State::Delayed { due: true, .. })),
            self.count(|s| matches!(s, State::Dead { .. })),
        )
    }

    /// Dead letters as (id, payload, reason, attempt, checkpoint), sorted.
    fn dead(&self) -> Vec<DeadView> {
        let mut out: Vec<DeadView> = self
            .jobs
            .iter()
            .filter_map(|j| match &j.state {
                State::Dead { reason } => Some(DeadView {
                    id: j.id.clone(),
                    payload: j.payload.clone(),
                    reason: reason.clone(),
                    attempt: j.attempt,
                    checkpoint: j.checkpoint.clone(),
                }),
                _ => None,
            })
            .collect();
        out.sort();
        out
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct DeadView {
    id: String,
    payload: String,
    reason: String,
    attempt: u32,
    checkpoint: Option<String>,
}

/// What a step returned, as far as the contract says.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    LeaseLost,
    Duplicate,
    Unsupported,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

fn outcome<T>(r: Result<T, BrokerError>) -> Result<Outcome, String> {
    match r {
        Ok(_) => Ok(Outcome::Ok),
        Err(BrokerError::LeaseLost { .. }) => Ok(Outcome::LeaseLost),
        Err(BrokerError::DuplicateJob { .. }) => Ok(Outcome::Duplicate),
        Err(BrokerError::Unsupported { .. }) => Ok(Outcome::Unsupported),
        Err(e) => Err(format!("unexpected broker error: {e}")),
    }
}

fn expect<T: PartialEq + fmt::Debug>(what: &str, broker: T, model: T) -> Result<(), String> {
    if broker == model {
        Ok(())
    } else {
        Err(format!(
            "DISAGREEMENT on {what}: broker {broker:?}, model {model:?}"
        ))
    }
}

// ---------------------------------------------------------------------------------
// The driver.

struct Harness<'a> {
    b: &'a dyn Broker,
    cfg: &'a ModelConfig,
    queue: String,
    model: Model,
    /// Every delivery of the case: its delivery and the model's job.
    deliveries: Vec<(Delivery, usize)>,
    /// Ids seen in the case, in order of first use.
    ids: Vec<String>,
    /// When the oldest short timer not yet waited out started.
    short_since: Option<tokio::time::Instant>,
    trace: Vec<String>,
}

impl<'a> Harness<'a> {
    fn new(b: &'a dyn Broker, cfg: &'a ModelConfig) -> Self {
        Self {
            b,
            cfg,
            queue: unique("model"),
            model: Model::default(),
            deliveries: Vec::new(),
            ids: Vec::new(),
            short_since: None,
            trace: Vec::new(),
        }
    }

    fn span(&self, s: Span) -> Duration {
        match s {
            Span::Zero => Duration::ZERO,
            Span::Short => self.cfg.short,
            Span::Long => LONG,
        }
    }

    fn lease_span(&self, s: Span) -> Duration {
        match s {
            Span::Long => LONG,
            Span::Zero | Span::Short => self.cfg.short,
        }
    }

    fn timer(&mut self, s: Span) {
        if s != Span::Long && self.short_since.is_none() {
            self.short_since = Some(tokio::time::Instant::now());
        }
    }

    fn seen(&mut self, id: &str) {
        if !self.ids.iter().any(|i| i == id) {
            self.ids.push(id.to_owned());
        }
    }

    /// The delivery `pick` names: its index, the delivery and its job.
    fn pick(&self, pick: u8) -> Option<(usize, Delivery, usize)> {
        let n = self.deliveries.len();
        let index = n.checked_sub(1 + pick as usize % n.max(1))?;
        let (delivery, job) = self.deliveries[index].clone();
        Some((index, delivery, job))
    }

    /// Whether `delivery` (index) owns its job in the model.
    fn owns(&self, delivery: usize, job: usize) -> bool {
        matches!(self.model.jobs[job].state, State::InFlight { delivery: d, .. } if d == delivery)
    }

    /// Sleep past every short lease and delay begun so far.
    async fn wait(&mut self) {
        tokio::time::sleep(self.cfg.short + self.cfg.settle).await;
        self.model.wait(self.cfg.moves_due_delays);
        self.short_since = None;
    }

    /// Wait out the short timers if the oldest has run for half its length, so that
    /// none passes unseen before the next wait.
    async fn keep_time(&mut self) {
        if self
            .short_since
            .is_some_and(|since| since.elapsed() > self.cfg.short / 2)
        {
            self.wait().await;
            self.trace
                .push("  Wait (inserted: a short timer ran for half its length)".into());
        }
    }

    async fn step(&mut self, op: Op) -> Result<(), String> {
        self.keep_time().await;
        let note = match self.apply(op).await {
            Ok(note) => note,
            Err(e) => {
                self.trace.push(format!("  {op:?} <- failed here"));
                return Err(e);
            }
        };
        self.trace.push(format!("  {op:?}{note}"));
        self.keep_time().await;
        let checked = self.check_depth().await;
        if checked.is_err() {
            self.trace.push("  (depth after it) <- failed here".into());
        }
        checked
    }

    async fn check_depth(&self) -> Result<(), String> {
        let d = self
            .b
            .depth(&self.queue)
            .await
            .map_err(|e| format!("depth: {e}"))?;
        expect(
            "depth (pending, in_flight, delayed, delayed_due, dead)",
            (d.pending, d.in_flight, d.delayed, d.delayed_due, d.dead),
            self.model.depth(),
        )
    }

    async fn check_dead(&self) -> Result<(), String> {
        let letters = self
            .b
            .dead_letters(&self.queue, 1000)
            .await
            .map_err(|e| format!("dead_letters: {e}"))?;
        let mut seen: Vec<DeadView> = letters.iter().map(|d| self.dead_view(d)).collect();
        seen.sort();
        expect("dead letters", seen, self.model.dead())
    }

    fn dead_view(&self, d: &DeadLetter) -> DeadView {
        DeadView {
            id: d.envelope.id.to_string(),
            payload: String::from_utf8_lossy(&d.envelope.payload).into_owned(),
            reason: d.reason.clone(),
            attempt: d.envelope.attempt,
            checkpoint: self.checkpoint_of(&d.envelope.checkpoint),
        }
    }

    fn checkpoint_of(&self, c: &Option<Bytes>) -> Option<String> {
        c.as_ref()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .filter(|_| self.cfg.checkpoints)
    }

    /// Apply `op` to the broker and the model; a note for the trace.
    async fn apply(&mut self, op: Op) -> Result<String, String> {
        match op {
            Op::Enqueue { id, delay } => self.enqueue(id, delay).await,
            Op::Fetch { n, lease } => self.fetch(n, lease).await,
            Op::Ack { pick } => self.settle(pick, Settle::Ack).await,
            Op::Retry { pick, delay } => self.settle(pick, Settle::Retry(delay)).await,
            Op::DeadLetter { pick } => self.settle(pick, Settle::Dead).await,
            Op::Release { pick } => self.settle(pick, Settle::Release).await,
            Op::Extend { pick, lease } => self.settle(pick, Settle::Extend(lease)).await,
            Op::Checkpoint { pick } => self.settle(pick, Settle::Checkpoint).await,
            Op::Wait => {
                self.wait().await;
                Ok(String::new())
            }
            Op::Reap => {
                let expired: Vec<usize> = (0..self.model.jobs.len())
                    .filter(|&j| {
                        matches!(
                            self.model.jobs[j].state,
                            State::InFlight { expired: true, .. }
                        )
                    })
                    .collect();
                let n = self
                    .b
                    .reap_expired(std::slice::from_ref(&self.queue))
                    .await
                    .map_err(|e| format!("reap_expired: {e}"))?;
                expect("jobs reaped", n, expired.len() as u64)?;
                for &j in &expired {
                    self.model.jobs[j].attempt += 1;
                }
                self.model.push_back(expired);
                Ok(format!(" -> {n}"))
            }
            Op::RequeueDead { id } => self.dead_op(id, true).await,
            Op::PurgeDead { id } => self.dead_op(id, false).await,
        }
    }

    async fn enqueue(&mut self, id: IdChoice, delay: Span) -> Result<String, String> {
        let n = self.model.jobs.len();
        let payload = format!("p{n}");
        let mut job = NewJob::new(&self.queue, payload.clone());
        let named = match id {
            IdChoice::Auto => None,
            IdChoice::Named(k) => Some(format!("x{}", k % NAMES)),
        };
        if let Some(name) = &named {
            job = job.id(name.as_str());
        }
        let d = self.span(delay);
        if !d.is_zero() {
            job = job.delay(d);
        }
        let refused = self.cfg.refuses_duplicate_ids
            && named.as_deref().is_some_and(|i| self.model.live_or_dead(i));
        let result = self.b.enqueue(vec![job]).await;
        let got = match &result {
            Ok(ids) => ids.first().map(JobId::to_string),
            Err(_) => None,
        };
        let want = if refused {
            Outcome::Duplicate
        } else {
            Outcome::Ok
        };
        expect("enqueue result", outcome(result)?, want)?;
        if refused {
            return Ok(" -> DuplicateJob".into());
        }
        let Some(id) = got else {
            return Err("enqueue returned no id".into());
        };
        if let Some(name) = &named {
            expect("enqueued id", &id, name)?;
        }
        self.seen(&id);
        self.model.jobs.push(Job {
            id: id.clone(),
            payload,
            attempt: 1,
            checkpoint: None,
            state: State::Gone,
        });
        self.model.delay(n, delay);
        self.timer(delay);
        Ok(format!(" -> {id} (payload p{n})"))
    }

    async fn fetch(&mut self, n: u8, lease: Span) -> Result<String, String> {
        if !self.cfg.moves_due_delays {
            self.model.promote();
        }
        let available: usize = self.model.pending.iter().map(Vec::len).sum();
        let plan = FetchPlan::single(&self.queue, u32::from(n), self.lease_span(lease));
        let got = self
            .b
            .fetch(&plan)
            .await
            .map_err(|e| format!("fetch: {e}"))?;
        self.timer(lease);
        let mut note = Vec::new();
        for d in &got {
            let payload = String::from_utf8_lossy(&d.envelope.payload).into_owned();
            note.push(format!(
                "{}/{payload}#{}",
                d.envelope.id, d.envelope.attempt
            ));
        }
        let note = format!(" -> [{}]", note.join(", "));
        expect(
            &format!("number of jobs fetched{note}"),
            got.len(),
            available.min(usize::from(n)),
        )?;
        for d in got {
            let payload = String::from_utf8_lossy(&d.envelope.payload).into_owned();
            let Some(job) = self.model.jobs.iter().position(|j| j.payload == payload) else {
                return Err(format!("fetch{note}: payload {payload} was never enqueued"));
            };
            let front = self.model.pending.front_mut();
            let Some(pos) = front
                .as_ref()
                .and_then(|g| g.iter().position(|&j| j == job))
            else {
                return Err(format!(
                    "DISAGREEMENT on fetch{note}: {payload} is not next; the model's pending \
                     jobs, front first: {:?}",
                    self.pending_view()
                ));
            };
            if let Some(group) = front {
                group.remove(pos);
                if group.is_empty() {
                    self.model.pending.pop_front();
                }
            }
            let j = &self.model.jobs[job];
            expect(
                &format!("id of {payload}"),
                d.envelope.id.to_string(),
                j.id.clone(),
            )?;
            expect(
                &format!("attempt of {payload}"),
                d.envelope.attempt,
                j.attempt,
            )?;
            expect(
                &format!("checkpoint of {payload}"),
                self.checkpoint_of(&d.envelope.checkpoint),
                j.checkpoint.clone(),
            )?;
            self.model.jobs[job].state = State::InFlight {
                delivery: self.deliveries.len(),
                short: lease != Span::Long,
                expired: false,
            };
            self.deliveries.push((d, job));
        }
        Ok(note)
    }

    fn pending_view(&self) -> Vec<Vec<String>> {
        self.model
            .pending
            .iter()
            .map(|g| {
                g.iter()
                    .map(|&j| self.model.jobs[j].payload.clone())
                    .collect()
            })
            .collect()
    }

    async fn settle(&mut self, pick: u8, how: Settle) -> Result<String, String> {
        let Some((index, delivery, job)) = self.pick(pick) else {
            return Ok(" (no delivery yet: nothing done)".into());
        };
        let owns = self.owns(index, job);
        let lease = &delivery.lease;
        let result = match how {
            Settle::Ack => self.b.ack(lease).await,
            Settle::Retry(delay) => {
                self.b
                    .retry_after(lease, self.span(delay), &format!("retry {index}"))
                    .await
            }
            Settle::Dead => self.b.dead_letter(lease, &format!("dead {index}")).await,
            Settle::Release => self.b.release(lease).await,
            Settle::Extend(span) => self.b.extend_lease(lease, self.lease_span(span)).await,
            Settle::Checkpoint => {
                let mut env = delivery.envelope.clone();
                env.checkpoint = Some(Bytes::from(format!("c{}", self.trace.len())));
                self.b.checkpoint(lease, &env).await
            }
        };
        let got = outcome(result)?;
        let want = match how {
            Settle::Checkpoint if !self.cfg.checkpoints => Outcome::Unsupported,
            _ if owns => Outcome::Ok,
            _ => Outcome::LeaseLost,
        };
        let note = format!(
            " on delivery {index} of {}/{} -> {got}",
            delivery.envelope.id,
            String::from_utf8_lossy(&delivery.envelope.payload)
        );
        expect(&format!("result of {how:?}{note}"), &got, &want)?;
        if want != Outcome::Ok {
            return Ok(note);
        }
        let m = &mut self.model;
        match how {
            Settle::Ack => m.jobs[job].state = State::Gone,
            Settle::Retry(delay) => {
                m.jobs[job].attempt += 1;
                m.delay(job, delay);
                self.timer(delay);
            }
            Settle::Dead => {
                m.jobs[job].state = State::Dead {
                    reason: format!("dead {index}"),
                };
            }
            Settle::Release => {
                m.jobs[job].state = State::Pending;
                m.pending.push_front(vec![job]);
            }
            Settle::Extend(span) => {
                m.jobs[job].state = State::InFlight {
                    delivery: index,
                    short: span != Span::Long,
                    expired: false,
                };
                self.timer(span);
            }
            Settle::Checkpoint => {
                m.jobs[job].checkpoint = Some(format!("c{}", self.trace.len()));
            }
        }
        if matches!(how, Settle::Dead) {
            self.check_dead().await?;
        }
        Ok(note)
    }

    async fn dead_op(&mut self, id: Option<u8>, requeue: bool) -> Result<String, String> {
        let id = id.map(|k| {
            if self.ids.is_empty() {
                "x0".to_owned()
            } else {
                self.ids[k as usize % self.ids.len()].clone()
            }
        });
        let chosen: Vec<usize> = (0..self.model.jobs.len())
            .filter(|&j| {
                let job = &self.model.jobs[j];
                matches!(job.state, State::Dead { .. }) && id.as_ref().is_none_or(|i| *i == job.id)
            })
            .collect();
        let ids: Vec<JobId> = id.iter().map(|i| JobId::from(i.as_str())).collect();
        let n = if requeue {
            self.b.requeue_dead(&self.queue, &ids).await
        } else {
            self.b.purge_dead(&self.queue, &ids).await
        }
        .map_err(|e| format!("requeue/purge: {e}"))?;
        let moved: Vec<usize> = if requeue && self.cfg.refuses_duplicate_ids {
            chosen
                .into_iter()
                .filter(|&j| !self.model.is_live(&self.model.jobs[j].id))
                .collect()
        } else {
            chosen
        };
        let what = if requeue { "requeued" } else { "purged" };
        let note = format!(" ({}) -> {n}", id.as_deref().unwrap_or("all"));
        expect(&format!("dead letters {what}{note}"), n, moved.len() as u64)?;
        if requeue {
            for &j in &moved {
                self.model.jobs[j].attempt = 1;
            }
            self.model.push_back(moved);
        } else {
            for &j in &moved {
                self.model.jobs[j].state = State::Gone;
            }
        }
        self.check_dead().await?;
        Ok(note)
    }
}

#[derive(Clone, Copy, Debug)]
enum Settle {
    Ack,
    Retry(Span),
    Dead,
    Release,
    Extend(Span),
    Checkpoint,
}
