//! The data directory's databases: how each redb file is opened, checked,
//! and reopened after a failure, and the marker that tells a new data
//! directory from one whose databases were lost.
//!
//! # New or lost
//!
//! redb turns an empty file into an empty database without a word, so a
//! `herald.redb` truncated to 0 bytes (a full disk, a bad copy, an operator
//! mistake) would silently become a server with no channels. Two rules stop
//! that:
//!
//! - the [`Marker`] file ([`MARKER_FILE`]) is written once the databases of a
//!   new data directory exist, and lists them: a listed database that is
//!   missing was lost, never new;
//! - an empty (0-byte) database file is never opened, marker or not.
//!
//! Either stops the server with an [`OpenError`] that names the file, what it
//! holds, and what to do (restore it, or delete it on purpose). A file redb
//! cannot open (damaged, truncated) stops it likewise, never with a panic.
//!
//! # Failing and recovering
//!
//! A [`Db`] holds one open database. A write that fails in the storage
//! engine (a full disk, an I/O error) leaves redb refusing every later write
//! until the database is closed and opened again. So the owner reports the
//! failure ([`Db::failed`]); from then on [`Db::health`] says the database is
//! unavailable (the API answers 503 `storage_unavailable`, `/readyz` says
//! so), and [`Db::try_reopen`] closes and reopens the file and proves it can
//! write again (a small durable probe write) before it is used again. Nothing
//! acknowledged is lost: a write is acknowledged only after its commit
//! succeeded, and redb's recovery on reopen keeps every committed
//! transaction.
//!
//! Cache sizes ([`DbSpec::cache_bytes`]) are set per database rather than
//! redb's default of 1 GiB, which would let memory grow with the file.
//!
//! With the test-only `fault-injection` feature, every database is opened
//! through [`faults::FaultyBackend`]: while the file
//! [`faults::FAIL_WRITES_FILE`] exists in the data directory, writes fail as
//! on a full disk.

#[cfg(feature = "fault-injection")]
pub mod faults;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, TableDefinition};
use serde::{Deserialize, Serialize};

/// File name of the data directory's marker.
pub const MARKER_FILE: &str = "herald-data.toml";

/// One database of the data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbSpec {
    /// Its file name in the data directory.
    pub file: &'static str,
    /// What it holds, for messages ("the channel log: every channel, post
    /// and idempotency key").
    pub holds: &'static str,
    /// redb's page cache for it, in bytes.
    pub cache_bytes: usize,
    /// Verify every page's checksum when opening (and repair what redb can):
    /// a damaged file then fails to open with a clear error instead of
    /// failing (or panicking) later. It reads the whole file, so it is for
    /// the small databases.
    pub check_on_open: bool,
}

/// Opening a database failed; the text names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The marker lists the database but its file is gone.
    #[error(
        "{path} is missing, but this data directory was set up with it (see {marker}): {holds} \
         was lost. Restore {file} from a backup; or, to start over with an empty one on purpose, \
         remove \"{file}\" from the `databases` list in {marker}"
    )]
    Missing {
        /// The database file.
        path: PathBuf,
        /// Its file name.
        file: &'static str,
        /// What it held.
        holds: &'static str,
        /// The marker file.
        marker: PathBuf,
    },
    /// The file is empty: whatever it held is gone.
    #[error(
        "{path} is empty (0 bytes){since}: {holds} was lost or the file was truncated. \
         Restore {file} from a backup; or, to start over with an empty one on purpose, delete \
         {path}{unlist}"
    )]
    Empty {
        /// The database file.
        path: PathBuf,
        /// Its file name.
        file: &'static str,
        /// What it held.
        holds: &'static str,
        /// `, but this data directory was set up on ...` when the marker says so.
        since: String,
        /// ` and remove it from ... ` when the marker lists it.
        unlist: String,
    },
    /// redb refused the file, or reading it failed (damaged, truncated, or
    /// not a redb file).
    #[error(
        "{path} cannot be opened ({detail}): {holds} is damaged. Stop here: run \
         `herald check --data-dir {dir}` for details, then restore {file} from a backup"
    )]
    Damaged {
        /// The database file.
        path: PathBuf,
        /// Its file name.
        file: &'static str,
        /// The data directory.
        dir: PathBuf,
        /// What it holds.
        holds: &'static str,
        /// What redb (or the decoder) said.
        detail: String,
    },
    /// The file could not be read or created at all.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The marker file is unreadable.
    #[error("{path} is not a valid herald data directory marker ({detail}); restore it, or delete it only if every database next to it is intact")]
    BadMarker {
        /// The marker file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
}

