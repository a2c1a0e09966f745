//! Hypercalls: a 32-bit `out` to `para_abi::hypercall::PORT` with the call number in
//! EAX and the arguments in RBX, RCX, RDX, RSI.

use para_abi::hypercall::{Call, Status};

/// What the vCPU loop does with a hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// End this guest with the given status (isa-debug-exit semantics: the guest's outcome).
    Exit(u32),
    /// The guest's application reached main, `guest_us` µs after its PVH entry by its
    /// own TSC; record the time and resume with `Status::Ok`.
    MainReached { guest_us: u64 },
    /// Snapshot the guest's counters under `label` (RBX); resume with `Status::Ok`.
    StatsMark { label: u64 },
    /// Write `len` bytes at guest-physical `gpa` to the guest's console.
    ConsoleWrite { gpa: u32, len: usize },
    /// Any other known call: a mechanism's (M1 benchmark and re-designation, M3,
    /// M4, M5...), for the mechanism of the guest that claims it.
    Mechanism { call: Call, arg: u64 },
    /// Resume the guest with this value in RAX.
    Return(Status),
}

/// Decodes one hypercall. `size` is the `out` operand size; only 32-bit outs are calls.
#[must_use]
pub fn decode(size: usize, rax: u64, rbx: u64) -> Action {
    if size != 4 {
        return Action::Return(Status::BadArgument);
    }
    match Call::from_raw(rax as u32) {
        Some(Call::Exit) => match u32::try_from(rbx) {
            Ok(status) => Action::Exit(status),
            Err(_) => Action::Return(Status::BadArgument),
        },
        Some(Call::MainReached) => Action::MainReached { guest_us: rbx },
        Some(Call::StatsMark) => Action::StatsMark { label: rbx },
        Some(Call::ConsoleWrite) => match para_abi::hypercall::console_decode(rbx) {
            Some((gpa, len)) => Action::ConsoleWrite { gpa, len },
            None => Action::Return(Status::BadArgument),
        },
        // Every other call belongs to a mechanism; the guest's mechanisms say
        // which (`Mechanism::calls`).
        Some(call) => Action::Mechanism { call, arg: rbx },
        None => Action::Return(Status::UnknownCall),
    }
}

/// The answer to a mechanism's call when the guest was not offered that
/// mechanism: a VM-queue flush is only an exit, so it succeeds anyway; every
/// other call is unknown.
#[must_use]
pub const fn unoffered(call: Call) -> Status {
    match call {
        Call::VmqFlush => Status::Ok,
        _ => Status::UnknownCall,
    }
}

/// Whether a call of a mechanism the guest was not offered counts as an
/// `unknown_hypercall` reject: a guest that asks for the benchmark, a
/// control flag or a debugger (a debug trap) without the offer is wrong; one that tries upcalls or a
/// re-designation learns from the status that they are absent.
#[must_use]
pub const fn unoffered_is_counted(call: Call) -> bool {
    matches!(
        call,
        Call::NotifyBench
            | Call::CtrlWrite
            | Call::CtrlRead
            | Call::CtrlSetMasks
            | Call::CtrlQuery
            | Call::DebugTrap
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_carries_status() {
        assert_eq!(decode(4, 1, 0), Action::Exit(0));
        assert_eq!(decode(4, 1, 3), Action::Exit(3));
        // Upper RAX bits are not part of the call number (EAX).
        assert_eq!(decode(4, 0xFFFF_FFFF_0000_0001, 7), Action::Exit(7));
    }

    #[test]
    fn main_reached_carries_the_guest_time() {
        assert_eq!(decode(4, 2, 1234), Action::MainReached { guest_us: 1234 });
        assert_eq!(
            decode(4, 2, u64::MAX),
            Action::MainReached { guest_us: u64::MAX }
        );
        // Not a 32-bit out: not a call.
        assert_eq!(decode(2, 2, 5), Action::Return(Status::BadArgument));
    }

    #[test]
    fn console_write_carries_address_and_length() {
        let arg = para_abi::hypercall::console_arg(0x20_0000, 12);
        assert_eq!(
            decode(4, 28, arg),
            Action::ConsoleWrite {
                gpa: 0x20_0000,
                len: 12
            }
        );
        assert_eq!(
            decode(4, 28, para_abi::hypercall::console_arg(0, 5000)),
            Action::Return(Status::BadArgument)
        );
    }

    #[test]
    fn stats_mark_carries_its_label() {
        assert_eq!(decode(4, 3, 2), Action::StatsMark { label: 2 });
        assert_eq!(decode(2, 3, 2), Action::Return(Status::BadArgument));
        assert_eq!(
            decode(4, 20, 0x5000),
            Action::Mechanism {
                call: Call::NotifyBench,
                arg: 0x5000
            }
        );
    }

    #[test]
    fn upcall_requests_carry_their_argument() {
        assert_eq!(
            decode(4, 8, 3),
            Action::Mechanism {
                call: Call::UpcallPing,
                arg: 3
            }
        );
        assert_eq!(decode(2, 9, 3), Action::Return(Status::BadArgument));
        assert_eq!(
            decode(4, 10, 0),
            Action::Mechanism {
                call: Call::UpcallEnable,
                arg: 0
            }
        );
    }

    #[test]
    fn ctrl_calls_carry_their_argument() {
        assert_eq!(
            decode(4, 4, 0x101),
            Action::Mechanism {
                call: Call::CtrlWrite,
                arg: 0x101
            }
        );
        assert_eq!(decode(1, 7, 0), Action::Return(Status::BadArgument));
    }

    #[test]
    fn vmq_flush_resumes_ok_even_unoffered() {
        assert_eq!(
            decode(4, 12, 0),
            Action::Mechanism {
                call: Call::VmqFlush,
                arg: 0
            }
        );
        assert_eq!(unoffered(Call::VmqFlush), Status::Ok);
        assert!(!unoffered_is_counted(Call::VmqFlush));
        assert_eq!(unoffered(Call::CtrlRead), Status::UnknownCall);
        assert!(unoffered_is_counted(Call::CtrlRead));
        assert!(!unoffered_is_counted(Call::UpcallPing));
        // A debug trap without --gdb: refused and counted.
        assert_eq!(unoffered(Call::DebugTrap), Status::UnknownCall);
        assert!(unoffered_is_counted(Call::DebugTrap));
    }

    #[test]
    fn hostile_calls_are_refused() {
        assert_eq!(decode(4, 0, 0), Action::Return(Status::UnknownCall));
        // A debug trap is a mechanism's call: without --gdb nobody claims it.
        assert_eq!(
            decode(4, 29, 0x8000),
            Action::Mechanism {
                call: Call::DebugTrap,
                arg: 0x8000
            }
        );
        assert_eq!(decode(4, 0xFFFF, 0), Action::Return(Status::UnknownCall));
        assert_eq!(decode(1, 1, 0), Action::Return(Status::BadArgument));
        assert_eq!(decode(4, 1, 1 << 40), Action::Return(Status::BadArgument));
    }
}
