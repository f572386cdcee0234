//! The description of one VM: what `isola-run --config vm.toml` reads, and what the VM's API
//! reports as its configuration. One serde type, [`VmConfig`], for both, so that the
//! configuration read back from a running VM, saved as a TOML file, starts the same VM.
//!
//! ```toml
//! kernel = "vmlinux"            # relative paths are relative to the file's directory
//! initrd = "initramfs.cpio"
//! cmdline = "console=ttyS0 panic=-1"
//! cpus = 2
//! memory_mib = 512
//! hugepages = false
//! prefault = false
//! input = true                  # a keyboard and a tablet
//! on_reset = "restart"          # a guest reset restarts the VM in place (default "end")
//!
//! [[disk]]
//! path = "root.img"
//! readonly = true
//! engine = "io-uring"           # auto (default), sync, io-uring
//! sq_poll = false
//!
//! [[net]]
//! tap = "isola0"
//! mac = "02:00:00:00:00:01"
//!
//! [console]
//! log = "console.log"
//! [[console.port]]
//! name = "org.example.agent"
//!
//! [display]
//! width = 1280
//! height = 800
//! vnc = "127.0.0.1:5900"
//! ```
//!
//! Values are checked while they are read ([`file::parse`]), so that a bad one is reported
//! with its key path and line; [`VmConfig::check_files`] then checks that the files named
//! exist. [`args`] turns a configuration into `isola-run`'s flags and back.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

pub mod args;
pub mod file;

/// Most vCPUs (an xAPIC machine addresses 255).
pub const MAX_CPUS: u32 = 255;
/// Guest RAM bounds, in MiB (the core refuses less than 8).
pub const MIN_MEMORY_MIB: u64 = 8;
pub const MAX_MEMORY_MIB: u64 = 16 << 20;
/// Display sides, in pixels.
pub const MIN_DISPLAY_SIDE: u32 = 16;
pub const MAX_DISPLAY_SIDE: u32 = 4095;
/// Console ports besides port 0 (isola-console serves at most 31 in all).
pub const MAX_EXTRA_PORTS: usize = 30;
/// Longest console port name (isola-console's limit).
pub const MAX_PORT_NAME: usize = 127;

/// vCPUs when neither the file nor a flag says.
pub const DEFAULT_CPUS: u32 = 2;
/// Guest RAM when neither the file nor a flag says.
pub const DEFAULT_MEMORY_MIB: u64 = 128;
/// Display size when `[display]` gives none.
pub const DEFAULT_DISPLAY: (u32, u32) = (1280, 800);

/// One VM. Every field may be left out of a file; [`VmConfig::resolved`] fills in the
/// defaults `isola-run` uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel: an ELF vmlinux with a PVH note, or a bzImage. Left out: Isola's own
    /// virtio-blk test guest, on a scratch disk unless the file has disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// vCPUs, 1 to 255 (default 2).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de::cpus"
    )]
    pub cpus: Option<u32>,
    /// Guest RAM in MiB, 8 to 16 Mi (default 128).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de::memory"
    )]
    pub memory_mib: Option<u64>,
    /// Back guest RAM with 2 MiB huge pages (memory_mib must be even).
    #[serde(default, skip_serializing_if = "is_false")]
    pub hugepages: bool,
    /// Fault in all of guest RAM at start.
    #[serde(default, skip_serializing_if = "is_false")]
    pub prefault: bool,
    /// Disks, each served by an isola-blk; the guest sees them in this order.
    #[serde(default, rename = "disk", skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    /// Network devices, each an isola-net on a tap device.
    #[serde(default, rename = "net", skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<Net>,
    /// A virtio-console (isola-console).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<Console>,
    /// A virtio-gpu (isola-gpu) shown by isola-display; implies `input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<Display>,
    /// A keyboard and a tablet (isola-input).
    #[serde(default, skip_serializing_if = "is_false")]
    pub input: bool,
    /// What a guest reset does: end the VM (default) or restart it in place.
    #[serde(default, skip_serializing_if = "OnReset::is_end")]
    pub on_reset: OnReset,
}

