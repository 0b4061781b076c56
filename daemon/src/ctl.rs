//! `qcow2d ctl`: the client of the control socket ([`crate::control`] describes the protocol).
//!
//! Runs on the main thread of its own short-lived process: builds one request from the command
//! line (paths made absolute against the client's directory, since the daemon's may differ),
//! sends it, waits for the answer and prints it: as text, or for `list --json` as the daemon's
//! JSON result. A refused request ends the process with status 1 and the daemon's reason.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::cli::{CtlArgs, CtlCommand, LimitArgs};

/// How long to wait for an answer (a remove waits for the export's requests and flush).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Failures of `qcow2d ctl`.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The control socket cannot be reached.
    #[error("Cannot connect to the control socket {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Sending or receiving failed.
    #[error("The control connection failed")]
    Io(#[source] std::io::Error),
    /// The answer is not what the protocol says.
    #[error("Unexpected answer from the daemon: {0}")]
    BadAnswer(String),
    /// The daemon refused the request.
    #[error("{0}")]
    Refused(String),
    /// A command-line value is wrong.
    #[error("{0}")]
    Usage(String),
}

/// Runs one `qcow2d ctl` command.
pub fn run(args: CtlArgs) -> Result<(), CtlError> {
    let (request, json_out) = build_request(args.command)?;
    let result = send(&args.control, &request)?;
    match request["command"].as_str() {
        Some("list") if json_out => {
            let text = serde_json::to_string_pretty(&result)
                .map_err(|e| CtlError::BadAnswer(e.to_string()))?;
            println!("{text}");
        }
        Some("list") => print!("{}", list_text(&result)),
        _ => {}
    }
    Ok(())
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn limits_json(args: &LimitArgs) -> Value {
    let map = args
        .entries()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Value::from(v)))
        .collect::<serde_json::Map<_, _>>();
    Value::Object(map)
}

/// The request of a command, and whether the answer is to be printed as JSON.
fn build_request(command: CtlCommand) -> Result<(Value, bool), CtlError> {
    Ok(match command {
        CtlCommand::List { json } => (json!({"command": "list"}), json),
        CtlCommand::Add(a) => (
            json!({
                "command": "add",
                "image": absolute(&a.image),
                "socket": absolute(&a.socket),
                "read_only": a.export.read_only,
                "writethrough": a.export.writethrough,
                "lazy_refcounts": a.export.lazy_refcounts,
                "direct": a.export.direct,
                "queues": a.export.queues,
                "serial": a.export.serial,
                "limits": limits_json(&a.limits),
                "group": a.limits.group,
                "allow_paths": a.allow.allow_path.iter().map(|p| absolute(p)).collect::<Vec<_>>(),
                "overlap_check": a.overlap_check,
            }),
            false,
        ),
        CtlCommand::Remove { socket, force } => (
            json!({"command": "remove", "socket": absolute(&socket), "force": force}),
            false,
        ),
        CtlCommand::Limit {
            socket,
            none,
            limits,
        } => {
            let request = if none {
                if !limits.entries().is_empty() {
                    return Err(CtlError::Usage(
                        "--none lifts every limit: give no other limit".into(),
                    ));
                }
                json!({"command": "limit", "socket": absolute(&socket), "none": true})
            } else {
                if !limits.any() {
                    return Err(CtlError::Usage(
                        "Give limits (e.g. --iops-total 500), --group, or --none".into(),
                    ));
                }
                json!({
                    "command": "limit",
                    "socket": absolute(&socket),
                    "limits": limits_json(&limits),
                    "group": limits.group,
                })
            };
            (request, false)
        }
        CtlCommand::Resize {
            socket,
            size,
            shrink,
        } => (
            json!({
                "command": "resize",
                "socket": absolute(&socket),
                "size": parse_size(&size).map_err(CtlError::Usage)?,
                "shrink": shrink,
            }),
            false,
        ),
    })
}

/// Sends one request and returns the answer's result, or the daemon's error as `Refused`.
pub fn send(control: &Path, request: &Value) -> Result<Value, CtlError> {
    let stream = UnixStream::connect(control).map_err(|source| CtlError::Connect {
        path: control.to_owned(),
        source,
    })?;
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(CtlError::Io)?;
    let mut writer = stream.try_clone().map_err(CtlError::Io)?;
    writeln!(writer, "{request}").map_err(CtlError::Io)?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(CtlError::Io)?;
    let answer: Value = serde_json::from_str(line.trim())
        .map_err(|e| CtlError::BadAnswer(format!("{e}: {line:?}")))?;
    match answer["ok"].as_bool() {
        Some(true) => Ok(answer["result"].clone()),
        Some(false) => Err(CtlError::Refused(
            answer["error"]
                .as_str()
                .unwrap_or("(no reason given)")
                .to_owned(),
        )),
        None => Err(CtlError::BadAnswer(line.trim().to_owned())),
    }
}

