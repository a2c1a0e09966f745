//! Per-thread seccomp filters: each kind of shim thread runs under an
//! allow-list of the system calls it makes, installed by the thread itself
//! as it starts (the main thread's once every guest is running). A call
//! outside the list raises SIGSYS in the calling thread; the handler writes
//! one line naming the thread and the call, then ends the shim with
//! [`EXIT_SECCOMP`]. `--seccomp off` leaves every thread unfiltered.
//!
//! Filters are inherited by threads created after them and stack with the
//! ones those threads install, so a thread that starts others (a vCPU thread
//! starts its NIC's worker when the guest sets DRIVER_OK) allows what its
//! children need as well; each child then narrows to its own list.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The shim's exit status after a filter stopped it: 128 + SIGSYS, as a
/// shell reports a process killed by that signal.
pub const EXIT_SECCOMP: i32 = 128 + libc::SIGSYS;

/// The kinds of shim threads, each with its allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// The main thread once every guest runs: waits for them, then reports.
    Main = 1,
    /// A vCPU's run loop (and the NIC worker threads it starts).
    Vcpu,
    /// A doorbell monitor, or the watcher of idle monitors.
    Monitor,
    /// A NIC's worker: virtqueues to switch ports and back.
    Net,
    /// The TAP forwarder.
    Tap,
    /// A VM-queue doorbell worker.
    Vmq,
    /// Small timer threads: the vCPU quantum ticker, the I/O mover, the
    /// deferred upcall stop.
    Helper,
    /// The `--gdb` stub: one TCP connection to gdb.
    Gdb,
    /// The API server (`--api-sock`): accepts and serves its clients.
    Api,
    /// The main thread with `--api-sock`: besides what `Main` does, it
    /// builds, starts and frees guests at run time.
    Control,
}

impl Kind {
    /// Every kind, in number order.
    pub const ALL: [Self; 10] = [
        Self::Main,
        Self::Vcpu,
        Self::Monitor,
        Self::Net,
        Self::Tap,
        Self::Vmq,
        Self::Helper,
        Self::Gdb,
        Self::Api,
        Self::Control,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Vcpu => "vcpu",
            Self::Monitor => "monitor",
            Self::Net => "net",
            Self::Tap => "tap",
            Self::Vmq => "vmq",
            Self::Helper => "helper",
            Self::Gdb => "gdb",
            Self::Api => "api",
            Self::Control => "control",
        }
    }

    const fn from_raw(raw: u8) -> Option<Self> {
        Some(match raw {
            1 => Self::Main,
            2 => Self::Vcpu,
            3 => Self::Monitor,
            4 => Self::Net,
            5 => Self::Tap,
            6 => Self::Vmq,
            7 => Self::Helper,
            8 => Self::Gdb,
            9 => Self::Api,
            10 => Self::Control,
            _ => return None,
        })
    }

    /// The system calls this kind of thread may make.
    fn allowed(self) -> Vec<i64> {
        let mut calls = EVERY_THREAD.to_vec();
        let own: &[i64] = match self {
            Self::Main => {
                // Stopping a guest (`--end-on-failure`) closes its upcalls,
                // which starts their stop watchdog from this thread.
                calls.extend_from_slice(SPAWN);
                MAIN
            }
            Self::Vcpu => {
                // A vCPU thread starts its NIC's worker: the worker's calls
                // pass this filter as well as its own.
                calls.extend_from_slice(NET);
                calls.extend_from_slice(SPAWN);
                VCPU
            }
            Self::Monitor => MONITOR,
            Self::Net => NET,
            Self::Tap => {
                // It delivers frames into guests' RX rings on its own thread
                // (run to completion): a NIC worker's calls, for the MSIs and
                // upcall kicks that follow.
                calls.extend_from_slice(NET);
                TAP
            }
            Self::Vmq => VMQ,
            Self::Helper => HELPER,
            Self::Gdb => GDB,
            Self::Api => API,
            Self::Control => {
                // It starts vCPU threads (and their NIC workers), monitors
                // and helpers: their calls pass this filter too.
                for list in [MAIN, VCPU, NET, MONITOR, HELPER, SPAWN] {
                    calls.extend_from_slice(list);
                }
                CONTROL
            }
        };
        calls.extend_from_slice(own);
        calls.sort_unstable();
        calls.dedup();
        calls
    }
}

