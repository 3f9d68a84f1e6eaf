//! cgroup v2 device control: the OCI device rules compiled to a BPF_PROG_TYPE_CGROUP_DEVICE
//! program attached to the container's cgroup (cgroup2 has no devices.allow/deny files).
//!
//! The program checks the rules from last to first (a later rule overrides an earlier one, as
//! with v1 devices.allow/deny) and returns 1 (allow) or 0 (deny) for the first that matches;
//! when none matches it denies if the first rule is a deny-all, else allows.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// One rule as the kernel sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    /// 'a', 'c' or 'b'.
    pub typ: char,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// Subset of "rwm".
    pub access: String,
}

impl Rule {
    /// Parse the v1 syntax ("c 1:3 rwm", "a *:* m").
    pub fn parse(allow: bool, s: &str) -> Option<Rule> {
        let mut it = s.split_whitespace();
        let typ = it.next()?.chars().next()?;
        let (maj, min) = it.next()?.split_once(':')?;
        let num = |x: &str| {
            if x == "*" {
                Some(None)
            } else {
                x.parse().ok().map(Some)
            }
        };
        Some(Rule {
            allow,
            typ,
            major: num(maj)?,
            minor: num(min)?,
            access: it.next().unwrap_or("rwm").to_string(),
        })
    }

    fn is_deny_all(&self) -> bool {
        !self.allow
            && self.typ == 'a'
            && self.major.is_none()
            && self.minor.is_none()
            && ["r", "w", "m"].iter().all(|c| self.access.contains(c))
    }
}

#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8, // dst | src << 4
    off: i16,
    imm: i32,
}

const LDX_W: u8 = 0x61; // dst = *(u32 *)(src + off)
const MOV64_X: u8 = 0xbf;
const MOV64_K: u8 = 0xb7;
const AND32_K: u8 = 0x54;
const RSH32_K: u8 = 0x74;
const JNE_K: u8 = 0x55;
const EXIT: u8 = 0x95;