impl OpenError {
    /// A [`OpenError::Damaged`] for `spec` in `dir`.
    pub fn damaged(dir: &Path, spec: &DbSpec, detail: impl std::fmt::Display) -> OpenError {
        OpenError::Damaged {
            path: dir.join(spec.file),
            file: spec.file,
            dir: dir.to_path_buf(),
            holds: spec.holds,
            detail: detail.to_string(),
        }
    }
}

/// The data directory's marker: written when herald set the directory up,
/// listing the databases it must hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Marker {
    /// When the directory was set up, in Unix milliseconds.
    pub created_at_ms: i64,
    /// The database files the directory holds.
    pub databases: Vec<String>,
}

impl Marker {
    /// Reads the marker of `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Marker>, OpenError> {
        let path = dir.join(MARKER_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(OpenError::Io { path, source }),
        };
        toml::from_str(&text)
            .map(Some)
            .map_err(|e| OpenError::BadMarker {
                path,
                detail: e.to_string(),
            })
    }

    /// Writes a marker listing `databases` into `dir`, durably, unless one
    /// is there already (then it gains any database it lacks).
    pub fn ensure(dir: &Path, databases: &[&str]) -> Result<(), OpenError> {
        let path = dir.join(MARKER_FILE);
        let mut marker = Marker::load(dir)?.unwrap_or(Marker {
            created_at_ms: crate::model::now_ms(),
            databases: Vec::new(),
        });
        let before = marker.databases.len();
        for d in databases {
            if !marker.databases.iter().any(|m| m == d) {
                marker.databases.push(d.to_string());
            }
        }
        if before == marker.databases.len() && path.exists() {
            return Ok(());
        }
        let body = toml::to_string(&marker).map_err(|e| OpenError::BadMarker {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let text = format!(
            "# The herald data directory marker: written when herald set this directory up.\n\
             # It tells a new data directory from one whose databases were lost: a database\n\
             # listed here must exist and must not be empty. Keep it with the data.\n{body}"
        );
        let tmp = dir.join(format!("{MARKER_FILE}.tmp"));
        let io = |source| OpenError::Io {
            path: path.clone(),
            source,
        };
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn lists(&self, file: &str) -> bool {
        self.databases.iter().any(|d| d == file)
    }
}

/// Checks that `spec`'s file in `dir` may be opened: present if the marker
/// lists it, and never empty.
fn precheck(dir: &Path, spec: &DbSpec, marker: Option<&Marker>) -> Result<(), OpenError> {
    let path = dir.join(spec.file);
    let marker_path = dir.join(MARKER_FILE);
    match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if marker.is_some_and(|m| m.lists(spec.file)) {
                return Err(OpenError::Missing {
                    path,
                    file: spec.file,
                    holds: spec.holds,
                    marker: marker_path,
                });
            }
            Ok(())
        }
        Err(source) => Err(OpenError::Io { path, source }),
        Ok(m) if m.len() == 0 => {
            let listed = marker.filter(|m| m.lists(spec.file));
            Err(OpenError::Empty {
                path,
                file: spec.file,
                holds: spec.holds,
                since: listed
                    .map(|m| {
                        format!(
                            ", but this data directory was set up with it (at {} ms since the Unix epoch, see {})",
                            m.created_at_ms,
                            marker_path.display()
                        )
                    })
                    .unwrap_or_default(),
                unlist: if listed.is_some() {
                    format!(" (and remove it from the `databases` list in {})", marker_path.display())
                } else {
                    String::new()
                },
            })
        }
        Ok(_) => Ok(()),
    }
}

