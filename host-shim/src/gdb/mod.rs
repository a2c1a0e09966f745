//! `--gdb`: a gdb remote-protocol stub for one guest.
//!
//! The shim listens on a TCP port before the guest starts; the guest's vCPUs
//! park before their first instruction until gdb attaches and continues.
//! [`control`] stops and resumes vCPUs (each vCPU's fd stays on its own
//! thread), [`target`] is the guest as `gdbstub` sees it, and [`Debugger`]
//! joins them to the vCPU loop as a [`Mechanism`] (offered to nobody: the
//! guest is not told it is debugged).
//!
//! Breakpoints are hardware ones, in the vCPUs' debug registers
//! (`KVM_GUESTDBG_USE_HW_BP`): at most four at a time, for `break` and
//! `hbreak` alike. Software breakpoints (int3 planted in guest memory) would
//! have no limit, but the KVM this shim runs on does not hand a guest's int3
//! to the host when asked to (`KVM_GUESTDBG_USE_SW_BP`): the guest takes the
//! #BP and dies. Debug registers work the same on every KVM, and leave guest
//! memory untouched.

pub mod control;
pub mod target;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use gdbstub::stub::{DisconnectReason, GdbStub};
use kvm_ioctls::VcpuFd;
use tracing::{error, info, warn};

use crate::kvm::memory::GuestMem;
use crate::mech::Mechanism;
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

impl Mechanism for Debugger {
    fn name(&self) -> &'static str {
        "gdb"
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
            detach(&target);
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
    detach(&target);
}

fn detach(target: &GuestTarget) {
    target.control.detach();
}

#[cfg(test)]
mod tests {
    use super::GdbSpec;

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
