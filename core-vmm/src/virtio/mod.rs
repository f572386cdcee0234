//! What distinguishes one virtio device type from another, as far as the core is concerned:
//! a row of [`DeviceKind`]. The transport (`pci::virtio_pci`) and the vhost-user frontend are
//! the same code for all of them.

use std::path::PathBuf;
use std::str::FromStr;

/// Transport feature bits the core lets a guest negotiate (device-specific bits 0-23 pass
/// through from the backend). Packed rings, IOMMU/access-platform, notification data and
/// queue reset are not offered: the transport does not implement them.
const TRANSPORT_FEATURES: u64 = (1 << 28) // VIRTIO_RING_F_INDIRECT_DESC
    | (1 << 29) // VIRTIO_RING_F_EVENT_IDX
    | (1 << 32) // VIRTIO_F_VERSION_1
    | (1 << 39); // VIRTIO_F_ORDER_PLATFORM
const DEVICE_SPECIFIC_FEATURES: u64 = (1 << 24) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Block,
    Net,
    Console,
    Gpu,
    Input,
}

/// The per-type table.
#[derive(Debug, Clone, Copy)]
pub struct KindInfo {
    pub name: &'static str,
    pub virtio_id: u16,
    /// PCI class, subclass, programming interface.
    pub class: (u8, u8, u8),
    pub default_queues: u16,
    pub max_queues: u16,
    pub queue_size: u16,
    /// Bytes of device configuration space.
    pub config_size: u32,
}

impl DeviceKind {
    pub const ALL: [DeviceKind; 5] = [
        DeviceKind::Block,
        DeviceKind::Net,
        DeviceKind::Console,
        DeviceKind::Gpu,
        DeviceKind::Input,
    ];

    #[rustfmt::skip]
    pub fn info(self) -> KindInfo {
        match self {
            DeviceKind::Block => KindInfo { name: "blk", virtio_id: 2, class: (0x01, 0x80, 0), default_queues: 1, max_queues: 64, queue_size: 256, config_size: 60 },
            DeviceKind::Net => KindInfo { name: "net", virtio_id: 1, class: (0x02, 0x00, 0), default_queues: 2, max_queues: 64, queue_size: 256, config_size: 24 },
            DeviceKind::Console => KindInfo { name: "console", virtio_id: 3, class: (0x07, 0x80, 0), default_queues: 2, max_queues: 64, queue_size: 256, config_size: 12 },
            DeviceKind::Gpu => KindInfo { name: "gpu", virtio_id: 16, class: (0x03, 0x80, 0), default_queues: 2, max_queues: 2, queue_size: 256, config_size: 16 },
            DeviceKind::Input => KindInfo { name: "input", virtio_id: 18, class: (0x09, 0x80, 0), default_queues: 2, max_queues: 2, queue_size: 64, config_size: 136 },
        }
    }

    /// Feature bits the guest may see, out of what the backend offers.
    pub fn offerable(self, backend: u64) -> u64 {
        backend & (TRANSPORT_FEATURES | DEVICE_SPECIFIC_FEATURES)
    }

    /// Makes the backend's device configuration agree with the transport's `num_queues`.
    ///
    /// A virtio-blk driver that negotiates VIRTIO_BLK_F_MQ sets up as many queues as the
    /// configuration's `num_queues` says; a backend serving more queues than `--device ...,
    /// queues=N` exposes would make it select queues the transport does not have (Linux then
    /// fails the probe). So, as QEMU's vhost-user-blk frontend does, ours overrides the field.
    ///
    /// Likewise a virtio-net driver with VIRTIO_NET_F_MQ uses `max_virtqueue_pairs` pairs and
    /// finds the control queue after them: the field becomes the pairs the transport has
    /// (`queues=2N+1` exposes N pairs and the control queue).
    pub fn fix_config(self, config: &mut [u8], num_queues: u16) {
        match self {
            DeviceKind::Block => {
                if let Some(field) = config.get_mut(BLK_CONFIG_NUM_QUEUES) {
                    field.copy_from_slice(&num_queues.to_le_bytes());
                }
            }
            DeviceKind::Net => {
                let pairs = (num_queues / 2).max(1);
                if let Some(field) = config.get_mut(NET_CONFIG_MAX_PAIRS) {
                    field.copy_from_slice(&pairs.to_le_bytes());
                }
            }
            // A MULTIPORT console driver sets up 2 queues per port plus the control pair, as
            // many ports as `max_nr_ports` says: never more than the transport has queues for.
            DeviceKind::Console => {
                if let Some(field) = config.get_mut(CONSOLE_CONFIG_MAX_NR_PORTS) {
                    let asked = u32::from_le_bytes([field[0], field[1], field[2], field[3]]);
                    let fits = u32::from(num_queues.saturating_sub(2) / 2).max(1);
                    field.copy_from_slice(&asked.min(fits).to_le_bytes());
                }
            }
            _ => {}
        }
    }
}

