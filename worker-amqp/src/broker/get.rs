//! [`FetchMode::Get`](crate::FetchMode::Get): jobs taken with `basic.get`, exactly
//! as many as the worker can start, however many queues it consumes.
//!
//! RabbitMQ's prefetch is per consumer, and global QoS is deprecated and refused by
//! quorum queues, so a process that consumes N queues through consumers may hold N
//! prefetches. In get mode a fetch asks each queue for its part of the worker's
//! weighted plan and nothing more. When a fetch finds nothing, the worker waits on
//! doorbells: one consumer of prefetch 1 per queue, each free to deliver one job.
//! The first fetch after one delivers cancels them all, keeps what they delivered
//! that the plan can start, and hands the rest back. An idle worker therefore costs
//! the broker nothing, and a busy one holds only the jobs it runs.
//!
//! Every get, doorbell and ack of the process is on one channel. Doorbells change
//! one at a time (`Inner::turn`); fetches may overlap, each with the jobs it got.

use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::join_all;

use super::*;

/// The channel of get mode on one session.
pub(super) struct PullChannel {
    gen: u64,
    channel: Channel,
    settler: Settler,
}

impl PullChannel {
    /// Whether `r` was received on this channel.
    pub(super) fn holds(&self, r: &Received) -> bool {
        r.gen == self.gen && r.channel.id() == self.channel.id()
    }
}

/// Rounds of gets in one fetch: one job from each queue whose count is unknown, the
/// rest of each queue's part as counted, then what a queue that came back short
/// leaves to the others.
const ROUNDS: usize = 4;

impl Inner {
    pub(super) fn getting(&self) -> bool {
        self.config.fetch_mode == FetchMode::Get
    }

    /// The get-mode channel of `s`, opened on first use. Its per-consumer prefetch,
    /// which only the doorbells use, is 1. Call with the turn held.
    async fn pull_channel(&self, s: &Session) -> Result<(Channel, Settler), BrokerError> {
        if let Some(ch) = self.live_pull_channel(s.gen) {
            return Ok(ch);
        }
        let (channel, settler) = self.open_channel(s, "get mode", 1).await?;
        let mut guard = self.state();
        let st = &mut *guard;
        // What the last channel held went back to the broker when it closed.
        let mut old = Vec::new();
        for (q, qs) in st.queues.iter_mut() {
            if let Some(c) = qs.consuming.take() {
                old.push((q.clone(), c));
            }
            st.returned.drop_closed(&mut qs.ready);
        }
        drop(guard);
        for (q, c) in &old {
            self.forget_consumer(q, c);
        }
        let mut guard = self.state();
        guard.pull = Some(PullChannel {
            gen: s.gen,
            channel: channel.clone(),
            settler: settler.clone(),
        });
        Ok((channel, settler))
    }

    /// The get-mode channel of session `gen` and its settler, if it is open.
    fn live_pull_channel(&self, gen: u64) -> Option<(Channel, Settler)> {
        let st = self.state();
        st.pull
            .as_ref()
            .filter(|p| p.gen == gen && p.channel.status().connected())
            .map(|p| (p.channel.clone(), p.settler.clone()))
    }

    /// Whether a doorbell listens on `queue` on the open get-mode channel.
    fn listening(st: &State, queue: &str) -> bool {
        let Some(p) = st.pull.as_ref() else {
            return false;
        };
        st.queues
            .get(queue)
            .and_then(|q| q.consuming.as_ref())
            .is_some_and(|c| {
                c.gen == p.gen && c.channel.id() == p.channel.id() && c.channel.status().connected()
            })
    }

