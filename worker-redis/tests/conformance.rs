//! The Redis backend passes the whole conformance suite against the shared Redis on
//! 127.0.0.1:6379 (`REDIS_URL` overrides). Each case uses its own random queue names.

fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn connect(prefix: &str) -> worker_redis::RedisBroker {
    worker_redis::RedisConfig::new(url())
        .prefix(prefix)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("redis: {e}"))
}

async fn make() -> worker_redis::RedisBroker {
    // A prefix per case, so registry listings of parallel cases do not mix.
    connect(&worker_core::testing::unique("conf")).await
}

/// A second worker on the same keys: its own connection, the same prefix.
async fn peer(b: &worker_redis::RedisBroker) -> worker_redis::RedisBroker {
    connect(b.prefix()).await
}

worker_core::conformance_suite!(make(), peer = peer);
