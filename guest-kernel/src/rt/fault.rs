//! Recovery from faults and panics in ring 3, for the test runner and for
//! code that probes memory: run a closure; if it faults (ring 0 reports the
//! exception and diverts ring 3 here) or panics, come back with the cause.
//!
//! It is a `setjmp`/`longjmp`: what the closure owned when it faulted is
//! leaked, not dropped. Fine for tests; not a general error mechanism.

use crate::linebuf::LineBuf;
use crate::percpu;
use core::fmt::Write;
use core::sync::atomic::Ordering;

/// Callee-saved registers, stack and resume address (layout used by the assembly).
#[repr(C)]
#[derive(Default)]
pub struct JmpBuf {
    regs: [u64; 8],
}

/// How a guarded closure ended early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caught {
    /// A CPU exception, as ring 0 recorded it.
    Fault {
        vector: u64,
        error: u64,
        rip: u64,
        cr2: u64,
    },
    /// A panic, with its message.
    Panic(alloc::string::String),
}

unsafe extern "C" {
    fn exitless_call_with_recovery(
        f: extern "C" fn(*mut u8),
        arg: *mut u8,
        buf: *mut JmpBuf,
    ) -> u64;
    fn exitless_longjmp(buf: *const JmpBuf) -> !;
}

struct Ctx<F, R> {
    f: Option<F>,
    r: Option<R>,
}

extern "C" fn trampoline<F: FnOnce() -> R, R>(p: *mut u8) {
    // SAFETY: `catch` passes a pointer to its live `Ctx<F, R>`.
    let ctx = unsafe { &mut *p.cast::<Ctx<F, R>>() };
    if let Some(f) = ctx.f.take() {
        ctx.r = Some(f());
    }
}

static PANIC_MSG: [spin::Mutex<Option<LineBuf<256>>>; crate::abi::MAX_CPUS] =
    [const { spin::Mutex::new(None) }; crate::abi::MAX_CPUS];

/// Runs `f`; returns its result, or how it faulted or panicked.
pub fn catch<R, F: FnOnce() -> R>(f: F) -> Result<R, Caught> {
    let mut ctx = Ctx {
        f: Some(f),
        r: None,
    };
    let mut buf = JmpBuf::default();
    let pc = percpu::current();
    let prev = pc
        .recover
        .swap(core::ptr::from_mut(&mut buf) as u64, Ordering::AcqRel);
    *PANIC_MSG[pc.id()].lock() = None;
    // SAFETY: the assembly saves the callee-saved registers in `buf` and calls
    // the trampoline with `ctx`; both outlive the call.
    let jumped = unsafe {
        exitless_call_with_recovery(
            trampoline::<F, R>,
            core::ptr::from_mut(&mut ctx).cast(),
            &raw mut buf,
        )
    };
    pc.recover.store(prev, Ordering::Release);
    if jumped == 0 {
        return ctx
            .r
            .ok_or_else(|| Caught::Panic("closure did not run".into()));
    }
    if let Some(msg) = PANIC_MSG[pc.id()].lock().take() {
        return Err(Caught::Panic(
            alloc::string::String::from_utf8_lossy(msg.as_bytes()).into_owned(),
        ));
    }
    Err(Caught::Fault {
        vector: pc.fault.vector.load(Ordering::Relaxed),
        error: pc.fault.error.load(Ordering::Relaxed),
        rip: pc.fault.rip.load(Ordering::Relaxed),
        cr2: pc.fault.cr2.load(Ordering::Relaxed),
    })
}

/// Called by the panic handler in ring 3: when a [`catch`] is active on this
/// CPU, records the message and jumps back to it; otherwise returns.
pub fn recover_from_panic(info: &core::panic::PanicInfo<'_>) {
    let pc = percpu::current();
    let buf = pc.recover.load(Ordering::Acquire);
    if buf == 0 {
        return;
    }
    let mut msg = LineBuf::<256>::new();
    let _ = write!(msg, "{}", info.message());
    if let Some(loc) = info.location() {
        let _ = write!(msg, " at {}:{}", loc.file(), loc.line());
    }
    // A panic while this lock is held (inside `catch` itself) cannot happen:
    // the lock is only taken around plain stores.
    *PANIC_MSG[pc.id()].lock() = Some(msg);
    // SAFETY: `buf` is the live JmpBuf of the innermost `catch` on this CPU.
    unsafe { exitless_longjmp(buf as *const JmpBuf) }
}
