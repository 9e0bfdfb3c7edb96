//! `--spawn`: start the `herald` binary on a temporary data directory with
//! free ports, and read the bound addresses from its stdout line
//! `herald listening: quic A http B`. The server is killed when the
//! [`Spawned`] value is dropped, and its data directory removed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::LoadError;

/// How long the server may take to print where it listens.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running server started by this tool.
pub struct Spawned {
    pub quic: SocketAddr,
    pub http: SocketAddr,
    pub pid: u32,
    child: Child,
    dir: tempfile::TempDir,
}

impl Spawned {
    /// The server's data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server (SIGKILL: the data directory is thrown away anyway).
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The `herald` binary next to the running executable (`target/release/herald`
/// for `target/release/herald-loadtest`). Under `cargo run` it is always
/// (re)built first with the same profile (`cargo build [--release] -p herald
/// --bin herald`, a no-op when it is up to date), so a measurement never runs
/// an older server than the sources; otherwise it must exist. Prints which
/// binary it uses and its version.
pub fn sibling_binary() -> Result<PathBuf, LoadError> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or_else(|| LoadError::Spawn(format!("{} has no parent directory", exe.display())))?;
    let bin = dir.join(format!("herald{}", std::env::consts::EXE_SUFFIX));
    if let Some(cargo) = std::env::var_os("CARGO") {
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-q", "-p", "herald", "--bin", "herald"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .map_err(|e| LoadError::Spawn(format!("cannot run cargo: {e}")))?;
        if !status.success() {
            return Err(LoadError::Spawn(format!(
                "building {} failed",
                bin.display()
            )));
        }
    }
    if !bin.is_file() {
        return Err(LoadError::Spawn(format!(
            "{} not found; build it first with `cargo build --release --workspace`",
            bin.display()
        )));
    }
    let version = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    eprintln!("server: {} ({version})", bin.display());
    Ok(bin)
}

/// Starts `bin serve` on a fresh temporary data directory and port 0, with
/// `config` as its configuration file if given (and never the caller's
/// `HERALD_CONFIG`).
pub async fn spawn(bin: &Path, config: Option<&Path>) -> Result<Spawned, LoadError> {
    let dir = tempfile::Builder::new()
        .prefix("herald-loadtest-")
        .tempdir()?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve");
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let mut child = cmd
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--quic-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .env_remove("HERALD_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| LoadError::Spawn(format!("{}: {e}", bin.display())))?;
    let pid = child
        .id()
        .ok_or_else(|| LoadError::Spawn("the server exited at once".into()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| LoadError::Spawn("no stdout pipe".into()))?;
    let mut lines = BufReader::new(stdout).lines();
    let (quic, http) = tokio::time::timeout(START_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addrs) = parse_listening(&line) {
                return Ok(addrs);
            }
        }
        Err(LoadError::Spawn(
            "the server exited before saying where it listens".into(),
        ))
    })
    .await
    .map_err(|_| LoadError::Spawn("the server did not start in time".into()))??;
    // Keep draining stdout so the server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Spawned {
        quic,
        http,
        pid,
        child,
        dir,
    })
}

/// Parses `herald listening: quic A http B`.
pub fn parse_listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let rest = line.trim().strip_prefix("herald listening: quic ")?;
    let (quic, http) = rest.split_once(" http ")?;
    Some((quic.trim().parse().ok()?, http.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_the_listening_line() {
        let (q, h) =
            super::parse_listening("herald listening: quic 127.0.0.1:4433 http 127.0.0.1:8080")
                .unwrap();
        assert_eq!((q.port(), h.port()), (4433, 8080));
        assert!(super::parse_listening("data dir: x").is_none());
    }
}