/// `on_reset`: isola-api's `--on-reset`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnReset {
    /// The VM ends (exit status 0).
    #[default]
    End,
    /// The core is started again with the same devices; the device daemons and the run
    /// directory stay.
    Restart,
}

impl OnReset {
    pub fn name(self) -> &'static str {
        match self {
            OnReset::End => "end",
            OnReset::Restart => "restart",
        }
    }

    pub fn from_name(name: &str) -> Option<OnReset> {
        [OnReset::End, OnReset::Restart]
            .into_iter()
            .find(|o| o.name() == name)
    }

    fn is_end(&self) -> bool {
        *self == OnReset::End
    }
}

/// A disk image served by isola-blk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// A raw image file or a block device.
    #[serde(deserialize_with = "de::flag_safe_path")]
    pub path: PathBuf,
    /// The guest may not write (VIRTIO_BLK_F_RO).
    #[serde(default, skip_serializing_if = "is_false")]
    pub readonly: bool,
    /// isola-blk's I/O engine.
    #[serde(default, skip_serializing_if = "Engine::is_auto")]
    pub engine: Engine,
    /// A kernel thread polls the disk's io_uring (more IOPS, a busy CPU).
    #[serde(default, skip_serializing_if = "is_false")]
    pub sq_poll: bool,
}

/// isola-blk's `--engine`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// io_uring for reads and flushes, synchronous writes on a buffered image.
    #[default]
    Auto,
    Sync,
    IoUring,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Auto => "auto",
            Engine::Sync => "sync",
            Engine::IoUring => "io-uring",
        }
    }

    pub fn from_name(name: &str) -> Option<Engine> {
        [Engine::Auto, Engine::Sync, Engine::IoUring]
            .into_iter()
            .find(|e| e.name() == name)
    }

    fn is_auto(&self) -> bool {
        *self == Engine::Auto
    }
}

/// A virtio-net device on an existing tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Net {
    /// The tap device's name (made with `ip tuntap add dev NAME mode tap vnet_hdr`).
    #[serde(deserialize_with = "de::tap")]
    pub tap: String,
    /// The MAC address the guest sees, `xx:xx:xx:xx:xx:xx`, unicast (isola-net's default
    /// if left out).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de::mac"
    )]
    pub mac: Option<String>,
}

/// A virtio-console. Port 0 is the console (`hvc0`), attached with `isolactl console`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Console {
    /// Append everything the guest writes on port 0 to this file.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de::opt_flag_safe_path"
    )]
    pub log: Option<PathBuf>,
    /// More ports (MULTIPORT), in order: port 1, 2, ...
    #[serde(
        default,
        rename = "port",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "de::ports"
    )]
    pub ports: Vec<ConsolePort>,
}

/// A named console port (`/dev/virtio-ports/NAME` in a Linux guest); users attach with
/// `isolactl console --port N`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsolePort {
    /// 1 to 127 printable ASCII characters, no spaces or commas.
    #[serde(deserialize_with = "de::port_name")]
    pub name: String,
    /// Append everything the guest writes on this port to this file.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de::opt_flag_safe_path"
    )]
    pub log: Option<PathBuf>,
}

