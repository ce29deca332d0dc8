//! Process limits as semaphores, taken *before* work is pulled (no hoarding):
//!
//! * `held` — jobs this process holds, fetched and not yet settled:
//!   concurrency + prefetch. The fetcher takes one permit per job it asks for.
//! * `run` — jobs running at once: concurrency.
//! * `budget` — weighted units (e.g. MiB); a job holds its cost while it runs.
//!   tokio's semaphore is FIFO, so a large job waiting is not overtaken forever by small ones.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::WorkerConfig;

#[derive(Debug)]
pub(crate) struct Limits {
    pub(crate) held: Arc<Semaphore>,
    pub(crate) run: Arc<Semaphore>,
    pub(crate) budget: Option<(Arc<Semaphore>, u32)>,
}

/// What a running job holds; dropping it gives everything back.
#[derive(Debug)]
pub(crate) struct RunPermits {
    _run: OwnedSemaphorePermit,
    _units: Option<OwnedSemaphorePermit>,
}

impl Limits {
    pub(crate) fn new(config: &WorkerConfig) -> Self {
        Self {
            held: Arc::new(Semaphore::new(
                (config.concurrency + config.prefetch) as usize,
            )),
            run: Arc::new(Semaphore::new(config.concurrency as usize)),
            budget: config
                .budget
                .map(|units| (Arc::new(Semaphore::new(units as usize)), units)),
        }
    }

    /// Units a job of `cost` must hold: 0 when no budget is configured.
    pub(crate) fn units_for(&self, cost: u32) -> u32 {
        if self.budget.is_some() {
            cost
        } else {
            0
        }
    }

    /// Whether a job of `cost` can never start here (it exceeds the whole budget).
    pub(crate) fn exceeds_budget(&self, cost: u32) -> Option<u32> {
        self.budget
            .as_ref()
            .and_then(|(_, total)| (cost > *total).then_some(*total))
    }

    /// Take the permits without waiting, if free now.
    pub(crate) fn try_start(&self, units: u32) -> Option<RunPermits> {
        let units = match (&self.budget, units) {
            (Some((sem, _)), n) if n > 0 => Some(sem.clone().try_acquire_many_owned(n).ok()?),
            _ => None,
        };
        let run = self.run.clone().try_acquire_owned().ok()?;
        Some(RunPermits {
            _run: run,
            _units: units,
        })
    }

    /// Wait for the permits: budget units first (FIFO), then a run permit.
    pub(crate) async fn start(&self, units: u32) -> Option<RunPermits> {
        let units = match (&self.budget, units) {
            (Some((sem, _)), n) if n > 0 => Some(sem.clone().acquire_many_owned(n).await.ok()?),
            _ => None,
        };
        let run = self.run.clone().acquire_owned().await.ok()?;
        Some(RunPermits {
            _run: run,
            _units: units,
        })
    }

    /// Budget units in use, if a budget is configured.
    pub(crate) fn budget_used(&self) -> Option<(u32, u32)> {
        self.budget
            .as_ref()
            .map(|(sem, total)| (total - sem.available_permits() as u32, *total))
    }
}
