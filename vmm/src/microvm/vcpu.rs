//! vCPUs: register, CPUID and MSR setup, and the run loop of one thread per vCPU, pinned to its
//! host CPU before its first KVM_RUN.

use std::sync::{Arc, Condvar, Mutex, RwLock};

use kvm_bindings::{kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use crate::config::CpuMode;
use crate::error::{Error, Result};
use crate::microvm::bus::Bus;

/// What the vCPUs are asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Run the guest.
    Run,
    /// Park.
    Pause,
    /// Leave the run loop and end the thread.
    Stop,
}

#[derive(Debug)]
struct Ctl {
    want: RunState,
    /// vCPU threads parked or gone.
    parked: usize,
}

/// Shared control of all vCPU threads.
pub struct VcpuControl {
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self {
            ctl: Mutex::new(Ctl {
                want: RunState::Run,
                parked: 0,
            }),
            cv: Condvar::new(),
        }
    }
}

impl VcpuControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets what the vCPUs should do and wakes the parked ones.
    pub fn set(&self, want: RunState) {
        let mut c = self.lock();
        if c.want != RunState::Stop {
            c.want = want;
        }
        self.cv.notify_all();
    }

    /// Current request.
    pub fn want(&self) -> RunState {
        self.lock().want
    }

    /// Waits up to `timeout` until `n` threads are parked or gone.
    pub fn wait_parked(&self, n: usize, timeout: std::time::Duration) -> bool {
        let c = self.lock();
        let (c, _) = self
            .cv
            .wait_timeout_while(c, timeout, |c| c.parked < n)
            .unwrap_or_else(|p| p.into_inner());
        c.parked >= n
    }

    /// Called by a vCPU thread: parks while paused; returns false when it must stop.
    fn checkpoint(&self) -> bool {
        let mut c = self.lock();
        if c.want == RunState::Run {
            return true;
        }
        c.parked += 1;
        self.cv.notify_all();
        while c.want == RunState::Pause {
            c = self.cv.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        if c.want == RunState::Stop {
            // stays counted as parked: the thread is leaving
            return false;
        }
        c.parked -= 1;
        true
    }

    /// Called by a vCPU thread that is done: counts as parked until the host stops the VM.
    pub fn park_until_stop(&self) {
        let mut c = self.lock();
        c.parked += 1;
        self.cv.notify_all();
        while c.want != RunState::Stop {
            c = self.cv.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Called by a vCPU thread halted without an irqchip: waits until asked to pause or stop.
    fn wait_not_running(&self) {
        let c = self.lock();
        let _c = self
            .cv
            .wait_while(c, |c| c.want == RunState::Run)
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// Guest reset (i8042 0xfe, triple fault, KVM shutdown exit).
    Reset,
    /// Guest ACPI power-off.
    PowerOff,
    /// Host asked for shutdown.
    Shutdown,
    /// A vCPU failed.
    Error(String),
}

/// Exit event and its first reason.
pub struct ExitSignal {
    /// Readable when the VM must end.
    pub evt: vmm_sys_util::eventfd::EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl ExitSignal {
    /// New, not fired.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            reason: Mutex::new(None),
        })
    }

    /// Records `reason` (the first one wins) and signals the event.
    pub fn fire(&self, reason: ExitReason) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
            if r.is_none() {
                *r = Some(reason);
            }
        }
        if let Err(e) = self.evt.write(1) {
            tracing::error!("exit event: {e}");
        }
    }

    /// The reason, once fired.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// vm-superio trigger that fires a reset.
pub struct ResetTrigger(pub Arc<ExitSignal>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> std::result::Result<(), Self::E> {
        self.0.fire(ExitReason::Reset);
        Ok(())
    }
}

/// CPUID for vCPU `index` of `count`, from what KVM supports.
pub fn cpuid_for(kvm: &Kvm, index: usize, count: usize) -> Result<CpuId> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((index as u32) << 24) | ((count as u32) << 16);
                e.ecx |= 1 << 31; // running on a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the logical count above is valid
                }
            }
            0xb | 0x1f => e.edx = index as u32,
            _ => {}
        }
    }
    Ok(cpuid)
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, 1), // fast strings
    ]
}

fn lapic_set(regs: &mut [std::os::raw::c_char; 1024], off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

fn lapic_get(regs: &[std::os::raw::c_char; 1024], off: usize) -> u32 {
    u32::from_le_bytes([
        regs[off] as u8,
        regs[off + 1] as u8,
        regs[off + 2] as u8,
        regs[off + 3] as u8,
    ])
}

/// Sets up CPUID, MSRs, FPU and (with an irqchip) the local APIC's LINT0/LINT1 as a Linux guest
/// expects them.
pub fn setup_common(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    index: usize,
    count: usize,
    irqchip: bool,
) -> Result<()> {
    let verr = |what: &str, e: kvm_ioctls::Error| Error::Vcpu {
        index,
        reason: format!("{what}: {e}"),
    };
    let cpuid = cpuid_for(kvm, index, count)?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| verr("KVM_SET_CPUID2", e))?;
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Vcpu {
        index,
        reason: format!("MSR list: {e:?}"),
    })?;
    let n = vcpu.set_msrs(&msrs).map_err(|e| verr("KVM_SET_MSRS", e))?;
    if n != entries.len() {
        return Err(Error::Vcpu {
            index,
            reason: format!(
                "KVM_SET_MSRS set {n} of {} MSRs (stopped at {:#x})",
                entries.len(),
                entries[n].index
            ),
        });
    }
    let fpu = kvm_bindings::kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| verr("KVM_SET_FPU", e))?;
    if irqchip {
        let mut lapic = vcpu.get_lapic().map_err(|e| verr("KVM_GET_LAPIC", e))?;
        const LVT_LINT0: usize = 0x350;
        const LVT_LINT1: usize = 0x360;
        const EXTINT: u32 = 7 << 8;
        const NMI: u32 = 4 << 8;
        let l0 = lapic_get(&lapic.regs, LVT_LINT0) & !0x700;
        lapic_set(&mut lapic.regs, LVT_LINT0, l0 | EXTINT);
        let l1 = lapic_get(&lapic.regs, LVT_LINT1) & !0x700;
        lapic_set(&mut lapic.regs, LVT_LINT1, l1 | NMI);
        vcpu.set_lapic(&lapic)
            .map_err(|e| verr("KVM_SET_LAPIC", e))?;
    }
    Ok(())
}

