//! Generates the client of KEDA's external scaler service from the proto that
//! `workerctl exporter` serves (`workerctl/proto/externalscaler.proto`), with protox:
//! no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../workerctl/proto/externalscaler.proto");
    let files = protox::compile(["externalscaler.proto"], ["../workerctl/proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(files)?;
    Ok(())
}
