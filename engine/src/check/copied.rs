//! The COPIED flags of the active L1 table and of the L2 tables it points at: checked
//! against the stored refcounts as QEMU's `check_oflag_copied` does, or, in a repair, cleared
//! where unsafe before the refcounts change and set to match once they are right. Runs on
//! the thread that called [`super::check`].
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};

use super::stored::Stored;
use super::tables::{classify, for_each_entry, runs, Kind};
use super::walk::all_zero;
use super::walk::Analysis;
use super::{zeroed, Log, Target};
use crate::error::{Error, ErrorKind};
use crate::format::be64_at;
use crate::format::mask::{self, COMPRESSED, COPIED};

/// What a pass over the COPIED flags does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FlagMode {
    /// Count flags that disagree with the stored refcounts, as QEMU does.
    Check,
    /// Before refcounts change: clear COPIED wherever the expected refcount is not 1, so
    /// that a crash in the middle of the repair never leaves a shared cluster marked as
    /// writable in place.
    ClearUnsafe,
    /// Once the refcounts are right: make every flag match the expected refcount.
    Fix,
    /// When some refcounts stay wrong after the repair: make flags match the stored
    /// refcounts (which the double check judges them by, as QEMU's repair does), except that
    /// COPIED is set only where the expected refcount is 1 too, never on a cluster that may
    /// be shared.
    FixStored,
}

impl FlagMode {
    /// How a message about a wrong flag begins: an error when checking, a repair otherwise.
    fn verb(self) -> &'static str {
        if self == FlagMode::Check {
            "ERROR"
        } else {
            "Repairing"
        }
    }

    /// Whether a flag that is `copied` is left as it is, with `rc` the refcount it is judged
    /// by and `sure` whether the expected refcount is 1 as well.
    fn keeps(self, rc: u64, copied: bool, sure: bool) -> bool {
        (rc == 1) == copied
            || match self {
                FlagMode::Check | FlagMode::Fix => false,
                FlagMode::ClearUnsafe => !copied,
                FlagMode::FixStored => !copied && !sure,
            }
    }
}

impl Analysis {
    /// The refcount a COPIED flag is judged by: the stored one when checking (as QEMU's
    /// `check_oflag_copied` does), the expected one when repairing a cluster whose refcount
    /// the repair compares (and so makes the stored one), the stored one past those (a
    /// reference past the end of the file is not counted, and its stored refcount stays).
    /// `None`: not judged.
    pub(super) fn flag_refcount(
        &self,
        t: &mut Target,
        stored: &mut Stored,
        mode: FlagMode,
        c: u64,
    ) -> Result<Option<u64>, Error> {
        match mode {
            FlagMode::Check | FlagMode::FixStored => stored.get(t, c),
            FlagMode::ClearUnsafe | FlagMode::Fix if c < self.compare_len() => {
                Ok(self.expected_at(c))
            }
            FlagMode::ClearUnsafe | FlagMode::Fix => stored.get(t, c),
        }
    }

    /// Checks or fixes the COPIED flags of the active L1 table and of the L2 tables it points
    /// at, as QEMU's `check_oflag_copied` does; fixing also clears COPIED on compressed
    /// clusters of every L2 table. `log` receives what was repaired (unused when checking,
    /// where mismatches are counted as corruptions). Returns how many entries changed.
    pub(super) fn copied_pass(
        &mut self,
        t: &mut Target,
        stored: &mut Stored,
        mode: FlagMode,
        log: &mut Log,
    ) -> Result<u64, Error> {
        let g = self.g;
        let fixing = mode != FlagMode::Check;
        let (l1_off, l1_size) = (self.header.l1_table_offset, self.header.l1_size);
        // The entries naming a table, as they are before this pass writes any (it may
        // write L1 entries, and L2 tables that a damaged image's L1 table overlaps).
        let mut l1 = Vec::new();
        let what = "the active L1 table";
        for_each_entry(t, l1_off, u64::from(l1_size) * 8, &what, |t, i, raw| {
            if raw & mask::OFFSET != 0 {
                l1.try_reserve(1).map_err(|_| {
                    Error::new(
                        ErrorKind::Io,
                        format!("{}: cannot allocate memory for {what}", t.path),
                    )
                })?;
                l1.push((i, raw));
            }
            Ok(())
        })?;
        let mut l2 = zeroed(g.cs, &t.path)?;
        let mut fixed = 0u64;
        let mut done_tables = HashSet::new();
        // Checking: how many flags of each L2 table were wrong. QEMU checks a table once per
        // active L1 entry that names it and counts its errors each time; the table is read
        // once here and its count added again.
        let mut wrong_in: HashMap<u64, u64> = HashMap::new();
        for (i, raw) in l1 {
            let l2_off = raw & mask::OFFSET;
            // Invalid tables were reported by the counting pass; QEMU still checks their
            // flags (reading zeros past the end of the file) and repairs the L1 entry's, but
            // the tables are never rewritten.
            let valid = l2_off.is_multiple_of(g.cs) && l2_off >> g.cb < g.file_clusters;
            let Some(rc) = self.flag_refcount(t, stored, mode, l2_off >> g.cb)? else {
                continue;
            };
            fixed += self.l1_entry_flag(t, mode, i, raw, rc, log)?;
            if fixing && !valid {
                continue;
            }
            if !done_tables.insert(l2_off) {
                let again = wrong_in.get(&l2_off).copied().unwrap_or(0);
                if !fixing && again > 0 {
                    self.corruptions += again;
                    self.log.push(format!(
                        "ERROR the {again} OFLAG_COPIED errors of the L2 table at {l2_off:#x} count again: L1 entry {i} names it too"
                    ));
                }
                continue;
            }
            t.read(l2_off, &mut l2, "an L2 table")?;
            let before = self.corruptions;
            let changed = self.l2_table_flags(t, stored, mode, &mut l2, log)?;
            if !fixing {
                wrong_in.insert(l2_off, self.corruptions - before);
            }
            if changed > 0 {
                self.write_l2(t, l2_off, &l2, log)?;
            }
            fixed += changed;
        }
        if fixing {
            fixed += self.clear_copied_in_snapshot_tables(t, &mut l2, log)?;
        }
        Ok(fixed)
    }

