//! x86_64 platform code: Linux boot (linux-loader) and ACPI tables (acpi_tables).

pub mod acpi;
pub mod boot;
