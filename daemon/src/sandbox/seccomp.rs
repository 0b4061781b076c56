//! Per-thread seccomp-BPF filters: each daemon thread keeps only the system calls its role
//! needs.
//!
//! [`configure`] runs once on the main thread at start-up, before any other thread exists:
//! it compiles one filter per [`Role`] with rust-vmm's `seccompiler` and, for
//! [`SeccompMode::Trap`], installs the SIGSYS handler. Each thread then calls [`enter`] with
//! its role once its set-up is done (the main thread last, after starting the others). A
//! filter lasts for the thread's life and is inherited by the threads it starts, which add
//! their own on top: the kernel runs every filter of a thread and takes the strictest answer,
//! so a thread can only ever narrow what its parent allowed. The roles and who starts whom:
//!
//! - `main` (the supervisor) starts the signal, metrics, control, inflate, relay, core and
//!   listener threads, then keeps what adding exports at run time needs (opening and locking images,
//!   reading the config file, binding sockets, adding them to the listener's epoll set:
//!   everything `export` has and more) and what a stop needs;
//! - `export` (the listener thread, and the threads it starts to tear connections down and
//!   close images, which inherit its filter and only record the role) accepts frontends and
//!   builds everything a connection needs (engine shards and their io_urings, eventfds and
//!   epoll sets, the private socket pair between the relay and the connection's request
//!   handler, handing a connection to the relay thread and its workers to the core threads),
//!   and closes images (writes, syncs, lock release), so its filter is the widest but
//!   opens no file;
//! - `worker` (the core threads, one per CPU, which run every connection's workers, the
//!   engine shards) polls epoll and the shards' io_urings; it takes its filter as it starts;
//! - `relay` (the one relay thread of every connection: epoll, messages with descriptors,
//!   the checks of those descriptors, in-flight areas, and every connection's vhost-user
//!   request handler: mapping guest memory, adding kick eventfds to the workers' epoll sets),
//!   `signals`, `metrics`, `inflate`,
//!   `control` (the control socket's listener; its connection threads inherit its filter):
//!   what their loops do, nothing else.
//!
//! Every filter also allows what the runtime does behind the code's back (mimalloc and libc
//! memory management, futexes, clocks, thread exit, logging to stderr). Memory can never be
//! mapped or made executable. What a violation does is the mode's: `kill` ends the process
//! (the kernel logs the thread and system call), `trap` prints the thread's name and the
//! system call number to stderr, then ends the process with SIGSYS, `log` lets the call
//! through and the kernel logs it (audit log, or the kernel log), `none` installs nothing.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a system call outside a thread's filter does (`--seccomp`, `seccomp = "..."`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// The process is killed (SIGSYS); the kernel logs the call.
    #[default]
    Kill,
    /// A SIGSYS handler prints the thread and the call to stderr, then the process is killed.
    Trap,
    /// The call goes through; the kernel logs it.
    Log,
    /// No filter at all.
    None,
}

impl SeccompMode {
    /// Parses `kill`, `trap`, `log` or `none`.
    pub fn parse(value: &str) -> Option<SeccompMode> {
        match value {
            "kill" => Some(SeccompMode::Kill),
            "trap" => Some(SeccompMode::Trap),
            "log" => Some(SeccompMode::Log),
            "none" => Some(SeccompMode::None),
            _ => None,
        }
    }

    /// The mode's name.
    pub fn name(self) -> &'static str {
        match self {
            SeccompMode::Kill => "kill",
            SeccompMode::Trap => "trap",
            SeccompMode::Log => "log",
            SeccompMode::None => "none",
        }
    }
}

/// What a thread does, and so which system calls it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The main thread once everything is started.
    Main,
    /// The thread that waits for SIGINT and SIGTERM.
    Signals,
    /// The metrics HTTP endpoint.
    Metrics,
    /// The listener thread (every export's socket) and the threads it starts: sets up each
    /// connection and its threads, tears connections down, closes images.
    Export,
    /// A vring worker thread (an engine shard).
    Worker,
    /// The relay thread: every connection's messages, and each connection's vhost-user
    /// request handler.
    Relay,
    /// An engine inflate worker.
    Inflate,
    /// The control socket's listener and connection threads.
    Control,
}

