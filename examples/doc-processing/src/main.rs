//! High-memory document pool: each job names a document (a path) and declares its size;
//! the worker holds the whole document in memory while it processes it, and never
//! admits more documents at once than its memory budget allows.
//!
//! Run with: `cargo run -p doc-processing` (in-memory broker: it writes a few documents
//! to a temporary directory, one larger than the whole budget, and processes them;
//! Ctrl-C to stop), or with `REDIS_URL` / `AMQP_URL` to consume a real queue.
//!
//! - `WORKER_MEMORY_BUDGET` (e.g. `2GiB`): the budget in MiB. A job's cost is the
//!   document's size in MiB, rounded up (`workerctl enqueue --cost`, `NewJob::cost`);
//!   a running job holds its cost, so the documents in memory never add up to more
//!   than the budget, and a document larger than the whole budget is dead-lettered
//!   with that reason instead of waiting forever. Default here: 256MiB.
//! - Payload: `{"path": "/data/report-17.txt", "meta": {...}, "hold_ms": 0}` — a
//!   reference, not the document. A document bigger than its declared cost is refused
//!   (it would overrun the budget); a missing file is dead-lettered.
//! - Processing: the whole file is read into memory (as a parser would hold it; in a
//!   mapping of its own, so a finished document leaves the RSS at once), kept
//!   for `hold_ms` (a stand-in for slow parsing), then counted: bytes, lines, words, a
//!   checksum.
//!
//! It prints JSON lines on stdout for tests: `start` and `end` per job (with its cost
//! and counts) and `stopped` with the run report.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use example_support::event;
use serde::Deserialize;
use serde_json::json;
use worker_core::{async_trait, Handler, Job, JobError, NewJob, Worker};

const MIB: u64 = 1024 * 1024;
/// The budget when none is configured.
const DEFAULT_BUDGET_MIB: u32 = 256;

#[derive(Debug, Deserialize)]
struct Document {
    path: PathBuf,
    #[serde(default)]
    meta: serde_json::Value,
    #[serde(default)]
    hold_ms: u64,
}

/// What one document held.
#[derive(Debug, Default)]
struct Counts {
    bytes: usize,
    lines: usize,
    words: usize,
    checksum: u64,
}

fn count(data: &[u8]) -> Counts {
    let mut c = Counts {
        bytes: data.len(),
        ..Counts::default()
    };
    let mut in_word = false;
    for &b in data {
        c.checksum = c.checksum.wrapping_mul(31).wrapping_add(u64::from(b));
        if b == b'\n' {
            c.lines += 1;
        }
        let space = b.is_ascii_whitespace();
        if !space && !in_word {
            c.words += 1;
        }
        in_word = !space;
    }
    c
}

struct Documents;

#[async_trait]
impl Handler for Documents {
    type Payload = Document;

    async fn handle(&self, job: Job<Document>) -> Result<(), JobError> {
        let id = job.id().to_string();
        let cost = job.ctx().cost();
        event(json!({"event": "start", "id": id, "cost": cost, "attempt": job.ctx().attempt()}));
        let result = process(&job.payload, cost).await;
        match &result {
            Ok(c) => event(json!({
                "event": "end", "id": id, "ok": true, "cost": cost, "bytes": c.bytes,
                "lines": c.lines, "words": c.words, "checksum": c.checksum,
                "meta": job.payload.meta,
            })),
            Err(e) => event(json!({"event": "end", "id": id, "ok": false, "cost": cost,
                                   "error": e.reason()})),
        }
        result.map(|_| ())
    }
}

async fn process(doc: &Document, cost_mib: u32) -> Result<Counts, JobError> {
    let path = doc.path.clone();
    let (data, len) = tokio::task::spawn_blocking(move || load(&path, cost_mib))
        .await
        .map_err(|e| JobError::retry(format!("reading failed: {e}")))??;
    if doc.hold_ms > 0 {
        tokio::time::sleep(Duration::from_millis(doc.hold_ms)).await;
    }
    tokio::task::spawn_blocking(move || count(&data[..len]))
        .await
        .map_err(|e| JobError::retry(format!("counting failed: {e}")))
}

