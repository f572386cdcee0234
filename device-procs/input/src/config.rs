//! The virtio-input configuration space (virtio 1.2, section 5.8.4) of Isola's keyboard and
//! tablet, and what each of them can send.
//!
//! The space is a window, not a structure: the driver writes `select` (byte 0) and `subsel`
//! (byte 1), then reads `size` (byte 2) and the `size` bytes of the union at offset 8. So the
//! configuration the frontend reads depends on the last two bytes it wrote; [`config_space`]
//! computes it from them.
//!
//! Event types and codes are Linux evdev's (`include/uapi/linux/input-event-codes.h`), which
//! virtio-input carries unchanged.

use virtio_bindings::virtio_input::{
    virtio_input_config_select_VIRTIO_INPUT_CFG_ABS_INFO as CFG_ABS_INFO,
    virtio_input_config_select_VIRTIO_INPUT_CFG_EV_BITS as CFG_EV_BITS,
    virtio_input_config_select_VIRTIO_INPUT_CFG_ID_DEVIDS as CFG_ID_DEVIDS,
    virtio_input_config_select_VIRTIO_INPUT_CFG_ID_NAME as CFG_ID_NAME,
};

/// Bytes of `struct virtio_input_config`: select, subsel, size, 5 reserved, a 128-byte union.
pub const CONFIG_LEN: usize = 136;
const UNION_OFFSET: usize = 8;
const UNION_LEN: usize = 128;

pub const EV_SYN: u16 = 0x00;
pub const EV_KEY: u16 = 0x01;
pub const EV_REL: u16 = 0x02;
pub const EV_ABS: u16 = 0x03;
pub const EV_LED: u16 = 0x11;
pub const EV_REP: u16 = 0x14;

pub const SYN_REPORT: u16 = 0;
pub const ABS_X: u16 = 0x00;
pub const ABS_Y: u16 = 0x01;
pub const REL_HWHEEL: u16 = 0x06;
pub const REL_WHEEL: u16 = 0x08;
pub const BTN_LEFT: u16 = 0x110;
pub const BTN_RIGHT: u16 = 0x111;
pub const BTN_MIDDLE: u16 = 0x112;
pub const LED_NUML: u16 = 0x00;
pub const LED_CAPSL: u16 = 0x01;
pub const LED_SCROLLL: u16 = 0x02;
const REP_DELAY: u16 = 0x00;
const REP_PERIOD: u16 = 0x01;

/// Keyboard keys offered: KEY_ESC (1) to KEY_MICMUTE (248), every key of a PC keyboard and
/// the usual media and system keys.
pub const FIRST_KEY: u16 = 1;
pub const LAST_KEY: u16 = 248;

/// `bustype` in ID_DEVIDS: BUS_VIRTUAL.
const BUS_VIRTUAL: u16 = 0x06;
/// `vendor` in ID_DEVIDS: the virtio PCI vendor id, so the guest sees a virtual device.
const VENDOR: u16 = 0x1af4;

/// Which input device a process serves on a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Keyboard,
    Tablet,
}

/// One axis of ABS_INFO: `struct virtio_input_absinfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbsInfo {
    pub min: u32,
    pub max: u32,
    pub fuzz: u32,
    pub flat: u32,
    pub res: u32,
}

