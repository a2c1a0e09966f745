//! Leg `soak`: three udp-pingpong pairs on the shim's switch and a Linux
//! client reaching a fourth guest through the shim's TAP, for a bounded
//! time (about 2 minutes; `EXITLESS_SOAK_S=N` shortens it for local runs).
//! Nothing may be lost outside the shim's counted drops, and the shim's
//! resident memory and thread count must stay flat after a warm-up
//! (sampled from /proc/PID/status: counts and sizes, never times).

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::infra::iproute::ip;
use crate::infra::process::Ending;
use crate::infra::{setup, sys};
use crate::scenario::pingpong::parse_result;
use crate::test::leg::{Images, Leg, LegRun, Options};
use crate::vmm::shim::{self, Guest};
use crate::vmm::stats::ShimStats;

/// Default soak length; `EXITLESS_SOAK_S` overrides it (at least 20 s).
const DEFAULT_SECS: u64 = 120;
const ENV_SECS: &str = "EXITLESS_SOAK_S";
/// Switch pairs (server + client each).
const PAIRS: u32 = 3;
/// A ping every 10 ms per client: the run lasts `count × interval`.
const INTERVAL_MS: u64 = 10;
/// The TAP client pings every 20 ms.
const TAP_INTERVAL_MS: u64 = 20;
/// A ping is lost only when it never comes back (see the hostile leg).
const REPLY_TIMEOUT_MS: u64 = 5000;
/// Samples taken before this share of the run are warm-up (allocator
/// arenas, queues and rings filling up).
const WARMUP_SHARE: f64 = 0.25;
/// Most the shim's RSS may grow from the end of the warm-up to any later
/// sample. Nothing the guests do after start-up should allocate for long;
/// the bound leaves room for the allocator's own slack.
const RSS_GROWTH_MAX_KIB: u64 = 8 * 1024;
/// At least this many samples after the warm-up, or the check proves nothing.
const MIN_SAMPLES: usize = 10;

const HOST_ADDR: &str = "10.0.77.1/24";
const TAP_GUEST: [u8; 4] = [10, 0, 77, 2];
const PORT: u16 = 7777;
/// The ping-pong wire format (`demos::pingpong`): magic, sequence number.
const MAGIC: u32 = 0x5049_4E47;
const BYE: &[u8] = b"exitless-pingpong-bye";

pub struct Soak;

impl Leg for Soak {
    fn name(&self) -> &'static str {
        "soak"
    }

    fn about(&self) -> &'static str {
        "three udp-pingpong pairs on the switch and a Linux UDP client through the TAP for about 2 minutes (EXITLESS_SOAK_S shortens it): every ping back or its loss counted by reason, the shim's RSS and thread count flat after warm-up"
    }

    fn run(&self, images: &mut Images, opts: &Options) -> LegRun {
        if let Err(why) = setup::check_kvm() {
            return LegRun::broken(format!("cannot use KVM: {why}"));
        }
        if !sys::is_root() {
            return LegRun::broken(
                "the soak leg needs root (a network namespace and a TAP device for its Linux client)",
            );
        }
        if let Err(e) = setup::ensure_tool("ip", "iproute2") {
            return LegRun::broken(e.to_string());
        }
        if !Path::new("/dev/net/tun").exists() {
            return LegRun::broken("/dev/net/tun is missing: the TAP cannot be made");
        }
        let image = match images.get("udp-pingpong") {
            Ok(i) => i,
            Err(e) => return LegRun::broken(e),
        };
        let shim_path = match shim::build() {
            Ok(p) => p,
            Err(e) => return LegRun::broken(e.to_string()),
        };
        let secs = match soak_secs() {
            Ok(s) => s,
            Err(e) => return LegRun::broken(e),
        };
        let ns = format!("exitless-soak-{}", std::process::id());
        let tap = format!("exsoak{}", std::process::id() % 100_000);
        if let Err(e) = ip(&["netns", "add", &ns]) {
            return LegRun::broken(e);
        }
        let _ns = NetnsGuard(ns.clone());
        let out = soak(&Setup {
            shim: shim_path,
            image,
            ns,
            tap,
            secs,
            timeout: opts.timeout.max(Duration::from_secs(secs + 90)),
        });
        match out {
            Ok((checks, reports, log)) => LegRun::from_checks(&checks, reports, Some(log)),
            Err(e) => LegRun::broken(e),
        }
    }
}