impl DeviceKind {
    /// Bytes of the configuration space that the driver writes and the device answers: for
    /// virtio-input, `select` and `subsel`, which choose what the rest of the space shows.
    /// The core reads the configuration back after every driver write, and replays these
    /// bytes to a restarted backend before comparing its configuration with the old one.
    pub fn driver_config(self) -> std::ops::Range<usize> {
        match self {
            DeviceKind::Input => 0..2,
            _ => 0..0,
        }
    }
}

/// `num_queues` (u16) in `struct virtio_blk_config`.
const BLK_CONFIG_NUM_QUEUES: std::ops::Range<usize> = 34..36;
/// `max_virtqueue_pairs` (u16) in `struct virtio_net_config`.
const NET_CONFIG_MAX_PAIRS: std::ops::Range<usize> = 8..10;
/// `max_nr_ports` (u32) in `struct virtio_console_config`.
const CONSOLE_CONFIG_MAX_NR_PORTS: std::ops::Range<usize> = 4..8;

/// One `--device` option: `KIND,socket=PATH[,queues=N][,display=PATH]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub kind: DeviceKind,
    pub socket: PathBuf,
    pub queues: u16,
    /// gpu only: the display process's listening socket. The core connects to it and hands
    /// the connection to the GPU backend (VHOST_USER_GPU_SET_SOCKET), so pixels go from the
    /// GPU process to the display process without passing through the core.
    pub display: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceSpecError {
    #[error("unknown device type '{0}' (known: blk, net, console, gpu, input, vfio-user)")]
    UnknownKind(String),
    #[error("device '{0}' needs socket=PATH")]
    NoSocket(String),
    #[error(
        "bad option '{0}' in --device (expected socket=PATH, queues=N or, for gpu, display=PATH)"
    )]
    BadOption(String),
    #[error("display= is only for gpu devices, not '{0}'")]
    DisplayNotGpu(String),
    #[error("queues={0} is outside 1..={1} for this device type")]
    BadQueues(String, u16),
}

