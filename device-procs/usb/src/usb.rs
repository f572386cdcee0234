//! What a USB function looks like to the controller: control transfers on endpoint 0 and
//! IN/OUT transfers on its other endpoints. The standard requests every device answers the
//! same way (descriptors, configuration, interface, status) are here, once.

use crate::trb::Setup;

/// Port speed IDs, as PORTSC and the slot context carry them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speed {
    Full = 1,
    High = 3,
    Super = 4,
}

impl Speed {
    /// The default max packet size of endpoint 0 at this speed.
    pub fn ep0_max_packet(self) -> u16 {
        match self {
            Speed::Full => 64,
            Speed::High => 64,
            Speed::Super => 512,
        }
    }
}

/// The device refused the request: the endpoint stalls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall;

/// How a non-control transfer went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Xfer {
    /// This many bytes moved (fewer than asked is a short packet).
    Done(usize),
    /// Nothing to give now (interrupt IN without a report): retry when the device has more.
    Nak,
    Stall,
}

pub trait UsbDevice: Send {
    fn speed(&self) -> Speed;
    /// A control transfer with `data_out` (empty for IN requests); returns the IN data, at
    /// most `setup.length` bytes.
    fn control(&mut self, setup: &Setup, data_out: &[u8]) -> Result<Vec<u8>, Stall>;
    /// An IN transfer on endpoint number `ep` (1..=15) into `buf`.
    fn transfer_in(&mut self, ep: u8, buf: &mut [u8]) -> Xfer;
    /// An OUT transfer on endpoint number `ep`.
    fn transfer_out(&mut self, ep: u8, data: &[u8]) -> Xfer;
    /// Bus reset or a controller reset: back to the default state.
    fn reset(&mut self);
    /// A halted endpoint was cleared (CLEAR_FEATURE(ENDPOINT_HALT) or Reset Endpoint).
    fn clear_halt(&mut self, _ep: u8) {}
}

pub const GET_STATUS: u8 = 0;
pub const CLEAR_FEATURE: u8 = 1;
pub const SET_FEATURE: u8 = 3;
pub const SET_ADDRESS: u8 = 5;
pub const GET_DESCRIPTOR: u8 = 6;
pub const GET_CONFIGURATION: u8 = 8;
pub const SET_CONFIGURATION: u8 = 9;
pub const GET_INTERFACE: u8 = 10;
pub const SET_INTERFACE: u8 = 11;
pub const SET_SEL: u8 = 48;
pub const SET_ISOCH_DELAY: u8 = 49;

pub const DT_DEVICE: u8 = 1;
pub const DT_CONFIG: u8 = 2;
pub const DT_STRING: u8 = 3;
pub const DT_INTERFACE: u8 = 4;
pub const DT_ENDPOINT: u8 = 5;
pub const DT_BOS: u8 = 15;
pub const DT_SS_ENDPOINT_COMPANION: u8 = 48;

/// The descriptors of a one-configuration device.
pub struct Descriptors {
    pub device: Vec<u8>,
    /// The whole configuration: configuration, interfaces, class and endpoint descriptors.
    pub config: Vec<u8>,
    /// String descriptors 1.. (index 0 is the language list).
    pub strings: Vec<&'static str>,
    /// For SuperSpeed devices.
    pub bos: Option<Vec<u8>>,
}

/// A device descriptor.
pub fn device_descriptor(speed: Speed, vendor: u16, product: u16) -> Vec<u8> {
    let (bcd_usb, ep0): (u16, u8) = match speed {
        Speed::Super => (0x0320, 9),
        Speed::High => (0x0200, 64),
        Speed::Full => (0x0110, 64),
    };
    let mut d = vec![18, DT_DEVICE];
    d.extend_from_slice(&bcd_usb.to_le_bytes());
    d.extend_from_slice(&[0, 0, 0, ep0]);
    d.extend_from_slice(&vendor.to_le_bytes());
    d.extend_from_slice(&product.to_le_bytes());
    // bcdDevice 1.00, strings 1 (maker) 2 (product) 3 (serial), one configuration.
    d.extend_from_slice(&[0x00, 0x01, 1, 2, 3, 1]);
    d
}

/// A configuration descriptor header followed by `body`, with wTotalLength filled in.
pub fn config_descriptor(interfaces: u8, body: &[u8]) -> Vec<u8> {
    let total = u16::try_from(9 + body.len()).expect("descriptors are small");
    let mut d = vec![9, DT_CONFIG];
    d.extend_from_slice(&total.to_le_bytes());
    // bNumInterfaces, bConfigurationValue 1, iConfiguration 0, self powered, 100 mA.
    d.extend_from_slice(&[interfaces, 1, 0, 0xc0, 50]);
    d.extend_from_slice(body);
    d
}

