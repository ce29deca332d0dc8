//! The in-memory broker agrees with the model of the `Broker` contract on random
//! sequences of operations, on tokio's paused clock (a wait past leases is instant).
#![cfg(feature = "testing")]

use worker_core::testing::model::{check, ModelConfig};

#[test]
fn memory_broker_agrees_with_the_model() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let broker = worker_core::MemoryBroker::new();
    check(
        &rt,
        &broker,
        &ModelConfig::for_broker("memory", &broker).cases(256, 40),
    );
}
