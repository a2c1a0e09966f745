//! The command line: guests to run, vCPU placement, networking, reports.

use std::path::PathBuf;

use clap::Parser;

use crate::spec::GuestSpec;
use crate::vm::GuestConfig;

/// `--help`'s groups: what every user needs first, the experiment knobs after.
const GUESTS: &str = "Guests and networking";
const RUN: &str = "Running, logging, reports and the API";
const MECH: &str = "Paravirtual mechanisms (experiments; defaults are the fast path)";
const TUNE: &str = "Placement and tuning (experiments)";
const TEST: &str = "Tests, benchmarks and debugging";

#[derive(Debug, Parser)]
#[command(
    name = "host-shim",
    version,
    about = "The Exitless VMM: runs one or more PVH guests over KVM with virtio-pci devices.",
    long_about = "The Exitless VMM: runs one or more PVH guests over KVM, each with a COM1 console \
(prefixed with the guest's name), ACPI tables, a PCI host bridge (ECAM + 0xCF8/0xCFC) and a \
virtio-net device on an in-process L2 switch shared by all guests.\n\n\
Each guest ends on its own (exit hypercall, triple fault, or fatal error); the shim exits when \
all have ended. Exit status: 0 when every guest exited with status 0, 1 otherwise, 2 for \
usage errors. SIGINT/SIGTERM stop every guest cleanly.\n\n\
With --api-sock the shim serves an HTTP API on a Unix socket (docs/api.yaml) through which guests \
are created and removed at run time; it then runs until told to shut down. --config FILE reads the \
same options from a TOML file (docs/operations.md).",
    after_help = "Example (after `cargo xtask build`, from the repository's root): a UDP ping-pong between two guests\n  K=target/x86_64-unknown-none/release/udp-pingpong\n  host-shim --guest name=server,kernel=$K,cmdline=\"pingpong.role=server ip=10.0.0.1/24\" \\\n            --guest name=client,kernel=$K,cmdline=\"pingpong.role=client ip=10.0.0.2/24 pingpong.peer=10.0.0.1 pingpong.count=100\" \\\n            --stats-json stats.json\n\nLogs go to stderr, filtered by RUST_LOG (or SHIM_LOG), e.g. RUST_LOG=host_shim=debug."
)]
#[command(args_override_self = true)]
#[allow(clippy::struct_excessive_bools)] // independent switches, not a state machine
pub struct Cli {
    /// A guest to run; repeat for several. Comma-separated keys:
    /// name=NAME (default g0, g1, ...; at most 24 bytes of [A-Za-z0-9_-]),
    /// kernel=PATH (required, a PVH ELF),
    /// vcpus=N (default 1, at most 254), mem=SIZE (default 256M; K/M/G suffixes; at most
    /// 2560M so that RAM ends below the para region at 0xA0000000 and the MMIO hole), cmdline=TEXT (the rest of the argument
    /// after "cmdline=" — put it last; may contain commas).
    #[arg(help_heading = GUESTS, long = "guest", value_name = "SPEC", value_parser = parse_guest)]
    pub guests: Vec<GuestConfig>,

    /// Give guests no network device at all.
    #[arg(help_heading = GUESTS, long)]
    pub no_net: bool,

    /// Also connect the switch to the host TAP device NAME (created through
    /// /dev/net/tun when missing; needs CAP_NET_ADMIN), so that Linux programs on the
    /// host can talk to the guests. The shim only moves frames: bring the TAP up and
    /// address it yourself once it exists, e.g. `ip addr add 10.0.0.254/24 dev NAME &&
    /// ip link set NAME up`. Frames from the host shorter than an Ethernet header or
    /// longer than 64 KiB are dropped and counted. A TAP the shim created goes away
    /// when the shim exits; make it persistent first (`ip tuntap add NAME mode tap`)
    /// to configure it before the guests start.
    #[arg(help_heading = GUESTS, long, value_name = "NAME", conflicts_with = "no_net", value_parser = parse_tap)]
    pub tap: Option<String>,

    /// Write per-guest and per-vCPU counters as JSON to FILE at exit.
    #[arg(help_heading = RUN, long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,

    /// Don't print the summary table at exit.
    #[arg(help_heading = RUN, long)]
    pub quiet: bool,

