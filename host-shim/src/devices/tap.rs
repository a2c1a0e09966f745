//! A host TAP device as one more port of the switch, so that Linux programs on the
//! host can talk to the guests.
//!
//! The device is opened (and created when missing) through `/dev/net/tun` with
//! `TUNSETIFF`, `IFF_TAP | IFF_NO_PI`: every `read`/`write` is one bare Ethernet
//! frame (Linux `Documentation/networking/tuntap.rst`). Creating one needs
//! `CAP_NET_ADMIN`. The shim does not configure it: the user brings it up and
//! gives it an address (`ip link set NAME up`, `ip addr add ... dev NAME`).
//!
//! One thread moves frames both ways. Frames from the TAP are host input: runts and
//! oversized frames are dropped and counted, never forwarded.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use tracing::{info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::counters::Tally;
use crate::devices::net::MAX_FRAME;
use crate::devices::switch::{MIN_FRAME, Port, Switch};
use crate::reasons;
use crate::report::TapReport;

/// `IFNAMSIZ` (Linux `include/uapi/linux/if.h`): interface names are at most 15 bytes.
const IFNAMSIZ: usize = 16;
/// `IFF_TAP` and `IFF_NO_PI` (Linux `include/uapi/linux/if_tun.h`).
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;

// TUNSETIFF = _IOW('T', 202, int) (Linux `include/uapi/linux/if_tun.h`).
vmm_sys_util::ioctl_iow_nr!(TUNSETIFF, u32::from(b'T'), 202, libc::c_int);

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then `ifr_flags` in the union
/// (40 bytes on 64-bit Linux, `include/uapi/linux/if.h`).
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} must be 1..=15 bytes of [A-Za-z0-9_.-]")]
    BadName(String),
    #[error("opening /dev/net/tun failed: {0}")]
    Open(std::io::Error),
    #[error("TUNSETIFF {name} failed (creating a TAP needs CAP_NET_ADMIN): {source}")]
    SetIff {
        name: String,
        source: std::io::Error,
    },
    #[error("TAP {name}: {source}")]
    Io {
        name: String,
        source: std::io::Error,
    },
}

/// Checks a TAP name: what `ip link` accepts, minus the characters that would make
/// it a path or a pattern (`dev_valid_name` in Linux `net/core/dev.c`).
pub fn check_name(name: &str) -> Result<(), TapError> {
    let ok = !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(TapError::BadName(name.to_owned()))
    }
}

reasons! {
    /// Why a frame from the TAP was dropped (`tap.dropped`).
    pub TapDrop {
        TooShort => "too_short",
        TooLong => "too_long",
        WriteFailed => "write_failed",
    }
}

/// Checks the length of a frame read from the TAP. `read` is what `read(2)` returned
/// into a buffer of `MAX_FRAME + 1` bytes: filling it means the frame was longer
/// (a TAP read truncates to the buffer).
pub fn check_frame(read: usize) -> Result<(), TapDrop> {
    if read < MIN_FRAME {
        Err(TapDrop::TooShort)
    } else if read > MAX_FRAME {
        Err(TapDrop::TooLong)
    } else {
        Ok(())
    }
}

#[derive(Debug, Default)]
pub struct TapCounters {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub dropped: Tally<TapDrop>,
}