/// Entry registers for a flat payload at `entry` in `mode`.
pub fn setup_flat_entry(vcpu: &VcpuFd, index: usize, entry: u64, mode: CpuMode) -> Result<()> {
    let verr = |what: &str, e: kvm_ioctls::Error| Error::Vcpu {
        index,
        reason: format!("{what}: {e}"),
    };
    let mut sregs = vcpu.get_sregs().map_err(|e| verr("KVM_GET_SREGS", e))?;
    match mode {
        CpuMode::Real16 => {
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
        }
        CpuMode::Protected32 => {
            let seg = |selector: u16, type_: u8| kvm_bindings::kvm_segment {
                base: 0,
                limit: 0xffff_ffff,
                selector,
                type_,
                present: 1,
                dpl: 0,
                db: 1,
                s: 1,
                l: 0,
                g: 1,
                avl: 0,
                unusable: 0,
                padding: 0,
            };
            sregs.cs = seg(0x8, 0xb);
            let data = seg(0x10, 0x3);
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.cr0 |= 1; // PE
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| verr("KVM_SET_SREGS", e))?;
    let regs = kvm_bindings::kvm_regs {
        rip: entry,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|e| verr("KVM_SET_REGS", e))?;
    // With an in-kernel irqchip, APs wait for INIT/SIPI; a flat payload starts them all at once.
    if index > 0 {
        let mp = kvm_bindings::kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        };
        vcpu.set_mp_state(mp)
            .map_err(|e| verr("KVM_SET_MP_STATE", e))?;
    }
    Ok(())
}

/// Everything a vCPU thread needs.
pub struct VcpuRunner {
    /// Index.
    pub index: usize,
    /// The vCPU.
    pub fd: VcpuFd,
    /// Port-I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus (writable for hot-add).
    pub mmio: Arc<RwLock<Bus>>,
    /// Shared control.
    pub ctl: Arc<VcpuControl>,
    /// VM exit signal.
    pub exit: Arc<ExitSignal>,
}

impl VcpuRunner {
    /// The run loop; returns when asked to stop or when the VM must end.
    pub fn run(mut self) {
        loop {
            if !self.ctl.checkpoint() {
                return;
            }
            match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoOut(port, data) => {
                        self.pio.write(port as u64, data);
                    }
                    VcpuExit::IoIn(port, data) => {
                        self.pio.read(port as u64, data);
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        let bus = self.mmio.read().unwrap_or_else(|p| p.into_inner());
                        if !bus.write(addr, data) {
                            tracing::debug!("vcpu {}: unmapped MMIO write {addr:#x}", self.index);
                        }
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        let bus = self.mmio.read().unwrap_or_else(|p| p.into_inner());
                        bus.read(addr, data);
                    }
                    VcpuExit::Hlt => {
                        // No in-kernel irqchip: nothing can wake the vCPU but the host.
                        self.ctl.wait_not_running();
                    }
                    VcpuExit::Shutdown => {
                        self.exit.fire(ExitReason::Reset);
                        self.park_forever();
                        return;
                    }
                    VcpuExit::SystemEvent(t, _) => {
                        let reason = if t == kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN {
                            ExitReason::PowerOff
                        } else {
                            ExitReason::Reset
                        };
                        self.exit.fire(reason);
                        self.park_forever();
                        return;
                    }
                    other => {
                        let msg = format!("vCPU {}: unexpected exit {other:?}", self.index);
                        tracing::error!("{msg}");
                        self.exit.fire(ExitReason::Error(msg));
                        self.park_forever();
                        return;
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => {
                    let msg = format!("vCPU {}: KVM_RUN: {e}", self.index);
                    tracing::error!("{msg}");
                    self.exit.fire(ExitReason::Error(msg));
                    self.park_forever();
                    return;
                }
            }
        }
    }

    /// After a VM-ending exit: wait for the host to stop the VM.
    fn park_forever(&self) {
        self.ctl.park_until_stop();
    }
}

/// Signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler, so that the signal only interrupts KVM_RUN.
pub fn install_kick_handler() -> Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler).map_err(|e| {
        Error::Vcpu {
            index: 0,
            reason: format!("kick signal handler: {e}"),
        }
    })
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Thread id of the caller.
pub fn gettid() -> i32 {
    // SAFETY: no arguments, no memory effects.
    unsafe { libc::gettid() }
}
