//! A [`VmConfig`] as `isola-run`'s flags, and back. The launcher turns a VM file into flags
//! (so that flags given after it override it), and writes the VM it starts, from a file or
//! from flags, back as a configuration for the API.
//!
//! ```text
//! --kernel PATH --initrd PATH --cmdline TEXT --cpus N --memory MiB --hugepages --prefault
//! --disk PATH[,ro][,sq-poll][,engine=auto|sync|io-uring]      (repeatable)
//! --net TAP[,mac=XX:XX:XX:XX:XX:XX]                           (repeatable)
//! --console  --console-log FILE  --console-port NAME[,log=FILE] (repeatable)
//! --display WxH  --vnc ADDR:PORT  --input  --on-reset end|restart
//! ```

use std::path::PathBuf;

use crate::{check, Console, ConsolePort, Disk, Display, Engine, Net, OnReset, VmConfig};

/// The flags that describe `vm`, in a fixed order.
pub fn to_args(vm: &VmConfig) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |flag: &str, value: Option<String>| {
        out.push(flag.to_owned());
        out.extend(value);
    };
    let path = |p: &PathBuf| p.to_string_lossy().into_owned();
    if let Some(p) = &vm.kernel {
        push("--kernel", Some(path(p)));
    }
    if let Some(p) = &vm.initrd {
        push("--initrd", Some(path(p)));
    }
    if let Some(c) = &vm.cmdline {
        push("--cmdline", Some(c.clone()));
    }
    if let Some(n) = vm.cpus {
        push("--cpus", Some(n.to_string()));
    }
    if let Some(n) = vm.memory_mib {
        push("--memory", Some(n.to_string()));
    }
    if vm.hugepages {
        push("--hugepages", None);
    }
    if vm.prefault {
        push("--prefault", None);
    }
    for disk in &vm.disks {
        let mut spec = path(&disk.path);
        if disk.readonly {
            spec.push_str(",ro");
        }
        if disk.sq_poll {
            spec.push_str(",sq-poll");
        }
        if disk.engine != Engine::Auto {
            spec.push_str(&format!(",engine={}", disk.engine.name()));
        }
        push("--disk", Some(spec));
    }
    for net in &vm.nets {
        let mut spec = net.tap.clone();
        if let Some(mac) = &net.mac {
            spec.push_str(&format!(",mac={mac}"));
        }
        push("--net", Some(spec));
    }
    if let Some(console) = &vm.console {
        push("--console", None);
        if let Some(log) = &console.log {
            push("--console-log", Some(path(log)));
        }
        for port in &console.ports {
            let mut spec = port.name.clone();
            if let Some(log) = &port.log {
                spec.push_str(&format!(",log={}", path(log)));
            }
            push("--console-port", Some(spec));
        }
    }
    if let Some(display) = &vm.display {
        let (w, h) = crate::DEFAULT_DISPLAY;
        let size = format!(
            "{}x{}",
            display.width.unwrap_or(w),
            display.height.unwrap_or(h)
        );
        push("--display", Some(size));
        if let Some(vnc) = &display.vnc {
            push("--vnc", Some(vnc.clone()));
        }
    }
    if vm.on_reset != OnReset::End {
        push("--on-reset", Some(vm.on_reset.name().to_owned()));
    }
    if vm.input {
        push("--input", None);
    }
    out
}

