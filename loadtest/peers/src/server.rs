//! A reference server (nats-server, redis-server) run as a child process on a free loopback port:
//! finding the binary, starting it, waiting until it accepts connections, stopping it by its PID.

use anyhow::{Context, Result, bail};
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("peers-{tag}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A loopback TCP port that was free a moment ago (bound to port 0, then released).
pub fn free_tcp_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Finds `program` in /usr/sbin (where Debian puts nats-server), /usr/bin,
/// /usr/local/bin, then on PATH.
pub fn find_program(program: &str, apt_package: &str) -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    // The OS package's directories first: a version manager's shim of the
    // same name earlier on PATH (pyenv has one for nats-server) is not the
    // server.
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin"]
        .into_iter()
        .chain(path.split(':'))
    {
        let candidate = Path::new(dir).join(program);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("{program} not found: install it with `apt-get install -y {apt_package}`")
}

/// First line of `program arg` (for example `nats-server --version`).
pub fn program_version(program: &Path, arg: &str) -> String {
    match Command::new(program).arg(arg).output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            text.lines().next().unwrap_or("").trim().to_string()
        }
        Err(e) => format!("unknown ({e})"),
    }
}

/// A running server child. Stopped (SIGTERM, then SIGKILL after a grace period) by PID on
/// `stop` or on drop; it also gets SIGTERM if this process dies first.
pub struct ChildServer {
    name: String,
    child: Child,
    pid: u32,
    port: u16,
    log: PathBuf,
    stopped: bool,
}

impl ChildServer {
    /// Starts `program args...` with stdout and stderr going to `log`. Call from the main thread:
    /// the death signal is tied to the thread that spawns the child.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        port: u16,
        log: PathBuf,
    ) -> Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pid = child.id();
        Ok(Self {
            name: name.to_string(),
            child,
            pid,
            port,
            log,
            stopped: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Last lines of the server's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// How many lines of the server's log contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits (bounded by `timeout`) until the port accepts a TCP connection.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited early ({status}); log:\n{}",
                    self.name,
                    self.log_tail(10)
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{} did not accept on {addr} within {timeout:?}; log:\n{}",
            self.name,
            self.log_tail(10)
        )
    }

    /// SIGTERM by PID, wait up to 5 s, then SIGKILL by PID; always reaps the child.
    pub fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: kill with a PID we spawned and have not reaped, so it cannot have been reused.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill().context("SIGKILL")?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("peers: stopping {} (pid {}): {e:#}", self.name, self.pid);
        }
    }
}
