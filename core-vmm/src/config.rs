//! The command line of `isola-core`, validated into a [`VmConfig`].

use std::path::PathBuf;

use clap::Parser;

use crate::boot::{mptable, BootConfig};
use crate::cpu::cpuid::HiddenFeatures;
use crate::memory::MemoryOptions;
use crate::sandbox::SeccompMode;
use crate::vfio_user::{VfioUserSpec, VfioUserSpecError};
use crate::virtio::{DeviceSpec, DeviceSpecError};
use crate::vm::VmConfig;

/// One `--device`: a vhost-user device (`KIND,socket=PATH,...`) or a vfio-user device
/// (`vfio-user,socket=PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceArg {
    Virtio(DeviceSpec),
    VfioUser(VfioUserSpec),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceArgError {
    #[error(transparent)]
    Virtio(#[from] DeviceSpecError),
    #[error(transparent)]
    VfioUser(#[from] VfioUserSpecError),
}

impl std::str::FromStr for DeviceArg {
    type Err = DeviceArgError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(',').unwrap_or((s, "")) {
            ("vfio-user", options) => Ok(DeviceArg::VfioUser(VfioUserSpec::parse(options)?)),
            _ => Ok(DeviceArg::Virtio(s.parse()?)),
        }
    }
}

/// The smallest guest the layout makes sense for: boot structures, a kernel at 1 MiB, room.
pub const MIN_MEMORY_MIB: u64 = 8;
const HUGE_PAGE_MIB: u64 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "isola-core",
    version,
    about = "Isola's core VMM: vCPUs on KVM, memfd guest memory, boot, control socket"
)]
pub struct Cli {
    /// Kernel to boot: an ELF vmlinux with a PVH note, or a bzImage.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Initial ramdisk, handed to the kernel as boot module 0 / boot_params' ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Number of vCPUs (threads vcpu0..vcpuN-1).
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128)]
    pub memory: u64,
    /// CPUID features to hide from the guest, e.g. `-cx16,-xsave`.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub cpu_features: String,
    /// Back guest RAM with 2 MiB huge pages (reserve them in /proc/sys/vm/nr_hugepages).
    #[arg(long)]
    pub hugepages: bool,
    /// Fault in all of guest RAM at start instead of on first touch.
    #[arg(long)]
    pub prefault: bool,
    /// Write the guest's COM1 output to this file instead of stdout.
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    /// Serve the control protocol (isolactl) on this Unix socket.
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// When the VM ends, write one line saying how to this inherited file descriptor (the
    /// VM's manager, isola-api, reads it): `poweroff`, `reset`, `shutdown`, `debug-exit N`,
    /// `crash ...`, `failed ...` or `error ...`.
    #[arg(long, value_name = "FD", value_parser = clap::value_parser!(i32).range(3..))]
    pub exit_report_fd: Option<i32>,
    /// A vhost-user device: `KIND,socket=PATH[,queues=N]` with KIND one of blk, net,
    /// console, gpu, input; a gpu may add `display=PATH`, the display process's socket,
    /// whose connection the core hands to the GPU backend. Or `vfio-user,socket=PATH[,ioeventfds=on]`:
    /// any PCI device served by a vfio-user server; `ioeventfds=on` takes the doorbell
    /// ioeventfds the server offers (GET_REGION_IO_FDS). Repeat for more devices.
    #[arg(long = "device")]
    pub devices: Vec<DeviceArg>,
    /// seccomp for the core's threads: kill on a syscall off the allowlist, log it, or off.
    #[arg(long, value_enum, default_value = "kill")]
    pub seccomp: SeccompMode,
    /// Seconds to wait at start for each device's backend to listen and answer; the core
    /// says once that it waits, and exits with status 2 when the time is up.
    #[arg(long, default_value_t = 10)]
    pub device_timeout: u64,
    /// Milliseconds a device process has to answer each vhost-user exchange; one that misses
    /// it is disconnected and reconnected like one that died.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub backend_timeout_ms: u64,
    /// Log filter (error, warn, info, debug, trace, or MODULE=LEVEL,...); overrides RUST_LOG
    /// (default warn).
    #[arg(long, value_name = "FILTER", value_parser = parse_log_filter)]
    pub log_level: Option<String>,
}

