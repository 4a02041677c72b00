//! Compiles the mesh protos with protox (pure Rust), so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "mesh/v1/discovery.proto",
        "mesh/v1/identity.proto",
        "mesh/v1/admin.proto",
        "mesh/example/v1/echo.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
