//! Transfer Request Blocks (xHCI 1.2 section 6.4): the 16-byte unit of every ring. Parsing
//! is total: any 16 bytes give a [`Trb`], and unknown or reserved types are kept as numbers
//! for the ring code to answer with TRB Error.

/// TRB types (xHCI table 6-91).
pub mod ty {
    pub const NORMAL: u8 = 1;
    pub const SETUP: u8 = 2;
    pub const DATA: u8 = 3;
    pub const STATUS: u8 = 4;
    pub const ISOCH: u8 = 5;
    pub const LINK: u8 = 6;
    pub const EVENT_DATA: u8 = 7;
    pub const NOOP: u8 = 8;
    pub const ENABLE_SLOT: u8 = 9;
    pub const DISABLE_SLOT: u8 = 10;
    pub const ADDRESS_DEVICE: u8 = 11;
    pub const CONFIGURE_ENDPOINT: u8 = 12;
    pub const EVALUATE_CONTEXT: u8 = 13;
    pub const RESET_ENDPOINT: u8 = 14;
    pub const STOP_ENDPOINT: u8 = 15;
    pub const SET_TR_DEQUEUE: u8 = 16;
    pub const RESET_DEVICE: u8 = 17;
    pub const NOOP_COMMAND: u8 = 23;
    pub const TRANSFER_EVENT: u8 = 32;
    pub const COMMAND_COMPLETION: u8 = 33;
    pub const PORT_STATUS_CHANGE: u8 = 34;
    pub const HOST_CONTROLLER: u8 = 37;
}

/// Completion codes (xHCI table 6-90).
pub mod cc {
    pub const SUCCESS: u8 = 1;
    pub const DATA_BUFFER: u8 = 2;
    pub const BABBLE: u8 = 3;
    pub const TRB: u8 = 5;
    pub const STALL: u8 = 6;
    pub const NO_SLOTS: u8 = 9;
    pub const SLOT_NOT_ENABLED: u8 = 11;
    pub const EP_NOT_ENABLED: u8 = 12;
    pub const SHORT_PACKET: u8 = 13;
    pub const PARAMETER: u8 = 17;
    pub const CONTEXT_STATE: u8 = 19;
    pub const EVENT_RING_FULL: u8 = 21;
    pub const COMMAND_RING_STOPPED: u8 = 24;
}

pub const TRB_LEN: u64 = 16;

/// Control-field bits common to several types.
pub const CYCLE: u32 = 1 << 0;
/// Link: toggle cycle. Transfer TRBs: evaluate next TRB (ignored).
pub const TOGGLE_CYCLE: u32 = 1 << 1;
pub const ISP: u32 = 1 << 2;
pub const CHAIN: u32 = 1 << 4;
pub const IOC: u32 = 1 << 5;
pub const IDT: u32 = 1 << 6;
/// Data stage direction / setup TRT high bit: IN.
pub const DIR_IN: u32 = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trb {
    pub parameter: u64,
    pub status: u32,
    pub control: u32,
}

impl Trb {
    pub fn parse(bytes: &[u8; 16]) -> Trb {
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        Trb {
            parameter: u64::from(word(0)) | (u64::from(word(4)) << 32),
            status: word(8),
            control: word(12),
        }
    }

    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.parameter.to_le_bytes());
        b[8..12].copy_from_slice(&self.status.to_le_bytes());
        b[12..].copy_from_slice(&self.control.to_le_bytes());
        b
    }

    pub fn trb_type(&self) -> u8 {
        ((self.control >> 10) & 0x3f) as u8
    }
    pub fn cycle(&self) -> bool {
        self.control & CYCLE != 0
    }
    pub fn has(&self, bit: u32) -> bool {
        self.control & bit != 0
    }
    /// Slot ID of a command (bits 31:24).
    pub fn slot(&self) -> u8 {
        (self.control >> 24) as u8
    }
    /// Endpoint ID (DCI) of an endpoint command (bits 20:16).
    pub fn endpoint(&self) -> u8 {
        ((self.control >> 16) & 0x1f) as u8
    }
    /// Transfer length of a transfer TRB (bits 16:0 of status).
    pub fn transfer_len(&self) -> u32 {
        self.status & 0x1_ffff
    }

    /// An event TRB.
    pub fn event(kind: u8, parameter: u64, status: u32, control_high: u32) -> Trb {
        Trb {
            parameter,
            status,
            control: (u32::from(kind) << 10) | control_high,
        }
    }
}

/// A USB SETUP packet, as the Setup Stage TRB carries it immediately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Setup {
    pub request_type: u8,
    pub request: u8,
    pub value: u16,
    pub index: u16,
    pub length: u16,
}

impl Setup {
    pub fn from_parameter(p: u64) -> Setup {
        Setup {
            request_type: p as u8,
            request: (p >> 8) as u8,
            value: (p >> 16) as u16,
            index: (p >> 32) as u16,
            length: (p >> 48) as u16,
        }
    }
    pub fn is_in(&self) -> bool {
        self.request_type & 0x80 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_fields() {
        let t = Trb {
            parameter: 0x0012_0000_0100_0680,
            status: 0x8,
            control: (u32::from(ty::SETUP) << 10) | CYCLE | IDT | (3 << 16),
        };
        assert_eq!(Trb::parse(&t.to_bytes()), t);
        assert_eq!(t.trb_type(), ty::SETUP);
        assert!(t.cycle() && t.has(IDT));
        let s = Setup::from_parameter(t.parameter);
        assert_eq!(
            s,
            Setup {
                request_type: 0x80,
                request: 6,
                value: 0x100,
                index: 0,
                length: 0x12
            }
        );
        assert!(s.is_in());
    }
}
