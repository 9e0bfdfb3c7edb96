//! Compiles the wire schema (`herald/v1/herald.proto`) with prost-build fed by
//! protox (pure Rust), so a fresh machine needs no `protoc`. Output goes to
//! OUT_DIR only.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "herald/v1/herald.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["."])?;
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
