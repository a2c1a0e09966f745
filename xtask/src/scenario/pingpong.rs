//! The UDP ping-pong demo: one server guest and one or more client guests,
//! under the host shim (`cargo xtask run`, leg `shim-pingpong`) or as two
//! QEMU/KVM guests joined by a socket netdev (leg `qemu-pingpong`).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use para_abi::report::{STEADY_BEGIN, STEADY_END};

use crate::error::{Error, Result};
use crate::infra::build;
use crate::infra::process::Line;
use crate::vmm::exit::GuestExit;
use crate::vmm::qemu::{self, Accel, Echo, Machine, Net};
use crate::vmm::shim::{self, GuestNumbers};
use crate::vmm::stats::GuestStats;

/// How the guests notify their NIC of new buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Notify {
    /// Doorbells when the shim offers them, the notify register otherwise.
    Auto,
    /// The virtio notify register (an ioeventfd: an exit KVM handles).
    Trap,
    /// Exitless doorbells (mechanism M1): events in memory the shim's
    /// monitor threads watch.
    Doorbell,
}

impl Notify {
    /// The guests' `net.notify=` word (nothing for the default).
    const fn cmdline(self) -> &'static str {
        match self {
            Self::Auto => "",
            Self::Trap => " net.notify=trap",
            Self::Doorbell => " net.notify=doorbell",
        }
    }
}

/// How the guests take received frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Rx {
    /// Sleep until the RX interrupt.
    Irq,
    /// Busy-poll the used ring.
    Poll,
}

impl Rx {
    /// The guests' `net.rx=` word.
    #[must_use]
    pub const fn cmdline(self) -> &'static str {
        match self {
            Self::Irq => "irq",
            Self::Poll => "poll",
        }
    }
}

/// What carries the frames between the guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Link {
    /// Each guest's virtio-net NIC on the shim's switch (or QEMU's socket netdev).
    Switch,
    /// A direct channel the shim maps between two guests (shim only, two
    /// guests): the VM-queue NIC with `net.vmq_policy=direct`, no virtio-net.
    Direct,
}

/// How two QEMU guests are joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuLink {
    /// A `socket` netdev: one QEMU listens on a loopback port, the other
    /// connects; frames cross as a TCP stream between the two processes.
    Socket,
    /// A TAP device per QEMU, both on a Linux bridge (needs root).
    TapBridge,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Guests in all: one server and `guests - 1` clients.
    pub guests: u32,
    pub count: u64,
    pub size: u32,
    pub vcpus: u32,
    pub rx: Rx,
    pub notify: Notify,
    pub link: Link,
    /// QEMU only: the netdev joining the two VMs.
    pub qemu_link: QemuLink,
    pub timeout: Duration,
    /// Where the clients' NIC interrupts go (`net.irq_cpu`); `None` leaves the
    /// default (the CPU running the network stack). The placement check sets it.
    pub client_irq_cpu: Option<u32>,
    /// Appended to every guest's command line (benchmarks: `pingpong.linger_ms`...).
    pub extra_cmdline: String,
    /// Shim only: more host-shim flags (benchmarks: `--doorbell-spin-max-us`...).
    pub shim_args: Vec<String>,
    /// QEMU only: give each VM a QMP socket `DIR/NAME.sock` (benchmarks read
    /// KVM statistics through it).
    pub qmp_dir: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            guests: 2,
            count: 1000,
            size: 64,
            vcpus: 2,
            rx: Rx::Irq,
            notify: Notify::Auto,
            link: Link::Switch,
            qemu_link: QemuLink::Socket,
            timeout: Duration::from_mins(2),
            client_irq_cpu: None,
            extra_cmdline: String::new(),
            shim_args: Vec::new(),
            qmp_dir: None,
        }
    }
}

/// What a client guest printed on its `pingpong-result:` line.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientResult {
    pub name: String,
    pub sent: u64,
    pub received: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub pps: u64,
    /// RX interrupts the client took on each of its CPUs.
    pub rx_irqs_by_cpu: Vec<u64>,
    /// RTT at every 5th percentile (µs), when the client printed them
    /// (`pingpong.quantiles=1`).
    pub quantiles_us: Vec<f64>,
    /// The client's interrupt-vCPU hint decisions.
    pub hints: GuestHints,
}

