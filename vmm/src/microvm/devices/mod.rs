//! Devices, one file each.

pub mod block;
pub mod i8042;
pub mod power;
pub mod serial;
