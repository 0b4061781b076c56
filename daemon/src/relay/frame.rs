//! vhost-user framing for the relay: a message with the descriptors that came with it, read
//! from a non-blocking socket across partial reads ([`Reader`]) and written out across partial
//! writes ([`Outgoing`]). Used by the relay thread only.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::message::{MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Bytes of a vhost-user message header: request, flags, size (native-endian u32 each).
pub(super) const HEADER_BYTES: usize = 12;
/// Header flags: protocol version 1, and the reply bit.
pub(super) const VERSION_1: u32 = 0x1;
pub(super) const FLAG_REPLY: u32 = 0x4;
pub(super) const FLAG_NEED_REPLY: u32 = 0x8;

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum FrameError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection in the middle of a message")]
    Truncated,
    #[error("message {request} has a {size}-byte body, above the {MAX_MSG_SIZE}-byte limit")]
    TooLarge { request: u32, size: u32 },
    #[error("more than {MAX_ATTACHED_FD_ENTRIES} file descriptors attached to a message")]
    TooManyFds,
}

/// One vhost-user message and the file descriptors that came with it.
pub(super) struct Message {
    pub(super) header: [u8; HEADER_BYTES],
    pub(super) body: Vec<u8>,
    pub(super) fds: Vec<OwnedFd>,
}

impl Message {
    pub(super) fn field(&self, i: usize) -> u32 {
        let b = &self.header[4 * i..4 * i + 4];
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    }

    pub(super) fn request(&self) -> u32 {
        self.field(0)
    }

    pub(super) fn flags(&self) -> u32 {
        self.field(1)
    }

    pub(super) fn need_reply(&self) -> bool {
        self.flags() & FLAG_NEED_REPLY != 0
    }

    /// A reply to this message with `body` and `fds`.
    pub(super) fn reply(&self, body: Vec<u8>, fds: Vec<OwnedFd>) -> Message {
        let mut header = [0u8; HEADER_BYTES];
        header[0..4].copy_from_slice(&self.request().to_ne_bytes());
        header[4..8].copy_from_slice(&(VERSION_1 | FLAG_REPLY).to_ne_bytes());
        // Bodies we build are at most 24 bytes.
        header[8..12].copy_from_slice(&(body.len() as u32).to_ne_bytes());
        Message { header, body, fds }
    }

    pub(super) fn u64_at(&self, at: usize) -> Option<u64> {
        let b = self.body.get(at..at + 8)?;
        Some(u64::from_ne_bytes(b.try_into().ok()?))
    }

    pub(super) fn u16_at(&self, at: usize) -> Option<u16> {
        let b = self.body.get(at..at + 2)?;
        Some(u16::from_ne_bytes(b.try_into().ok()?))
    }
}

/// What a [`Reader`] got from its socket this time.
pub(super) enum Received {
    /// A whole message, with the descriptors that came with it.
    Message(Message),
    /// The socket has nothing more for now (what came is kept for the next time).
    WouldBlock,
    /// The peer closed the connection between two messages.
    Closed,
}

/// One message being assembled from a socket across partial reads.
pub(super) struct Reader {
    pub(super) header: [u8; HEADER_BYTES],
    /// Sized from the header once it is whole.
    pub(super) body: Vec<u8>,
    /// Bytes of the message received so far (header, then body).
    pub(super) got: usize,
    pub(super) fds: Vec<OwnedFd>,
}

impl Reader {
    pub(super) fn new() -> Reader {
        Reader {
            header: [0; HEADER_BYTES],
            body: Vec::new(),
            got: 0,
            fds: Vec::new(),
        }
    }

    /// Bytes held for the message being assembled.
    pub(super) fn held_bytes(&self) -> usize {
        if self.got == 0 {
            0
        } else {
            HEADER_BYTES + self.body.len()
        }
    }

