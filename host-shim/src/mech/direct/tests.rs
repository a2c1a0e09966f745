use std::sync::atomic::AtomicU32;

use kvm_ioctls::Kvm;

use super::*;

fn vm(kvm: &Kvm) -> VmFd {
    kvm.create_vm().expect("create a VM (needs /dev/kvm)")
}

/// Three guests join in turn: each pair gets a channel, each guest's
/// wake-up reaches only guests it shares one with, and refusals are counted.
#[test]
fn every_pair_gets_a_channel_and_wake_ups_go_where_they_are_asked() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vms = [vm(&kvm), vm(&kvm), vm(&kvm)];
    let channels = Arc::new(Channels::default());
    let woken: Arc<[AtomicU32; 3]> = Arc::new(Default::default());
    let wake = |i: usize| -> Wake {
        let w = woken.clone();
        Box::new(move || {
            w[i].fetch_add(1, Ordering::Relaxed);
        })
    };
    let a = Arc::new(channels.join("a", 0, &vms[0], &[], wake(0)).unwrap());
    let b = Arc::new(
        channels
            .join("b", 1, &vms[1], &[(0, &vms[0])], wake(1))
            .unwrap(),
    );
    let c = Arc::new(
        channels
            .join("c", 2, &vms[2], &[(0, &vms[0]), (1, &vms[1])], wake(2))
            .unwrap(),
    );
    assert_eq!(
        [
            a.report().channels,
            b.report().channels,
            c.report().channels
        ],
        [2, 2, 2]
    );
    assert_eq!(channels.endpoints.lock().unwrap().len(), 6);

    let wake_from_a = a.wake_target();
    assert_eq!(wake_from_a.device, direct::DOORBELL_DEVICE);
    assert!((wake_from_a.call)(2), "a may wake c");
    assert!(!(wake_from_a.call)(0), "nobody wakes itself");
    assert!(!(wake_from_a.call)(7), "no guest 7");
    assert_eq!(woken[2].load(Ordering::Relaxed), 1);
    assert_eq!(woken[0].load(Ordering::Relaxed), 0);
    let ra = a.report();
    assert_eq!(ra.wakes_sent, 1);
    assert_eq!(ra.refused.get("wake_unknown_peer"), Some(&2));
    assert_eq!(c.report().wakes_received, 1);
}

/// A write that exits inside the channel area is refused: into a peer's
/// endpoint (read-only for this guest) as such, elsewhere as unmapped.
#[test]
fn exiting_accesses_to_the_channel_area_are_refused_and_counted() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vms = [vm(&kvm), vm(&kvm)];
    let channels = Arc::new(Channels::default());
    let a = Arc::new(
        channels
            .join("a", 0, &vms[0], &[], Box::new(|| {}))
            .unwrap(),
    );
    let _b = channels
        .join("b", 1, &vms[1], &[(0, &vms[0])], Box::new(|| {}))
        .unwrap();
    let (_, peer_view) = direct::channel(1).unwrap();
    assert!(a.mmio_write(peer_view + 8, &[1, 2, 3, 4]));
    let (hole, _) = direct::channel(5).unwrap();
    assert!(a.mmio_write(hole, &[0]));
    // Between the peer's endpoint and the next channel: nothing is mapped.
    assert!(a.mmio_write(peer_view + direct::ENDPOINT_SIZE as u64 + 8, &[0]));
    let mut data = [0xFFu8; 4];
    assert!(a.mmio_read(hole, &mut data));
    assert_eq!(data, [0; 4]);
    assert!(
        !a.mmio_write(area::DIRECT - 1, &[0]),
        "outside the area is someone else's"
    );
    let r = a.report();
    assert_eq!(r.refused.get("write_to_peer_endpoint"), Some(&1));
    assert_eq!(r.refused.get("unmapped_channel_access"), Some(&3));
}

#[test]
fn a_guest_beyond_the_directory_gets_no_channel() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let v = vm(&kvm);
    let channels = Arc::new(Channels::default());
    let id = DIR_ENTRIES as u32;
    assert!(matches!(
        channels.join("late", id, &v, &[], Box::new(|| {})),
        Err(DirectError::TooMany(_, _))
    ));
}