/// What every thread does: memory (the allocator), locks, its own signal
/// mask and alternate stack, logging to stderr, eventfd reads and writes,
/// time, affinity (pinning, and std reading it at thread start), and ending.
/// Found, like every list here, with `strace -f` on the shim legs of
/// `cargo xtask test` (each thread's calls after it installs its filter).
const EVERY_THREAD: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    // A thread's malloc may share the main arena (glibc caps the arenas at
    // 8 per CPU), which grows with brk.
    libc::SYS_brk,
    // std seeds HashMaps per thread.
    libc::SYS_getrandom,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setaffinity,
    libc::SYS_getcpu,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    // Duplicating eventfds (`try_clone`) and file-status flags only (see
    // [`conditions`]).
    libc::SYS_fcntl,
    // Read-only (see [`conditions`]): glibc's malloc reads
    // /sys/devices/system/cpu/online when a thread first allocates, and
    // /proc/sys/vm/overcommit_memory the first time `free` shrinks a thread
    // arena's heap, which any thread may do once a burst of frames is freed
    // (the `hostile` leg's floods made a doorbell monitor do it).
    libc::SYS_openat,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Starting a thread (std's `thread::Builder::spawn`): the starter's clone3,
/// and the new thread's set-up before its own filter is on, including the
/// installation of that filter. `prctl` and `seccomp` are allowed only for
/// that (see [`conditions`]).
const SPAWN: &[i64] = &[
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_seccomp,
];

/// Argument conditions of the calls allowed only in part: `prctl` naming the
/// thread or setting no-new-privileges, and `seccomp` adding a filter (which
/// can only narrow what is allowed), `openat` read-only outside the main
/// thread. Any other call of theirs traps.
/// `KVM_SET_GSI_ROUTING` (linux/kvm.h: `_IOW(KVMIO, 0x6a, struct
/// kvm_irq_routing)`, an 8-byte header).
const KVM_SET_GSI_ROUTING: u64 = (1 << 30) | (8 << 16) | (0xAE << 8) | 0x6a;
/// `KVM_SIGNAL_MSI` (linux/kvm.h: `_IOW(KVMIO, 0xa5, struct kvm_msi)`, 32
/// bytes): a VM-queue arrival's MSI where the guest takes no upcalls.
const KVM_SIGNAL_MSI: u64 = (1 << 30) | (32 << 16) | (0xAE << 8) | 0xa5;

fn conditions(kind: Kind, nr: i64) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    // One rule per value: the call passes when argument `arg` is any of them.
    let arg_is = |arg: u8, values: &[u64]| -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        values
            .iter()
            .map(|&v| {
                SeccompRule::new(vec![SeccompCondition::new(
                    arg,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    v,
                )?])
            })
            .collect()
    };
    let first_arg_is = |values: &[u64]| arg_is(0, values);
    match nr {
        libc::SYS_prctl => {
            first_arg_is(&[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64])
        }
        libc::SYS_seccomp => first_arg_is(&[u64::from(libc::SECCOMP_SET_MODE_FILTER)]),
        libc::SYS_fcntl => [
            libc::F_DUPFD_CLOEXEC,
            libc::F_GETFD,
            libc::F_SETFD,
            libc::F_GETFL,
            libc::F_SETFL,
        ]
        .iter()
        .map(|&cmd| {
            SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                u64::from(cmd.unsigned_abs()),
            )?])
        })
        .collect(),
        // Main opens the stats JSON for writing (and Control guests' memory
        // and kernel files): only the other kinds are limited to read-only
        // opens.
        // Threads that run a NIC's RX or TX work (NIC workers, doorbell
        // monitors running to completion, the TAP forwarder delivering into a
        // guest's ring) fire its MSIs: a route the guest changed while the
        // rate limit held it back is synced then, with this one ioctl.
        libc::SYS_ioctl if matches!(kind, Kind::Net | Kind::Tap) => {
            arg_is(1, &[KVM_SET_GSI_ROUTING])
        }
        // A monitor also drains VM-queue outboxes for doorbell events (run
        // to completion): an arrival is an MSI where the guest takes no upcalls.
        libc::SYS_ioctl if kind == Kind::Monitor => {
            arg_is(1, &[KVM_SET_GSI_ROUTING, KVM_SIGNAL_MSI])
        }
        libc::SYS_openat if !matches!(kind, Kind::Main | Kind::Control) => {
            Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
            )?])?])
        }
        _ => Ok(Vec::new()),
    }
}

/// The main thread once every guest runs: it waits for a stop signal or the
/// end of every guest, kicks vCPUs, joins threads, measures its RSS and
/// writes the stats JSON.
const MAIN: &[i64] = &[
    libc::SYS_rt_sigtimedwait,
    libc::SYS_tgkill,
    libc::SYS_getrusage,
    libc::SYS_openat,
];

