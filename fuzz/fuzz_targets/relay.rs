//! vhost-user messages through the daemon's relay: a fuzzer-made sequence of messages (with
//! memfds, eventfds, pipes or sockets attached), then raw bytes, is written to the frontend side of a
//! running [`Relay`]. The relay must pass every message but GET_INFLIGHT_FD and
//! SET_INFLIGHT_FD through unchanged and in order, answer those two itself (one answer per
//! GET, one per SET that asks for a reply, each well formed, with a file descriptor exactly
//! when a GET answer describes an area), and end both connections when the frontend leaves.

#![no_main]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use qcow2d::inflight::InflightShared;
use qcow2d::relay::{BackendChannel, Relay};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
const SET_VRING_KICK: u32 = 12;
const SET_BACKEND_REQ_FD: u32 = 21;
const SET_MEM_TABLE: u32 = 5;
const ADD_MEM_REG: u32 = 37;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const FLAG_NEED_REPLY: u32 = 0x8;
const MAX_MSG_SIZE: usize = 4096;

#[derive(Arbitrary, Debug)]
enum Request {
    GetInflight,
    SetInflight,
    SetVringKick,
    SetBackendReqFd,
    SetMemTable,
    AddMemReg,
    SetVringCall,
    SetVringErr,
    Other(u32),
}

#[derive(Arbitrary, Debug)]
enum Body {
    Raw(Vec<u8>),
    /// A `VhostUserInflight`: mmap size, mmap offset, queues, queue size (and padding).
    Inflight {
        size: u32,
        offset: u16,
        num_queues: u8,
        queue_size: u16,
    },
    /// A u64 payload (SET_VRING_KICK: queue index and the no-fd bit).
    U64(u64),
    /// Memory regions (SET_MEM_TABLE: a count first; ADD_MEM_REG: a padding u64 first):
    /// guest address, size and file offset in 4 KiB pages.
    Regions {
        with_count: bool,
        regions: Vec<(u16, u16, u16)>,
    },
}

#[derive(Arbitrary, Debug)]
enum Fd {
    None,
    /// A memfd of `pages` × 4 KiB, sealed against shrinking or not.
    Memfd {
        pages: u8,
        seal: bool,
    },
    Eventfd,
    Pipe,
    /// One end of a socket pair (a backend request channel).
    Socket,
    Two,
    /// Memfds of these sizes in 4 KiB pages (memory regions), sealed or not.
    Memfds(Vec<(u8, bool)>),
}

#[derive(Arbitrary, Debug)]
struct Message {
    request: Request,
    flags: u8,
    body: Body,
    fd: Fd,
}

#[derive(Arbitrary, Debug)]
struct Input {
    messages: Vec<Message>,
    /// Sent after the messages, as is.
    tail: Vec<u8>,
}

fn memfd(pages: u8, seal: bool) -> OwnedFd {
    // SAFETY: a NUL-terminated name and valid flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` was just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscalls on an fd we own.
    unsafe {
        assert_eq!(libc::ftruncate(fd.as_raw_fd(), i64::from(pages) << 12), 0);
        if seal {
            libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK);
        }
    }
    fd
}

fn eventfd() -> OwnedFd {
    // SAFETY: valid flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd failed");
    // SAFETY: `fd` was just created and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn pipe() -> OwnedFd {
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both were just created and nothing else owns them; the read end is closed at
    // once, which makes a write to the other end fail with EPIPE rather than block.
    unsafe {
        drop(OwnedFd::from_raw_fd(fds[0]));
        OwnedFd::from_raw_fd(fds[1])
    }
}