const ROLES: [Role; 8] = [
    Role::Main,
    Role::Signals,
    Role::Metrics,
    Role::Export,
    Role::Worker,
    Role::Relay,
    Role::Inflate,
    Role::Control,
];

impl Role {
    fn index(self) -> usize {
        self as usize
    }

    /// The role's name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::Signals => "signals",
            Role::Metrics => "metrics",
            Role::Export => "export",
            Role::Worker => "worker",
            Role::Relay => "relay",
            Role::Inflate => "inflate",
            Role::Control => "control",
        }
    }
}

/// Failures to build or install a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused a rule or the architecture.
    #[error("Cannot build the seccomp filter of the {role} threads")]
    Build {
        /// The role.
        role: &'static str,
        /// seccompiler's error.
        #[source]
        source: seccompiler::Error,
    },
    /// The kernel refused the filter.
    #[error("Cannot install the seccomp filter of the {role} threads")]
    Install {
        /// The role.
        role: &'static str,
        /// seccompiler's error.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler cannot be installed.
    #[error("Cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

struct Filters {
    mode: SeccompMode,
    programs: Vec<BpfProgram>,
    /// Installed over every role's filter but the main thread's: opening a file fails with
    /// EACCES instead of reaching the role filter (see [`no_open_filter`]).
    no_open: BpfProgram,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

thread_local! {
    /// The role whose filter this thread installed, if any.
    static ROLE: Cell<Option<Role>> = const { Cell::new(None) };
    /// The thread's name, for the SIGSYS handler (which cannot ask the kernel or allocate).
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Compiles every role's filter for `mode` (and installs the SIGSYS handler for `trap`).
/// Called once, on the main thread, before any thread that will call [`enter`] starts;
/// until then [`enter`] does nothing (unit tests run without filters).
pub fn configure(mode: SeccompMode) -> Result<(), SeccompError> {
    let mut programs = Vec::with_capacity(ROLES.len());
    let mut no_open = BpfProgram::new();
    if mode != SeccompMode::None {
        for role in ROLES {
            programs.push(compile(role, mode)?);
        }
        no_open = no_open_filter()?;
        if mode == SeccompMode::Trap {
            install_sigsys_handler().map_err(SeccompError::Handler)?;
        }
        fix_malloc_arena_limit();
    }
    // A second configure (tests) keeps the first: threads may already run under it.
    let _ = FILTERS.set(Filters {
        mode,
        programs,
        no_open,
    });
    Ok(())
}

/// glibc's malloc (used by C libraries and by glibc itself, e.g. for a new thread's CPU set)
/// computes its arena limit the first time it needs it, in whatever thread, by reading
/// `/sys/devices/system/cpu/online`: setting the limit now (glibc's own default, 8 per CPU)
/// keeps filtered threads from opening files behind the code's back.
fn fix_malloc_arena_limit() {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let arenas = i32::try_from(8 * cpus).unwrap_or(i32::MAX);
    // SAFETY: mallopt takes two integers; it fails harmlessly if the value is refused.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
}

/// The calls that open files by name.
fn open_calls() -> Vec<libc::c_long> {
    let mut calls = vec![libc::SYS_openat, libc::SYS_openat2];
    #[cfg(target_arch = "x86_64")]
    calls.push(libc::SYS_open);
    calls
}

/// A filter that makes opening a file by name fail with EACCES, for the threads that never
/// open one: a library probing a file (glibc reads `/proc` and `/sys` for a few answers)
/// gets an error it handles instead of a violation, and nothing is opened. Stacked over the
/// role's filter, which lets these calls through to it (the kernel takes the stricter answer).
fn no_open_filter() -> Result<BpfProgram, SeccompError> {
    let build = |e: seccompiler::BackendError| SeccompError::Build {
        role: "no-open",
        source: seccompiler::Error::Backend(e),
    };
    let rules: Rules = open_calls().into_iter().map(|c| (c, Vec::new())).collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(build)?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    )
    .map_err(build)?;
    filter.try_into().map_err(build)
}

/// Installs `role`'s filter in the calling thread (and sets NO_NEW_PRIVS); returns whether
/// it did. With mode `none` the thread only records its role; before [`configure`] (unit
/// tests) nothing happens; a thread that already took a role keeps it.
pub fn enter(role: Role) -> Result<bool, SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(false);
    };
    if ROLE.with(Cell::get).is_some() {
        return Ok(false);
    }
    if filters.mode != SeccompMode::None {
        remember_thread_name();
        let install = |program: &BpfProgram| {
            seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
                role: role.name(),
                source,
            })
        };
        // The no-open filter first: it lets the role filter's own installation through,
        // which the role filter itself may not.
        if role != Role::Main {
            install(&filters.no_open)?;
        }
        install(&filters.programs[role.index()])?;
    }
    ROLE.with(|r| r.set(Some(role)));
    if filters.mode != SeccompMode::None {
        tracing::debug!(role = role.name(), "Seccomp filter installed");
    }
    Ok(filters.mode != SeccompMode::None)
}