    /// Serve the shim's HTTP API (JSON, described in docs/api.yaml) on the
    /// Unix socket PATH: list, create, stop and remove guests, read their
    /// stats, shut the shim down. With it the shim may start with no guest
    /// and runs until `PUT /actions {"action":"shutdown"}` or SIGTERM.
    /// PATH must not exist yet (a stale socket of a dead shim is replaced).
    #[arg(help_heading = RUN, long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,

    /// Read guests and options from the TOML file FILE (docs/operations.md
    /// has a full example). Every flag has a key of the same name (e.g.
    /// `stats-json = "s.json"`, `doorbells = false`) and every `--guest` a
    /// `[[guest]]` table with its keys. Flags on the command line win over
    /// the file's values for the same option; `--guest` flags add guests
    /// after the file's. Unknown keys are refused, naming the key and FILE.
    #[arg(help_heading = RUN, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// vCPU placement: "none" (let the host schedule), "spread" (round-robin over the
    /// N host CPUs, every guest's vCPU 0 first, then every guest's vCPU 1, ..., so that
    /// the guests' boot vCPUs, which do most of the work, get different host CPUs),
    /// "sidecore" (every guest's vCPU 0 on the host CPUs but the last, the other vCPUs
    /// spread over all, and every doorbell monitor on the last CPU: a core for the
    /// data path, for guests that take turns like a ping-pong pair), or a comma list of
    /// host CPUs used round-robin over the vCPUs in command-line order (guest a's
    /// vCPUs, then guest b's, ...).
    #[arg(help_heading = TUNE, long, value_name = "POLICY", default_value = "spread", value_parser = parse_pin)]
    pub pin: PinPolicy,

    /// Exitless doorbells (M1): "on" offers every guest a para region with a
    /// doorbell ring consumed by a host monitor thread (CPUID 0x40000001 bits
    /// PARA_REGION and DOORBELLS); "off" offers neither (leaf 0x40000002 reads zero).
    #[arg(help_heading = MECH, long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, value_parser = parse_on_off)]
    pub doorbells: bool,

    /// The host CPU whose doorbell monitor serves the guests' NIC queues.
    /// Each guest gets a vCPU range on that CPU's monitor besides its own,
    /// and the para region's queue routes name that CPU for every NIC queue:
    /// the guest writes a NIC event into the range of the CPU its route names
    /// (other devices' events into its own range). Unset: its own monitor's
    /// CPU, one range (the routes name it all the same).
    #[arg(help_heading = TUNE, long, value_name = "CPU")]
    pub doorbell_nic_cpu: Option<usize>,

    /// How long a doorbell monitor spins (pause loop) on empty rings before it
    /// parks and sleeps until a trapping kick, in microseconds. Spinning costs a
    /// host CPU; the default (50) keeps an idle 2-core machine idle. 0 = park at once.
    #[arg(help_heading = TUNE, long, value_name = "N", default_value_t = crate::mech::doorbell::monitor::DEFAULT_SPIN_US)]
    pub doorbell_spin_us: u64,

    /// The most an adaptive monitor spins, in microseconds: the budget starts at
    /// --doorbell-spin-us, doubles while events keep arriving within it (or
    /// kicks come soon after parking) and falls back once the guests are idle.
    /// Equal to (or below) --doorbell-spin-us: a fixed budget.
    #[arg(help_heading = TUNE, long, value_name = "N", default_value_t = crate::mech::doorbell::monitor::DEFAULT_SPIN_MAX_US)]
    pub doorbell_spin_max_us: u64,

    /// The host priority a doorbell monitor spins at. "idle": SCHED_IDLE, so it
    /// spins only on CPU time nothing else wants and a waking vCPU thread
    /// preempts it at once; a watch thread raises a monitor starved for 1 ms back
    /// to normal until it parks. "normal": spin at normal priority, sharing the
    /// CPU with the vCPU threads. Monitors always park at normal priority.
    #[arg(help_heading = TUNE, long, value_name = "idle|normal", default_value = "idle", value_parser = crate::mech::doorbell::idle_spin::SpinClass::parse)]
    pub doorbell_spin_class: crate::mech::doorbell::idle_spin::SpinClass,

    /// Cap KVM's halt polling for every guest at NS nanoseconds
    /// (KVM_CAP_HALT_POLL): how long a vCPU thread that ran HLT spins in the
    /// host kernel for an interrupt before it sleeps; 0 turns it off. Unset: the
    /// host's default (/sys/module/kvm/parameters/halt_poll_ns). The stats JSON
    /// counts attempted and successful polls per vCPU.
    #[arg(help_heading = TUNE, long, value_name = "NS")]
    pub halt_poll_ns: Option<u32>,

