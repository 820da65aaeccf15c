//! The collector validation writes to: every error (all of them, not the first), and the
//! work it leaves to the caller because it needs I/O (`Pending`).

use std::path::Path;

use super::error::{ConfigError, KeyPath, Locator, Origins, Place};
use super::pending::Pending;

/// Collects errors during validation, and the work it leaves to the caller (see `Pending`).
pub(super) struct Errors<'a> {
    pub(super) files: Vec<(&'a Path, Locator<'a>)>,
    pub(super) origins: Origins,
    pub(super) list: Vec<ConfigError>,
    pub(super) pending: Vec<Pending>,
}

impl Errors<'_> {
    /// The file, line and key of a merged key path.
    pub(super) fn place(&self, at: &KeyPath) -> Place {
        let (file, local) = self.origins.locate(at);
        let (path, locator) = &self.files[file.min(self.files.len() - 1)];
        Place {
            path: path.to_path_buf(),
            line: locator.line(&local),
            key: local.to_string(),
        }
    }

    pub(super) fn push(
        &mut self,
        at: &KeyPath,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) {
        let error = self.place(at).error(problem, fix);
        self.list.push(error);
    }

    /// Work validation cannot do without I/O, left to the caller.
    pub(super) fn later(&mut self, work: Pending) {
        self.pending.push(work);
    }

    /// Whether an error was reported at `prefix` or below it (as its key is spelled).
    pub(super) fn any_under(&self, prefix: &KeyPath) -> bool {
        let prefix = prefix.to_string();
        self.list.iter().any(|e| e.key.starts_with(&prefix))
    }
}
