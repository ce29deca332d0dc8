//! The in-memory broker passes the whole conformance suite.
#![cfg(feature = "testing")]

async fn make() -> worker_core::MemoryBroker {
    worker_core::MemoryBroker::new()
}

worker_core::conformance_suite!(make());
