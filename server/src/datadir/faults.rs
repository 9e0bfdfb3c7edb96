//! Test-only storage fault injection (feature `fault-injection`, never in a
//! normal build): every database is opened through [`FaultyBackend`], which
//! passes everything to redb's file backend, except that while the file
//! [`FAIL_WRITES_FILE`] exists in the data directory, writes, resizes and
//! syncs fail as they do on a full disk (`ENOSPC`). A test creates the file
//! to fill the disk and deletes it to free space, for a server in its own
//! process or in a child process alike, without root or a filesystem of its
//! own.

use std::fs::{File, OpenOptions};
use std::ops::Bound;
use std::path::{Path, PathBuf};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// While this file exists in the data directory, database writes fail.
pub const FAIL_WRITES_FILE: &str = "FAULT-disk-full";

/// redb's file backend, with writes failing on demand; see the module docs.
#[derive(Debug)]
pub struct FaultyBackend {
    inner: FileBackend,
    trigger: PathBuf,
}

impl FaultyBackend {
    /// Opens (or creates) `path`; `dir` is the data directory holding the
    /// trigger file.
    pub fn open(path: &Path, dir: &Path) -> Result<FaultyBackend, redb::DatabaseError> {
        let io = |e| redb::DatabaseError::Storage(redb::StorageError::Io(e));
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        Ok(FaultyBackend {
            inner: FileBackend::new(file)?,
            trigger: dir.join(FAIL_WRITES_FILE),
        })
    }

    fn check(&self) -> std::io::Result<()> {
        if self.trigger.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "No space left on device (injected: the test's disk-full trigger exists)",
            ));
        }
        Ok(())
    }
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.check()?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.check()?;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.check()?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), std::io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
