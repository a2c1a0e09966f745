//! Tests against the real /dev/kvm: PVH entry and the exit hypercall
//! (`KVM_INTERRUPT` injection in the interrupt window is M3's, in
//! `kvm_upcalls.rs`). They fail (not skip) without /dev/kvm.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use host_shim::devices::serial::Sink;
use host_shim::vcpu::Outcome;
use host_shim::vm::{Guest, GuestConfig};
use kvm_ioctls::Kvm;

fn kvm() -> Kvm {
    Kvm::new().unwrap_or_else(|e| {
        panic!("these tests need /dev/kvm (open failed: {e}); run them on a KVM host")
    })
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A minimal ELF64 with one `PT_LOAD` at 1 MiB and a PVH entry note pointing at it.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    let mut f = vec![0u8; 0x1000];
    // ELF header (System V ABI, ELF-64 Object File Format §3).
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // little endian
    f[6] = 1; // EV_CURRENT
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&LOAD.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
    let phdr = |f: &mut Vec<u8>, at: usize, ty: u32, off: u64, addr: u64, size: u64| {
        f[at..at + 4].copy_from_slice(&ty.to_le_bytes());
        f[at + 4..at + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        f[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
        f[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes());
        f[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes());
        f[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
        f[at + 40..at + 48].copy_from_slice(&size.to_le_bytes());
        f[at + 48..at + 56].copy_from_slice(&4u64.to_le_bytes());
    };
    // The note: namesz 4, descsz 8, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0", entry.
    let note_at = 0x200;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&8u32.to_le_bytes());
    note.extend_from_slice(&18u32.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&LOAD.to_le_bytes());
    f[note_at..note_at + note.len()].copy_from_slice(&note);
    phdr(&mut f, 64, 1, 0x1000, LOAD, code.len() as u64);
    phdr(&mut f, 64 + 56, 4, note_at as u64, 0, note.len() as u64);
    f.extend_from_slice(code);
    f
}

#[test]
fn pvh_guest_prints_and_exits_through_the_hypercall() {
    #[rustfmt::skip]
    let code: &[u8] = &[
        0x66, 0xba, 0xf8, 0x03,             // mov dx, 0x3f8
        0xb0, b'h', 0xee,                   // mov al, 'h'; out dx, al
        0xb0, b'i', 0xee,                   // mov al, 'i'; out dx, al
        0xb0, b'\n', 0xee,                  // mov al, '\n'; out dx, al
        0x89, 0xd9,                         // mov ecx, ebx      (hvm_start_info)
        0x81, 0xe9, 0x00, 0x60, 0x00, 0x00, // sub ecx, 0x6000
        0x83, 0xc1, 0x2a,                   // add ecx, 42       (42 iff EBX was right)
        0x89, 0xcb,                         // mov ebx, ecx
        0xb8, 0x07, 0x00, 0x00, 0x00,       // mov eax, 7        (unknown call)
        0x66, 0xba, 0x10, 0x05,             // mov dx, 0x510
        0xef,                               // out dx, eax
        0xb8, 0x01, 0x00, 0x00, 0x00,       // mov eax, 1        (Call::Exit)
        0xef,                               // out dx, eax
        0xf4, 0xeb, 0xfd,                   // hlt; jmp hlt
    ];
    let path: PathBuf = std::env::temp_dir().join(format!("shim-pvh-{}.elf", std::process::id()));
    std::fs::write(&path, pvh_elf(code)).unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let cfg = GuestConfig {
        name: "tiny".into(),
        kernel: path.clone(),
        vcpus: 1,
        mem: 16 << 20,
        cmdline: "x".into(),
    };
    let mut g = Guest::new(&kvm(), &cfg.name, cfg.mem, 1, Sink::Buffer(lines.clone())).unwrap();
    g.boot_pvh(&cfg, None).unwrap();
    g.start(&[None]).unwrap();
    wait_until("guest exit", Duration::from_secs(20), || g.finished());
    let _ = std::fs::remove_file(&path);
    assert_eq!(g.outcome(), Some(Outcome::Exited(42)));
    assert_eq!(*lines.lock().unwrap(), vec!["hi".to_owned()]);
    let report = g.join(Instant::now());
    assert_eq!(report.rejected.get("unknown_hypercall"), Some(&1));
    assert_eq!(report.vcpus[0].exits.get("hypercall"), Some(&2));
}