/// A size in bytes, or with a K, M, G or T suffix (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("Invalid size {text:?}: unknown suffix {c:?}")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("Invalid size {text:?}: expected a number of bytes"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("Invalid size {text:?}: too large"))
}

/// `ctl list` as text: one block per export.
fn list_text(result: &Value) -> String {
    let mut out = String::new();
    let exports = result["exports"].as_array().cloned().unwrap_or_default();
    if exports.is_empty() {
        out.push_str("No exports\n");
    }
    for e in exports {
        let s = |k: &str| e[k].as_str().unwrap_or("").to_owned();
        let n = |k: &str| e[k].as_u64().unwrap_or(0);
        out.push_str(&format!("{}\n", s("socket")));
        if s("state") == "failed" {
            out.push_str(&format!("  state:      failed: {}\n", s("error")));
        }
        out.push_str(&format!("  image:      {}\n", s("image")));
        let mode = if e["read_only"].as_bool() == Some(true) {
            "read-only".to_owned()
        } else if e["writethrough"].as_bool() == Some(true) {
            "read-write, write-through".to_owned()
        } else {
            "read-write".to_owned()
        };
        out.push_str(&format!(
            "  mode:       {mode}{}\n",
            if e["direct"].as_bool() == Some(true) {
                ", direct"
            } else {
                ""
            }
        ));
        out.push_str(&format!("  size:       {} bytes\n", n("size")));
        out.push_str(&format!(
            "  queues:     {} ({} workers)\n",
            n("queues"),
            n("workers")
        ));
        out.push_str(&format!("  serial:     {}\n", s("serial")));
        let client = match &e["client"] {
            Value::Null => "none".to_owned(),
            c => match c["pid"].as_i64() {
                Some(pid) => format!("connected (pid {pid})"),
                None => "connected".to_owned(),
            },
        };
        out.push_str(&format!("  client:     {client}\n"));
        out.push_str(&format!("  in flight:  {}\n", n("in_flight")));
        if let Some(ops) = e["ops"].as_object() {
            for (op, o) in ops {
                let requests = o["requests"].as_u64().unwrap_or(0);
                if requests == 0 {
                    continue;
                }
                out.push_str(&format!(
                    "  {:<11} {} requests, {} bytes, {} errors\n",
                    format!("{op}:"),
                    requests,
                    o["bytes"].as_u64().unwrap_or(0),
                    o["errors"].as_u64().unwrap_or(0)
                ));
            }
        }
        let limits = e["limits"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let limits = if limits.is_empty() {
            "none".to_owned()
        } else {
            limits
        };
        let group = e["group"]
            .as_str()
            .map(|g| format!(" (group {g})"))
            .unwrap_or_default();
        out.push_str(&format!("  limits:     {limits}{group}\n"));
        out.push_str(&format!(
            "  throttled:  {:.3} s over {} requests\n",
            e["throttled_seconds"].as_f64().unwrap_or(0.0),
            n("throttled_requests")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("2X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn list_text_shows_every_field() {
        let result = json!({"exports": [{
            "socket": "/run/a.sock", "image": "/img/a.qcow2", "read_only": false,
            "writethrough": false, "direct": true, "size": 1024, "queues": 4, "workers": 2,
            "serial": "a", "client": {"pid": 42}, "in_flight": 3,
            "ops": {"read": {"requests": 5, "bytes": 20480, "errors": 0},
                    "write": {"requests": 0, "bytes": 0, "errors": 0}},
            "throttled_seconds": 1.5, "throttled_requests": 7,
            "group": "g", "limits": {"iops_total": 500},
        }]});
        let text = list_text(&result);
        for want in [
            "/run/a.sock",
            "image:      /img/a.qcow2",
            "read-write, direct",
            "size:       1024 bytes",
            "queues:     4 (2 workers)",
            "connected (pid 42)",
            "in flight:  3",
            "read:       5 requests, 20480 bytes, 0 errors",
            "limits:     iops_total=500 (group g)",
            "throttled:  1.500 s over 7 requests",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
        assert!(!text.contains("write:"), "{text}");
        assert_eq!(list_text(&json!({"exports": []})), "No exports\n");
    }
}
