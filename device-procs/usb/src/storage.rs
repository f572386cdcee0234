//! USB mass storage, Bulk-Only Transport, on an image file. Bulk OUT endpoint 2 takes
//! command wrappers and written data, bulk IN endpoint 1 gives read data and status
//! wrappers. Data moves between the guest's buffers and the image directly (pread/pwrite
//! per transfer); a write reaches the image file before its status wrapper is given, so a
//! write the guest saw acknowledged survives this process being killed.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::scsi::{self, Cbw, DiskInfo, Plan, Sense, BLOCK, CSW_LEN};
use crate::trb::Setup;
use crate::usb::{
    config_descriptor, device_descriptor, endpoint_descriptor, standard, superspeed_bos,
    Descriptors, Speed, Stall, StandardState, UsbDevice, Xfer, DT_INTERFACE,
    DT_SS_ENDPOINT_COMPANION,
};

const EP_IN: u8 = 1;
const EP_OUT: u8 = 2;
const GET_MAX_LUN: u8 = 0xfe;
const BOT_RESET: u8 = 0xff;

/// Where the transport is (BOT figure 1).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    Command,
    /// Data for the host: a buffer, or `left` bytes of the image from `offset`.
    In {
        data: Vec<u8>,
        offset: u64,
        left: u64,
        disk: bool,
    },
    /// Data from the host: written at `offset` (or dropped if `!disk`), `left` to go.
    Out {
        offset: u64,
        left: u64,
        disk: bool,
    },
    Status,
}

pub struct Storage {
    image: File,
    info: DiskInfo,
    speed: Speed,
    desc: Descriptors,
    state: StandardState,
    stage: Stage,
    /// The wrapper being served: tag, host length, bytes moved, status.
    tag: u32,
    host_len: u32,
    moved: u64,
    status: u8,
    sense: Sense,
}

impl Storage {
    pub fn new(image: File, blocks: u64, readonly: bool, speed: Speed) -> Storage {
        let (max_packet, companion): (u16, &[u8]) = match speed {
            Speed::Super => (1024, &[6, DT_SS_ENDPOINT_COMPANION, 0, 0, 0, 0]),
            _ => (512, &[]),
        };
        let mut body = vec![9, DT_INTERFACE, 0, 0, 2, 8, 6, 0x50, 0];
        body.extend_from_slice(&endpoint_descriptor(0x80 | EP_IN, 2, max_packet, 0));
        body.extend_from_slice(companion);
        body.extend_from_slice(&endpoint_descriptor(EP_OUT, 2, max_packet, 0));
        body.extend_from_slice(companion);
        Storage {
            image,
            info: DiskInfo { blocks, readonly },
            speed,
            desc: Descriptors {
                device: device_descriptor(speed, 0x1d6b, 0x0110),
                config: config_descriptor(1, &body),
                strings: vec!["Isola", "Isola USB disk", "0001"],
                bos: (speed == Speed::Super).then(superspeed_bos),
            },
            state: StandardState::default(),
            stage: Stage::Command,
            tag: 0,
            host_len: 0,
            moved: 0,
            status: 0,
            sense: scsi::NO_SENSE,
        }
    }

    fn fail(&mut self, sense: Sense) {
        self.sense = sense;
        self.status = 1;
    }

    /// Starts the command in `cbw`: decides its data stage.
    fn command(&mut self, cbw: Cbw) {
        self.tag = cbw.tag;
        self.host_len = cbw.length;
        self.moved = 0;
        self.status = 0;
        let host = u64::from(cbw.length);
        let plan = if cbw.lun != 0 {
            Plan::Fail(scsi::INVALID_FIELD)
        } else {
            scsi::plan(&cbw.cdb, &self.info, self.sense)
        };
        if !matches!(plan, Plan::Fail(_)) {
            self.sense = scsi::NO_SENSE;
        }
        // Device intent vs host intent (BOT 6.7): the data stage moves at most what both
        // want; a direction the host did not ask for is a phase error.
        let (dev_in, dev_out) = match &plan {
            Plan::Data(d) => (d.len() as u64, 0),
            Plan::Read { blocks, .. } => (blocks.saturating_mul(BLOCK), 0),
            Plan::Write { blocks, .. } => (0, blocks.saturating_mul(BLOCK)),
            _ => (0, 0),
        };
        if host > 0 && ((dev_in > 0 && !cbw.data_in) || (dev_out > 0 && cbw.data_in)) {
            self.status = 2;
        }
        self.stage = match plan {
            _ if self.status == 2 || host == 0 => {
                if dev_in > 0 || dev_out > 0 {
                    self.status = 2;
                }
                Stage::Status
            }
            Plan::Data(data) if cbw.data_in => Stage::In {
                data,
                offset: 0,
                left: 0,
                disk: false,
            },
            Plan::Read { lba, blocks } => Stage::In {
                data: Vec::new(),
                offset: lba * BLOCK,
                left: (blocks * BLOCK).min(host),
                disk: true,
            },
            Plan::Write { lba, blocks } => Stage::Out {
                offset: lba * BLOCK,
                left: (blocks * BLOCK).min(host),
                disk: true,
            },
            Plan::Fail(sense) => {
                self.fail(sense);
                Stage::Status
            }
            Plan::Sync => {
                if self.image.sync_data().is_err() {
                    self.fail(scsi::WRITE_ERROR);
                }
                Stage::Status
            }
            _ => Stage::Status,
        };
        // A host that sends data nobody wants still gets to send it (it is dropped); a
        // host that wants data the command does not give gets a zero-length packet (BOT
        // 6.7.2, case 4: the data ends with a short packet), then the status.
        if self.stage == Stage::Status && host > 0 && self.status != 2 {
            self.stage = if cbw.data_in {
                Stage::In {
                    data: Vec::new(),
                    offset: 0,
                    left: 0,
                    disk: false,
                }
            } else {
                Stage::Out {
                    offset: 0,
                    left: host,
                    disk: false,
                }
            };
        }
    }