pub fn endpoint_descriptor(address: u8, attributes: u8, max_packet: u16, interval: u8) -> [u8; 7] {
    let mp = max_packet.to_le_bytes();
    [7, DT_ENDPOINT, address, attributes, mp[0], mp[1], interval]
}

/// A BOS with the USB 2.0 extension and the SuperSpeed device capability.
pub fn superspeed_bos() -> Vec<u8> {
    let mut d = vec![5, DT_BOS, 22, 0, 2];
    d.extend_from_slice(&[7, 16, 2, 0, 0, 0, 0]);
    // SuperSpeed: speeds FS|HS|SS supported, full functionality from FS, no exit latencies.
    d.extend_from_slice(&[10, 16, 3, 0, 0x0e, 0, 1, 0, 0, 0]);
    d
}

fn string_descriptor(index: u8, strings: &[&str]) -> Option<Vec<u8>> {
    if index == 0 {
        return Some(vec![4, DT_STRING, 0x09, 0x04]);
    }
    let s = strings.get(usize::from(index) - 1)?;
    let mut d = vec![0, DT_STRING];
    for unit in s.encode_utf16().take(126) {
        d.extend_from_slice(&unit.to_le_bytes());
    }
    d[0] = d.len() as u8;
    Some(d)
}

/// The state every device keeps for the standard requests.
#[derive(Debug, Default, Clone, Copy)]
pub struct StandardState {
    pub configuration: u8,
}

/// Answers a standard request (type bits 6:5 = 0), or `None` if it is not one this layer
/// knows (the device then answers or stalls).
pub fn standard(
    state: &mut StandardState,
    desc: &Descriptors,
    setup: &Setup,
) -> Option<Result<Vec<u8>, Stall>> {
    if setup.request_type & 0x60 != 0 {
        return None;
    }
    let answer = match (setup.request, setup.is_in()) {
        (GET_DESCRIPTOR, true) if setup.request_type == 0x80 => {
            let index = setup.value as u8;
            match (setup.value >> 8) as u8 {
                DT_DEVICE => Some(desc.device.clone()),
                DT_CONFIG if index == 0 => Some(desc.config.clone()),
                DT_STRING => string_descriptor(index, &desc.strings),
                DT_BOS => desc.bos.clone(),
                _ => None,
            }
            .ok_or(Stall)
        }
        (GET_CONFIGURATION, true) => Ok(vec![state.configuration]),
        (SET_CONFIGURATION, false) => match setup.value {
            0 | 1 => {
                state.configuration = setup.value as u8;
                Ok(Vec::new())
            }
            _ => Err(Stall),
        },
        (GET_INTERFACE, true) => Ok(vec![0]),
        (SET_INTERFACE, false) if setup.value == 0 => Ok(Vec::new()),
        (GET_STATUS, true) => Ok(vec![if setup.request_type == 0x80 { 1 } else { 0 }, 0]),
        (CLEAR_FEATURE | SET_FEATURE | SET_ADDRESS | SET_SEL | SET_ISOCH_DELAY, false) => {
            Ok(Vec::new())
        }
        _ => return None,
    };
    Some(answer.map(|mut data| {
        data.truncate(usize::from(setup.length));
        data
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc() -> Descriptors {
        Descriptors {
            device: device_descriptor(Speed::High, 1, 2),
            config: config_descriptor(1, &[9, DT_INTERFACE, 0, 0, 0, 0, 0, 0, 0]),
            strings: vec!["Isola"],
            bos: None,
        }
    }

    fn get(value: u16, length: u16) -> Setup {
        Setup {
            request_type: 0x80,
            request: GET_DESCRIPTOR,
            value,
            index: 0,
            length,
        }
    }

    #[test]
    fn descriptors_are_truncated_to_the_request() {
        let mut s = StandardState::default();
        let d = desc();
        assert_eq!(
            standard(&mut s, &d, &get(0x100, 8)).unwrap().unwrap().len(),
            8
        );
        let config = standard(&mut s, &d, &get(0x200, 255)).unwrap().unwrap();
        assert_eq!(u16::from_le_bytes([config[2], config[3]]), 18);
        let string = standard(&mut s, &d, &get(0x301, 255)).unwrap().unwrap();
        assert_eq!(
            string,
            vec![12, 3, b'I', 0, b's', 0, b'o', 0, b'l', 0, b'a', 0]
        );
        assert_eq!(standard(&mut s, &d, &get(0x309, 255)), Some(Err(Stall)));
        assert_eq!(standard(&mut s, &d, &get(0xf00, 255)), Some(Err(Stall)));
        let class = Setup {
            request_type: 0x21,
            ..get(0, 0)
        };
        assert_eq!(standard(&mut s, &d, &class), None);
    }
}
