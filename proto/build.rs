//! Compiles the contract with protox (pure Rust), so a fresh machine needs no system `protoc`.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "carerecord/v1/carerecord.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The same descriptor set feeds server reflection.
    let encoded = fds.encode_to_vec();
    std::fs::write(out.join("carerecord_descriptor.bin"), &encoded)?;
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