    fn data_in(&mut self, buf: &mut [u8]) -> usize {
        let Stage::In {
            data,
            offset,
            left,
            disk,
        } = &mut self.stage
        else {
            return 0;
        };
        let n = if *disk {
            let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
            if self.image.read_exact_at(&mut buf[..n], *offset).is_err() {
                buf[..n].fill(0);
                self.sense = scsi::MEDIUM_ERROR;
                self.status = 1;
            }
            *offset += n as u64;
            *left -= n as u64;
            n
        } else {
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            data.drain(..n);
            n
        };
        let done = if *disk { *left == 0 } else { data.is_empty() };
        self.moved += n as u64;
        if done || n < buf.len() {
            self.stage = Stage::Status;
        }
        n
    }

    fn data_out(&mut self, data: &[u8]) -> usize {
        let Stage::Out { offset, left, disk } = &mut self.stage else {
            return 0;
        };
        let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
        if *disk && self.status == 0 && self.image.write_all_at(&data[..n], *offset).is_err() {
            self.sense = scsi::WRITE_ERROR;
            self.status = 1;
        }
        *offset += n as u64;
        *left -= n as u64;
        self.moved += n as u64;
        if *left == 0 {
            self.stage = Stage::Status;
        }
        n
    }

    fn status_wrapper(&mut self) -> [u8; CSW_LEN] {
        let residue = u64::from(self.host_len).saturating_sub(self.moved);
        self.stage = Stage::Command;
        scsi::csw(self.tag, residue as u32, self.status)
    }
}

impl UsbDevice for Storage {
    fn speed(&self) -> Speed {
        self.speed
    }

    fn control(&mut self, setup: &Setup, _data_out: &[u8]) -> Result<Vec<u8>, Stall> {
        match (setup.request_type, setup.request) {
            // Bulk-only transport 3.2: wValue 0 and wLength 1; anything else is a request
            // error, and one byte answered to wLength 0 would overrun the data stage.
            (0xa1, GET_MAX_LUN) if setup.value == 0 && setup.length == 1 => Ok(vec![0]),
            (0xa1, GET_MAX_LUN) => Err(Stall),
            (0x21, BOT_RESET) => {
                self.stage = Stage::Command;
                Ok(Vec::new())
            }
            _ => standard(&mut self.state, &self.desc, setup).unwrap_or(Err(Stall)),
        }
    }

    fn transfer_in(&mut self, ep: u8, buf: &mut [u8]) -> Xfer {
        if ep != EP_IN {
            return Xfer::Stall;
        }
        match self.stage {
            Stage::In { .. } => Xfer::Done(self.data_in(buf)),
            Stage::Status if buf.len() >= CSW_LEN => {
                let csw = self.status_wrapper();
                buf[..CSW_LEN].copy_from_slice(&csw);
                Xfer::Done(CSW_LEN)
            }
            _ => Xfer::Stall,
        }
    }

    fn transfer_out(&mut self, ep: u8, data: &[u8]) -> Xfer {
        if ep != EP_OUT {
            return Xfer::Stall;
        }
        match self.stage {
            Stage::Command => match Cbw::parse(data) {
                Ok(cbw) => {
                    self.command(cbw);
                    Xfer::Done(data.len())
                }
                Err(e) => {
                    log::warn!("storage: {e}; stalling until reset recovery");
                    Xfer::Stall
                }
            },
            Stage::Out { .. } => Xfer::Done(self.data_out(data)),
            _ => Xfer::Stall,
        }
    }

