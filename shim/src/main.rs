//! containerd-shim-tandem-v2: the containerd shim v2 of tandem pods.

mod bootstrap;
mod config;
mod events;
// The host ID-range allocator for pods in user namespaces (issue 4); `userns` is its policy.
mod idmap;
mod io;
// VM pods' networking (tap + tc mirror of the pod netns); used by the VmPod.
#[cfg_attr(not(test), allow(dead_code))]
mod net;
mod pod;
mod reaper;
mod rootfs;
mod service;
mod state;
mod stats;
mod update;
mod userns;

fn main() {
    // The engine re-executes this binary as a container's init: nothing may run before this.
    if std::env::args().nth(1).as_deref() == Some(tandem_oci::INIT_ARG) {
        tandem_oci::init_main();
    }
    if let Err(e) = bootstrap::main() {
        eprintln!("containerd-shim-tandem-v2: {e:#}");
        std::process::exit(1);
    }
}
