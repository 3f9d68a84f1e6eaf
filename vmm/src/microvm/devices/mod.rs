//! Devices, one file each.

pub mod block;
pub mod hotplug;
pub mod i8042;
pub mod net;
pub mod power;
pub mod serial;
pub mod vsock;