/// A vCPU's loop: KVM ioctls and binary statistics, kicks of other vCPUs,
/// the VM-queue page exchanges (a spare memfd, mmap MAP_FIXED, hole
/// punching) and device activation (eventfds for the NIC worker it starts).
const VCPU: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_pread64,
    libc::SYS_tgkill,
    libc::SYS_fallocate,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_eventfd2,
];

/// A doorbell monitor: epoll over its kick eventfds, its own scheduling
/// class (idle while it spins), and the watcher's changes of the monitors'.
const MONITOR: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_sched_setscheduler,
    libc::SYS_tgkill,
    // KVM_SET_GSI_ROUTING and KVM_SIGNAL_MSI only (see [`conditions`]).
    libc::SYS_ioctl,
    // The VM-queue page exchanges of a doorbell-policy drain, as a vCPU's.
    libc::SYS_fallocate,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
];

/// A NIC worker: epoll over its notify, doorbell, port and stop eventfds;
/// kicks of a vCPU for an upcall.
const NET: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_tgkill,
    // KVM_SET_GSI_ROUTING only (see [`conditions`]).
    libc::SYS_ioctl,
];

/// The TAP forwarder: reads and writes the TAP fd, epoll over it, the
/// switch port and its stop eventfd.
const TAP: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
];

/// A VM-queue doorbell worker: waits on its eventfd and drains outboxes as a
/// vCPU does (page exchanges, MSIs, kicks).
const VMQ: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_tgkill,
    libc::SYS_fallocate,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
];

/// Timer threads: sleep, then kick vCPUs or move threads.
const HELPER: &[i64] = &[
    libc::SYS_tgkill,
    // The notify benchmark's ioeventfd observer waits in poll(2), 100 ms at
    // a time, so that it notices the benchmark's end.
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// The gdb stub: accepts one connection, reads it (peeking without
/// blocking: `FIONBIO`) and writes it, kicks vCPUs to stop them, and sends
/// the shim SIGTERM when gdb asks to kill the guest.
const GDB: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_ioctl,
    libc::SYS_tgkill,
    libc::SYS_kill,
];

/// The API thread: its runtime's epoll, accepting and serving clients over
/// the Unix socket (created and bound before the filter).
const API: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_writev,
    libc::SYS_shutdown,
    // Waking the main thread for a queued command (`mainwake`).
    libc::SYS_tgkill,
    // glibc reads /proc/sys/vm/overcommit_memory when it shrinks a thread's
    // malloc arena (after a burst of clients ends): read-only opens only.
    libc::SYS_openat,
];

/// What the main thread adds with `--api-sock`, where it assembles a guest
/// at run time as it does the command line's before any filter: KVM's VM and
/// vCPU ioctls, guest memory (memfd), the kernel image, eventfds and
/// ioeventfds, its own NIC workers' and monitors' set-up.
const CONTROL: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_openat,
    libc::SYS_statx,
    // std's fallback where statx is missing.
    libc::SYS_fstat,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    // The vCPU kick handler, installed once per guest built.
    libc::SYS_rt_sigaction,
    // Whether a new guest's monitors may spin at idle priority.
    libc::SYS_geteuid,
    libc::SYS_getrlimit,
    // The API socket, removed at shutdown.
    libc::SYS_unlink,
];

/// Whether filters are installed. Off until the binary turns it on from
/// `--seccomp` (on by default there): tests that drive the library in their
/// own process keep their harness unfiltered.
static ENABLED: AtomicBool = AtomicBool::new(false);
static HANDLER: Once = Once::new();

thread_local! {
    /// The kind of the calling thread's filter, for the SIGSYS report.
    /// Const-initialised without destructor: a plain TLS access, safe in a
    /// signal handler.
    static KIND: Cell<u8> = const { Cell::new(0) };
    /// The thread's name (first 31 bytes), for the same report.
    static NAME: Cell<[u8; 32]> = const { Cell::new([0; 32]) };
}

/// Turns filtering on or off for the threads that start after this call.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

#[must_use]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {0} filter: {1}")]
    Build(&'static str, String),
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("installing the {0} filter: {1}")]
    Install(&'static str, seccompiler::Error),
}

/// The BPF program of `kind`'s allow-list: allow what is listed, trap the rest.
pub fn program(kind: Kind) -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = kind
        .allowed()
        .into_iter()
        .map(|nr| Ok((nr, conditions(kind, nr)?)))
        .collect::<Result<_, seccompiler::BackendError>>()
        .map_err(|e| SeccompError::Build(kind.name(), e.to_string()))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(kind.name(), e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| SeccompError::Build(kind.name(), e.to_string()))
}