impl Kind {
    /// ID_NAME, as the guest's input layer shows it.
    pub fn device_name(self) -> &'static str {
        match self {
            Kind::Keyboard => "Isola Keyboard",
            Kind::Tablet => "Isola Tablet",
        }
    }

    /// Short name for threads and log lines.
    pub fn short(self) -> &'static str {
        match self {
            Kind::Keyboard => "kbd",
            Kind::Tablet => "tablet",
        }
    }

    /// ID_DEVIDS: bustype, vendor, product, version.
    pub fn devids(self) -> [u16; 4] {
        let product = match self {
            Kind::Keyboard => 1,
            Kind::Tablet => 2,
        };
        [BUS_VIRTUAL, VENDOR, product, 1]
    }

    /// The codes of event type `ev_type` this device can send (EV_BITS).
    pub fn codes(self, ev_type: u16) -> Vec<u16> {
        match (self, ev_type) {
            (Kind::Keyboard, EV_KEY) => (FIRST_KEY..=LAST_KEY).collect(),
            (Kind::Keyboard, EV_LED) => vec![LED_NUML, LED_CAPSL, LED_SCROLLL],
            (Kind::Keyboard, EV_REP) => vec![REP_DELAY, REP_PERIOD],
            (Kind::Tablet, EV_KEY) => vec![BTN_LEFT, BTN_RIGHT, BTN_MIDDLE],
            (Kind::Tablet, EV_ABS) => vec![ABS_X, ABS_Y],
            (Kind::Tablet, EV_REL) => vec![REL_HWHEEL, REL_WHEEL],
            _ => Vec::new(),
        }
    }

    /// Whether this device can send `code` of `ev_type`.
    pub fn supports(self, ev_type: u16, code: u16) -> bool {
        self.codes(ev_type).contains(&code)
    }

    /// ABS_INFO for `axis`.
    pub fn abs_info(self, axis: u16) -> Option<AbsInfo> {
        match (self, axis) {
            (Kind::Tablet, ABS_X | ABS_Y) => Some(AbsInfo {
                min: 0,
                max: isola_ipc::input::INPUT_ABS_MAX,
                fuzz: 0,
                flat: 0,
                res: 0,
            }),
            _ => None,
        }
    }
}

/// A bitmap with bit `code` set for each code, cut after its last nonzero byte.
fn bitmap(codes: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    for &code in codes {
        let byte = usize::from(code / 8);
        if out.len() <= byte {
            out.resize(byte + 1, 0);
        }
        out[byte] |= 1 << (code % 8);
    }
    out
}

/// The union's contents for (`select`, `subsel`); empty when the device has nothing there.
fn payload(kind: Kind, select: u8, subsel: u8) -> Vec<u8> {
    let (select, subsel16) = (u32::from(select), u16::from(subsel));
    match select {
        s if s == CFG_ID_NAME && subsel == 0 => kind.device_name().as_bytes().to_vec(),
        s if s == CFG_ID_DEVIDS && subsel == 0 => {
            kind.devids().iter().flat_map(|v| v.to_le_bytes()).collect()
        }
        s if s == CFG_EV_BITS => bitmap(&kind.codes(subsel16)),
        s if s == CFG_ABS_INFO => kind.abs_info(subsel16).map_or_else(Vec::new, |a| {
            [a.min, a.max, a.fuzz, a.flat, a.res]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        }),
        // UNSET, ID_SERIAL (none), PROP_BITS (no properties), anything unknown.
        _ => Vec::new(),
    }
}