    /// Checks or fixes the COPIED flag of active L1 entry `i` (`raw`), judged by the
    /// refcount `rc` of the L2 table it points at. Returns 1 when the entry was rewritten.
    fn l1_entry_flag(
        &mut self,
        t: &mut Target,
        mode: FlagMode,
        i: usize,
        raw: u64,
        rc: u64,
        log: &mut Log,
    ) -> Result<u64, Error> {
        let g = self.g;
        let l2_off = raw & mask::OFFSET;
        let copied = raw & COPIED != 0;
        let sure = self.expected_at(l2_off >> g.cb) == Some(1);
        if mode.keeps(rc, copied, sure) {
            return Ok(0);
        }
        let msg = format!(
            "{} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={raw:x} refcount={rc}",
            mode.verb()
        );
        let entry_off = self.header.l1_table_offset + (i as u64) * 8;
        if mode == FlagMode::Check {
            self.corrupt(format_args!("{msg}"));
            return Ok(0);
        }
        // The header's cluster is always shared with the header, even where the count
        // cannot show it (1-bit refcounts, overflowed).
        if entry_off >> g.cb == 0 || !self.only_as(entry_off >> g.cb, 1) {
            log.push(format!(
                "Not repairing L1 entry {i}: the L1 table overlaps other metadata"
            ));
            return Ok(0);
        }
        log.push(msg);
        let new = if rc == 1 { raw | COPIED } else { raw & !COPIED };
        t.write(entry_off, &new.to_be_bytes(), "an L1 entry")?;
        Ok(1)
    }

    /// Checks or fixes the COPIED flags of the entries of active L2 table `l2` (in memory;
    /// the caller writes it back). Returns how many entries changed.
    fn l2_table_flags(
        &mut self,
        t: &mut Target,
        stored: &mut Stored,
        mode: FlagMode,
        l2: &mut [u8],
        log: &mut Log,
    ) -> Result<u64, Error> {
        let g = self.g;
        let mut changed = 0u64;
        for run in runs(l2.len()) {
            // A zero entry has no flag: runs of them are skipped as a whole.
            if all_zero(&l2[run.clone()]) {
                continue;
            }
            for at in run.step_by(g.esz) {
                let e = be64_at(l2, at);
                let Some(want) = self.l2_entry_flag(t, stored, mode, e, log)? else {
                    continue;
                };
                if let Some(slot) = l2.get_mut(at..at + 8) {
                    slot.copy_from_slice(&want.to_be_bytes());
                    changed += 1;
                }
            }
        }
        Ok(changed)
    }

    /// Checks or fixes the COPIED flag of active L2 entry `e`: the entry as it should be,
    /// when fixing changes it.
    fn l2_entry_flag(
        &mut self,
        t: &mut Target,
        stored: &mut Stored,
        mode: FlagMode,
        e: u64,
        log: &mut Log,
    ) -> Result<Option<u64>, Error> {
        let g = self.g;
        let fixing = mode != FlagMode::Check;
        let copied = e & COPIED != 0;
        match classify(e, &g) {
            Kind::Alloc(off) => {
                let rc = if g.data_file {
                    1
                } else {
                    match self.flag_refcount(t, stored, mode, off >> g.cb)? {
                        Some(rc) => rc,
                        None => return Ok(None),
                    }
                };
                let sure = g.data_file || self.expected_at(off >> g.cb) == Some(1);
                if mode.keeps(rc, copied, sure) {
                    return Ok(None);
                }
                let msg = format!(
                    "{} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}",
                    mode.verb()
                );
                if !fixing {
                    self.corrupt(format_args!("{msg}"));
                    return Ok(None);
                }
                log.push(msg);
                Ok(Some(e ^ COPIED))
            }
            Kind::Compressed if copied && fixing => Ok(Some(e & !COPIED)),
            _ => Ok(None),
        }
    }

