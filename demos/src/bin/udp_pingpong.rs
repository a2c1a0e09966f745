//! UDP ping-pong between two guests. Kernel command line:
//! - server: `pingpong.role=server ip=10.0.0.1/24 [pingpong.clients=1] [pingpong.idle_s=60]`
//!   (exits once every client has said bye)
//! - client: `pingpong.role=client ip=10.0.0.2/24 pingpong.peer=10.0.0.1
//!   [pingpong.count=1000] [pingpong.size=64] [pingpong.warmup=10]`
//!
//! The client prints RTT percentiles (TSC-timed) and packets per second as a
//! `report:` line and a `pingpong-result:` JSON line, sends a bye, and exits 0
//! when every ping came back.
//! - client: `pingpong.quantiles=1` also prints RTT every 5th percentile (µs) on a
//!   `pingpong-quantiles-us:` line.
//! - client over a direct channel: `pingpong.hostile=1` first spoils the
//!   channel (`demos::hostile`), then pings as usual; the server prints what
//!   its link dropped.
//! - both: `pingpong.breakdown=1` stamps every datagram's trip (the shim's
//!   stamps plus this guest's) and prints the per-stage medians on a
//!   `pingpong-breakdown:` line (the server for the pings, the client for the
//!   echoes).
//! - both: `pingpong.linger_ms=N` stays up (halted) N ms before exiting, so a
//!   benchmark can read the VMM's counters for the whole run.
//! - client: `pingpong.timeout_ms=N` waits N ms for each echo (default 500)
//!   before counting the ping lost; `pingpong.interval_us=N` starts a ping
//!   every N µs instead of back to back.
//! - both: `pingpong.marker=HEX` fills `MARKER_PAGES` (256) pages with the pattern
//!   of `demos::marker` first and prints `report: marker pages intact: N of
//!   M` at the end (the `hostile` leg's isolation check: the attacker must
//!   never see them, and nobody may change them).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    extern crate alloc;

    use alloc::vec::Vec;
    use core::time::Duration;
    use demos::pingpong::{BYE, MARK_BEGIN, MARK_END, PORT, decode, encode};
    use guest_kernel::println;
    use guest_kernel::rt::net::Net;
    use guest_kernel::rt::net::breakdown::Breakdown;
    use guest_kernel::rt::start::system;
    use guest_kernel::rt::time::Instant;
    use para_abi::report::{STEADY_BEGIN, STEADY_END, percentile};
    use smoltcp::wire::{IpEndpoint, Ipv4Address};

    guest_kernel::entry!(main);

    use demos::APP_ERROR;

    /// A `StatsMark` for the VMM's counters; elsewhere (QEMU) it does nothing.
    fn mark(label: u64) {
        let _ = guest_kernel::rt::sys::hypercall(para_abi::hypercall::Call::StatsMark, label);
    }

    /// How long a client waits for an echo before it counts the ping lost
    /// (`pingpong.timeout_ms`, default 500 ms): tests that load the host on
    /// purpose wait longer, so that only a ping that never comes back counts.
    static REPLY_TIMEOUT_MS: core::sync::atomic::AtomicU64 =
        core::sync::atomic::AtomicU64::new(500);

    /// The client's pause from one ping's start to the next
    /// (`pingpong.interval_us`, default 0: back to back), so that a run of
    /// `count` pings lasts about `count × interval`.
    static INTERVAL_US: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

    /// Pages a victim fills with the marker pattern (1 MiB).
    const MARKER_PAGES: usize = 256;

    type Page = [u64; demos::marker::PAGE_WORDS];

    /// The marker pages of `pingpong.marker`, filled.
    fn marker_pages(marker: u64) -> Vec<Page> {
        let mut pages = alloc::vec![[0u64; demos::marker::PAGE_WORDS]; MARKER_PAGES];
        for p in &mut pages {
            demos::marker::fill(p, marker);
        }
        pages
    }

    fn main() -> i32 {
        let c = &system().cmdline;
        // Only a client attacks: the server is the peer that must cope.
        if c.flag("pingpong.hostile") && c.get("pingpong.role") == Some("client") {
            match c
                .get("net.vmq_peer")
                .ok_or("pingpong.hostile needs net.vmq_peer=NAME")
                .and_then(demos::hostile::spoil_direct_channel)
            {
                Ok(a) => println!(
                    "report: hostile: {} bad frames, {} impossible index, {} stores into the peer's endpoint; peer's words {}",
                    a.bad_frames,
                    a.bad_indices,
                    a.stores,
                    if a.peer_unchanged {
                        "unchanged"
                    } else {
                        "CHANGED"
                    }
                ),
                Err(e) => {
                    println!("udp-pingpong: hostile prelude: {e}");
                    return APP_ERROR;
                }
            }
        }
        let mut net = match Net::from_cmdline(0) {
            Ok(n) => n,
            Err(e) => {
                println!("udp-pingpong: {e}");
                return APP_ERROR;
            }
        };
        let mut bd = (c.get("pingpong.breakdown") == Some("1")).then(Breakdown::default);
        for (key, cell) in [
            ("pingpong.timeout_ms", &REPLY_TIMEOUT_MS),
            ("pingpong.interval_us", &INTERVAL_US),
        ] {
            if let Some(v) = c.get(key).and_then(|s| s.parse().ok()) {
                cell.store(v, core::sync::atomic::Ordering::Relaxed);
            }
        }
        let marker = c.get("pingpong.marker").and_then(demos::marker::parse);
        let pages = marker.map(marker_pages);
        let status = match c.get("pingpong.role") {
            Some("server") => server(
                &mut net,
                bd.as_mut(),
                c.get("pingpong.clients")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(1),
                c.get("pingpong.idle_s")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(60),
            ),
            Some("client") => {
                let Some(peer) = c
                    .get("pingpong.peer")
                    .and_then(|p| p.parse::<Ipv4Address>().ok())
                else {
                    println!("udp-pingpong: the client needs pingpong.peer=IPV4");
                    return APP_ERROR;
                };
                let num = |k, d: u64| c.get(k).and_then(|s| s.parse().ok()).unwrap_or(d);
                let size = usize::try_from(num("pingpong.size", 64))
                    .unwrap_or(64)
                    .clamp(12, 1472);
                client(
                    &mut net,
                    bd.as_mut(),
                    peer,
                    num("pingpong.count", 1000),
                    size,
                    num("pingpong.warmup", 10),
                )
            }
            _ => {
                println!("udp-pingpong: give pingpong.role=server or pingpong.role=client");
                APP_ERROR
            }
        };
        if let Some(b) = bd.as_mut() {
            println!("pingpong-breakdown: {}", b.json());
        }
        if let (Some(m), Some(pages)) = (marker, &pages) {
            let intact = pages.iter().filter(|p| demos::marker::intact(p, m)).count();
            println!("report: marker pages intact: {intact} of {}", pages.len());
        }
        // A VMM's counters vanish with the VM: lingering (halted) lets a
        // benchmark read them after the last packet, e.g. QEMU's KVM stats over QMP.
        if let Some(ms) = c.get("pingpong.linger_ms").and_then(|s| s.parse().ok()) {
            guest_kernel::rt::wait::sleep(Duration::from_millis(ms));
        }
        status
    }

    fn server(net: &mut Net, mut bd: Option<&mut Breakdown>, clients: usize, idle_s: u64) -> i32 {
        let Ok(h) = net.udp_bind(PORT, 64) else {
            println!("udp-pingpong: cannot bind UDP port {PORT}");
            return APP_ERROR;
        };
        log::info!("udp-pingpong: server on UDP {PORT} for {clients} client(s)");
        let mut echoed = 0u64;
        let mut done: Vec<IpEndpoint> = Vec::new();
        let mut buf = alloc::vec![0u8; 2048];
        let mut last = Instant::now();
        loop {
            net.poll();
            while let Ok((n, meta)) = net.udp(h).recv_slice(&mut buf) {
                last = Instant::now();
                if echoed == 0 && done.is_empty() && &buf[..n] != BYE {
                    mark(MARK_BEGIN);
                }
                if &buf[..n] == BYE {
                    if !done.contains(&meta.endpoint) {
                        done.push(meta.endpoint);
                        log::info!(
                            "udp-pingpong: bye from {} ({} of {clients})",
                            meta.endpoint,
                            done.len()
                        );
                    }
                    if done.len() >= clients {
                        mark(MARK_END);
                        println!(
                            "report: pingpong server echoed {echoed} datagrams for {clients} client(s)"
                        );
                        if let Some(d) = net.direct_stats() {
                            println!(
                                "report: pingpong server direct link: dropped {} bad-length, {} too-long, {} corrupt-index; {} wake-ups asked",
                                d.rx.bad_length, d.rx.too_long, d.rx.corrupt, d.wakes_sent
                            );
                        }
                        return 0;
                    }
                    continue;
                }
                if let Some(b) = bd.as_deref_mut() {
                    b.record(net.last_rx_poll());
                    net.stamp_app_tx();
                }
                if net.udp(h).send_slice(&buf[..n], meta.endpoint).is_ok() {
                    echoed += 1;
                }
            }
            if last.elapsed() > Duration::from_secs(idle_s) {
                println!(
                    "udp-pingpong: server idle for {idle_s} s after {echoed} datagrams; giving up"
                );
                return 1;
            }
            // Sends the echoes, then sleeps: one exit does both.
            net.poll_wait(Instant::now().checked_add(Duration::from_secs(1)));
        }
    }

    /// Sends one ping and waits for its echo; the RTT, or `None` on timeout.
    fn ping(
        net: &mut Net,
        mut bd: Option<&mut Breakdown>,
        h: smoltcp::iface::SocketHandle,
        to: IpEndpoint,
        seq: u64,
        size: usize,
    ) -> Option<Duration> {
        let payload = encode(seq, size);
        let t0 = Instant::now();
        if bd.is_some() {
            net.stamp_app_tx();
        }
        if net.udp(h).send_slice(&payload, to).is_err() {
            return None;
        }
        let timeout =
            Duration::from_millis(REPLY_TIMEOUT_MS.load(core::sync::atomic::Ordering::Relaxed));
        let deadline = t0.checked_add(timeout)?;
        let mut buf = [0u8; 2048];
        loop {
            // Sends the ping (the first time round), then sleeps until a
            // frame comes; the next round's poll takes it in.
            net.poll_wait(Some(deadline));
            while let Ok((n, _)) = net.udp(h).recv_slice(&mut buf) {
                if decode(&buf[..n]) == Some(seq) {
                    let rtt = t0.elapsed();
                    if let Some(b) = bd.as_deref_mut() {
                        b.record(net.last_rx_poll());
                    }
                    return Some(rtt);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
        }
    }

    /// Paced runs: waits (serving the stack) until ping `seq` is due,
    /// `seq` intervals after `start`; back to back when `interval` is zero.
    fn pace(net: &mut Net, start: Instant, interval: Duration, seq: u64) {
        if interval.is_zero() {
            return;
        }
        let due = u32::try_from(seq)
            .ok()
            .and_then(|k| start.checked_add(interval * k));
        while due.is_some_and(|d| Instant::now() < d) {
            net.poll_wait(due);
        }
    }

    fn client(
        net: &mut Net,
        mut bd: Option<&mut Breakdown>,
        peer: Ipv4Address,
        count: u64,
        size: usize,
        warmup: u64,
    ) -> i32 {
        let Ok(h) = net.udp_bind(PORT + 1, 64) else {
            println!("udp-pingpong: cannot bind UDP port {}", PORT + 1);
            return APP_ERROR;
        };
        let to = IpEndpoint::new(peer.into(), PORT);
        log::info!(
            "udp-pingpong: client -> {to}, {count} pings of {size} B after {warmup} warm-up pings"
        );
        // Warm-up: resolves ARP and lets the server start; not counted.
        let mut answered = 0;
        for seq in 0..warmup.max(1) * 20 {
            if ping(net, None, h, to, u64::MAX - seq, size).is_some() {
                answered += 1;
                if answered >= warmup.max(1) {
                    break;
                }
            }
        }
        if answered == 0 {
            println!("udp-pingpong: no answer from {to} during warm-up");
            return 1;
        }
        // Every RTT is kept for the percentiles: refuse a count the heap
        // cannot hold, rather than panic in the allocation.
        let mut rtts: Vec<u64> = Vec::new();
        if usize::try_from(count)
            .ok()
            .is_none_or(|n| rtts.try_reserve_exact(n).is_err())
        {
            println!(
                "udp-pingpong: pingpong.count={count} needs {} MiB for its round-trip times; the heap cannot hold them",
                count.saturating_mul(8) >> 20
            );
            return APP_ERROR;
        }
        // The steady-state window for a VMM that has no marks (QEMU): the host
        // times these lines. Printed outside the marks, so a VMM that counts
        // between marks does not see their exits.
        println!("{STEADY_BEGIN}");
        mark(MARK_BEGIN);
        let start = Instant::now();
        let interval =
            Duration::from_micros(INTERVAL_US.load(core::sync::atomic::Ordering::Relaxed));
        for seq in 0..count {
            pace(net, start, interval, seq);
            if let Some(rtt) = ping(net, bd.as_deref_mut(), h, to, seq, size) {
                rtts.push(rtt.as_nanos() as u64);
            }
        }
        let elapsed = start.elapsed();
        mark(MARK_END);
        println!("{STEADY_END}");
        for _ in 0..3 {
            let _ = net.udp(h).send_slice(BYE, to);
            net.poll_wait(Instant::now().checked_add(Duration::from_millis(5)));
        }
        let received = rtts.len() as u64;
        // RX interrupts per CPU: where the NIC's MSI-X vector actually landed.
        let rx_irqs: alloc::vec::Vec<alloc::string::String> = (0..guest_kernel::rt::smp::online())
            .map(|cpu| alloc::format!("{}", guest_kernel::rt::irq::count(cpu, net.rx_vector())))
            .collect();
        rtts.sort_unstable();
        let p = |q| percentile(&rtts, q).unwrap_or(0);
        let pps = if elapsed.as_micros() == 0 {
            0
        } else {
            u128::from(received) * 1_000_000 / elapsed.as_micros()
        };
        let stats = net.stats();
        let h = guest_kernel::rt::hints::decisions();
        println!(
            "report: pingpong {} B: sent {count} received {received} lost {}; rtt p50 {} us p99 {} us min {} us max {} us; {pps} pps",
            size,
            count - received,
            p(50) / 1000,
            p(99) / 1000,
            rtts.first().copied().unwrap_or(0) / 1000,
            rtts.last().copied().unwrap_or(0) / 1000,
        );
        println!(
            "pingpong-result: {{\"packets_sent\": {count}, \"packets_received\": {received}, \"size\": {size}, \"rtt_ns\": {{\"p50\": {}, \"p99\": {}, \"min\": {}, \"max\": {}}}, \"pps\": {pps}, \"rx_dropped\": {}, \"rx_irqs_by_cpu\": [{}], \"hints\": {{\"state\": \"{}\", \"seen\": {}, \"retargeted\": {}, \"already\": {}, \"ignored\": {}, \"declined\": {}, \"torn\": {}, \"upcalls\": {}}}}}",
            p(50),
            p(99),
            rtts.first().copied().unwrap_or(0),
            rtts.last().copied().unwrap_or(0),
            stats.rx_dropped_short + stats.rx_dropped_oversize + stats.rx_errors,
            rx_irqs.join(", "),
            guest_kernel::rt::hints::state(),
            h.seen,
            h.retargeted,
            h.already,
            h.ignored,
            h.declined,
            h.torn,
            guest_kernel::rt::net::hint_upcalls()
        );
        // Every 5th percentile for distribution plots, only when asked: each
        // console byte is an exit under a VMM, and exits per packet are measured.
        if system().cmdline.get("pingpong.quantiles") == Some("1") {
            let q: alloc::vec::Vec<alloc::string::String> = (1..=19)
                .map(|i| alloc::format!("{}", p(i * 5) / 1000))
                .collect();
            println!("pingpong-quantiles-us: [{}]", q.join(","));
        }
        i32::from(received != count)
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("udp-pingpong is a guest image: run it with `cargo xtask run`");
    std::process::exit(2);
}
