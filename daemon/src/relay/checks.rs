//! What the relay checks in a message before it forwards it: the memory regions' files and
//! the vring eventfds (see the relay's module documentation), and the kick it gives a queue
//! after SET_VRING_KICK. Runs on the relay thread.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;

use tracing::{debug, warn};

use super::frame::Message;
use super::{
    ADD_MEM_REG, REGION_BYTES, SET_MEM_TABLE, SET_VRING_CALL, SET_VRING_ERR, SET_VRING_KICK,
    VRING_INDEX_MASK, VRING_NOFD,
};
use crate::fdcheck::{self, Sealing};

/// Checks the file descriptors of a message before it is forwarded (see the module
/// documentation); the error says why it is refused.
pub(super) fn check_fds(msg: &Message) -> Result<(), String> {
    match msg.request() {
        SET_MEM_TABLE => {
            let count = msg.body.get(0..4).map_or(0, |b| {
                u32::from_ne_bytes(b.try_into().unwrap_or([0; 4])) as usize
            });
            check_regions(msg, 8, count)
        }
        ADD_MEM_REG => check_regions(msg, 8, 1),
        SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => check_vring_fd(msg),
        _ => Ok(()),
    }
}

/// Checks the `count` memory regions described from byte `at` of the body, each against its
/// file descriptor: the file covers the region, the region lies on whole pages of the file
/// (`fdcheck::off_whole_pages`), and the file cannot shrink.
pub(super) fn check_regions(msg: &Message, at: usize, count: usize) -> Result<(), String> {
    if msg.body.len() != at + count * REGION_BYTES {
        return Err(format!(
            "{count} memory regions in a {}-byte message",
            msg.body.len()
        ));
    }
    if msg.fds.len() != count {
        return Err(format!(
            "{count} memory regions with {} file descriptors",
            msg.fds.len()
        ));
    }
    for (i, fd) in msg.fds.iter().enumerate() {
        let base = at + i * REGION_BYTES;
        let (Some(guest), Some(size), Some(offset)) = (
            msg.u64_at(base),
            msg.u64_at(base + 8),
            msg.u64_at(base + 24),
        ) else {
            return Err(format!("memory region {i} is cut short"));
        };
        let file = fd
            .try_clone()
            .map(File::from)
            .map_err(|e| format!("cannot examine the file of memory region {i}: {e}"))?;
        let file_len = file
            .metadata()
            .map_err(|e| format!("cannot examine the file of memory region {i}: {e}"))?
            .len();
        let inside = matches!(offset.checked_add(size), Some(end) if end <= file_len);
        if !inside {
            return Err(format!(
                "memory region {i} (guest address {guest:#x}) maps {size} bytes at offset \
                 {offset} of a file of {file_len} bytes"
            ));
        }
        let page = fdcheck::page_size(&file)
            .map_err(|e| format!("cannot learn the page size of memory region {i}: {e}"))?;
        let base = fdcheck::base_page_size().map_err(|e| e.to_string())?;
        if let Some(why) = fdcheck::off_whole_pages(offset, size, page, base) {
            return Err(format!(
                "memory region {i} (guest address {guest:#x}) maps {size} bytes at offset \
                 {offset} of its file: {why}"
            ));
        }
        match fdcheck::seal_against_shrinking(&file) {
            Sealing::Sealed => {}
            Sealing::SealedNow => debug!(region = i, "Sealed guest memory against shrinking"),
            Sealing::Unsealable => warn!(
                region = i,
                file = fdcheck::describe(fd.as_fd()).unwrap_or_default(),
                "Guest memory in a file that cannot be sealed against shrinking (a memfd made \
                 without MFD_ALLOW_SEALING, as libblkio makes them, or a file system without \
                 seals): if the frontend truncates it, the pages cut off read as zeros"
            ),
        }
    }
    Ok(())
}

/// Checks the descriptor of SET_VRING_KICK, SET_VRING_CALL or SET_VRING_ERR: none when the
/// payload says so, else one eventfd, made non-blocking.
pub(super) fn check_vring_fd(msg: &Message) -> Result<(), String> {
    let Some(payload) = msg.u64_at(0) else {
        return Err(format!("a {}-byte vring message", msg.body.len()));
    };
    let queue = payload & VRING_INDEX_MASK;
    if payload & VRING_NOFD != 0 {
        return match msg.fds.len() {
            0 => Ok(()),
            n => Err(format!(
                "queue {queue}: {n} file descriptors with the no-fd flag"
            )),
        };
    }
    let [fd] = msg.fds.as_slice() else {
        return Err(format!(
            "queue {queue}: {} file descriptors instead of one eventfd",
            msg.fds.len()
        ));
    };
    if !fdcheck::is_eventfd(fd.as_fd()) {
        return Err(format!(
            "queue {queue}: the descriptor is not an eventfd but {}",
            fdcheck::describe(fd.as_fd()).unwrap_or_else(|| "unknown".into())
        ));
    }
    fdcheck::set_nonblocking(fd.as_fd())
        .map_err(|e| format!("queue {queue}: cannot make the eventfd non-blocking: {e}"))
}

/// Writes to the kick eventfd of a SET_VRING_KICK message (after it was forwarded): the worker
/// then processes the queue once it is started and enabled, whether or not the guest kicks.
pub(super) fn kick(msg: &Message) {
    let Some(payload) = msg.u64_at(0) else {
        return;
    };
    if payload & VRING_NOFD != 0 {
        return;
    }
    let Some(fd) = msg.fds.first() else {
        return;
    };
    let queue = payload & VRING_INDEX_MASK;
    match fd.try_clone().map(File::from) {
        Ok(mut eventfd) => {
            if let Err(e) = eventfd.write_all(&1u64.to_ne_bytes()) {
                debug!(queue, "Cannot kick the queue: {e}");
            }
        }
        Err(e) => debug!(queue, "Cannot kick the queue: {e}"),
    }
}
