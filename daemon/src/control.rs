//! The control socket: `qcow2d serve --control SOCK` (or `control = "PATH"`), the server side
//! of `qcow2d ctl`.
//!
//! Protocol: a unix stream socket, created with mode 0600. The client writes one request per
//! line, a JSON object with a `command` member; the daemon answers each with one line, a JSON
//! object: `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`. A connection may carry
//! any number of requests, one after the other. Requests ([`Request`]):
//! - `{"command":"list"}`: result `{"exports":[...]}` (see README.md for the fields);
//! - `{"command":"add","image":IMG,"socket":SOCK,"read_only":B,"writethrough":B,
//!   "lazy_refcounts":B,"direct":B,"queues":N,"serial":S,"limits":{...},"group":G}` (only
//!   `image` and `socket` are required);
//! - `{"command":"remove","socket":SOCK,"force":B}`;
//! - `{"command":"limit","socket":SOCK,"limits":{...},"group":G}` or
//!   `{"command":"limit","socket":SOCK,"none":true}`;
//! - `{"command":"resize","socket":SOCK,"size":BYTES,"shrink":B}`.
//!
//! Limits are an object of the config file's limit keys (`iops_total`, `bps_read_max`, ...).
//! A request longer than [`MAX_REQUEST_BYTES`] gets an error answer and the connection is
//! closed (the rest of the line cannot be told from the next request); malformed JSON, unknown
//! commands or members get an error answer and the connection goes on.
//!
//! Threads. The listener thread (`qcow2d-control`) accepts connections and gives each its own
//! thread (`qcow2d-ctl-conn`, at most [`MAX_CONNECTIONS`] at once), which parses requests and
//! hands them to the supervisor (the main thread, [`crate::serve`]) as messages, one at a
//! time, and writes back the answers. Nothing here touches an export or the data path: every
//! change is made by the supervisor, in the order requests arrive.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tracing::{debug, warn};

use crate::config::RawExport;
use crate::export::{clear_stale_socket, SocketError};
use crate::throttle::Limits;

/// Longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Control connections served at once; more are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// One request.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Every export.
    List {},
    /// A new export.
    Add(AddRequest),
    /// Stop an export.
    Remove {
        /// Its socket.
        socket: PathBuf,
        /// Even with a client connected.
        #[serde(default)]
        force: bool,
    },
    /// Set or lift an export's limits.
    Limit {
        /// Its socket.
        socket: PathBuf,
        /// The new limits (an object of limit keys).
        limits: Option<Value>,
        /// The group to be in.
        group: Option<String>,
        /// Lift every limit.
        #[serde(default)]
        none: bool,
    },
    /// Change an export's virtual size.
    Resize {
        /// Its socket.
        socket: PathBuf,
        /// New size in bytes.
        size: u64,
        /// Allow shrinking.
        #[serde(default)]
        shrink: bool,
    },
}

/// The members of an `add` request.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AddRequest {
    /// The image.
    pub image: PathBuf,
    /// Its socket.
    pub socket: PathBuf,
    /// Read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Write-through.
    #[serde(default)]
    pub writethrough: bool,
    /// Lazy refcounts.
    #[serde(default)]
    pub lazy_refcounts: bool,
    /// O_DIRECT.
    #[serde(default)]
    pub direct: bool,
    /// Queue count.
    pub queues: Option<u64>,
    /// Serial.
    pub serial: Option<String>,
    /// Limits (an object of limit keys).
    pub limits: Option<Value>,
    /// Throttle group.
    pub group: Option<String>,
    /// Directories besides the image's own where files it names may lie.
    #[serde(default)]
    pub allow_paths: Vec<PathBuf>,
    /// The overlap-check mode (default: cached).
    pub overlap_check: Option<qcow2d_engine::OverlapCheck>,
}

impl AddRequest {
    /// The export's settings as given, for validation.
    pub fn into_raw(self) -> Result<RawExport, String> {
        let limits = match &self.limits {
            Some(v) => Limits::from_json(v)?,
            None => Limits::default(),
        };
        Ok(RawExport {
            image: self.image,
            socket: self.socket,
            read_only: self.read_only,
            writethrough: self.writethrough,
            lazy_refcounts: self.lazy_refcounts,
            direct: self.direct,
            queues: self.queues,
            serial: self.serial,
            limits,
            group: self.group,
            overlap_check: self.overlap_check,
            allow_paths: self.allow_paths,
            // Added at run time: the default budgets.
            ..RawExport::default()
        })
    }
}

/// The answer to a request: a result, or why there is none.
pub type Response = Result<Value, String>;