/// For a thread started by a thread of `role` to do the same work (the listener's connection
/// threads): it already runs under `role`'s filter, inherited, so only the role is recorded
/// (callbacks that would add a narrower filter leave the thread alone), without stacking the
/// same filter twice.
pub fn inherit(role: Role) {
    let Some(filters) = FILTERS.get() else {
        return;
    };
    if ROLE.with(Cell::get).is_some() {
        return;
    }
    if filters.mode != SeccompMode::None {
        remember_thread_name();
    }
    ROLE.with(|r| r.set(Some(role)));
}

/// [`enter`] for a thread that cannot report an error to anyone: a thread that cannot get
/// its filter must not go on without it, so the process aborts (after logging why).
pub fn enter_or_abort(role: Role) {
    match enter(role) {
        Ok(true) => debug_forbidden_call(role),
        Ok(false) => {}
        Err(e) => {
            tracing::error!("{}", crate::error_chain(&e));
            std::process::abort();
        }
    }
}

/// Debug builds only: when `QCOW2D_DEBUG_FORBIDDEN_SYSCALL` names this thread's role, the
/// thread makes a system call no filter allows (`getppid`) right after installing its filter,
/// so tests can see what each mode does with a violation.
fn debug_forbidden_call(role: Role) {
    #[cfg(debug_assertions)]
    if std::env::var("QCOW2D_DEBUG_FORBIDDEN_SYSCALL").is_ok_and(|v| v == role.name()) {
        tracing::warn!(
            role = role.name(),
            syscall = libc::SYS_getppid,
            "Debug hook: making a forbidden system call"
        );
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
        tracing::warn!(
            role = role.name(),
            parent,
            "Debug hook: the forbidden system call returned; the process goes on"
        );
    }
    #[cfg(not(debug_assertions))]
    let _ = role;
}

fn remember_thread_name() {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    NAME.with(|n| n.set(name));
}

/// A rule list: each system call with the rules of which one must match (none: always).
type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn allow(rules: &mut Rules, calls: &[libc::c_long]) {
    for &call in calls {
        rules.insert(call, Vec::new());
    }
}

/// Adds what `other` allows to `rules`.
fn merge(rules: &mut Rules, other: Rules) {
    for (call, more) in other {
        match rules.get_mut(&call) {
            // Already allowed whatever the arguments.
            Some(existing) if existing.is_empty() => {}
            Some(existing) if more.is_empty() => existing.clear(),
            Some(existing) => existing.extend(more),
            None => {
                rules.insert(call, more);
            }
        }
    }
}

/// Allows `call` when argument `arg` (32 bits) equals one of `values`.
fn allow_arg_in(
    rules: &mut Rules,
    call: libc::c_long,
    arg: u8,
    values: &[u64],
) -> Result<(), seccompiler::BackendError> {
    let mut more = Vec::with_capacity(values.len());
    for &value in values {
        more.push(SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            value,
        )?])?);
    }
    merge(rules, Rules::from([(call, more)]));
    Ok(())
}

/// Allows `call` when argument `arg` has none of the bits of `mask` set.
fn allow_without_bits(
    rules: &mut Rules,
    call: libc::c_long,
    arg: u8,
    mask: u64,
) -> Result<(), seccompiler::BackendError> {
    rules.insert(
        call,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(mask),
            0,
        )?])?],
    );
    Ok(())
}

