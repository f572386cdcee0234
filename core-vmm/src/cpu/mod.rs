//! Architectural state of the vCPUs at power-on: CPUID, MSRs, LAPIC, and the registers the
//! boot protocols require of the bootstrap processor.

pub mod cpuid;
pub mod regs;
