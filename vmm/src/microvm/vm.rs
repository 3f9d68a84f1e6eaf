//! One VM, assembled in one readable sequence: KVM, memory, irqchip, devices, payload, vCPUs.

use std::fs::OpenOptions;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{BootMode, VmConfig};
use crate::error::{Error, Result};
use crate::hypervisor::{VcpuThread, VmState};
use crate::microvm::arch::{acpi, boot};
use crate::microvm::bus::{Bus, SharedDevice};
use crate::microvm::devices::block::Block;
use crate::microvm::devices::hotplug::{
    HotplugController, GED_GSI, HOTPLUG_BASE, HOTPLUG_LEN, HOTPLUG_REGS_LEN,
};
use crate::microvm::devices::i8042::{I8042, I8042_LEN, I8042_PORT};
use crate::microvm::devices::net::Net;
use crate::microvm::devices::power::{
    AcpiPowerOff, AcpiSleepControl, PM1A_CNT_LEN, PM1A_CNT_PORT, SLEEP_CONTROL_PORT,
};
use crate::microvm::devices::serial::{SerialDevice, SerialOut, COM1_IRQ, COM1_PORT};
use crate::microvm::devices::vsock::Vsock;
use crate::microvm::memory::{self, GuestRam};
use crate::microvm::seccomp;
use crate::microvm::vcpu::{
    self, ExitReason, ExitSignal, ResetTrigger, RunState, VcpuControl, VcpuRunner,
};
use crate::microvm::virtio::mmio::{Interrupt, MmioTransport, MMIO_WINDOW};
use crate::microvm::virtio::VirtioDevice;

const KVM_PATH: &str = "/dev/kvm";
const TSS_ADDRESS: usize = 0xfffb_d000;
/// Guest physical address of the first virtio-mmio window (in the 32-bit MMIO hole).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// GSI of the first virtio-mmio device.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Most virtio-mmio devices (GSIs 5..=22 of the IOAPIC; 23 is the GED's).
pub const MAX_VIRTIO_DEVICES: usize = 18;

/// A virtio device on virtio-mmio: where it is and its transport.
#[derive(Clone)]
pub struct VirtioSlot {
    /// Device name.
    pub name: String,
    /// MMIO base.
    pub base: u64,
    /// GSI.
    pub gsi: u32,
    /// The transport.
    pub transport: Arc<Mutex<MmioTransport>>,
}

impl std::fmt::Debug for VirtioSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioSlot")
            .field("name", &self.name)
            .field("base", &format_args!("{:#x}", self.base))
            .field("gsi", &self.gsi)
            .finish()
    }
}

/// Options of the VMM process, not of the guest.
#[derive(Clone, Copy, Debug, Default)]
pub struct VmOptions {
    /// Install the vCPU seccomp filter in each vCPU thread before its first KVM_RUN.
    pub seccomp: bool,
}

struct VcpuHandle {
    thread: JoinHandle<()>,
    info: VcpuThread,
}

/// A VM: created by [`Vm::create`], started by [`Vm::start`].
pub struct Vm {
    config: VmConfig,
    opts: VmOptions,
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    memory: GuestRam,
    irqchip: bool,
    pio: Bus,
    mmio: Arc<RwLock<Bus>>,
    exit: Arc<ExitSignal>,
    ctl: Arc<VcpuControl>,
    vcpus: Vec<VcpuHandle>,
    virtio: Vec<VirtioSlot>,
    hotplug: Arc<Mutex<HotplugController>>,
    pending: Vec<kvm_ioctls::VcpuFd>,
    stopped: bool,
}

fn dev_err(device: &str, reason: impl std::fmt::Display) -> Error {
    Error::Device {
        device: device.to_string(),
        reason: reason.to_string(),
    }
}

