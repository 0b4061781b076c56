//! A raw vhost-user-blk frontend with its own guest memory, for tests that play a hostile
//! frontend or guest: memory tables that lie about their files, rings anywhere, descriptor
//! chains of any shape (indirect tables, overlapping buffers), eventfds that are not eventfds.
//!
//! Messages go through vhost's own frontend (`vhost::vhost_user::Frontend`, with REPLY_ACK, so
//! a refused message is an error here); the guest memory is a memfd mapped here and written
//! with plain copies; split rings are laid out and driven by hand. Messages vhost's frontend
//! would not send (unknown codes, wrong sizes, any descriptors) go through a [`Wire`]: raw
//! bytes on the same socket or a new one. Every wait is bounded.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;
/// virtio-blk request types.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;

/// Feature bits the frontend accepts when the device offers them: VERSION_1, INDIRECT_DESC,
/// EVENT_IDX, vhost-user protocol features, SIZE_MAX, SEG_MAX, RO, BLK_SIZE, FLUSH, MQ.
const WANTED_FEATURES: u64 = (1 << 32)
    | (1 << 28)
    | (1 << 29)
    | (1 << 30)
    | (1 << 1)
    | (1 << 2)
    | (1 << 5)
    | (1 << 6)
    | (1 << 9)
    | (1 << 12);

/// The knob that reserves huge pages of `page` bytes:
/// `/sys/kernel/mm/hugepages/hugepages-<KiB>kB/nr_hugepages` (for the default size, 2 MiB on
/// x86-64, the same number as `/proc/sys/vm/nr_hugepages`). It is absent when the kernel or
/// the CPU has no pages of that size.
pub fn huge_page_knob(page: usize) -> std::path::PathBuf {
    format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages",
        page >> 10
    )
    .into()
}

