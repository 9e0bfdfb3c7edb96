//! `herald check`: reads every record of a data directory's databases and
//! reports what is damaged, without changing anything (a file that was not
//! closed cleanly is first recovered exactly as the server would at start).
//!
//! Each record is checked as the server reads it: posts and channel records
//! against their checksums ([`crate::store`]), brands, keys and promo records
//! by decoding them; plus what must hold between records (every retained seq
//! of a channel has its post). The server must be stopped: a database in use
//! is refused.

use std::path::Path;

use serde::Serialize;

use crate::datadir::{open_for_check, DbSpec, FileReport};

/// What `herald check` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// One entry per database file.
    pub files: Vec<FileReport>,
    /// Files that could not be checked at all, with why (missing, empty,
    /// damaged beyond opening, in use).
    pub unreadable: Vec<String>,
}

impl CheckReport {
    /// Whether everything was read and nothing is damaged.
    pub fn is_clean(&self) -> bool {
        self.unreadable.is_empty() && self.files.iter().all(|f| f.damaged == 0)
    }
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for r in &self.files {
            if r.damaged == 0 {
                writeln!(
                    f,
                    "{}: ok ({}; {} records read)",
                    r.file, r.summary, r.records
                )?;
            } else {
                writeln!(
                    f,
                    "{}: DAMAGED: {} damaged of {} records read ({})",
                    r.file, r.damaged, r.records, r.summary
                )?;
                for d in &r.damage {
                    writeln!(f, "  - {d}")?;
                }
                if r.damage.len() as u64 != r.damaged {
                    writeln!(f, "  ... and {} more", r.damaged - r.damage.len() as u64)?;
                }
            }
            for n in &r.notes {
                writeln!(f, "  note: {n}")?;
            }
        }
        for u in &self.unreadable {
            writeln!(f, "{u}")?;
        }
        Ok(())
    }
}

/// Checks every database of the data directory `dir`.
pub fn check_data_dir(dir: &Path) -> CheckReport {
    let mut report = CheckReport::default();
    type Verify = fn(&crate::datadir::CheckedDb) -> Result<FileReport, String>;
    let dbs: [(DbSpec, Verify); 3] = [
        (crate::store::LOG_SPEC, |db| {
            crate::store::verify(db).map_err(|e| e.to_string())
        }),
        (crate::tenancy::TENANCY_SPEC, |db| {
            crate::tenancy::verify(db).map_err(|e| e.to_string())
        }),
        (crate::promo::PROMO_SPEC, |db| {
            crate::promo::verify(db).map_err(|e| e.to_string())
        }),
    ];
    for (spec, verify) in dbs {
        match open_for_check(dir, &spec) {
            Err(e) => report.unreadable.push(e.to_string()),
            Ok((db, notes)) => match verify(&db) {
                Ok(mut r) => {
                    r.notes.extend(notes);
                    report.files.push(r);
                }
                Err(e) => report
                    .unreadable
                    .push(format!("{}: cannot be read: {e}", spec.file)),
            },
        }
    }
    report
}
