//! Linux boot paths on /dev/kvm: a synthetic ELF with a PVH note and a synthetic bzImage go
//! through linux-loader, the boot structures and the entry-register setup, and their tiny
//! "kernels" print what they were handed. A stock kernel boot runs only where the host KVM can
//! run one (not on PVM; the test says why it is skipped).

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::TempDir;
use tandem_vmm::microvm::vcpu::ExitReason;
use tandem_vmm::microvm::{Vm, VmOptions};
use tandem_vmm::{BootMode, MemoryConfig, VcpuConfig, VmConfig};

fn config(dir: &Path, kernel: PathBuf, cmdline: &str, mib: u64) -> VmConfig {
    VmConfig {
        kernel,
        boot: BootMode::Linux,
        initrd: None,
        cmdline: cmdline.into(),
        vcpus: vec![VcpuConfig { host_cpu: None }],
        memory: MemoryConfig {
            size_mib: mib,
            ..Default::default()
        },
        nics: vec![],
        disks: vec![],
        vsock: None,
        serial_log: Some(dir.join("serial.log")),
        agent: None,
        netns: None,
    }
}

fn run(cfg: &VmConfig, timeout: Duration) -> (Option<ExitReason>, String) {
    let mut vm = Vm::create(cfg, VmOptions::default()).unwrap();
    vm.start().unwrap();
    let mut pfd = libc::pollfd {
        fd: vm.exit_event().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    let reason = if n == 1 { vm.exit_reason() } else { None };
    vm.shutdown();
    let mut s = String::new();
    std::fs::File::open(cfg.serial_log.as_ref().unwrap())
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    (reason, s)
}

/// Prints the NUL-terminated string at ESI to COM1, then `extra`, then powers off through the
/// ACPI sleep control register (port 0x600, SLP_TYP 5 | SLP_EN). Valid in 32- and 64-bit mode.
fn print_esi_and_power_off(extra: &[u8]) -> Vec<u8> {
    let mut c = vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0x8a, 0x06, // loop: mov al, [esi] / [rsi]
        0x84, 0xc0, // test al, al
        0x74, 0x05, // jz +5
        0xee, // out dx, al
        0xff, 0xc6, // inc esi
        0xeb, 0xf5, // jmp loop
    ];
    c.extend_from_slice(extra);
    c.extend([
        0xb0, 0x34, // mov al, (5 << 2) | (1 << 5)
        0x66, 0xba, 0x00, 0x06, // mov dx, 0x600
        0xee, // out dx, al
        0xf4, 0xeb, 0xfd, // hlt; jmp hlt
    ]);
    c
}

fn elf_with_pvh_note(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    let mut f = vec![0u8; 0x1000];
    // ELF header.
    f[..8].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&LOAD.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
    let phdr = |t: u32, off: u64, addr: u64, size: u64| {
        let mut p = vec![];
        p.extend(t.to_le_bytes());
        p.extend(5u32.to_le_bytes());
        p.extend(off.to_le_bytes());
        p.extend(addr.to_le_bytes());
        p.extend(addr.to_le_bytes());
        p.extend(size.to_le_bytes());
        p.extend(size.to_le_bytes());
        p.extend(0x1000u64.to_le_bytes());
        p
    };
    let load = phdr(1, 0x1000, LOAD, code.len() as u64);
    let note = phdr(4, 0x200, 0, 20);
    f[64..120].copy_from_slice(&load);
    f[120..176].copy_from_slice(&note);
    // Note: namesz 4, descsz 4, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0", entry.
    let mut n = vec![];
    n.extend(4u32.to_le_bytes());
    n.extend(4u32.to_le_bytes());
    n.extend(18u32.to_le_bytes());
    n.extend(b"Xen\0");
    n.extend((LOAD as u32).to_le_bytes());
    f[0x200..0x200 + n.len()].copy_from_slice(&n);
    f.extend_from_slice(code);
    f
}

#[test]
fn pvh_entry_gets_start_info_and_the_command_line() {
    let dir = TempDir::new("boot-pvh");
    // mov esi, [ebx + 24] (start_info.cmdline_paddr), print it, then print "!" if the
    // start_info magic is right.
    let mut code = vec![0x8b, 0x73, 0x18];
    code.extend(print_esi_and_power_off(&[
        0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33, // cmp dword [ebx], 0x336ec578
        0x75, 0x07, // jne over the next 7 bytes
        0xb0, b'!', // mov al, '!'
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al
    ]));
    let kernel = dir.0.join("vmlinux");
    std::fs::write(&kernel, elf_with_pvh_note(&code)).unwrap();
    let cfg = config(&dir.0, kernel, "console=ttyS0 tandem=pvh", 16);
    let (reason, out) = run(&cfg, Duration::from_secs(10));
    assert_eq!(out, "console=ttyS0 tandem=pvh!");
    assert_eq!(reason, Some(ExitReason::PowerOff));
}

fn bzimage(code64: &[u8]) -> Vec<u8> {
    // One setup sector after the boot sector; the protected-mode kernel follows at 0x400 and is
    // loaded at code32_start (1 MiB); the 64-bit entry is 0x200 into it.
    let mut f = vec![0u8; 0x400];
    f[0x1f1] = 1; // setup_sects
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    f[0x211] = 1; // LOADED_HIGH
    f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    let mut k = vec![0xf4u8; 0x200];
    k.extend_from_slice(code64);
    f.extend(k);
    f
}

