//! The VM-queue pipeline demo (M5): three guests `read` → `transform` →
//! `write` joined by VM queues under the shim (`cargo xtask run --demo
//! pipeline`, leg `shim-pipeline`, bench suite `vmq`).

use std::time::Duration;

use clap::ValueEnum;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::infra::build;
use crate::vmm::shim;
use crate::vmm::stats::{GuestStats, VmqStats};

/// When the shim delivers a message (`para_abi::vmq::Policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    /// Each send is followed by a flush hypercall: delivered before the guest resumes.
    Immediate,
    /// Messages wait in the outbox until the sender's next exit.
    Lazy,
    /// An M1 doorbell event has the shim's monitor thread deliver them.
    Doorbell,
}

/// How the shim moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transfer {
    Copy,
    /// Page exchange with `mmap(MAP_FIXED)`.
    Remap,
}

impl Policy {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Immediate => "immediate",
            Self::Lazy => "lazy",
            Self::Doorbell => "doorbell",
        }
    }
}

impl Transfer {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::Remap => "remap",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub policy: Policy,
    pub transfer: Transfer,
    pub mib: u64,
    /// Bytes per message (a power of two, 4 KiB to 2 MiB).
    pub msg: u32,
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            policy: Policy::Immediate,
            transfer: Transfer::Copy,
            mib: 64,
            msg: 64 << 10,
            timeout: Duration::from_mins(3),
        }
    }
}

/// One guest's share of a run.
#[derive(Debug, Clone, Default)]
pub struct GuestFigures {
    pub name: String,
    pub exits: u64,
    /// Messages this guest sent (delivered).
    pub sends: u64,
    /// Its flush hypercalls (the exits it made on purpose), as it reports them.
    pub flushes: u64,
    /// Hypercall exits the shim counted for it (flushes + main-reached + exit).
    pub hypercall_exits: u64,
    /// Drains the shim stopped at a full destination (`Message::HOLD`): exits
    /// that moved nothing because the receiver lagged.
    pub held: u64,
    /// Trapping doorbell kicks (M1 monitor parked): ioeventfd exits.
    pub kicks: u64,
    /// The sender's own flush exits as the shim counted them: `VmqFlush`
    /// hypercalls, kick-page flushes (of which `full_flushes` because its
    /// outbox was full) and immediate flushes that waited in the same exit.
    /// Plain waits and other guests' drains are not in it.
    pub flush_exits: u64,
    pub full_flushes: u64,
    /// Kick-page waits (the exits it made in place of halting).
    pub waits: u64,
    /// KVM exits between its warm and end marks, and the messages it
    /// handled in between (`None` without both marks).
    pub steady_exits: Option<u64>,
    pub steady_msgs: u64,
    /// KVM's `pf_taken` over its vCPUs: page faults this KVM took,
    /// kick-page stores among them (this KVM caches no MMIO translations).
    pub pf_taken: u64,
    /// KVM's `irq_exits`: host interrupts that stopped its vCPUs (timer
    /// ticks, and the TLB-shootdown IPIs of other guests' remaps).
    pub host_irqs: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub bytes_sent: u64,
    pub bytes_verified: u64,
    pub mib_per_s: f64,
    pub guests: Vec<GuestFigures>,
    pub checks: Vec<(String, bool)>,
    pub log: std::path::PathBuf,
}

const NAMES: [&str; 3] = ["read", "transform", "write"];

/// The demo's `StatsMark` labels: after its warm-up messages, and at its end.
const MARK_WARM: u64 = 0x5651_0001;
const MARK_END: u64 = 0x5651_0002;

impl Outcome {
    /// KVM exits of all three guests per message in the steady part of the
    /// stream (between each guest's warm and end marks), if every guest marked.
    #[must_use]
    pub fn steady_exits_per_msg(&self) -> Option<f64> {
        let exits: u64 = self
            .guests
            .iter()
            .map(|g| g.steady_exits)
            .sum::<Option<u64>>()?;
        let msgs = self.guests.iter().map(|g| g.steady_msgs).max()?;
        let f = |n: u64| f64::from(u32::try_from(n).unwrap_or(u32::MAX));
        (msgs > 0).then(|| f(exits) / f(msgs))
    }
}

fn cmdline(o: &Options, role: usize) -> String {
    let next = NAMES
        .get(role + 1)
        .map_or(String::new(), |n| format!(" pipeline.next={n}"));
    format!(
        "pipeline.role={}{next} pipeline.mib={} pipeline.msg={} pipeline.policy={} pipeline.transfer={}",
        NAMES[role],
        o.mib,
        o.msg,
        o.policy.name(),
        o.transfer.name()
    )
}