/// Encodes an answer as its line (without the newline).
pub fn encode_response(response: &Response) -> String {
    let value = match response {
        Ok(result) => serde_json::json!({"ok": true, "result": result}),
        Err(error) => serde_json::json!({"ok": false, "error": error}),
    };
    value.to_string()
}

/// Parses one request line.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| format!("Malformed request: {e}"))?;
    let Value::Object(map) = &value else {
        return Err("Malformed request: expected a JSON object".into());
    };
    match map.get("command") {
        None => return Err("Malformed request: no \"command\"".into()),
        Some(Value::String(c))
            if !["list", "add", "remove", "limit", "resize"].contains(&c.as_str()) =>
        {
            return Err(format!("Unknown command {c:?}"));
        }
        Some(Value::String(_)) => {}
        Some(_) => return Err("Malformed request: \"command\" must be a string".into()),
    }
    serde_json::from_value(value).map_err(|e| format!("Invalid request: {e}"))
}

/// A request on its way to the supervisor, with where its answer goes.
pub struct Call {
    /// The request.
    pub request: Request,
    /// The answer's way back.
    pub reply: mpsc::Sender<Response>,
}

/// The listening control socket; removes its file when dropped.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Creates the control socket at `path` with mode 0600 (set on the socket before bind, so it
/// is never reachable with a wider mode). A stale socket is replaced; a live one is an error.
pub fn bind(path: &Path) -> Result<ControlSocket, SocketError> {
    clear_stale_socket(path)?;
    let bind_error = |source: io::Error| SocketError::Control {
        path: path.to_owned(),
        source,
    };
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(bind_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path is too long for a unix socket or contains a NUL byte",
        )));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(bind_error(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Linux gives the socket file the socket inode's mode (less the umask) at bind time.
    // SAFETY: fchmod on a descriptor we own; no pointers.
    if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
        return Err(bind_error(io::Error::last_os_error()));
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is an initialised sockaddr_un and `len` is within its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(bind_error(io::Error::last_os_error()));
    }
    let socket = ControlSocket {
        // SAFETY: the descriptor is a bound unix stream socket we own; ownership moves.
        listener: unsafe { UnixListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) },
        path: path.to_owned(),
    };
    // Belt and braces: the mode is 0600 whatever the kernel did with the umask.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    // SAFETY: listen(2) on a bound socket we own; no pointers.
    if unsafe { libc::listen(socket.listener.as_raw_fd(), 16) } != 0 {
        return Err(bind_error(io::Error::last_os_error()));
    }
    Ok(socket)
}

/// Starts the listener thread; each request goes to `submit` as a [`Call`].
pub fn spawn<T: Send + 'static>(
    socket: ControlSocket,
    tx: mpsc::Sender<T>,
    wrap: fn(Call) -> T,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("qcow2d-control".into())
        .spawn(move || {
            // The connection threads inherit this filter.
            crate::sandbox::seccomp::enter_or_abort(crate::sandbox::Role::Control);
            let active = Arc::new(AtomicUsize::new(0));
            for stream in socket.listener.incoming() {
                let mut stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("Cannot accept a control connection: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    active.fetch_sub(1, Ordering::SeqCst);
                    let busy: Response = Err(format!(
                        "Too many control connections (at most {MAX_CONNECTIONS})"
                    ));
                    let _ = writeln!(stream, "{}", encode_response(&busy));
                    continue;
                }
                let tx = tx.clone();
                let done = Arc::clone(&active);
                let spawned = std::thread::Builder::new()
                    .name("qcow2d-ctl-conn".into())
                    .spawn(move || {
                        serve_connection(stream, &tx, wrap);
                        done.fetch_sub(1, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    active.fetch_sub(1, Ordering::SeqCst);
                    warn!("Cannot start a control connection thread: {e}");
                }
            }
            // Keep the socket (and its file) for as long as the thread runs.
            drop(socket);
        })
        .map(|_| ())
}

/// Answers the requests of one connection until it closes.
fn serve_connection<T>(stream: UnixStream, tx: &mpsc::Sender<T>, wrap: fn(Call) -> T) {
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    // A client that does not read its answers does not keep this thread forever.
    let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        // One byte more than allowed tells an oversized line from one that fits.
        let limit = (MAX_REQUEST_BYTES + 1) as u64;
        match (&mut reader).take(limit).read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                debug!("Control connection ended: {e}");
                return;
            }
        }
        let complete = line.last() == Some(&b'\n');
        if !complete && line.len() > MAX_REQUEST_BYTES {
            let answer: Response = Err(format!(
                "Request longer than {MAX_REQUEST_BYTES} bytes; closing the connection"
            ));
            let _ = writeln!(writer, "{}", encode_response(&answer));
            return;
        }
        let text = line.trim_ascii();
        if text.is_empty() {
            if complete {
                continue;
            }
            return;
        }
        let answer = match parse_request(text) {
            Ok(request) => call(tx, wrap, request),
            Err(e) => Err(e),
        };
        if writeln!(writer, "{}", encode_response(&answer)).is_err() {
            return;
        }
        if !complete {
            return;
        }
    }
}

