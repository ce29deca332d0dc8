//! The Redis backend agrees with the model of the `Broker` contract on random
//! sequences of operations, against the shared Redis on 127.0.0.1:6379 (`REDIS_URL`
//! overrides). Leases and delays pass in real time: the short ones last 150 ms.

use std::time::Duration;

use worker_core::testing::model::{check, ModelConfig};

#[test]
fn redis_broker_agrees_with_the_model() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let broker = rt
        .block_on(
            worker_redis::RedisConfig::new(url)
                .prefix(worker_core::testing::unique("model"))
                .connect(),
        )
        .unwrap_or_else(|e| panic!("redis: {e}"));
    let config = ModelConfig::for_broker("redis", &broker)
        .short(Duration::from_millis(150), Duration::from_millis(50))
        .cases(96, 30);
    check(&rt, &broker, &config);
}
