//! `--vcpu-quantum` on real KVM: a slice that ends while the guest has
//! interrupts masked is not taken there; the vCPU yields at its first exit with
//! IF = 1. Needs /dev/kvm.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use host_shim::devices::serial::Sink;
use host_shim::mech::quantum::Quantum;
use host_shim::platform::PioDevice;
use host_shim::vcpu::VcpuShared;
use host_shim::vm::Guest;
use kvm_ioctls::Kvm;

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Ports of the program: 0x511 under `cli` (a slice ends here), 0x512 while still
/// masked, 0x513 after `sti`. Records (port, yields so far, deferrals so far) as
/// each write is handled, before the vCPU thread looks at the slice.
struct Probe {
    bsp: Arc<VcpuShared>,
    seen: Mutex<Vec<(u16, u64, u64)>>,
    done: AtomicBool,
}

impl PioDevice for Probe {
    fn pio_read(&self, _: u16, _: &mut [u8]) -> bool {
        false
    }
    fn pio_write(&self, port: u16, _: &[u8]) -> bool {
        if !(0x511..=0x513).contains(&port) {
            return false;
        }
        self.seen.lock().unwrap().push((
            port,
            self.bsp.preempted.load(Ordering::Relaxed),
            self.bsp.preempt_deferred.load(Ordering::Relaxed),
        ));
        match port {
            0x511 => self.bsp.request_yield(),
            0x513 => self.done.store(true, Ordering::SeqCst),
            _ => {}
        }
        true
    }
}

#[test]
fn a_slice_ending_under_cli_waits_for_sti() {
    let kvm = Kvm::new().unwrap_or_else(|e| panic!("this test needs /dev/kvm: {e}"));
    let mut g = Guest::new(&kvm, "quantum", 16 << 20, 1, Sink::Buffer(Arc::default())).unwrap();
    #[rustfmt::skip]
    let main: &[u8] = &[
        0xfa,             // cli
        0xba, 0x11, 0x05, // mov dx, 0x511  -> the slice ends (yield requested, kick)
        0xee,             // out dx, al
        0xba, 0x12, 0x05, // mov dx, 0x512  -> still masked: another exit, no yield
        0xee,             // out dx, al
        0xfb,             // sti
        0x90,             // nop            (the interrupt shadow of sti)
        0xba, 0x13, 0x05, // mov dx, 0x513  -> IF = 1: the yield has been taken by now
        0xee,             // out dx, al
        0xfa, 0xf4, 0xeb, 0xfd, // cli; hlt; jmp hlt
    ];
    common::real_mode_program(&g, 0x40, main, &[0xcf]);
    let probe = Arc::new(Probe {
        bsp: g.vcpus[0].clone(),
        seen: Mutex::default(),
        done: AtomicBool::new(false),
    });
    g.platform_mut().unwrap().add_pio(probe.clone());
    g.attach(Arc::new(Quantum)).unwrap();
    g.start(&[None]).unwrap();
    wait_until("the last port write", Duration::from_secs(20), || {
        probe.done.load(Ordering::SeqCst)
    });
    g.interrupt();
    wait_until("vCPU stop", Duration::from_secs(5), || g.finished());
    let r = g.join(Instant::now());
    let seen = probe.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    // At 0x512 (IF still 0) the request was put off, not taken.
    assert_eq!(seen[1], (0x512, 0, 1), "{seen:?}");
    // 0x513 is the first exit with IF = 1: the yield is taken right after it is
    // handled (it was still pending while the port write ran), and only once.
    assert_eq!(seen[2], (0x513, 0, 1), "{seen:?}");
    assert_eq!((r.vcpus[0].preempted, r.vcpus[0].preempt_deferred), (1, 1));
}
