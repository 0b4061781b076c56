//! A shard's side of its group (`group.rs` says who owns what): cutting a caller's request at
//! L2-table boundaries into its own parts and the pieces sent to their owners, forwarding a
//! part to its table's owner, taking the messages other shards sent (pieces to serve,
//! flushes, answers) and answering them, and the versions of the tables this shard owns and
//! of its copies of other shards' tables. An `impl State` block over the group link
//! (`group.rs`), the requests and the flush queue.
//!
//! Runs on the shard's thread.

use super::group::{forwarded_parts, forwarded_token, GroupLink, Msg};
use super::request::ReqKind;
use super::slab::PartId;
use super::state::State;
use libc::iovec;

/// The group's side of a shard: cutting requests into pieces, serving and answering other
/// shards' pieces, and the versions of the tables this shard owns.
impl State {
    /// Whether table `l1_index` of layer `layer` belongs to another shard of the group.
    pub(super) fn is_foreign(&self, layer: u16, l1_index: u64) -> bool {
        layer == 0
            && self
                .group
                .as_ref()
                .is_some_and(|g| g.owner(l1_index) != g.index)
    }

    /// The version of table `l1_index` in the group (0 without one).
    pub(super) fn table_version(&self, l1_index: u64) -> u64 {
        self.group.as_ref().map_or(0, |g| g.version(l1_index))
    }

    /// Sends part `pid` (a read of this shard's request) to the owner of its table, which
    /// serves it from its own table and answers with `Done`. A shard without a group owns
    /// every table: it never forwards.
    pub(super) fn forward_part(&mut self, pid: PartId) {
        let p = self.requests.parts[pid];
        self.requests.parts.free(pid);
        let Some(link) = &mut self.group else {
            unreachable!("only a shard of a group forwards parts");
        };
        let owner = link.owner(p.guest_off / self.l2_cover);
        let req = &self.requests.reqs[p.req];
        link.send_piece(
            owner,
            Msg::Part {
                from: self.index as u16,
                req: p.req,
                kind: req.kind,
                guest_off: p.guest_off,
                len: p.len,
                skip: p.skip,
                iov: req.iov.as_ptr(),
                iov_len: req.iov.len(),
                writethrough: req.writethrough,
            },
        );
    }

    /// The version of another shard's table that the copy in top-layer L2 slot `slot` was
    /// read at (0: none).
    pub(super) fn foreign_tag(&self, slot: u32) -> u64 {
        self.group
            .as_ref()
            .and_then(|g| g.foreign_tags.get(slot as usize).copied())
            .unwrap_or(0)
    }

    /// Records the version a copy of another shard's table in top-layer L2 slot `slot` was
    /// read at (only a shard of a group holds such copies).
    pub(super) fn set_foreign_tag(&mut self, slot: u32, tag: u64) {
        let Some(g) = &mut self.group else {
            return;
        };
        let i = slot as usize;
        if i >= g.foreign_tags.len() {
            g.foreign_tags.resize(i + 1, 0);
        }
        g.foreign_tags[i] = tag;
    }

    /// This shard changed table `l1_index` (or its L1 entry) in memory: other shards stop
    /// trusting their copies until it is in the file.
    pub(super) fn table_changed(&mut self, l1_index: u64) {
        let Some(link) = &mut self.group else {
            return;
        };
        if link.version(l1_index) % 2 == 0 {
            link.group.bump_version(l1_index);
            link.odd_tables.push(l1_index);
        }
    }

    /// A run (flush or write-back) succeeded: tables with nothing left unwritten, their L1
    /// entry included, are whole in the file again.
    pub(super) fn tables_written(&mut self) {
        let Some(link) = &mut self.group else {
            return;
        };
        let (l2, flush) = (&self.layers[0].l2, &self.flush);
        let group = &link.group;
        link.odd_tables.retain(|&t| {
            if l2.is_unwritten(t) || flush.l1_entry_unwritten(t) {
                return true;
            }
            group.bump_version(t);
            false
        });
    }

    /// Whether other shards sent messages not yet taken.
    pub(super) fn has_mail(&self) -> bool {
        self.group
            .as_ref()
            .is_some_and(|g| g.group.has_mail(g.index))
    }

