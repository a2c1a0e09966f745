//! `--config FILE`: the shim's guests and options in a TOML file.
//!
//! The file is a typed struct with one key per flag (the flag's long name,
//! `[[guest]]` tables for `--guest`), turned into the flags it stands for and
//! parsed by the same clap definition as the command line, so a key cannot
//! mean anything its flag does not. The rule for combining both: the file's
//! flags go first, the command line's after them; for an option given in
//! both, the command line wins (clap's `args_override_self`), and `--guest`
//! flags add guests after the file's.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::spec::GuestSpec;

/// Why a config file cannot be used; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// TOML errors name the key (an unknown one, or one of the wrong type)
    /// and its line.
    #[error("--config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("--config needs a FILE")]
    Missing,
}

/// The file's contents: every key optional, unknown keys refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    /// `[[guest]]` tables, each with the keys of `--guest`.
    #[serde(default)]
    pub guest: Vec<GuestSpec>,
    pub no_net: Option<bool>,
    pub tap: Option<String>,
    pub stats_json: Option<PathBuf>,
    pub quiet: Option<bool>,
    pub api_sock: Option<PathBuf>,
    pub end_on_failure: Option<bool>,
    pub timeout: Option<u64>,
    /// `"spread"`, `"sidecore"`, `"none"` or a CPU list `"0,1"`.
    pub pin: Option<String>,
    pub doorbells: Option<bool>,
    pub doorbell_spin_us: Option<u64>,
    pub doorbell_nic_cpu: Option<usize>,
    pub doorbell_spin_max_us: Option<u64>,
    /// `"idle"` or `"normal"`.
    pub doorbell_spin_class: Option<String>,
    pub halt_poll_ns: Option<u32>,
    pub notify_bench: Option<bool>,
    pub doorbell_redesignate: Option<bool>,
    pub vcpu_quantum: Option<u64>,
    /// `"window"`, `"poll"` or `"off"`.
    pub upcalls: Option<String>,
    pub hints: Option<bool>,
    pub io_cpu: Option<usize>,
    pub io_cpu_move_after_ms: Option<u64>,
    pub io_cpu_move_after_irqs: Option<u64>,
    pub io_cpu_move_to: Option<usize>,
    pub run_to_completion: Option<bool>,
    /// `"sender"` or `"monitor"`.
    pub rx_handoff: Option<String>,
    pub latency_stamps: Option<bool>,
    pub shadow_flags: Option<bool>,
    pub vmq: Option<bool>,
    pub direct: Option<bool>,
    pub test_hypercalls: Option<bool>,
    /// `PORT` or `"NAME=PORT"`, as `--gdb`.
    pub gdb: Option<String>,
    pub seccomp: Option<bool>,
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