fn call<T>(tx: &mpsc::Sender<T>, wrap: fn(Call) -> T, request: Request) -> Response {
    let (reply, answer) = mpsc::channel();
    if tx.send(wrap(Call { request, reply })).is_err() {
        return Err("The daemon is stopping".into());
    }
    answer
        .recv()
        .unwrap_or_else(|_| Err("The daemon is stopping".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_request(br#"{"command":"list"}"#),
            Ok(Request::List {})
        );
        assert_eq!(
            parse_request(br#"{"command":"remove","socket":"/a.sock"}"#),
            Ok(Request::Remove {
                socket: "/a.sock".into(),
                force: false
            })
        );
        let add = parse_request(
            br#"{"command":"add","image":"/a","socket":"/s","queues":2,"limits":{"iops_total":5}}"#,
        )
        .unwrap();
        let Request::Add(add) = add else {
            panic!("not add")
        };
        assert_eq!(add.queues, Some(2));
        assert_eq!(
            add.into_raw().unwrap().limits.entries(),
            [("iops_total".to_owned(), 5)]
        );
        let add =
            parse_request(br#"{"command":"add","image":"/a","socket":"/s","allow_paths":["/b"]}"#)
                .unwrap();
        let Request::Add(add) = add else {
            panic!("not add")
        };
        assert_eq!(add.allow_paths, [PathBuf::from("/b")]);
        for (bad, why) in [
            (&b"not json"[..], "Malformed request"),
            (b"[1,2]", "expected a JSON object"),
            (b"{}", "no \"command\""),
            (br#"{"command":"format"}"#, "Unknown command \"format\""),
            (br#"{"command":7}"#, "must be a string"),
            (br#"{"command":"list","extra":1}"#, "Invalid request"),
            (
                br#"{"command":"add","image":"/a","socket":"/s","cache":1}"#,
                "Invalid request",
            ),
            (br#"{"command":"remove"}"#, "Invalid request"),
            (
                br#"{"command":"resize","socket":"/s","size":-1}"#,
                "Invalid request",
            ),
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn responses_are_one_line_objects() {
        let ok = encode_response(&Ok(serde_json::json!({"exports": []})));
        let v: Value = serde_json::from_str(&ok).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ok": true, "result": {"exports": []}})
        );
        let err = encode_response(&Err("No export on \"/s\"\nx".into()));
        assert!(!err.contains('\n'));
        let v: Value = serde_json::from_str(&err).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"ok": false, "error": "No export on \"/s\"\nx"})
        );
    }

    #[test]
    fn the_socket_is_private_and_answers_each_line() {
        let dir = std::env::temp_dir().join(format!("qcow2d-control-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let socket = bind(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A live socket is not replaced.
        assert!(bind(&path).is_err());
        let (tx, rx) = mpsc::channel::<Call>();
        spawn(socket, tx, |c| c).unwrap();
        std::thread::spawn(move || {
            for call in rx {
                let _ = call.reply.send(Ok(
                    serde_json::json!({"seen": format!("{:?}", call.request)}),
                ));
            }
        });
        let stream = UnixStream::connect(&path).unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut r = BufReader::new(stream);
        let mut answer = String::new();
        for (line, want) in [
            ("{\"command\":\"list\"}\n", "\"ok\":true"),
            ("garbage\n", "Malformed request"),
            ("{\"command\":\"nope\"}\n", "Unknown command"),
            ("\n{\"command\":\"list\"}\n", "\"ok\":true"),
        ] {
            w.write_all(line.as_bytes()).unwrap();
            answer.clear();
            r.read_line(&mut answer).unwrap();
            assert!(answer.contains(want), "{line:?}: {answer}");
        }
        // Oversized: an error answer, then the connection is closed.
        let big = vec![b'x'; MAX_REQUEST_BYTES + 10];
        let _ = w.write_all(&big);
        answer.clear();
        r.read_line(&mut answer).unwrap();
        assert!(answer.contains("longer than"), "{answer}");
        // Another client is still served.
        let stream = UnixStream::connect(&path).unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut r = BufReader::new(stream);
        w.write_all(b"{\"command\":\"list\"}\n").unwrap();
        answer.clear();
        r.read_line(&mut answer).unwrap();
        assert!(answer.contains("\"ok\":true"), "{answer}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
