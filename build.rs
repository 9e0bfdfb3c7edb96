//! Compiles `proto/` into Rust with prost-build fed by protox (pure Rust), so a
//! fresh machine needs no `protoc`. Output goes to OUT_DIR only.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/herald/v1/herald.proto",
        "proto/herald/store/v1/store.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
