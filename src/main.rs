//! The `herald` binary: everything lives in the library's `cli` module.

/// mimalloc instead of the system allocator (see README, "Memory budget").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    herald::cli::main()
}
