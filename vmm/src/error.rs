//! One error type for the crate; every message names the thing it is about.

use std::io;
use std::path::PathBuf;

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Errors of the hypervisor seam and the microVM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or device could not be opened or used, e.g. "/dev/kvm: No such file or directory".
    #[error("{}: {source}", path.display())]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The kernel (or flat payload) given in the config does not exist.
    #[error("kernel {}: not found", .0.display())]
    KernelNotFound(PathBuf),
    /// The initrd given in the config does not exist.
    #[error("initrd {}: not found", .0.display())]
    InitrdNotFound(PathBuf),
    /// A field of the VM config is invalid.
    #[error("invalid VM config: {field}: {reason}")]
    InvalidConfig {
        /// Field name, e.g. `memory.size_mib`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A KVM ioctl failed.
    #[error("KVM {op}: {source}")]
    Kvm {
        /// The operation, e.g. `KVM_CREATE_VM`.
        op: String,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error("guest memory ({backing}, {size} bytes): {reason}")]
    Memory {
        /// The backing kind.
        backing: String,
        /// Size in bytes.
        size: u64,
        /// What failed.
        reason: String,
    },
    /// A vCPU thread could not be started, pinned or set up.
    #[error("vCPU {index}: {reason}")]
    Vcpu {
        /// vCPU index.
        index: usize,
        /// What failed.
        reason: String,
    },
    /// A device could not be set up.
    #[error("device {device}: {reason}")]
    Device {
        /// Device name.
        device: String,
        /// What failed.
        reason: String,
    },
    /// The control socket of a `tandem-vmm` process failed or answered with an error.
    #[error("control socket {}: {reason}", path.display())]
    Control {
        /// Socket path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The `tandem-vmm` process could not be started or died.
    #[error("tandem-vmm process {binary}: {reason}")]
    Process {
        /// Binary path.
        binary: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The VM is not in a state that allows the operation.
    #[error("VM is {state}: cannot {op}")]
    BadState {
        /// Current state.
        state: String,
        /// Requested operation.
        op: String,
    },
    /// A QEMU process could not be started, or failed or died.
    #[error("QEMU {}: {reason}", binary.display())]
    Qemu {
        /// QEMU binary (or `pid N` when re-attached).
        binary: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A QMP call failed or QEMU answered it with an error.
    #[error("QMP {}: {reason}", path.display())]
    Qmp {
        /// QMP socket path.
        path: PathBuf,
        /// What failed, with QEMU's error class and description.
        reason: String,
    },
    /// A feature this backend does not have (yet); names the feature.
    #[error("{feature}: not supported by the {backend} backend")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// Feature, e.g. "virtio-net NIC tap0".
        feature: String,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn kvm(op: impl Into<String>, source: kvm_ioctls::Error) -> Self {
        Error::Kvm {
            op: op.into(),
            source,
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
