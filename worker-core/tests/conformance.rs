//! The in-memory broker passes the whole conformance suite.
#![cfg(feature = "testing")]

async fn make() -> worker_core::MemoryBroker {
    worker_core::MemoryBroker::new()
}

/// Clones share their queues: a second worker on the same store.
async fn peer(b: &worker_core::MemoryBroker) -> worker_core::MemoryBroker {
    b.clone()
}

worker_core::conformance_suite!(make(), peer = peer);
