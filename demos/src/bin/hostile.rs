//! A hostile guest for the `hostile` test leg: it attacks the guest-facing
//! interfaces of the host shim while a udp-pingpong pair runs next to it, and
//! reports per attack what it did and whether the shim refused it. The leg
//! holds those lines against the shim's counters (each attack must show up
//! under its counted reason) and the pair's results (every ping answered).
//! Kernel command line (the shim offers VM queues with `--vmq on`):
//!
//! `ip=10.0.0.3/24 net.rx=poll hostile.victim=10.0.0.1 hostile.marker=HEX
//! [hostile.flood_ms=3000]`
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
    /// of memory outside our RAM, a misaligned remap.
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

    /// Writes `v` at `a` in this guest's own RAM (its TX queue's rings,
    /// which the driver placed there).
    fn ram_write<T>(a: u64, v: T) {
        // SAFETY: `a` lies in the TX queue's descriptor table or available
        // ring, which the common configuration names and the driver
        // allocated in this guest's RAM, identity-mapped for ring 3; the
        // driver never uses the queue again after this attack.
        unsafe { core::ptr::write_volatile(a as *mut T, v) };
    }

    /// Hands the device TX chains no driver would: a buffer outside RAM, a
    /// descriptor that chains to itself, a frame over 1514 bytes; then an
    /// available index far ahead of the ring. Writes the TX queue's rings
    /// directly (the driver is not used for TX afterwards).
    fn virtqueue_attacks(bdf: u16) -> Vec<(&'static str, Outcome)> {
        const TX: u16 = 1;
        const F_NEXT: u16 = 1;
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
        ];
        let chains = Outcome {
            sent: 3,
            refused: true,
            detail: format!(
                "buffer outside RAM, a self-chained descriptor, a 4000-byte frame; returned by the device: {returned:?}"
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
        // SAFETY: an index word of the TX queue's available or used ring,
        // in this guest's RAM (see `ram_write`); the device writes the used
        // one concurrently, hence the volatile read.
        unsafe { core::ptr::read_volatile(a as *const u16) }
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
        let (forged, random) = forge(&mut w, victim, &mut rng);
        report("switch_forged_source", &forged);
        report("switch_random_source_flood", &random);
        let (bcast, ucast) = flood(&mut w, victim, flood_ms);
        report("switch_broadcast_flood", &bcast);
        report("switch_unicast_flood", &ucast);
        for (name, o) in hypercalls() {
            report(name, &o);
        }
        report("stats_mark_flood", &marks());
        for (name, o) in read_only_pages() {
            report(name, &o);
        }
        report("ctrl_stray_shadow_bits", &stray_shadow_bits());
        report("ctrl_wait_page_stores", &wait_page_stores());
        report("doorbell_garbage", &doorbell_garbage(&mut rng));
        for (name, o) in vmq_bad_sends(victim_name) {
            report(name, &o);
        }
        report("console_escapes", &console());
        // Last: the virtqueue and PCI attacks spoil the NIC's TX queue and
        // move its BAR; it is not used after them.
        w.drain();
        for (name, o) in virtqueue_attacks(bdf) {
            report(name, &o);
        }
        for (name, o) in pci_attacks(bdf) {
            report(name, &o);
        }
        let (planted, foreign, pages) = scan(m);
        println!(
            "hostile-scan: planted={planted} foreign={} pages={pages} frames={}",
            foreign + w.foreign_frames,
            w.frames_seen
        );
        0
    }
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("hostile is a guest image: boot it under the shim (see the hostile test leg)");
    std::process::exit(2);
}
