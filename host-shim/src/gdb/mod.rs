//! `--gdb`: a gdb remote-protocol stub for one guest.
//!
//! The shim listens on a TCP port before the guest starts; the guest's vCPUs
//! park before their first instruction until gdb attaches and continues.
//! [`control`] stops and resumes vCPUs (each vCPU's fd stays on its own
//! thread), [`target`] is the guest as `gdbstub` sees it, and [`Debugger`]
//! joins them to the vCPU loop as a [`Mechanism`].
//!
//! Breakpoints (`break` and `hbreak` alike, at most four at a time) are
//! kept twice: in the vCPUs' debug registers (`KVM_GUESTDBG_USE_HW_BP`),
//! and as an int3 the stub writes over the instruction's first byte (and
//! hides from gdb's memory reads). The debug register stops ring 0 before
//! the int3 runs, and every ring on a KVM with VMX or SVM. On a KVM without
//! hardware virtualisation (`kvm_pvm`, the one this shim is developed on)
//! debug registers do not fire in ring 3 at all, and a #DB or #BP taken in
//! ring 3 goes to the guest's own IDT, never to the host (nor does
//! `KVM_GUESTDBG_USE_SW_BP` change that). So the guest is told it is
//! debugged (feature bit `DEBUG_TRAPS`, leaf `LEAF_DEBUG`), and its kernel
//! forwards a ring-3 #DB or #BP with the `DebugTrap` hypercall, passing its
//! saved trap frame: that vCPU stops there (an int3 of ours is rewound onto
//! its breakpoint), gdb sees and changes the ring-3 registers in the frame
//! ([`frame`]), and a step sets the frame's TF so that the guest's return
//! from the trap runs one instruction and traps again.

pub mod control;
pub mod frame;
pub mod target;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use gdbstub::stub::{DisconnectReason, GdbStub};
use kvm_ioctls::VcpuFd;
use tracing::{error, info, warn};

use para_abi::discovery::{LEAF_DEBUG, features};
use para_abi::hypercall::{Call, Status, debug_frame};
use vm_memory::{Bytes, GuestAddress};

use crate::counters::Reject;
use crate::kvm::cpuid::Offer;
use crate::kvm::memory::GuestMem;
use crate::mech::{CallCtx, Mechanism};
use crate::vcpu::handle::VcpuShared;
use control::Control;
use target::{EventLoop, GuestTarget};

/// `--gdb [NAME=]PORT`: which guest, and where gdb connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GdbSpec {
    /// The guest's name; `None`: the only guest.
    pub guest: Option<String>,
    pub port: u16,
}

impl GdbSpec {
    /// Parses `PORT` or `NAME=PORT`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (guest, port) = match s.split_once('=') {
            Some((name, port)) if !name.is_empty() => (Some(name.to_owned()), port),
            Some(_) => return Err(format!("{s:?}: the guest's name before '=' is empty")),
            None => (None, s),
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| {
                format!("{port:?} is no TCP port (1-65535); expected PORT or NAME=PORT")
            })?;
        Ok(Self { guest, port })
    }

    /// The index of the guest it names among `names`, or why none.
    pub fn pick<'a>(
        &self,
        mut names: impl ExactSizeIterator<Item = &'a str>,
    ) -> Result<usize, String> {
        match &self.guest {
            None if names.len() == 1 => Ok(0),
            None => Err(format!(
                "--gdb {}: there are {} guests; name one: --gdb NAME={}",
                self.port,
                names.len(),
                self.port
            )),
            Some(want) => names
                .position(|n| n == want)
                .ok_or_else(|| format!("--gdb {want}={}: no guest is named {want:?}", self.port)),
        }
    }
}

/// One debugged guest: the listening socket until the guest starts, then
/// the stop/resume state its vCPUs and the gdb thread share.
pub struct Debugger {
    name: String,
    control: Arc<Control>,
    mem: GuestMem,
    listener: std::sync::Mutex<Option<TcpListener>>,
    addr: SocketAddr,
    /// The guest's image, for the attach command the log shows.
    kernel: std::path::PathBuf,
}

/// Why `--gdb` could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GdbError {
    #[error("{0}")]
    Usage(String),
    #[error("--gdb: cannot listen on {addr}: {source} (pick another port)")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl Debugger {
    /// Listens on 127.0.0.1:`port` for gdb (only local clients: the stub
    /// reads and writes the guest's memory).
    pub fn listen(
        name: &str,
        kernel: &std::path::Path,
        port: u16,
        vcpus: u32,
        mem: GuestMem,
    ) -> Result<Self, GdbError> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener =
            TcpListener::bind(addr).map_err(|source| GdbError::Listen { addr, source })?;
        let addr = listener.local_addr().unwrap_or(addr);
        Ok(Self {
            name: name.to_owned(),
            control: Arc::new(Control::new(vcpus)),
            mem,
            listener: std::sync::Mutex::new(Some(listener)),
            addr,
            kernel: kernel.to_path_buf(),
        })
    }

    /// Where gdb connects.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Debugger {
    /// Writes the trap frame back to guest-physical `gpa`.
    fn write_frame(&self, gpa: u64, f: &frame::Frame) {
        if let Err(e) = self.mem.write_slice(&f.to_bytes(), GuestAddress(gpa)) {
            warn!(guest = %self.name, "gdb: writing the trap frame at {gpa:#x}: {e}");
        }
    }
}