/// A virtio-gpu and the display process that shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Display {
    /// Width in pixels, 16 to 4095 (default 1280).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de::side"
    )]
    pub width: Option<u32>,
    /// Height in pixels, 16 to 4095 (default 800).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de::side"
    )]
    pub height: Option<u32>,
    /// Serve VNC on this TCP address too, `ADDR:PORT` (keep it on localhost); VNC is always
    /// served on the run directory's `vnc.sock`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de::vnc"
    )]
    pub vnc: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl VmConfig {
    /// The same VM with every default `isola-run` applies made explicit (cpus, memory, the
    /// display's size; a display brings input). What is left out stays out: no kernel means
    /// Isola's test guest.
    pub fn resolved(&self) -> VmConfig {
        let mut vm = self.clone();
        vm.cpus.get_or_insert(DEFAULT_CPUS);
        vm.memory_mib.get_or_insert(DEFAULT_MEMORY_MIB);
        if let Some(display) = &mut vm.display {
            display.width.get_or_insert(DEFAULT_DISPLAY.0);
            display.height.get_or_insert(DEFAULT_DISPLAY.1);
            vm.input = true;
        }
        vm
    }

    /// Every file path in the configuration with its key path, for resolving and checking.
    fn paths_mut(&mut self) -> Vec<(String, &mut PathBuf, PathKind)> {
        let mut out = Vec::new();
        if let Some(p) = &mut self.kernel {
            out.push(("kernel".to_owned(), p, PathKind::Readable));
        }
        if let Some(p) = &mut self.initrd {
            out.push(("initrd".to_owned(), p, PathKind::Readable));
        }
        for (i, disk) in self.disks.iter_mut().enumerate() {
            out.push((format!("disk[{i}].path"), &mut disk.path, PathKind::Disk));
        }
        if let Some(console) = &mut self.console {
            if let Some(p) = &mut console.log {
                out.push(("console.log".to_owned(), p, PathKind::Created));
            }
            for (i, port) in console.ports.iter_mut().enumerate() {
                if let Some(p) = &mut port.log {
                    out.push((format!("console.port[{i}].log"), p, PathKind::Created));
                }
            }
        }
        out
    }

    /// Makes relative paths relative to `base` (the VM file's directory, or the launcher's
    /// working directory for flags).
    pub fn make_absolute(&mut self, base: &std::path::Path) {
        for (_, path, _) in self.paths_mut() {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }

    /// Checks that the files named exist (and, for logs, that their directory does).
    /// Returns the key path of the first that does not, and why.
    pub fn check_files(&mut self) -> Result<(), (String, String)> {
        for (key, path, kind) in self.paths_mut() {
            kind.check(path).map_err(|why| (key, why))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum PathKind {
    /// A readable regular file (kernel, initrd).
    Readable,
    /// A regular file or a block device.
    Disk,
    /// A file that may not exist yet, in a directory that does.
    Created,
}

impl PathKind {
    fn check(self, path: &std::path::Path) -> Result<(), String> {
        use std::os::unix::fs::FileTypeExt;
        let shown = path.display();
        match self {
            PathKind::Readable => match std::fs::File::open(path).and_then(|f| f.metadata()) {
                Ok(meta) if meta.is_file() => Ok(()),
                Ok(_) => Err(format!("'{shown}' is not a regular file")),
                Err(e) => Err(format!("'{shown}': {e}")),
            },
            PathKind::Disk => match std::fs::metadata(path) {
                Ok(meta) if meta.is_file() || meta.file_type().is_block_device() => Ok(()),
                Ok(_) => Err(format!("'{shown}' is not a file or a block device")),
                Err(e) => Err(format!("'{shown}': {e}")),
            },
            PathKind::Created => {
                let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
                match dir {
                    Some(dir) if !dir.is_dir() => {
                        Err(format!("directory '{}' does not exist", dir.display()))
                    }
                    _ => Ok(()),
                }
            }
        }
    }
}

/// Checks applied while a value is read, so that its error carries the value's place.
/// Each is also what [`args`] applies to the same value given as a flag.
pub mod check {
    use super::*;

    pub fn cpus(n: u32) -> Result<u32, String> {
        (1..=MAX_CPUS)
            .contains(&n)
            .then_some(n)
            .ok_or_else(|| format!("{n} vCPUs: expected 1 to {MAX_CPUS}"))
    }

    pub fn memory(n: u64) -> Result<u64, String> {
        (MIN_MEMORY_MIB..=MAX_MEMORY_MIB)
            .contains(&n)
            .then_some(n)
            .ok_or_else(|| format!("{n} MiB: expected {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}"))
    }

    pub fn side(n: u32) -> Result<u32, String> {
        (MIN_DISPLAY_SIDE..=MAX_DISPLAY_SIDE)
            .contains(&n)
            .then_some(n)
            .ok_or_else(|| format!("{n} pixels: expected {MIN_DISPLAY_SIDE} to {MAX_DISPLAY_SIDE}"))
    }

    /// Linux interface names: 1 to 15 bytes, no '/', ':', ',' or white space.
    pub fn tap(name: &str) -> Result<(), String> {
        let ok = (1..=15).contains(&name.len())
            && !name
                .chars()
                .any(|c| c == '/' || c == ':' || c == ',' || c.is_whitespace());
        ok.then_some(()).ok_or_else(|| {
            format!("'{name}' is not a network interface name (1 to 15 bytes, no '/', ':', ',' or spaces)")
        })
    }

    /// `xx:xx:xx:xx:xx:xx`, unicast (isola-net refuses a multicast address).
    pub fn mac(text: &str) -> Result<(), String> {
        let parts: Vec<&str> = text.split(':').collect();
        let hex = parts.len() == 6
            && parts
                .iter()
                .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
        if !hex {
            return Err(format!("'{text}' is not a MAC address (xx:xx:xx:xx:xx:xx)"));
        }
        match u8::from_str_radix(parts[0], 16) {
            Ok(first) if first & 1 == 0 => Ok(()),
            _ => Err(format!("'{text}' is a multicast MAC address")),
        }
    }

    pub fn port_name(name: &str) -> Result<(), String> {
        let ok = !name.is_empty()
            && name.len() <= MAX_PORT_NAME
            && name.bytes().all(|b| b.is_ascii_graphic() && b != b',');
        ok.then_some(()).ok_or_else(|| {
            format!("port name '{name}': 1 to {MAX_PORT_NAME} printable ASCII characters, no spaces or commas")
        })
    }

    pub fn vnc(addr: &str) -> Result<(), String> {
        addr.parse::<std::net::SocketAddr>()
            .map(|_| ())
            .map_err(|_| format!("'{addr}' is not ADDR:PORT, e.g. 127.0.0.1:5900"))
    }

    /// Paths go into comma-separated daemon flags: a comma would split them.
    pub fn flag_safe_path(path: &std::path::Path) -> Result<(), String> {
        let text = path
            .to_str()
            .ok_or_else(|| format!("'{}' is not valid UTF-8", path.display()))?;
        if text.is_empty() {
            return Err("empty path".to_owned());
        }
        if text.contains(',') {
            return Err(format!(
                "'{text}': a path with ',' cannot be passed to the device"
            ));
        }
        Ok(())
    }
}

/// `deserialize_with` helpers: read, then apply [`check`].
mod de {
    use super::*;
    use serde::de::Error;

    fn checked<'de, D, T, F, U>(d: D, f: F) -> Result<U, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
        F: FnOnce(T) -> Result<U, String>,
    {
        let value = T::deserialize(d)?;
        f(value).map_err(D::Error::custom)
    }

    pub fn cpus<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        checked(d, |n: u32| check::cpus(n).map(Some))
    }

    pub fn memory<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        checked(d, |n: u64| check::memory(n).map(Some))
    }

    pub fn side<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        checked(d, |n: u32| check::side(n).map(Some))
    }

    pub fn tap<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        checked(d, |s: String| check::tap(&s).map(|()| s))
    }

    pub fn mac<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        checked(d, |s: String| check::mac(&s).map(|()| Some(s)))
    }

    pub fn vnc<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        checked(d, |s: String| check::vnc(&s).map(|()| Some(s)))
    }

    pub fn port_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        checked(d, |s: String| check::port_name(&s).map(|()| s))
    }

    pub fn flag_safe_path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        checked(d, |p: PathBuf| check::flag_safe_path(&p).map(|()| p))
    }

    pub fn opt_flag_safe_path<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<PathBuf>, D::Error> {
        checked(d, |p: PathBuf| check::flag_safe_path(&p).map(|()| Some(p)))
    }

    pub fn ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ConsolePort>, D::Error> {
        checked(d, |ports: Vec<ConsolePort>| {
            if ports.len() > MAX_EXTRA_PORTS {
                Err(format!(
                    "{} ports: at most {MAX_EXTRA_PORTS} besides the console",
                    ports.len()
                ))
            } else {
                Ok(ports)
            }
        })
    }
}

#[cfg(test)]
mod tests;
