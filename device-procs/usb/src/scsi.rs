//! The SCSI commands of a USB disk (SPC-4/SBC-3 subset) and the Bulk-Only Transport
//! wrapper (USB MSC BOT 1.0): parsing a Command Block Wrapper and deciding what a command
//! does, without touching the disk. `storage` carries the plan out.

pub const BLOCK: u64 = 512;
pub const CBW_LEN: usize = 31;
pub const CSW_LEN: usize = 13;
const CBW_SIGNATURE: u32 = 0x4342_5355;
const CSW_SIGNATURE: u32 = 0x5342_5355;

/// A Command Block Wrapper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cbw {
    pub tag: u32,
    /// Bytes the host will move in the data stage.
    pub length: u32,
    pub data_in: bool,
    pub lun: u8,
    pub cdb: Vec<u8>,
}

/// Why a CBW is not meaningful (BOT 6.2): the device stalls and waits for reset recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CbwError {
    #[error("a CBW is {CBW_LEN} bytes, not {0}")]
    Length(usize),
    #[error("bad CBW signature {0:#x}")]
    Signature(u32),
    #[error("CBW command length {0} is not 1 to 16")]
    CdbLength(u8),
}

impl Cbw {
    pub fn parse(b: &[u8]) -> Result<Cbw, CbwError> {
        if b.len() != CBW_LEN {
            return Err(CbwError::Length(b.len()));
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if u32_at(0) != CBW_SIGNATURE {
            return Err(CbwError::Signature(u32_at(0)));
        }
        let cdb_len = b[14] & 0x1f;
        if !(1..=16).contains(&cdb_len) {
            return Err(CbwError::CdbLength(cdb_len));
        }
        Ok(Cbw {
            tag: u32_at(4),
            length: u32_at(8),
            data_in: b[12] & 0x80 != 0,
            lun: b[13] & 0x0f,
            cdb: b[15..15 + usize::from(cdb_len)].to_vec(),
        })
    }
}

pub fn csw(tag: u32, residue: u32, status: u8) -> [u8; CSW_LEN] {
    let mut c = [0u8; CSW_LEN];
    c[..4].copy_from_slice(&CSW_SIGNATURE.to_le_bytes());
    c[4..8].copy_from_slice(&tag.to_le_bytes());
    c[8..12].copy_from_slice(&residue.to_le_bytes());
    c[12] = status;
    c
}

/// Sense data: key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sense(pub u8, pub u8, pub u8);

pub const NO_SENSE: Sense = Sense(0, 0, 0);
pub const INVALID_OPCODE: Sense = Sense(5, 0x20, 0);
pub const INVALID_FIELD: Sense = Sense(5, 0x24, 0);
pub const LBA_OUT_OF_RANGE: Sense = Sense(5, 0x21, 0);
pub const WRITE_PROTECTED: Sense = Sense(7, 0x27, 0);
pub const MEDIUM_ERROR: Sense = Sense(3, 0x11, 0);
pub const WRITE_ERROR: Sense = Sense(3, 0x0c, 0);

/// What a command does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Data for the host (already truncated to its allocation length), then good status.
    Data(Vec<u8>),
    /// Read `blocks` blocks from `lba`.
    Read { lba: u64, blocks: u64 },
    /// Write `blocks` blocks at `lba`.
    Write { lba: u64, blocks: u64 },
    /// Flush the image to stable storage.
    Sync,
    /// Good status, no data.
    Good,
    /// Check condition with this sense.
    Fail(Sense),
}

/// What the commands need to know about the disk.
#[derive(Debug, Clone, Copy)]
pub struct DiskInfo {
    pub blocks: u64,
    pub readonly: bool,
}

