//! Where things are: the repository root, the cargo target directory, the
//! log directory, and how to name a log file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// The workspace root (the parent of this crate's directory).
#[must_use]
pub fn root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Cargo's target directory, honouring `CARGO_TARGET_DIR` like cargo does
/// (a relative value is relative to the directory cargo was started in).
#[must_use]
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                std::env::current_dir().map_or(dir.clone(), |cwd| cwd.join(&dir))
            }
        }
        _ => root().join("target"),
    }
}

/// `target/xtask/logs`, created if needed.
pub fn logs_dir() -> Result<PathBuf> {
    let dir = target_dir().join("xtask").join("logs");
    std::fs::create_dir_all(&dir).map_err(|e| {
        Error::failed(format!(
            "cannot create log directory {}: {e}",
            dir.display()
        ))
    })?;
    Ok(dir)
}

/// A fresh log file path: `target/xtask/logs/<label>-<UTC timestamp>.log`.
pub fn new_log_path(label: &str) -> Result<PathBuf> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let stamp = utc_timestamp(now.as_secs(), now.subsec_millis());
    Ok(logs_dir()?.join(format!("{label}-{stamp}.log")))
}

/// Writes `value` as pretty JSON (with a final newline) to `path`.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::failed(e.to_string()))?;
    std::fs::write(path, text + "\n")
        .map_err(|e| Error::failed(format!("cannot write {}: {e}", path.display())))
}

/// The `cargo` that runs us (cargo sets `CARGO` for `cargo run`), started in
/// the workspace root.
#[must_use]
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(root());
    cmd
}

/// `YYYYMMDD-HHMMSS.mmm` in UTC, from seconds since the Unix epoch.
#[must_use]
pub fn utc_timestamp(unix_secs: u64, millis: u32) -> String {
    let days = unix_secs / 86_400;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}.{millis:03}",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60
    )
}

/// Gregorian (year, month, day) of a day count since 1970-01-01: shift the
/// year to start in March so the leap day is the last day of the year, then
/// split into 400-year eras (146 097 days each).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(0, 0), "19700101-000000.000");
        // 2000-02-29 12:34:56 UTC, a leap day in a century leap year.
        assert_eq!(utc_timestamp(951_827_696, 7), "20000229-123456.007");
        // 2024-12-31 23:59:59 UTC.
        assert_eq!(utc_timestamp(1_735_689_599, 999), "20241231-235959.999");
        // 2025-03-01 00:00:00 UTC.
        assert_eq!(utc_timestamp(1_740_787_200, 0), "20250301-000000.000");
    }

    #[test]
    fn root_holds_the_workspace_manifest() {
        assert!(root().join("Cargo.toml").is_file());
        assert!(root().join("xtask").is_dir());
    }
}