fn parse_log_filter(s: &str) -> Result<String, String> {
    if isola_ipc::log_filter::valid(s) {
        Ok(s.to_owned())
    } else {
        Err(format!("'{s}' is not a log filter"))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--cpus must be at least 1")]
    NoCpus,
    #[error("--cpus {0} is more than the {max} CPUs an xAPIC machine can address", max = mptable::MAX_CPUS)]
    TooManyCpus(u32),
    #[error("--memory {0} MiB is less than the {MIN_MEMORY_MIB} MiB minimum")]
    TooLittleMemory(u64),
    #[error("--memory {requested} MiB is more than this host has ({host} MiB)")]
    TooMuchMemory { requested: u64, host: u64 },
    #[error("--memory {0} MiB is not a multiple of the 2 MiB huge page size")]
    HugePageMultiple(u64),
    #[error("--hugepages needs {needed} free 2 MiB huge pages, the host has {free} (see /proc/sys/vm/nr_hugepages)")]
    NotEnoughHugePages { needed: u64, free: u64 },
    #[error("cannot read /proc/meminfo to check --memory")]
    MemInfo,
    #[error("{0} devices do not fit on the PCI bus (at most {max})", max = crate::pci::MAX_SLOTS - 1)]
    TooManyDevices(usize),
    #[error(transparent)]
    CpuFeatures(#[from] crate::cpu::cpuid::CpuFeatureError),
}

/// A field of /proc/meminfo, in KiB (or pages for the HugePages_ counters).
fn meminfo_field(meminfo: &str, name: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

impl Cli {
    /// Checks everything that can be checked without KVM.
    pub fn validate(&self) -> Result<VmConfig, ConfigError> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|_| ConfigError::MemInfo)?;
        self.validate_with(&meminfo)
    }

    fn validate_with(&self, meminfo: &str) -> Result<VmConfig, ConfigError> {
        if self.cpus == 0 {
            return Err(ConfigError::NoCpus);
        }
        if self.cpus > mptable::MAX_CPUS {
            return Err(ConfigError::TooManyCpus(self.cpus));
        }
        if self.memory < MIN_MEMORY_MIB {
            return Err(ConfigError::TooLittleMemory(self.memory));
        }
        let host_mib = meminfo_field(meminfo, "MemTotal").ok_or(ConfigError::MemInfo)? / 1024;
        if self.memory > host_mib {
            return Err(ConfigError::TooMuchMemory {
                requested: self.memory,
                host: host_mib,
            });
        }
        if self.hugepages {
            if !self.memory.is_multiple_of(HUGE_PAGE_MIB) {
                return Err(ConfigError::HugePageMultiple(self.memory));
            }
            let free = meminfo_field(meminfo, "HugePages_Free").unwrap_or(0);
            let needed = self.memory / HUGE_PAGE_MIB;
            if free < needed {
                return Err(ConfigError::NotEnoughHugePages { needed, free });
            }
        }
        if self.devices.len() >= crate::pci::MAX_SLOTS {
            return Err(ConfigError::TooManyDevices(self.devices.len()));
        }
        let hidden_features: HiddenFeatures = self.cpu_features.parse()?;
        Ok(VmConfig {
            num_cpus: self.cpus,
            memory_bytes: self.memory << 20,
            memory: MemoryOptions {
                hugepages: self.hugepages,
                prefault: self.prefault,
            },
            boot: BootConfig {
                kernel: self.kernel.clone(),
                initrd: self.initrd.clone(),
                cmdline: self.cmdline.clone(),
                num_cpus: self.cpus,
            },
            hidden_features,
            serial_log: self.serial_log.clone(),
            control_socket: self.control_socket.clone(),
            devices: self
                .devices
                .iter()
                .filter_map(|d| match d {
                    DeviceArg::Virtio(spec) => Some(spec.clone()),
                    DeviceArg::VfioUser(_) => None,
                })
                .collect(),
            vfio_user: self
                .devices
                .iter()
                .filter_map(|d| match d {
                    DeviceArg::VfioUser(spec) => Some(spec.clone()),
                    DeviceArg::Virtio(_) => None,
                })
                .collect(),
            seccomp: self.seccomp,
            device_timeout: std::time::Duration::from_secs(self.device_timeout),
            backend_timeout: std::time::Duration::from_millis(self.backend_timeout_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24576000 kB\nMemFree: 1 kB\nHugePages_Total:      4\nHugePages_Free:       4\n";

    fn cli(args: &[&str]) -> Cli {
        let mut argv = vec!["isola-core", "--kernel", "k"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap()
    }

    #[test]
    fn vfio_user_devices_are_kept_apart_from_vhost_user_ones() {
        let config = cli(&[
            "--device",
            "vfio-user,socket=/u.sock",
            "--device",
            "blk,socket=/b.sock",
        ])
        .validate_with(MEMINFO)
        .unwrap();
        assert_eq!(config.devices.len(), 1);
        assert_eq!(config.vfio_user[0].socket, PathBuf::from("/u.sock"));
        assert!(
            Cli::try_parse_from(["isola-core", "--kernel", "k", "--device", "vfio-user"]).is_err()
        );
        assert!(Cli::try_parse_from([
            "isola-core",
            "--kernel",
            "k",
            "--device",
            "vfio-users,socket=/s"
        ])
        .is_err());
    }

    #[test]
    fn defaults_are_valid() {
        let config = cli(&[]).validate_with(MEMINFO).unwrap();
        assert_eq!((config.num_cpus, config.memory_bytes), (1, 128 << 20));
    }

    #[test]
    fn bad_cpu_and_memory_values_are_refused() {
        assert_eq!(
            cli(&["--cpus", "0"]).validate_with(MEMINFO).unwrap_err(),
            ConfigError::NoCpus
        );
        assert_eq!(
            cli(&["--cpus", "255"]).validate_with(MEMINFO).unwrap_err(),
            ConfigError::TooManyCpus(255)
        );
        assert_eq!(
            cli(&["--memory", "0"]).validate_with(MEMINFO).unwrap_err(),
            ConfigError::TooLittleMemory(0)
        );
        assert_eq!(
            cli(&["--memory", "24001"])
                .validate_with(MEMINFO)
                .unwrap_err(),
            ConfigError::TooMuchMemory {
                requested: 24001,
                host: 24000
            }
        );
        assert!(Cli::try_parse_from(["isola-core", "--kernel", "k", "--cpus", "-1"]).is_err());
        assert!(Cli::try_parse_from(["isola-core", "--kernel", "k", "--memory", "lots"]).is_err());
    }

    #[test]
    fn hugepages_need_whole_pages_and_a_reserve() {
        assert_eq!(
            cli(&["--hugepages", "--memory", "9"])
                .validate_with(MEMINFO)
                .unwrap_err(),
            ConfigError::HugePageMultiple(9)
        );
        assert_eq!(
            cli(&["--hugepages", "--memory", "10"])
                .validate_with(MEMINFO)
                .unwrap_err(),
            ConfigError::NotEnoughHugePages { needed: 5, free: 4 }
        );
        assert!(cli(&["--hugepages", "--memory", "8"])
            .validate_with(MEMINFO)
            .is_ok());
    }

    #[test]
    fn cpu_features_are_parsed_and_checked() {
        let config = cli(&["--cpu-features", "-cx16,-xsave"])
            .validate_with(MEMINFO)
            .unwrap();
        assert_eq!(config.hidden_features, "-cx16,-xsave".parse().unwrap());
        assert!(matches!(
            cli(&["--cpu-features", "-warp"]).validate_with(MEMINFO),
            Err(ConfigError::CpuFeatures(_))
        ));
    }
}