/// How many huge pages of `page` bytes are reserved ([`huge_page_knob`]), `None` when the
/// kernel has none of that size.
pub fn reserved_huge_pages(page: usize) -> Option<u64> {
    std::fs::read_to_string(huge_page_knob(page))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// How many of the reserved huge pages of `page` bytes are free (`free_hugepages` beside
/// [`huge_page_knob`]), `None` when the kernel has none of that size.
pub fn free_huge_pages(page: usize) -> Option<u64> {
    std::fs::read_to_string(huge_page_knob(page).with_file_name("free_hugepages"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// A memfd of `len` bytes (a multiple of `page`) on huge pages of `page` bytes, made with
/// MFD_HUGETLB and the size's MFD_HUGE_* flag, with MFD_ALLOW_SEALING when `sealable` (the
/// daemon then seals it) and without it otherwise, and not mapped: no huge page is taken from
/// the host's reserve until someone maps it without MAP_NORESERVE. Fails when the kernel has
/// no pages of that size ([`huge_page_knob`] is absent).
pub fn huge_memfd(len: usize, page: usize, sealable: bool) -> std::io::Result<File> {
    // MFD_HUGE_2MB, MFD_HUGE_1GB: the page size's log2 in the flag's bits.
    let mut flags =
        libc::MFD_CLOEXEC | libc::MFD_HUGETLB | page.trailing_zeros() << libc::MFD_HUGE_SHIFT;
    if sealable {
        flags |= libc::MFD_ALLOW_SEALING;
    }
    // SAFETY: memfd_create with a C string literal and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"hostile-huge-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64)?;
    Ok(file)
}

/// Guest memory: a memfd mapped shared into this process.
pub struct GuestRam {
    pub file: File,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, only accessed through copies.
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// `len` bytes of zeroed guest memory in a new memfd, sealable (`MFD_ALLOW_SEALING`) or not.
    pub fn new(len: usize, sealable: bool) -> GuestRam {
        let mut flags = libc::MFD_CLOEXEC;
        if sealable {
            flags |= libc::MFD_ALLOW_SEALING;
        }
        // SAFETY: memfd_create with a C string literal and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"hostile-guest-ram".as_ptr(), flags) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).expect("size the guest memory");
        // SAFETY: maps `len` bytes of a file of that size, shared; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap guest memory");
        GuestRam {
            file,
            ptr: ptr.cast(),
            len,
        }
    }

    /// `len` bytes (a multiple of `page`) of zeroed guest memory on huge pages of `page` bytes
    /// (2 MiB, or 1 GiB: a gigantic page), mapped and populated here: a memfd made with
    /// MFD_HUGETLB and the size's MFD_HUGE_* flag ([`huge_memfd`]), sealable or not (as the
    /// hugetlbfs files of QEMU's `memory-backend-file,mem-path=/dev/hugepages` cannot be
    /// sealed). Panics, naming [`huge_page_knob`], when the host has no huge pages of that
    /// size to give.
    pub fn huge(len: usize, page: usize, sealable: bool) -> GuestRam {
        assert!(
            page.is_power_of_two() && len.is_multiple_of(page),
            "test setup: {len} bytes of {page}-byte pages"
        );
        let knob = huge_page_knob(page);
        let short = |what: &str, e: std::io::Error| -> ! {
            let reserved =
                std::fs::read_to_string(&knob).unwrap_or_else(|e| format!("unreadable ({e})"));
            panic!(
                "{what} of {len} bytes of guest memory on huge pages of {} KiB failed: {e}; \
                 this test needs {} such pages reserved (as root: `echo {} > {}`, which \
                 .ci/run does; it is {})",
                page >> 10,
                len / page,
                len / page,
                knob.display(),
                reserved.trim()
            )
        };
        let file = match huge_memfd(len, page, sealable) {
            Ok(file) => file,
            Err(e) => short("memfd_create(MFD_HUGETLB) and ftruncate", e),
        };
        // SAFETY: maps `len` bytes of a file of that size, shared; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            short("mmap", std::io::Error::last_os_error());
        }
        GuestRam {
            file,
            ptr: ptr.cast(),
            len,
        }
    }

    /// Where the memory is mapped here (the region's `userspace_addr`).
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// The size of the guest memory in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true for a mapping made by [`GuestRam::new`]; here for the `len` convention.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn write(&self, at: u64, bytes: &[u8]) {
        let at = at as usize;
        assert!(
            at + bytes.len() <= self.len,
            "test setup: write past guest memory"
        );
        // SAFETY: in bounds of our own mapping (checked); the device may access it at the same
        // time, which only races on bytes, as a real guest's memory does.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(at), bytes.len()) };
    }

    pub fn read(&self, at: u64, out: &mut [u8]) {
        let at = at as usize;
        assert!(
            at + out.len() <= self.len,
            "test setup: read past guest memory"
        );
        // SAFETY: as for `write`.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), out.as_mut_ptr(), out.len()) };
    }

    pub fn read_u16(&self, at: u64) -> u16 {
        let mut b = [0u8; 2];
        self.read(at, &mut b);
        u16::from_le_bytes(b)
    }

    /// Writes one split-ring descriptor at `at`.
    pub fn write_desc(&self, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(at, &d);
    }

    /// Writes a `virtio_blk_outhdr` at `at`.
    pub fn write_header(&self, at: u64, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.write(at, &h);
    }

    /// Writes an indirect table at `at`: a header descriptor (16 bytes at `header`), the
    /// `data` buffers (address, length), all device-writable when `write` (a read), and a
    /// one-byte status at `status`. Returns the table's length in bytes.
    pub fn write_request_table(
        &self,
        at: u64,
        header: u64,
        data: &[(u64, u32)],
        writable: bool,
        status: u64,
    ) -> u32 {
        let n = data.len() + 2;
        let mut table = Vec::with_capacity(16 * n);
        let mut push = |addr: u64, len: u32, flags: u16, next: u16| {
            table.extend_from_slice(&addr.to_le_bytes());
            table.extend_from_slice(&len.to_le_bytes());
            table.extend_from_slice(&flags.to_le_bytes());
            table.extend_from_slice(&next.to_le_bytes());
        };
        push(header, 16, F_NEXT, 1);
        let data_flags = F_NEXT | if writable { F_WRITE } else { 0 };
        for (i, &(addr, len)) in data.iter().enumerate() {
            push(addr, len, data_flags, (i + 2) as u16);
        }
        push(status, 1, F_WRITE, 0);
        self.write(at, &table);
        table.len() as u32
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; nothing uses the pointer afterwards.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One split virtqueue this frontend drives: its rings live in guest memory at `base`
/// (descriptor table, then the available ring at +0x800, the used ring at +0x1000).
pub struct RawQueue {
    pub base: u64,
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

impl RawQueue {
    pub fn desc_addr(&self) -> u64 {
        self.base
    }
    pub fn avail_addr(&self) -> u64 {
        self.base + 0x800
    }
    pub fn used_addr(&self) -> u64 {
        self.base + 0x1000
    }
}

/// A vhost-user-blk frontend speaking the protocol itself.
pub struct RawFrontend {
    pub fe: Frontend,
    pub queues: Vec<Option<RawQueue>>,
}

fn err(what: &str, e: impl std::fmt::Debug) -> String {
    format!("{what}: {e:?}")
}

impl RawFrontend {
    /// Connects and negotiates features (every later request asks for an answer).
    pub fn connect(socket: &Path, num_queues: usize) -> Result<RawFrontend, String> {
        let mut fe = Frontend::connect(socket, num_queues as u64).map_err(|e| err("connect", e))?;
        fe.set_owner().map_err(|e| err("SET_OWNER", e))?;
        let offered = fe.get_features().map_err(|e| err("GET_FEATURES", e))?;
        fe.set_features(offered & WANTED_FEATURES)
            .map_err(|e| err("SET_FEATURES", e))?;
        let protocol = fe
            .get_protocol_features()
            .map_err(|e| err("GET_PROTOCOL_FEATURES", e))?;
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG;
        fe.set_protocol_features(protocol & wanted)
            .map_err(|e| err("SET_PROTOCOL_FEATURES", e))?;
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        Ok(RawFrontend {
            fe,
            queues: (0..num_queues).map(|_| None).collect(),
        })
    }

    /// SET_MEM_TABLE: one region at guest address 0 of `declared` bytes over `ram`'s file.
    pub fn set_memory(&mut self, ram: &GuestRam, declared: u64) -> Result<(), String> {
        self.fe
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: declared,
                userspace_addr: ram.addr(),
                mmap_offset: 0,
                mmap_handle: ram.file.as_raw_fd(),
            }])
            .map(|_| ())
            .map_err(|e| err("SET_MEM_TABLE", e))
    }

    /// Sets up and enables queue `q` of `size` entries with its rings at guest address
    /// `base` of `ram` (whose region starts at guest address 0), with the given call and kick
    /// descriptors (normally fresh eventfds: [`RawFrontend::start_queue`]).
    pub fn start_queue_with(
        &mut self,
        ram: &GuestRam,
        q: usize,
        size: u16,
        base: u64,
        call: EventFd,
        kick: EventFd,
    ) -> Result<(), String> {
        let queue = RawQueue {
            base,
            size,
            next_desc: 0,
            avail_idx: 0,
            kick,
            call,
        };
        let hva = |gpa: u64| ram.addr() + gpa;
        self.fe
            .set_vring_num(q, size)
            .map_err(|e| err("SET_VRING_NUM", e))?;
        self.fe
            .set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: size,
                    queue_size: size,
                    flags: 0,
                    desc_table_addr: hva(queue.desc_addr()),
                    used_ring_addr: hva(queue.used_addr()),
                    avail_ring_addr: hva(queue.avail_addr()),
                    log_addr: None,
                },
            )
            .map_err(|e| err("SET_VRING_ADDR", e))?;
        self.fe
            .set_vring_base(q, 0)
            .map_err(|e| err("SET_VRING_BASE", e))?;
        self.fe
            .set_vring_call(q, &queue.call)
            .map_err(|e| err("SET_VRING_CALL", e))?;
        self.fe
            .set_vring_kick(q, &queue.kick)
            .map_err(|e| err("SET_VRING_KICK", e))?;
        self.fe
            .set_vring_enable(q, true)
            .map_err(|e| err("SET_VRING_ENABLE", e))?;
        self.queues[q] = Some(queue);
        Ok(())
    }

    /// Queue `q` with fresh eventfds and its rings at `q * 0x2000` of `ram`.
    pub fn start_queue(&mut self, ram: &GuestRam, q: usize, size: u16) -> Result<(), String> {
        let call = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| err("eventfd", e))?;
        let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| err("eventfd", e))?;
        self.start_queue_with(ram, q, size, q as u64 * 0x2000, call, kick)
    }

    /// Makes available on queue `q` a chain of one indirect descriptor pointing at the table
    /// of `table_len` bytes at `table` (see [`GuestRam::write_request_table`]), and kicks.
    pub fn push_indirect(&mut self, ram: &GuestRam, q: usize, table: u64, table_len: u32) {
        self.add_indirect(ram, q, table, table_len);
        self.kick(q);
    }

    /// Kicks queue `q`.
    pub fn kick(&self, q: usize) {
        let queue = self.queues[q].as_ref().expect("queue started");
        let _ = queue.kick.write(1);
    }

    /// As [`RawFrontend::push_indirect`], without the kick.
    pub fn add_indirect(&mut self, ram: &GuestRam, q: usize, table: u64, table_len: u32) {
        let queue = self.queues[q].as_mut().expect("queue started");
        let head = queue.next_desc;
        queue.next_desc = (queue.next_desc + 1) % queue.size;
        ram.write_desc(
            queue.desc_addr() + 16 * u64::from(head),
            table,
            table_len,
            F_INDIRECT,
            0,
        );
        self.make_available(ram, q, head);
    }

    /// Makes available on queue `q` the chain that starts at descriptor `head` of its table
    /// (written by the caller: [`GuestRam::write_desc`] at `desc_addr() + 16 * index`; the
    /// indirect requests of [`RawFrontend::add_indirect`] take the table's first entries, one
    /// each, from 0 on), and kicks.
    pub fn push_head(&mut self, ram: &GuestRam, q: usize, head: u16) {
        self.make_available(ram, q, head);
        self.kick(q);
    }

    fn make_available(&mut self, ram: &GuestRam, q: usize, head: u16) {
        let queue = self.queues[q].as_mut().expect("queue started");
        let slot = queue.avail_addr() + 4 + 2 * u64::from(queue.avail_idx % queue.size);
        ram.write(slot, &head.to_le_bytes());
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        ram.write(queue.avail_addr() + 2, &queue.avail_idx.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }

    /// The used index of queue `q`.
    pub fn used_idx(&self, ram: &GuestRam, q: usize) -> u16 {
        let queue = self.queues[q].as_ref().expect("queue started");
        ram.read_u16(queue.used_addr() + 2)
    }

    /// Waits until queue `q` has returned `n` chains in all.
    pub fn wait_used(
        &self,
        ram: &GuestRam,
        q: usize,
        n: u16,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let used = self.used_idx(ram, q);
            if used == n {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "queue {q}: {used} of {n} chains returned after {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The daemon's memory as `/proc/PID/status` reports it, in KiB: (VmRSS, RssAnon).
pub fn rss_kib(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

/// Header flags of a vhost-user message: protocol version 1, and "reply wanted".
pub const VERSION_1: u32 = 0x1;
pub const NEED_REPLY: u32 = 0x8;

/// One message the daemon sent on a [`Wire`].
#[derive(Debug)]
pub struct WireMsg {
    pub request: u32,
    pub flags: u32,
    pub body: Vec<u8>,
}

impl WireMsg {
    /// The body's u64 at byte `at` (a REPLY_ACK status, a feature set), if the body has one.
    pub fn u64_at(&self, at: usize) -> Option<u64> {
        let b = self.body.get(at..at + 8)?;
        Some(u64::from_ne_bytes(b.try_into().ok()?))
    }
}

/// A vhost-user connection spoken in raw bytes: any request code, flags, size field, body
/// and descriptors, and the daemon's answers read as they come. Every read waits at most the
/// time it is given.
pub struct Wire {
    pub sock: UnixStream,
}

impl Wire {
    /// A new connection to `socket`, nothing sent yet.
    pub fn connect(socket: &Path) -> Result<Wire, String> {
        UnixStream::connect(socket)
            .map(|sock| Wire { sock })
            .map_err(|e| format!("connect to {}: {e}", socket.display()))
    }

    /// The socket of `fe` (a duplicate descriptor): raw messages after an honest set-up. The
    /// caller reads every answer its messages ask for, so the framing stays whole.
    pub fn of(fe: &RawFrontend) -> Wire {
        // SAFETY: dup of a descriptor `fe` keeps open; the new one is owned by the stream.
        let fd = unsafe { libc::fcntl(fe.fe.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        assert!(fd >= 0, "dup: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        let sock = unsafe { UnixStream::from_raw_fd(fd) };
        Wire { sock }
    }

    /// Sends `bytes` as they are, `fds` with the first byte.
    pub fn send_bytes(&self, bytes: &[u8], fds: &[RawFd]) -> Result<(), String> {
        let mut sent = 0;
        while sent < bytes.len() {
            let attach: &[RawFd] = if sent == 0 { fds } else { &[] };
            match self.sock.send_with_fds(&[&bytes[sent..]], attach) {
                Ok(n) => sent += n,
                Err(e) if e.errno() == libc::EINTR => {}
                Err(e) => return Err(format!("send: {e}")),
            }
        }
        Ok(())
    }

    /// Sends one message: `request`, `flags`, a size field of `body.len()`, `body`, `fds`.
    pub fn send(&self, request: u32, flags: u32, body: &[u8], fds: &[RawFd]) -> Result<(), String> {
        self.send_bytes(&message(request, flags, body.len() as u32, body), fds)
    }

    /// Sends `request` asking for an answer, and returns the answer (`None`: the daemon closed
    /// the connection instead).
    pub fn ask(
        &self,
        request: u32,
        body: &[u8],
        fds: &[RawFd],
        timeout: Duration,
    ) -> Result<Option<WireMsg>, String> {
        self.send(request, VERSION_1 | NEED_REPLY, body, fds)?;
        self.recv(timeout)
    }

    /// The next message from the daemon; `None` when it closed the connection (between two
    /// messages); an error if nothing whole came within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Option<WireMsg>, String> {
        let deadline = Instant::now() + timeout;
        let mut header = [0u8; 12];
        if !self.read_exact(&mut header, deadline, true)? {
            return Ok(None);
        }
        let field = |i: usize| u32::from_ne_bytes(header[4 * i..4 * i + 4].try_into().unwrap());
        let mut body = vec![0u8; field(2) as usize];
        if !self.read_exact(&mut body, deadline, false)? {
            return Err("the daemon closed the connection in the middle of a message".into());
        }
        Ok(Some(WireMsg {
            request: field(0),
            flags: field(1),
            body,
        }))
    }

    /// Fills `buf`; `false` if the connection ended before its first byte (only allowed when
    /// `at_start`).
    fn read_exact(
        &self,
        buf: &mut [u8],
        deadline: Instant,
        at_start: bool,
    ) -> Result<bool, String> {
        let mut got = 0;
        while got < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("{got} of {} bytes came in time", buf.len()));
            }
            self.sock
                .set_read_timeout(Some(left.min(Duration::from_millis(200))))
                .map_err(|e| format!("set_read_timeout: {e}"))?;
            match (&self.sock).read(&mut buf[got..]) {
                Ok(0) | Err(_) if got == 0 && at_start && self.ended() => return Ok(false),
                Ok(0) => return Err(format!("end of connection after {got} bytes")),
                Ok(n) => got += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset && got == 0 && at_start => {
                    return Ok(false)
                }
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        Ok(true)
    }

    /// Whether the daemon has closed (or reset) the connection: a zero-byte peek.
    fn ended(&self) -> bool {
        let mut b = [0u8; 1];
        // SAFETY: recv into a one-byte local buffer; MSG_PEEK | MSG_DONTWAIT leave the socket
        // as it was.
        let n = unsafe {
            libc::recv(
                self.sock.as_raw_fd(),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n == 0
            || (n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECONNRESET))
    }

    /// Waits until the daemon closes the connection, dropping what it sends meanwhile (its
    /// answers to the messages before); an error if it is still open after `timeout`.
    pub fn wait_closed(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("the connection is still open after {timeout:?}"));
            }
            match self.recv(left) {
                Ok(None) => return Ok(()),
                Ok(Some(_)) => {}
                Err(_) if self.ended() => return Ok(()),
                Err(e) => return Err(format!("the connection stayed open: {e}")),
            }
        }
    }
}

/// The bytes of one vhost-user message with any size field (`size` need not be the body's).
pub fn message(request: u32, flags: u32, size: u32, body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(12 + body.len());
    bytes.extend_from_slice(&request.to_ne_bytes());
    bytes.extend_from_slice(&flags.to_ne_bytes());
    bytes.extend_from_slice(&size.to_ne_bytes());
    bytes.extend_from_slice(body);
    bytes
}
