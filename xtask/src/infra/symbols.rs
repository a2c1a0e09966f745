//! Symbolised panic backtraces: a guest that panics prints one
//! `backtrace: #N 0xADDR` line per frame (return addresses, from its frame
//! pointers); this turns each into `backtrace: #N 0xADDR FUNCTION at
//! FILE:LINE` from the guest image's DWARF, inlined frames included
//! (`A <- B`: A inlined into B).

use std::path::{Path, PathBuf};

/// The prefix the guest prints (`guest_kernel::backtrace::LINE_PREFIX`).
pub const PREFIX: &str = "backtrace: #";

/// One guest image's symbols, loaded when the first backtrace line comes.
pub struct Symbols {
    elf: PathBuf,
    loader: Option<Result<addr2line::Loader, String>>,
}

impl Symbols {
    #[must_use]
    pub fn new(elf: &Path) -> Self {
        Self {
            elf: elf.to_path_buf(),
            loader: None,
        }
    }

    /// `line` with its frame symbolised when it is a backtrace line (any
    /// text may come before it, such as the shim's `NAME| `); `None` for
    /// any other line.
    pub fn annotate(&mut self, line: &str) -> Option<String> {
        let at = line.find(PREFIX)?;
        let rest = &line[at + PREFIX.len()..];
        let (_depth, addr) = rest.split_once(' ')?;
        let return_addr = u64::from_str_radix(addr.trim().strip_prefix("0x")?, 16).ok()?;
        let elf = self.elf.clone();
        let loader = self
            .loader
            .get_or_insert_with(|| addr2line::Loader::new(&elf).map_err(|e| e.to_string()));
        let what = match loader {
            Ok(l) => describe(l, return_addr),
            Err(e) => format!("(no symbols: {} {e})", elf.display()),
        };
        Some(format!("{} {what}", line.trim_end()))
    }
}

/// The call site of return address `ret`: its function(s) and line.
fn describe(loader: &addr2line::Loader, ret: u64) -> String {
    // The return address is the instruction after the call; the byte
    // before it belongs to the call itself.
    let probe = ret.saturating_sub(1);
    let mut names = Vec::new();
    let mut place = None;
    if let Ok(mut frames) = loader.find_frames(probe) {
        while let Ok(Some(f)) = frames.next() {
            if let Some(name) = f.function.as_ref().and_then(|n| n.demangle().ok()) {
                names.push(strip_hash(&name).to_owned());
            }
            if place.is_none()
                && let Some(loc) = f.location
            {
                place = Some(format!(
                    "{}:{}",
                    loc.file.unwrap_or("?"),
                    loc.line.unwrap_or(0)
                ));
            }
        }
    }
    if names.is_empty()
        && let Some(sym) = loader.find_symbol(probe)
    {
        names.push(strip_hash(&addr2line::demangle_auto(sym.into(), None)).to_owned());
    }
    let name = if names.is_empty() {
        "??".to_owned()
    } else {
        names.join(" <- ")
    };
    match place {
        Some(p) => format!("{name} at {p}"),
        None => name,
    }
}

/// A demangled Rust name without its `::h0123…` hash suffix.
fn strip_hash(name: &str) -> &str {
    match name.rsplit_once("::h") {
        Some((head, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            head
        }
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::{Symbols, strip_hash};

    #[test]
    fn only_backtrace_lines_are_annotated_and_a_missing_image_is_said() {
        let mut s = Symbols::new(std::path::Path::new("/nonexistent/image"));
        assert_eq!(s.annotate("g| hello"), None);
        assert_eq!(s.annotate("g| backtrace: #0 zz"), None);
        let line = s.annotate("g| backtrace: #0 0x201000").unwrap();
        assert!(
            line.starts_with("g| backtrace: #0 0x201000 (no symbols: /nonexistent/image"),
            "{line}"
        );
    }

    #[test]
    fn hashes_are_stripped_only_when_they_are_hashes() {
        assert_eq!(strip_hash("a::b::h0123456789abcdef"), "a::b");
        assert_eq!(strip_hash("a::hello"), "a::hello");
    }
}
