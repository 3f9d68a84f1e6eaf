//! A small synchronous QMP client: one unix socket, bounded reads, every call with a deadline.
//! Asynchronous events that arrive between replies are kept (bounded) for whoever waits on them.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// Longest line accepted from QEMU (a query-pci reply of a big machine is a few 10 KiB).
pub const MAX_LINE: usize = 4 << 20;
/// Events kept while nobody asks for them.
const MAX_EVENTS: usize = 256;

/// A QMP connection in command mode.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    events: VecDeque<Value>,
    timeout: Duration,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("path", &self.path).finish()
    }
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and negotiates capabilities; all
    /// of it within `timeout`, which is also the limit of each later call.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let err = |reason: String| Error::Qmp {
            path: path.to_path_buf(),
            reason,
        };
        let stream = UnixStream::connect(path).map_err(|e| err(format!("connect: {e}")))?;
        let writer = stream
            .try_clone()
            .map_err(|e| err(format!("clone socket: {e}")))?;
        let mut q = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            events: VecDeque::new(),
            timeout,
        };
        let deadline = Instant::now() + timeout;
        let greeting = q.read_message(deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(q.err(format!("no QMP greeting: {}", short(&greeting))));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// Socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Qmp {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// Reads one JSON message, waiting at most until `deadline`.
    fn read_message(&mut self, deadline: Instant) -> Result<Value> {
        let mut line = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.err("no reply within the timeout"));
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| self.err(format!("set read timeout: {e}")))?;
            let limit = (MAX_LINE + 1 - line.len()) as u64;
            let n = match (&mut self.reader).take(limit).read_until(b'\n', &mut line) {
                Ok(n) => n,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return Err(self.err("no reply within the timeout"));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.err(format!("read: {e}"))),
            };
            if n == 0 && !line.ends_with(b"\n") {
                return Err(self.err("connection closed by QEMU"));
            }
            if line.len() > MAX_LINE {
                return Err(self.err(format!("message longer than {MAX_LINE} bytes")));
            }
            if line.ends_with(b"\n") {
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    line.clear();
                    continue;
                }
                return serde_json::from_slice(&line).map_err(|e| {
                    self.err(format!(
                        "bad JSON from QEMU ({e}): {}",
                        String::from_utf8_lossy(&line[..line.len().min(200)])
                    ))
                });
            }
        }
    }

    fn push_event(&mut self, v: Value) {
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(v);
    }

    /// Runs `command` with `arguments`; returns its `return` value, or an error with QEMU's
    /// error class and description.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).expect("JSON of a Value");
        bytes.push(b'\n');
        self.writer
            .set_write_timeout(Some(self.timeout))
            .map_err(|e| self.err(format!("set write timeout: {e}")))?;
        self.writer
            .write_all(&bytes)
            .map_err(|e| self.err(format!("{command}: write: {e}")))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let v = self
                .read_message(deadline)
                .map_err(|e| self.err(format!("{command}: {}", reason_of(e))))?;
            if v.get("event").is_some() {
                self.push_event(v);
                continue;
            }
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                // A reply to an earlier call that timed out: skip it.
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(self.err(format!(
                    "{command}: {}: {}",
                    e.get("class").and_then(Value::as_str).unwrap_or("?"),
                    e.get("desc").and_then(Value::as_str).unwrap_or("?")
                )));
            }
            return Err(self.err(format!("{command}: unexpected reply {}", short(&v))));
        }
    }

    /// Waits at most `timeout` for an event named `name` whose `data` satisfies `pred`; events
    /// already received count. Other events are kept.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let matches = |v: &Value| {
            v.get("event").and_then(Value::as_str) == Some(name)
                && pred(v.get("data").unwrap_or(&Value::Null))
        };
        if let Some(i) = self.events.iter().position(matches) {
            return Ok(self.events.remove(i).expect("index found"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let v = self
                .read_message(deadline)
                .map_err(|e| self.err(format!("waiting for event {name}: {}", reason_of(e))))?;
            if matches(&v) {
                return Ok(v);
            }
            if v.get("event").is_some() {
                self.push_event(v);
            }
        }
    }

    /// Events received so far and not consumed (oldest first); drains them.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }
}

fn reason_of(e: Error) -> String {
    match e {
        Error::Qmp { reason, .. } => reason,
        other => other.to_string(),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 200 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(200).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QMP server speaking the protocol from a script: for each expected command, the
    /// lines to send back (`{id}` is replaced by the request's id).
    fn serve(dir: &Path, script: Vec<(&'static str, Vec<&'static str>)>) -> PathBuf {
        let path = dir.join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            for (cmd, replies) in script {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    return;
                }
                let v: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(v["execute"], cmd);
                let id = v["id"].to_string();
                for rep in replies {
                    w.write_all(rep.replace("{id}", &id).as_bytes()).unwrap();
                    w.write_all(b"\r\n").unwrap();
                }
            }
            // Keep the connection open until the client goes.
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
        });
        path
    }

    #[test]
    fn replies_events_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = serve(
            dir.path(),
            vec![
                ("qmp_capabilities", vec![r#"{"return": {}, "id": {id}}"#]),
                (
                    "query-status",
                    vec![
                        r#"{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
                        r#"{"return": {"status": "paused", "running": false}, "id": {id}}"#,
                    ],
                ),
                (
                    "device_add",
                    vec![
                        r#"{"error": {"class": "GenericError", "desc": "Bus 'hp0' not found"}, "id": {id}}"#,
                    ],
                ),
            ],
        );
        let mut q = Qmp::connect(&path, Duration::from_secs(2)).unwrap();
        let st = q.execute("query-status", None).unwrap();
        assert_eq!(st["status"], "paused");
        let e = q
            .execute("device_add", Some(json!({"driver": "x"})))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("qmp.sock") && e.contains("device_add") && e.contains("Bus 'hp0' not found"),
            "{e}"
        );
        let ev = q
            .wait_event("STOP", Duration::from_millis(10), |_| true)
            .unwrap();
        assert_eq!(ev["event"], "STOP");
    }

    #[test]
    fn a_silent_server_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = serve(dir.path(), vec![("qmp_capabilities", vec![])]);
        let started = Instant::now();
        let e = Qmp::connect(&path, Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("qmp_capabilities") && e.contains("timeout"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn an_endless_line_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let chunk = vec![b'x'; 1 << 16];
            while s.write_all(&chunk).is_ok() {}
        });
        let e = Qmp::connect(&path, Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(e.contains("longer than"), "{e}");
    }
}