/// Puts the calling thread under `kind`'s filter (nothing with `--seccomp off`).
pub fn install(kind: Kind) -> Result<(), SeccompError> {
    if !enabled() {
        return Ok(());
    }
    install_handler()?;
    let prog = program(kind)?;
    KIND.set(kind as u8);
    let mut name = [0u8; 32];
    if let Some(n) = std::thread::current().name() {
        let n = n.as_bytes();
        let len = n.len().min(31);
        name[..len].copy_from_slice(&n[..len]);
    }
    NAME.set(name);
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Install(kind.name(), e))
}

/// [`install`], or end the shim: a thread that should be filtered never runs
/// unfiltered.
pub fn install_or_exit(kind: Kind) {
    if let Err(e) = install(kind) {
        eprintln!("host-shim: seccomp: {e}");
        std::process::exit(EXIT_SECCOMP);
    }
}

/// `--seccomp-selftest KIND` (hidden, for the tests): a thread named
/// `selftest` under `kind`'s filter calls socket(2), which no list allows.
/// With filters on, the SIGSYS report ends the process with [`EXIT_SECCOMP`];
/// with `--seccomp off` the call goes through, and the process says so and
/// exits 0.
pub fn selftest(kind: &str) -> ! {
    let Some(kind) = Kind::ALL.into_iter().find(|k| k.name() == kind) else {
        eprintln!("host-shim: --seccomp-selftest: no filter kind `{kind}`");
        std::process::exit(2);
    };
    let thread = std::thread::Builder::new()
        .name("selftest".into())
        .spawn(move || {
            install_or_exit(kind);
            // SAFETY: socket(2) with constant arguments; the fd, if any, is
            // closed below.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            if fd >= 0 {
                // SAFETY: `fd` was just opened by this thread.
                unsafe { libc::close(fd) };
            }
            fd
        });
    if let Ok(Ok(fd)) = thread.map(std::thread::JoinHandle::join) {
        println!("seccomp selftest: socket() returned {fd}: no filter stopped it");
        std::process::exit(0);
    }
    eprintln!("host-shim: --seccomp-selftest: the thread failed");
    std::process::exit(1);
}

fn install_handler() -> Result<(), SeccompError> {
    let mut result = Ok(());
    HANDLER.call_once(|| {
        // SAFETY: a zeroed sigaction is valid to fill in; the handler is an
        // `extern "C"` function of the SA_SIGINFO signature that only makes
        // async-signal-safe calls (write, _exit).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsys as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&raw mut sa.sa_mask);
            libc::sigaction(libc::SIGSYS, &raw const sa, std::ptr::null_mut())
        };
        if rc != 0 {
            result = Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    });
    result
}

/// A fixed buffer that a signal handler can format into without allocating.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The report line for a call `nr` refused to a thread of `kind` named `name`.
fn report(kind: Option<Kind>, name: &[u8], nr: i64) -> Line {
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"host-shim: seccomp: thread ");
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    line.push(if end == 0 { b"?" } else { &name[..end] });
    line.push(b" (");
    line.push(kind.map_or("inherited", Kind::name).as_bytes());
    line.push(b" filter) made system call ");
    line.push(syscall_name(nr).as_bytes());
    line.push(b" (");
    line.push_number(nr.unsigned_abs());
    line.push(b"), which its filter does not allow: stopping the shim\n");
    line
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The kernel's SIGSYS siginfo (asm-generic/siginfo.h, `_sigsys`): after
    // signo, errno and code (12 bytes, padded to 16), a pointer to the
    // calling instruction, then the system call number as an int.
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let kind = Kind::from_raw(KIND.get());
    let name = NAME.get();
    let line = report(kind, &name, i64::from(nr));
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is valid
    // for `len` bytes.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_SECCOMP);
    }
}

