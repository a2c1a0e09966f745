//! Set-up shared by the real-KVM tests: tiny real-mode programs in a bare guest.

use host_shim::vm::Guest;
use vm_memory::{Bytes, GuestAddress};

/// Loads `main` at 0000:1000 and `handler` at 0000:2000, points the real-mode IVT
/// entry of `vector` at the handler, and sets the boot vCPU to start `main` in
/// real mode with IF clear and a stack at 0x7000.
pub fn real_mode_program(g: &Guest, vector: u8, main: &[u8], handler: &[u8]) {
    g.mem
        .write_obj(0x0000_2000u32, GuestAddress(u64::from(vector) * 4))
        .unwrap();
    g.mem.write_slice(main, GuestAddress(0x1000)).unwrap();
    g.mem.write_slice(handler, GuestAddress(0x2000)).unwrap();
    let bsp = g.bsp().unwrap();
    let mut sregs = bsp.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    bsp.set_sregs(&sregs).unwrap();
    let mut regs = bsp.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rsp = 0x7000;
    regs.rflags = 2;
    bsp.set_regs(&regs).unwrap();
}