fn soak_secs() -> Result<u64, String> {
    match std::env::var(ENV_SECS) {
        Ok(v) => match v.parse::<u64>() {
            Ok(s) if s >= 20 => Ok(s),
            _ => Err(format!("{ENV_SECS}={v}: give whole seconds, at least 20")),
        },
        Err(_) => Ok(DEFAULT_SECS),
    }
}

struct Setup {
    shim: PathBuf,
    image: PathBuf,
    ns: String,
    tap: String,
    secs: u64,
    timeout: Duration,
}

/// Removes the namespace (and with it the TAP) however the leg ends.
struct NetnsGuard(String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.0]) {
            eprintln!("soak: cleanup: {e}");
        }
    }
}

/// Moves the calling thread into network namespace `ns` (setns(2) works
/// per thread: the rest of xtask stays where it is).
fn enter_netns(ns: &str) -> Result<(), String> {
    let f = File::open(format!("/run/netns/{ns}")).map_err(|e| format!("open netns {ns}: {e}"))?;
    // SAFETY: `f` is an open network-namespace file; CLONE_NEWNET matches it.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("setns {ns}: {}", std::io::Error::last_os_error()))
    }
}

fn guests(s: &Setup) -> Vec<Guest> {
    let count = s.secs * 1000 / INTERVAL_MS;
    let guest = |name: String, cmdline: String| Guest {
        name,
        image: s.image.clone(),
        vcpus: 1,
        mem_mib: 256,
        cmdline,
    };
    let mut out = Vec::new();
    for p in 1..=PAIRS {
        let server_ip = format!("10.0.0.{}", 2 * p - 1);
        out.push(guest(
            format!("server{p}"),
            format!(
                "pingpong.role=server ip={server_ip}/24 pingpong.clients=1 pingpong.idle_s=60 net.rx=irq"
            ),
        ));
        out.push(guest(
            format!("client{p}"),
            format!(
                "pingpong.role=client ip=10.0.0.{}/24 pingpong.peer={server_ip} pingpong.count={count} pingpong.interval_us={} pingpong.timeout_ms={REPLY_TIMEOUT_MS} net.rx=irq",
                2 * p,
                INTERVAL_MS * 1000
            ),
        ));
    }
    out.push(guest(
        "tapserver".into(),
        format!(
            "pingpong.role=server ip={}.{}.{}.{}/24 pingpong.clients=1 pingpong.idle_s=60 net.rx=irq",
            TAP_GUEST[0], TAP_GUEST[1], TAP_GUEST[2], TAP_GUEST[3]
        ),
    ));
    out
}

/// What the sampler saw of the shim in /proc.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_kib: u64,
    threads: u64,
}

fn status_of(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    Some((field("VmRSS:")?, field("Threads:")?))
}

/// The shim started with `--tap TAP` (there is one per soak run).
fn find_shim(shim: &Path, tap: &str) -> Option<u32> {
    let want = shim.to_string_lossy();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        let is_shim = args.first().is_some_and(|a| *a == want.as_bytes());
        let has_tap = args
            .windows(2)
            .any(|w| w[0] == b"--tap" && w[1] == tap.as_bytes());
        (is_shim && has_tap).then_some(pid)
    })
}

