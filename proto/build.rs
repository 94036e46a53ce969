//! Compiles the contract with protox (pure Rust), so a fresh machine needs no system `protoc`.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The broker's contract, and the source protocol organisations implement (it reuses the
    // record types of the first).
    let protos = [
        "carerecord/v1/carerecord.proto",
        "carerecord/source/v1/source.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The broker's reflection describes the broker's own contract only (it does not serve the
    // source protocol, it calls it).
    let broker_only = protox::compile([protos[0]], ["."])?;
    std::fs::write(
        out.join("carerecord_descriptor.bin"),
        broker_only.encode_to_vec(),
    )?;
    let encoded = fds.encode_to_vec();
    // Canonical proto3 JSON (camelCase names, enums by name) for `--json` output and logs.
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .build(&[".carerecord"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
