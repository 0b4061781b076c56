//! The frontend's backend request channel, through which the daemon tells the frontend that
//! the config space changed (an online resize). The relay thread sets it; the thread that
//! resizes an export writes to it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};

use super::frame::{HEADER_BYTES, VERSION_1};

/// How long a config-change message may take to reach the frontend.
const CHANNEL_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The frontend's backend request channel (the socket SET_BACKEND_REQ_FD shares), kept by the
/// relay so the daemon can tell the frontend that the config space changed (an online resize).
/// The handler gets the message too, unchanged; it never writes to the channel.
#[derive(Default)]
pub struct BackendChannel {
    /// The channel; the relay thread takes this lock only to replace it, never while a
    /// message is written (which may wait up to [`CHANNEL_WRITE_TIMEOUT`]).
    sock: Mutex<Option<Arc<UnixStream>>>,
    /// Held while a message is written, so that two messages never interleave.
    writing: Mutex<()>,
}

impl BackendChannel {
    pub(super) fn set(&self, fd: OwnedFd) {
        let sock = UnixStream::from(fd);
        *self.sock.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(sock));
    }

    /// Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (no reply asked for: QEMU then reads the
    /// config space again). `Ok(false)`: the frontend shared no channel.
    pub fn config_changed(&self) -> io::Result<bool> {
        let sock = self
            .sock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(sock) = sock else {
            return Ok(false);
        };
        let request: u32 = vhost::vhost_user::message::BackendReq::CONFIG_CHANGE_MSG.into();
        let mut header = [0u8; HEADER_BYTES];
        header[0..4].copy_from_slice(&request.to_ne_bytes());
        header[4..8].copy_from_slice(&VERSION_1.to_ne_bytes());
        let _writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        send_within(&sock, &header, CHANNEL_WRITE_TIMEOUT)?;
        Ok(true)
    }
}

/// Sends all of `buf` on `sock` within `limit`, never blocking in the kernel: the socket is
/// shared with the frontend, which can change its blocking mode and its send timeout at will,
/// so each send says MSG_DONTWAIT itself, and a full socket is tried again every millisecond
/// until the limit.
fn send_within(sock: &UnixStream, mut buf: &[u8], limit: std::time::Duration) -> io::Result<()> {
    let deadline = std::time::Instant::now() + limit;
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for reads of its length for the whole call, and the
        // descriptor is owned by `sock`, alive for the call.
        let rc = unsafe {
            libc::send(
                sock.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if rc >= 0 {
            // In range: send wrote at most `buf.len()` bytes.
            buf = &buf[rc as usize..];
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the frontend does not read its backend request channel",
                ))
            }
            _ => return Err(e),
        }
    }
    Ok(())
}
