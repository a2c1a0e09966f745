//! M3 against the real /dev/kvm: an upcall posted while the guest runs with IF=0
//! waits for the interrupt-window exit and is injected once; one posted while IF=1
//! is injected at once. Fails (not skips) without /dev/kvm.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use host_shim::devices::serial::Sink;
use host_shim::mech::UpcallClass;
use host_shim::mech::upcalls::{Delivery, GuestUpcalls};
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

/// Posts a ping at ports 0x511 (guest has IF=0) and 0x514 (IF=1); records the
/// handler's 0x512 and the end marker 0x513.
struct Poster {
    seen: Mutex<Vec<u16>>,
    upcalls: Arc<GuestUpcalls>,
    bsp: Arc<VcpuShared>,
    done: AtomicBool,
}

impl PioDevice for Poster {
    fn pio_read(&self, _: u16, _: &mut [u8]) -> bool {
        false
    }
    fn pio_write(&self, port: u16, _: &[u8]) -> bool {
        if !(0x511..=0x514).contains(&port) {
            return false;
        }
        self.seen.lock().unwrap().push(port);
        match port {
            0x511 | 0x514 => {
                assert!(
                    self.upcalls
                        .post(0, UpcallClass::Ping, 1, || self.bsp.kick())
                );
            }
            0x513 => self.done.store(true, Ordering::SeqCst),
            _ => {}
        }
        true
    }
}

#[test]
fn upcall_waits_for_the_window_when_masked_and_goes_at_once_when_open() {
    let kvm = Kvm::new().expect("these tests need /dev/kvm");
    let mut g = Guest::new(&kvm, "up", 16 << 20, 1, Sink::Buffer(Arc::default())).unwrap();
    let upcalls = host_shim::assemble::upcalls(&mut g, Delivery::Window, false).unwrap();
    #[rustfmt::skip]
    let main: &[u8] = &[
        0xfa,             // cli
        0xba, 0x11, 0x05, // mov dx, 0x511   -> posted with IF=0
        0xee,             // out dx, al
        0xfb,             // sti
        0xf4,             // hlt             (window opens; handler writes 0x512)
        0xba, 0x14, 0x05, // mov dx, 0x514   -> posted with IF=1: injected at
        0xee,             // out dx, al         the re-entry, the handler writes 0x512
        0xba, 0x13, 0x05, // mov dx, 0x513
        0xee,             // out dx, al
        0xfa, 0xf4, 0xeb, 0xfd, // cli; hlt; jmp hlt
    ];
    let handler: &[u8] = &[0xba, 0x12, 0x05, 0xee, 0xcf]; // mov dx, 0x512; out dx, al; iret
    // Real mode: the IVT sends vector para_abi::upcall::VECTOR to the handler at 0000:2000.
    common::real_mode_program(&g, para_abi::upcall::VECTOR, main, handler);

    let poster = Arc::new(Poster {
        seen: Mutex::default(),
        upcalls: upcalls.clone(),
        bsp: g.vcpus[0].clone(),
        done: AtomicBool::new(false),
    });
    g.platform_mut().unwrap().add_pio(poster.clone());
    g.start(&[None]).unwrap();
    wait_until(
        "the guest's last port write",
        Duration::from_secs(20),
        || poster.done.load(Ordering::SeqCst),
    );
    g.interrupt();
    wait_until("vCPU stop", Duration::from_secs(5), || g.finished());
    let r = g.join(Instant::now());
    // Each handler run came after its post and before the next step: delivered in
    // the window, once each.
    assert_eq!(
        *poster.seen.lock().unwrap(),
        vec![0x511, 0x512, 0x514, 0x512, 0x513]
    );
    let u = r.upcalls.expect("upcall report");
    assert_eq!(u.requested.get("ping"), Some(&2));
    assert_eq!(u.injected_after_window, 1, "{u:?}");
    assert_eq!(u.injected_immediately, 1, "{u:?}");
    assert!(u.irq_window_exits >= 1, "{u:?}");
    // The real-mode guest cannot reach the mailbox to acknowledge: none delivered.
    assert_eq!(u.delivered.get("ping"), Some(&0));
    assert!(u.rejected.values().all(|&n| n == 0), "{u:?}");
    // The stop found the guest in its final `cli; hlt`: a closed window to wait
    // for, and the watchdog ended the wait (the vCPU did stop, above).
    assert_eq!(u.stop_deferrals, 1, "{u:?}");
}

#[test]
fn test_only_calls_need_the_flag_and_a_guest_gets_one_storm_thread_at_a_time() {
    use host_shim::mech::upcalls::Upcalls;
    use para_abi::hypercall::{Call, Status};
    let kvm = Kvm::new().expect("these tests need /dev/kvm");
    let mut g = Guest::new(&kvm, "storm", 16 << 20, 1, Sink::Buffer(Arc::default())).unwrap();
    let u = host_shim::assemble::upcalls(&mut g, Delivery::Window, false).unwrap();
    let me = Upcalls(u.clone());
    let vcpu = g.vcpus[0].clone();
    // Two pings a second apart: the first storm still runs at the second call.
    let storm = para_abi::upcall::storm_arg(2, 1_000_000);
    // Without --test-hypercalls: refused and counted, nothing started.
    assert_eq!(
        me.call(Call::UpcallStorm, storm, &vcpu),
        Status::UnknownCall
    );
    assert_eq!(me.call(Call::UpcallPing, 1, &vcpu), Status::UnknownCall);
    let r = u.report();
    assert_eq!(r.rejected.get("test_call_off"), Some(&2), "{r:?}");
    assert_eq!(r.requested.get("ping"), Some(&0), "no ping was posted");
    u.allow_test_calls();
    assert_eq!(me.call(Call::UpcallStorm, storm, &vcpu), Status::Ok);
    assert_eq!(
        me.call(Call::UpcallStorm, storm, &vcpu),
        Status::BadArgument,
        "a second storm thread while the first runs"
    );
    assert_eq!(u.report().rejected.get("storm_busy"), Some(&1));
    // The guest ends: the storm stops at its next post.
    u.close();
}
