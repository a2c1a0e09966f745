//! Hypercalls: a 32-bit `out` to `para_abi::hypercall::PORT` with the call number in
//! EAX and the arguments in RBX, RCX, RDX, RSI.

use para_abi::hypercall::{Call, Status};

/// What the vCPU loop does with a hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// End this guest with the given status (isa-debug-exit semantics: the guest's outcome).
    Exit(u32),
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
        None => Action::Return(Status::UnknownCall),
    }
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
    fn hostile_calls_are_refused() {
        assert_eq!(decode(4, 0, 0), Action::Return(Status::UnknownCall));
        assert_eq!(decode(4, 0xFFFF, 0), Action::Return(Status::UnknownCall));
        assert_eq!(decode(1, 1, 0), Action::Return(Status::BadArgument));
        assert_eq!(decode(4, 1, 1 << 40), Action::Return(Status::BadArgument));
    }
}