/// The JSON of a client's `pingpong-result:` line
/// (`demos/src/bin/udp_pingpong.rs`), the keys xtask reads; others are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ResultLine {
    pub packets_sent: u64,
    pub packets_received: u64,
    pub rtt_ns: RttLine,
    pub pps: u64,
    pub rx_irqs_by_cpu: Vec<u64>,
    pub hints: GuestHints,
}

/// `rtt_ns` of a result line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct RttLine {
    pub p50: u64,
    pub p99: u64,
}

/// `hints` of a result line: what the guest's hint follower decided. Fields in
/// key order, because the checks print the object as JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct GuestHints {
    pub already: u64,
    /// Hints naming only vCPUs that do not run the stack (not followed).
    pub declined: u64,
    pub ignored: u64,
    pub retargeted: u64,
    pub seen: u64,
    /// `on`, `off`...
    pub state: String,
    pub torn: u64,
    /// `HintUpdate` upcalls the guest handled.
    pub upcalls: u64,
}

pub const QUANTILES_PREFIX: &str = "pingpong-quantiles-us: ";

pub const RESULT_PREFIX: &str = "pingpong-result: ";

/// Parses a client's result line (`None` when there is none or it is
/// malformed: a key missing or renamed in the guest counts as malformed).
#[must_use]
pub fn parse_result<'a>(
    name: &str,
    lines: impl IntoIterator<Item = &'a str>,
) -> Option<ClientResult> {
    let lines: Vec<&str> = lines.into_iter().collect();
    let line: ResultLine = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix(RESULT_PREFIX))
        .and_then(|j| serde_json::from_str(j).ok())?;
    let quantiles_us = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix(QUANTILES_PREFIX))
        .and_then(|j| serde_json::from_str::<Vec<f64>>(j).ok())
        .unwrap_or_default();
    Some(ClientResult {
        name: name.to_owned(),
        sent: line.packets_sent,
        received: line.packets_received,
        p50_ns: line.rtt_ns.p50,
        p99_ns: line.rtt_ns.p99,
        pps: line.pps,
        rx_irqs_by_cpu: line.rx_irqs_by_cpu,
        quantiles_us,
        hints: line.hints,
    })
}

/// One guest of a finished run.
#[derive(Debug, Clone)]
pub struct GuestReport {
    pub name: String,
    pub exit: GuestExit,
    pub numbers: Option<GuestNumbers>,
    /// KVM exits per packet between the guest's steady-state marks (the
    /// client's timed pings; the server's first datagram to the last bye): the
    /// data path without boot and teardown. Shim runs only.
    pub steady_exits_per_packet: Option<f64>,
    /// Of those, host interrupts that landed while a vCPU ran guest code
    /// (KVM's `irq_exits` between the same marks). Shim runs only.
    pub steady_host_irq_exits_per_packet: Option<f64>,
}

/// Labels of the demo's `StatsMark`s (`demos::pingpong::MARK_BEGIN`/`MARK_END`).
const MARK_BEGIN: u64 = 0x7070_0001;
const MARK_END: u64 = 0x7070_0002;

/// Exits between the guest's steady-state marks divided by `packets`.
fn steady_exits_per_packet(stats: Option<&GuestStats>, packets: u64) -> Option<f64> {
    steady_per_packet(stats, packets, |m| m.exits)
}

/// A mark's counter `of`, between the guest's steady-state marks, divided by
/// `packets`.
#[allow(clippy::cast_precision_loss)] // counts far below 2^52
fn steady_per_packet(
    stats: Option<&GuestStats>,
    packets: u64,
    of: impl Fn(&crate::vmm::stats::Mark) -> u64,
) -> Option<f64> {
    let at = |label: u64| Some(of(stats?.mark(label)?));
    let (a, b) = (at(MARK_BEGIN)?, at(MARK_END)?);
    (packets > 0 && b >= a).then(|| (b - a) as f64 / packets as f64)
}

/// The host's instants of `client`'s steady-state lines in `lines` of a child
/// that ran `elapsed` and ended at `ended` (each line is stamped from the
/// child's start).
fn steady_window(
    lines: &[Line],
    client: &str,
    elapsed: Duration,
    ended: Instant,
) -> Option<(Instant, Instant)> {
    let start = ended.checked_sub(elapsed)?;
    let at = |what: &str| {
        lines
            .iter()
            .find(|l| {
                let t = l.text.trim_end();
                t.ends_with(what) && (t.starts_with(client) || t == what)
            })
            .map(|l| start + l.at)
    };
    Some((at(STEADY_BEGIN)?, at(STEADY_END)?))
}