/// The JSON of the write guest's `pipeline-result:` line
/// (`demos/src/bin/pipeline.rs`), the keys xtask reads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ResultLine {
    pub bytes_verified: u64,
    pub mib_per_s: f64,
}

/// A `key=N` number in a guest's `pipeline-sender:` line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Where the host says whether shared memory (the shim's memfd guest RAM)
/// may get transparent huge pages.
const SHMEM_THP: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// The bracketed word of a `shmem_enabled` file.
fn thp_mode(s: &str) -> Option<&str> {
    let start = s.find('[')? + 1;
    Some(&s[start..start + s[start..].find(']')?])
}

/// While alive, shared memory may get huge pages where a mapping asks for
/// them (`advise`): the shim then remaps a 2 MiB message as one huge page,
/// one guest fault instead of 512. Set only when running as root and the
/// host says `never`; put back when dropped. Without it the shim falls back
/// to 4 KiB pages (and says so in its log).
struct HugePages {
    restore: Option<String>,
}

impl HugePages {
    fn enable() -> Self {
        let Ok(now) = std::fs::read_to_string(SHMEM_THP) else {
            return Self { restore: None };
        };
        let Some(mode) = thp_mode(&now).map(str::to_owned) else {
            return Self { restore: None };
        };
        if mode != "never" || !crate::infra::sys::is_root() {
            return Self { restore: None };
        }
        match std::fs::write(SHMEM_THP, "advise") {
            Ok(()) => {
                println!(
                    "vmq: {SHMEM_THP}: never -> advise for this run (huge pages only where the shim asks; put back after)"
                );
                Self {
                    restore: Some(mode),
                }
            }
            Err(e) => {
                println!("vmq: could not set {SHMEM_THP} to advise ({e}): remaps use 4 KiB pages");
                Self { restore: None }
            }
        }
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(mode) = self.restore.take()
            && let Err(e) = std::fs::write(SHMEM_THP, &mode)
        {
            println!("vmq: could not put {SHMEM_THP} back to {mode}: {e}");
        }
    }
}

/// The roles ask for quiet arrivals (`vmq::INBOX_QUIET`): a receiver blocked
/// in a kick-page wait is woken directly, one that runs finds the arrival
/// at its next look, so no arrival upcall is requested for them — but for
/// one: an arrival before the receiver opened its queue and asked for quiet
/// (only the empty → non-empty edge notifies, and it consumes nothing yet).
fn quiet_checks(run: &shim::Run, checks: &mut Vec<(String, bool)>) {
    for name in ["transform", "write"] {
        let g = run.guest_stats(name);
        let u = g.and_then(|g| g.upcalls.as_ref());
        let req = u.map_or(u64::MAX, |u| u.requested.vmq_arrival);
        let del = u.map_or(0, |u| u.delivered.vmq_arrival);
        let quiet = g
            .and_then(|g| g.vmq.as_ref())
            .map_or(0, |v| v.notifications_quiet);
        checks.push((
            format!(
                "{name}: no VM-queue arrival upcalls to a quiet guest but one before it asked, delivered ({req} requested, {del} delivered; {quiet} notifications left unsent while it ran)"
            ),
            req <= 1 && del == req,
        ));
    }
}

