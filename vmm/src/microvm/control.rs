//! Control protocol of a `tandem-vmm` process: one JSON request per connection on a unix socket,
//! answered by one JSON line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{DiskConfig, NicConfig};
use crate::error::{Error, Result};
use crate::hypervisor::{VcpuThread, VmState};

/// Largest request or response line accepted.
pub const MAX_MESSAGE: u64 = 64 * 1024;

/// A request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Request {
    /// VM state.
    State,
    /// vCPU threads.
    VcpuThreads,
    /// Park the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Stop the VM; the process exits after answering.
    Shutdown,
    /// Hot-add a NIC.
    AddNic {
        /// The NIC.
        nic: NicConfig,
    },
    /// Hot-add a disk whose virtio-blk serial is `id`.
    AddDisk {
        /// The disk.
        disk: DiskConfig,
        /// Its serial (GET_ID), 1 to 20 bytes.
        id: String,
    },
}

/// A response.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Error message, if the request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// VM state after the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    /// vCPU threads, for `vcpu_threads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<Vec<VcpuThread>>,
}

/// Reads one bounded line from `r`.
pub fn read_line(r: impl Read) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(r.take(MAX_MESSAGE)).read_line(&mut line)?;
    if !line.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "message not newline-terminated within {MAX_MESSAGE} bytes ({} read)",
                line.len()
            ),
        ));
    }
    Ok(line)
}

/// Sends `req` to the control socket at `path` and returns the response; a response carrying an
/// error becomes `Error::Control`.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Response> {
    let cerr = |reason: String| Error::Control {
        path: path.to_path_buf(),
        reason,
    };
    let mut s = UnixStream::connect(path).map_err(|e| cerr(format!("connect: {e}")))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|_| s.set_write_timeout(Some(timeout)))
        .map_err(|e| cerr(format!("set timeout: {e}")))?;
    let mut msg = serde_json::to_vec(req).map_err(|e| cerr(format!("encode: {e}")))?;
    msg.push(b'\n');
    s.write_all(&msg)
        .map_err(|e| cerr(format!("send {req:?}: {e}")))?;
    let line = read_line(&s).map_err(|e| cerr(format!("reply to {req:?}: {e}")))?;
    let resp: Response = serde_json::from_str(&line)
        .map_err(|e| cerr(format!("reply to {req:?}: {e}: {:?}", line.trim_end())))?;
    if let Some(e) = resp.error {
        return Err(cerr(format!("{req:?}: {e}")));
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r: Request = serde_json::from_str(r#"{"op":"state"}"#).unwrap();
        assert_eq!(r, Request::State);
        let r: Request =
            serde_json::from_str(r#"{"op":"add_nic","nic":{"tap":"tap1","mac":[2,0,0,0,0,1]}}"#)
                .unwrap();
        assert!(matches!(r, Request::AddNic { .. }));
        let r: Request = serde_json::from_str(
            r#"{"op":"add_disk","disk":{"path":"/d.img","read_only":true},"id":"tdisk0"}"#,
        )
        .unwrap();
        assert!(
            matches!(r, Request::AddDisk { ref id, .. } if id == "tdisk0"),
            "{r:?}"
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
        let s = serde_json::to_string(&Response {
            state: Some(VmState::Paused),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s, r#"{"state":"paused"}"#);
    }

    #[test]
    fn oversized_or_unterminated_lines_are_refused() {
        assert_eq!(read_line(&b"{}\n"[..]).unwrap(), "{}\n");
        assert!(read_line(&b"{}"[..]).is_err());
        let big = vec![b'a'; MAX_MESSAGE as usize + 10];
        assert!(read_line(&big[..]).is_err());
    }
}
