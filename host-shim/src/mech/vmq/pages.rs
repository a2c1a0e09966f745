//! Which file page backs each guest page that VM-queue remapping has moved.
//!
//! A remap moves pages: the destination's receive-window slot gets the sender's
//! file pages (`mmap(MAP_FIXED)` over the slot's host address), the sender gets
//! zeroed pages from a spare pool in their place, and the slot's old pages are
//! punched to zero and join the pool. Every file page is therefore mapped at most
//! once at any time: no page is writable by two guests, and nothing leaks (a
//! page handed out was punched to zero first). Guest RAM is a `MAP_SHARED` memfd
//! mapping (memory.rs), so KVM's MMU notifiers see the new page on the next guest
//! access (coherent, ~2–5 µs/remap on this host).
//!
//! An exchange is all or nothing. Its two mapping steps (pool pages over the
//! sender's range, then the sender's pages over the slot) each map only pages
//! that are mapped nowhere at that moment, so whichever step fails, no page is
//! ever shared; a failure undoes the completed steps, newest first, and the
//! slot's old pages are punched only after both steps succeeded, so a refused
//! exchange leaves both guests' pages as they were.
//!
//! Every page that no longer shows its neighbour's file successor splits the
//! host mapping: the kernel keeps one VMA per file-contiguous run, and a process
//! may hold only `vm.max_map_count` of them (beyond that `mmap` fails with
//! ENOMEM). The ledger counts these splits ("fragments") and charges each one to
//! the sender whose exchange made it; an exchange that would take its sender
//! over its share of half the system limit is refused before anything moves.

use std::collections::{HashMap, HashSet, VecDeque};
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
    #[error(
        "the exchange would split the shim's mappings into {would} extra pieces for this sender, over its share of {limit} (vm.max_map_count {max_map_count})"
    )]
    Limit {
        would: usize,
        limit: usize,
        max_map_count: usize,
    },
    #[error("the spare page pool: {0}")]
    Pool(String),
}

impl RemapError {
    /// Refused by the fragment bound (nothing was attempted), rather than failed.
    #[must_use]
    pub fn is_limit(&self) -> bool {
        matches!(self, Self::Limit { .. })
    }
}

const PAGE: u64 = 4096;
/// `vm.max_map_count` when /proc does not say (the kernel's default).
pub const DEFAULT_MAX_MAP_COUNT: usize = 65_530;
/// Pages of the spare pool: the largest message (2 MiB).
const POOL_PAGES: usize = (para_abi::vmq::MAX_MESSAGE as u64 / PAGE) as usize;

/// The two system calls an exchange makes. Tests replace them to make any one
/// call fail (as `mmap` does with ENOMEM at `vm.max_map_count`).
pub trait Sys: Send {
    /// Maps `len` bytes of `file` from `offset` at `addr`, replacing what is there.
    fn map(&mut self, addr: usize, len: u64, file: &File, offset: u64) -> std::io::Result<()>;
    /// Makes `len` bytes of `file` from `offset` read as zeros.
    fn punch(&mut self, file: &File, offset: u64, len: u64) -> std::io::Result<()>;
}

/// The real system calls. `huge`: the guests' mappings were advised for
/// transparent huge pages ([`advise_huge`]), so every page placed is too
/// (the same flags keep the kernel merging neighbouring runs into one VMA).
#[derive(Default)]
pub struct Kernel {
    pub huge: bool,
}

impl Sys for Kernel {
    fn map(&mut self, addr: usize, len: u64, file: &File, offset: u64) -> std::io::Result<()> {
        map_fixed(addr, len, file, offset)?;
        // Advice first: a page the populate allocates is huge only if the
        // mapping asked for huge pages by then.
        if self.huge {
            advise_huge(addr, len)?;
        }
        populate(addr, len);
        Ok(())
    }
    fn punch(&mut self, file: &File, offset: u64, len: u64) -> std::io::Result<()> {
        punch(file, offset, len)
    }
}

/// How many fragments (extra VMAs) the ledger lets exchanges create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The system's `vm.max_map_count`.
    pub max_map_count: usize,
    /// Fragments all senders together may hold: half the system limit, leaving
    /// the other half to the rest of the shim (code, heap, thread stacks, guest
    /// RAM and KVM's own mappings).
    pub total: usize,
    /// Fragments one sender may hold: its share of `total`.
    pub per_sender: usize,
}

