//! A client of KEDA's external scaler service, generated from the proto that
//! `workerctl exporter` serves (`workerctl/proto/externalscaler.proto`, see
//! `build.rs`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tonic::transport::Channel;

/// The generated messages and client.
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("externalscaler");
}

pub use pb::external_scaler_client::ExternalScalerClient;

/// A client of the service at `addr`, connecting again until it answers (at most
/// 30 s: the exporter may still be starting).
pub async fn connect(addr: SocketAddr) -> ExternalScalerClient<Channel> {
    let url = format!("http://{addr}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ExternalScalerClient::connect(url.clone()).await {
            Ok(client) => return client,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("gRPC {url}: {e}"),
        }
    }
}
