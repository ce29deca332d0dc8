//! GPU inference pool: jobs run in dynamic micro-batches, one batch at a time per
//! visible GPU.
//!
//! Run with: `cargo run -p gpu-inference` (in-memory broker, a few seeded requests;
//! Ctrl-C to stop), or with `REDIS_URL` / `AMQP_URL` to consume a real queue.
//!
//! - Streams: one per GPU in `CUDA_VISIBLE_DEVICES` / `NVIDIA_VISIBLE_DEVICES`, else
//!   `BATCH_STREAMS`, else 1. A batch runs on one stream, never two at once.
//! - Batches: up to `BATCH_MAX_SIZE` requests (default 8), or whatever arrived within
//!   `BATCH_MAX_WAIT` (default 20ms) of the first.
//! - `WORKER_CONCURRENCY` defaults to `BATCH_MAX_SIZE × streams`, so every stream can
//!   run a full batch; the other `WORKER_*` settings apply as for any worker.
//!
//! The model is a real computation standing in for the GPU: each request
//! `{"size": n, "steps": k, "fail": false}` multiplies an n×n matrix k times on the
//! CPU (in `spawn_blocking`). A request with `"fail": true`, or a size over 1024, fails
//! alone; its batch-mates succeed. A batch cut short by the drain deadline stops
//! between steps, and its unfinished requests go back to the queue.
//!
//! It prints JSON lines on stdout for tests: `batch` (stream, size, how it formed,
//! the ids), `end` per request, and `stopped` with the run report.

use std::process::ExitCode;

use example_support::event;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use worker_core::batch::{Batch, BatchConfig, BatchHandler, Batched, Formed};
use worker_core::config::visible_gpus;
use worker_core::{async_trait, JobError, NewJob, Worker};

/// Largest matrix a request may ask for.
const MAX_SIZE: usize = 1024;

#[derive(Debug, Deserialize)]
#[serde(default)]
struct Request {
    size: usize,
    steps: u32,
    fail: bool,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            size: 64,
            steps: 1,
            fail: false,
        }
    }
}

/// What one request computes.
struct Work {
    size: usize,
    steps: u32,
    fail: bool,
    seed: u64,
    cancel: CancellationToken,
}

struct Model;

#[async_trait]
impl BatchHandler for Model {
    type Payload = Request;

    async fn handle_batch(&self, batch: Batch<Request>) -> Vec<Result<(), JobError>> {
        let ids: Vec<String> = batch.jobs.iter().map(|j| j.id().to_string()).collect();
        let formed = match batch.formed {
            Formed::Full => "full",
            Formed::Waited => "waited",
            Formed::Draining => "draining",
        };
        event(json!({
            "event": "batch", "stream": batch.stream, "size": ids.len(), "formed": formed,
            "formed_in_ms": u64::try_from(batch.formed_in.as_millis()).unwrap_or(u64::MAX),
            "ids": ids,
        }));
        let work: Vec<Work> = batch
            .jobs
            .iter()
            .map(|j| Work {
                size: j.payload.size,
                steps: j.payload.steps,
                fail: j.payload.fail,
                seed: j.id().as_str().bytes().map(u64::from).sum(),
                cancel: j.ctx().cancellation().clone(),
            })
            .collect();
        // The computation holds a thread for its whole run: keep it off the runtime's.
        let results: Vec<Result<f64, JobError>> =
            tokio::task::spawn_blocking(move || work.iter().map(infer).collect())
                .await
                .unwrap_or_else(|e| {
                    let reason = format!("the model's thread failed: {e}");
                    ids.iter().map(|_| Err(JobError::retry(&reason))).collect()
                });
        batch
            .jobs
            .iter()
            .zip(results)
            .map(|(job, result)| {
                let ok = result.is_ok();
                let checksum = result.as_ref().ok().copied();
                event(json!({"event": "end", "id": job.id().as_str(), "ok": ok,
                             "attempt": job.ctx().attempt(), "checksum": checksum}));
                result.map(|_| ())
            })
            .collect()
    }
}

/// Multiply an n×n matrix `steps` times: C ← normalize(C × B). Returns the sum of C.
fn infer(w: &Work) -> Result<f64, JobError> {
    if w.fail {
        return Err(JobError::fatal("the request asked to fail"));
    }
    if w.size == 0 || w.size > MAX_SIZE {
        return Err(JobError::fatal(format!(
            "size {} is outside 1..={MAX_SIZE}",
            w.size
        )));
    }
    let n = w.size;
    let mut state = w.seed | 1;
    let mut next = || {
        // xorshift: a deterministic matrix per request.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 1000) as f64 / 1000.0
    };
    let b: Vec<f64> = (0..n * n).map(|_| next()).collect();
    let mut c: Vec<f64> = (0..n * n).map(|_| next()).collect();
    let mut out = vec![0.0; n * n];
    for _ in 0..w.steps {
        if w.cancel.is_cancelled() {
            return Err(JobError::retry("cut short by the drain deadline"));
        }
        for i in 0..n {
            let row = &c[i * n..(i + 1) * n];
            let dst = &mut out[i * n..(i + 1) * n];
            dst.fill(0.0);
            for (k, &a) in row.iter().enumerate() {
                let brow = &b[k * n..(k + 1) * n];
                for (d, &bv) in dst.iter_mut().zip(brow) {
                    *d += a * bv;
                }
            }
        }
        let norm = out.iter().map(|x| x.abs()).fold(0.0, f64::max).max(1e-12);
        for (dst, src) in c.iter_mut().zip(&out) {
            *dst = src / norm;
        }
    }
    Ok(c.iter().sum())
}

#[tokio::main]
async fn main() -> ExitCode {
    example_support::init_tracing();
    let gpus = visible_gpus();
    let batch = match BatchConfig::from_env(gpus.filter(|&n| n > 0).unwrap_or(1)) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let config = match example_support::config_from_env_with_concurrency(batch.concurrency()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    tracing::info!(
        gpus = ?gpus,
        streams = batch.streams,
        max_batch = batch.max_size,
        max_wait = ?batch.max_wait,
        concurrency = config.concurrency,
        "gpu-inference pool"
    );
    // Something to run on the embedded broker: a burst of requests, one bad.
    let samples = |queue: &str| {
        (0..20u32)
            .map(|i| {
                let payload = json!({"size": 128, "steps": 4, "fail": i == 7});
                NewJob::json(queue, &payload).map(|job| job.max_attempts(1))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())
    };
    let connected = match example_support::connect_with_samples(&config, samples).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let worker = Worker::with_shared_broker(
        connected.broker.clone(),
        config.clone(),
        Batched::new(Model, batch),
    );
    example_support::finish(worker.run_until_signal().await, &connected, &config).await
}