#[test]
fn bzimage_64bit_entry_gets_the_zero_page_cmdline_and_initrd() {
    let dir = TempDir::new("boot-bz");
    // mov edi, [rsi + 0x218] (ramdisk_image); mov esi, [rsi + 0x228] (cmd_line_ptr);
    // print the cmdline, then the initrd's first byte.
    let mut code = vec![
        0x8b, 0xbe, 0x18, 0x02, 0x00, 0x00, 0x8b, 0xb6, 0x28, 0x02, 0x00, 0x00,
    ];
    code.extend(print_esi_and_power_off(&[
        0x8a, 0x07, // mov al, [rdi]
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al
    ]));
    let kernel = dir.0.join("bzImage");
    std::fs::write(&kernel, bzimage(&code)).unwrap();
    let initrd = dir.0.join("initrd");
    std::fs::write(&initrd, b"Rest of an initramfs").unwrap();
    let mut cfg = config(&dir.0, kernel, "root=/dev/vda ro", 64);
    cfg.initrd = Some(initrd);
    let (reason, out) = run(&cfg, Duration::from_secs(10));
    assert_eq!(out, "root=/dev/vda roR");
    assert_eq!(reason, Some(ExitReason::PowerOff));
}

#[test]
fn bad_kernels_fail_naming_the_file() {
    let dir = TempDir::new("boot-badk");
    let kernel = dir.0.join("not-a-kernel");
    std::fs::write(&kernel, vec![0x90u8; 4096]).unwrap();
    let cfg = config(&dir.0, kernel.clone(), "", 16);
    let e = Vm::create(&cfg, VmOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(&kernel.display().to_string()) && e.contains("neither an ELF"),
        "{e}"
    );
    let mut cfg = config(&dir.0, dir.0.join("k"), "", 16);
    std::fs::write(&cfg.kernel, bzimage(&[0xf4])).unwrap();
    cfg.cmdline = "x".repeat(5000);
    let e = Vm::create(&cfg, VmOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cmdline") && e.contains("5000 bytes"), "{e}");
}

/// Why a stock distro kernel cannot run on this host's KVM, if it cannot.
fn stock_kernel_blocker() -> Option<String> {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some(
            "/dev/kvm is PVM (kvm_pvm loaded): only PVM-enabled guest kernels run; a stock kernel \
             stops with a KVM emulation failure (a PVM guest kernel is an out-of-tree build with \
             CONFIG_KVM_PVM_GUEST, not packaged by Debian; none is on this machine)"
                .into(),
        );
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !cpuinfo.contains(" vmx") && !cpuinfo.contains(" svm") {
        return Some("the CPU has no vmx/svm: /dev/kvm cannot run a stock kernel".into());
    }
    None
}

/// A stock distro kernel: `TANDEM_GUEST_KERNEL`, else the one `vmm/guest/build.sh` fetched
/// (`.tandem-build/guest/guest.env`), else `/boot/vmlinuz-*`.
fn stock_kernel() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("TANDEM_GUEST_KERNEL") {
        return Some(k.into());
    }
    let env = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tandem-build/guest/guest.env");
    if let Ok(s) = std::fs::read_to_string(env) {
        if let Some(k) = s.lines().find_map(|l| l.strip_prefix("KERNEL=")) {
            return Some(k.into());
        }
    }
    std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
}

/// Boots `kernel` with 2 vCPUs and no root file system; returns why the VM ended and the console.
fn boot_stock(kernel: PathBuf) -> (Option<ExitReason>, String) {
    let dir = TempDir::new("boot-stock");
    let mut cfg = config(
        &dir.0,
        kernel,
        "console=ttyS0 panic=-1 reboot=t no_timer_check",
        256,
    );
    cfg.vcpus = vec![VcpuConfig { host_cpu: None }, VcpuConfig { host_cpu: None }];
    // No root file system: the kernel panics and, with panic=-1, resets at once.
    run(&cfg, Duration::from_secs(60))
}

#[test]
fn stock_linux_kernel_boots_to_its_console() {
    if let Some(why) = stock_kernel_blocker() {
        // TANDEM_STOCK_BOOT_ANYWAY=1 tries anyway and prints how far the kernel got.
        if std::env::var_os("TANDEM_STOCK_BOOT_ANYWAY").is_some() {
            if let Some(k) = stock_kernel() {
                let (reason, out) = boot_stock(k.clone());
                eprintln!(
                    "{}: ended {reason:?}; console ({} bytes), last lines:\n{}",
                    k.display(),
                    out.len(),
                    out.lines()
                        .rev()
                        .take(8)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
        }
        eprintln!("SKIPPED stock_linux_kernel_boots_to_its_console: {why}");
        return;
    }
    let kernel = stock_kernel().expect(
        "a stock kernel: TANDEM_GUEST_KERNEL, vmm/guest/build.sh's, or /boot/vmlinuz-* \
         (linux-image-cloud-amd64)",
    );
    let (reason, out) = boot_stock(kernel);
    assert!(out.contains("Linux version"), "{out}");
    assert!(out.contains("ACPI"), "{out}");
    assert!(out.contains("smp: Brought up 1 node, 2 CPUs"), "{out}");
    assert_eq!(reason, Some(ExitReason::Reset), "{out}");
}