/// The datagrams the server says it echoed (its `report:` line).
fn server_echoed<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<u64> {
    lines.into_iter().find_map(|l| {
        l.trim()
            .strip_prefix("report: pingpong server echoed ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

impl GuestReport {
    /// Exits per packet through the guest's NIC (sent + received).
    #[must_use]
    pub fn exits_per_packet(&self) -> Option<f64> {
        let n = self.numbers.as_ref()?;
        let packets = n.tx_packets + n.rx_packets;
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        (packets > 0).then(|| n.exits as f64 / packets as f64)
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub clients: Vec<ClientResult>,
    pub guests: Vec<GuestReport>,
    /// When the (first) client's timed pings began and ended, as the host
    /// saw its `steady-state:` lines: the window a benchmark samples a VMM
    /// without stats marks in.
    pub steady: Option<(Instant, Instant)>,
    /// Named checks, for the test legs and the exit code.
    pub checks: Vec<(String, bool)>,
    pub log: PathBuf,
    /// Each guest's `pingpong-breakdown:` JSON (`pingpong.breakdown=1`): the
    /// per-stage times of the datagrams it received.
    pub breakdowns: Vec<(String, String)>,
    /// The shim's doorbell monitors (shim runs only).
    pub monitors: Vec<crate::vmm::stats::MonitorStats>,
}

pub const BREAKDOWN_PREFIX: &str = "pingpong-breakdown: ";

impl Report {
    #[must_use]
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|(_, ok)| *ok)
    }

    /// Queue notifications the guests made by doorbell, as the shim counted them.
    #[must_use]
    pub fn doorbell_notifications(&self) -> u64 {
        self.guests
            .iter()
            .filter_map(|g| g.numbers.as_ref())
            .map(|n| n.notifications.doorbell)
            .sum()
    }
}

fn guest_names(opts: &Options) -> Vec<String> {
    let mut names = vec!["server".to_owned()];
    names.extend((1..opts.guests).map(|i| format!("client{i}")));
    names
}

/// Guest `index`'s command line (0 is the server).
pub(crate) fn cmdline(opts: &Options, index: u32) -> String {
    let mut common = format!("net.rx={}{}", opts.rx.cmdline(), opts.notify.cmdline());
    if opts.link == Link::Direct {
        // Two guests: each one's peer is the other.
        let names = guest_names(opts);
        let peer = &names[usize::from(index == 0)];
        let _ = write!(
            common,
            " net.dev=vmq net.vmq_peer={peer} net.vmq_policy=direct"
        );
    }
    if !opts.extra_cmdline.is_empty() {
        common.push(' ');
        common.push_str(&opts.extra_cmdline);
    }
    if index == 0 {
        format!(
            "pingpong.role=server ip=10.0.0.1/24 pingpong.clients={} {common}",
            opts.guests - 1
        )
    } else {
        let irq = opts
            .client_irq_cpu
            .map_or_else(String::new, |cpu| format!(" net.irq_cpu={cpu}"));
        format!(
            "pingpong.role=client ip=10.0.0.{}/24 pingpong.peer=10.0.0.1 pingpong.count={} pingpong.size={} {common}{irq}",
            index + 1,
            opts.count,
            opts.size
        )
    }
}

/// The checks on one client's result line (every ping back; interrupt
/// placement when asked for); keeps the result for the summary.
fn judge_client(
    opts: &Options,
    name: &str,
    result: Option<ClientResult>,
    checks: &mut Vec<(String, bool)>,
    clients: &mut Vec<ClientResult>,
) {
    let Some(r) = result else {
        checks.push((format!("{name} printed no {RESULT_PREFIX}line"), false));
        return;
    };
    let all = r.sent == r.received && r.sent == opts.count;
    checks.push((
        if all {
            format!("{name}: all {} pings came back", r.sent)
        } else {
            format!(
                "{name}: {} of {} pings came back ({} asked for)",
                r.received, r.sent, opts.count
            )
        },
        all,
    ));
    if let Some(cpu) = opts.client_irq_cpu {
        checks.push(placement_check(&r, cpu));
    }
    clients.push(r);
}

/// Checks that a client's RX interrupts landed only on `cpu`.
fn placement_check(r: &ClientResult, cpu: u32) -> (String, bool) {
    let on = |c: usize| r.rx_irqs_by_cpu.get(c).copied().unwrap_or(0);
    let ok = on(cpu as usize) > 0
        && (0..r.rx_irqs_by_cpu.len())
            .filter(|&c| c != cpu as usize)
            .all(|c| on(c) == 0);
    (
        format!(
            "{}: RX interrupts taken on cpu{cpu} only (per CPU: {:?})",
            r.name, r.rx_irqs_by_cpu
        ),
        ok,
    )
}

/// The most pings a client can time: it keeps every RTT (8 bytes each) on a
/// heap of at most 64 MiB, next to its network stack.
pub const MAX_COUNT: u64 = 1_000_000;

fn validate(opts: &Options) -> Result<()> {
    if opts.link == Link::Direct && opts.guests != 2 {
        return Err(Error::usage(
            "--link direct joins two guests: give --guests 2",
        ));
    }
    if !(1..=MAX_COUNT).contains(&opts.count) {
        return Err(Error::usage(format!(
            "--count takes 1 to {MAX_COUNT}: a client keeps every round-trip time (8 bytes a ping) on its heap"
        )));
    }
    if !(2..=200).contains(&opts.guests) {
        return Err(Error::usage(
            "--guests takes 2 to 200 (one server, the rest clients)",
        ));
    }
    if !(12..=1472).contains(&opts.size) {
        return Err(Error::usage(
            "--size takes 12 to 1472 bytes (a ping header to a full UDP payload)",
        ));
    }
    Ok(())
}

/// The placement the demo asks the shim for unless `shim_args` name one:
/// `sidecore` — the guests' boot vCPUs, which take turns in a ping-pong, share
/// the host CPUs but the last, and the doorbell monitors, which carry every
/// frame (run to completion), get the last one (`cargo xtask bench breakdown`
/// shows what a monitor sharing a core with the vCPUs it wakes costs).
pub const SHIM_PLACEMENT: [&str; 2] = ["--pin", "sidecore"];

/// The shim flags of a run: the demo's placement, then `opts.shim_args`.
fn shim_args(opts: &Options) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    match opts.link {
        Link::Switch if !opts.shim_args.iter().any(|a| a == SHIM_PLACEMENT[0]) => {
            args.extend(SHIM_PLACEMENT.iter().map(|a| (*a).to_owned()));
        }
        Link::Switch => {}
        // Both guests poll a direct channel: each needs a core of its own
        // (the shim's default spread placement), and no monitor is in the
        // per-frame path to place.
        Link::Direct => args.extend(["--vmq", "on", "--no-net"].map(str::to_owned)),
    }
    args.extend(opts.shim_args.iter().cloned());
    args
}

/// Each guest's `pingpong-breakdown:` JSON line, by guest name.
fn breakdowns(run: &shim::Run, names: &[String]) -> Vec<(String, String)> {
    names
        .iter()
        .filter_map(|name| {
            shim::guest_lines(&run.lines, name)
                .into_iter()
                .find_map(|l| l.trim().strip_prefix(BREAKDOWN_PREFIX).map(str::to_owned))
                .map(|j| (name.clone(), j))
        })
        .collect()
}

/// Runs the demo under the host shim.
pub fn on_shim(opts: &Options, label: &str, mut echo: impl FnMut(&str)) -> Result<Report> {
    validate(opts)?;
    let shim_path = shim::build()?;
    let image = build::build_guest(build::find_image("udp-pingpong")?)?;
    let names = guest_names(opts);
    let guests: Vec<shim::Guest> = names
        .iter()
        .zip(0..)
        .map(|(name, i)| shim::Guest {
            name: name.clone(),
            image: image.clone(),
            vcpus: opts.vcpus,
            mem_mib: 256,
            cmdline: cmdline(opts, i),
        })
        .collect();
    let shim_args = shim_args(opts);
    let run = shim::run(
        &shim_path,
        &guests,
        &shim_args,
        opts.timeout,
        label,
        &mut echo,
    )?;
    let ended = Instant::now();
    let mut checks = Vec::new();
    let mut reports = Vec::new();
    let mut clients = Vec::new();
    for name in &names {
        checks.push(run.exit_check(name));
        let exit = run.guest_exit(name);
        let numbers = run.guest_stats(name).map(GuestNumbers::of);
        checks.push((
            format!("{name}: KVM exits were counted"),
            numbers.as_ref().is_some_and(|n| n.exits > 0),
        ));
        // Every ping is two packets for either guest: out and back.
        let steady_packets = if name == "server" {
            server_echoed(shim::guest_lines(&run.lines, name)).map(|n| 2 * n)
        } else {
            let result = parse_result(name, shim::guest_lines(&run.lines, name));
            let packets = result.as_ref().map(|r| r.sent + r.received);
            judge_client(opts, name, result, &mut checks, &mut clients);
            packets
        };
        reports.push(GuestReport {
            name: name.clone(),
            exit,
            numbers,
            steady_exits_per_packet: steady_packets
                .and_then(|p| steady_exits_per_packet(run.guest_stats(name), p)),
            steady_host_irq_exits_per_packet: steady_packets
                .and_then(|p| steady_per_packet(run.guest_stats(name), p, |m| m.host_irq_exits)),
        });
    }
    // The path asked for is the path taken (the shim counts both).
    for g in &reports {
        let Some(n) = &g.numbers else { continue };
        let doorbell = n.notifications.doorbell;
        match opts.notify {
            Notify::Doorbell => checks.push((
                format!("{}: notifications went by doorbell ({doorbell})", g.name),
                doorbell > 0,
            )),
            Notify::Trap => checks.push((
                format!(
                    "{}: no doorbell notifications with --notify trap ({doorbell})",
                    g.name
                ),
                doorbell == 0,
            )),
            Notify::Auto => {}
        }
    }
    if run.ending == crate::infra::process::Ending::TimedOut {
        checks.push((
            format!("the run ended within {} s", opts.timeout.as_secs()),
            false,
        ));
    }
    let report = Report {
        clients,
        guests: reports,
        steady: steady_window(&run.lines, "client1", run.elapsed, ended),
        checks,
        log: run.log.clone(),
        breakdowns: breakdowns(&run, &names),
        monitors: run
            .stats
            .as_ref()
            .map(|s| s.monitors.clone())
            .unwrap_or_default(),
    };
    if !report.ok() {
        run.print_post_mortem();
    }
    Ok(report)
}

/// Runs the demo as two QEMU/KVM guests on a socket netdev (one client).
#[allow(clippy::too_many_lines)] // one linear script: boot two VMs, then judge both
pub fn on_qemu(opts: &Options, label: &str, port: u16) -> Result<Report> {
    validate(opts)?;
    if opts.link == Link::Direct {
        return Err(Error::usage(
            "--link direct needs the host shim: QEMU has no direct channels",
        ));
    }
    let image = build::build_guest(build::find_image("udp-pingpong")?)?;
    let qmp = |name: &str| {
        opts.qmp_dir.as_ref().map_or_else(Vec::new, |dir| {
            vec![
                "-qmp".to_owned(),
                format!(
                    "unix:{},server=on,wait=off",
                    dir.join(format!("{name}.sock")).display()
                ),
            ]
        })
    };
    let cfg = |index: u32, netdev: String, mac: &str| qemu::Config {
        accel: Accel::Kvm,
        machine: Machine::Q35,
        smp: opts.vcpus,
        mem_mib: 256,
        image: image.clone(),
        append: cmdline(opts, index),
        net: Net::User,
        hostfwd: Vec::new(),
        netdev: Some(netdev),
        mac: Some(mac.to_owned()),
        nic_options: Vec::new(),
        extra_args: qmp(if index == 0 { "server" } else { "client1" }),
        timeout: opts.timeout,
    };
    let bridge = match opts.qemu_link {
        QemuLink::Socket => None,
        QemuLink::TapBridge => Some(TapBridge::new(port)?),
    };
    let netdev = |index: usize| match &bridge {
        Some(b) => format!(
            "tap,id=net0,ifname={},script=no,downscript=no",
            b.taps[index]
        ),
        None if index == 0 => format!("socket,id=net0,listen=127.0.0.1:{port}"),
        None => format!("socket,id=net0,connect=127.0.0.1:{port}"),
    };
    let server_cfg = cfg(0, netdev(0), "52:54:00:00:00:01");
    let client_cfg = cfg(1, netdev(1), "52:54:00:00:00:02");
    let server_label = format!("{label}-server");
    let server = std::thread::spawn(move || {
        qemu::boot(
            &server_cfg,
            &server_label,
            &Echo::Protocol {
                prefix: "server".into(),
            },
        )
    });
    // The server's QEMU must be listening before the client's connects.
    let listening = bridge.is_some()
        || (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            port_open(port) && !server.is_finished()
        });
    let client = if listening {
        qemu::boot(
            &client_cfg,
            &format!("{label}-client"),
            &Echo::Protocol {
                prefix: "client1".into(),
            },
        )
        .map(|run| (run, Instant::now()))
    } else {
        Err(Error::failed(format!(
            "the server's QEMU never listened on 127.0.0.1:{port}"
        )))
    };
    let server = server
        .join()
        .map_err(|_| Error::failed("the server thread panicked"))?;
    let mut checks = Vec::new();
    let mut guests = Vec::new();
    let mut clients = Vec::new();
    let steady = client
        .as_ref()
        .ok()
        .and_then(|(run, ended)| steady_window(&run.lines, "client1", run.elapsed, *ended));
    let client = client.map(|(run, _)| run);
    for (name, run) in [("server", server), ("client1", client)] {
        match run {
            Ok(run) => {
                checks.push((
                    format!("{name} exited with status 0 ({})", run.exit),
                    run.exit.passed(),
                ));
                if name == "client1" {
                    let result = parse_result(name, run.lines.iter().map(|l| l.text.as_str()));
                    judge_client(opts, name, result, &mut checks, &mut clients);
                }
                if !run.exit.passed() {
                    run.print_post_mortem();
                }
                guests.push(GuestReport {
                    name: name.into(),
                    exit: run.exit,
                    numbers: None,
                    steady_exits_per_packet: None,
                    steady_host_irq_exits_per_packet: None,
                });
            }
            Err(e) => checks.push((format!("{name} ran: {e}"), false)),
        }
    }
    Ok(Report {
        clients,
        guests,
        steady,
        checks,
        log: PathBuf::new(),
        breakdowns: Vec::new(),
        monitors: Vec::new(),
    })
}

/// A Linux bridge with one TAP device per QEMU, removed on drop.
struct TapBridge {
    bridge: String,
    taps: [String; 2],
}

impl TapBridge {
    /// Names unique to this run (`tag`: its port).
    fn new(tag: u16) -> Result<Self> {
        let b = Self {
            bridge: format!("exbr{tag}"),
            taps: [format!("exq{tag}a"), format!("exq{tag}b")],
        };
        ip(&["link", "add", &b.bridge, "type", "bridge"])?;
        ip(&["link", "set", &b.bridge, "up"])?;
        for t in &b.taps {
            ip(&["tuntap", "add", "dev", t, "mode", "tap"])?;
            ip(&["link", "set", t, "master", &b.bridge])?;
            ip(&["link", "set", t, "up"])?;
        }
        Ok(b)
    }
}

/// Runs `ip ARGS` (iproute2).
fn ip(args: &[&str]) -> Result<()> {
    crate::infra::iproute::ip(args)
        .map_err(|e| Error::failed(format!("{e} (the TAP link needs root)")))
}

impl Drop for TapBridge {
    fn drop(&mut self) {
        for t in &self.taps {
            let _ = ip(&["link", "del", t]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// True once something accepts TCP connections on the port (QEMU's listener).
fn port_open(port: u16) -> bool {
    // QEMU accepts one connection for the socket netdev; probing would use it
    // up, so only look at whether the port is bound.
    std::net::TcpListener::bind(("127.0.0.1", port)).is_err()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::vmm::stats::{self, ExitsByReason, Notifications};

    /// A client's result line as udp-pingpong prints it.
    const SAMPLE: &str = include_str!("../../tests/fixtures/pingpong-result.txt");

    #[test]
    fn result_lines_parse_and_junk_does_not() {
        let lines = ["[cpu0 INFO ] hi", SAMPLE.trim()];
        let r = parse_result("c", lines).unwrap();
        assert_eq!(
            (r.sent, r.received, r.p50_ns, r.p99_ns, r.pps),
            (1000, 1000, 269_639, 336_278, 3611)
        );
        assert_eq!(r.rx_irqs_by_cpu, [1011, 0]);
        assert_eq!((r.hints.state.as_str(), r.hints.upcalls), ("on", 1));
        assert_eq!(parse_result("c", ["pingpong-result: {not json"]), None);
        assert_eq!(parse_result("c", ["report: nothing"]), None);
    }

    #[test]
    fn a_renamed_key_in_the_result_line_is_an_error_naming_it() {
        let json = SAMPLE.trim().strip_prefix(RESULT_PREFIX).unwrap();
        for key in [
            "packets_received",
            "p99",
            "pps",
            "rx_irqs_by_cpu",
            "retargeted",
        ] {
            let quoted = format!("\"{key}\":");
            assert!(json.contains(&quoted), "{key}");
            let renamed = json.replace(&quoted, &format!("\"{key}_renamed\":"));
            let err = serde_json::from_str::<ResultLine>(&renamed).unwrap_err();
            assert!(
                err.to_string().contains(&format!("missing field `{key}`")),
                "{key}: {err}"
            );
            let line = format!("{RESULT_PREFIX}{renamed}");
            assert_eq!(parse_result("c", [line.as_str()]), None, "{key}");
        }
    }

    #[test]
    fn command_lines_give_each_guest_its_role_and_address() {
        let opts = Options {
            guests: 3,
            count: 50,
            size: 100,
            ..Options::default()
        };
        assert_eq!(guest_names(&opts), ["server", "client1", "client2"]);
        assert_eq!(
            cmdline(&opts, 0),
            "pingpong.role=server ip=10.0.0.1/24 pingpong.clients=2 net.rx=irq"
        );
        assert_eq!(
            cmdline(&opts, 2),
            "pingpong.role=client ip=10.0.0.3/24 pingpong.peer=10.0.0.1 pingpong.count=50 pingpong.size=100 net.rx=irq"
        );
        let placed = Options {
            client_irq_cpu: Some(1),
            ..opts
        };
        assert!(cmdline(&placed, 1).ends_with("net.rx=irq net.irq_cpu=1"));
        assert!(
            !cmdline(&placed, 0).contains("irq_cpu"),
            "the server keeps its default"
        );
    }

    #[test]
    fn steady_state_uses_the_marks() {
        let mut stats = stats::sample("server");
        stats.marks = vec![
            stats::mark(MARK_BEGIN, 100, 0, 0),
            stats::mark(7, 150, 0, 0),
            stats::mark(MARK_END, 400, 0, 0),
        ];
        assert_eq!(steady_exits_per_packet(Some(&stats), 100), Some(3.0));
        assert_eq!(steady_exits_per_packet(Some(&stats), 0), None);
        stats.marks = vec![stats::mark(MARK_BEGIN, 1, 0, 0)];
        assert_eq!(steady_exits_per_packet(Some(&stats), 10), None);
        assert_eq!(
            server_echoed([
                "x",
                "report: pingpong server echoed 1010 datagrams for 1 client(s)"
            ]),
            Some(1010)
        );
        assert_eq!(server_echoed(["report: other"]), None);
    }

    #[test]
    fn placement_needs_interrupts_on_the_chosen_cpu_only() {
        let r = |v: Vec<u64>| ClientResult {
            name: "c".into(),
            sent: 1,
            received: 1,
            p50_ns: 1,
            p99_ns: 1,
            pps: 1,
            rx_irqs_by_cpu: v,
            quantiles_us: Vec::new(),
            hints: GuestHints::default(),
        };
        assert!(placement_check(&r(vec![0, 500]), 1).1);
        assert!(
            !placement_check(&r(vec![3, 500]), 1).1,
            "one landed on cpu0"
        );
        assert!(!placement_check(&r(vec![500, 0]), 1).1, "none on cpu1");
        assert!(!placement_check(&r(vec![]), 1).1, "nothing reported");
    }

    #[test]
    fn bad_options_are_usage_errors() {
        for bad in [
            Options {
                guests: 1,
                ..Options::default()
            },
            Options {
                size: 4,
                ..Options::default()
            },
            Options {
                count: 10_000_000,
                ..Options::default()
            },
        ] {
            assert_eq!(validate(&bad).unwrap_err().exit_code(), 2);
        }
    }

    #[test]
    fn exits_per_packet_counts_both_directions() {
        let g = GuestReport {
            name: "a".into(),
            exit: GuestExit::Status(0),
            steady_exits_per_packet: Some(2.5),
            steady_host_irq_exits_per_packet: None,
            numbers: Some(GuestNumbers {
                exits: 300,
                exits_by_reason: ExitsByReason::default(),
                notifications: Notifications::default(),
                tx_packets: 100,
                rx_packets: 50,
                interrupts: 0,
                boot_to_main_ms: None,
                kvm: BTreeMap::new(),
                direct: None,
                tx_carried_by_waits: 0,
                host_events: 0,
            }),
        };
        assert_eq!(g.exits_per_packet(), Some(2.0));
    }
}