/// Names of the calls the lists mention and a few that a bug might make.
fn syscall_name(nr: i64) -> &'static str {
    const NAMES: &[(i64, &str)] = &[
        (libc::SYS_read, "read"),
        (libc::SYS_write, "write"),
        (libc::SYS_open, "open"),
        (libc::SYS_openat, "openat"),
        (libc::SYS_close, "close"),
        (libc::SYS_fstat, "fstat"),
        (libc::SYS_newfstatat, "newfstatat"),
        (libc::SYS_statx, "statx"),
        (libc::SYS_lseek, "lseek"),
        (libc::SYS_pread64, "pread64"),
        (libc::SYS_readv, "readv"),
        (libc::SYS_writev, "writev"),
        (libc::SYS_mmap, "mmap"),
        (libc::SYS_munmap, "munmap"),
        (libc::SYS_mremap, "mremap"),
        (libc::SYS_mprotect, "mprotect"),
        (libc::SYS_madvise, "madvise"),
        (libc::SYS_brk, "brk"),
        (libc::SYS_ioctl, "ioctl"),
        (libc::SYS_fcntl, "fcntl"),
        (libc::SYS_futex, "futex"),
        (libc::SYS_clone, "clone"),
        (libc::SYS_clone3, "clone3"),
        (libc::SYS_fork, "fork"),
        (libc::SYS_execve, "execve"),
        (libc::SYS_kill, "kill"),
        (libc::SYS_tgkill, "tgkill"),
        (libc::SYS_socket, "socket"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_getpid, "getpid"),
        (libc::SYS_gettid, "gettid"),
        (libc::SYS_getppid, "getppid"),
        (libc::SYS_getuid, "getuid"),
        (libc::SYS_prctl, "prctl"),
        (libc::SYS_eventfd2, "eventfd2"),
        (libc::SYS_epoll_create1, "epoll_create1"),
        (libc::SYS_epoll_ctl, "epoll_ctl"),
        (libc::SYS_epoll_wait, "epoll_wait"),
        (libc::SYS_epoll_pwait, "epoll_pwait"),
        (libc::SYS_poll, "poll"),
        (libc::SYS_ppoll, "ppoll"),
        (libc::SYS_fallocate, "fallocate"),
        (libc::SYS_memfd_create, "memfd_create"),
        (libc::SYS_ftruncate, "ftruncate"),
        (libc::SYS_rt_sigaction, "rt_sigaction"),
        (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
        (libc::SYS_rt_sigtimedwait, "rt_sigtimedwait"),
        (libc::SYS_sched_setaffinity, "sched_setaffinity"),
        (libc::SYS_sched_getaffinity, "sched_getaffinity"),
        (libc::SYS_getcpu, "getcpu"),
        (libc::SYS_getrusage, "getrusage"),
        (libc::SYS_getrandom, "getrandom"),
        (libc::SYS_set_robust_list, "set_robust_list"),
        (libc::SYS_rseq, "rseq"),
        (libc::SYS_seccomp, "seccomp"),
        (libc::SYS_uname, "uname"),
        (libc::SYS_exit, "exit"),
        (libc::SYS_exit_group, "exit_group"),
    ];
    NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map_or("(unnamed)", |(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_builds_and_vcpus_allow_what_their_net_workers_need() {
        for kind in Kind::ALL {
            assert!(!program(kind).unwrap().is_empty(), "{kind:?}");
            assert_eq!(Kind::from_raw(kind as u8), Some(kind));
        }
        let vcpu = Kind::Vcpu.allowed();
        assert!(Kind::Net.allowed().iter().all(|c| vcpu.contains(c)));
        // Threads that start others (main stops guests, whose upcalls start
        // a watchdog) allow what a new thread does before its own filter,
        // and everyone lets glibc's malloc open its /proc and /sys files.
        for kind in [Kind::Main, Kind::Vcpu] {
            let calls = kind.allowed();
            assert!(SPAWN.iter().all(|c| calls.contains(c)), "{kind:?}");
        }
        for kind in [Kind::Monitor, Kind::Net, Kind::Tap, Kind::Vmq, Kind::Helper] {
            assert!(kind.allowed().contains(&libc::SYS_openat), "{kind:?}");
        }
        // The starters' own lists never allow starting programs or sockets.
        for kind in [Kind::Main, Kind::Vcpu, Kind::Net, Kind::Api, Kind::Control] {
            let calls = kind.allowed();
            for forbidden in [libc::SYS_execve, libc::SYS_socket, libc::SYS_fork] {
                assert!(!calls.contains(&forbidden), "{kind:?} allows {forbidden}");
            }
        }
    }

    #[test]
    fn the_report_names_thread_filter_and_call() {
        let mut name = [0u8; 32];
        name[..9].copy_from_slice(b"g0-vcpu0\0");
        let line = report(Some(Kind::Vcpu), &name, libc::SYS_socket);
        let text = std::str::from_utf8(&line.buf[..line.len]).unwrap();
        assert_eq!(
            text,
            "host-shim: seccomp: thread g0-vcpu0 (vcpu filter) made system call socket (41), \
             which its filter does not allow: stopping the shim\n"
        );
    }
}