impl Mechanism for Debugger {
    fn name(&self) -> &'static str {
        "gdb"
    }

    /// Tells the guest a debugger takes its ring-3 debug traps.
    fn offer(&self) -> Option<Offer> {
        Some(Offer {
            feature: features::DEBUG_TRAPS,
            leaf: LEAF_DEBUG,
            regs: [debug_frame::VERSION, debug_frame::BYTES as u32, 0, 0],
        })
    }

    fn calls(&self) -> &'static [Call] {
        &[Call::DebugTrap]
    }

    /// A ring-3 #DB or #BP the guest forwards: RBX = its trap frame
    /// (guest-physical). Checked before anything is believed: the frame must
    /// be 8-aligned and in RAM, say ring 3 and vector 1 or 3.
    fn hypercall(&self, cx: &CallCtx<'_>, _call: Call, arg: u64) -> u64 {
        let vcpu = cx.vcpu.index;
        let mut frame = match frame::checked(&self.mem, arg) {
            Ok(f) => f,
            Err(why) => {
                cx.platform.reject(
                    Reject::DebugBadFrame,
                    format_args!("debug trap frame at {arg:#x}: {why}"),
                );
                return Status::BadArgument as u64;
            }
        };
        let vector = frame.vector();
        let tf = frame.0[debug_frame::RFLAGS] & frame::TF != 0;
        let rip = frame.rip();
        // The frame is put right before gdb hears of the stop: no step's TF
        // left, RIP back on a breakpoint's int3.
        let fix = |clear_tf: bool, rewind: bool| {
            if clear_tf {
                frame.end_step();
            }
            if rewind {
                frame.set_rip(frame.rip().wrapping_sub(1));
            }
            if clear_tf || rewind {
                self.write_frame(arg, &frame);
            }
        };
        match self.control.debug_trap(vcpu, arg, vector, rip, tf, fix) {
            control::Trap::Refused => {
                cx.platform.reject(
                    Reject::UnknownHypercall,
                    format_args!("debug trap on vCPU {vcpu}: no debugger attached"),
                );
                return Status::UnknownCall as u64;
            }
            control::Trap::Stopped { .. }
            | control::Trap::Overtaken { .. }
            | control::Trap::Stray => {}
        }
        // The vCPU parks in `before_entry` until gdb resumes it.
        Status::Ok as u64
    }

    fn start(&self, vcpus: &[Arc<VcpuShared>]) -> std::io::Result<()> {
        self.control.set_vcpus(vcpus);
        let Some(listener) = crate::sync::lock(&self.listener).take() else {
            return Ok(());
        };
        let target = GuestTarget::new(&self.name, self.control.clone(), self.mem.clone());
        info!(
            guest = %self.name,
            "waiting for gdb on {}: the guest runs once gdb continues; attach with: gdb -ex 'target remote {}' {}",
            self.addr,
            self.addr,
            self.kernel.display()
        );
        std::thread::Builder::new()
            .name(format!("{}-gdb", self.name))
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::Kind::Gdb);
                serve(&listener, target);
            })?;
        Ok(())
    }

    fn before_entry(&self, fd: &mut VcpuFd, vcpu: &VcpuShared) -> bool {
        self.control.before_entry(fd, vcpu.index);
        false
    }

    fn debug_exit(&self, vcpu: &VcpuShared, exception: u32, pc: u64) {
        self.control.debug_exit(vcpu.index, exception, pc);
    }

    fn exited(&self, status: u32) {
        self.control.exited(status);
    }

    fn ending(&self) {
        self.control.ending();
    }

    fn vcpu_gone(&self, vcpu: u32) {
        self.control.vcpu_gone(vcpu);
    }
}

/// The gdb thread: one session, then the guest runs on its own.
fn serve(listener: &TcpListener, mut target: GuestTarget) {
    let conn = match listener.accept() {
        Ok((c, peer)) => {
            info!(guest = %target.name, %peer, "gdb attached");
            c
        }
        Err(e) => {
            error!(guest = %target.name, "gdb: accept failed ({e}); the guest runs without a debugger");
            detach(&mut target);
            return;
        }
    };
    match GdbStub::new(conn).run_blocking::<EventLoop>(&mut target) {
        Ok(DisconnectReason::Disconnect) => {
            info!(guest = %target.name, "gdb detached; the guest runs on");
        }
        Ok(DisconnectReason::Kill) => {
            info!(guest = %target.name, "gdb asked to kill: stopping the shim as SIGTERM would");
            // The shim's own stop path: its main thread waits for a
            // process-directed SIGINT/SIGTERM.
            // SAFETY: kill and getpid have no memory preconditions.
            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
        }
        Ok(DisconnectReason::TargetExited(_) | DisconnectReason::TargetTerminated(_)) => {
            info!(guest = %target.name, "the guest ended; gdb session closed");
        }
        Err(e) => warn!(guest = %target.name, "gdb session ended: {e}; the guest runs on"),
    }
    detach(&mut target);
}