/// The whole configuration space as the driver reads it after writing `select`/`subsel`.
pub fn config_space(kind: Kind, select: u8, subsel: u8) -> Vec<u8> {
    let mut out = vec![0u8; CONFIG_LEN];
    out[0] = select;
    out[1] = subsel;
    let data = payload(kind, select, subsel);
    let n = data.len().min(UNION_LEN);
    out[2] = n as u8; // n <= 128
    out[UNION_OFFSET..UNION_OFFSET + n].copy_from_slice(&data[..n]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(kind: Kind, select: u32, subsel: u16) -> (u8, Vec<u8>) {
        let c = config_space(kind, select as u8, subsel as u8);
        assert_eq!(c.len(), CONFIG_LEN);
        assert_eq!((c[0], c[1]), (select as u8, subsel as u8));
        assert!(c[3..8].iter().all(|&b| b == 0), "reserved bytes are zero");
        let size = c[2];
        assert!(
            c[8 + usize::from(size)..].iter().all(|&b| b == 0),
            "nothing after size"
        );
        (size, c[8..8 + usize::from(size)].to_vec())
    }

    fn bit(map: &[u8], code: u16) -> bool {
        map.get(usize::from(code / 8))
            .is_some_and(|b| b & (1 << (code % 8)) != 0)
    }

    #[test]
    fn names_and_ids() {
        assert_eq!(
            space(Kind::Keyboard, CFG_ID_NAME, 0),
            (14, b"Isola Keyboard".to_vec())
        );
        assert_eq!(
            space(Kind::Tablet, CFG_ID_NAME, 0),
            (12, b"Isola Tablet".to_vec())
        );
        let (size, ids) = space(Kind::Tablet, CFG_ID_DEVIDS, 0);
        assert_eq!(size, 8);
        assert_eq!(ids, vec![0x06, 0, 0xf4, 0x1a, 2, 0, 1, 0]);
        // A nonzero subsel for a select that takes none, serial, props, unset: nothing.
        assert_eq!(space(Kind::Keyboard, CFG_ID_NAME, 1).0, 0);
        assert_eq!(space(Kind::Keyboard, 2, 0).0, 0);
        assert_eq!(space(Kind::Keyboard, 0x10, 0).0, 0);
        assert_eq!(space(Kind::Keyboard, 0, 0).0, 0);
        assert_eq!(space(Kind::Keyboard, 0x7f, 3).0, 0);
    }

    #[test]
    fn keyboard_bitmaps() {
        let (size, keys) = space(Kind::Keyboard, CFG_EV_BITS, EV_KEY);
        assert_eq!(size, 32, "KEY_MICMUTE (248) is in byte 31");
        assert!(!bit(&keys, 0), "KEY_RESERVED is not a key");
        for code in [1, 28, 30, 29, 56, 111, 248] {
            assert!(bit(&keys, code), "key {code}");
        }
        assert_eq!(space(Kind::Keyboard, CFG_EV_BITS, EV_LED), (1, vec![0x07]));
        assert_eq!(space(Kind::Keyboard, CFG_EV_BITS, EV_REP), (1, vec![0x03]));
        assert_eq!(space(Kind::Keyboard, CFG_EV_BITS, EV_ABS).0, 0);
        assert_eq!(space(Kind::Keyboard, CFG_EV_BITS, EV_SYN).0, 0);
        assert_eq!(space(Kind::Keyboard, CFG_ABS_INFO, ABS_X).0, 0);
    }

    #[test]
    fn tablet_bitmaps_and_ranges() {
        let (size, keys) = space(Kind::Tablet, CFG_EV_BITS, EV_KEY);
        assert_eq!(size, 35);
        let set: Vec<u16> = (0..size as u16 * 8).filter(|&c| bit(&keys, c)).collect();
        assert_eq!(set, vec![BTN_LEFT, BTN_RIGHT, BTN_MIDDLE]);
        assert_eq!(space(Kind::Tablet, CFG_EV_BITS, EV_ABS), (1, vec![0x03]));
        assert_eq!(
            space(Kind::Tablet, CFG_EV_BITS, EV_REL),
            (2, vec![0x40, 0x01])
        );
        assert_eq!(space(Kind::Tablet, CFG_EV_BITS, EV_LED).0, 0);
        for axis in [ABS_X, ABS_Y] {
            let (size, info) = space(Kind::Tablet, CFG_ABS_INFO, axis);
            assert_eq!(size, 20);
            let max = u32::from_le_bytes(info[4..8].try_into().unwrap());
            assert_eq!(u32::from_le_bytes(info[0..4].try_into().unwrap()), 0);
            assert_eq!(max, 0x7fff);
            assert!(info[8..].iter().all(|&b| b == 0));
        }
        assert_eq!(space(Kind::Tablet, CFG_ABS_INFO, 2).0, 0);
    }

    #[test]
    fn supports_follows_the_bitmaps() {
        assert!(Kind::Keyboard.supports(EV_KEY, 30));
        assert!(!Kind::Keyboard.supports(EV_KEY, 0));
        assert!(!Kind::Keyboard.supports(EV_KEY, 249));
        assert!(!Kind::Keyboard.supports(EV_KEY, BTN_LEFT));
        assert!(Kind::Tablet.supports(EV_KEY, BTN_MIDDLE));
        assert!(!Kind::Tablet.supports(EV_KEY, 30));
    }
}
