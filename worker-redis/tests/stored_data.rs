//! Data in Redis that the runtime did not write as it would: a job's meta overwritten
//! by something else does not stop the fetch that finds it.

use std::time::Duration;

use worker_core::testing::unique;
use worker_core::{Broker, FetchPlan, NewJob};
use worker_redis::RedisConfig;

const URL: &str = "redis://127.0.0.1:6379";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_meta_was_overwritten_is_still_fetched_and_acked() {
    let prefix = unique("meta");
    let b = RedisConfig::new(URL)
        .prefix(&prefix)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.enqueue(vec![
        NewJob::new("q", "x").id("odd"),
        NewJob::new("q", "y").id("plain"),
    ])
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // Something outside the runtime wrote a meta that does not read as `attempt|due|`.
    let mut conn = redis::Client::open(URL)
        .unwrap_or_else(|e| panic!("{e}"))
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _: () = redis::cmd("HSET")
        .arg(format!("{{{prefix}:q}}:jobs"))
        .arg("m:odd")
        .arg("not-a-number|")
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let got = b
        .fetch(&FetchPlan::single("q", 2, Duration::from_secs(30)))
        .await
        .unwrap_or_else(|e| panic!("the fetch must not fail for one odd meta: {e}"));
    assert_eq!(got.len(), 2);
    let odd = got
        .iter()
        .find(|d| d.envelope.id.as_str() == "odd")
        .unwrap_or_else(|| panic!("odd was not fetched"));
    assert_eq!(
        odd.envelope.attempt, 1,
        "an unreadable meta counts as a first attempt"
    );
    for d in &got {
        b.ack(&d.lease).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let d = b.depth("q").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((d.pending, d.in_flight), (0, 0));
}
