//! Seccomp filters, one per thread kind (seccompiler). Anything not listed kills the process.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use crate::error::{Error, Result};

/// KVM_RUN = _IO(0xae, 0x80).
const KVM_RUN: u64 = 0xae80;

/// Syscalls every thread needs (memory allocation, locks, signals, exit, time, logging).
const COMMON: &[libc::c_long] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_read,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    libc::SYS_write,
    libc::SYS_writev,
];

/// Extra syscalls of the VMM's main thread: event loop, control socket, joining vCPU threads,
/// kicking them, and KVM/tap ioctls for hot-add.
const VMM_EXTRA: &[libc::c_long] = &[
    libc::SYS_accept4,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd2,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_ioctl,
    libc::SYS_lseek,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
    libc::SYS_statx,
    libc::SYS_tgkill,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>, kind: &str) -> Result<BpfProgram> {
    let err = |e: &dyn std::fmt::Display| Error::Device {
        device: format!("seccomp filter ({kind})"),
        reason: e.to_string(),
    };
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(&e))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| err(&e))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(&e))
}

fn allow_all(list: &[libc::c_long], rules: &mut BTreeMap<i64, Vec<SeccompRule>>) {
    for nr in list {
        rules.insert(*nr, vec![]);
    }
}

/// Filter of a vCPU thread: the common set and `ioctl(_, KVM_RUN)` only.
pub fn vcpu_filter() -> Result<BpfProgram> {
    let mut rules = BTreeMap::new();
    allow_all(COMMON, &mut rules);
    let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, KVM_RUN)
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(|e| Error::Device {
            device: "seccomp filter (vcpu)".into(),
            reason: e.to_string(),
        })?;
    rules.insert(libc::SYS_ioctl, vec![cond]);
    // std checks an fd with fcntl(F_GETFD) before closing it (dropping the vCPU fd at exit).
    let getfd = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::F_GETFD as u64,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(|e| Error::Device {
        device: "seccomp filter (vcpu)".into(),
        reason: e.to_string(),
    })?;
    rules.insert(libc::SYS_fcntl, vec![getfd]);
    compile(rules, "vcpu")
}

/// Filter of the VMM's main thread.
pub fn vmm_filter() -> Result<BpfProgram> {
    let mut rules = BTreeMap::new();
    allow_all(COMMON, &mut rules);
    allow_all(VMM_EXTRA, &mut rules);
    compile(rules, "vmm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        assert!(!vcpu_filter().unwrap().is_empty());
        assert!(vmm_filter().unwrap().len() > vcpu_filter().unwrap().len());
    }

    #[test]
    fn vcpu_filter_kills_a_forbidden_syscall() {
        // In a child process: apply the vCPU filter and call socket(), which it does not allow.
        // SAFETY: the child only makes raw syscalls and exits.
        let prog = vcpu_filter().unwrap();
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if seccompiler::apply_filter(&prog).is_err() {
                unsafe { libc::_exit(2) };
            }
            unsafe {
                libc::syscall(libc::SYS_ioctl, -1, KVM_RUN); // allowed: EBADF
                libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0);
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }
}
