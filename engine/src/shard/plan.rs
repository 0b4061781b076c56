//! A request's way through the shard: started as one ready part, each part planned (reads by
//! `read.rs`, the rest by `write.rs`), finished, and the request completed after its last
//! piece: handed back, made durable first (write-through), or held until the metadata it
//! changed is in the file (write-back). An `impl State` block over the shard's requests
//! (`request.rs`) and the parts they touch.
//!
//! Runs on the shard's thread.

use super::config::Completion;
use super::request::ReqKind;
use super::slab::{AllocId, PartId, ReqId};
use super::state::State;
use crate::error::IoError;
use crate::io::Ring;
use crate::meta::WaitList;
use crate::shared::ImageInner;
use libc::iovec;

impl State {
    /// Starts a request of `len` (> 0) bytes at `offset` as one ready part; `parent` is the
    /// allocation an internal copy-on-write read belongs to, if any.
    pub(super) fn start_request(
        &mut self,
        token: u64,
        kind: ReqKind,
        parent: Option<AllocId>,
        offset: u64,
        len: u64,
        iov: &[iovec],
    ) {
        let r = self
            .requests
            .new_req(token, kind, parent, iov, true, self.writethrough);
        self.requests.new_part(r, offset, len, 0);
    }

    pub(super) fn finish_part(&mut self, pid: PartId, result: Result<(), IoError>) {
        let p = self.requests.parts[pid];
        if p.tag != 0 && self.table_version(p.guest_off / self.l2_cover) != p.tag {
            // Planned with a copy of another shard's table that changed meanwhile: what it
            // read may be stale (even from a cluster freed and reused since). Its owner
            // serves it again.
            return self.forward_part(pid);
        }
        let req_id = self.requests.parts[pid].req;
        self.requests.parts.free(pid);
        self.piece_done(req_id, result);
    }

    /// One piece (a part of this shard, or a piece another shard served) of request `req_id`
    /// is done; completes the request after its last.
    pub(super) fn piece_done(&mut self, req_id: ReqId, result: Result<(), IoError>) {
        let req = &mut self.requests.reqs[req_id];
        if let Err(e) = result {
            req.error.get_or_insert(e);
        }
        req.pending -= 1;
        if req.pending > 0 {
            return;
        }
        let result = req.error.map_or(Ok(()), Err);
        let (token, kind, parent) = (req.token, req.kind, req.parent);
        let (has_local, writethrough) = (req.has_local, req.writethrough);
        self.requests.reqs.free(req_id);
        if let Some(parent) = parent {
            self.cow_read_done(parent, result);
        } else if !has_local {
            self.finished.push(Completion { token, result });
        } else if kind.is_write() && writethrough && result.is_ok() {
            self.flush.enqueue(token);
        } else if kind.is_write() && result.is_ok() && self.metadata_unwritten() {
            // Write-back: the write completes once the metadata it changed is in the file
            // (not yet durable), so that losing this process loses nothing it acknowledged.
            self.flush.enqueue_writeback(token);
        } else {
            self.finished.push(Completion { token, result });
        }
    }

    pub(super) fn fail_waiters(&mut self, mut list: WaitList, err: IoError) {
        while let Some(pid) = self.requests.pop_waiter(&mut list) {
            self.finish_part(pid, Err(err));
        }
    }

    /// Plans part `pid`: reads by the read planner, the rest by the write planner.
    pub(super) fn plan(&mut self, ring: &mut Ring, img: &ImageInner, pid: PartId) {
        let kind = self.requests.reqs[self.requests.parts[pid].req].kind;
        if kind.is_write() {
            self.plan_write(ring, img, pid, kind);
        } else {
            self.plan_read(ring, img, pid);
        }
    }
}
