//! A log file under `target/xtask/logs/`, written line by line (unbuffered)
//! so it is complete for a post-mortem even if xtask is interrupted.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::infra::workspace;

pub struct LogFile {
    path: PathBuf,
    file: File,
    /// The first write error, reported once.
    broken: bool,
}

impl LogFile {
    pub fn create(label: &str) -> Result<Self> {
        let path = workspace::new_log_path(label)?;
        let file = File::create(&path)
            .map_err(|e| Error::failed(format!("cannot create log {}: {e}", path.display())))?;
        Ok(Self {
            path,
            file,
            broken: false,
        })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line; a failing disk is reported once, not fatal.
    pub fn line(&mut self, text: &str) {
        if self.broken {
            return;
        }
        if let Err(e) = writeln!(self.file, "{text}") {
            eprintln!("warning: cannot write log {}: {e}", self.path.display());
            self.broken = true;
        }
    }
}