impl FromStr for DeviceSpec {
    type Err = DeviceSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let name = parts.next().unwrap_or_default();
        let kind = DeviceKind::ALL
            .into_iter()
            .find(|k| k.info().name == name)
            .ok_or_else(|| DeviceSpecError::UnknownKind(name.to_owned()))?;
        let info = kind.info();
        let (mut socket, mut queues, mut display) = (None, info.default_queues, None);
        for part in parts {
            match part.split_once('=') {
                Some(("socket", path)) if !path.is_empty() => socket = Some(PathBuf::from(path)),
                Some(("display", _)) if kind != DeviceKind::Gpu => {
                    return Err(DeviceSpecError::DisplayNotGpu(name.to_owned()))
                }
                Some(("display", path)) if !path.is_empty() => display = Some(PathBuf::from(path)),
                Some(("queues", n)) => {
                    queues = n
                        .parse()
                        .ok()
                        .filter(|q| (1..=info.max_queues).contains(q))
                        .ok_or_else(|| DeviceSpecError::BadQueues(n.to_owned(), info.max_queues))?;
                }
                _ => return Err(DeviceSpecError::BadOption(part.to_owned())),
            }
        }
        let socket = socket.ok_or_else(|| DeviceSpecError::NoSocket(name.to_owned()))?;
        Ok(DeviceSpec {
            kind,
            socket,
            queues,
            display,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_and_refuse_nonsense() {
        let spec: DeviceSpec = "blk,socket=/run/blk.sock,queues=4".parse().unwrap();
        assert_eq!(
            spec,
            DeviceSpec {
                kind: DeviceKind::Block,
                socket: "/run/blk.sock".into(),
                queues: 4,
                display: None,
            }
        );
        assert_eq!("blk,socket=/s".parse::<DeviceSpec>().unwrap().queues, 1);
        assert_eq!(
            "floppy,socket=/s".parse::<DeviceSpec>(),
            Err(DeviceSpecError::UnknownKind("floppy".into()))
        );
        assert_eq!(
            "blk".parse::<DeviceSpec>(),
            Err(DeviceSpecError::NoSocket("blk".into()))
        );
        assert_eq!(
            "blk,socket=/s,queues=0".parse::<DeviceSpec>(),
            Err(DeviceSpecError::BadQueues("0".into(), 64))
        );
        assert_eq!(
            "blk,socket=/s,color=red".parse::<DeviceSpec>(),
            Err(DeviceSpecError::BadOption("color=red".into()))
        );
    }

    #[test]
    fn gpu_specs_take_a_display_socket() {
        assert_eq!(
            "gpu,socket=/g.sock,display=/d.sock".parse::<DeviceSpec>(),
            Ok(DeviceSpec {
                kind: DeviceKind::Gpu,
                socket: "/g.sock".into(),
                queues: 2,
                display: Some("/d.sock".into()),
            })
        );
        assert_eq!(
            "gpu,display=/d.sock,socket=/g.sock"
                .parse::<DeviceSpec>()
                .unwrap()
                .display,
            Some("/d.sock".into()),
            "options in any order"
        );
        assert_eq!(
            "gpu,socket=/g.sock".parse::<DeviceSpec>().unwrap().display,
            None,
            "a gpu without a display"
        );
        assert_eq!(
            "blk,socket=/s,display=/d.sock".parse::<DeviceSpec>(),
            Err(DeviceSpecError::DisplayNotGpu("blk".into()))
        );
        assert_eq!(
            "gpu,socket=/s,display=".parse::<DeviceSpec>(),
            Err(DeviceSpecError::BadOption("display=".into()))
        );
        assert_eq!(
            "gpu,display=/d.sock".parse::<DeviceSpec>(),
            Err(DeviceSpecError::NoSocket("gpu".into()))
        );
    }

    #[test]
    fn blk_config_num_queues_follows_the_transport() {
        let mut config = vec![0xaa; 60];
        DeviceKind::Block.fix_config(&mut config, 3);
        assert_eq!(config[34..36], [3, 0]);
        assert!(config[..34].iter().chain(&config[36..]).all(|&b| b == 0xaa));
        let mut short = vec![0xaa; 20];
        DeviceKind::Block.fix_config(&mut short, 3);
        assert_eq!(short, vec![0xaa; 20], "no such field: untouched");
        let mut net = vec![0xaa; 24];
        DeviceKind::Net.fix_config(&mut net, 5);
        assert_eq!(net[8..10], [2, 0], "two pairs and the control queue");
        assert!(net[..8].iter().chain(&net[10..]).all(|&b| b == 0xaa));
        DeviceKind::Net.fix_config(&mut net, 2);
        assert_eq!(net[8..10], [1, 0]);
    }

    #[test]
    fn console_max_nr_ports_fits_the_transport() {
        let config = |ports: u32| {
            let mut c = vec![0u8; 12];
            c[4..8].copy_from_slice(&ports.to_le_bytes());
            c
        };
        let ports = |c: &[u8]| u32::from_le_bytes(c[4..8].try_into().unwrap());
        let mut c = config(3);
        DeviceKind::Console.fix_config(&mut c, 8);
        assert_eq!(ports(&c), 3, "2 * 3 + 2 queues: all three fit");
        DeviceKind::Console.fix_config(&mut c, 6);
        assert_eq!(ports(&c), 2);
        DeviceKind::Console.fix_config(&mut c, 2);
        assert_eq!(ports(&c), 1);
    }

    #[test]
    fn only_input_has_driver_written_config() {
        assert_eq!(DeviceKind::Input.driver_config(), 0..2);
        for kind in DeviceKind::ALL
            .into_iter()
            .filter(|k| *k != DeviceKind::Input)
        {
            assert!(kind.driver_config().is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn only_supported_transport_features_are_offered() {
        let all = u64::MAX;
        let offered = DeviceKind::Block.offerable(all);
        assert_ne!(offered & (1 << 32), 0);
        assert_eq!(offered & (1 << 34), 0, "packed ring is not offered");
        assert_eq!(
            offered & (1 << 30),
            0,
            "the vhost-user protocol bit never reaches the guest"
        );
    }
}