/// Opens (creating if missing) the TAP device `name`, non-blocking.
pub fn open(name: &str) -> Result<File, TapError> {
    check_name(name)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::Open)?;
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `file` is an open /dev/net/tun; `req` is a valid, NUL-terminated ifreq
    // that outlives the call; TUNSETIFF reads and writes only within it.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) };
    if rc < 0 {
        return Err(TapError::SetIff {
            name: name.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(file)
}

/// A TAP device attached to a switch port, with its forwarding thread.
pub struct Tap {
    pub name: String,
    pub counters: Arc<TapCounters>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Tap {
    /// Opens `name` and starts forwarding between it and a new port of `switch`.
    pub fn attach(name: &str, switch: &Arc<Switch>) -> Result<Self, TapError> {
        let file = open(name)?;
        let io = |source| TapError::Io {
            name: name.to_owned(),
            source,
        };
        let (index, port) = switch.add_port(&format!("tap:{name}")).map_err(io)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
        let counters = Arc::new(TapCounters::default());
        let fwd = Forwarder {
            name: name.to_owned(),
            file,
            switch: switch.clone(),
            index,
            port,
            counters: counters.clone(),
            stop: stop.try_clone().map_err(io)?,
        };
        let thread = std::thread::Builder::new()
            .name(format!("tap-{name}"))
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::Kind::Tap);
                fwd.run();
            })
            .map_err(io)?;
        info!(tap = name, port = index, "TAP attached to the switch");
        Ok(Self {
            name: name.to_owned(),
            counters,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the forwarding thread and reports.
    #[must_use]
    pub fn finish(mut self) -> TapReport {
        self.stop_thread();
        let c = &self.counters;
        TapReport {
            name: self.name.clone(),
            rx_packets: c.rx_packets.load(Ordering::Relaxed),
            rx_bytes: c.rx_bytes.load(Ordering::Relaxed),
            tx_packets: c.tx_packets.load(Ordering::Relaxed),
            tx_bytes: c.tx_bytes.load(Ordering::Relaxed),
            dropped: c.dropped.all(),
        }
    }

    fn stop_thread(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

struct Forwarder {
    name: String,
    file: File,
    switch: Arc<Switch>,
    index: usize,
    port: Arc<Port>,
    counters: Arc<TapCounters>,
    stop: EventFd,
}

const T_TAP: u64 = 0;
const T_PORT: u64 = 1;
const T_STOP: u64 = 2;
impl Forwarder {
    fn run(mut self) {
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                warn!(tap = %self.name, "epoll_create: {e}; TAP stays silent");
                return;
            }
        };
        for (fd, t) in [
            (self.file.as_raw_fd(), T_TAP),
            (self.port.ready.as_raw_fd(), T_PORT),
            (self.stop.as_raw_fd(), T_STOP),
        ] {
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, t)) {
                warn!(tap = %self.name, "epoll_ctl: {e}; TAP stays silent");
                return;
            }
        }
        let mut buf = vec![0u8; MAX_FRAME + 1];
        let mut events = [EpollEvent::default(); 4];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(tap = %self.name, "epoll_wait: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    T_STOP => return,
                    T_TAP => self.forward_host_frames(&mut buf),
                    _ => {
                        let _ = self.port.ready.read();
                        self.write_guest_frames();
                    }
                }
            }
        }
    }

    fn dropped(&self, why: TapDrop, len: usize) {
        let d = &self.counters.dropped;
        d.bump(why);
        crate::guest_log!(warn, limit = d.limit(why), tap = %self.name, reason = why.name(), len, "dropped a TAP frame");
    }

    /// Reads every frame the host has queued and sends it into the switch.
    fn forward_host_frames(&mut self, buf: &mut [u8]) {
        loop {
            match self.file.read(buf) {
                Ok(n) => match check_frame(n) {
                    Ok(()) => {
                        self.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
                        self.counters
                            .rx_bytes
                            .fetch_add(n as u64, Ordering::Relaxed);
                        self.switch.send(self.index, &buf[..n]);
                    }
                    Err(why) => self.dropped(why, n),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EIO while the interface is down, for instance: nothing to read.
                    warn!(tap = %self.name, "read: {e}");
                    return;
                }
            }
        }
    }

    /// Writes the frames the switch has for the host.
    fn write_guest_frames(&mut self) {
        while let Some(frame) = self.port.pop() {
            // A TAP write takes the whole frame or fails (tuntap.rst: one write, one frame).
            match self.file.write(&frame) {
                Ok(n) if n == frame.len() => {
                    self.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .tx_bytes
                        .fetch_add(frame.len() as u64, Ordering::Relaxed);
                }
                // EIO while the interface is down; EAGAIN when its queue is full.
                Ok(_) | Err(_) => self.dropped(TapDrop::WriteFailed, frame.len()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("tap0").is_ok());
        assert!(check_name("exitless-tap.1").is_ok());
        assert!(check_name("123456789012345").is_ok());
        for bad in [
            "",
            "1234567890123456",
            "a/b",
            "a b",
            "..",
            ".",
            "tap%d",
            "t\0",
        ] {
            assert!(
                matches!(check_name(bad), Err(TapError::BadName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn frame_lengths_are_checked() {
        assert_eq!(check_frame(0), Err(TapDrop::TooShort));
        assert_eq!(check_frame(MIN_FRAME - 1), Err(TapDrop::TooShort));
        assert_eq!(check_frame(MIN_FRAME), Ok(()));
        assert_eq!(check_frame(1514), Ok(()));
        assert_eq!(check_frame(MAX_FRAME), Ok(()));
        assert_eq!(check_frame(MAX_FRAME + 1), Err(TapDrop::TooLong));
    }

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(std::mem::offset_of!(IfReq, flags), IFNAMSIZ);
    }

    #[test]
    fn drops_are_counted_by_reason() {
        let c = TapCounters::default();
        c.dropped.bump(TapDrop::TooLong);
        c.dropped.bump(TapDrop::TooLong);
        c.dropped.bump(TapDrop::TooShort);
        assert_eq!(
            (
                c.dropped.count(TapDrop::TooShort),
                c.dropped.count(TapDrop::TooLong),
                c.dropped.count(TapDrop::WriteFailed)
            ),
            (1, 2, 0)
        );
    }
}