    /// Serve the notification benchmark (`cargo xtask bench notify`): an MMIO
    /// exit address, an ioeventfd address and a doorbell device that each time
    /// and acknowledge a guest's notifications (needs --doorbells on).
    #[arg(help_heading = TEST, long)]
    pub notify_bench: bool,

    /// Give every guest a spare doorbell range on the next host CPU's monitor and
    /// let it ask (hypercall 21) to be moved there at run time: tests run-time
    /// re-designation and its notification (needs --doorbells on).
    #[arg(help_heading = TEST, long)]
    pub doorbell_redesignate: bool,
    /// Give every vCPU thread a time slice of MS milliseconds (1–1000): at its
    /// end the vCPU yields its host CPU, but never while the guest has interrupts
    /// masked — then the yield waits for the interrupt window (M3's window state
    /// informing scheduling; counted as preempt_deferred). Meant for more vCPUs
    /// than host CPUs; off by default.
    #[arg(help_heading = TUNE, long, value_name = "MS", value_parser = clap::value_parser!(u64).range(crate::mech::quantum::MIN_MS..=crate::mech::quantum::MAX_MS))]
    pub vcpu_quantum: Option<u64>,

    /// M3 upcalls: "window" offers every guest per-vCPU upcall mailboxes (CPUID
    /// 0x40000001 bit UPCALLS, leaf 0x40000004) and injects the shim's upcalls
    /// when the guest's interrupt window opens (KVM's interrupt-window exit);
    /// "poll" offers the same but, as a naive comparison, looks at IF again only
    /// at the vCPU's next exit of any cause; "off" offers nothing.
    #[arg(help_heading = MECH, long, value_name = "window|poll|off", default_value = "window")]
    pub upcalls: crate::mech::upcalls::Delivery,

    /// Interrupt-vCPU hints (M2): "on" offers every guest a read-only hints page
    /// (CPUID 0x40000001 bit HINTS, leaf 0x40000003) where the NIC's I/O thread
    /// names the guest's vCPUs that share its host CPU; "off" offers none.
    #[arg(help_heading = MECH, long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, value_parser = parse_on_off)]
    pub hints: bool,

    /// Pin every NIC's I/O thread (the worker that fills the RX ring and raises
    /// its interrupt) to host CPU N; unpinned by default.
    #[arg(help_heading = TUNE, long, value_name = "N")]
    pub io_cpu: Option<usize>,

    /// Move the I/O threads to host CPU `--io-cpu-move-to` this many ms after the
    /// guests start (for tests and benchmarks of the hints).
    #[arg(help_heading = TUNE, long, value_name = "MS", requires = "io_cpu_move_to")]
    pub io_cpu_move_after_ms: Option<u64>,

    /// Move each guest's I/O thread to `--io-cpu-move-to` once it has raised
    /// this many interrupts (a move at a fixed point of the run, for tests).
    #[arg(help_heading = TUNE, long, value_name = "N", requires = "io_cpu_move_to")]
    pub io_cpu_move_after_irqs: Option<u64>,

    /// Where `--io-cpu-move-after-ms` / `--io-cpu-move-after-irqs` move the I/O threads.
    #[arg(help_heading = TUNE, long, value_name = "N")]
    pub io_cpu_move_to: Option<usize>,

    /// Run to completion: "on" has the doorbell monitor that consumes a NIC
    /// notification do the queue work itself (pop TX, switch, push into the
    /// peer's RX ring, wake the peer) and the switch push frames into a guest
    /// NIC's RX ring on the sender's thread; "off" wakes the NIC's worker
    /// thread for each (eventfds).
    #[arg(help_heading = MECH, long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, value_parser = parse_on_off)]
    pub run_to_completion: bool,

    /// With run to completion, who pushes the frames the switch hands a
    /// guest's NIC into its RX ring: "sender", the thread that hands them
    /// over (the TAP reader, the other guest's vCPU or monitor); "monitor",
    /// that guest's doorbell monitor, to which the sender posts an event
    /// through a host-written range of the guest's para region (source type
    /// "host CPU", read-only to the guest). Needs --doorbells on.
    #[arg(help_heading = MECH, long, value_name = "sender|monitor", default_value = "sender")]
    pub rx_handoff: RxHandoff,