/// prctl's option to name an anonymous mapping (linux/prctl.h).
const PR_SET_VMA: u64 = 0x5356_4d41;

/// What every thread needs whatever it does: memory (never executable), futexes, clocks
/// and sleeps, random seeds of hash maps, logging to stderr, closing descriptors, signal
/// return and masks, thread exit; and what the SIGSYS handler calls.
fn base(rules: &mut Rules) -> Result<(), seccompiler::BackendError> {
    allow(
        rules,
        &[
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_gettimeofday,
            libc::SYS_getrandom,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_restart_syscall,
            libc::SYS_getpid,
            libc::SYS_gettid,
            // The standard library asks for it to print paths (a panic's backtrace).
            libc::SYS_getcwd,
        ],
    );
    // Descriptor flags (std checks a descriptor is open before closing it in debug builds;
    // try_clone duplicates with F_DUPFD_CLOEXEC). F_OFD_SETLK: an image gives its locks back
    // as it is dropped, in whatever thread lets go of it last (it cannot open a file, and a
    // lock on a file already open only ever keeps others out).
    allow_arg_in(
        rules,
        libc::SYS_fcntl,
        1,
        &[
            libc::F_GETFD as u64,
            libc::F_SETFD as u64,
            libc::F_GETFL as u64,
            libc::F_SETFL as u64,
            libc::F_DUPFD_CLOEXEC as u64,
            libc::F_OFD_SETLK as u64,
        ],
    )?;
    // The SIGBUS handler gives faults outside guest memory the default action.
    allow_arg_in(rules, libc::SYS_rt_sigaction, 0, &[libc::SIGBUS as u64])?;
    // mimalloc names each region it maps (PR_SET_VMA_ANON_NAME, "mimalloc"), in whatever
    // thread first needs more memory: with many exports that happened in an export thread
    // and the filter killed the whole daemon. It only names a mapping.
    allow_arg_in(rules, libc::SYS_prctl, 0, &[PR_SET_VMA])?;
    let no_exec = libc::PROT_EXEC as u64;
    allow_without_bits(rules, libc::SYS_mmap, 2, no_exec)?;
    allow_without_bits(rules, libc::SYS_mprotect, 2, no_exec)?;
    // The SIGSYS handler's own kill: SIGSYS to this process only.
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u64;
    rules.insert(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, pid)?,
            SeccompCondition::new(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::SIGSYS as u64,
            )?,
        ])?],
    );
    Ok(())
}

/// Starting threads that install their own filter afterwards.
fn spawn_threads(rules: &mut Rules) -> Result<(), seccompiler::BackendError> {
    allow(
        rules,
        &[
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_sched_getaffinity,
            libc::SYS_seccomp,
        ],
    );
    allow_arg_in(
        rules,
        libc::SYS_prctl,
        0,
        &[
            libc::PR_SET_NAME as u64,
            libc::PR_GET_NAME as u64,
            libc::PR_SET_NO_NEW_PRIVS as u64,
        ],
    )
}

/// Driving an engine shard: its io_uring, its eventfd and those of the other shards, the
/// small metadata writes it does itself (and the corrupt bit, synced), extending the image
/// file.
fn shard(rules: &mut Rules) {
    allow(
        rules,
        &[
            libc::SYS_io_uring_enter,
            libc::SYS_read,
            libc::SYS_ppoll,
            libc::SYS_pwrite64,
            libc::SYS_ftruncate,
            libc::SYS_fdatasync,
        ],
    );
    #[cfg(target_arch = "x86_64")]
    allow(rules, &[libc::SYS_poll]);
}

/// Messages with file descriptors on unix sockets.
fn unix_messages(rules: &mut Rules) {
    allow(
        rules,
        &[
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_shutdown,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_dup,
            libc::SYS_dup3,
        ],
    );
}

/// Only non-blocking mode and close-on-exec through ioctl.
fn ioctl_fionbio(rules: &mut Rules) -> Result<(), seccompiler::BackendError> {
    allow_arg_in(rules, libc::SYS_ioctl, 1, &[libc::FIONBIO, libc::FIOCLEX])
}