    fn reset(&mut self) {
        self.state = StandardState::default();
        self.stage = Stage::Command;
        self.sense = scsi::NO_SENSE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbw(tag: u32, length: u32, data_in: bool, cdb: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 31];
        b[..4].copy_from_slice(b"USBC");
        b[4..8].copy_from_slice(&tag.to_le_bytes());
        b[8..12].copy_from_slice(&length.to_le_bytes());
        b[12] = if data_in { 0x80 } else { 0 };
        b[14] = cdb.len() as u8;
        b[15..15 + cdb.len()].copy_from_slice(cdb);
        b
    }

    fn disk(blocks: u64, readonly: bool) -> (Storage, File) {
        let f = tempfile(blocks * BLOCK);
        let s = Storage::new(f.try_clone().unwrap(), blocks, readonly, Speed::Super);
        (s, f)
    }

    fn tempfile(len: u64) -> File {
        let mfd = memfd::MemfdOptions::default().create("disk").unwrap();
        mfd.as_file().set_len(len).unwrap();
        mfd.into_file()
    }

    fn csw_of(s: &mut Storage) -> (u32, u32, u8) {
        let mut b = [0u8; 13];
        assert_eq!(s.transfer_in(1, &mut b), Xfer::Done(13));
        assert_eq!(&b[..4], b"USBS");
        let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        (w(4), w(8), b[12])
    }

    /// Found by the `usb` fuzz target: GET_MAX_LUN with wLength 0 answered one byte.
    #[test]
    fn get_max_lun_answers_one_byte_only_to_the_request_the_spec_defines() {
        let (mut s, _f) = disk(8, false);
        let setup = |value: u16, length: u16| Setup {
            request_type: 0xa1,
            request: GET_MAX_LUN,
            value,
            index: 0,
            length,
        };
        assert_eq!(s.control(&setup(0, 1), &[]), Ok(vec![0]));
        assert_eq!(s.control(&setup(0, 0), &[]), Err(Stall));
        assert_eq!(s.control(&setup(0, 16), &[]), Err(Stall));
        assert_eq!(s.control(&setup(1, 1), &[]), Err(Stall));
    }

    #[test]
    fn write_then_read_back_through_the_transport() {
        let (mut s, f) = disk(64, false);
        let write = [0x2a, 0, 0, 0, 0, 3, 0, 0, 2, 0];
        assert_eq!(
            s.transfer_out(2, &cbw(1, 1024, false, &write)),
            Xfer::Done(31)
        );
        let data: Vec<u8> = (0..1024).map(|i| i as u8).collect();
        assert_eq!(s.transfer_out(2, &data[..600]), Xfer::Done(600));
        assert_eq!(s.transfer_out(2, &data[600..]), Xfer::Done(424));
        assert_eq!(csw_of(&mut s), (1, 0, 0));
        let mut on_disk = vec![0u8; 1024];
        f.read_exact_at(&mut on_disk, 3 * 512).unwrap();
        assert_eq!(on_disk, data);
        let read = [0x28, 0, 0, 0, 0, 3, 0, 0, 2, 0];
        s.transfer_out(2, &cbw(2, 1024, true, &read));
        let mut back = vec![0u8; 1024];
        assert_eq!(s.transfer_in(1, &mut back), Xfer::Done(1024));
        assert_eq!(back, data);
        assert_eq!(csw_of(&mut s), (2, 0, 0));
    }

    #[test]
    fn failures_set_sense_and_residue() {
        let (mut s, _f) = disk(8, true);
        let write = [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        s.transfer_out(2, &cbw(3, 512, false, &write));
        // The host still sends its data; it is dropped.
        assert_eq!(s.transfer_out(2, &[0xaa; 512]), Xfer::Done(512));
        assert_eq!(csw_of(&mut s), (3, 0, 1));
        s.transfer_out(2, &cbw(4, 18, true, &[0x03, 0, 0, 0, 18, 0]));
        let mut sense = [0u8; 18];
        assert_eq!(s.transfer_in(1, &mut sense), Xfer::Done(18));
        assert_eq!((sense[2], sense[12]), (7, 0x27));
        assert_eq!(csw_of(&mut s), (4, 0, 0));
        // INQUIRY gives 36 of the 96 bytes the host allowed: short, residue 60.
        s.transfer_out(2, &cbw(5, 96, true, &[0x12, 0, 0, 0, 96, 0]));
        let mut buf = [0u8; 96];
        assert_eq!(s.transfer_in(1, &mut buf), Xfer::Done(36));
        assert_eq!(csw_of(&mut s), (5, 60, 0));
        // A read the host asked to receive as OUT: phase error.
        s.transfer_out(2, &cbw(6, 512, false, &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]));
        assert_eq!(csw_of(&mut s), (6, 512, 2));
        // Garbage instead of a CBW stalls.
        assert_eq!(s.transfer_out(2, &[0u8; 31]), Xfer::Stall);
        assert_eq!(s.transfer_out(2, &[0u8; 5]), Xfer::Stall);
    }
}