    /// Latency-breakdown stamps (`cargo xtask bench breakdown`): "on" takes
    /// each frame's host TSC stamps and the sender's own, converted to the
    /// receiver's TSC, into the receiver's M4 wait page. Off by default: they
    /// carry one guest's timing into another guest's page.
    #[arg(help_heading = TEST, long, value_name = "on|off", default_value = "off", action = clap::ArgAction::Set, value_parser = parse_on_off)]
    pub latency_stamps: bool,

    /// Shadowed control flags (M4): "on" maps every guest's control blocks
    /// (CPUID 0x40000001 bit SHADOW_FLAGS, leaf 0x40000005); "off" offers none.
    #[arg(help_heading = MECH, long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, value_parser = parse_on_off)]
    pub shadow_flags: bool,

    /// VM queues (M5): "on" gives every guest a VM-queue area (inbox, outbox,
    /// directory of all guests by name, receive window) and offers it (CPUID
    /// 0x40000001 bit VM_QUEUES, leaf 0x40000006).
    #[arg(help_heading = MECH, long, value_name = "on|off", default_value = "off", action = clap::ArgAction::Set, value_parser = parse_on_off)]
    pub vmq: bool,

    /// Direct channels between guests: with `--vmq on`, "on" gives every pair
    /// of guests a ring pair the shim maps at start-up (each guest's endpoint
    /// read-write for it, read-only for its peer; CPUID 0x40000001 bit
    /// DIRECT_CHANNELS, leaf 0x40000007), which a guest uses with
    /// `net.dev=vmq net.vmq_policy=direct`; no host thread and no exit per frame.
    #[arg(help_heading = MECH, long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, value_parser = parse_on_off)]
    pub direct: bool,

    /// Answer the test-only hypercalls (M3's upcall ping and storm, which the
    /// in-guest tests and benchmarks use). Off by default: a guest then gets
    /// "unknown call" for them, counted, and cannot make the shim start a
    /// storm thread.
    #[arg(help_heading = TEST, long)]
    pub test_hypercalls: bool,

    /// When a guest fails (an exit status other than 0, a triple fault, an
    /// error of the shim), stop every other guest at once instead of letting
    /// them run on (a ping-pong server would wait for its dead client until
    /// the timeout). Either way the shim says on its stdout, the moment it
    /// happens, how the guest ended.
    #[arg(help_heading = RUN, long)]
    pub end_on_failure: bool,

    /// Give up and stop all guests after this many seconds (0 = never).
    #[arg(help_heading = RUN, long, value_name = "SECS", default_value_t = 0)]
    pub timeout: u64,

    /// Debug one guest with gdb: listen on 127.0.0.1:PORT and keep the guest's
    /// vCPUs before their first instruction until gdb attaches and continues.
    /// "NAME=PORT" names the guest (required with several guests; "PORT" alone
    /// picks the only one). Every vCPU is a gdb thread; breakpoints (at most
    /// four: debug registers), single steps, registers, memory at
    /// guest-virtual addresses, Ctrl-C and detach work (docs/guide.md,
    /// "Debugging", says where a host's KVM limits them). Attach with:
    /// gdb -ex 'target remote 127.0.0.1:PORT' KERNEL
    #[arg(long, value_name = "[NAME=]PORT", value_parser = crate::gdb::GdbSpec::parse)]
    pub gdb: Option<crate::gdb::GdbSpec>,

    /// Per-thread seccomp filters: every shim thread (main, vCPU, doorbell
    /// monitor, NIC worker, TAP, VM-queue worker, timers) runs under an
    /// allow-list of the system calls its kind makes. A call outside it stops
    /// the shim with exit status 159 and one line naming the thread and the
    /// call. "off" is for debugging only (e.g. under a tool that makes calls
    /// of its own).
    #[arg(help_heading = TEST, long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, value_parser = parse_on_off)]
    pub seccomp: bool,

    /// Test only: start one thread under the given filter kind that makes
    /// a system call outside every list, to show how a violation is reported.
    #[arg(help_heading = TEST, long, value_name = "KIND", hide = true)]
    pub seccomp_selftest: Option<String>,
}