fn role_rules(role: Role) -> Result<Rules, seccompiler::BackendError> {
    let mut rules = Rules::new();
    base(&mut rules)?;
    // Answered with EACCES by the no-open filter stacked over this one (every role but the
    // main thread's, which opens images; see `no_open_filter`).
    allow(&mut rules, &open_calls());
    match role {
        Role::Main => {
            // The supervisor: adds exports at run time (control requests, SIGHUP), so it opens
            // images (and locks them), re-reads the config file, binds sockets and adds them
            // to the listener's epoll set (epoll_ctl); the listener thread it starts inherits
            // this filter before it adds its own: all of an export's calls and more.
            // Stopping: completing the requests in flight of each connection (on its shards)
            // and shutting its socket down, waking the listener (an eventfd write),
            // systemd's STOPPING=1, removing sockets.
            merge(&mut rules, role_rules(Role::Export)?);
            allow(
                &mut rules,
                &[
                    libc::SYS_openat,
                    libc::SYS_newfstatat,
                    libc::SYS_statx,
                    libc::SYS_fstat,
                    libc::SYS_fstatfs,
                    libc::SYS_readlinkat,
                    libc::SYS_getcwd,
                    libc::SYS_getdents64,
                    libc::SYS_pread64,
                    libc::SYS_lseek,
                    libc::SYS_sendto,
                    libc::SYS_unlinkat,
                    libc::SYS_fchmod,
                ],
            );
            #[cfg(target_arch = "x86_64")]
            allow(
                &mut rules,
                &[
                    libc::SYS_open,
                    libc::SYS_stat,
                    libc::SYS_lstat,
                    libc::SYS_readlink,
                    libc::SYS_unlink,
                    libc::SYS_rmdir,
                    libc::SYS_chmod,
                ],
            );
            // Image locks (QEMU-compatible OFD byte-range locks).
            allow_arg_in(
                &mut rules,
                libc::SYS_fcntl,
                1,
                &[
                    libc::F_OFD_SETLK as u64,
                    libc::F_OFD_GETLK as u64,
                    libc::F_OFD_SETLKW as u64,
                    libc::F_SETLK as u64,
                    libc::F_GETLK as u64,
                ],
            )?;
        }
        Role::Control => {
            // Accepting connections, one thread each, reading requests and writing answers.
            spawn_threads(&mut rules)?;
            allow(
                &mut rules,
                &[
                    libc::SYS_accept4,
                    libc::SYS_read,
                    libc::SYS_recvfrom,
                    libc::SYS_sendto,
                    libc::SYS_setsockopt,
                    libc::SYS_getsockopt,
                    libc::SYS_shutdown,
                ],
            );
        }
        Role::Signals => allow(&mut rules, &[libc::SYS_rt_sigtimedwait]),
        Role::Metrics => {
            allow(
                &mut rules,
                &[
                    libc::SYS_accept4,
                    libc::SYS_accept,
                    libc::SYS_read,
                    libc::SYS_recvfrom,
                    libc::SYS_sendto,
                    libc::SYS_setsockopt,
                    libc::SYS_getsockopt,
                    libc::SYS_getsockname,
                    libc::SYS_getpeername,
                    libc::SYS_shutdown,
                ],
            );
        }
        Role::Inflate => allow(&mut rules, &[libc::SYS_io_uring_enter]),
        Role::Worker => {
            shard(&mut rules);
            // The workers' epoll sets (nested in the core thread's), the I/O limits' timer,
            // and ending a connection whose worker panicked (its frontend's socket).
            allow(
                &mut rules,
                &[
                    libc::SYS_epoll_pwait,
                    libc::SYS_epoll_ctl,
                    libc::SYS_timerfd_settime,
                    libc::SYS_timerfd_gettime,
                    libc::SYS_shutdown,
                ],
            );
            #[cfg(target_arch = "x86_64")]
            allow(&mut rules, &[libc::SYS_epoll_wait]);
        }
        Role::Relay => {
            // Every connection's two sockets in one epoll set, and its wake-up eventfd
            // (read here, written by the connection threads); messages with descriptors.
            allow(
                &mut rules,
                &[
                    libc::SYS_epoll_pwait,
                    libc::SYS_epoll_ctl,
                    libc::SYS_read,
                    libc::SYS_recvmsg,
                    libc::SYS_sendmsg,
                    libc::SYS_shutdown,
                ],
            );
            #[cfg(target_arch = "x86_64")]
            allow(&mut rules, &[libc::SYS_epoll_wait]);
            // Checking memory regions against their files, and the in-flight area: its
            // memfd made and sized here.
            allow(
                &mut rules,
                &[
                    libc::SYS_fstat,
                    libc::SYS_newfstatat,
                    libc::SYS_statx,
                    libc::SYS_memfd_create,
                    libc::SYS_ftruncate,
                ],
            );
            // What kind of file a descriptor is (/proc/self/fd/N).
            allow(&mut rules, &[libc::SYS_readlinkat]);
            #[cfg(target_arch = "x86_64")]
            allow(&mut rules, &[libc::SYS_readlink]);
            // Sealing a new in-flight area, checking the seals of one handed in.
            allow_arg_in(
                &mut rules,
                libc::SYS_fcntl,
                1,
                &[libc::F_ADD_SEALS as u64, libc::F_GET_SEALS as u64],
            )?;
            // Every connection's request handler runs here (crate::handler): messages and the
            // descriptors they carry through vhost's endpoint on the private socket
            // (recvmsg/sendmsg, plus what `unix_messages` has for its reads and writes and
            // the descriptors' duplicates), mapping guest memory (mmap, in `base`; lseek and
            // fstat on the region's file while vm-memory maps it), and the kick eventfds of
            // the queues added to and removed from the workers' epoll sets (epoll_ctl, above).
            unix_messages(&mut rules);
            allow(&mut rules, &[libc::SYS_lseek]);
            ioctl_fionbio(&mut rules)?;
            // The size of a guest memory region's pages (fstatfs: huge pages on hugetlbfs),
            // for its truncation guard.
            allow(&mut rules, &[libc::SYS_fstatfs]);
            // vhost's handler checks that the descriptor SET_BACKEND_REQ_FD carries is a unix
            // stream socket (SO_DOMAIN, SO_TYPE).
            allow_arg_in(
                &mut rules,
                libc::SYS_getsockopt,
                2,
                &[libc::SO_DOMAIN as u64, libc::SO_TYPE as u64],
            )?;
            // A timeout on writes to the frontend's backend request channel (SO_SNDTIMEO).
            allow_arg_in(
                &mut rules,
                libc::SYS_setsockopt,
                2,
                &[libc::SO_SNDTIMEO as u64],
            )?;
        }
        Role::Export => {
            // A connection's set-up and teardown, and the threads it starts, which inherit
            // this filter before they add their own (the relay thread is not one of them:
            // the main thread starts it before any filter exists).
            merge(&mut rules, role_rules(Role::Worker)?);
            spawn_threads(&mut rules)?;
            shard(&mut rules);
            unix_messages(&mut rules);
            allow(
                &mut rules,
                &[
                    libc::SYS_io_uring_setup,
                    libc::SYS_io_uring_register,
                    libc::SYS_eventfd2,
                    libc::SYS_epoll_create1,
                    libc::SYS_epoll_ctl,
                    libc::SYS_epoll_pwait,
                    libc::SYS_accept4,
                    libc::SYS_bind,
                    libc::SYS_listen,
                    libc::SYS_connect,
                    libc::SYS_getsockname,
                    libc::SYS_getsockopt,
                    libc::SYS_setsockopt,
                    libc::SYS_unlinkat,
                    libc::SYS_memfd_create,
                    libc::SYS_lseek,
                    libc::SYS_timerfd_create,
                ],
            );
            #[cfg(target_arch = "x86_64")]
            allow(&mut rules, &[libc::SYS_epoll_wait, libc::SYS_unlink]);
            allow_arg_in(&mut rules, libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?;
            allow_arg_in(&mut rules, libc::SYS_socketpair, 0, &[libc::AF_UNIX as u64])?;
            ioctl_fionbio(&mut rules)?;
        }
    }
    Ok(rules)
}

fn compile(role: Role, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let build = |e: seccompiler::BackendError| SeccompError::Build {
        role: role.name(),
        source: seccompiler::Error::Backend(e),
    };
    let mismatch = match mode {
        SeccompMode::Kill | SeccompMode::None => SeccompAction::KillProcess,
        SeccompMode::Trap => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(build)?;
    let filter = SeccompFilter::new(
        role_rules(role).map_err(build)?,
        mismatch,
        SeccompAction::Allow,
        arch,
    )
    .map_err(build)?;
    filter.try_into().map_err(build)
}

/// SIGSYS (trap mode): says which thread made which call, then lets SIGSYS kill the process.
/// Only async-signal-safe work: formatting on the stack, `write`, `tgkill`.
extern "C" fn on_sigsys(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    let mut msg = [0u8; 128];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if len < msg.len() {
                msg[len] = b;
                len += 1;
            }
        }
    };
    put(b"qcow2d: seccomp: thread \"");
    let name = NAME.with(Cell::get);
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    put(&name[..name_len]);
    put(b"\" made the forbidden system call ");
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; si_syscall sits at the offset of
    // the `_sigsys` member (after si_call_addr), read as the kernel laid it out.
    let syscall = unsafe { sigsys_syscall(info) };
    let mut digits = [0u8; 12];
    let mut n = syscall.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b"; killing the process\n");
    // SAFETY: writes `len` initialised bytes of `msg` to stderr; getpid, gettid and tgkill take
    // no pointers. SIGSYS's handler was reset on entry (SA_RESETHAND) and SIGSYS is not
    // blocked (SA_NODEFER), so the signal kills the process at once.
    unsafe {
        libc::write(libc::STDERR_FILENO, msg.as_ptr().cast(), len);
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::gettid(),
            libc::SIGSYS,
        );
    }
}