impl Limits {
    /// The bound for `senders` guests under `max_map_count`.
    #[must_use]
    pub fn new(max_map_count: usize, senders: usize) -> Self {
        let total = max_map_count / 2;
        Self {
            max_map_count,
            total,
            per_sender: total / senders.max(1),
        }
    }

    /// `vm.max_map_count` as /proc/sys/vm/max_map_count says.
    #[must_use]
    pub fn system_max_map_count() -> usize {
        std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(DEFAULT_MAX_MAP_COUNT)
    }
}

/// The remap ledger: every mapping, every page that no longer shows its
/// mapping's own file page, the pool of zeroed pages mapped nowhere, and the
/// fragments each sender's exchanges made.
pub struct Backings {
    pub files: Vec<Arc<File>>,
    mappings: Vec<Mapping>,
    moved: HashMap<usize, FilePage>,
    /// Zeroed pages mapped nowhere, handed out front first.
    pool: VecDeque<FilePage>,
    /// Pages mapped nowhere whose punch failed: punched again before reuse.
    dirty: Vec<FilePage>,
    pool_file: Option<usize>,
    /// Fragment positions (host address of the page before the split) and the
    /// sender charged for each.
    splits: HashMap<usize, usize>,
    charged: HashMap<usize, usize>,
    pub limits: Limits,
    sys: Box<dyn Sys>,
}

impl Default for Backings {
    fn default() -> Self {
        Self {
            files: Vec::new(),
            mappings: Vec::new(),
            moved: HashMap::new(),
            pool: VecDeque::new(),
            dirty: Vec::new(),
            pool_file: None,
            splits: HashMap::new(),
            charged: HashMap::new(),
            limits: Limits::new(Limits::system_max_map_count(), 1),
            sys: Box::new(Kernel::default()),
        }
    }
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

    /// Replaces the system calls (tests inject failures through this).
    pub fn set_sys(&mut self, sys: Box<dyn Sys>) {
        self.sys = sys;
    }

    fn mapping_of(&self, addr: usize) -> Option<usize> {
        self.mappings
            .iter()
            .position(|m| addr >= m.base && ((addr - m.base) as u64) < m.len)
    }

    /// The file page behind the host page at `addr` (4 KiB aligned, inside a mapping).
    #[must_use]
    pub fn backing(&self, addr: usize) -> Option<FilePage> {
        if let Some(p) = self.moved.get(&addr) {
            return Some(*p);
        }
        let m = &self.mappings[self.mapping_of(addr)?];
        Some(FilePage {
            file: m.file,
            offset: m.offset + (addr - m.base) as u64,
        })
    }