/// Samples the shim once a second until `stop`.
fn sampler(shim: &Path, tap: &str, stop: &AtomicBool) -> Vec<Sample> {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut pid = None;
    while !stop.load(Ordering::Relaxed) {
        if pid.is_none() {
            pid = find_shim(shim, tap);
        }
        if let Some((rss_kib, threads)) = pid.and_then(status_of) {
            out.push(Sample {
                at: start.elapsed(),
                rss_kib,
                threads,
            });
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    out
}

/// The Linux side: addresses the TAP once the shim made it, then pings the
/// TAP guest every [`TAP_INTERVAL_MS`] for `secs` and says bye.
#[derive(Debug, Default, Clone, Copy)]
struct TapClient {
    sent: u64,
    received: u64,
}

fn tap_client(ns: &str, tap: &str, secs: u64) -> Result<TapClient, String> {
    let until = Instant::now() + Duration::from_secs(30);
    while ip(&["-n", ns, "link", "show", tap]).is_err() {
        if Instant::now() > until {
            return Err(format!("TAP {tap} never appeared in {ns}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ip(&["-n", ns, "addr", "add", HOST_ADDR, "dev", tap])?;
    ip(&["-n", ns, "link", "set", tap, "up"])?;
    enter_netns(ns)?;
    let sock = UdpSocket::bind("10.0.77.1:0").map_err(|e| format!("bind: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let to = SocketAddr::from((TAP_GUEST, PORT));
    // Warm-up: the guest boots and answers ARP; not counted.
    let ready = Instant::now() + Duration::from_mins(1);
    let mut buf = [0u8; 2048];
    loop {
        let _ = sock.send_to(&ping(u64::MAX), to);
        if matches!(sock.recv_from(&mut buf), Ok((n, _)) if buf[..n] == ping(u64::MAX)) {
            break;
        }
        if Instant::now() > ready {
            return Err("the TAP guest never answered".into());
        }
    }
    let mut c = TapClient::default();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut seq = 0u64;
    while Instant::now() < end {
        let p = ping(seq);
        sock.send_to(&p, to).map_err(|e| format!("send: {e}"))?;
        c.sent += 1;
        let deadline = Instant::now() + Duration::from_millis(REPLY_TIMEOUT_MS);
        while Instant::now() < deadline {
            match sock.recv_from(&mut buf) {
                Ok((n, _)) if buf[..n] == p => {
                    c.received += 1;
                    break;
                }
                _ => {}
            }
        }
        seq += 1;
        std::thread::sleep(Duration::from_millis(TAP_INTERVAL_MS));
    }
    for _ in 0..3 {
        let _ = sock.send_to(BYE, to);
    }
    Ok(c)
}

fn ping(seq: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    p.extend_from_slice(&MAGIC.to_le_bytes());
    p.extend_from_slice(&seq.to_le_bytes());
    p.resize(64, 0x5A);
    p
}

type Outcome = (Vec<(String, bool)>, Vec<String>, PathBuf);

fn soak(s: &Setup) -> Result<Outcome, String> {
    let all = guests(s);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (shim, tap, stop) = (s.shim.clone(), s.tap.clone(), stop.clone());
        std::thread::spawn(move || sampler(&shim, &tap, &stop))
    };
    let tap_result = Arc::new(Mutex::new(None));
    let client = {
        let (ns, tap, secs, out) = (s.ns.clone(), s.tap.clone(), s.secs, tap_result.clone());
        std::thread::spawn(move || {
            let r = tap_client(&ns, &tap, secs);
            *out.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(r);
        })
    };
    // The shim starts from a thread inside the namespace, so its TAP is made there.
    let run = {
        let (ns, shim_path, tap, timeout) =
            (s.ns.clone(), s.shim.clone(), s.tap.clone(), s.timeout);
        std::thread::spawn(move || {
            enter_netns(&ns)?;
            shim::run(
                &shim_path,
                &all,
                &["--tap".to_owned(), tap],
                timeout,
                "soak",
                |_| {},
            )
            .map_err(|e| e.to_string())
        })
    }
    .join()
    .map_err(|_| "the shim thread panicked".to_owned())??;
    stop.store(true, Ordering::Relaxed);
    let taken = sampler.join().unwrap_or_default();
    let _ = client.join();
    let tap_client = tap_result
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
        .unwrap_or_else(|| Err("the TAP client never ran".into()));

    let mut checks = vec![(
        format!("the shim ran to its end ({:?})", run.ending),
        run.ending == Ending::Exited(0),
    )];
    for g in guests(s) {
        checks.push(run.exit_check(&g.name));
    }
    let drops = run.stats.as_ref().map(counted_drops);
    let counted = drops.as_ref().map_or(0, |d| d.values().sum::<u64>());
    let mut reports = vec![format!(
        "{} s; counted drops {:?}",
        s.secs,
        drops.unwrap_or_default()
    )];
    let count = s.secs * 1000 / INTERVAL_MS;
    for p in 1..=PAIRS {
        let name = format!("client{p}");
        match parse_result(&name, shim::guest_lines(&run.lines, &name)) {
            Some(r) => checks.push((
                format!(
                    "{name}: {} of {} pings back; the {} lost are within the {counted} counted drops",
                    r.received,
                    r.sent,
                    r.sent - r.received.min(r.sent)
                ),
                r.sent == count && r.sent - r.received.min(r.sent) <= counted,
            )),
            None => checks.push((format!("{name} printed its result"), false)),
        }
    }
    match tap_client {
        Ok(c) => checks.push((
            format!(
                "TAP client: {} of {} pings back; the {} lost are within the {counted} counted drops",
                c.received,
                c.sent,
                c.sent - c.received
            ),
            c.sent > 0 && c.sent - c.received <= counted,
        )),
        Err(e) => checks.push((format!("TAP client: {e}"), false)),
    }
    checks.extend(flat_checks(&taken, s.secs, &mut reports));
    Ok((checks, reports, run.log))
}

/// Every drop the shim counts on the frames' way: the switch's, the TAP's
/// and the NICs' (no RX buffer, refused chains).
fn counted_drops(stats: &ShimStats) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (k, v) in &stats.switch {
        if k.starts_with("dropped_") || k == "runts" {
            *out.entry(format!("switch.{k}")).or_insert(0) += v;
        }
    }
    if let Some(t) = &stats.tap {
        for (k, v) in &t.dropped {
            *out.entry(format!("tap.{k}")).or_insert(0) += v;
        }
    }
    for g in &stats.guests {
        for k in [
            "virtio_rx_dropped_no_buffer",
            "virtio_bad_descriptor",
            "frame_too_big",
        ] {
            if let Some(v) = g.rejected.get(k) {
                *out.entry(format!("rejected.{k}")).or_insert(0) += v;
            }
        }
    }
    out.retain(|_, v| *v > 0);
    out
}

/// RSS and threads after the warm-up: growth within the bound, threads constant.
#[allow(clippy::cast_precision_loss)] // seconds, far below 2^52
fn flat_checks(samples: &[Sample], secs: u64, reports: &mut Vec<String>) -> Vec<(String, bool)> {
    let warm = Duration::from_secs_f64(secs as f64 * WARMUP_SHARE);
    // Until `secs` from the sampler's start every guest still runs (each
    // client pings for `secs` after it boots): later samples see guests
    // ending and their threads going.
    let steady = Duration::from_secs(secs);
    let after: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= warm && s.at < steady)
        .collect();
    let mut changes: Vec<String> = Vec::new();
    let mut last = None;
    for s in samples {
        if last != Some(s.threads) {
            changes.push(format!("{}@{}s", s.threads, s.at.as_secs()));
            last = Some(s.threads);
        }
    }
    reports.push(format!(
        "samples: {} ({} from the {:.0} s warm-up to {secs} s); RSS KiB first/last {:?}/{:?}; threads {}",
        samples.len(),
        after.len(),
        warm.as_secs_f64(),
        samples.first().map(|s| s.rss_kib),
        samples.last().map(|s| s.rss_kib),
        changes.join(" ")
    ));
    let Some(base) = after.first() else {
        return vec![(
            format!("at least {MIN_SAMPLES} samples of the shim after the warm-up (0)"),
            false,
        )];
    };
    let max_rss = after.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let (tmin, tmax) = (
        after.iter().map(|s| s.threads).min().unwrap_or(0),
        after.iter().map(|s| s.threads).max().unwrap_or(0),
    );
    let growth = max_rss.saturating_sub(base.rss_kib);
    vec![
        (
            format!(
                "at least {MIN_SAMPLES} samples of the shim after the warm-up ({})",
                after.len()
            ),
            after.len() >= MIN_SAMPLES,
        ),
        (
            format!(
                "shim RSS grew {growth} KiB after the warm-up ({} -> max {max_rss} KiB; at most {RSS_GROWTH_MAX_KIB})",
                base.rss_kib
            ),
            growth <= RSS_GROWTH_MAX_KIB,
        ),
        (
            format!("shim thread count flat after the warm-up ({tmin}..={tmax})"),
            tmin == tmax,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at: u64, rss_kib: u64, threads: u64) -> Sample {
        Sample {
            at: Duration::from_secs(at),
            rss_kib,
            threads,
        }
    }

    #[test]
    fn growth_and_threads_are_judged_after_the_warm_up_only() {
        let mut flat: Vec<Sample> = (0..40).map(|t| s(t, 50_000 + 10 * t, 12)).collect();
        flat[0] = s(0, 1000, 3); // start-up is warm-up
        assert!(flat_checks(&flat, 40, &mut Vec::new()).iter().all(|c| c.1));
        let mut leak = flat.clone();
        leak[39].rss_kib = 50_000 + RSS_GROWTH_MAX_KIB + 1000;
        assert!(!flat_checks(&leak, 40, &mut Vec::new())[1].1);
        let mut spawn = flat;
        spawn[30].threads = 13;
        assert!(!flat_checks(&spawn, 40, &mut Vec::new())[2].1);
        assert!(
            !flat_checks(&[], 40, &mut Vec::new())[0].1,
            "no samples fails"
        );
    }

    #[test]
    fn pings_carry_the_demos_header() {
        assert_eq!(ping(7)[..4], MAGIC.to_le_bytes());
        assert_eq!(ping(7)[4..12], 7u64.to_le_bytes());
    }
}
