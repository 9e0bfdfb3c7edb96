//! Compiles the embedded store's record schema (`proto/herald/store/v1`)
//! with prost-build fed by protox (pure Rust), so a fresh machine needs no
//! `protoc`. Output goes to OUT_DIR only. (The wire schema is compiled by
//! the `herald-proto` crate.)

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "herald/store/v1/store.proto";
    println!("cargo:rerun-if-changed=proto/{file}");
    let fds = protox::compile([file], ["proto"])?;
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