/// Who does a guest NIC's RX work for frames another host thread hands it
/// (`--rx-handoff`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RxHandoff {
    /// The handing thread itself.
    Sender,
    /// The guest's doorbell monitor, woken through a host-written range.
    Monitor,
}

impl RxHandoff {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Sender => "sender",
            Self::Monitor => "monitor",
        }
    }
}

/// How vCPU threads are placed on host CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinPolicy {
    None,
    Spread,
    /// A monitor core: every guest's vCPU 0 on the CPUs but the last, the
    /// other vCPUs spread, every doorbell monitor on the last CPU.
    Sidecore,
    List(Vec<usize>),
}

impl PinPolicy {
    /// The host CPU for each vCPU of each guest (`vcpus[g]` vCPUs in guest `g`), given
    /// `ncpus` host CPUs.
    #[must_use]
    pub fn placement(&self, vcpus: &[u32], ncpus: usize) -> Vec<Vec<Option<usize>>> {
        let ncpus = ncpus.max(1);
        let mut out: Vec<Vec<Option<usize>>> =
            vcpus.iter().map(|&n| vec![None; n as usize]).collect();
        match self {
            Self::None => {}
            Self::Spread => {
                // Rank by (vCPU index, guest index): all boot vCPUs first.
                let most = vcpus.iter().copied().max().unwrap_or(0) as usize;
                let mut k = 0;
                for v in 0..most {
                    for (g, cpus) in out.iter_mut().enumerate() {
                        if v < vcpus[g] as usize {
                            cpus[v] = Some(k % ncpus);
                            k += 1;
                        }
                    }
                }
            }
            Self::Sidecore => {
                let shared = (ncpus - 1).max(1);
                for (g, cpus) in out.iter_mut().enumerate() {
                    for (v, slot) in cpus.iter_mut().enumerate() {
                        *slot = Some(if v == 0 { g % shared } else { v % ncpus });
                    }
                }
            }
            Self::List(l) => {
                for (k, slot) in out.iter_mut().flatten().enumerate() {
                    *slot = l.get(k % l.len().max(1)).copied();
                }
            }
        }
        out
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("expected on or off, got {other:?}")),
    }
}