    /// Clears COPIED on compressed clusters of the L2 tables only snapshots point at
    /// (`l2`: a cluster-sized buffer to read them into). Returns how many entries changed.
    fn clear_copied_in_snapshot_tables(
        &mut self,
        t: &mut Target,
        l2: &mut [u8],
        log: &mut Log,
    ) -> Result<u64, Error> {
        let g = self.g;
        let mut fixed = 0u64;
        let mut others: Vec<u64> = self
            .l2_tables
            .iter()
            .filter(|(&off, u)| !u.active && off != 0)
            .map(|(&off, _)| off)
            .collect();
        others.sort_unstable();
        for l2_off in others {
            t.read(l2_off, l2, "an L2 table")?;
            let mut dirty = false;
            for at in (0..l2.len()).step_by(g.esz) {
                let e = be64_at(l2, at);
                if e & COMPRESSED != 0 && e & COPIED != 0 {
                    if let Some(slot) = l2.get_mut(at..at + 8) {
                        slot.copy_from_slice(&(e & !COPIED).to_be_bytes());
                        dirty = true;
                        fixed += 1;
                    }
                }
            }
            if dirty {
                self.write_l2(t, l2_off, l2, log)?;
            }
        }
        Ok(fixed)
    }

    /// Writes back an L2 table whose flags were fixed, unless its cluster is also used as
    /// something other than an L2 table.
    pub(super) fn write_l2(
        &self,
        t: &mut Target,
        l2_off: u64,
        table: &[u8],
        log: &mut Log,
    ) -> Result<(), Error> {
        let refs = self.l2_tables.get(&l2_off).map_or(0, |u| u.refs);
        // The header's cluster is always shared with the header, even where the count
        // cannot show it (1-bit refcounts, overflowed).
        if l2_off >> self.g.cb == 0 || !self.only_as(l2_off >> self.g.cb, refs) {
            log.push(format!(
                "Not rewriting the L2 table at {l2_off:#x}: its cluster is also used by other metadata"
            ));
            return Ok(());
        }
        t.write(l2_off, table, "an L2 table")
    }
}

impl Analysis {
    /// Whether the COPIED fix may meet an active L1 or L2 table it does not write: one in the
    /// header's cluster, or whose cluster something else uses too ([`Analysis::only_as`]).
    /// The flags there stay as they are whatever the refcounts become.
    pub(super) fn has_unwritable_table(&self) -> bool {
        let g = self.g;
        let unwritable = |c: u64, refs: u64| c == 0 || !self.only_as(c, refs);
        let l2 = self
            .l2_tables
            .iter()
            .any(|(&off, u)| u.active && unwritable(off >> g.cb, u.refs));
        let l1_bytes = u64::from(self.header.l1_size) * 8;
        let first = self.header.l1_table_offset >> g.cb;
        let end = self
            .header
            .l1_table_offset
            .saturating_add(l1_bytes)
            .div_ceil(g.cs)
            .min(g.file_clusters.saturating_add(1));
        l2 || (l1_bytes > 0 && (first..end.max(first + 1)).any(|c| unwritable(c, 1)))
    }

    /// Whether the `refs` references of the table the repair writes are all cluster `c` has,
    /// but those from the header's cluster walked as an L2 table, which name no guest data
    /// ([`Analysis::header_l2_refs`]). Never where the count overflowed the refcount width
    /// ([`Analysis::overflowed`]): it stopped at the maximum and hides other users.
    pub(super) fn only_as(&self, c: u64, refs: u64) -> bool {
        let header = self.header_l2_refs.get(&c).copied().unwrap_or(0);
        let overflowed = self.overflowed.as_ref().is_none_or(|set| set.contains(&c));
        !overflowed && self.expected_at(c) == Some(refs + header)
    }
}

/// Rewrites COPIED flags according to the expected refcounts (see [`FlagMode`]).
pub(super) fn fix_copied_flags(
    t: &mut Target,
    a: &mut Analysis,
    mode: FlagMode,
    log: &mut Log,
) -> Result<(), Error> {
    let mut stored = Stored::new(a);
    let fixed = a.copied_pass(t, &mut stored, mode, log)?;
    if fixed > 0 {
        t.sync()?;
    }
    Ok(())
}