fn ins(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

const DEV_BLOCK: i32 = 1;
const DEV_CHAR: i32 = 2;
const ACC_MKNOD: i32 = 1;
const ACC_READ: i32 = 2;
const ACC_WRITE: i32 = 4;

fn compile(rules: &[Rule]) -> Vec<Insn> {
    // r2 = type, r3 = access, r4 = major, r5 = minor (struct bpf_cgroup_dev_ctx)
    let mut p = vec![
        ins(LDX_W, 2, 1, 0, 0),
        ins(AND32_K, 2, 0, 0, 0xffff),
        ins(LDX_W, 3, 1, 0, 0),
        ins(RSH32_K, 3, 0, 0, 16),
        ins(LDX_W, 4, 1, 4, 0),
        ins(LDX_W, 5, 1, 8, 0),
    ];
    for r in rules.iter().rev() {
        // each check jumps over the rest of the block when it does not match
        let mut checks: Vec<Insn> = Vec::new();
        match r.typ {
            'c' => checks.push(ins(JNE_K, 2, 0, 0, DEV_CHAR)),
            'b' => checks.push(ins(JNE_K, 2, 0, 0, DEV_BLOCK)),
            _ => {}
        }
        let mut acc = 0;
        for (ch, bit) in [('m', ACC_MKNOD), ('r', ACC_READ), ('w', ACC_WRITE)] {
            if r.access.contains(ch) {
                acc |= bit;
            }
        }
        if acc != ACC_MKNOD | ACC_READ | ACC_WRITE {
            // matches when the requested access is within the rule's: (access & ~acc) == 0
            checks.push(ins(MOV64_X, 1, 3, 0, 0));
            checks.push(ins(AND32_K, 1, 0, 0, !acc & 7));
            checks.push(ins(JNE_K, 1, 0, 0, 0));
        }
        if let Some(m) = r.major {
            checks.push(ins(JNE_K, 4, 0, 0, m as i32));
        }
        if let Some(m) = r.minor {
            checks.push(ins(JNE_K, 5, 0, 0, m as i32));
        }
        let tail = [ins(MOV64_K, 0, 0, 0, r.allow as i32), ins(EXIT, 0, 0, 0, 0)];
        let n = checks.len();
        for (i, c) in checks.iter_mut().enumerate() {
            if c.code == JNE_K {
                c.off = (n - i - 1 + tail.len()) as i16;
            }
        }
        p.extend(checks);
        p.extend(tail);
        if n == 0 {
            // matches everything: earlier rules and the default are unreachable
            return p;
        }
    }
    let default_allow = !rules.first().is_some_and(Rule::is_deny_all);
    p.push(ins(MOV64_K, 0, 0, 0, default_allow as i32));
    p.push(ins(EXIT, 0, 0, 0, 0));
    p
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: attr is a zero-padded bpf_attr of the size we pass.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn put32(a: &mut [u8; 128], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put64(a: &mut [u8; 128], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// Load the program for `rules` and attach it to the cgroup2 directory `dir`.
pub fn attach(dir: &Path, rules: &[Rule]) -> Result<(), String> {
    let prog = compile(rules);
    let raw: Vec<u64> = prog
        .iter()
        .map(|i| {
            u64::from(i.code)
                | (u64::from(i.regs) << 8)
                | (u64::from(i.off as u16) << 16)
                | (u64::from(i.imm as u32) << 32)
        })
        .collect();
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, BPF_PROG_TYPE_CGROUP_DEVICE);
    put32(&mut attr, 4, raw.len() as u32);
    put64(&mut attr, 8, raw.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    put32(&mut attr, 24, 1); // log_level
    put32(&mut attr, 28, log.len() as u32);
    put64(&mut attr, 32, log.as_mut_ptr() as u64);
    let fd = bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(0);
        let text = String::from_utf8_lossy(&log[..end.min(400)]);
        format!(
            "bpf prog load (device filter, {} insns): {e} {text}",
            raw.len()
        )
    })?;
    // SAFETY: fresh fd from the kernel.
    let prog_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let cg = std::fs::File::open(dir).map_err(|e| format!("open {}: {e}", dir.display()))?;
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, cg.as_raw_fd() as u32);
    put32(&mut attr, 4, prog_fd.as_raw_fd() as u32);
    put32(&mut attr, 8, BPF_CGROUP_DEVICE);
    put32(&mut attr, 12, BPF_F_ALLOW_MULTI);
    bpf(BPF_PROG_ATTACH, &mut attr)
        .map_err(|e| format!("bpf prog attach to {}: {e}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules() {
        assert_eq!(
            Rule::parse(true, "c 1:3 rwm"),
            Some(Rule {
                allow: true,
                typ: 'c',
                major: Some(1),
                minor: Some(3),
                access: "rwm".into()
            })
        );
        let r = Rule::parse(false, "a *:* rwm").unwrap();
        assert!(r.is_deny_all());
        assert_eq!(Rule::parse(true, "c 136:* rw").unwrap().minor, None);
        assert!(Rule::parse(true, "c x:1 r").is_none());
    }

    #[test]
    fn program_shape() {
        let rules = vec![
            Rule::parse(false, "a *:* rwm").unwrap(),
            Rule::parse(true, "c 1:3 rw").unwrap(),
        ];
        let p = compile(&rules);
        // prologue 6, rule "c 1:3 rw": type, 3 access, major, minor + 2 = 8, deny-all: 2 (it
        // matches everything, so no default follows)
        assert_eq!(p.len(), 6 + 8 + 2);
        // the first check of the allow rule jumps over its 5 remaining insns
        assert_eq!(p[6].code, JNE_K);
        assert_eq!(p[6].off, 7);
        assert_eq!(
            p[p.len() - 2].imm,
            0,
            "default deny after a deny-all first rule"
        );
    }
}