    /// Receives what `sock` has of the current message (all of it, on a blocking socket),
    /// never past its end, with the descriptors that come with its bytes.
    pub(super) fn read(&mut self, sock: &UnixStream) -> Result<Received, FrameError> {
        loop {
            let rest = if self.got < HEADER_BYTES {
                &mut self.header[self.got..]
            } else {
                &mut self.body[self.got - HEADER_BYTES..]
            };
            let mut iov = [libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            }];
            let mut raw = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
            // SAFETY: the iovec covers `rest`, a live, exclusively borrowed byte slice, which
            // may hold any bytes; `raw` is a local array the call fills with received
            // descriptors.
            let received = unsafe { sock.recv_with_fds(&mut iov, &mut raw) };
            let (n, nfds) = match received {
                Ok(v) => v,
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) if e.errno() == libc::EAGAIN => return Ok(Received::WouldBlock),
                // Too many descriptors: the library closed them all.
                Err(e) if e.errno() == libc::ENOBUFS => return Err(FrameError::TooManyFds),
                Err(e) => return Err(FrameError::Io(io::Error::from_raw_os_error(e.errno()))),
            };
            for &fd in &raw[..nfds.min(raw.len())] {
                // SAFETY: recvmsg just created this descriptor in our table for us; nothing
                // else owns it.
                self.fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            if self.fds.len() > MAX_ATTACHED_FD_ENTRIES {
                return Err(FrameError::TooManyFds);
            }
            if n == 0 {
                if self.got == 0 && self.fds.is_empty() {
                    return Ok(Received::Closed);
                }
                return Err(FrameError::Truncated);
            }
            self.got += n;
            if self.got == HEADER_BYTES {
                let size = u32::from_ne_bytes([
                    self.header[8],
                    self.header[9],
                    self.header[10],
                    self.header[11],
                ]);
                if size as usize > MAX_MSG_SIZE {
                    let request = u32::from_ne_bytes([
                        self.header[0],
                        self.header[1],
                        self.header[2],
                        self.header[3],
                    ]);
                    return Err(FrameError::TooLarge { request, size });
                }
                self.body = vec![0u8; size as usize];
            }
            if self.got >= HEADER_BYTES && self.got == HEADER_BYTES + self.body.len() {
                self.got = 0;
                return Ok(Received::Message(Message {
                    header: self.header,
                    body: std::mem::take(&mut self.body),
                    fds: std::mem::take(&mut self.fds),
                }));
            }
        }
    }
}

/// A message on its way out, and how much of it has gone.
pub(super) struct Outgoing {
    pub(super) msg: Message,
    pub(super) sent: usize,
    /// SET_VRING_KICK: kick the queue once the message is out.
    pub(super) kick: bool,
}

impl Outgoing {
    pub(super) fn new(msg: Message) -> Outgoing {
        Outgoing {
            msg,
            sent: 0,
            kick: false,
        }
    }

    pub(super) fn len(&self) -> usize {
        HEADER_BYTES + self.msg.body.len()
    }

    /// Sends what `sock` takes of the rest of the message, its descriptors with its first
    /// byte. `Ok(true)` once all of it has gone (on a blocking socket, always).
    pub(super) fn send(&mut self, sock: &UnixStream) -> io::Result<bool> {
        let fds: Vec<RawFd> = self.msg.fds.iter().map(AsRawFd::as_raw_fd).collect();
        while self.sent < self.len() {
            let (header, body) = if self.sent < HEADER_BYTES {
                (&self.msg.header[self.sent..], &self.msg.body[..])
            } else {
                (&[][..], &self.msg.body[self.sent - HEADER_BYTES..])
            };
            let attach: &[RawFd] = if self.sent == 0 { &fds } else { &[] };
            match sock.send_with_fds(&[header, body], attach) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.errno() == libc::EINTR => {}
                Err(e) if e.errno() == libc::EAGAIN => return Ok(false),
                Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
            }
        }
        Ok(true)
    }
}