/// Opens (or creates) the file of `spec` in `dir` with redb, turning every
/// failure (a panic inside redb included) into an [`OpenError`].
fn open_file(dir: &Path, spec: &DbSpec) -> Result<Database, OpenError> {
    let path = dir.join(spec.file);
    let mut builder = redb::Builder::new();
    builder.set_cache_size(spec.cache_bytes);
    builder.set_check_integrity_on_open(spec.check_on_open);
    // redb may panic on a file damaged outside it; that must stop the
    // server with a message naming the file, not with a panic.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        #[cfg(feature = "fault-injection")]
        {
            let backend = faults::FaultyBackend::open(&path, dir)?;
            builder.create_with_backend(backend)
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            builder.create(&path)
        }
    }));
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(source)))) => {
            Err(OpenError::Io { path, source })
        }
        Ok(Err(e)) => Err(OpenError::damaged(dir, spec, e)),
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the storage library panicked".into());
            Err(OpenError::damaged(
                dir,
                spec,
                format!("the storage library panicked: {detail}"),
            ))
        }
    }
}

/// Whether a database can take writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// It can.
    Ok,
    /// A write failed; the database is being reopened.
    Unavailable {
        /// Its file name.
        file: &'static str,
        /// What failed.
        cause: String,
        /// Since when, in Unix milliseconds.
        since_ms: i64,
    },
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Health::Ok => f.write_str("ok"),
            Health::Unavailable {
                file,
                cause,
                since_ms,
            } => write!(
                f,
                "{file} cannot take writes since {since_ms} ms after the Unix epoch ({cause}); \
                 retrying (free disk space, or fix the cause, and it recovers by itself)"
            ),
        }
    }
}

/// The database is closed, or unavailable until it is reopened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbUnavailable {
    /// Closed for good (shutdown).
    #[error("the database is closed")]
    Closed,
    /// Failed; being reopened.
    #[error("{0}")]
    Failed(String),
}

/// A probe table the reopen writes to, proving the file takes writes again.
const PROBE: TableDefinition<&str, i64> = TableDefinition::new("herald_write_probe");

/// How long a reopen waits for operations still holding the old handle.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Least time between two reopen attempts made by [`Db::for_write`].
pub const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// One open database of the data directory; see the module docs.
#[derive(Debug)]
pub struct Db {
    dir: PathBuf,
    spec: DbSpec,
    current: RwLock<Option<Arc<Database>>>,
    health: Mutex<Health>,
    closed: AtomicBool,
    last_reopen: Mutex<Option<Instant>>,
}

impl Db {
    /// Opens (or creates) `spec`'s file in `dir`, after checking it against
    /// the data directory's marker (see the module docs).
    pub fn open(dir: &Path, spec: DbSpec) -> Result<Db, OpenError> {
        std::fs::create_dir_all(dir).map_err(|source| OpenError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let marker = Marker::load(dir)?;
        precheck(dir, &spec, marker.as_ref())?;
        let db = open_file(dir, &spec)?;
        Ok(Db {
            dir: dir.to_path_buf(),
            spec,
            current: RwLock::new(Some(Arc::new(db))),
            health: Mutex::new(Health::Ok),
            closed: AtomicBool::new(false),
            last_reopen: Mutex::new(None),
        })
    }

    /// What this database is.
    pub fn spec(&self) -> &DbSpec {
        &self.spec
    }

    /// Its data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The open database, for one operation (do not keep it: a reopen waits
    /// for every handle to be let go).
    pub fn get(&self) -> Result<Arc<Database>, DbUnavailable> {
        if self.closed.load(Ordering::Acquire) {
            return Err(DbUnavailable::Closed);
        }
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        match current.as_ref() {
            Some(db) => Ok(db.clone()),
            None => Err(DbUnavailable::Failed(self.health().to_string())),
        }
    }

    /// Whether it can take writes now.
    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether a write failed and the database has not been reopened yet.
    pub fn is_failed(&self) -> bool {
        self.health() != Health::Ok
    }

    /// Reports that a write failed in the storage engine: the database is
    /// unavailable until [`Db::try_reopen`] succeeds.
    pub fn failed(&self, cause: impl std::fmt::Display) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if *h == Health::Ok {
            tracing::error!(file = self.spec.file, cause = %cause, "database write failed; it will be reopened once it can take writes again");
            *h = Health::Unavailable {
                file: self.spec.file,
                cause: cause.to_string(),
                since_ms: crate::model::now_ms(),
            };
        }
    }