/// Runs the three guests once and judges the run.
pub fn on_shim(o: &Options, label: &str, mut echo: impl FnMut(&str)) -> Result<Outcome> {
    if !(64..=(2 << 20)).contains(&o.msg) || !o.msg.is_power_of_two() {
        return Err(Error::usage(
            "--msg must be a power of two from 64 to 2097152".to_string(),
        ));
    }
    if o.transfer == Transfer::Remap && o.msg < 4096 {
        return Err(Error::usage(
            "a remap moves whole pages: --msg must be at least 4096".to_string(),
        ));
    }
    let shim_path = shim::build()?;
    let image = build::build_guest(build::find_image("pipeline")?)?;
    let guests: Vec<shim::Guest> = (0..NAMES.len())
        .map(|i| shim::Guest {
            name: NAMES[i].to_string(),
            image: image.clone(),
            vcpus: 1,
            mem_mib: 256,
            cmdline: cmdline(o, i),
        })
        .collect();
    let extra = [
        "--vmq".to_string(),
        "on".to_string(),
        "--no-net".to_string(),
    ];
    let huge = HugePages::enable();
    let run = shim::run(&shim_path, &guests, &extra, o.timeout, label, &mut echo);
    drop(huge);
    let run = run?;
    let mut out = Outcome {
        log: run.log.clone(),
        ..Outcome::default()
    };
    for name in NAMES {
        out.checks.push(run.exit_check(name));
        let stats = run.guest_stats(name);
        let vmq = stats.and_then(|g| g.vmq.as_ref());
        let sender = shim::guest_lines(&run.lines, name)
            .into_iter()
            .find(|l| l.starts_with("pipeline-sender:"))
            .unwrap_or_default();
        let g = GuestFigures {
            name: name.to_string(),
            exits: stats.map_or(0, |g| g.exits),
            sends: vmq.map_or(0, VmqStats::sends),
            flushes: field(sender, "flushes").unwrap_or(0),
            hypercall_exits: stats.map_or(0, GuestStats::hypercall_exits),
            held: vmq.map_or(0, |v| v.held),
            kicks: stats.map_or(0, |g| g.doorbell.fallback_kicks),
            flush_exits: vmq.map_or(0, |v| {
                v.flush_calls + v.kick_flushes + v.full_flushes + v.flush_waits
            }),
            full_flushes: vmq.map_or(0, |v| v.full_flushes),
            waits: vmq.map_or(0, |v| v.waits),
            steady_exits: stats.and_then(|g| {
                g.mark(MARK_END)?
                    .exits
                    .checked_sub(g.mark(MARK_WARM)?.exits)
            }),
            steady_msgs: (o.mib << 20) / u64::from(o.msg)
                - field(sender, "warm").unwrap_or((o.mib << 20) / u64::from(o.msg)),
            pf_taken: stats.map_or(0, |g| g.kvm_sums().get("pf_taken").copied().unwrap_or(0)),
            host_irqs: stats.map_or(0, |g| g.kvm_sums().get("irq_exits").copied().unwrap_or(0)),
        };
        if name == "read" {
            out.bytes_sent = vmq.map_or(0, |v| v.bytes_sent);
        }
        out.guests.push(g);
    }
    if let Some(result) = shim::guest_lines(&run.lines, "write")
        .into_iter()
        .find_map(|l| l.strip_prefix("pipeline-result: "))
        .and_then(|j| serde_json::from_str::<ResultLine>(j).ok())
    {
        out.bytes_verified = result.bytes_verified;
        out.mib_per_s = result.mib_per_s;
    }
    quiet_checks(&run, &mut out.checks);
    let total = o.mib << 20;
    out.checks.push((
        format!("read sent {total} bytes (shim: {})", out.bytes_sent),
        out.bytes_sent == total,
    ));
    out.checks.push((
        format!(
            "write verified every byte in order ({} of {total})",
            out.bytes_verified
        ),
        out.bytes_verified == total,
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_chain_by_name() {
        let o = Options::default();
        assert!(cmdline(&o, 0).contains("pipeline.role=read pipeline.next=transform"));
        assert!(cmdline(&o, 1).contains("pipeline.next=write"));
        assert!(!cmdline(&o, 2).contains("pipeline.next"));
        assert!(cmdline(&o, 2).contains("pipeline.policy=immediate pipeline.transfer=copy"));
    }

    #[test]
    fn the_result_line_is_typed() {
        // As the write guest printed it in a run.
        let line = r#"{"bytes_verified": 67108864, "seconds": 0.967543, "mib_per_s": 66.15}"#;
        let r: ResultLine = serde_json::from_str(line).unwrap();
        assert_eq!(r.bytes_verified, 64 << 20);
        assert!((r.mib_per_s - 66.15).abs() < 1e-9);
        let err = serde_json::from_str::<ResultLine>(&line.replace("\"mib_per_s\"", "\"mibps\""))
            .unwrap_err();
        assert!(
            err.to_string().contains("missing field `mib_per_s`"),
            "{err}"
        );
    }

    #[test]
    fn the_thp_mode_is_the_bracketed_word() {
        assert_eq!(
            thp_mode("always within_size advise [never] deny force\n"),
            Some("never")
        );
        assert_eq!(thp_mode("[advise] never"), Some("advise"));
        assert_eq!(thp_mode("advise never"), None);
    }

    #[test]
    fn sender_fields_parse() {
        let l = "pipeline-sender: role=read sends=1024 flushes=319";
        assert_eq!(field(l, "flushes"), Some(319));
        assert_eq!(field(l, "sends"), Some(1024));
        assert_eq!(field(l, "nope"), None);
    }
}