    /// Starts a request of the caller: one part, or in a group cut at L2-table boundaries,
    /// the pieces this shard owns becoming its parts and the others sent to their owners.
    pub(super) fn start_caller_request(
        &mut self,
        token: u64,
        kind: ReqKind,
        offset: u64,
        len: u64,
        iov: &[iovec],
    ) {
        if self.group.is_none() {
            return self.start_request(token, kind, None, offset, len, iov);
        }
        let r = self
            .requests
            .new_req(token, kind, None, iov, false, self.writethrough);
        let (iov_ptr, iov_len) = (
            self.requests.reqs[r].iov.as_ptr(),
            self.requests.reqs[r].iov.len(),
        );
        let end = offset + len;
        let mut off = offset;
        while off < end {
            let table = off / self.l2_cover;
            let piece_end = end.min((table + 1).saturating_mul(self.l2_cover));
            let (piece, skip) = (piece_end - off, off - offset);
            let owner = self.group.as_ref().map_or(self.index, |g| g.owner(table));
            // Reads of another shard's table are tried here first (see `plan_read`).
            if owner == self.index || kind == ReqKind::Read {
                self.requests.reqs[r].has_local = true;
                self.requests.new_part(r, off, piece, skip);
            } else if let Some(link) = &mut self.group {
                self.requests.reqs[r].pending += 1;
                link.send_piece(
                    owner,
                    Msg::Part {
                        from: self.index as u16,
                        req: r,
                        kind,
                        guest_off: off,
                        len: piece,
                        skip,
                        iov: iov_ptr,
                        iov_len,
                        writethrough: self.writethrough,
                    },
                );
            }
            off = piece_end;
        }
    }

    /// A flush of the caller: in a group, every shard flushes, this one included; without
    /// one, returns `false` (the caller flushes this shard alone).
    pub(super) fn start_group_flush(&mut self, token: u64) -> bool {
        let Some(count) = self.group.as_ref().map(|g| g.group.count()) else {
            return false;
        };
        let r = self
            .requests
            .new_req(token, ReqKind::Flush, None, &[], false, self.writethrough);
        self.requests.reqs[r].pending = count as u32;
        self.flush.enqueue(forwarded_token(self.index as u16, r));
        let from = self.index as u16;
        if let Some(link) = &mut self.group {
            link.forwarded_in += 1;
            for other in (0..count).filter(|&i| i != self.index) {
                link.send_piece(other, Msg::Flush { from, req: r });
            }
        }
        true
    }

    /// Takes the messages other shards sent.
    pub(super) fn receive(&mut self) {
        let Some(link) = &self.group else {
            return;
        };
        link.group.looking(self.index);
        while let Some(msg) = self.group.as_ref().and_then(GroupLink::receive) {
            self.handle_message(msg);
        }
    }

    /// Handles one message from another shard.
    fn handle_message(&mut self, msg: Msg) {
        let Some(link) = &mut self.group else {
            return;
        };
        match msg {
            Msg::Part {
                from,
                req,
                kind,
                guest_off,
                len,
                skip,
                iov,
                iov_len,
                writethrough,
            } => {
                link.forwarded_in += 1;
                let iov: &[iovec] = if iov_len == 0 {
                    &[]
                } else {
                    // SAFETY: the array lives in the sender's request until this piece is
                    // answered (see `Msg`); it is copied here, before that.
                    unsafe { std::slice::from_raw_parts(iov, iov_len) }
                };
                let token = forwarded_token(from, req);
                let r = self
                    .requests
                    .new_req(token, kind, None, iov, true, writethrough);
                self.requests.new_part(r, guest_off, len, skip);
            }
            Msg::Flush { from, req } => {
                link.forwarded_in += 1;
                self.flush.enqueue(forwarded_token(from, req));
            }
            Msg::Done { req, result } => {
                link.remote_pieces -= 1;
                self.piece_done(req, result);
            }
        }
    }

    /// Answers the pieces served for other shards (and this shard's own piece of a group
    /// flush) among the finished requests; the caller's stay.
    pub(super) fn route_finished(&mut self) {
        if self.group.is_none() {
            return;
        }
        let mut i = 0;
        while i < self.finished.len() {
            let Some((from, req)) = forwarded_parts(self.finished[i].token) else {
                i += 1;
                continue;
            };
            let c = self.finished.swap_remove(i);
            if let Some(link) = &mut self.group {
                link.forwarded_in -= 1;
            }
            if usize::from(from) == self.index {
                self.piece_done(req, c.result);
            } else if let Some(link) = &mut self.group {
                link.answer(usize::from(from), req, c.result);
            }
        }
    }
}