/// The system call number of a SIGSYS siginfo.
///
/// # Safety
/// `info` must point at the siginfo of a SIGSYS raised by seccomp.
unsafe fn sigsys_syscall(info: *const libc::siginfo_t) -> i32 {
    // The kernel's layout: si_signo, si_errno, si_code (3 ints), then the union, aligned for
    // a pointer; for SIGSYS it holds `void *_call_addr; int _syscall; unsigned _arch;`.
    let pointer = std::mem::size_of::<usize>();
    let union_offset = (3 * std::mem::size_of::<libc::c_int>()).next_multiple_of(pointer);
    let base = info.cast::<u8>();
    // SAFETY: the caller guarantees a SIGSYS siginfo, which is 128 bytes long; the offset
    // is inside it.
    unsafe {
        base.add(union_offset + pointer)
            .cast::<i32>()
            .read_unaligned()
    }
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
    // SAFETY: `action` is initialised; the handler only makes async-signal-safe calls.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles_in_every_mode() {
        for mode in [SeccompMode::Kill, SeccompMode::Trap, SeccompMode::Log] {
            for role in ROLES {
                let program = compile(role, mode).unwrap();
                assert!(!program.is_empty(), "{}", role.name());
            }
        }
    }

    /// mimalloc names the regions it maps from whatever thread needs memory: every role's
    /// filter lets it (a violation would kill this test process).
    #[test]
    fn every_role_lets_the_allocator_name_its_mappings() {
        const PR_SET_VMA_ANON_NAME: libc::c_ulong = 0;
        for role in ROLES {
            let program = compile(role, SeccompMode::Kill).unwrap();
            let rc = std::thread::spawn(move || {
                seccompiler::apply_filter(&program).unwrap();
                let mut page = vec![0u8; 8192];
                // SAFETY: names a range of our own heap buffer; the kernel only records the
                // name (or refuses, when built without anonymous VMA names).
                unsafe {
                    libc::prctl(
                        PR_SET_VMA as libc::c_int,
                        PR_SET_VMA_ANON_NAME,
                        page.as_mut_ptr() as libc::c_ulong,
                        4096 as libc::c_ulong,
                        c"mimalloc".as_ptr(),
                    )
                }
            })
            .join()
            .unwrap();
            assert!(rc == 0 || rc == -1, "{}", role.name());
        }
    }

    #[test]
    fn modes_parse_by_name() {
        for name in ["kill", "trap", "log", "none"] {
            assert_eq!(SeccompMode::parse(name).unwrap().name(), name);
        }
        assert_eq!(SeccompMode::parse("Kill"), None);
        assert_eq!(SeccompMode::default(), SeccompMode::Kill);
    }
}