    /// Start a doorbell on each of `queues` that has none and is not stopped.
    pub(super) async fn ring_on(&self, queues: &[String]) -> Result<(), BrokerError> {
        let s = self.sessions.get().await?;
        let _turn = self.turn.lock().await;
        let (channel, settler) = self.pull_channel(&s).await?;
        let needed: Vec<String> = {
            let st = self.state();
            queues
                .iter()
                .filter(|q| {
                    !st.queues.get(*q).is_some_and(|qs| qs.stopped) && !Self::listening(&st, q)
                })
                .cloned()
                .collect()
        };
        for q in &needed {
            topology::check_queue(q)?;
            self.declare_work(&s, q).await?;
        }
        let args = self.consumer_args();
        let calm = settler.calm().await;
        let started = join_all(needed.iter().map(|q| {
            let channel = channel.clone();
            let args = args.clone();
            let tag = consumer_tag();
            async move {
                let consumer = channel
                    .basic_consume(q, &tag, BasicConsumeOptions::default(), args)
                    .await;
                (q, tag, consumer)
            }
        }))
        .await;
        drop(calm);
        let mut failed = None;
        let mut st = self.state();
        for (q, tag, consumer) in started {
            match consumer {
                Ok(consumer) => {
                    st.queues.entry(q.clone()).or_default().consuming = Some(Arc::new(Consuming {
                        gen: s.gen,
                        channel: channel.clone(),
                        settler: settler.clone(),
                        consumer,
                        tag,
                    }));
                }
                Err(e) => failed = Some((q, e)),
            }
        }
        drop(st);
        match failed {
            Some((q, e)) => Err(self.failed(&s, &format!("consume {q}"), e)),
            None => Ok(()),
        }
    }

    /// Cancel every doorbell; what they delivered goes to the ready lists.
    async fn silence(&self) {
        let rung: Vec<(String, Arc<Consuming>)> = {
            let mut st = self.state();
            st.queues
                .iter_mut()
                .filter_map(|(q, qs)| qs.consuming.take().map(|c| (q.clone(), c)))
                .collect()
        };
        join_all(rung.iter().map(|(q, c)| async move {
            let calm = c.settler.calm().await;
            let cancelled = c
                .channel
                .basic_cancel(&c.tag, BasicCancelOptions::default())
                .await;
            drop(calm);
            if let Err(e) = cancelled {
                // The channel is gone, and with it what the doorbell held.
                tracing::debug!(queue = %q, error = %e, "amqp: cancel doorbell");
            }
        }))
        .await;
        for (q, c) in &rung {
            self.take_cancelled(q, c);
        }
    }

    /// Fetch `plan` with gets: see the module documentation.
    pub(super) async fn fetch_by_get(
        &self,
        plan: &FetchPlan,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let queues: Vec<String> = plan.shares.iter().map(|sh| sh.queue.clone()).collect();
        for q in &queues {
            topology::check_queue(q)?;
            self.move_delayed(q);
        }
        let s = self.sessions.get().await?;
        let _fetching = Fetching::new(&self.fetching);
        let channel = {
            let _turn = self.turn.lock().await;
            let channel = self.pull_channel(&s).await?;
            for q in &queues {
                self.pull(q);
            }
            {
                let st = self.state();
                let rung = queues
                    .iter()
                    .any(|q| st.queues.get(q).is_some_and(|qs| !qs.ready.is_empty()));
                if !rung && queues.iter().all(|q| Self::listening(&st, q)) {
                    // Each doorbell may deliver one job and has delivered none: its
                    // queue had nothing ready when the broker last looked.
                    return Ok(Vec::new());
                }
            }
            self.silence().await;
            channel
        };
        // This fetch's jobs: first what doorbells delivered or jobs released, as far
        // as the plan takes them; then gets.
        let (mut mine, open) = {
            let mut st = self.state();
            let take = plan.allocate(&st.ready_counts(&queues));
            let mut mine: Vec<VecDeque<Received>> = Vec::with_capacity(queues.len());
            let mut open = Vec::with_capacity(queues.len());
            for (q, n) in queues.iter().zip(take) {
                let qs = st.queues.entry(q.clone()).or_default();
                let n = (n as usize).min(qs.ready.len());
                mine.push(qs.ready.drain(..n).collect());
                open.push(!qs.stopped);
            }
            (mine, open)
        };
        let got = self
            .get_rounds(&s, &channel, plan, &queues, &open, &mut mine)
            .await;
        // What the plan takes is leased; the rest goes back to its queue at once (all
        // of it when a get failed).
        let lease_until = Instant::now() + plan.lease;
        let available: Vec<u64> = mine.iter().map(|m| m.len() as u64).collect();
        let take = match got {
            Ok(()) => plan.allocate(&available),
            Err(_) => vec![0; queues.len()],
        };
        let mut out = Vec::with_capacity(take.iter().sum::<u32>() as usize);
        {
            let mut st = self.state();
            for (m, n) in mine.iter_mut().zip(take) {
                for r in m.drain(..(n as usize).min(m.len())) {
                    out.push(st.lease(r, lease_until));
                }
            }
        }
        let mut beyond: Vec<Received> = mine.into_iter().flatten().collect();
        if self.fetching.load(Ordering::SeqCst) == 1 {
            // No other fetch may take what a doorbell delivered beyond this plan.
            let mut st = self.state();
            for qs in st.queues.values_mut() {
                beyond.extend(qs.ready.drain(..));
            }
        }
        if !beyond.is_empty() {
            tracing::debug!(
                jobs = beyond.len(),
                "amqp: handing back jobs beyond the plan"
            );
        }
        for r in beyond {
            let queue = r.envelope.queue.clone();
            if let Err((e, r)) = self.hand_back(&s, r).await {
                // Kept: the next fetch starts it or tries again.
                tracing::warn!(queue = %queue, error = %e, "amqp: could not hand a job back yet");
                self.state()
                    .queues
                    .entry(queue)
                    .or_default()
                    .ready
                    .push_front(r);
            }
        }
        got.map(|()| out)
    }