impl Vm {
    /// Builds the VM from a validated config: opens /dev/kvm, maps and binds memory, creates the
    /// irqchip, the platform devices and the vCPUs, and loads the payload. No guest code runs yet.
    pub fn create(config: &VmConfig, opts: VmOptions) -> Result<Self> {
        config.validate()?;
        super::check_supported(config)?;

        let kvm = Kvm::new_with_path(c"/dev/kvm")
            .map_err(|e| Error::io(KVM_PATH, std::io::Error::from_raw_os_error(e.errno())))?;
        let vm_fd = kvm
            .create_vm()
            .map_err(|e| Error::kvm("KVM_CREATE_VM", e))?;
        let memory = memory::build(&config.memory)?;
        for (slot, region) in memory.mem.iter().enumerate() {
            use vm_memory::GuestMemoryRegion;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| Error::Memory {
                    backing: config.memory.backing.name().into(),
                    size: config.memory.size_mib << 20,
                    reason: format!("host address of slot {slot}: {e}"),
                })? as u64;
            let r = kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
            };
            // SAFETY: the region stays mapped for the VM's life (owned by `memory`).
            unsafe { vm_fd.set_user_memory_region(r) }
                .map_err(|e| Error::kvm(format!("KVM_SET_USER_MEMORY_REGION slot {slot}"), e))?;
        }
        vm_fd
            .set_tss_address(TSS_ADDRESS)
            .map_err(|e| Error::kvm("KVM_SET_TSS_ADDR", e))?;
        let irqchip = match vm_fd.create_irq_chip() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("KVM_CREATE_IRQCHIP: {e}; running without an in-kernel irqchip");
                false
            }
        };
        let exit = Arc::new(ExitSignal::new().map_err(|e| dev_err("exit eventfd", e))?);

        // Platform devices on the port bus.
        let mut pio = Bus::new();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| dev_err("serial COM1", e))?;
        if irqchip {
            vm_fd
                .register_irqfd(&serial_irq, COM1_IRQ)
                .map_err(|e| Error::kvm("KVM_IRQFD (COM1)", e))?;
        }
        let out = match &config.serial_log {
            Some(p) => SerialOut::File(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| Error::io(p, e))?,
            ),
            None => SerialOut::Null,
        };
        let serial: SharedDevice = Arc::new(Mutex::new(SerialDevice::new(serial_irq, out)));
        pio.insert(serial, COM1_PORT, 8)
            .map_err(|e| dev_err("serial COM1", format!("{e:?}")))?;
        let i8042: SharedDevice = Arc::new(Mutex::new(I8042(vm_superio::I8042Device::new(
            ResetTrigger(exit.clone()),
        ))));
        pio.insert(i8042, I8042_PORT, I8042_LEN)
            .map_err(|e| dev_err("i8042", format!("{e:?}")))?;
        let power: SharedDevice = Arc::new(Mutex::new(AcpiPowerOff::new(exit.clone())));
        pio.insert(power, PM1A_CNT_PORT, PM1A_CNT_LEN)
            .map_err(|e| dev_err("ACPI PM1a_CNT", format!("{e:?}")))?;
        let sleep: SharedDevice = Arc::new(Mutex::new(AcpiSleepControl::new(exit.clone())));
        pio.insert(sleep, SLEEP_CONTROL_PORT, 2)
            .map_err(|e| dev_err("ACPI sleep control", format!("{e:?}")))?;
        if irqchip && config.boot == BootMode::Linux {
            let pit = kvm_bindings::kvm_pit_config {
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm_fd
                .create_pit2(pit)
                .map_err(|e| Error::kvm("KVM_CREATE_PIT2", e))?;
        }

        // virtio-mmio devices.
        let mut mmio = Bus::new();
        let mut virtio = Vec::new();
        let ndev = config.disks.len() + config.nics.len() + config.vsock.iter().count();
        if ndev > MAX_VIRTIO_DEVICES {
            return Err(Error::invalid(
                "disks, nics",
                format!("{ndev} virtio devices, at most {MAX_VIRTIO_DEVICES}"),
            ));
        }
        let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::with_capacity(ndev);
        for d in &config.disks {
            devices.push(Box::new(Block::open(&d.path, d.read_only)?));
        }
        for n in &config.nics {
            devices.push(Box::new(Net::open(n)?));
        }
        if let Some(v) = &config.vsock {
            devices.push(Box::new(Vsock::open(v)?));
        }
        for dev in devices {
            let i = virtio.len();
            virtio.push(Self::add_virtio(
                &vm_fd,
                irqchip,
                &memory,
                &mut mmio,
                dev,
                VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW,
                VIRTIO_IRQ_BASE + i as u32,
            )?);
        }

        // Hotplug registers and the GED interrupt; the boot devices are present from the start.
        let ged_irq = if irqchip {
            let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(|e| dev_err("ACPI GED", format!("interrupt eventfd: {e}")))?;
            vm_fd
                .register_irqfd(&irq, GED_GSI)
                .map_err(|e| Error::kvm(format!("KVM_IRQFD (ACPI GED, GSI {GED_GSI})"), e))?;
            Some(irq)
        } else {
            None
        };
        let mut hotplug = HotplugController::new(ged_irq);
        for i in 0..virtio.len() {
            hotplug.set_present(i);
        }
        let hotplug = Arc::new(Mutex::new(hotplug));
        mmio.insert(hotplug.clone(), HOTPLUG_BASE, HOTPLUG_LEN)
            .map_err(|e| dev_err("ACPI GED", format!("MMIO {HOTPLUG_BASE:#x}: {e:?}")))?;

        // Payload.
        let n = config.vcpus.len();
        let entry = match config.boot {
            BootMode::Linux => {
                // Every slot is described, filled or not, so that hot-added devices can appear.
                let slots: Vec<acpi::MmioDevice> = (0..MAX_VIRTIO_DEVICES)
                    .map(|i| acpi::MmioDevice {
                        base: VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW,
                        len: MMIO_WINDOW,
                        gsi: VIRTIO_IRQ_BASE + i as u32,
                    })
                    .collect();
                let hp = acpi::Hotplug {
                    regs: HOTPLUG_BASE,
                    regs_len: HOTPLUG_REGS_LEN,
                    gsi: GED_GSI,
                };
                let rsdp = acpi::write_tables(&memory.mem, n, &slots, hp)?;
                Some(boot::load_linux(
                    &memory.mem,
                    config.memory.size_mib << 20,
                    &config.kernel,
                    config.initrd.as_deref(),
                    &config.cmdline,
                    rsdp,
                )?)
            }
            BootMode::Flat { load_addr, .. } => {
                let payload =
                    std::fs::read(&config.kernel).map_err(|e| Error::io(&config.kernel, e))?;
                memory
                    .mem
                    .write_slice(&payload, GuestAddress(load_addr))
                    .map_err(|e| {
                        Error::invalid(
                            "kernel",
                            format!(
                                "{}: {} bytes at {load_addr:#x} do not fit in guest memory: {e}",
                                config.kernel.display(),
                                payload.len()
                            ),
                        )
                    })?;
                None
            }
        };

        // vCPUs.
        let mut pending = Vec::with_capacity(n);
        for index in 0..n {
            let fd = vm_fd
                .create_vcpu(index as u64)
                .map_err(|e| Error::kvm(format!("KVM_CREATE_VCPU {index}"), e))?;
            vcpu::setup_common(&kvm, &fd, index, n, irqchip)?;
            match (&config.boot, entry) {
                (BootMode::Flat { load_addr, mode }, _) => {
                    vcpu::setup_flat_entry(&fd, index, *load_addr, *mode)?
                }
                // APs stay in wait-for-SIPI; the kernel starts them through the local APIC.
                (BootMode::Linux, Some(e)) if index == 0 => {
                    boot::setup_boot_vcpu(&memory.mem, &fd, e)?
                }
                _ => {}
            }
            pending.push(fd);
        }

        Ok(Self {
            config: config.clone(),
            opts,
            kvm,
            vm_fd: Arc::new(vm_fd),
            memory,
            irqchip,
            pio,
            mmio: Arc::new(RwLock::new(mmio)),
            exit,
            ctl: Arc::new(VcpuControl::default()),
            vcpus: Vec::new(),
            virtio,
            hotplug,
            pending,
            stopped: false,
        })
    }

    fn add_virtio(
        vm_fd: &VmFd,
        irqchip: bool,
        memory: &GuestRam,
        mmio: &mut Bus,
        dev: Box<dyn VirtioDevice>,
        base: u64,
        gsi: u32,
    ) -> Result<VirtioSlot> {
        let name = dev.name();
        let efd = || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        let irq = efd().map_err(|e| dev_err(&name, format!("interrupt eventfd: {e}")))?;
        if irqchip {
            vm_fd
                .register_irqfd(&irq, gsi)
                .map_err(|e| Error::kvm(format!("KVM_IRQFD ({name}, GSI {gsi})"), e))?;
        }
        let notify = efd().map_err(|e| dev_err(&name, format!("notify eventfd: {e}")))?;
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            dev,
            memory.mem.clone(),
            Arc::new(Interrupt::new(irq)),
            notify,
        )));
        mmio.insert(transport.clone(), base, MMIO_WINDOW)
            .map_err(|e| dev_err(&name, format!("MMIO window {base:#x}: {e:?}")))?;
        Ok(VirtioSlot {
            name,
            base,
            gsi,
            transport,
        })
    }

    /// Adds a virtio-net NIC to the running VM in the next free virtio-mmio slot, then tells the
    /// guest through the ACPI GED (see [`Vm::hot_add`]).
    pub fn hot_add_nic(&mut self, nic: &crate::config::NicConfig) -> Result<VirtioSlot> {
        crate::config::validate_nic(nic).map_err(|r| Error::invalid("nic", r))?;
        self.check_hot_add(
            &format!("hot-add NIC {}", nic.tap),
            &format!("tap {}", nic.tap),
        )?;
        let dev = Box::new(Net::open(nic)?);
        self.hot_add(dev)
    }

    /// Adds a virtio-blk disk to the running VM in the next free slot; its serial (virtio-blk
    /// GET_ID, `/sys/block/vdX/serial` in a Linux guest) is `id`, at most 20 bytes.
    pub fn hot_add_disk(
        &mut self,
        disk: &crate::config::DiskConfig,
        id: &str,
    ) -> Result<VirtioSlot> {
        let what = format!("disk {}", disk.path.display());
        if id.is_empty() || id.len() > 20 {
            return Err(Error::invalid(
                "disk id",
                format!("{what}: id {id:?} must be 1 to 20 bytes (the virtio-blk serial)"),
            ));
        }
        self.check_hot_add(&format!("hot-add {what}"), &what)?;
        let dev = Box::new(Block::open(&disk.path, disk.read_only)?.with_id(id));
        self.hot_add(dev)
    }

    fn check_hot_add(&self, op: &str, what: &str) -> Result<()> {
        let st = self.state();
        if st == VmState::Stopped {
            return Err(Error::BadState {
                state: st.to_string(),
                op: op.to_string(),
            });
        }
        if self.virtio.len() >= MAX_VIRTIO_DEVICES {
            return Err(Error::invalid(
                "hot-add",
                format!("{what}: all {MAX_VIRTIO_DEVICES} virtio slots are in use"),
            ));
        }
        Ok(())
    }

    /// Maps `dev` into the next free slot (it answers at once), then sets the slot's present and
    /// event bits in the hotplug registers and raises the GED interrupt: a Linux guest runs the
    /// GED's `_EVT`, which sends a bus check to the slot container, and enumerates the device.
    fn hot_add(&mut self, dev: Box<dyn VirtioDevice>) -> Result<VirtioSlot> {
        let i = self.virtio.len();
        let slot = {
            let mut bus = self.mmio.write().unwrap_or_else(|p| p.into_inner());
            Self::add_virtio(
                &self.vm_fd,
                self.irqchip,
                &self.memory,
                &mut bus,
                dev,
                VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW,
                VIRTIO_IRQ_BASE + i as u32,
            )?
        };
        self.virtio.push(slot.clone());
        self.hotplug
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .plug(i)
            .map_err(|e| dev_err("ACPI GED", format!("interrupt for slot {i}: {e}")))?;
        Ok(slot)
    }

    /// The hotplug registers (present and event bitmaps).
    pub fn hotplug(&self) -> Arc<Mutex<HotplugController>> {
        self.hotplug.clone()
    }

    /// The virtio-mmio devices, in order (disks, NICs, vsock).
    pub fn virtio_devices(&self) -> &[VirtioSlot] {
        &self.virtio
    }

    /// The MMIO bus, to map devices before [`Vm::start`] (and hot-added ones after).
    pub fn mmio_bus(&self) -> Arc<RwLock<Bus>> {
        self.mmio.clone()
    }

    /// Adds a port-I/O device; only before [`Vm::start`].
    pub fn add_pio_device(&mut self, dev: SharedDevice, base: u64, len: u64) -> Result<()> {
        if !self.pending.is_empty() || self.vcpus.is_empty() {
            self.pio
                .insert(dev, base, len)
                .map_err(|e| dev_err("port I/O device", format!("{e:?}")))
        } else {
            Err(Error::BadState {
                state: "running".into(),
                op: "add a port I/O device".into(),
            })
        }
    }

    /// Whether the VM has an in-kernel irqchip.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    /// The KVM VM fd.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Event that becomes readable when the VM must end; see [`Vm::exit_reason`].
    pub fn exit_event(&self) -> &EventFd {
        &self.exit.evt
    }

    /// Why the VM ended, once it did.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.reason()
    }

    /// Starts one thread per vCPU; each pins itself to its host CPU (and installs its seccomp
    /// filter) before its first KVM_RUN. Returns once every thread reported its tid.
    pub fn start(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Err(Error::BadState {
                state: self.state().to_string(),
                op: "start".into(),
            });
        }
        vcpu::install_kick_handler()?;
        let pio = Arc::new(self.pio.clone());
        let vcpu_filter = if self.opts.seccomp {
            Some(Arc::new(seccomp::vcpu_filter()?))
        } else {
            None
        };
        let (tx, rx) = mpsc::channel::<(usize, std::result::Result<i32, String>)>();
        for (index, fd) in self.pending.drain(..).enumerate() {
            let host_cpu = self.config.vcpus[index].host_cpu;
            let runner = VcpuRunner {
                index,
                fd,
                pio: pio.clone(),
                mmio: self.mmio.clone(),
                ctl: self.ctl.clone(),
                exit: self.exit.clone(),
            };
            let tx = tx.clone();
            let filter = vcpu_filter.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    if let Some(cpu) = host_cpu {
                        if let Err(e) = vcpu::pin_current_thread(cpu) {
                            let _ = tx.send((index, Err(format!("pin to host CPU {cpu}: {e}"))));
                            runner.ctl.park_until_stop();
                            return;
                        }
                    }
                    if let Some(f) = filter {
                        if let Err(e) = seccompiler::apply_filter(&f) {
                            let _ = tx.send((index, Err(format!("seccomp filter: {e}"))));
                            runner.ctl.park_until_stop();
                            return;
                        }
                    }
                    let _ = tx.send((index, Ok(vcpu::gettid())));
                    drop(tx);
                    runner.run();
                })
                .map_err(|e| Error::Vcpu {
                    index,
                    reason: format!("spawn thread: {e}"),
                })?;
            self.vcpus.push(VcpuHandle {
                thread,
                info: VcpuThread {
                    index,
                    tid: 0,
                    host_cpu,
                },
            });
        }
        drop(tx);
        let mut failure = None;
        for _ in 0..self.vcpus.len() {
            match rx.recv() {
                Ok((index, Ok(tid))) => self.vcpus[index].info.tid = tid,
                Ok((index, Err(reason))) => {
                    failure.get_or_insert(Error::Vcpu { index, reason });
                }
                Err(_) => break,
            }
        }
        if let Some(e) = failure {
            self.shutdown();
            return Err(e);
        }
        Ok(())
    }

    /// The vCPU threads (tids are set once [`Vm::start`] returned).
    pub fn vcpu_threads(&self) -> Vec<VcpuThread> {
        self.vcpus.iter().map(|v| v.info).collect()
    }

    /// Current state.
    pub fn state(&self) -> VmState {
        if self.stopped || self.exit.reason().is_some() {
            return VmState::Stopped;
        }
        match self.ctl.want() {
            RunState::Run => VmState::Running,
            RunState::Pause => VmState::Paused,
            RunState::Stop => VmState::Stopped,
        }
    }

    fn kick_all(&self) {
        for v in &self.vcpus {
            // SAFETY: the pthread is alive until joined (we join only in shutdown, after this).
            unsafe { libc::pthread_kill(v.thread.as_pthread_t(), vcpu::kick_signal()) };
        }
    }

    /// Parks all vCPUs out of KVM_RUN; returns once all are parked.
    pub fn pause(&mut self) -> Result<()> {
        let st = self.state();
        if st != VmState::Running || self.vcpus.is_empty() {
            return Err(Error::BadState {
                state: st.to_string(),
                op: "pause".into(),
            });
        }
        self.ctl.set(RunState::Pause);
        // A kick can land just before a thread enters KVM_RUN; kick again until all are parked.
        for _ in 0..5000 {
            self.kick_all();
            if self
                .ctl
                .wait_parked(self.vcpus.len(), Duration::from_millis(1))
            {
                return Ok(());
            }
        }
        Err(Error::Vcpu {
            index: 0,
            reason: "vCPUs did not park within 5 s".into(),
        })
    }

    /// Resumes parked vCPUs.
    pub fn resume(&mut self) -> Result<()> {
        let st = self.state();
        if st != VmState::Paused {
            return Err(Error::BadState {
                state: st.to_string(),
                op: "resume".into(),
            });
        }
        self.ctl.set(RunState::Run);
        Ok(())
    }

    /// Stops all vCPU threads and joins them; idempotent.
    pub fn shutdown(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.exit.fire(ExitReason::Shutdown);
        self.ctl.set(RunState::Stop);
        let n = self.vcpus.len();
        while !self.ctl.wait_parked(n, Duration::from_millis(1)) {
            self.kick_all();
        }
        for v in self.vcpus.drain(..) {
            let _ = v.thread.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