fn be16(b: &[u8]) -> u64 {
    u64::from(u16::from_be_bytes([b[0], b[1]]))
}
fn be32(b: &[u8]) -> u64 {
    u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

fn truncated(mut data: Vec<u8>, allocation: u64) -> Plan {
    data.truncate(usize::try_from(allocation).unwrap_or(usize::MAX));
    Plan::Data(data)
}

fn inquiry(cdb: &[u8]) -> Plan {
    let allocation = be16(&cdb[3..5]);
    if cdb[1] & 1 != 0 {
        // Vital product data: the list of pages, and the unit serial number.
        return match cdb[2] {
            0x00 => truncated(vec![0, 0, 0, 2, 0x00, 0x80], allocation),
            0x80 => truncated(vec![0, 0x80, 0, 4, b'0', b'0', b'0', b'1'], allocation),
            _ => Plan::Fail(INVALID_FIELD),
        };
    }
    if cdb[2] != 0 {
        return Plan::Fail(INVALID_FIELD);
    }
    let mut d = vec![0x00, 0x80, 0x06, 0x02, 31, 0, 0, 0];
    d.extend_from_slice(b"ISOLA   ");
    d.extend_from_slice(b"USB DISK        ");
    d.extend_from_slice(b"0001");
    truncated(d, allocation)
}

fn mode_sense(cdb: &[u8], info: &DiskInfo, ten: bool) -> Plan {
    let page = cdb[2] & 0x3f;
    let allocation = if ten {
        be16(&cdb[7..9])
    } else {
        u64::from(cdb[4])
    };
    // Caching page: write cache enabled (writes reach the image file before they are
    // acknowledged; SYNCHRONIZE CACHE makes them durable).
    let caching = [
        0x08, 0x12, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let pages: &[u8] = match page {
        0x08 | 0x3f => &caching,
        _ => return Plan::Fail(INVALID_FIELD),
    };
    let wp = if info.readonly { 0x80 } else { 0 };
    let mut d = if ten {
        let len = (6 + pages.len()) as u16;
        let l = len.to_be_bytes();
        vec![l[0], l[1], 0, wp, 0, 0, 0, 0]
    } else {
        vec![(3 + pages.len()) as u8, 0, wp, 0]
    };
    d.extend_from_slice(pages);
    truncated(d, allocation)
}

fn capacity(cdb: &[u8], info: &DiskInfo, sixteen: bool) -> Plan {
    let last = info.blocks.saturating_sub(1);
    if sixteen {
        if cdb[1] & 0x1f != 0x10 {
            return Plan::Fail(INVALID_OPCODE);
        }
        let mut d = last.to_be_bytes().to_vec();
        d.extend_from_slice(&(BLOCK as u32).to_be_bytes());
        d.resize(32, 0);
        return truncated(d, be32(&cdb[10..14]));
    }
    let last = u32::try_from(last).unwrap_or(u32::MAX);
    let mut d = last.to_be_bytes().to_vec();
    d.extend_from_slice(&(BLOCK as u32).to_be_bytes());
    Plan::Data(d)
}

fn range(info: &DiskInfo, lba: u64, blocks: u64, write: bool) -> Plan {
    match lba.checked_add(blocks) {
        Some(end) if end <= info.blocks => {}
        _ => return Plan::Fail(LBA_OUT_OF_RANGE),
    }
    if write && info.readonly {
        return Plan::Fail(WRITE_PROTECTED);
    }
    if write {
        Plan::Write { lba, blocks }
    } else {
        Plan::Read { lba, blocks }
    }
}

/// The minimum CDB length of each command this device knows.
fn cdb_len(opcode: u8) -> Option<usize> {
    Some(match opcode {
        0x00 | 0x03 | 0x12 | 0x1a | 0x1b | 0x1e => 6,
        0x25 | 0x28 | 0x2a | 0x35 | 0x5a => 10,
        0x88 | 0x8a | 0x9e => 16,
        _ => return None,
    })
}

/// Decides what `cdb` does. REQUEST SENSE is answered from `sense`, which every command
/// but REQUEST SENSE replaces with its own outcome (the caller stores a failure's sense).
pub fn plan(cdb: &[u8], info: &DiskInfo, sense: Sense) -> Plan {
    let Some(&opcode) = cdb.first() else {
        return Plan::Fail(INVALID_OPCODE);
    };
    match cdb_len(opcode) {
        None => return Plan::Fail(INVALID_OPCODE),
        Some(n) if cdb.len() < n => return Plan::Fail(INVALID_FIELD),
        Some(_) => {}
    }
    match opcode {
        0x00 | 0x1b | 0x1e => Plan::Good,
        0x03 => {
            let mut d = vec![
                0x70, 0, sense.0, 0, 0, 0, 0, 10, 0, 0, 0, 0, sense.1, sense.2,
            ];
            d.resize(18, 0);
            truncated(d, u64::from(cdb[4]))
        }
        0x12 => inquiry(cdb),
        0x1a => mode_sense(cdb, info, false),
        0x5a => mode_sense(cdb, info, true),
        0x25 => capacity(cdb, info, false),
        0x9e => capacity(cdb, info, true),
        0x28 => range(info, be32(&cdb[2..6]), be16(&cdb[7..9]), false),
        0x2a => range(info, be32(&cdb[2..6]), be16(&cdb[7..9]), true),
        0x88 => range(info, be64(&cdb[2..10]), be32(&cdb[10..14]), false),
        0x8a => range(info, be64(&cdb[2..10]), be32(&cdb[10..14]), true),
        0x35 => Plan::Sync,
        _ => Plan::Fail(INVALID_OPCODE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: DiskInfo = DiskInfo {
        blocks: 2048,
        readonly: false,
    };

    pub fn cbw(tag: u32, length: u32, data_in: bool, cdb: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; CBW_LEN];
        b[..4].copy_from_slice(&CBW_SIGNATURE.to_le_bytes());
        b[4..8].copy_from_slice(&tag.to_le_bytes());
        b[8..12].copy_from_slice(&length.to_le_bytes());
        b[12] = if data_in { 0x80 } else { 0 };
        b[14] = cdb.len() as u8;
        b[15..15 + cdb.len()].copy_from_slice(cdb);
        b
    }

    #[test]
    fn cbws_are_validated() {
        let good = cbw(7, 512, true, &[0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0]);
        let c = Cbw::parse(&good).unwrap();
        assert_eq!(
            (c.tag, c.length, c.data_in, c.cdb.len()),
            (7, 512, true, 10)
        );
        assert_eq!(Cbw::parse(&good[..30]), Err(CbwError::Length(30)));
        let mut bad = good.clone();
        bad[0] = 0;
        assert!(matches!(Cbw::parse(&bad), Err(CbwError::Signature(_))));
        bad = good;
        bad[14] = 0;
        assert_eq!(Cbw::parse(&bad), Err(CbwError::CdbLength(0)));
        bad[14] = 17;
        assert_eq!(Cbw::parse(&bad), Err(CbwError::CdbLength(17)));
    }

    #[test]
    fn reads_and_writes_are_range_checked() {
        let read10 = |lba: u32, n: u16| {
            let (l, n) = (lba.to_be_bytes(), n.to_be_bytes());
            vec![0x28, 0, l[0], l[1], l[2], l[3], 0, n[0], n[1], 0]
        };
        assert_eq!(
            plan(&read10(2040, 8), &INFO, NO_SENSE),
            Plan::Read {
                lba: 2040,
                blocks: 8
            }
        );
        assert_eq!(
            plan(&read10(2041, 8), &INFO, NO_SENSE),
            Plan::Fail(LBA_OUT_OF_RANGE)
        );
        let mut write16 = vec![0x8a, 0];
        write16.extend_from_slice(&u64::MAX.to_be_bytes());
        write16.extend_from_slice(&2u32.to_be_bytes());
        write16.extend_from_slice(&[0, 0]);
        assert_eq!(
            plan(&write16, &INFO, NO_SENSE),
            Plan::Fail(LBA_OUT_OF_RANGE)
        );
        let ro = DiskInfo {
            readonly: true,
            ..INFO
        };
        let mut write10 = read10(0, 1);
        write10[0] = 0x2a;
        assert_eq!(plan(&write10, &ro, NO_SENSE), Plan::Fail(WRITE_PROTECTED));
        assert_eq!(
            plan(&write10[..9], &INFO, NO_SENSE),
            Plan::Fail(INVALID_FIELD)
        );
        assert_eq!(plan(&[0xff], &INFO, NO_SENSE), Plan::Fail(INVALID_OPCODE));
        assert_eq!(plan(&[], &INFO, NO_SENSE), Plan::Fail(INVALID_OPCODE));
    }

    #[test]
    fn capacity_inquiry_sense_and_mode_pages() {
        let Plan::Data(d) = plan(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &INFO, NO_SENSE) else {
            panic!()
        };
        assert_eq!(d, vec![0, 0, 7, 0xff, 0, 0, 2, 0]);
        let mut rc16 = vec![0x9e, 0x10];
        rc16.resize(16, 0);
        rc16[13] = 12;
        let Plan::Data(d) = plan(&rc16, &INFO, NO_SENSE) else {
            panic!()
        };
        assert_eq!(d.len(), 12);
        assert_eq!(&d[..8], &2047u64.to_be_bytes());
        let Plan::Data(d) = plan(&[0x12, 0, 0, 0, 36, 0], &INFO, NO_SENSE) else {
            panic!()
        };
        assert_eq!((d.len(), &d[8..13]), (36, &b"ISOLA"[..]));
        let Plan::Data(d) = plan(&[0x03, 0, 0, 0, 18, 0], &INFO, WRITE_PROTECTED) else {
            panic!()
        };
        assert_eq!((d[2], d[12]), (7, 0x27));
        let ro = DiskInfo {
            readonly: true,
            ..INFO
        };
        let Plan::Data(d) = plan(&[0x1a, 0, 0x3f, 0, 192, 0], &ro, NO_SENSE) else {
            panic!()
        };
        assert_eq!((d[0] as usize + 1, d[2]), (d.len(), 0x80));
        assert_eq!(
            plan(&[0x1a, 0, 0x01, 0, 192, 0], &ro, NO_SENSE),
            Plan::Fail(INVALID_FIELD)
        );
    }
}