    /// Closes the database, opens it again, and proves it takes a durable
    /// write; on success it is healthy again. Waits (up to a bound) for
    /// operations still holding the old handle.
    pub fn try_reopen(&self) -> Result<(), String> {
        if self.closed.load(Ordering::Acquire) {
            return Err("closed".into());
        }
        // Keep the old handle (reads of what is stored go on with it) until
        // the disk takes writes again: redb's recovery on reopen writes.
        disk_takes_writes(&self.dir)
            .map_err(|e| format!("the disk does not take writes yet: {e}"))?;
        let old = self
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut old) = old {
            let deadline = Instant::now() + RELEASE_WAIT;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still) if Instant::now() < deadline => {
                        old = still;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(still) => {
                        // Put it back: reads may go on; try again later.
                        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(still);
                        return Err("the database is still in use".into());
                    }
                }
            }
        }
        let reopened = open_file(&self.dir, &self.spec)
            .map_err(|e| e.to_string())
            .and_then(|db| {
                probe(&db).map_err(|e| format!("write probe: {e}"))?;
                Ok(db)
            });
        match reopened {
            Ok(db) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
                *self.health.lock().unwrap_or_else(|p| p.into_inner()) = Health::Ok;
                tracing::info!(
                    file = self.spec.file,
                    "database reopened; taking writes again"
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The open database for a write. While a write has failed, first tries
    /// to reopen the file (at most once per [`REOPEN_EVERY`]); for owners
    /// without a thread of their own to do it (the log's committer reopens
    /// with [`Db::try_reopen`] itself).
    pub fn for_write(&self) -> Result<Arc<Database>, DbUnavailable> {
        if self.is_failed() {
            let due = {
                let mut last = self.last_reopen.lock().unwrap_or_else(|p| p.into_inner());
                let due = last.is_none_or(|t| t.elapsed() >= REOPEN_EVERY);
                if due {
                    *last = Some(Instant::now());
                }
                due
            };
            if !due {
                return Err(DbUnavailable::Failed(self.health().to_string()));
            }
            if let Err(e) = self.try_reopen() {
                tracing::debug!(file = self.spec.file, error = %e, "not reopened yet");
                return Err(DbUnavailable::Failed(self.health().to_string()));
            }
        }
        self.get()
    }

    /// Closes the database for good once the last handle is let go; every
    /// later [`Db::get`] fails with [`DbUnavailable::Closed`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

/// What `herald check` found in one database file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FileReport {
    /// The file name.
    pub file: String,
    /// Records read and checked.
    pub records: u64,
    /// What the file holds, counted ("3 channels, 1200 posts").
    pub summary: String,
    /// Damaged or inconsistent records found.
    pub damaged: u64,
    /// Each damaged or inconsistent record, named (the first
    /// [`MAX_LISTED_DAMAGE`]).
    pub damage: Vec<String>,
    /// Anything else worth saying (it was recovered after an unclean stop).
    pub notes: Vec<String>,
}

/// Most damaged records listed per file (the count is always exact).
pub const MAX_LISTED_DAMAGE: usize = 1000;

impl FileReport {
    /// Notes a damaged record (listing at most [`MAX_LISTED_DAMAGE`]).
    pub fn note_damage(&mut self, what: impl Into<String>) {
        self.damaged += 1;
        if self.damage.len() < MAX_LISTED_DAMAGE {
            self.damage.push(what.into());
        }
    }
}

/// Opens `spec`'s file in `dir` to be checked, without repairing anything:
/// read-only; a file not closed cleanly (a killed server) is recovered
/// first exactly as the server would at start. A file in use by a running
/// server is refused.
pub fn open_for_check(dir: &Path, spec: &DbSpec) -> Result<(CheckedDb, Vec<String>), OpenError> {
    precheck(dir, spec, Marker::load(dir)?.as_ref())?;
    let path = dir.join(spec.file);
    if !path.exists() {
        return Err(OpenError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such database file"),
        });
    }
    let mut builder = redb::Builder::new();
    builder.set_cache_size(spec.cache_bytes);
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        builder.open_read_only(&path)
    }));
    match opened {
        Ok(Ok(db)) => Ok((CheckedDb::ReadOnly(db), Vec::new())),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(OpenError::Io {
            path,
            source: std::io::Error::new(
                std::io::ErrorKind::ResourceBusy,
                "in use by a running server; stop it first (herald check reads the files while no server uses them)",
            ),
        }),
        Ok(Err(redb::DatabaseError::RepairAborted)) => {
            let db = open_file(dir, spec)?;
            Ok((
                CheckedDb::Recovered(db),
                vec!["it was not closed cleanly (a killed server); recovered first, as the server does at start".into()],
            ))
        }
        Ok(Err(e)) => Err(OpenError::damaged(dir, spec, e)),
        Err(_) => Err(OpenError::damaged(dir, spec, "the storage library panicked opening it")),
    }
}