/// Reads `isola-run`'s VM flags (those [`to_args`] writes; `--display` without a size
/// too). Later flags override earlier ones, as in `isola-run`. The error names the flag.
pub fn from_args(args: &[String]) -> Result<VmConfig, String> {
    let mut vm = VmConfig::default();
    let mut it = args.iter().peekable();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let bad = |why: String| format!("{flag}: {why}");
        match flag.as_str() {
            "--kernel" => vm.kernel = Some(value()?.into()),
            "--initrd" => vm.initrd = Some(value()?.into()),
            "--cmdline" => vm.cmdline = Some(value()?),
            "--cpus" => vm.cpus = Some(check::cpus(number(&value()?).map_err(bad)?).map_err(bad)?),
            "--memory" => {
                vm.memory_mib = Some(check::memory(number(&value()?).map_err(bad)?).map_err(bad)?)
            }
            "--hugepages" => vm.hugepages = true,
            "--prefault" => vm.prefault = true,
            "--disk" => vm.disks.push(disk(&value()?).map_err(bad)?),
            "--net" => vm.nets.push(net(&value()?).map_err(bad)?),
            "--console" => {
                vm.console.get_or_insert_with(Console::default);
            }
            "--console-log" => {
                let log = PathBuf::from(value()?);
                check::flag_safe_path(&log).map_err(bad)?;
                vm.console.get_or_insert_with(Console::default).log = Some(log);
            }
            "--console-port" => {
                let port = console_port(&value()?).map_err(bad)?;
                let console = vm.console.get_or_insert_with(Console::default);
                console.ports.push(port);
                if console.ports.len() > crate::MAX_EXTRA_PORTS {
                    return Err(bad(format!("at most {} ports", crate::MAX_EXTRA_PORTS)));
                }
            }
            "--display" => {
                let display = display_size(&value()?).map_err(bad)?;
                let vnc = vm.display.take().and_then(|d| d.vnc);
                vm.display = Some(Display { vnc, ..display });
            }
            "--vnc" => {
                let addr = value()?;
                check::vnc(&addr).map_err(bad)?;
                let (width, height) = (None, None);
                vm.display
                    .get_or_insert(Display {
                        width,
                        height,
                        vnc: None,
                    })
                    .vnc = Some(addr);
            }
            "--input" => vm.input = true,
            "--on-reset" => {
                let name = value()?;
                vm.on_reset = OnReset::from_name(&name)
                    .ok_or_else(|| bad(format!("'{name}' is neither end nor restart")))?;
            }
            other => return Err(format!("unknown VM flag '{other}'")),
        }
    }
    vm.check_consistency()
        .map_err(|(key, why)| format!("{key}: {why}"))?;
    Ok(vm)
}

fn number<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("'{text}' is not a number"))
}

/// `PATH[,ro][,sq-poll][,engine=E]`: options are taken off the end, so a path holding a
/// comma is fine as long as nothing that looks like an option follows it.
fn disk(spec: &str) -> Result<Disk, String> {
    let mut disk = Disk {
        path: PathBuf::new(),
        readonly: false,
        engine: Engine::Auto,
        sq_poll: false,
    };
    let mut rest = spec;
    while let Some((head, option)) = rest.rsplit_once(',') {
        match option {
            "ro" => disk.readonly = true,
            "sq-poll" => disk.sq_poll = true,
            _ => match option.strip_prefix("engine=") {
                Some(name) => {
                    disk.engine = Engine::from_name(name).ok_or_else(|| {
                        format!("engine '{name}': expected auto, sync or io-uring")
                    })?
                }
                None => break,
            },
        }
        rest = head;
    }
    if rest.is_empty() {
        return Err(format!("'{spec}' names no image"));
    }
    disk.path = rest.into();
    Ok(disk)
}

/// `TAP[,mac=MAC]`.
fn net(spec: &str) -> Result<Net, String> {
    let (tap, mac) = match spec.split_once(',') {
        Some((tap, option)) => {
            let mac = option
                .strip_prefix("mac=")
                .ok_or_else(|| format!("unknown option '{option}' (expected mac=MAC)"))?;
            check::mac(mac)?;
            (tap, Some(mac.to_owned()))
        }
        None => (spec, None),
    };
    check::tap(tap)?;
    Ok(Net {
        tap: tap.to_owned(),
        mac,
    })
}

/// `NAME[,log=FILE]`.
fn console_port(spec: &str) -> Result<ConsolePort, String> {
    let (name, log) = match spec.split_once(',') {
        Some((name, option)) => {
            let log = option
                .strip_prefix("log=")
                .filter(|l| !l.is_empty())
                .ok_or_else(|| format!("unknown option '{option}' (expected log=FILE)"))?;
            (name, Some(PathBuf::from(log)))
        }
        None => (spec, None),
    };
    check::port_name(name)?;
    if let Some(log) = &log {
        check::flag_safe_path(log)?;
    }
    Ok(ConsolePort {
        name: name.to_owned(),
        log,
    })
}

/// `WxH`.
fn display_size(text: &str) -> Result<Display, String> {
    let bad = || format!("'{text}': expected WIDTHxHEIGHT, e.g. 1280x800");
    let (w, h) = text.split_once('x').ok_or_else(bad)?;
    let w = check::side(w.parse().map_err(|_| bad())?)?;
    let h = check::side(h.parse().map_err(|_| bad())?)?;
    Ok(Display {
        width: Some(w),
        height: Some(h),
        vnc: None,
    })
}
