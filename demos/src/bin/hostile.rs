//! A hostile guest for the `hostile` test leg: it attacks the guest-facing
//! interfaces of the host shim while a udp-pingpong pair runs next to it, and
//! reports per attack what it did and whether the shim refused it. The leg
//! holds those lines against the shim's counters (each attack must show up
//! under its counted reason) and the pair's results (every ping answered).
//! Kernel command line (the shim offers VM queues with `--vmq on`):
//!
//! `ip=10.0.0.3/24 net.rx=poll hostile.victim=10.0.0.1 hostile.marker=HEX
//! [hostile.flood_ms=3000] [kernel.port_io=1] [hostile.sink=NAME]`
//!
//! The same image with `hostile.role=sink hostile.marker=HEX` is the
//! receiving end of the VM-queue remap attack: it consumes what arrives and
//! reports whether the page the shim refused to remap ever showed up in its
//! receive window (`hostile-sink: received=N pages=P found=F`).
//!
//! `kernel.port_io=1` lets the guest make port accesses of its own (raw
//! hypercalls, odd sizes); without it those attacks report nothing sent.
//!
//! Each attack prints `hostile-attack: NAME sent=N refused=yes|no (detail)`;
//! `refused` is what the guest itself can see (a value unchanged after a
//! store, an error status); the shim's counters are the leg's to check.
//! The isolation check prints `hostile-scan: planted=P foreign=F pages=N
//! frames=M`: the guest plants the marker pattern (`demos::marker`) in one
//! page of its own, then scans every page it can allocate, its heap, the
//! shim's pages mapped to it, and every frame it receives. `planted` must be
//! 1 (the scan works) and `foreign` 0 (no victim page or frame ever seen).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod guest {
    extern crate alloc;

    use alloc::format;
    use alloc::string::String;
    use alloc::vec::Vec;
    use core::time::Duration;
    use demos::APP_ERROR;
    use demos::marker;
    use guest_kernel::abi::Sys;
    use guest_kernel::println;
    use guest_kernel::rt::net::{NetConfig, VirtioNic};
    use guest_kernel::rt::start::system;
    use guest_kernel::rt::sys;
    use guest_kernel::rt::time::Instant;
    use para_abi::discovery;
    use para_abi::hypercall::{Call, Status};

    guest_kernel::entry!(main);

    type Mac = [u8; 6];
    const BROADCAST: Mac = [0xFF; 6];
    /// IEEE 802 local experimental ethertype: no stack answers it.
    const ETHERTYPE_TEST: u16 = 0x88B5;
    const ETHERTYPE_ARP: u16 = 0x0806;
    const PAGE: u64 = 4096;

    /// What one attack did.
    struct Outcome {
        sent: u64,
        refused: bool,
        detail: String,
    }

    fn report(name: &str, o: &Outcome) {
        println!(
            "hostile-attack: {name} sent={} refused={} ({})",
            o.sent,
            if o.refused { "yes" } else { "no" },
            o.detail
        );
    }

    fn report_all(outcomes: Vec<(&str, Outcome)>) {
        for (name, o) in outcomes {
            report(name, &o);
        }
    }

    /// A small xorshift: made-up MACs and garbage, no crate needed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// A unicast, locally administered MAC.
        fn mac(&mut self) -> Mac {
            let b = self.next().to_le_bytes();
            [(b[0] & 0xFC) | 0x02, b[1], b[2], b[3], b[4], b[5]]
        }
    }

    fn frame(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(14 + payload.len());
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f.resize(f.len().max(60), 0);
        f
    }

    /// The raw NIC and what arrived on it (scanned for the marker).
    struct Wire {
        nic: VirtioNic,
        mac: Mac,
        marker: u64,
        frames_seen: u64,
        foreign_frames: u64,
    }

    impl Wire {
        /// Sends `f`, waiting for ring room (taking in arrivals meanwhile).
        fn send(&mut self, f: &[u8]) -> bool {
            let end = Instant::now().checked_add(Duration::from_secs(2));
            loop {
                match self.nic.device().send(f) {
                    Ok(()) => return true,
                    Err(_) if end.is_some_and(|e| Instant::now() < e) => {
                        self.drain();
                        core::hint::spin_loop();
                    }
                    Err(_) => return false,
                }
            }
        }

        /// Takes in every frame waiting, scanning each; returns them.
        fn drain(&mut self) -> Vec<Vec<u8>> {
            let mut got = Vec::new();
            while let Some(f) = self.nic.device().receive() {
                self.frames_seen += 1;
                if marker::find_in_bytes(&f, self.marker).is_some() {
                    self.foreign_frames += 1;
                }
                got.push(f);
            }
            got
        }
    }

    fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
        let mut out = [0u8; 4];
        let mut parts = s.split('.');
        for b in &mut out {
            *b = parts.next()?.parse().ok()?;
        }
        parts.next().is_none().then_some(out)
    }

    /// Asks for `target`'s MAC the way any host would (ARP); the victim's
    /// answer is all an attacker needs to pose as it.
    fn resolve(w: &mut Wire, me: [u8; 4], target: [u8; 4]) -> Option<Mac> {
        let mut arp = Vec::with_capacity(28);
        arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&w.mac);
        arp.extend_from_slice(&me);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&target);
        let req = frame(BROADCAST, w.mac, ETHERTYPE_ARP, &arp);
        for _ in 0..50 {
            w.send(&req);
            let end = Instant::now().checked_add(Duration::from_millis(100))?;
            while Instant::now() < end {
                for f in w.drain() {
                    let is_reply = f.len() >= 42
                        && f[12..14] == ETHERTYPE_ARP.to_be_bytes()
                        && f[20..22] == [0, 2]
                        && f[28..32] == target;
                    if is_reply {
                        let mut mac = [0u8; 6];
                        mac.copy_from_slice(&f[22..28]);
                        return Some(mac);
                    }
                }
            }
        }
        None
    }

    /// Frames with a source MAC that is not ours: the server's, then made-up ones.
    fn forge(w: &mut Wire, victim: Mac, rng: &mut Rng) -> (Outcome, Outcome) {
        let mut sent = 0;
        for i in 0..1000u32 {
            // To the client's side of the switch (broadcast) and to the
            // server itself: either would let us steal or poison its traffic.
            let dst = if i % 2 == 0 { BROADCAST } else { victim };
            sent += u64::from(w.send(&frame(dst, victim, ETHERTYPE_TEST, b"forged")));
        }
        let forged = Outcome {
            sent,
            refused: true,
            detail: "source MAC of the server; the switch's count is the proof".into(),
        };
        let mut sent = 0;
        for _ in 0..5000 {
            let src = rng.mac();
            sent += u64::from(w.send(&frame(BROADCAST, src, ETHERTYPE_TEST, b"random")));
        }
        let random = Outcome {
            sent,
            refused: true,
            detail: "random source MACs, to overflow the MAC table".into(),
        };
        (forged, random)
    }

    /// Broadcasts and unicast frames at the server from our own MAC for
    /// `ms` milliseconds, while the pair pings.
    fn flood(w: &mut Wire, victim: Mac, ms: u64) -> (Outcome, Outcome) {
        let (mut bcast, mut ucast) = (0u64, 0u64);
        let end = Instant::now().checked_add(Duration::from_millis(ms));
        let b = frame(BROADCAST, w.mac, ETHERTYPE_TEST, &[0xBB; 1000]);
        let u = frame(victim, w.mac, ETHERTYPE_TEST, &[0xCC; 1000]);
        while end.is_some_and(|e| Instant::now() < e) {
            for _ in 0..64 {
                bcast += u64::from(w.send(&b));
            }
            for _ in 0..64 {
                ucast += u64::from(w.send(&u));
            }
            w.drain();
        }
        (
            Outcome {
                sent: bcast,
                refused: true,
                detail: format!("{ms} ms of broadcasts, cut by the flood budget"),
            },
            Outcome {
                sent: ucast,
                refused: true,
                detail: format!("{ms} ms of unicast at the server"),
            },
        )
    }

    fn raw_hypercall(call: u64, arg: u64) -> u64 {
        sys::raw_call(Sys::Hypercall as u64, call, arg)
    }

    fn refused_status(r: u64) -> bool {
        r == Status::UnknownCall as u64 || r == Status::BadArgument as u64
    }

    /// Calls the shim must refuse: test-only calls without `--test-hypercalls`,
    /// benchmark and re-designation calls without their flags, and M4's calls
    /// with values out of range.
    fn hypercalls() -> Vec<(&'static str, Outcome)> {
        let cases: [(&'static str, Call, u64); 8] = [
            ("hypercall_upcall_ping", Call::UpcallPing, 1),
            (
                "hypercall_upcall_storm",
                Call::UpcallStorm,
                para_abi::upcall::storm_arg(100_000, 1),
            ),
            ("hypercall_notify_bench", Call::NotifyBench, 0x1000),
            ("hypercall_redesignate", Call::DoorbellRedesignate, 0),
            ("hypercall_ctrl_unknown_flag", Call::CtrlWrite, 0x3F),
            ("hypercall_ctrl_bad_value", Call::CtrlWrite, 1 << 20),
            ("hypercall_ctrl_read_unknown", Call::CtrlRead, 99),
            (
                "hypercall_ctrl_own_virtual",
                Call::CtrlSetMasks,
                para_abi::ctrl::Flag::Trace.bit(),
            ),
        ];
        cases
            .into_iter()
            .map(|(name, call, arg)| {
                let r = raw_hypercall(call as u64, arg);
                (
                    name,
                    Outcome {
                        sent: 1,
                        refused: refused_status(r),
                        detail: format!("call {} answered {r:#x}", call as u32),
                    },
                )
            })
            .collect()
    }

    /// More `StatsMark` records than the shim keeps.
    fn marks() -> Outcome {
        let n = 3000u64;
        let mut failed = 0;
        for i in 0..n {
            if raw_hypercall(Call::StatsMark as u64, 0xBAD0_0000 + i) != 0 {
                failed += 1;
            }
        }
        Outcome {
            sent: n,
            refused: true,
            detail: format!("{failed} answered with an error; the shim keeps a bounded number"),
        }
    }

    /// Where the shim put the area of `leaf`, and its size.
    fn area_of(leaf: u32) -> Option<(u64, u32)> {
        let r = core::arch::x86_64::__cpuid(leaf);
        discovery::area_from_registers([r.eax, r.ebx, r.ecx, r.edx])
            .map(|(gpa, size, _)| (gpa, size))
    }

    fn area(leaf: u32) -> Option<u64> {
        area_of(leaf).map(|(gpa, _)| gpa)
    }

    /// Loads the word at `addr` without the compiler assuming anything of it
    /// (the scan reads memory nobody initialised for it, on purpose).
    fn load(addr: u64) -> u64 {
        let v: u64;
        // SAFETY: callers pass 8-byte aligned addresses of pages mapped for
        // ring 3 (allocated frames, the heap, the shim's areas); a load has
        // no side effect there.
        unsafe {
            core::arch::asm!("mov {v}, [{a}]", v = out(reg) v, a = in(reg) addr, options(nostack, readonly, preserves_flags));
        }
        v
    }

    fn store(addr: u64, v: u64) {
        // SAFETY: `addr` is an 8-byte aligned word of a page the shim maps for
        // this guest read-only: the store exits to the shim, which refuses it
        // (that is the attack); the memory never changes.
        unsafe { core::ptr::write_volatile(addr as *mut u64, v) };
    }

    /// Stores into pages the shim maps read-only: the hints page, the para
    /// region's header, the control-flag mask page.
    fn read_only_pages() -> Vec<(&'static str, Outcome)> {
        let region = area(discovery::LEAF_PARA_REGION);
        let targets = [
            ("store_hints_page", area(discovery::LEAF_HINTS)),
            ("store_para_region_header", region),
            (
                "store_designation_table",
                region.map(|r| r + para_abi::region::TABLE_OFFSET as u64),
            ),
            (
                "store_ctrl_mask_page",
                guest_kernel::rt::ctrl::mask_word_addr(),
            ),
        ];
        targets
            .into_iter()
            .map(|(name, addr)| {
                let o = match addr {
                    Some(a) => {
                        let before = load(a);
                        for v in [u64::MAX, 0, 0x4141_4141_4141_4141] {
                            store(a, v);
                        }
                        let after = load(a);
                        Outcome {
                            sent: 3,
                            refused: before == after,
                            detail: format!("page {a:#x}: {before:#x} before, {after:#x} after"),
                        }
                    }
                    None => Outcome {
                        sent: 0,
                        refused: false,
                        detail: "not offered: nothing attacked".into(),
                    },
                };
                (name, o)
            })
            .collect()
    }

    /// Bits no control flag owns, set in this guest's shadow word: the shim
    /// must refuse them at the next exit and put them back.
    fn stray_shadow_bits() -> Outcome {
        use core::sync::atomic::Ordering;
        let Some(w) = guest_kernel::rt::ctrl::shadow_word() else {
            return Outcome {
                sent: 0,
                refused: false,
                detail: "no control blocks offered".into(),
            };
        };
        let stray = 0xFFu64 << 40;
        w.fetch_or(stray, Ordering::SeqCst);
        // Any exit will do: the shim reads the shadow word at each (a
        // query, so that no other attack's count moves).
        let _ = raw_hypercall(Call::CtrlQuery as u64, 0);
        let left = w.load(Ordering::SeqCst) & stray;
        Outcome {
            sent: 1,
            refused: left == 0,
            detail: format!("bits {stray:#x} set; {left:#x} left after an exit"),
        }
    }

    /// Stores into M4's wait page, which is the shim's to write: over its
    /// sequence word, a request with a timeout beyond the limit, a request
    /// of the wrong size, into a stamp slot.
    fn wait_page_stores() -> Outcome {
        use guest_kernel::rt::ctrl;
        use para_abi::ctrl::wait;
        let (Some(page), Some(seq)) = (ctrl::wait_page(), ctrl::rx_token()) else {
            return Outcome {
                sent: 0,
                refused: false,
                detail: "no wait page offered".into(),
            };
        };
        let long = u64::from(seq) | (u64::from(wait::MAX_TIMEOUT_US) + 1) << 32;
        let _ = ctrl::wait_page_store(wait::RX_SEQ, 0xDEAD_BEEF);
        let _ = ctrl::wait_page_store(wait::REQUEST, long);
        // SAFETY: inside the wait page the shim maps read-only for this
        // guest (aligned): the store exits and the shim refuses it.
        unsafe { core::ptr::write_volatile((page + wait::REQUEST) as *mut u32, 1) };
        let _ = ctrl::wait_page_store(wait::STAMPS, 1);
        let after = ctrl::rx_token();
        Outcome {
            sent: 4,
            refused: after == Some(seq),
            detail: format!("sequence {seq} before, {after:?} after"),
        }
    }

    /// Garbage in this guest's own doorbell ring: words with bad checks,
    /// unknown operations, records for other positions.
    fn doorbell_garbage(rng: &mut Rng) -> Outcome {
        let Ok(d) = guest_kernel::rt::doorbell::get() else {
            return Outcome {
                sent: 0,
                refused: false,
                detail: "no doorbells offered".into(),
            };
        };
        let mut sent = 0;
        for _ in 0..2000 {
            let g = rng.next();
            if d.send_raw(|_| g) {
                sent += 1;
            }
        }
        Outcome {
            sent,
            refused: true,
            detail: "random words in the ring".into(),
        }
    }

    /// VM-queue sends that must come back refused: to nobody, to ourselves,
    /// of memory outside our RAM, a misaligned remap; `victim_name` is the
    /// guest the others go to.
    fn vmq_bad_sends(victim_name: &str) -> Vec<(&'static str, Outcome)> {
        use guest_kernel::rt::vmq::{self, Policy, Transfer};
        use para_abi::vmq::{Message, SendStatus};
        let Ok(q) = vmq::open() else {
            return alloc::vec![(
                "vmq_bad_sends",
                Outcome {
                    sent: 0,
                    refused: false,
                    detail: "VM queues not offered".into(),
                }
            )];
        };
        let Some(victim) = q.lookup(victim_name) else {
            return alloc::vec![(
                "vmq_bad_sends",
                Outcome {
                    sent: 0,
                    refused: false,
                    detail: format!("no guest {victim_name} in the directory"),
                }
            )];
        };
        let buf = alloc::vec![0x5Au8; 8192];
        let addr = buf.as_ptr() as u64;
        let m = |dest, addr, len, transfer: Transfer| Message {
            dest,
            policy: Policy::Immediate as u8,
            transfer: transfer as u8,
            huge: false,
            status: 0,
            len,
            flags: 0,
            addr,
            tag: 0xBAD,
        };
        let cases = [
            (
                "vmq_no_such_vm",
                m(u32::MAX - 1, addr, 64, Transfer::Copy),
                SendStatus::NoSuchVm,
            ),
            (
                "vmq_to_itself",
                m(q.id(), addr, 64, Transfer::Copy),
                SendStatus::BadDescriptor,
            ),
            (
                "vmq_outside_ram",
                m(victim, 0xB000_0000, 4096, Transfer::Copy),
                SendStatus::OutsideRam,
            ),
            (
                "vmq_misaligned_remap",
                m(victim, addr | 1, 64, Transfer::Remap),
                SendStatus::BadDescriptor,
            ),
            (
                "vmq_zero_length",
                m(victim, addr, 0, Transfer::Copy),
                SendStatus::BadDescriptor,
            ),
        ];
        let out = cases
            .into_iter()
            .map(|(name, msg, want)| {
                let i = q.send(&msg);
                let got = q.settle(i);
                (
                    name,
                    Outcome {
                        sent: 1,
                        refused: got == want,
                        detail: format!("answered {got:?}, expected {want:?}"),
                    },
                )
            })
            .collect();
        drop(buf);
        out
    }

    /// The tag of the message that tells the sink the attack is over.
    const SINK_STOP: u64 = 0x5170_9000;
    /// The key of the pattern the hostile guest writes into the page the
    /// shim refused to remap (`marker ^ REFUSED_KEY`), which the sink must
    /// never see.
    const REFUSED_KEY: u64 = 0x0BAD_0000_5EED;

    /// Remaps single pages (every other one of pairs, so that each splits
    /// the shim's mappings) to the guest called `sink` until the shim
    /// refuses one at this sender's share of `vm.max_map_count`. The refused
    /// page must still be ours: the guest fills it with a pattern the sink
    /// then looks for in its whole receive window.
    fn remap_bound(m: u64, sink: &str) -> Outcome {
        use guest_kernel::mem::heap::{alloc_frames, free_frames};
        use guest_kernel::rt::vmq::{self, Policy, Transfer};
        use para_abi::vmq::{Message, SendStatus};
        let none = |why: String| Outcome {
            sent: 0,
            refused: false,
            detail: why,
        };
        let Ok(q) = vmq::open() else {
            return none("VM queues not offered".into());
        };
        let Some(dest) = q.lookup(sink) else {
            return none(format!("no guest {sink} in the directory"));
        };
        let msg = |addr, len, transfer: Transfer, tag| Message {
            dest,
            policy: Policy::Immediate as u8,
            transfer: transfer as u8,
            huge: false,
            status: 0,
            len,
            flags: 0,
            addr,
            tag,
        };
        let mut frames = Vec::new();
        let (mut delivered, mut refused_at, mut other) = (0u64, None, None);
        'pages: while delivered < 40_000 {
            let Some(pair) = alloc_frames(2, 1) else {
                other = Some("out of frames");
                break;
            };
            frames.push(pair);
            // SAFETY: the first word of a frame this guest just allocated,
            // identity-mapped and writable from ring 3.
            unsafe { core::ptr::write_volatile(pair as *mut u64, delivered) };
            // A full inbox passes once the sink consumes; the bound does not.
            for _ in 0..20 {
                let k = q.send(&msg(pair, 4096, Transfer::Remap, delivered));
                match q.settle(k) {
                    SendStatus::Delivered => {
                        delivered += 1;
                        continue 'pages;
                    }
                    SendStatus::QueueFull => {
                        guest_kernel::rt::wait::sleep(Duration::from_millis(5));
                    }
                    _ => {
                        other = Some("a refusal other than QueueFull");
                        break 'pages;
                    }
                }
            }
            refused_at = Some(pair);
            break;
        }
        // The refused page is still ours and writable: fill it with the
        // pattern the sink must not find anywhere in its window.
        let kept = refused_at.map(|p| {
            let mut page = [0u64; marker::PAGE_WORDS];
            marker::fill(&mut page, m ^ REFUSED_KEY);
            // SAFETY: `p` is a frame this guest allocated and still owns (the
            // shim refused to move it), identity-mapped, writable from ring 3.
            unsafe { core::ptr::copy_nonoverlapping(page.as_ptr(), p as *mut u64, page.len()) };
            marker::page_matches(m ^ REFUSED_KEY, |i| load(p + 8 * i as u64))
        });
        let stop = [0u8; 64];
        let k = q.send(&msg(stop.as_ptr() as u64, 64, Transfer::Copy, SINK_STOP));
        let stop_status = q.settle(k);
        for f in frames {
            let _ = free_frames(f, 2);
        }
        Outcome {
            sent: u64::from(refused_at.is_some()),
            refused: refused_at.is_some() && kept == Some(true) && other.is_none(),
            detail: format!(
                "{delivered} pages remapped to {sink} before the refusal ({}); the refused page still ours: {kept:?}; stop message {stop_status:?}",
                other.unwrap_or("QueueFull 20 times")
            ),
        }
    }

    /// The other end of [`remap_bound`] (`hostile.role=sink`): consumes
    /// every arrival until the stop message, then looks for the refused
    /// page's pattern in its whole receive window and prints
    /// `hostile-sink: received=N pages=P found=F`.
    fn sink(m: u64) -> i32 {
        use guest_kernel::rt::vmq;
        let Ok(q) = vmq::open() else {
            println!("hostile-sink: VM queues not offered");
            return APP_ERROR;
        };
        let mut received = 0u64;
        'wait: loop {
            q.wait();
            while let Some(a) = q.peek() {
                q.consume();
                if a.tag == SINK_STOP {
                    break 'wait;
                }
                received += 1;
            }
        }
        let window = para_abi::layout::area::VMQ + para_abi::vmq::WINDOW;
        let (mut pages, mut found) = (0u64, 0u64);
        let mut a = window;
        while a < window + para_abi::vmq::WINDOW_SIZE {
            pages += 1;
            if marker::page_matches(m ^ REFUSED_KEY, |i| load(a + 8 * i as u64)) {
                found += 1;
            }
            a += PAGE;
        }
        println!("hostile-sink: received={received} pages={pages} found={found}");
        0
    }

    fn pci_read(bdf: u16, off: u8) -> u32 {
        sys::pci_read(bdf, off).unwrap_or(u32::MAX)
    }

    /// The address BAR `bir` decodes (32- or 64-bit memory BAR).
    fn bar_address(bdf: u16, bir: u8) -> u64 {
        let lo = pci_read(bdf, 0x10 + 4 * bir);
        if lo & 0b110 == 0b100 {
            u64::from(pci_read(bdf, 0x14 + 4 * bir)) << 32 | u64::from(lo & !0xF)
        } else {
            u64::from(lo & !0xF)
        }
    }

    /// The first capability for which `pick` (given its offset and first
    /// dword) answers.
    fn find_cap<T>(bdf: u16, mut pick: impl FnMut(u8, u32) -> Option<T>) -> Option<T> {
        let mut ptr = (pci_read(bdf, 0x34) & 0xFC) as u8;
        for _ in 0..48 {
            if ptr == 0 {
                return None;
            }
            let head = pci_read(bdf, ptr);
            if let Some(t) = pick(ptr, head) {
                return Some(t);
            }
            ptr = ((head >> 8) & 0xFC) as u8;
        }
        None
    }

    /// The MSI-X table's address: capability 0x11's table BAR and offset.
    fn msix_table(bdf: u16) -> Option<u64> {
        find_cap(bdf, |ptr, head| {
            (head & 0xFF == 0x11).then(|| {
                let t = pci_read(bdf, ptr + 4);
                bar_address(bdf, (t & 7) as u8) + u64::from(t & !7)
            })
        })
    }

    /// A virtio structure (virtio 1.2 §4.1.4): its address, and the notify
    /// multiplier for the notification structure.
    fn virtio_cap(bdf: u16, cfg_type: u32) -> Option<(u64, u32)> {
        find_cap(bdf, |ptr, head| {
            (head & 0xFF == 0x09 && head >> 24 == cfg_type).then(|| {
                let bar = (pci_read(bdf, ptr + 4) & 0xFF) as u8;
                let offset = pci_read(bdf, ptr + 8);
                (
                    bar_address(bdf, bar) + u64::from(offset),
                    pci_read(bdf, ptr + 16),
                )
            })
        })
    }

    fn mmio_read16(a: u64) -> u16 {
        // SAFETY: a register of the NIC's common configuration, mapped for
        // ring 3 where the driver programs it; reads have no side effect.
        unsafe { core::ptr::read_volatile(a as *const u16) }
    }

    fn mmio_read32(a: u64) -> u32 {
        // SAFETY: as in `mmio_read16`.
        unsafe { core::ptr::read_volatile(a as *const u32) }
    }

    fn mmio_write16(a: u64, v: u16) {
        // SAFETY: a register of the NIC (queue select, a notification),
        // mapped for ring 3 where the driver programs it.
        unsafe { core::ptr::write_volatile(a as *mut u16, v) };
    }

    /// Writes `v` at `a` in this guest's own RAM (its NIC's rings, which
    /// the driver placed there).
    fn ram_write<T>(a: u64, v: T) {
        // SAFETY: `a` lies in a descriptor table or available ring of the
        // NIC's queues, which the common configuration names and the driver
        // allocated in this guest's RAM, identity-mapped for ring 3; the
        // driver never takes from the queue again after these attacks.
        unsafe { core::ptr::write_volatile(a as *mut T, v) };
    }

    /// Hands the device TX chains no driver would: a buffer outside RAM, a
    /// descriptor that chains to itself, a frame over 1514 bytes, a
    /// write-only buffer; then an available index far ahead of the ring.
    /// Writes the TX queue's rings directly (the driver is not used for TX
    /// afterwards).
    fn virtqueue_attacks(bdf: u16) -> Vec<(&'static str, Outcome)> {
        const TX: u16 = 1;
        const F_NEXT: u16 = 1;
        const F_WRITE: u16 = 2;
        let none = |why: &str| Outcome {
            sent: 0,
            refused: false,
            detail: why.into(),
        };
        let (Some((common, _)), Some((notify, mult))) = (virtio_cap(bdf, 1), virtio_cap(bdf, 2))
        else {
            return alloc::vec![("virtqueue_bad_chains", none("no virtio capabilities"))];
        };
        mmio_write16(common + 0x16, TX);
        let size = mmio_read16(common + 0x18);
        let notify_off = mmio_read16(common + 0x1E);
        let u64_at =
            |o| u64::from(mmio_read32(common + o)) | u64::from(mmio_read32(common + o + 4)) << 32;
        let (desc, avail, used) = (u64_at(0x20), u64_at(0x28), u64_at(0x30));
        if size < 4 || desc == 0 || avail == 0 || used == 0 {
            return alloc::vec![("virtqueue_bad_chains", none("TX queue not set up"))];
        }
        let kick = notify + u64::from(notify_off) * u64::from(mult);
        let buf = alloc::vec![0x77u8; 4096];
        let mut idx = ram_read16(avail + 2);
        // One descriptor per chain, from the table's end, each published
        // once the device has returned the one before (its used index moved).
        let mut publish = |d: u16, addr: u64, len: u32, flags: u16, next: u16| {
            let entry = desc + 16 * u64::from(d);
            ram_write(entry, addr);
            ram_write(entry + 8, len);
            ram_write(entry + 12, flags);
            ram_write(entry + 14, next);
            ram_write(avail + 4 + 2 * u64::from(idx % size), d);
            idx = idx.wrapping_add(1);
            ram_write(avail + 2, idx);
            mmio_write16(kick, TX);
            let end = Instant::now().checked_add(Duration::from_secs(2));
            while ram_read16(used + 2) != idx && end.is_some_and(|e| Instant::now() < e) {
                guest_kernel::rt::wait::sleep(Duration::from_millis(5));
            }
            ram_read16(used + 2) == idx
        };
        let base = buf.as_ptr() as u64;
        let returned = [
            publish(size - 1, 0xFFFF_FFFF_F000, 1514, 0, 0),
            publish(size - 2, base, 64, F_NEXT, size - 2),
            publish(size - 3, base, 4000, 0, 0),
            // Write-only: a buffer for the device to fill, on a queue it reads.
            publish(size - 4, base, 64, F_WRITE, 0),
        ];
        let chains = Outcome {
            sent: returned.len() as u64,
            refused: returned.iter().all(|&r| r),
            detail: format!(
                "buffer outside RAM, a self-chained descriptor, a 4000-byte frame, a write-only buffer; returned by the device: {returned:?}"
            ),
        };
        ram_write(avail + 2, idx.wrapping_add(4 * size));
        mmio_write16(kick, TX);
        guest_kernel::rt::wait::sleep(Duration::from_millis(50));
        let jump = Outcome {
            sent: 1,
            refused: true,
            detail: format!("available index {} ahead of the ring of {size}", 4 * size),
        };
        drop(buf);
        alloc::vec![
            ("virtqueue_bad_chains", chains),
            ("virtqueue_avail_jump", jump)
        ]
    }

    fn ram_read16(a: u64) -> u16 {
        // SAFETY: an index or entry of a NIC queue's available or used ring,
        // in this guest's RAM (see `ram_write`); the device writes the used
        // one concurrently, hence the volatile read.
        unsafe { core::ptr::read_volatile(a as *const u16) }
    }

    /// One port access with our own operands, through the kernel call the
    /// command line allows (`kernel.port_io=1`).
    #[must_use]
    fn pio(port: u16, size: u8, write: bool, rax: u64, rbx: u64) -> u64 {
        sys::port_io(port, size, write, rax, rbx)
    }

    /// Whether the kernel lets us (an access of size 3 is refused as
    /// `Invalid` when it does, `NoSys` when it does not; no port is touched).
    fn port_io_allowed() -> bool {
        pio(0, 3, false, 0, 0) == guest_kernel::abi::SysError::Invalid as u64
    }

    fn no_port_io(name: &'static str) -> (&'static str, Outcome) {
        (
            name,
            Outcome {
                sent: 0,
                refused: false,
                detail: "no kernel.port_io=1: nothing attacked".into(),
            },
        )
    }

    /// Hypercalls our kernel never forwards, made on the port directly:
    /// numbers the ABI does not define, arguments out of range for defined
    /// ones, and calls of the wrong operand size.
    fn raw_hypercalls() -> Vec<(&'static str, Outcome)> {
        const PORT: u16 = para_abi::hypercall::PORT;
        if !port_io_allowed() {
            return alloc::vec![
                no_port_io("hypercall_undefined"),
                no_port_io("hypercall_bad_arguments")
            ];
        }
        let unknown = Status::UnknownCall as u64;
        let bad = Status::BadArgument as u64;
        // 0, gaps between the mechanisms' ranges, one past the last defined
        // (ConsoleWrite = 28), the top of EAX, and RAX all ones.
        let numbers = [0u64, 11, 13, 19, 27, 29, 0x7FFF_FFFF, u64::MAX];
        let answers: Vec<u64> = numbers
            .iter()
            .map(|&n| pio(PORT, 4, true, n, 0xBAD))
            .collect();
        let undefined = Outcome {
            sent: numbers.len() as u64,
            refused: answers.iter().all(|&r| r == unknown),
            detail: format!("calls {numbers:x?} answered {answers:x?}"),
        };
        // Exit with a status wider than 32 bits (we must live on), a console
        // write longer than the limit, a StatsMark as a 1- and a 2-byte out.
        let cases = [
            (4u8, Call::Exit as u64, 1u64 << 40),
            (
                4,
                Call::ConsoleWrite as u64,
                para_abi::hypercall::console_arg(0x10_0000, 5000),
            ),
            (1, Call::StatsMark as u64, 1),
            (2, Call::StatsMark as u64, 1),
        ];
        let answers: Vec<u64> = cases
            .iter()
            .map(|&(size, call, arg)| pio(PORT, size, true, call, arg))
            .collect();
        // A refused 1- or 2-byte out leaves the rest of RAX as it was.
        let ok = answers[..2].iter().all(|&r| r == bad)
            && answers[2..]
                .iter()
                .all(|&r| r == bad || r & 0xFFFF == bad & 0xFFFF);
        let bad_args = Outcome {
            sent: cases.len() as u64,
            refused: ok,
            detail: format!(
                "exit with 1<<40, a 5000-byte console write, 1- and 2-byte calls: answered {answers:x?}"
            ),
        };
        alloc::vec![
            ("hypercall_undefined", undefined),
            ("hypercall_bad_arguments", bad_args)
        ]
    }

    /// Port I/O of every size at ports nobody decodes, at the PCI
    /// configuration ports at sizes and offsets the mechanism does not
    /// define, and at the UART wider than its byte registers.
    fn odd_port_io(bdf: u16) -> Vec<(&'static str, Outcome)> {
        if !port_io_allowed() {
            return alloc::vec![
                no_port_io("port_unassigned"),
                no_port_io("port_pci_config_odd"),
                no_port_io("port_uart_wide")
            ];
        }
        let ones = |size: u8| {
            if size == 4 {
                0xFFFF_FFFFu64
            } else {
                (1u64 << (8 * size)) - 1
            }
        };
        // Nobody's ports: reads must answer all ones.
        let reads = [
            (0x1234u16, 1u8),
            (0x1234, 2),
            (0x1234, 4),
            (0x1235, 2),
            (para_abi::hypercall::PORT, 4),
            (0xFFFF, 1),
        ];
        let all_ones = reads
            .iter()
            .all(|&(port, size)| pio(port, size, false, 0, 0) & ones(size) == ones(size));
        let writes = [(0x1234u16, 1u8), (0x1234, 2), (0x1237, 4), (0x511, 2)];
        for &(port, size) in &writes {
            let _ = pio(port, size, true, 0x4141_4141, 0);
        }
        let unassigned = Outcome {
            sent: (reads.len() + writes.len()) as u64,
            refused: all_ones,
            detail: format!(
                "{} ins of 1, 2, 4 bytes (all ones: {all_ones}) and {} outs",
                reads.len(),
                writes.len()
            ),
        };
        // PCI configuration mechanism #1: only a dword at 0xCF8 is
        // CONFIG_ADDRESS; data accesses must be naturally aligned; with the
        // enable bit clear there is no configuration cycle.
        let address = 0x8000_0000u64 | u64::from(bdf) << 8;
        let _ = pio(0xCF8, 4, true, address, 0);
        let id_before = pci_read(bdf, 0);
        let _ = pio(0xCF8, 4, true, address, 0);
        let mut sent = 0;
        let mut ones_read = true;
        for (port, size, write) in [
            (0xCF8u16, 1u8, true),
            (0xCFA, 2, true),
            (0xCF8, 1, false),
            (0xCFA, 2, false),
            (0xCFD, 2, false),
            (0xCFE, 4, false),
            (0xCFD, 4, true),
        ] {
            let r = pio(port, size, write, 0xEEEE_EEEE, 0);
            if !write && r & ones(size) != ones(size) {
                ones_read = false;
            }
            sent += 1;
        }
        let _ = pio(0xCF8, 4, true, address & !(1 << 31), 0);
        if pio(0xCFC, 4, false, 0, 0) & 0xFFFF_FFFF != 0xFFFF_FFFF {
            ones_read = false;
        }
        let _ = pio(0xCFC, 4, true, 0x1234_5678, 0);
        sent += 2;
        let id_after = pci_read(bdf, 0);
        let pci = Outcome {
            sent,
            refused: ones_read && id_before == id_after,
            detail: format!(
                "sub-dword CONFIG_ADDRESS, misaligned data, data with the enable bit clear; reads all ones: {ones_read}, id {id_before:#x} -> {id_after:#x}"
            ),
        };
        // The UART's registers are bytes. The line-control write would keep
        // 8N1 even if it were taken.
        let lsr = pio(0x3FD, 4, false, 0, 0) & 0xFFFF_FFFF;
        let rbr = pio(0x3F8, 2, false, 0, 0) & 0xFFFF;
        let _ = pio(0x3F8, 2, true, u64::from(u16::from_le_bytes(*b"AB")), 0);
        let _ = pio(0x3FB, 4, true, 0x0303_0303, 0);
        let uart = Outcome {
            sent: 4,
            refused: lsr == 0xFFFF_FFFF && rbr == 0xFFFF,
            detail: format!(
                "4-byte LSR read {lsr:#x}, 2-byte RBR read {rbr:#x}, 2- and 4-byte outs"
            ),
        };
        alloc::vec![
            ("port_unassigned", unassigned),
            ("port_pci_config_odd", pci),
            ("port_uart_wide", uart)
        ]
    }

    /// One MMIO access of `size` bytes at `a`, aligned or not: the
    /// instruction a driver would never use there.
    fn mmio(a: u64, size: u8, write: Option<u64>) -> u64 {
        let mut v = write.unwrap_or(0);
        // SAFETY: `a` lies in the MMIO hole below the IOAPIC, which the boot
        // page tables map uncached for ring 3 and which holds no RAM of this
        // guest (the NIC's BAR, PCI configuration, or nothing): every access
        // exits to the shim, which answers or refuses it. Unaligned accesses
        // are the point; they are single x86 instructions.
        unsafe {
            match (size, write.is_some()) {
                (1, false) => {
                    core::arch::asm!("movzx {v:e}, byte ptr [{a}]", a = in(reg) a, v = out(reg) v, options(nostack));
                }
                (2, false) => {
                    core::arch::asm!("movzx {v:e}, word ptr [{a}]", a = in(reg) a, v = out(reg) v, options(nostack));
                }
                (4, false) => {
                    core::arch::asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) a, v = out(reg) v, options(nostack));
                }
                (8, false) => {
                    core::arch::asm!("mov {v}, qword ptr [{a}]", a = in(reg) a, v = out(reg) v, options(nostack));
                }
                (1, true) => {
                    core::arch::asm!("mov byte ptr [{a}], {v:l}", a = in(reg) a, v = in(reg) v, options(nostack));
                }
                (2, true) => {
                    core::arch::asm!("mov word ptr [{a}], {v:x}", a = in(reg) a, v = in(reg) v, options(nostack));
                }
                (4, true) => {
                    core::arch::asm!("mov dword ptr [{a}], {v:e}", a = in(reg) a, v = in(reg) v, options(nostack));
                }
                (8, true) => {
                    core::arch::asm!("mov qword ptr [{a}], {v}", a = in(reg) a, v = in(reg) v, options(nostack));
                }
                _ => {}
            }
        }
        v
    }

    /// MMIO of odd sizes and offsets: the NIC's common configuration at
    /// widths that are not its fields', holes of its BAR, PCI configuration
    /// through ECAM, and an address nobody decodes.
    fn odd_mmio(bdf: u16) -> Vec<(&'static str, Outcome)> {
        let Some((common, _)) = virtio_cap(bdf, 1) else {
            return alloc::vec![(
                "mmio_virtio_odd_width",
                Outcome {
                    sent: 0,
                    refused: false,
                    detail: "no virtio capabilities".into(),
                }
            )];
        };
        let bar = bar_address(bdf, 0);
        let status = mmio(common + 0x14, 1, None);
        let select = mmio(common + 0x16, 2, None);
        let ones = |size: u8| {
            if size == 8 {
                u64::MAX
            } else {
                (1u64 << (8 * size)) - 1
            }
        };
        let mut all_ones = true;
        let mut read = |a: u64, size: u8| {
            if mmio(a, size, None) != ones(size) {
                all_ones = false;
            }
        };
        // Wider than a field, inside one, misaligned.
        read(common + 0x15, 4);
        read(common + 0x16, 8);
        read(common + 0x17, 1);
        read(common + 0x13, 2);
        // Holes of the BAR (between ISR and device configuration).
        read(bar + 0x1800, 1);
        read(bar + 0x1802, 2);
        read(bar + 0x1804, 4);
        read(bar + 0x1808, 8);
        // Writes that would change the device if taken keep its state
        // anyway: the status it has, the queue selected now.
        let _ = mmio(common + 0x17, 2, Some(0));
        let _ = mmio(common + 0x14, 8, Some(status));
        let _ = mmio(common + 0x16, 4, Some(select | 0xFFFF_0000));
        let _ = mmio(common + 0x19, 1, Some(0));
        let _ = mmio(bar + 0x7F00, 8, Some(u64::MAX));
        let kept = mmio(common + 0x14, 1, None) == status && mmio(common + 0x16, 2, None) == select;
        let virtio = Outcome {
            sent: 13,
            refused: all_ones && kept,
            detail: format!(
                "8 reads (all ones: {all_ones}), 5 writes (status {status:#x} and queue {select} kept: {kept})"
            ),
        };
        // ECAM of our own function: an 8-byte access, misaligned ones.
        let ecam = para_abi::layout::MMIO_HOLE_START + (u64::from(bdf) << 12);
        let mut ecam_ones = true;
        for (off, size) in [(0u64, 8u8), (1, 2), (2, 4)] {
            if mmio(ecam + off, size, None) != ones(size) {
                ecam_ones = false;
            }
        }
        let id = pci_read(bdf, 0);
        let _ = mmio(ecam, 8, Some(0));
        let ecam_o = Outcome {
            sent: 4,
            refused: ecam_ones && pci_read(bdf, 0) == id,
            detail: format!("3 reads (all ones: {ecam_ones}), an 8-byte write over the ids"),
        };
        // Between the BARs and the doorbell kick area: nothing there.
        let nowhere = 0xFD00_0000u64;
        let mut nothing_ones = true;
        for (off, size) in [(0u64, 1u8), (2, 2), (5, 4), (9, 8)] {
            if mmio(nowhere + off, size, None) != ones(size) {
                nothing_ones = false;
            }
        }
        let _ = mmio(nowhere + 3, 4, Some(0x4141_4141));
        let unmapped = Outcome {
            sent: 5,
            refused: nothing_ones,
            detail: format!("4 reads at {nowhere:#x} (all ones: {nothing_ones}) and a write"),
        };
        alloc::vec![
            ("mmio_virtio_odd_width", virtio),
            ("mmio_ecam_odd", ecam_o),
            ("mmio_unmapped", unmapped)
        ]
    }

    /// Queue `q` of the NIC as its common configuration names it.
    struct Rings {
        desc: u64,
        avail: u64,
        used: u64,
        size: u16,
        kick: u64,
    }

    fn rings(bdf: u16, q: u16) -> Option<Rings> {
        let ((common, _), (notify, mult)) = (virtio_cap(bdf, 1)?, virtio_cap(bdf, 2)?);
        mmio_write16(common + 0x16, q);
        let size = mmio_read16(common + 0x18);
        let notify_off = mmio_read16(common + 0x1E);
        let u64_at =
            |o| u64::from(mmio_read32(common + o)) | u64::from(mmio_read32(common + o + 4)) << 32;
        let r = Rings {
            desc: u64_at(0x20),
            avail: u64_at(0x28),
            used: u64_at(0x30),
            size,
            kick: notify + u64::from(notify_off) * u64::from(mult),
        };
        (size >= 4 && r.desc != 0 && r.avail != 0 && r.used != 0).then_some(r)
    }

    fn ram_read32(a: u64) -> u32 {
        // SAFETY: an element of a used ring in this guest's RAM (see
        // `ram_write`), written by the device concurrently.
        unsafe { core::ptr::read_volatile(a as *const u32) }
    }

    /// An ARP request to `target`: its answer is a frame for our RX queue.
    fn arp_request(mac: Mac, me: [u8; 4], target: [u8; 4]) -> Vec<u8> {
        let mut arp = Vec::with_capacity(28);
        arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&me);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&target);
        frame(BROADCAST, mac, ETHERTYPE_ARP, &arp)
    }

    /// Rewrites the descriptor of the next RX buffer the device takes as
    /// `(address, length, flags, next)` (next `u16::MAX`: itself), makes a
    /// frame arrive, and puts the driver's descriptor back once the device
    /// returned it. What the device did; `None` when no buffer is posted.
    fn rx_bad_chain(
        w: &mut Wire,
        r: &Rings,
        req: &[u8],
        d: (u64, u32, u16, u16),
    ) -> Option<String> {
        let u = ram_read16(r.used + 2);
        if ram_read16(r.avail + 2) == u {
            return None;
        }
        let slot = u64::from(u % r.size);
        let head = ram_read16(r.avail + 4 + 2 * slot);
        let entry = r.desc + 16 * u64::from(head % r.size);
        let saved = (load(entry), load(entry + 8));
        ram_write(entry, d.0);
        ram_write(entry + 8, d.1);
        ram_write(entry + 12, d.2);
        ram_write(entry + 14, if d.3 == u16::MAX { head } else { d.3 });
        let end = Instant::now().checked_add(Duration::from_secs(3));
        let mut tries = 0;
        while ram_read16(r.used + 2) == u && end.is_some_and(|e| Instant::now() < e) {
            if tries % 40 == 0 {
                let _ = w.nic.device().send(req);
            }
            tries += 1;
            guest_kernel::rt::wait::sleep(Duration::from_millis(5));
        }
        let moved = ram_read16(r.used + 2) != u;
        let (id, got) = (
            ram_read32(r.used + 4 + 8 * slot),
            ram_read32(r.used + 8 + 8 * slot),
        );
        ram_write(entry, saved.0);
        ram_write(entry + 8, saved.1);
        Some(if moved && id == u32::from(head) && got == 0 {
            "returned empty".into()
        } else if moved {
            format!("returned as {id} with {got} bytes")
        } else {
            "never taken".into()
        })
    }

    /// Hands the device RX chains no driver would. The device takes the
    /// next buffer the driver posted when a frame arrives for us, so each
    /// attack rewrites that buffer's descriptor, makes the victim answer an
    /// ARP request, waits for the device to return the descriptor, and puts
    /// the driver's back. Then an available index far ahead, which stalls
    /// the queue until the driver next refills it.
    fn rx_queue_attacks(
        w: &mut Wire,
        bdf: u16,
        me: [u8; 4],
        victim: [u8; 4],
    ) -> Vec<(&'static str, Outcome)> {
        use para_abi::layout::area;
        const RXQ: u16 = 0;
        const F_NEXT: u16 = 1;
        const F_WRITE: u16 = 2;
        const F_INDIRECT: u16 = 4;
        let none = |why: &str| Outcome {
            sent: 0,
            refused: false,
            detail: why.into(),
        };
        let Some(r) = rings(bdf, RXQ) else {
            return alloc::vec![("virtqueue_rx_bad_chains", none("RX queue not found"))];
        };
        let req = arp_request(w.mac, me, victim);
        let buf = alloc::vec![0u8; 4096];
        let base = buf.as_ptr() as u64;
        // (what, address, length, flags, next; u16::MAX = the descriptor itself)
        let cases: [(&str, u64, u32, u16, u16); 9] = [
            ("outside RAM", 0xFFFF_FFFF_F000, 2048, F_WRITE, 0),
            ("the hints page", area::HINTS, 2048, F_WRITE, 0),
            ("the VM-queue area", area::VMQ, 2048, F_WRITE, 0),
            (
                "the para region",
                para_abi::layout::PARA_REGION_BASE,
                2048,
                F_WRITE,
                0,
            ),
            ("a loop", base, 64, F_WRITE | F_NEXT, u16::MAX),
            ("next beyond the table", base, 64, F_WRITE | F_NEXT, 0xFFF0),
            ("read-only", base, 2048, 0, 0),
            ("zero length", base, 0, F_WRITE, 0),
            ("a 17-byte indirect table", base, 17, F_INDIRECT, 0),
        ];
        let mut returned = Vec::new();
        for (what, addr, len, flags, next) in cases {
            let Some(seen) = rx_bad_chain(w, &r, &req, (addr, len, flags, next)) else {
                returned.push(format!("{what}: no buffer posted"));
                break;
            };
            returned.push(format!("{what}: {seen}"));
        }
        let empty = returned
            .iter()
            .filter(|s| s.ends_with("returned empty"))
            .count() as u64;
        let chains = Outcome {
            sent: empty,
            refused: empty == cases.len() as u64,
            detail: returned.join(", "),
        };
        // An available index four rings ahead: the next frame finds no
        // chain the device may take.
        let u = ram_read16(r.used + 2);
        let avail = ram_read16(r.avail + 2);
        ram_write(r.avail + 2, avail.wrapping_add(4 * r.size));
        mmio_write16(r.kick, RXQ);
        for _ in 0..3 {
            let _ = w.nic.device().send(&req);
            guest_kernel::rt::wait::sleep(Duration::from_millis(30));
        }
        let jump = Outcome {
            sent: 1,
            // Frames do reach us (the chains above were taken), so a used
            // index that stays put means the device found nothing to take.
            refused: ram_read16(r.used + 2) == u && empty > 0,
            detail: format!(
                "available index {} ahead of the ring of {}; the used index stayed: {}",
                4 * r.size,
                r.size,
                ram_read16(r.used + 2) == u
            ),
        };
        drop(buf);
        alloc::vec![
            ("virtqueue_rx_bad_chains", chains),
            ("virtqueue_rx_avail_jump", jump)
        ]
    }

    /// Writes into this guest's upcall mailboxes (M3) that no honest guest
    /// makes: acknowledgements ahead of what the shim posted, and words that
    /// are no vCPU's counter. The shim reads the area at its report, so this
    /// runs last.
    fn mailbox_attacks() -> Vec<(&'static str, Outcome)> {
        use core::sync::atomic::Ordering::SeqCst;
        use para_abi::upcall::{self, Class};
        let Some((gpa, _)) = area_of(discovery::LEAF_UPCALLS) else {
            return alloc::vec![(
                "upcall_ack_ahead",
                Outcome {
                    sent: 0,
                    refused: false,
                    detail: "no upcall mailboxes offered".into(),
                }
            )];
        };
        let word = |off: u64| {
            // SAFETY: a 4-aligned word of the upcall area, which the boot page
            // tables map read-write for ring 3 and the shim keeps for the
            // VM's life; the shim reads it concurrently, hence an atomic.
            unsafe { core::sync::atomic::AtomicU32::from_ptr((gpa + off) as *mut u32) }
        };
        let mut ahead = Vec::new();
        for (class, by) in [(Class::Ping, 1000u32), (Class::Redesignation, 7)] {
            let (Some(p), Some(a)) = (
                upcall::posted_offset(0, class),
                upcall::acked_offset(0, class),
            ) else {
                continue;
            };
            let posted = word(p).load(SeqCst);
            word(a).store(posted.wrapping_add(by), SeqCst);
            ahead.push(format!(
                "{} posted {posted}, acked {}",
                class.name(),
                posted.wrapping_add(by)
            ));
        }
        let ack = Outcome {
            sent: ahead.len() as u64,
            refused: true,
            detail: format!("{}; the shim counts it at its report", ahead.join(", ")),
        };
        // Slot padding, and the slots of vCPUs we do not have (we have one).
        let stray_offsets = [
            16,
            upcall::SLOT_SIZE - 4,
            upcall::acked_offset(5, Class::Ping).unwrap_or(0),
            upcall::posted_offset(9, Class::VmqArrival).unwrap_or(0),
        ];
        for (i, &off) in stray_offsets.iter().enumerate() {
            word(off).store(0xA0 + i as u32, SeqCst);
        }
        let stray = Outcome {
            sent: stray_offsets.len() as u64,
            refused: true,
            detail: format!("words at {stray_offsets:#x?}; the shim counts them at its report"),
        };
        alloc::vec![("upcall_ack_ahead", ack), ("upcall_stray_writes", stray)]
    }

    /// Configuration space and MSI-X: read-only fields, moving the BAR away
    /// and back, table accesses of the wrong size.
    fn pci_attacks(bdf: u16) -> Vec<(&'static str, Outcome)> {
        let id = pci_read(bdf, 0);
        let _ = sys::pci_write(bdf, 0, 0x1234_5678);
        let ro = Outcome {
            sent: 1,
            refused: pci_read(bdf, 0) == id,
            detail: format!("vendor/device id {id:#x} kept"),
        };
        // A 1-byte and a 2-byte store into the table, which takes 4 and 8 bytes only.
        let msix = match msix_table(bdf) {
            Some(t) => {
                let before = load(t);
                // SAFETY: the NIC's MSI-X table, mapped for ring 3 where the
                // driver programs it; the shim refuses these sizes and the
                // entry keeps its value (checked below).
                unsafe {
                    core::ptr::write_volatile(t as *mut u8, 0xEE);
                    core::ptr::write_volatile((t + 2) as *mut u16, 0xEEEE);
                }
                let after = load(t);
                Outcome {
                    sent: 2,
                    refused: before == after,
                    detail: format!(
                        "table at {t:#x}: entry 0 {before:#x} before, {after:#x} after"
                    ),
                }
            }
            None => Outcome {
                sent: 0,
                refused: false,
                detail: "no MSI-X capability found".into(),
            },
        };
        // The BAR moved 16 MiB away, then back: the shim follows (and counts).
        let bar = pci_read(bdf, 0x10);
        let moved = bar.wrapping_add(0x0100_0000);
        let _ = sys::pci_write(bdf, 0x10, moved);
        let seen = pci_read(bdf, 0x10);
        let _ = sys::pci_write(bdf, 0x10, bar);
        let back = pci_read(bdf, 0x10);
        let relocate = Outcome {
            sent: 2,
            refused: back == bar,
            detail: format!("BAR0 {bar:#x} -> {seen:#x} -> {back:#x}"),
        };
        alloc::vec![
            ("pci_read_only_write", ro),
            ("msix_bad_size", msix),
            ("pci_bar_relocation", relocate),
        ]
    }

    /// Escape sequences, bidirectional overrides and a forged line of
    /// another guest's console.
    fn console() -> Outcome {
        println!("\x1b[2J\x1b[H\x1b]0;owned\x07\u{202e}desrever");
        println!("\rserver| report: pingpong server echoed 999999 datagrams (forged)");
        Outcome {
            sent: 2,
            refused: true,
            detail: "the leg checks the shim's output for raw escapes and the forged line".into(),
        }
    }

    /// The isolation check: plants the pattern in one page of its own, then
    /// scans every frame it can allocate, its heap and the shim's areas.
    fn scan(m: u64) -> (u64, u64, u64) {
        use guest_kernel::mem::heap::{alloc_frames, free_frames};
        let mut taken: Vec<u64> = Vec::new();
        while let Some(f) = alloc_frames(1, 1) {
            taken.push(f);
            if taken.len() >= 1 << 17 {
                break;
            }
        }
        let planted = taken.first().copied();
        if let Some(p) = planted {
            let mut page = [0u64; marker::PAGE_WORDS];
            marker::fill(&mut page, m);
            // SAFETY: `p` is a frame just allocated for this guest alone,
            // identity-mapped and writable from ring 3.
            unsafe { core::ptr::copy_nonoverlapping(page.as_ptr(), p as *mut u64, page.len()) };
        }
        let (mut found_planted, mut foreign, mut pages) = (0u64, 0u64, 0u64);
        let mut look = |base: u64| {
            pages += 1;
            if marker::page_matches(m, |i| load(base + 8 * i as u64)) {
                if Some(base) == planted {
                    found_planted += 1;
                } else {
                    foreign += 1;
                }
            }
        };
        for &f in &taken {
            look(f);
        }
        let mem = &system().memory;
        let mut a = mem.heap_start;
        while a < mem.heap_start + mem.heap_bytes {
            look(a);
            a += PAGE;
        }
        for leaf in [
            discovery::LEAF_PARA_REGION,
            discovery::LEAF_HINTS,
            discovery::LEAF_UPCALLS,
            discovery::LEAF_CTRL,
            discovery::LEAF_VMQ,
        ] {
            if let Some((gpa, size)) = area_of(leaf) {
                let mut a = gpa;
                while a + PAGE <= gpa + u64::from(size) {
                    look(a);
                    a += PAGE;
                }
            }
        }
        for f in taken {
            let _ = free_frames(f, 1);
        }
        (found_planted, foreign, pages)
    }

    fn main() -> i32 {
        let c = &system().cmdline;
        let Some(m) = c.get("hostile.marker").and_then(marker::parse) else {
            println!("hostile: give hostile.marker=HEX");
            return APP_ERROR;
        };
        if c.get("hostile.role") == Some("sink") {
            return sink(m);
        }
        let (Some(me), Some(victim_ip)) = (
            c.get("ip")
                .and_then(|s| s.split('/').next())
                .and_then(parse_ipv4),
            c.get("hostile.victim").and_then(parse_ipv4),
        ) else {
            println!("hostile: give ip=A.B.C.D/N and hostile.victim=A.B.C.D");
            return APP_ERROR;
        };
        let victim_name = c.get("hostile.victim_name").unwrap_or("server");
        let flood_ms = c
            .get("hostile.flood_ms")
            .and_then(|s| s.parse().ok())
            .unwrap_or(3000);
        let cfg = match NetConfig::from_cmdline(c) {
            Ok(cfg) => cfg,
            Err(e) => {
                println!("hostile: {e}");
                return APP_ERROR;
            }
        };
        let opened = match VirtioNic::open(0, &cfg) {
            Ok(o) => o,
            Err(e) => {
                println!("hostile: no NIC: {e}");
                return APP_ERROR;
            }
        };
        let bdf =
            u16::from(opened.bus) << 8 | u16::from(opened.device) << 3 | u16::from(opened.function);
        let mut nic = opened.nic;
        let mac = nic.device().mac();
        let mut w = Wire {
            nic,
            mac,
            marker: m,
            frames_seen: 0,
            foreign_frames: 0,
        };
        let mut rng = Rng(m | 1);
        let Some(victim) = resolve(&mut w, me, victim_ip) else {
            println!("hostile: the victim never answered ARP");
            return APP_ERROR;
        };
        println!(
            "hostile: victim {victim_name} has MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            victim[0], victim[1], victim[2], victim[3], victim[4], victim[5]
        );
        // First, while the victim surely answers ARP (it just did): the RX
        // queue's attacks need frames for us. They leave the RX queue
        // stalled until the driver next refills it; nothing below needs it.
        w.drain();
        report_all(rx_queue_attacks(&mut w, bdf, me, victim_ip));
        let (forged, random) = forge(&mut w, victim, &mut rng);
        report("switch_forged_source", &forged);
        report("switch_random_source_flood", &random);
        let (bcast, ucast) = flood(&mut w, victim, flood_ms);
        report("switch_broadcast_flood", &bcast);
        report("switch_unicast_flood", &ucast);
        report_all(hypercalls());
        report("stats_mark_flood", &marks());
        report_all(read_only_pages());
        report("ctrl_stray_shadow_bits", &stray_shadow_bits());
        report("ctrl_wait_page_stores", &wait_page_stores());
        report("doorbell_garbage", &doorbell_garbage(&mut rng));
        // To the sink, which stays until the remap attack tells it to stop
        // (the server ends when its client has its pings).
        let sink_name = c.get("hostile.sink").unwrap_or("sink");
        report_all(vmq_bad_sends(sink_name));
        report("vmq_remap_bound", &remap_bound(m, sink_name));
        report("console_escapes", &console());
        report_all(raw_hypercalls());
        report_all(odd_port_io(bdf));
        report_all(odd_mmio(bdf));
        // Last: the TX queue and PCI attacks spoil the NIC's TX queue and
        // move its BAR; the NIC is not used after them.
        report_all(virtqueue_attacks(bdf));
        report_all(pci_attacks(bdf));
        let (planted, foreign, pages) = scan(m);
        println!(
            "hostile-scan: planted={planted} foreign={} pages={pages} frames={}",
            foreign + w.foreign_frames,
            w.frames_seen
        );
        report_all(mailbox_attacks());
        0
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("hostile is a guest image: boot it under the shim (see the hostile test leg)");
    std::process::exit(2);
}
