//! Isola's core: the one process that owns the VM.
//!
//! It runs one thread per vCPU on KVM, keeps guest RAM in one sealed memfd, loads the kernel
//! by the Linux boot protocol, emulates only the legacy bits a PC guest needs to boot
//! ([`devices`]), and answers a control socket ([`control`]). Peripherals live in device
//! processes.

pub mod boot;
pub mod config;
pub mod control;
pub mod cpu;
pub mod deadline;
pub mod devices;
pub mod interrupts;
pub mod layout;
pub mod memory;
pub mod pci;
pub mod sandbox;
pub mod vcpu;
pub mod vfio_user;
pub mod vhost_user;
pub mod virtio;
pub mod vm;

/// Renders an error and its chain of causes on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // thiserror's `transparent` and some wrappers repeat their cause; say it once.
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}