/// A database opened by [`open_for_check`].
pub enum CheckedDb {
    /// Opened read-only.
    ReadOnly(redb::ReadOnlyDatabase),
    /// Recovered after an unclean stop, then opened.
    Recovered(Database),
}

impl CheckedDb {
    /// A read transaction.
    pub fn begin_read(&self) -> Result<redb::ReadTransaction, redb::TransactionError> {
        use redb::ReadableDatabase;
        match self {
            CheckedDb::ReadOnly(db) => db.begin_read(),
            CheckedDb::Recovered(db) => db.begin_read(),
        }
    }
}

/// Whether a small file can be written and synced in `dir` (and removed).
fn disk_takes_writes(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(feature = "fault-injection")]
    if dir.join(faults::FAIL_WRITES_FILE).exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "No space left on device (injected)",
        ));
    }
    let path = dir.join(".herald-write-probe");
    let written = (|| {
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&[0u8; 64 * 1024])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    written
}

/// A small durable write.
fn probe(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut t = txn.open_table(PROBE)?;
        t.insert("last_probe_ms", crate::model::now_ms())?;
    }
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: DbSpec = DbSpec {
        file: "t.redb",
        holds: "test data",
        cache_bytes: 1 << 20,
        check_on_open: true,
    };

    #[test]
    fn new_directories_create_and_lost_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), SPEC).unwrap();
        drop(db);
        // Without a marker an absent file is new; with one it is lost.
        Marker::ensure(dir.path(), &["t.redb"]).unwrap();
        std::fs::remove_file(dir.path().join("t.redb")).unwrap();
        let e = Db::open(dir.path(), SPEC).unwrap_err();
        assert!(matches!(e, OpenError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("t.redb"), "{e}");
        // An empty file is refused, marker or not.
        std::fs::write(dir.path().join("t.redb"), b"").unwrap();
        let e = Db::open(dir.path(), SPEC).unwrap_err();
        assert!(matches!(e, OpenError::Empty { .. }), "{e}");
        assert!(e.to_string().contains("set up with it"), "{e}");
        std::fs::remove_file(dir.path().join(MARKER_FILE)).unwrap();
        let e = Db::open(dir.path(), SPEC).unwrap_err();
        assert!(matches!(e, OpenError::Empty { .. }), "{e}");
        // Garbage is damaged, not a panic.
        std::fs::write(dir.path().join("t.redb"), vec![7u8; 9000]).unwrap();
        let e = Db::open(dir.path(), SPEC).unwrap_err();
        assert!(
            matches!(e, OpenError::Damaged { .. } | OpenError::Io { .. }),
            "{e}"
        );
    }

    #[test]
    fn marker_lists_databases_once() {
        let dir = tempfile::tempdir().unwrap();
        Marker::ensure(dir.path(), &["a.redb", "b.redb"]).unwrap();
        Marker::ensure(dir.path(), &["b.redb", "c.redb"]).unwrap();
        let m = Marker::load(dir.path()).unwrap().unwrap();
        assert_eq!(m.databases, vec!["a.redb", "b.redb", "c.redb"]);
        std::fs::write(dir.path().join(MARKER_FILE), "nonsense = [").unwrap();
        assert!(matches!(
            Marker::load(dir.path()),
            Err(OpenError::BadMarker { .. })
        ));
    }

    #[test]
    fn reopen_recovers_after_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path(), SPEC).unwrap();
        db.failed("disk full");
        assert!(db.is_failed());
        assert!(db.health().to_string().contains("disk full"));
        let held = db.get().unwrap();
        drop(held);
        db.try_reopen().unwrap();
        assert_eq!(db.health(), Health::Ok);
        db.close();
        assert_eq!(db.get().unwrap_err(), DbUnavailable::Closed);
    }
}