fn parse_tap(s: &str) -> Result<String, String> {
    crate::devices::tap::check_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

fn parse_pin(s: &str) -> Result<PinPolicy, String> {
    match s {
        "none" => Ok(PinPolicy::None),
        "spread" => Ok(PinPolicy::Spread),
        "sidecore" => Ok(PinPolicy::Sidecore),
        list => {
            let cpus: Result<Vec<usize>, _> =
                list.split(',').map(|c| c.trim().parse::<usize>()).collect();
            match cpus {
                Ok(c) if !c.is_empty() => Ok(PinPolicy::List(c)),
                _ => Err(format!(
                    "expected none, spread, sidecore or a CPU list like 0,1; got {list:?}"
                )),
            }
        }
    }
}

/// Parses `name=a,kernel=PATH,vcpus=2,mem=256M,cmdline=...` (the keys of
/// [`GuestSpec`]); an unnamed guest is named by [`Cli::finish`].
pub fn parse_guest(spec: &str) -> Result<GuestConfig, String> {
    GuestSpec::parse_flag(spec)?.check()
}

impl Cli {
    /// Names guests that have none, checks names are unique and that there
    /// is something to run.
    pub fn finish(&mut self) -> Result<(), String> {
        if self.guests.is_empty() && self.api_sock.is_none() {
            return Err(
                "no guest to run: give --guest SPEC (or a [[guest]] table in \
                        --config FILE), or --api-sock PATH to create guests at run time"
                    .into(),
            );
        }
        for (i, g) in self.guests.iter_mut().enumerate() {
            if g.name.is_empty() {
                g.name = format!("g{i}");
            }
        }
        let mut names: Vec<&str> = self.guests.iter().map(|g| g.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err("guest names must be unique".into());
        }
        if self.rx_handoff == RxHandoff::Monitor && !(self.doorbells && self.run_to_completion) {
            return Err(
                "--rx-handoff monitor hands RX work to the guest's doorbell monitor: it needs \
                 --doorbells on and --run-to-completion on"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exe() -> String {
        std::env::current_exe().unwrap().display().to_string()
    }

    #[test]
    fn full_spec_parses_with_commas_in_cmdline() {
        let g = parse_guest(&format!(
            "name=a,kernel={},vcpus=2,mem=64M,cmdline=a=1,b=2",
            exe()
        ))
        .unwrap();
        assert_eq!(
            (g.name.as_str(), g.vcpus, g.mem, g.cmdline.as_str()),
            ("a", 2, 64 << 20, "a=1,b=2")
        );
    }

    #[test]
    fn bad_specs_are_refused() {
        let k = exe();
        assert!(parse_guest("name=a").unwrap_err().contains("kernel"));
        assert!(
            parse_guest("kernel=/no/such/file")
                .unwrap_err()
                .contains("does not exist")
        );
        assert!(parse_guest(&format!("kernel={k},vcpus=0")).is_err());
        assert!(parse_guest(&format!("kernel={k},mem=4G")).is_err());
        assert!(
            parse_guest(&format!("kernel={k},colour=red"))
                .unwrap_err()
                .contains("unknown")
        );
        assert!(parse_guest(&format!("kernel={k},name=a b")).is_err());
        // 24 bytes fit the VM-queue directory; 25 would be cut short there.
        assert!(parse_guest(&format!("kernel={k},name=pipeline-stage-1-primary")).is_ok());
        let e = parse_guest(&format!("kernel={k},name=pipeline-stage-01-replica")).unwrap_err();
        assert!(e.contains("25 bytes; at most 24"), "{e}");
    }

    #[test]
    fn pin_policies() {
        assert_eq!(
            parse_pin("none").unwrap().placement(&[2, 1], 2),
            [vec![None, None], vec![None]]
        );
        // Two guests of two vCPUs on two CPUs: the boot vCPUs on different CPUs.
        let s = parse_pin("spread").unwrap();
        assert_eq!(
            s.placement(&[2, 2], 2),
            [vec![Some(0), Some(0)], vec![Some(1), Some(1)]]
        );
        assert_eq!(
            s.placement(&[3, 1], 4),
            [vec![Some(0), Some(2), Some(3)], vec![Some(1)]]
        );
        assert_eq!(s.placement(&[1], 0), [vec![Some(0)]]);
        // A monitor core: the boot vCPUs share the CPUs but the last.
        let c = parse_pin("sidecore").unwrap();
        assert_eq!(
            c.placement(&[2, 2], 2),
            [vec![Some(0), Some(1)], vec![Some(0), Some(1)]]
        );
        assert_eq!(
            c.placement(&[1, 1, 2], 4),
            [vec![Some(0)], vec![Some(1)], vec![Some(2), Some(1)]]
        );
        assert_eq!(c.placement(&[2], 1), [vec![Some(0), Some(0)]]);
        let l = parse_pin("1,0").unwrap();
        assert_eq!(
            l.placement(&[2, 1], 2),
            [vec![Some(1), Some(0)], vec![Some(1)]]
        );
        assert!(parse_pin("x").is_err());
    }

    #[test]
    fn unnamed_guests_get_names_and_duplicates_fail() {
        let k = exe();
        let mut c = Cli::try_parse_from([
            "host-shim",
            "--guest",
            &format!("kernel={k}"),
            "--guest",
            &format!("kernel={k}"),
        ])
        .unwrap();
        c.finish().unwrap();
        assert_eq!(c.guests[1].name, "g1");
        let mut c = Cli::try_parse_from([
            "host-shim",
            "--guest",
            &format!("name=x,kernel={k}"),
            "--guest",
            &format!("name=x,kernel={k}"),
        ])
        .unwrap();
        assert!(c.finish().is_err());
        assert!(Cli::try_parse_from(["host-shim", "--bogus"]).is_err());
    }

    #[test]
    fn rx_handoff_to_the_monitor_needs_doorbells_and_run_to_completion() {
        let g = format!("kernel={}", exe());
        let parse = |extra: &[&str]| {
            let mut args = vec!["host-shim", "--guest", &g];
            args.extend_from_slice(extra);
            let mut c = Cli::try_parse_from(args).unwrap();
            c.finish().map(|()| c.rx_handoff)
        };
        assert_eq!(parse(&[]), Ok(RxHandoff::Sender));
        assert_eq!(parse(&["--rx-handoff", "monitor"]), Ok(RxHandoff::Monitor));
        for off in [["--doorbells", "off"], ["--run-to-completion", "off"]] {
            let e = parse(&[&["--rx-handoff", "monitor"][..], &off[..]].concat()).unwrap_err();
            assert!(
                e.contains("--doorbells on and --run-to-completion on"),
                "{e}"
            );
        }
        assert!(
            Cli::try_parse_from(["host-shim", "--guest", &g, "--rx-handoff", "worker"]).is_err()
        );
    }

    #[test]
    fn hint_flags() {
        let g = format!("kernel={}", exe());
        let c = Cli::try_parse_from(["host-shim", "--guest", &g]).unwrap();
        assert!(c.hints);
        assert_eq!(c.io_cpu, None);
        let c = Cli::try_parse_from([
            "host-shim",
            "--guest",
            &g,
            "--hints",
            "off",
            "--io-cpu",
            "1",
            "--io-cpu-move-after-irqs",
            "500",
            "--io-cpu-move-to",
            "0",
        ])
        .unwrap();
        assert!(!c.hints);
        assert_eq!(
            (c.io_cpu, c.io_cpu_move_after_irqs, c.io_cpu_move_to),
            (Some(1), Some(500), Some(0))
        );
        // A move needs a destination.
        assert!(
            Cli::try_parse_from(["host-shim", "--guest", &g, "--io-cpu-move-after-ms", "5"])
                .is_err()
        );
    }

    #[test]
    fn doorbell_flags() {
        use crate::mech::doorbell::idle_spin::SpinClass;
        let g = format!("kernel={}", exe());
        let c = Cli::try_parse_from(["host-shim", "--guest", &g]).unwrap();
        assert!(c.doorbells);
        assert_eq!(c.doorbell_spin_us, 50);
        assert_eq!(c.doorbell_spin_class, SpinClass::Idle);
        assert_eq!(c.halt_poll_ns, None);
        assert!(!c.notify_bench);
        let c = Cli::try_parse_from([
            "host-shim",
            "--guest",
            &g,
            "--doorbells",
            "off",
            "--doorbell-spin-us",
            "0",
            "--notify-bench",
            "--doorbell-spin-class",
            "normal",
            "--halt-poll-ns",
            "200000",
        ])
        .unwrap();
        assert_eq!(c.doorbell_spin_class, SpinClass::Normal);
        assert_eq!(c.halt_poll_ns, Some(200_000));
        assert!(
            Cli::try_parse_from(["host-shim", "--guest", &g, "--doorbell-spin-class", "rt"])
                .is_err()
        );
        assert!(c.notify_bench);
        assert!(!c.doorbells);
        assert_eq!(c.doorbell_spin_us, 0);
        assert!(Cli::try_parse_from(["host-shim", "--guest", &g, "--doorbells", "maybe"]).is_err());
        let e = parse_guest(&format!("{g},mem=2816M")).unwrap_err();
        assert!(e.contains("para region"), "{e}");
        assert!(parse_guest(&format!("{g},mem=2560M")).is_ok());
    }

    #[test]
    fn upcall_flag() {
        use crate::mech::upcalls::Delivery;
        let g = format!("kernel={}", exe());
        let c = Cli::try_parse_from(["host-shim", "--guest", &g]).unwrap();
        assert_eq!(c.upcalls, Delivery::Window);
        for (text, d) in [("poll", Delivery::Poll), ("off", Delivery::Off)] {
            let c = Cli::try_parse_from(["host-shim", "--guest", &g, "--upcalls", text]).unwrap();
            assert_eq!(c.upcalls, d);
        }
        assert!(Cli::try_parse_from(["host-shim", "--guest", &g, "--upcalls", "on"]).is_err());
        assert!(
            !c.test_hypercalls,
            "test-only hypercalls are off by default"
        );
        let c = Cli::try_parse_from(["host-shim", "--guest", &g, "--test-hypercalls"]).unwrap();
        assert!(c.test_hypercalls);
    }

    #[test]
    fn tap_names_are_checked_and_exclude_no_net() {
        let g = format!("kernel={}", exe());
        let c = Cli::try_parse_from(["host-shim", "--guest", &g, "--tap", "tap0"]).unwrap();
        assert_eq!(c.tap.as_deref(), Some("tap0"));
        assert!(Cli::try_parse_from(["host-shim", "--guest", &g, "--tap", "a/b"]).is_err());
        assert!(
            Cli::try_parse_from(["host-shim", "--guest", &g, "--tap", "t0", "--no-net"]).is_err()
        );
    }
}
