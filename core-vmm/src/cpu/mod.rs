//! Architectural state of the vCPUs at power-on: CPUID, MSRs, LAPIC, and the registers the
//! boot protocols require of the bootstrap processor; and what the host does with a hypercall.

pub mod cpuid;
pub mod hypercall;
pub mod regs;