fn detach(target: &mut GuestTarget) {
    if target.has_planted() {
        // Stop the guest before its int3s go, so that none is hit half
        // removed (a vCPU that hits one meanwhile is rewound onto it).
        target.control.interrupt();
        target.unplant_all();
    }
    target.control.detach();
}

#[cfg(test)]
mod tests {
    use super::GdbSpec;

    /// The `DebugTrap` hypercall as a guest makes it (a real vCPU fd for
    /// the call's context): refused and counted without an attached
    /// debugger or with a bad frame, a stop with the frame otherwise.
    #[test]
    fn debug_trap_calls_are_checked_and_counted() {
        use super::{Debugger, Mechanism, control};
        use crate::counters::{Reject, RejectCounters};
        use crate::devices::serial::{LineWriter, Sink, new_uart};
        use crate::mech::CallCtx;
        use crate::platform::Platform;
        use crate::vcpu::handle::VcpuShared;
        use para_abi::hypercall::{Call, Status, debug_frame as w};
        use std::sync::{Arc, Mutex};
        use vm_memory::{Bytes, GuestAddress};

        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create a VM");
        let fd = vm.create_vcpu(0).expect("create a vCPU");
        let mem = crate::kvm::memory::create("g", 4 << 20).unwrap();
        let rejects = Arc::new(RejectCounters::default());
        let uart = new_uart(LineWriter::new(
            "g",
            Sink::Buffer(Arc::new(Mutex::new(Vec::new()))),
        ));
        let platform = Platform::new("g", uart, rejects.clone());
        let vcpu = Arc::new(VcpuShared::new(0));
        let d = Debugger::listen("g", std::path::Path::new("k"), 0, 1, mem.clone()).unwrap();
        let cx = CallCtx {
            fd: &fd,
            vcpu: &vcpu,
            platform: &platform,
            kvm_exits: &|| 0,
        };
        let call = |arg| d.hypercall(&cx, Call::DebugTrap, arg);
        let mut f = super::frame::Frame([0; w::WORDS]);
        f.0[w::VECTOR] = 3;
        f.0[w::CS] = 0x23;
        f.0[w::RIP] = 0x20_1001;
        f.0[w::RFLAGS] = 0x202;
        mem.write_slice(&f.to_bytes(), GuestAddress(0x8000))
            .unwrap();

        // Misaligned, past RAM: refused as bad frames.
        assert_eq!(call(0x8004), Status::BadArgument as u64);
        assert_eq!(call(4 << 20), Status::BadArgument as u64);
        assert_eq!(rejects.count(Reject::DebugBadFrame), 2);

        // gdb resumed the guest: the trap stops it with that frame, which
        // already has RIP back on the breakpoint's int3 when gdb hears.
        d.control.add_breakpoint(0x20_1000);
        d.control.resume(&[control::Action::Continue]);
        assert_eq!(call(0x8000), Status::Ok as u64);
        assert_eq!(d.control.frame(0), Some(0x8000));
        let stop = d.control.wait_stop(std::time::Duration::ZERO).unwrap();
        assert_eq!(stop.why, control::Why::Breakpoint);
        let mut b = [0u8; w::BYTES];
        mem.read_slice(&mut b, GuestAddress(0x8000)).unwrap();
        assert_eq!(super::frame::Frame::from_bytes(&b).rip(), 0x20_1000);

        // gdb gone: the same call is refused as with no debugger at all.
        d.control.detach();
        assert_eq!(call(0x8000), Status::UnknownCall as u64);
        assert_eq!(rejects.count(Reject::UnknownHypercall), 1);
        assert_eq!(rejects.count(Reject::DebugBadFrame), 2);
    }

    #[test]
    fn a_port_alone_picks_the_only_guest_and_a_name_picks_its_guest() {
        let alone = GdbSpec::parse("1234").unwrap();
        assert_eq!(
            alone,
            GdbSpec {
                guest: None,
                port: 1234
            }
        );
        assert_eq!(alone.pick(["a"].into_iter()), Ok(0));
        let err = alone.pick(["a", "b"].into_iter()).unwrap_err();
        assert!(err.contains("--gdb NAME=1234"), "{err}");

        let named = GdbSpec::parse("b=9").unwrap();
        assert_eq!(named.pick(["a", "b"].into_iter()), Ok(1));
        let err = named.pick(["a", "c"].into_iter()).unwrap_err();
        assert!(err.contains("no guest is named \"b\""), "{err}");
    }

    #[test]
    fn bad_specs_are_refused_with_the_expected_form() {
        for bad in ["", "0", "65536", "x", "=5", "g=", "g=-1"] {
            let err = GdbSpec::parse(bad).unwrap_err();
            assert!(
                err.contains("PORT") || err.contains("empty"),
                "{bad}: {err}"
            );
        }
    }
}