    fn set(&mut self, addr: usize, p: FilePage) {
        let default = self.mapping_of(addr).map(|i| {
            let m = &self.mappings[i];
            FilePage {
                file: m.file,
                offset: m.offset + (addr - m.base) as u64,
            }
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

    /// Fragments all exchanges have made, and those charged to `sender`.
    #[must_use]
    pub fn fragments(&self, sender: usize) -> (usize, usize) {
        (
            self.splits.len(),
            self.charged.get(&sender).copied().unwrap_or(0),
        )
    }

    /// Fragments inside `base..base+len` (tests compare them with the VMAs).
    #[must_use]
    pub fn fragments_in(&self, base: usize, len: usize) -> usize {
        self.splits
            .keys()
            .filter(|&&a| a >= base && a < base + len)
            .count()
    }

    /// Zeroed pages ready in the pool.
    #[must_use]
    pub fn pool_pages(&self) -> usize {
        self.pool.len()
    }

    /// The split positions (host address of the page before the split) whose
    /// state changes when the pages at `base` go from `before` to `after`, each
    /// with its new state. `base..` lies inside one mapping; only the two edge
    /// positions look outside the range.
    fn split_changes(
        &self,
        base: usize,
        before: &[FilePage],
        after: &[FilePage],
        out: &mut Vec<(usize, bool)>,
    ) {
        let step = PAGE as usize;
        let n = before.len();
        if n == 0 {
            return;
        }
        let home = self.mapping_of(base);
        let outside = |addr: Option<usize>| {
            addr.filter(|&x| self.mapping_of(x) == home)
                .and_then(|x| self.backing(x))
        };
        let left = outside(base.checked_sub(step));
        let right = outside(Some(base + n * step));
        let mut push = |pos: usize, was: bool, now: bool| {
            if was != now {
                out.push((pos, now));
            }
        };
        if let Some(l) = left {
            push(base - step, splits(l, before[0]), splits(l, after[0]));
        }
        for i in 0..n - 1 {
            push(
                base + i * step,
                splits(before[i], before[i + 1]),
                splits(after[i], after[i + 1]),
            );
        }
        if let Some(r) = right {
            push(
                base + (n - 1) * step,
                splits(before[n - 1], r),
                splits(after[n - 1], r),
            );
        }
    }

    /// Exchanges `pages` 4 KiB pages at host `src` (the sender's) with those at
    /// host `dst` (the destination's window slot): `dst` shows what `src` showed,
    /// `src` shows zeroed pages. Returns the number of `mmap` calls made (runs of
    /// file-contiguous pages share one). On error nothing has changed for either
    /// guest, except after a failed undo (see `Self::undo`).
    pub fn exchange(
        &mut self,
        src: usize,
        dst: usize,
        pages: usize,
        sender: usize,
    ) -> Result<u64, RemapError> {
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
        for base in [src, dst] {
            let last = base + (pages.max(1) - 1) * step;
            if self.mapping_of(base) != self.mapping_of(last) {
                return Err(RemapError::Unmapped(last));
            }
        }
        let filled = self.fill_pool();
        if self.pool.len() < pages {
            return Err(filled.err().unwrap_or_else(|| {
                RemapError::Pool(format!(
                    "{} zeroed pages ready, {pages} needed",
                    self.pool.len()
                ))
            }));
        }
        let zero: Vec<FilePage> = self.pool.iter().take(pages).copied().collect();
        let mut planned = Vec::new();
        self.split_changes(src, &src_pages, &zero, &mut planned);
        self.split_changes(dst, &dst_pages, &src_pages, &mut planned);
        self.check_limit(&planned, sender)?;
        self.pool.drain(..pages);

        let mut at_src = src_pages.clone();
        let mut at_dst = dst_pages.clone();
        let mut calls = 0;
        let done = self
            .place(src, &mut at_src, &zero, &mut calls)
            .and_then(|()| self.place(dst, &mut at_dst, &src_pages, &mut calls));
        if let Err(e) = done {
            self.undo(src, dst, &src_pages, &dst_pages, &mut at_src, &mut at_dst);
            // Whatever the undo achieved is what the guests see now.
            let mut actual = Vec::new();
            self.split_changes(src, &src_pages, &at_src, &mut actual);
            self.split_changes(dst, &dst_pages, &at_dst, &mut actual);
            let mapped: HashSet<FilePage> = at_src.iter().chain(&at_dst).copied().collect();
            let loose: Vec<FilePage> = [&zero, &src_pages, &dst_pages]
                .into_iter()
                .flatten()
                .filter(|p| !mapped.contains(p))
                .copied()
                .collect();
            self.settle(src, dst, &at_src, &at_dst, loose, &actual, sender);
            return Err(e);
        }
        // The slot's old pages are mapped nowhere now; `settle` zeroes them into the pool.
        self.settle(src, dst, &at_src, &at_dst, dst_pages, &planned, sender);
        Ok(calls)
    }

    /// Puts every page back where it was, newest step first. Each call maps
    /// pages mapped nowhere else, so even a failing undo shares no page: if the
    /// slot cannot be restored the sender keeps its zeroed pages (its message is
    /// lost, and refused), never a page the destination also shows.
    fn undo(
        &mut self,
        src: usize,
        dst: usize,
        src_pages: &[FilePage],
        dst_pages: &[FilePage],
        at_src: &mut [FilePage],
        at_dst: &mut [FilePage],
    ) {
        let mut calls = 0;
        if let Err(e) = self.place(dst, at_dst, dst_pages, &mut calls) {
            crate::guest_log!(error, "VM-queue remap undo failed at the destination: {e}");
            return;
        }
        if let Err(e) = self.place(src, at_src, src_pages, &mut calls) {
            crate::guest_log!(error, "VM-queue remap undo failed at the sender: {e}");
        }
    }

    /// Refuses an exchange whose split `changes` would take `sender` over its
    /// fragment share, or all senders over theirs together, before anything is
    /// mapped.
    fn check_limit(&self, changes: &[(usize, bool)], sender: usize) -> Result<(), RemapError> {
        let (mut added, mut removed_own, mut removed) = (0, 0, 0);
        for &(pos, now) in changes {
            if now {
                added += 1;
            } else {
                removed += 1;
                if self.splits.get(&pos) == Some(&sender) {
                    removed_own += 1;
                }
            }
        }
        let own = self.charged.get(&sender).copied().unwrap_or(0);
        let would = (own + added).saturating_sub(removed_own);
        let total = (self.splits.len() + added).saturating_sub(removed);
        if added > removed_own && would > self.limits.per_sender {
            return Err(RemapError::Limit {
                would,
                limit: self.limits.per_sender,
                max_map_count: self.limits.max_map_count,
            });
        }
        if added > removed && total > self.limits.total {
            return Err(RemapError::Limit {
                would: total,
                limit: self.limits.total,
                max_map_count: self.limits.max_map_count,
            });
        }
        Ok(())
    }

    /// Maps `want` at `base` wherever `now` differs, run by run, recording in
    /// `now` what each successful call placed.
    fn place(
        &mut self,
        base: usize,
        now: &mut [FilePage],
        want: &[FilePage],
        calls: &mut u64,
    ) -> Result<(), RemapError> {
        for (first, n) in runs_where(want, |i| now[i] != want[i]) {
            let p = want[first];
            let addr = base + first * PAGE as usize;
            let len = n as u64 * PAGE;
            self.sys
                .map(addr, len, &self.files[p.file], p.offset)
                .map_err(|source| RemapError::Map { addr, len, source })?;
            now[first..first + n].copy_from_slice(&want[first..first + n]);
            *calls += 1;
        }
        Ok(())
    }

    /// Records what is mapped now at `src` and `dst`, zeroes the `loose` pages
    /// (involved, mapped nowhere now) into the pool, and applies the split
    /// `changes`, charging new splits to `sender`.
    #[allow(clippy::too_many_arguments)] // one exchange's whole outcome
    fn settle(
        &mut self,
        src: usize,
        dst: usize,
        at_src: &[FilePage],
        at_dst: &[FilePage],
        loose: Vec<FilePage>,
        changes: &[(usize, bool)],
        sender: usize,
    ) {
        let step = PAGE as usize;
        for (i, (&s, &d)) in at_src.iter().zip(at_dst).enumerate() {
            self.set(src + i * step, s);
            self.set(dst + i * step, d);
        }
        // Even pool pages that were mapped and taken back again: the sender may
        // have written them meanwhile.
        self.dirty.extend(loose);
        let _ = self.fill_pool();
        for &(pos, now) in changes {
            if now {
                if self.splits.insert(pos, sender).is_none() {
                    *self.charged.entry(sender).or_default() += 1;
                }
            } else if let Some(owner) = self.splits.remove(&pos)
                && let Some(c) = self.charged.get_mut(&owner)
            {
                *c = c.saturating_sub(1);
            }
        }
    }

    /// Punches the pages waiting to be zeroed into the pool (the first call
    /// creates the pool's own file). Pages whose punch fails wait for the next try.
    fn fill_pool(&mut self) -> Result<(), RemapError> {
        if self.pool_file.is_none() {
            let f = crate::kvm::memory::memfd("vmq-spare", POOL_PAGES as u64 * PAGE)
                .map_err(|e| RemapError::Pool(e.to_string()))?;
            let i = self.add_file(Arc::new(f));
            self.pool_file = Some(i);
            self.pool.extend((0..POOL_PAGES as u64).map(|k| FilePage {
                file: i,
                offset: k * PAGE,
            }));
        }
        if self.dirty.is_empty() {
            return Ok(());
        }
        let dirty = std::mem::take(&mut self.dirty);
        let mut first_err = None;
        for (first, n) in runs(&dirty) {
            let p = dirty[first];
            match self
                .sys
                .punch(&self.files[p.file], p.offset, n as u64 * PAGE)
            {
                Ok(()) => self.pool.extend(&dirty[first..first + n]),
                Err(e) => {
                    self.dirty.extend(&dirty[first..first + n]);
                    first_err.get_or_insert(RemapError::Punch(e));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Every file page the ledger knows is at one place only (at most one
    /// guest page, or the pool, or waiting to be zeroed), and the split count is
    /// what a recount from scratch finds (tests).
    #[must_use]
    pub fn consistent(&self) -> bool {
        let step = PAGE as usize;
        let mut seen = HashSet::new();
        let shown = self
            .mappings
            .iter()
            .flat_map(|m| (0..m.len / PAGE).map(move |k| m.base + (k * PAGE) as usize));
        let unique = shown
            .filter_map(|a| self.backing(a))
            .chain(self.pool.iter().copied())
            .chain(self.dirty.iter().copied())
            .all(|p| seen.insert(p));
        let recount = self.mappings.iter().all(|m| {
            (1..m.len / PAGE).all(|k| {
                let a = m.base + (k - 1) as usize * step;
                match (self.backing(a), self.backing(a + step)) {
                    (Some(p), Some(q)) => splits(p, q) == self.splits.contains_key(&a),
                    _ => false,
                }
            })
        });
        unique && recount && self.charged.values().sum::<usize>() == self.splits.len()
    }
}

/// Whether a page showing `here` followed by one showing `next` needs two VMAs.
fn splits(here: FilePage, next: FilePage) -> bool {
    !(here.file == next.file && here.offset + PAGE == next.offset)
}

/// Splits `pages` into (first index, count) runs of one file at consecutive offsets.
fn runs(pages: &[FilePage]) -> Vec<(usize, usize)> {
    runs_where(pages, |_| true)
}

/// As [`runs`], over the indices `keep` accepts only.
fn runs_where(pages: &[FilePage], keep: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, p) in pages.iter().enumerate() {
        if !keep(i) {
            continue;
        }
        if let Some((first, n)) = out.last_mut()
            && *first + *n == i
        {
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

fn map_fixed(addr: usize, len: u64, file: &File, offset: u64) -> std::io::Result<()> {
    let off = libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `addr..addr+len` lies inside a mapping the VM-queue manager keeps
    // alive (guest RAM or a VM-queue area), page aligned; replacing it with another
    // shared file mapping of the same protection keeps it valid for every user
    // (the shim only reaches it through raw pointers it re-reads). The flags are
    // vm-memory's for guest RAM, so that no flag difference keeps the kernel from
    // merging a page placed next to its file neighbours back into one VMA.
    let r = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            off,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Asks for transparent huge pages on `addr..addr+len` (`madvise(2)`,
/// `MADV_HUGEPAGE`). Shared memory gets them only when
/// `/sys/kernel/mm/transparent_hugepage/shmem_enabled` is `advise`,
/// `within_size` or `always`; then a 2 MiB-aligned, file-contiguous run is
/// one PMD in the shim's page tables and KVM maps a guest's 2 MiB page with
/// one entry: one fault per 2 MiB after a remap instead of one per 4 KiB.
pub fn advise_huge(addr: usize, len: u64) -> std::io::Result<()> {
    // SAFETY: advice only; the range is a mapping the caller owns.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_HUGEPAGE) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `MADV_POPULATE_WRITE` (Linux 5.14, include/uapi/asm-generic/mman-common.h).
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Fills the shim's page tables for `addr..addr+len`, writable, so that the
/// guest's first touch after a remap finds the host page present: KVM then
/// maps it (and, on this host, up to 8 neighbours with it, or the whole 2 MiB
/// when it is a huge page) in one fault instead of one fault per 4 KiB page.
/// Best effort: an older kernel refuses the advice, and the guest's faults
/// populate the pages as before.
fn populate(addr: usize, len: u64) {
    // SAFETY: advice only, on a mapping the caller just placed.
    let _ = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, MADV_POPULATE_WRITE) };
}

/// What `/sys/kernel/mm/transparent_hugepage/shmem_enabled` selects
/// (the bracketed word), if the file is there.
#[must_use]
pub fn shmem_thp_mode() -> Option<String> {
    let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled").ok()?;
    let start = s.find('[')? + 1;
    let end = start + s[start..].find(']')?;
    Some(s[start..end].to_owned())
}

fn punch(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
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
        return Err(std::io::Error::last_os_error());
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
