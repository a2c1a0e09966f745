//! Which file page backs each guest page that VM-queue remapping has moved.
//!
//! Remapping exchanges pages: the destination's receive-window slot gets the
//! sender's file page (`mmap(MAP_FIXED)` over the slot's host address) and the
//! sender gets the slot's old page, zeroed, in its place. Every file page is
//! therefore mapped at exactly one guest page at any time: no page is writable by
//! two guests, and nothing leaks (a page handed back is punched to zero first).
//! Guest RAM is a `MAP_SHARED` memfd mapping (memory.rs), so KVM's MMU notifiers
//! see the new page on the next guest access (DESIGN §7: coherent, ~2–5 µs/remap).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// A 4 KiB page of some file: (index into [`Backings::files`], byte offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FilePage {
    pub file: usize,
    pub offset: u64,
}

/// A host mapping of a file: `len` bytes at `base`, showing `file` from `offset`
/// unless a page was remapped.
#[derive(Clone, Copy, Debug)]
pub struct Mapping {
    pub base: usize,
    pub len: u64,
    pub file: usize,
    pub offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RemapError {
    #[error("mmap(MAP_FIXED) at {addr:#x} (+{len:#x}): {source}")]
    Map {
        addr: usize,
        len: u64,
        source: std::io::Error,
    },
    #[error("punching a hole in a page file: {0}")]
    Punch(std::io::Error),
    #[error("host page {0:#x} is in no VM-queue mapping")]
    Unmapped(usize),
}

const PAGE: u64 = 4096;

/// The remap ledger: every mapping and every page that no longer shows its
/// mapping's own file page.
#[derive(Default)]
pub struct Backings {
    pub files: Vec<Arc<File>>,
    mappings: Vec<Mapping>,
    moved: HashMap<usize, FilePage>,
}

impl Backings {
    /// Registers a file; returns its index.
    pub fn add_file(&mut self, f: Arc<File>) -> usize {
        self.files.push(f);
        self.files.len() - 1
    }

    pub fn add_mapping(&mut self, m: Mapping) {
        self.mappings.push(m);
    }

    /// The file page behind the host page at `addr` (4 KiB aligned, inside a mapping).
    #[must_use]
    pub fn backing(&self, addr: usize) -> Option<FilePage> {
        if let Some(p) = self.moved.get(&addr) {
            return Some(*p);
        }
        let m = self
            .mappings
            .iter()
            .find(|m| addr >= m.base && ((addr - m.base) as u64) < m.len)?;
        Some(FilePage {
            file: m.file,
            offset: m.offset + (addr - m.base) as u64,
        })
    }

    fn set(&mut self, addr: usize, p: FilePage) {
        let default = self
            .mappings
            .iter()
            .find(|m| addr >= m.base && ((addr - m.base) as u64) < m.len)
            .map(|m| FilePage {
                file: m.file,
                offset: m.offset + (addr - m.base) as u64,
            });
        if default == Some(p) {
            self.moved.remove(&addr);
        } else {
            self.moved.insert(addr, p);
        }
    }

    /// Pages currently not at their home place (for the report and tests).
    #[must_use]
    pub fn moved_pages(&self) -> usize {
        self.moved.len()
    }

    /// Exchanges `pages` 4 KiB pages at host `src` with those at host `dst`: `dst`
    /// shows what `src` showed, `src` shows `dst`'s old pages zeroed. Returns the
    /// number of `mmap` calls made (runs of file-contiguous pages share one).
    pub fn exchange(&mut self, src: usize, dst: usize, pages: usize) -> Result<u64, RemapError> {
        let step = PAGE as usize;
        let lookup = |base: usize| -> Result<Vec<FilePage>, RemapError> {
            (0..pages)
                .map(|i| {
                    let a = base + i * step;
                    self.backing(a).ok_or(RemapError::Unmapped(a))
                })
                .collect()
        };
        // Checked by the manager already; refused here too rather than trusted.
        let src_pages = lookup(src)?;
        let dst_pages = lookup(dst)?;
        let mut calls = self.map_runs(dst, &src_pages)?;
        // The destination no longer shows its old pages; zero them before the
        // sender sees them, so no earlier arrival's bytes reach it.
        for run in runs(&dst_pages) {
            let (p, n) = (dst_pages[run.0], run.1);
            punch(&self.files[p.file], p.offset, n as u64 * PAGE)?;
        }
        calls += self.map_runs(src, &dst_pages)?;
        for i in 0..pages {
            self.set(dst + i * step, src_pages[i]);
            self.set(src + i * step, dst_pages[i]);
        }
        Ok(calls)
    }

    fn map_runs(&self, at: usize, pages: &[FilePage]) -> Result<u64, RemapError> {
        let mut calls = 0;
        for (first, n) in runs(pages) {
            let p = pages[first];
            map_fixed(
                at + first * PAGE as usize,
                n as u64 * PAGE,
                &self.files[p.file],
                p.offset,
            )?;
            calls += 1;
        }
        Ok(calls)
    }
}

/// Splits `pages` into (first index, count) runs of one file at consecutive offsets.
fn runs(pages: &[FilePage]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, p) in pages.iter().enumerate() {
        if let Some((first, n)) = out.last_mut() {
            let q = pages[*first];
            if q.file == p.file && q.offset + *n as u64 * PAGE == p.offset {
                *n += 1;
                continue;
            }
        }
        out.push((i, 1));
    }
    out
}

fn map_fixed(addr: usize, len: u64, file: &File, offset: u64) -> Result<(), RemapError> {
    let err = |source| RemapError::Map { addr, len, source };
    let off = libc::off_t::try_from(offset)
        .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    // SAFETY: `addr..addr+len` lies inside a mapping the VM-queue manager keeps
    // alive (guest RAM or a VM-queue area), page aligned; replacing it with another
    // shared file mapping of the same protection keeps it valid for every user
    // (the shim only reaches it through raw pointers it re-reads).
    let r = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            file.as_raw_fd(),
            off,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn punch(file: &File, offset: u64, len: u64) -> Result<(), RemapError> {
    // SAFETY: plain syscall on an owned fd; punching a hole in shmem makes the
    // range read as zeros (fallocate(2), FALLOC_FL_PUNCH_HOLE).
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset.cast_signed(),
            len.cast_signed(),
        )
    };
    if r != 0 {
        return Err(RemapError::Punch(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_coalesce_contiguous_pages() {
        let p = |file, page: u64| FilePage {
            file,
            offset: page * PAGE,
        };
        assert_eq!(
            runs(&[p(0, 1), p(0, 2), p(0, 3), p(1, 4), p(0, 4)]),
            vec![(0, 3), (3, 1), (4, 1)]
        );
        assert!(runs(&[]).is_empty());
    }
}