    /// Get jobs of `queues` into `mine` (one list per queue, what the fetch holds
    /// already) until each has its part of `plan`: see [`ROUNDS`]. `open[i]` is false
    /// for a queue no longer fetched.
    async fn get_rounds(
        &self,
        s: &Session,
        (channel, settler): &(Channel, Settler),
        plan: &FetchPlan,
        queues: &[String],
        open: &[bool],
        mine: &mut [VecDeque<Received>],
    ) -> Result<(), BrokerError> {
        let mut exhausted: Vec<bool> = open.iter().map(|o| !o).collect();
        // What the broker said is left in each queue after its last get.
        let mut left: Vec<Option<u64>> = vec![None; queues.len()];
        for _ in 0..ROUNDS {
            let have: Vec<u64> = mine.iter().map(|m| m.len() as u64).collect();
            let available: Vec<u64> = (0..queues.len())
                .map(|i| match (exhausted[i], left[i]) {
                    (true, _) => have[i],
                    (false, Some(n)) => have[i] + n,
                    (false, None) => u64::MAX,
                })
                .collect();
            // A queue whose count is unknown is asked for one job first: its answer
            // says how many more there are, so no get comes back empty in vain.
            let want: Vec<u64> = plan
                .allocate(&available)
                .iter()
                .zip(&have)
                .zip(&left)
                .map(|((&a, &h), known)| {
                    let w = u64::from(a).saturating_sub(h);
                    if known.is_some() {
                        w
                    } else {
                        w.min(1)
                    }
                })
                .collect();
            if want.iter().all(|&w| w == 0) {
                return Ok(());
            }
            for (q, _) in queues.iter().zip(&want).filter(|(_, &w)| w > 0) {
                self.declare_work(s, q).await?;
            }
            // Every get on the wire before the first answer is awaited: one round trip.
            let gets = queues
                .iter()
                .enumerate()
                .flat_map(|(i, q)| std::iter::repeat_n((i, q), want[i] as usize))
                .map(|(i, q)| {
                    let channel = channel.clone();
                    async move { (i, channel.basic_get(q, BasicGetOptions::default()).await) }
                });
            let calm = settler.calm().await;
            let answers = join_all(gets).await;
            drop(calm);
            let mut failure = None;
            for (i, got) in answers {
                match got {
                    Ok(Some(m)) => {
                        let count = u64::from(m.message_count);
                        left[i] = Some(left[i].map_or(count, |n| n.min(count)));
                        let d = m.delivery;
                        let mut envelope =
                            decode(&queues[i], d.data, &d.properties, d.redelivered).envelope;
                        self.state().returned.correct(&mut envelope);
                        mine[i].push_back(Received {
                            tag: d.delivery_tag,
                            channel: channel.clone(),
                            settler: settler.clone(),
                            gen: s.gen,
                            envelope,
                        });
                    }
                    Ok(None) => exhausted[i] = true,
                    Err(e) => failure = Some(e),
                }
            }
            if let Some(e) = failure {
                // The channel is closed: what it got goes back to the queues with it.
                return Err(self.failed(s, "get", e));
            }
        }
        Ok(())
    }
}

/// Counts the fetches in progress while it lives.
struct Fetching<'a>(&'a AtomicUsize);

impl<'a> Fetching<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