impl ConfigFile {
    /// Parses TOML text; `path` only names the file in errors.
    ///
    /// # Errors
    /// Malformed TOML, an unknown key, a value of the wrong type.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            // One line: where, then what (toml's own text draws the line).
            let line = e
                .span()
                .map(|r| text.get(..r.start).map_or(0, |t| t.matches('\n').count()) + 1);
            let what = e.message().trim_end().replace('\n', " ");
            ConfigError::Parse {
                path: path.display().to_string(),
                message: line.map_or_else(|| what.clone(), |l| format!("line {l}: {what}")),
            }
        })
    }

    /// The flags this file stands for, in the order `--help` lists them.
    #[must_use]
    pub fn to_args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut value = |flag: &str, v: Option<String>| {
            if let Some(v) = v {
                a.push(format!("--{flag}"));
                a.push(v);
            }
        };
        for g in &self.guest {
            value("guest", Some(g.to_flag()));
        }
        value("tap", self.tap.clone());
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        value("stats-json", path(&self.stats_json));
        value("api-sock", path(&self.api_sock));
        value("timeout", self.timeout.map(|v| v.to_string()));
        value("pin", self.pin.clone());
        let sw = |b: Option<bool>| b.map(|b| on_off(b).to_owned());
        value("doorbells", sw(self.doorbells));
        value(
            "doorbell-spin-us",
            self.doorbell_spin_us.map(|v| v.to_string()),
        );
        value(
            "doorbell-nic-cpu",
            self.doorbell_nic_cpu.map(|v| v.to_string()),
        );
        value(
            "doorbell-spin-max-us",
            self.doorbell_spin_max_us.map(|v| v.to_string()),
        );
        value("doorbell-spin-class", self.doorbell_spin_class.clone());
        value("halt-poll-ns", self.halt_poll_ns.map(|v| v.to_string()));
        value("vcpu-quantum", self.vcpu_quantum.map(|v| v.to_string()));
        value("upcalls", self.upcalls.clone());
        value("hints", sw(self.hints));
        value("io-cpu", self.io_cpu.map(|v| v.to_string()));
        value(
            "io-cpu-move-after-ms",
            self.io_cpu_move_after_ms.map(|v| v.to_string()),
        );
        value(
            "io-cpu-move-after-irqs",
            self.io_cpu_move_after_irqs.map(|v| v.to_string()),
        );
        value("io-cpu-move-to", self.io_cpu_move_to.map(|v| v.to_string()));
        value("run-to-completion", sw(self.run_to_completion));
        value("rx-handoff", self.rx_handoff.clone());
        value("latency-stamps", sw(self.latency_stamps));
        value("shadow-flags", sw(self.shadow_flags));
        value("vmq", sw(self.vmq));
        value("direct", sw(self.direct));
        value("gdb", self.gdb.clone());
        value("seccomp", sw(self.seccomp));
        // Switches: `true` gives the flag; `false` is the default, no flag.
        for (flag, on) in [
            ("no-net", self.no_net),
            ("quiet", self.quiet),
            ("end-on-failure", self.end_on_failure),
            ("notify-bench", self.notify_bench),
            ("doorbell-redesignate", self.doorbell_redesignate),
            ("test-hypercalls", self.test_hypercalls),
        ] {
            if on == Some(true) {
                a.push(format!("--{flag}"));
            }
        }
        a
    }
}

/// The `--config` path among `args` (after the program name), if any.
fn config_path(args: &[OsString]) -> Result<Option<PathBuf>, ConfigError> {
    let mut it = args.iter().skip(1);
    let mut found = None;
    while let Some(a) = it.next() {
        let Some(text) = a.to_str() else { continue };
        if text == "--" {
            break;
        }
        if text == "--config" {
            found = Some(PathBuf::from(it.next().ok_or(ConfigError::Missing)?));
        } else if let Some(p) = text.strip_prefix("--config=") {
            found = Some(PathBuf::from(p));
        }
    }
    Ok(found)
}