/// The message's bytes and descriptors.
fn encode(m: &Message) -> (u32, u32, Vec<u8>, Vec<OwnedFd>) {
    let request = match m.request {
        Request::GetInflight => GET_INFLIGHT_FD,
        Request::SetInflight => SET_INFLIGHT_FD,
        Request::SetVringKick => SET_VRING_KICK,
        Request::SetBackendReqFd => SET_BACKEND_REQ_FD,
        Request::SetMemTable => SET_MEM_TABLE,
        Request::AddMemReg => ADD_MEM_REG,
        Request::SetVringCall => SET_VRING_CALL,
        Request::SetVringErr => SET_VRING_ERR,
        Request::Other(r) => r,
    };
    let flags = 0x1 | u32::from(m.flags & 0xf8);
    let body = match &m.body {
        Body::Raw(b) => b.clone(),
        Body::Inflight {
            size,
            offset,
            num_queues,
            queue_size,
        } => {
            let mut b = vec![0u8; 24];
            b[0..8].copy_from_slice(&u64::from(*size).to_ne_bytes());
            b[8..16].copy_from_slice(&u64::from(*offset).to_ne_bytes());
            b[16..18].copy_from_slice(&u16::from(*num_queues).to_ne_bytes());
            b[18..20].copy_from_slice(&queue_size.to_ne_bytes());
            b
        }
        Body::U64(v) => v.to_ne_bytes().to_vec(),
        Body::Regions {
            with_count,
            regions,
        } => {
            let regions = &regions[..regions.len().min(8)];
            let mut b = Vec::new();
            let count = if *with_count { regions.len() as u32 } else { 0 };
            b.extend_from_slice(&count.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            for &(guest, size, offset) in regions {
                for v in [guest, size, guest.wrapping_add(0x100), offset] {
                    b.extend_from_slice(&(u64::from(v) << 12).to_ne_bytes());
                }
            }
            b
        }
    };
    let fds = match m.fd {
        Fd::None => vec![],
        Fd::Memfd { pages, seal } => vec![memfd(pages, seal)],
        Fd::Eventfd => vec![eventfd()],
        Fd::Pipe => vec![pipe()],
        Fd::Socket => vec![OwnedFd::from(UnixStream::pair().unwrap().0)],
        Fd::Two => vec![eventfd(), memfd(1, true)],
        Fd::Memfds(ref v) => v.iter().take(8).map(|&(p, seal)| memfd(p, seal)).collect(),
    };
    (request, flags, body, fds)
}

/// Everything readable on `sock` until the peer shuts it, and how many descriptors came.
fn read_all(sock: UnixStream) -> (Vec<u8>, usize) {
    let mut bytes = Vec::new();
    let mut fds = 0;
    let mut buf = [0u8; 4096];
    loop {
        let mut raw = [-1 as RawFd; 8];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec covers `buf`, a live local array; `raw` receives descriptors.
        match unsafe { sock.recv_with_fds(&mut iov, &mut raw) } {
            Ok((0, _)) => break,
            Ok((n, nfds)) => {
                for &fd in &raw[..nfds] {
                    // SAFETY: just received; nothing else owns it.
                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                }
                fds += nfds;
                bytes.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => panic!("reading from the relay: {e}"),
        }
    }
    (bytes, fds)
}

fn run(input: Input) {
    let (frontend, relay_frontend) = UnixStream::pair().unwrap();
    let (backend, relay_backend) = UnixStream::pair().unwrap();
    let relay = Relay::start(
        relay_frontend,
        relay_backend,
        None,
        Arc::new(InflightShared::default()),
        Arc::new(BackendChannel::default()),
        "fuzz",
    )
    .unwrap();
    let backend_reader = std::thread::spawn(move || read_all(backend));
    let replies = frontend.try_clone().unwrap();
    let reply_reader = std::thread::spawn(move || read_all(replies));

    // What the backend must see, and the answers the frontend must get: (request, body size).
    let mut passed: Vec<Vec<u8>> = Vec::new();
    let mut answers: Vec<(u32, u32)> = Vec::new();
    let mut complete = true;
    // Messages whose descriptors the relay checks may be refused, which ends the connection
    // (with an error answer when one is asked for): then only a prefix is passed on.
    let mut checked = false;
    for m in input.messages.iter().take(64) {
        let (request, flags, body, fds) = encode(m);
        let mut bytes = Vec::with_capacity(12 + body.len());
        bytes.extend_from_slice(&request.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&(body.len() as u32).to_ne_bytes());
        bytes.extend_from_slice(&body);
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        if frontend.send_with_fds(&[&bytes[..]], &raw).is_err() {
            complete = false;
            break;
        }
        if body.len() > MAX_MSG_SIZE {
            complete = false;
            break;
        }
        match request {
            GET_INFLIGHT_FD => answers.push((request, 24)),
            SET_INFLIGHT_FD => {
                if flags & FLAG_NEED_REPLY != 0 {
                    answers.push((request, 8));
                }
            }
            SET_MEM_TABLE | ADD_MEM_REG | SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => {
                checked = true;
                passed.push(bytes);
            }
            _ => passed.push(bytes),
        }
    }
    let _ = (&frontend).write_all(&input.tail);
    let _ = frontend.shutdown(std::net::Shutdown::Write);
    let (forwarded, _) = backend_reader.join().unwrap();
    let (replied, fds) = reply_reader.join().unwrap();
    relay.stop();

    // The backend got whole messages, unchanged and in order: all of them, or (after a
    // refusal or with raw bytes at the end) the first few, and with raw bytes maybe more.
    let mut pos = 0;
    let mut whole = 0;
    while whole < passed.len() && forwarded[pos..].starts_with(&passed[whole]) {
        pos += passed[whole].len();
        whole += 1;
    }
    let all = whole == passed.len();
    assert!(
        pos == forwarded.len() || (all && !input.tail.is_empty()),
        "the backend did not get the frontend's messages unchanged and in order \
         ({whole} of {} whole, {} bytes more)",
        passed.len(),
        forwarded.len() - pos
    );
    assert!(all || checked || !complete, "messages were lost");
    if !complete || checked {
        // Every answer is still a well-formed reply of 8 or 24 bytes.
        let mut at = 0;
        while let Some(header) = replied.get(at..at + 12) {
            let field = |i: usize| u32::from_ne_bytes(header[4 * i..4 * i + 4].try_into().unwrap());
            if !input.tail.is_empty() {
                break;
            }
            assert_eq!(field(1), 0x1 | 0x4, "answer flags");
            assert!(matches!(field(2), 8 | 24), "answer size {}", field(2));
            at += 12 + field(2) as usize;
        }
        return;
    }
    // The answers: headers with the reply flag, the request and the expected size.
    let mut at = 0;
    let mut with_area = 0;
    for &(request, size) in &answers {
        let header = replied
            .get(at..at + 12)
            .unwrap_or_else(|| panic!("missing answer to request {request}"));
        let field = |i: usize| u32::from_ne_bytes(header[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(field(0), request, "answer to the wrong request");
        assert_eq!(field(1), 0x1 | 0x4, "answer flags");
        assert_eq!(field(2), size, "answer size");
        let body = &replied[at + 12..at + 12 + size as usize];
        if request == GET_INFLIGHT_FD && u64::from_ne_bytes(body[0..8].try_into().unwrap()) != 0 {
            with_area += 1;
        }
        at += 12 + size as usize;
    }
    if input.tail.is_empty() {
        assert_eq!(at, replied.len(), "answers nobody asked for");
        assert_eq!(
            fds, with_area,
            "descriptors do not match the areas described"
        );
    }
    let mut sink = Vec::new();
    let _ = (&frontend).read_to_end(&mut sink);
}

fuzz_target!(
    init: {
        // As in the daemon (Rust's runtime does it before `main`, libFuzzer's `main` does
        // not): a write to a closed pipe or socket is EPIPE, not a signal.
        // SAFETY: setting a signal's disposition to SIG_IGN, before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    },
    |input: Input| run(input)
);