/// The whole document in memory, as a parser holds it, and its length.
///
/// The buffer is an anonymous mapping of its own rather than a heap allocation:
/// dropping it unmaps it, so a finished document leaves the process's RSS at once.
/// A malloc heap keeps freed blocks of this size in its arenas (glibc raises its
/// mmap threshold after the first large free), and the pool's RSS would drift tens
/// of MiB past its budget under a stream of mixed sizes.
fn load(path: &Path, cost_mib: u32) -> Result<(memmap2::MmapMut, usize), JobError> {
    use std::io::Read;
    let shown = path.display();
    let mut file = std::fs::File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => JobError::fatal(format!("no document at {shown}")),
        _ => JobError::retry(format!("cannot open {shown}: {e}")),
    })?;
    let len = file
        .metadata()
        .map_err(|e| JobError::retry(format!("cannot read {shown}: {e}")))?
        .len();
    let size_mib = len.div_ceil(MIB);
    if size_mib > u64::from(cost_mib) {
        return Err(JobError::fatal(format!(
            "{shown} is {size_mib} MiB but the job declared {cost_mib} MiB: \
             enqueue it with its size as cost, or it would overrun the memory budget"
        )));
    }
    let len = usize::try_from(len)
        .map_err(|_| JobError::fatal(format!("{shown} is too large to address")))?;
    // A mapping cannot be empty; an empty document is a one-byte buffer, never read.
    let mut data = memmap2::MmapMut::map_anon(len.max(1))
        .map_err(|e| JobError::retry(format!("cannot map {len} bytes for {shown}: {e}")))?;
    file.read_exact(&mut data[..len])
        .map_err(|e| JobError::retry(format!("cannot read {shown}: {e}")))?;
    Ok((data, len))
}

/// Write `mib` MiB of text to `path`.
fn write_document(path: &Path, mib: u64) -> std::io::Result<()> {
    use std::io::Write;
    let line = b"the quick brown fox jumps over the lazy dog, again and again and again\n";
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    // Exactly `mib` MiB: the declared cost is its size.
    let mut left = usize::try_from(mib * MIB).unwrap_or(usize::MAX);
    while left > 0 {
        let n = left.min(line.len());
        out.write_all(&line[..n])?;
        left -= n;
    }
    out.flush()
}

/// A few documents for the in-memory broker, one larger than the whole budget.
fn sample_jobs(queue: &str, budget_mib: u32) -> std::io::Result<Vec<NewJob>> {
    let dir = std::env::temp_dir().join(format!("doc-processing-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut sizes: Vec<u64> = vec![8, 32, 4, 64, 16, 48, 2, 24];
    sizes.push(u64::from(budget_mib) + 1);
    let mut jobs = Vec::new();
    for (i, mib) in sizes.into_iter().enumerate() {
        let path = dir.join(format!("document-{i}.txt"));
        write_document(&path, mib)?;
        let payload = json!({"path": path, "meta": {"n": i}, "hold_ms": 200});
        let job = NewJob::json(queue, &payload)
            .map_err(std::io::Error::other)?
            .cost(u32::try_from(mib).unwrap_or(u32::MAX))
            .max_attempts(1);
        jobs.push(job);
    }
    Ok(jobs)
}

#[tokio::main]
async fn main() -> ExitCode {
    example_support::init_tracing();
    let mut config = match example_support::config_from_env() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let budget = *config.budget.get_or_insert(DEFAULT_BUDGET_MIB);
    tracing::info!(
        budget_mib = budget,
        concurrency = config.concurrency,
        "doc-processing pool"
    );
    let samples = |queue: &str| {
        sample_jobs(queue, budget).map_err(|e| format!("cannot write the sample documents: {e}"))
    };
    let connected = match example_support::connect_with_samples(&config, samples).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let worker = Worker::with_shared_broker(connected.broker.clone(), config.clone(), Documents);
    example_support::finish(worker.run_until_signal().await, &connected, &config).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_words_lines_and_bytes() {
        let c = count(b"one two  three\nfour\n\n five");
        assert_eq!((c.bytes, c.lines, c.words), (26, 3, 5));
    }
}
