//! linux.seccomp -> a libseccomp filter.

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator, LinuxSyscall};

/// The JSON name of a serde enum value ("SCMP_ACT_ERRNO", "SCMP_ARCH_X86_64", ...).
pub(crate) fn serde_name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

fn action(
    a: LinuxSeccompAction,
    errno: Option<u32>,
    default_errno: Option<u32>,
) -> Result<ScmpAction, String> {
    Ok(match a {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            ScmpAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActErrno => {
            ScmpAction::Errno(errno.or(default_errno).unwrap_or(libc::EPERM as u32) as i32)
        }
        LinuxSeccompAction::ScmpActTrace => {
            ScmpAction::Trace(errno.or(default_errno).unwrap_or(libc::EPERM as u32) as u16)
        }
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActNotify => {
            return Err("SCMP_ACT_NOTIFY is not supported (no seccomp agent)".into())
        }
    })
}

fn compare(arg: &oci_spec::runtime::LinuxSeccompArg) -> ScmpArgCompare {
    let idx = arg.index() as u32;
    match arg.op() {
        LinuxSeccompOperator::ScmpCmpNe => {
            ScmpArgCompare::new(idx, ScmpCompareOp::NotEqual, arg.value())
        }
        LinuxSeccompOperator::ScmpCmpLt => {
            ScmpArgCompare::new(idx, ScmpCompareOp::Less, arg.value())
        }
        LinuxSeccompOperator::ScmpCmpLe => {
            ScmpArgCompare::new(idx, ScmpCompareOp::LessOrEqual, arg.value())
        }
        LinuxSeccompOperator::ScmpCmpEq => {
            ScmpArgCompare::new(idx, ScmpCompareOp::Equal, arg.value())
        }
        LinuxSeccompOperator::ScmpCmpGe => {
            ScmpArgCompare::new(idx, ScmpCompareOp::GreaterEqual, arg.value())
        }
        LinuxSeccompOperator::ScmpCmpGt => {
            ScmpArgCompare::new(idx, ScmpCompareOp::Greater, arg.value())
        }
        // OCI: value is the mask, valueTwo the datum compared after masking
        LinuxSeccompOperator::ScmpCmpMaskedEq => ScmpArgCompare::new(
            idx,
            ScmpCompareOp::MaskedEqual(arg.value()),
            arg.value_two().unwrap_or(0),
        ),
    }
}

/// Build (not load) the filter. Unknown syscall names are skipped as runc does; rules whose
/// action equals the default action are skipped (libseccomp refuses them).
pub fn build(sc: &LinuxSeccomp) -> Result<ScmpFilterContext, String> {
    let default = action(sc.default_action(), None, sc.default_errno_ret())
        .map_err(|e| format!("linux.seccomp.defaultAction: {e}"))?;
    let mut ctx = ScmpFilterContext::new(default).map_err(|e| format!("seccomp_init: {e}"))?;
    // the engine decides about no_new_privs itself (process.noNewPrivileges)
    ctx.set_ctl_nnp(false)
        .map_err(|e| format!("seccomp: set nnp: {e}"))?;
    for arch in sc.architectures().iter().flatten() {
        let name = serde_name(arch);
        let a: ScmpArch = name
            .parse()
            .map_err(|e| format!("linux.seccomp.architectures: {name}: {e}"))?;
        ctx.add_arch(a)
            .map_err(|e| format!("linux.seccomp.architectures: add {name}: {e}"))?;
    }
    for (i, rule) in sc.syscalls().iter().flatten().enumerate() {
        add_rule(&mut ctx, rule, default, sc.default_errno_ret())
            .map_err(|e| format!("linux.seccomp.syscalls[{i}]: {e}"))?;
    }
    Ok(ctx)
}

fn add_rule(
    ctx: &mut ScmpFilterContext,
    rule: &LinuxSyscall,
    default: ScmpAction,
    default_errno: Option<u32>,
) -> Result<(), String> {
    let act = action(rule.action(), rule.errno_ret(), default_errno)?;
    if act == default {
        return Ok(());
    }
    let args: Vec<ScmpArgCompare> = rule.args().iter().flatten().map(compare).collect();
    let mut seen = std::collections::HashSet::new();
    let repeated = rule
        .args()
        .iter()
        .flatten()
        .any(|a| !seen.insert(a.index()));
    for name in rule.names() {
        let sys = match ScmpSyscall::from_name(name) {
            Ok(s) => s,
            Err(_) => {
                tracing::debug!(syscall = %name, "seccomp: unknown syscall skipped");
                continue;
            }
        };
        let r = if args.is_empty() {
            ctx.add_rule(act, sys)
        } else if repeated {
            // libseccomp allows one comparison per argument per rule: one rule per comparison
            args.iter()
                .try_for_each(|a| ctx.add_rule_conditional(act, sys, &[*a]).map(|_| ()))
                .map(|_| ctx as &mut ScmpFilterContext)
        } else {
            ctx.add_rule_conditional(act, sys, &args)
        };
        r.map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A profile shaped like the one containerd 1.6 generates for `ctr run --seccomp`
    /// (default errno, three x86 arches, a long allow list, argument filters on personality,
    /// clone and socket, capability-gated groups), including names this libseccomp does not
    /// know.
    pub(crate) const PROFILE: &str = include_str!("../tests/data/seccomp-containerd-1.6.json");

    fn run_in_child(f: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child only calls f and _exit; tests keep f to async-signal-tolerant work.
        match unsafe { libc::fork() } {
            0 => {
                let code = f();
                unsafe { libc::_exit(code) }
            }
            pid if pid > 0 => {
                let mut status = 0;
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status), "child status {status:#x}");
                libc::WEXITSTATUS(status)
            }
            _ => panic!("fork failed"),
        }
    }

    #[test]
    fn realistic_profile_loads_in_a_child() {
        let sc: LinuxSeccomp = serde_json::from_str(PROFILE).unwrap();
        assert!(sc.syscalls().as_ref().unwrap().len() > 10);
        let ctx = build(&sc).unwrap();
        let code = run_in_child(move || {
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return 10;
            }
            if ctx.load().is_err() {
                return 11;
            }
            // allowed: getpid; denied by default errno: a syscall absent from the list
            if unsafe { libc::getpid() } <= 0 {
                return 12;
            }
            let r = unsafe { libc::syscall(libc::SYS_kexec_load, 0, 0, 0, 0) };
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if r != -1 || errno != libc::EPERM {
                return 13;
            }
            0
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn deny_mkdir_profile() {
        let sc: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
                "syscalls":[{"names":["mkdir","mkdirat","no_such_syscall_xyz"],"action":"SCMP_ACT_ERRNO","errnoRet":1},
                            {"names":["getpid"],"action":"SCMP_ACT_ALLOW"}]}"#,
        )
        .unwrap();
        let ctx = build(&sc).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let target = std::ffi::CString::new(dir.path().join("x").to_str().unwrap()).unwrap();
        let code = run_in_child(move || {
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            if ctx.load().is_err() {
                return 11;
            }
            let r = unsafe { libc::mkdir(target.as_ptr(), 0o755) };
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if r == -1 && errno == libc::EPERM {
                0
            } else {
                1
            }
        });
        assert_eq!(code, 0);
        assert!(!dir.path().join("x").exists());
    }

    #[test]
    fn notify_is_rejected_with_field() {
        let sc: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_NOTIFY"}]}"#,
        )
        .unwrap();
        let e = build(&sc).err().unwrap();
        assert!(e.contains("syscalls[0]") && e.contains("NOTIFY"), "{e}");
    }
}