/// The command line with the flags of its `--config` file (if it names one)
/// put before its own arguments, ready for clap.
///
/// # Errors
/// The file cannot be read or parsed.
pub fn expand(args: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    let Some(path) = config_path(&args)? else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let file = ConfigFile::parse(&text, &path)?;
    let mut out = Vec::with_capacity(args.len() + 2 * file.guest.len() + 16);
    let mut args = args.into_iter();
    out.extend(args.next());
    out.extend(file.to_args().into_iter().map(OsString::from));
    out.extend(args);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::{CommandFactory, Parser};

    fn exe() -> String {
        std::env::current_exe().unwrap().display().to_string()
    }

    /// What clap made of `args`, with the `--config` path itself left out
    /// (the one thing flags and the file cannot both say).
    fn parsed(args: Vec<OsString>) -> String {
        let mut cli = Cli::try_parse_from(args).unwrap();
        cli.finish().unwrap();
        cli.config = None;
        format!("{cli:?}")
    }

    fn file(name: &str, text: &str) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("shim-config-{}-{name}.toml", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn the_same_options_by_flags_and_by_file_parse_the_same() {
        let k = exe();
        let flags: Vec<OsString> = [
            "host-shim",
            "--guest",
            &format!("name=server,kernel={k},vcpus=2,mem=64M,cmdline=a=1,b=2"),
            "--guest",
            &format!("name=client,kernel={k}"),
            "--pin",
            "sidecore",
            "--doorbells",
            "off",
            "--doorbell-spin-us",
            "7",
            "--doorbell-nic-cpu",
            "0",
            "--upcalls",
            "poll",
            "--hints",
            "off",
            "--io-cpu",
            "1",
            "--io-cpu-move-after-irqs",
            "9",
            "--io-cpu-move-to",
            "0",
            "--rx-handoff",
            "sender",
            "--vmq",
            "on",
            "--stats-json",
            "/tmp/s.json",
            "--api-sock",
            "/tmp/api.sock",
            "--timeout",
            "30",
            "--quiet",
            "--end-on-failure",
            "--test-hypercalls",
            "--gdb",
            "server=1234",
            "--seccomp",
            "off",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let toml = format!(
            r#"
pin = "sidecore"
doorbells = false
doorbell-spin-us = 7
doorbell-nic-cpu = 0
upcalls = "poll"
hints = false
io-cpu = 1
io-cpu-move-after-irqs = 9
io-cpu-move-to = 0
rx-handoff = "sender"
vmq = true
stats-json = "/tmp/s.json"
api-sock = "/tmp/api.sock"
timeout = 30
quiet = true
end-on-failure = true
test-hypercalls = true
gdb = "server=1234"
seccomp = false

[[guest]]
name = "server"
kernel = "{k}"
vcpus = 2
mem = "64M"
cmdline = "a=1,b=2"

[[guest]]
name = "client"
kernel = "{k}"
"#
        );
        let p = file("same", &toml);
        let by_file = expand(vec![
            "host-shim".into(),
            "--config".into(),
            p.clone().into(),
        ])
        .unwrap();
        let _ = std::fs::remove_file(&p);
        assert_eq!(parsed(by_file), parsed(flags));
    }

    #[test]
    fn flags_win_over_the_file_and_guests_add_up() {
        let k = exe();
        let p = file(
            "combine",
            &format!("timeout = 30\nhints = false\n[[guest]]\nname = \"a\"\nkernel = \"{k}\"\n"),
        );
        let args = expand(
            [
                "host-shim",
                "--config",
                p.to_str().unwrap(),
                "--timeout",
                "5",
                "--guest",
                &format!("name=b,kernel={k}"),
            ]
            .iter()
            .map(OsString::from)
            .collect(),
        )
        .unwrap();
        let _ = std::fs::remove_file(&p);
        let cli = Cli::try_parse_from(args).unwrap();
        assert_eq!(cli.timeout, 5);
        assert!(!cli.hints);
        let names: Vec<_> = cli.guests.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn unknown_keys_are_named_with_the_file() {
        let p = file("unknown", "timeout = 3\ncolour = \"red\"\n");
        let e = expand(vec![
            "host-shim".into(),
            "--config".into(),
            p.clone().into(),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("colour") && e.contains(&p.display().to_string()),
            "{e}"
        );
        let p2 = file(
            "unknown-guest",
            "[[guest]]\nkernel = \"/k\"\nram = \"1G\"\n",
        );
        let e = expand(vec![
            "host-shim".into(),
            "--config".into(),
            p2.clone().into(),
        ])
        .unwrap_err()
        .to_string();
        let _ = (std::fs::remove_file(&p), std::fs::remove_file(&p2));
        assert!(e.contains("ram"), "{e}");
        let e = expand(vec![
            "host-shim".into(),
            "--config".into(),
            "/no/such.toml".into(),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("/no/such.toml"), "{e}");
    }

    /// Every flag of `--help` has a key: a key the struct lacks fails the
    /// parse as unknown; one it has fails (if at all) for its dummy value.
    #[test]
    fn every_flag_has_a_key() {
        let skip = ["help", "version", "config", "seccomp-selftest"];
        let mut checked = 0;
        for arg in Cli::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if skip.contains(&long) {
                continue;
            }
            let key = if long == "guest" { "guest" } else { long };
            let text = format!("{key} = \"x\"\n");
            if let Err(e) = toml::from_str::<ConfigFile>(&text) {
                assert!(
                    !e.to_string().contains("unknown field"),
                    "flag --{long} has no config key: {e}"
                );
            }
            checked += 1;
        }
        assert!(checked >= 30, "only {checked} flags seen");
    }
}
