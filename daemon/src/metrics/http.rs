//! The scrape endpoint: a minimal HTTP/1.x server on its own thread that answers
//! `GET /metrics` (and `HEAD`) with the Prometheus text exposition and anything else with 404.
//!
//! One connection at a time, one request per connection (`Connection: close`): Prometheus
//! scrapes every few seconds, so there is nothing to gain from concurrency, and a single thread
//! bounds what a client can cost. A slow or malicious client cannot hold the thread for more
//! than [`REQUEST_DEADLINE`] while sending its request nor [`WRITE_TIMEOUT`] per write while
//! receiving the answer; a request head larger than [`MAX_HEAD_BYTES`] is refused. The thread
//! only reads the workers' atomic counters ([`super::Metrics::render`]), so nothing it does can
//! slow the data path down, and a panic while answering is caught and logged, so the endpoint
//! outlives it. The thread is detached: it ends with the process.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::exposition::CONTENT_TYPE;
use super::Metrics;

/// Longest a client may take to send its request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Longest one write of the answer may block.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted (request line and headers).
pub const MAX_HEAD_BYTES: usize = 8192;
/// Pause after a failed accept() (out of descriptors, say), so that the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How many failed accepts are logged before only every power of two is.
const LOUD_ERRORS: u64 = 8;

/// Starts the server thread on `listener` (already bound).
pub fn spawn(listener: TcpListener, metrics: Arc<Metrics>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("qcow2d-metrics".into())
        .spawn(move || {
            crate::sandbox::seccomp::enter_or_abort(crate::sandbox::Role::Metrics);
            run(&listener, &metrics)
        })?;
    Ok(())
}

fn run(listener: &TcpListener, metrics: &Metrics) {
    let mut accept_errors = 0u64;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    serve_connection(stream, metrics)
                }));
                match answered {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(%peer, "Metrics request failed: {e}"),
                    Err(_) => warn!(%peer, "Answering a metrics request panicked"),
                }
            }
            Err(e) => {
                accept_errors += 1;
                if accept_errors <= LOUD_ERRORS || accept_errors.is_power_of_two() {
                    warn!("Cannot accept a metrics connection: {e}");
                }
                std::thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

/// What to answer.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// `GET /metrics`, or `HEAD` (no body).
    Metrics { head_only: bool },
    /// Any other well-formed request.
    NotFound,
    /// Not an HTTP request line, or a head too large.
    BadRequest,
}

fn serve_connection(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let _ = stream.set_nodelay(true);
    let route = match read_head(&mut stream, Instant::now() + REQUEST_DEADLINE)? {
        Some(head) => route(&head),
        None => Route::BadRequest,
    };
    match route {
        Route::Metrics { head_only } => {
            let body = metrics.render();
            respond(&mut stream, "200 OK", CONTENT_TYPE, &body, head_only)?;
        }
        Route::NotFound => respond(
            &mut stream,
            "404 Not Found",
            "text/plain; charset=utf-8",
            "Not found: metrics are at /metrics\n",
            false,
        )?,
        Route::BadRequest => respond(
            &mut stream,
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "Bad request\n",
            false,
        )?,
    }
    // Tell the client we are done; it may already have gone.
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

/// Reads up to the blank line that ends the request head. `None` when the head is larger than
/// [`MAX_HEAD_BYTES`]; an error when the client is slower than `deadline` or goes away.
fn read_head(stream: &mut TcpStream, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not received in time",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before the end of the request head",
                ))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // Search from a little before the new bytes: the terminator may straddle two reads.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&head[from..]) {
            head.truncate(from + end);
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD_BYTES {
            return Ok(None);
        }
    }
}

/// Length of the head in `bytes` (up to and including `\r\n\r\n`, or `\n\n` from lenient
/// clients), if it is complete.
fn head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4);
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Routes a request by its request line (`METHOD TARGET HTTP/x.y`).
fn route(head: &[u8]) -> Route {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Route::BadRequest;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() {
        return Route::BadRequest;
    }
    // The query string (Prometheus may add parameters) does not matter.
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics { head_only: false },
        ("HEAD", "/metrics") => Route::Metrics { head_only: true },
        _ => Route::NotFound,
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\nCache-Control: no-store\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{ExportLabels, Operation};

    #[test]
    fn routes() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            route(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Route::Metrics { head_only: true }
        );
        for other in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET /metrics/ HTTP/1.1\r\n\r\n",
            b"POST /metrics HTTP/1.1\r\n\r\n",
            b"GET /favicon.ico HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                route(other),
                Route::NotFound,
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
        for bad in [
            &b"\r\n\r\n"[..],
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/2\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                route(bad),
                Route::BadRequest,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn head_end_finds_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }

    fn server() -> (std::net::SocketAddr, Arc<Metrics>) {
        let metrics = Metrics::new();
        let export = metrics.add_export(
            ExportLabels {
                export: "/run/t.sock".into(),
                image: "t.qcow2".into(),
                serial: "t".into(),
                read_only: true,
            },
            1,
        );
        export
            .shard(0)
            .unwrap()
            .record(Operation::Read, true, 4096, Duration::from_micros(30));
        let metrics = Arc::new(metrics);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        spawn(listener, Arc::clone(&metrics)).unwrap();
        (addr, metrics)
    }

    fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn serves_metrics_404_and_survives_bad_clients() {
        let (addr, _metrics) = server();
        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Type: text/plain; version=0.0.4"),
            "{ok}"
        );
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );
        assert!(
            body.contains("qcow2d_requests_total{export=\"/run/t.sock\",op=\"read\"} 1\n"),
            "{body}"
        );

        let head_only = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(head_only.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head_only.ends_with("\r\n\r\n"), "no body: {head_only}");

        let missing = exchange(addr, b"GET /other HTTP/1.1\r\n\r\n");
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );

        // A head that never ends within the limit.
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat(b'a').take(MAX_HEAD_BYTES + 10));
        let bad = exchange(addr, &huge);
        assert!(bad.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{bad}");

        // Clients that connect and vanish, or send half a request and close.
        drop(TcpStream::connect(addr).unwrap());
        let mut half = TcpStream::connect(addr).unwrap();
        half.write_all(b"GET /met").unwrap();
        drop(half);

        // The server still answers.
        let again = exchange(addr, b"GET /metrics HTTP/1.0\n\n");
        assert!(again.starts_with("HTTP/1.1 200 OK\r\n"), "{again}");
    }
}
