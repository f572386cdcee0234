//! A minimal reader for the ELF64 images this crate builds: the header fields, program
//! headers and notes a VMM's loader looks at. Shared by the build script (which checks each
//! image it links) and the crate's tests.

/// `PT_LOAD` program header type.
pub const PT_LOAD: u32 = 1;
/// `PT_NOTE` program header type.
pub const PT_NOTE: u32 = 4;
/// `EM_X86_64` machine type.
pub const EM_X86_64: u16 = 62;
/// Xen ELF note type carrying the 32-bit PVH entry address.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// One ELF64 program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramHeader {
    pub p_type: u32,
    pub flags: u32,
    pub offset: u64,
    pub vaddr: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
    pub align: u64,
}

/// One ELF note (from a `PT_NOTE` segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Note<'a> {
    /// Name including its NUL terminator, as stored (`namesz` bytes).
    pub name: &'a [u8],
    pub kind: u32,
    pub desc: &'a [u8],
}

/// A parsed little-endian ELF64 file.
#[derive(Debug, Clone)]
pub struct Elf<'a> {
    bytes: &'a [u8],
    pub machine: u16,
    pub entry: u64,
    pub program_headers: Vec<ProgramHeader>,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn align4(n: usize) -> Option<usize> {
    Some(n.checked_add(3)? & !3)
}

impl<'a> Elf<'a> {
    /// Parses the ELF header and program headers.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, String> {
        if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
            return Err("no ELF magic".into());
        }
        if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
            return Err("not a little-endian ELF64 file".into());
        }
        let short = || "truncated ELF header".to_string();
        let machine = u16_at(bytes, 0x12).ok_or_else(short)?;
        let entry = u64_at(bytes, 0x18).ok_or_else(short)?;
        let phoff = u64_at(bytes, 0x20).ok_or_else(short)?;
        let phentsize = u16_at(bytes, 0x36).ok_or_else(short)?;
        let phnum = u16_at(bytes, 0x38).ok_or_else(short)?;
        if phentsize != 56 {
            return Err(format!("unexpected program header size {phentsize}"));
        }
        let mut program_headers = Vec::with_capacity(phnum.into());
        for i in 0..usize::from(phnum) {
            let at = usize::try_from(phoff)
                .ok()
                .and_then(|p| p.checked_add(i * 56))
                .ok_or("program header offset overflows")?;
            let get32 = |o: usize| u32_at(bytes, at + o).ok_or("truncated program header");
            let get64 = |o: usize| u64_at(bytes, at + o).ok_or("truncated program header");
            program_headers.push(ProgramHeader {
                p_type: get32(0)?,
                flags: get32(4)?,
                offset: get64(8)?,
                vaddr: get64(16)?,
                paddr: get64(24)?,
                filesz: get64(32)?,
                memsz: get64(40)?,
                align: get64(48)?,
            });
        }
        Ok(Elf {
            bytes,
            machine,
            entry,
            program_headers,
        })
    }

    /// The file bytes of a segment (`p_filesz` bytes from `p_offset`).
    pub fn segment_bytes(&self, ph: &ProgramHeader) -> Option<&'a [u8]> {
        let start = usize::try_from(ph.offset).ok()?;
        let len = usize::try_from(ph.filesz).ok()?;
        self.bytes.get(start..start.checked_add(len)?)
    }

    /// All notes of all `PT_NOTE` segments, in file order.
    pub fn notes(&self) -> Result<Vec<Note<'a>>, String> {
        let mut notes = Vec::new();
        for ph in self
            .program_headers
            .iter()
            .filter(|ph| ph.p_type == PT_NOTE)
        {
            let seg = self
                .segment_bytes(ph)
                .ok_or("PT_NOTE segment outside the file")?;
            let mut at = 0;
            while at < seg.len() {
                let bad = || "malformed note".to_string();
                let namesz = u32_at(seg, at).ok_or_else(bad)? as usize;
                let descsz = u32_at(seg, at + 4).ok_or_else(bad)? as usize;
                let kind = u32_at(seg, at + 8).ok_or_else(bad)?;
                let name_at = at + 12;
                let desc_at = name_at + align4(namesz).ok_or_else(bad)?;
                let name = seg.get(name_at..name_at + namesz).ok_or_else(bad)?;
                let desc = seg.get(desc_at..desc_at + descsz).ok_or_else(bad)?;
                notes.push(Note { name, kind, desc });
                at = desc_at + align4(descsz).ok_or_else(bad)?;
            }
        }
        Ok(notes)
    }

    /// The PVH entry address from the `Xen` / `XEN_ELFNOTE_PHYS32_ENTRY` note, if present.
    pub fn pvh_entry(&self) -> Option<u32> {
        self.notes().ok()?.into_iter().find_map(|n| {
            if n.name == b"Xen\0" && n.kind == XEN_ELFNOTE_PHYS32_ENTRY {
                Some(u32::from_le_bytes(n.desc.get(..4)?.try_into().ok()?))
            } else {
                None
            }
        })
    }

    /// The lowest `p_paddr` and highest `p_paddr + p_memsz` over the `PT_LOAD` segments.
    pub fn load_range(&self) -> Option<(u64, u64)> {
        let loads = self
            .program_headers
            .iter()
            .filter(|ph| ph.p_type == PT_LOAD);
        let start = loads.clone().map(|ph| ph.paddr).min()?;
        let end = loads.map(|ph| ph.paddr.saturating_add(ph.memsz)).max()?;
        Some((start, end))
    }
}
