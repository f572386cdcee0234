//! ACPI tables, written with the `acpi_tables` crate: RSDP -> XSDT -> FADT (-> DSDT), MADT and
//! MCFG. They tell an ACPI guest (Linux) what the MP table tells a legacy one, plus what only
//! ACPI can say:
//!
//! - **MCFG**: the ECAM window of PCI bus 0 ([`layout::PCI_ECAM_START`]), which is also in the
//!   e820 map as reserved and claimed by a PNP0C02 motherboard-resources device, as Linux
//!   checks before it trusts MMCONFIG;
//! - **FADT** (hardware-reduced ACPI): the sleep control/status registers at port 0x3c0 and
//!   `\_S5` in the DSDT, so `poweroff` in Linux reaches the core's sleep-control port;
//! - **DSDT**: the PCI host bridge (PNP0A08) with its bus, I/O and MMIO windows, COM1, and the
//!   power button (`\_SB.PWRB`, PNP0C0C) with the Generic Event Device that notifies it
//!   (`\_SB.GED`, ACPI0013: see [`crate::devices::Ged`]);
//! - **MADT**: one local APIC per vCPU and the IOAPIC.
//!
//! The tables sit in the BIOS area at [`layout::ACPI_START`], where Linux also searches for the
//! RSDP; the boot protocols pass its address too (PVH `rsdp_paddr`, `boot_params.acpi_rsdp_addr`).

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Equal, Field, FieldAccessType,
    FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Local, Memory32Fixed, Method, Name,
    Notify, OpRegion, OpRegionSpace, Package, Path, ResourceTemplate, Store, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::{
    ACPI_SLEEP_CONTROL_PORT, GED_EVENT_POWER_BUTTON, GED_IRQ, GED_PORT, SERIAL_IRQ,
    SERIAL_PORT_BASE,
};
use crate::layout;
use crate::memory::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"ISOLA ";
const OEM_TABLE_ID: [u8; 8] = *b"ISOLAVM ";
const OEM_REVISION: u32 = 1;
/// \_S5 sleep type the core's sleep-control port treats as poweroff.
const S5_SLEEP_TYPE: u8 = 5;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {0} bytes, more than the {limit} reserved for them", limit = layout::ACPI_END - layout::ACPI_START)]
    TooLarge(usize),
    #[error("could not write the ACPI tables to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

fn dsdt() -> Vec<u8> {
    // Each object is serialised in the statement that builds it: the AML builders borrow their
    // children, which are temporaries.
    let mut body = Vec::new();
    let bus = AddressSpace::new_bus_number(0u16, 0u16);
    let conf1 = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = AddressSpace::new_io(0u16, 0x0cf7u16, None);
    let io_high = AddressSpace::new_io(0x0d00u16, 0xffffu16, None);
    let mmio = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO_START as u32,
        (layout::PCI_MMIO_END - 1) as u32,
        None,
    );
    Device::new(
        "\\_SB_.PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A08")),
            &Name::new("_CID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_ADR".into(), &aml::ZERO),
            &Name::new("_SEG".into(), &aml::ZERO),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_BBN".into(), &aml::ZERO),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&bus, &conf1, &io_low, &io_high, &mmio]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    let ecam = Memory32Fixed::new(
        false,
        layout::PCI_ECAM_START as u32,
        layout::PCI_ECAM_SIZE as u32,
    );
    Device::new(
        "\\_SB_.MBRS".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C02")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &ResourceTemplate::new(vec![&ecam])),
        ],
    )
    .to_aml_bytes(&mut body);
    let com1_io = IO::new(SERIAL_PORT_BASE, SERIAL_PORT_BASE, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, SERIAL_IRQ);
    Device::new(
        "\\_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![&com1_io, &com1_irq]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    power_button(&mut body);
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE]),
    )
    .to_aml_bytes(&mut body);

    let mut dsdt = acpi_tables::sdt::Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// `\_SB.PWRB` and the GED whose `_EVT` (run by the guest's GED driver on [`GED_IRQ`]) reads
/// the event register and notifies the button (0x80: "pressed").
fn power_button(body: &mut Vec<u8>) {
    Device::new(
        "\\_SB_.PWRB".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C0C")),
            &Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(body);
    let irq = Interrupt::new(true, true, false, false, GED_IRQ);
    let events = Local(0);
    let pressed = aml::And::new(&aml::ZERO, &events, &GED_EVENT_POWER_BUTTON);
    let is_pressed = Equal::new(&pressed, &GED_EVENT_POWER_BUTTON);
    let button = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&button, &0x80u8);
    let register = Path::new("GDAT");
    Device::new(
        "\\_SB_.GED_".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &ResourceTemplate::new(vec![&irq])),
            &OpRegion::new("GDST".into(), OpRegionSpace::SystemIO, &GED_PORT, &1u8),
            &Field::new(
                "GDST".into(),
                FieldAccessType::Byte,
                FieldLockRule::NoLock,
                FieldUpdateRule::WriteAsZeroes,
                vec![FieldEntry::Named(*b"GDAT", 8)],
            ),
            &Method::new(
                "_EVT".into(),
                1,
                true,
                vec![
                    &Store::new(&events, &register),
                    &If::new(&is_pressed, vec![&notify]),
                ],
            ),
        ],
    )
    .to_aml_bytes(body);
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi);
    let sleep = GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ACPI_SLEEP_CONTROL_PORT),
    );
    fadt.sleep_control_reg = sleep;
    fadt.sleep_status_reg = sleep;
    bytes(&fadt.finalize())
}

fn madt(num_cpus: u32) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_START as u32),
    );
    for cpu in 0..num_cpus {
        madt.add_structure(ProcessorLocalApic::new(
            cpu as u8,
            cpu as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(num_cpus as u8, layout::IOAPIC_START as u32, 0));
    bytes(&madt)
}

fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(layout::PCI_ECAM_START, 0, 0, 0);
    bytes(&mcfg)
}

/// Builds every table as one image placed at `base`; the RSDP is at its start.
pub fn build(num_cpus: u32, base: u64) -> Vec<u8> {
    let align = |v: &mut Vec<u8>| v.resize(v.len().next_multiple_of(16), 0);
    let mut image = vec![0u8; Rsdp::len().next_multiple_of(16)];
    let place = |image: &mut Vec<u8>, table: Vec<u8>| {
        align(image);
        let addr = base + image.len() as u64;
        image.extend_from_slice(&table);
        addr
    };
    let dsdt_addr = place(&mut image, dsdt());
    let tables = [fadt(dsdt_addr), madt(num_cpus), mcfg()];
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for table in tables {
        xsdt.add_entry(place(&mut image, table));
    }
    let xsdt_addr = place(&mut image, bytes(&xsdt));
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    image[..rsdp.len()].copy_from_slice(&rsdp);
    image
}

/// Writes the tables at [`layout::ACPI_START`]; returns the RSDP's address.
pub fn write(mem: &GuestMemoryMmap, num_cpus: u32) -> Result<u64, AcpiError> {
    let image = build(num_cpus, layout::ACPI_START);
    if image.len() as u64 > layout::ACPI_END - layout::ACPI_START {
        return Err(AcpiError::TooLarge(image.len()));
    }
    mem.write_slice(&image, GuestAddress(layout::ACPI_START))
        .map_err(AcpiError::Write)?;
    Ok(layout::ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Walks RSDP -> XSDT -> tables as a guest does, checking every checksum.
    fn tables(image: &[u8], base: u64) -> Vec<(String, Vec<u8>)> {
        assert_eq!(&image[..8], b"RSD PTR ");
        assert_eq!(sum(&image[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&image[..36]), 0, "RSDP extended checksum");
        let table_at = |addr: u64| {
            let off = (addr - base) as usize;
            let len = u32_at(image, off + 4) as usize;
            let t = image[off..off + len].to_vec();
            assert_eq!(
                sum(&t),
                0,
                "checksum of {}",
                String::from_utf8_lossy(&t[..4])
            );
            t
        };
        let xsdt = table_at(u64::from_le_bytes(image[24..32].try_into().unwrap()));
        assert_eq!(&xsdt[..4], b"XSDT");
        let mut found = Vec::new();
        for entry in xsdt[36..].chunks(8) {
            let t = table_at(u64::from_le_bytes(entry.try_into().unwrap()));
            if &t[..4] == b"FACP" {
                let dsdt = table_at(u64::from_le_bytes(t[140..148].try_into().unwrap()));
                found.push(("DSDT".to_owned(), dsdt));
            }
            found.push((String::from_utf8_lossy(&t[..4]).into_owned(), t));
        }
        found
    }

    #[test]
    fn tables_chain_with_valid_checksums() {
        let image = build(4, layout::ACPI_START);
        let names: Vec<String> = tables(&image, layout::ACPI_START)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["DSDT", "FACP", "APIC", "MCFG"]);
    }

    #[test]
    fn madt_lists_every_cpu_and_the_ioapic() {
        let image = build(3, layout::ACPI_START);
        let (_, madt) = tables(&image, layout::ACPI_START)
            .into_iter()
            .find(|(n, _)| n == "APIC")
            .unwrap();
        let (mut at, mut cpus, mut ioapics) = (44, 0, 0);
        while at < madt.len() {
            match madt[at] {
                0 => cpus += usize::from(madt[at + 4] & 1 == 1),
                1 => {
                    ioapics += 1;
                    assert_eq!(madt[at + 2], 3, "IOAPIC id follows the CPUs");
                    assert_eq!(u32_at(&madt, at + 4), layout::IOAPIC_START as u32);
                }
                other => panic!("unexpected MADT entry {other}"),
            }
            at += madt[at + 1] as usize;
        }
        assert_eq!((cpus, ioapics), (3, 1));
    }

    #[test]
    fn mcfg_describes_bus_zero_ecam_and_fadt_points_at_the_sleep_port() {
        let image = build(1, layout::ACPI_START);
        let all = tables(&image, layout::ACPI_START);
        let mcfg = &all.iter().find(|(n, _)| n == "MCFG").unwrap().1;
        // Header 36 + reserved 8, then base u64, segment u16, start bus, end bus.
        assert_eq!(
            u64::from_le_bytes(mcfg[44..52].try_into().unwrap()),
            layout::PCI_ECAM_START
        );
        assert_eq!((mcfg[54], mcfg[55]), (0, 0));
        let fadt = &all.iter().find(|(n, _)| n == "FACP").unwrap().1;
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "hardware-reduced ACPI");
        // SLEEP_CONTROL_REG at 244: system I/O space, port 0x3c0.
        assert_eq!(fadt[244], 1);
        assert_eq!(
            u64::from_le_bytes(fadt[248..256].try_into().unwrap()),
            0x3c0
        );
        let dsdt = &all.iter().find(|(n, _)| n == "DSDT").unwrap().1;
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"_S5_") && has(b"PCI0") && has(b"MBRS") && has(b"COM1"));
    }

    fn dsdt_of_image() -> Vec<u8> {
        let image = build(2, layout::ACPI_START);
        tables(&image, layout::ACPI_START)
            .into_iter()
            .find(|(n, _)| n == "DSDT")
            .unwrap()
            .1
    }

    #[test]
    fn dsdt_has_the_power_button_and_its_event_device() {
        let dsdt = dsdt_of_image();
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PWRB") && has(b"GED_") && has(b"_EVT") && has(b"GDAT"));
        assert!(has(b"ACPI0013\0"), "the GED's _HID as a string");
        // PNP0C0C as an EISA id (DWordConst 0x0c0cd041).
        assert!(has(&[0x0c, 0x41, 0xd0, 0x0c, 0x0c]), "the button's _HID");
        // OperationRegion (GDST, SystemIO, 0x0b00, 1).
        assert!(has(&[
            0x5b, 0x80, b'G', b'D', b'S', b'T', 0x01, 0x0b, 0x00, 0x0b, 0x01
        ]));
        // Extended interrupt descriptor: consumer, edge, active high, exclusive; one GSI.
        let mut irq = vec![0x89, 6, 0, 0x03, 1];
        irq.extend_from_slice(&GED_IRQ.to_le_bytes());
        assert!(has(&irq), "the GED's _CRS names GSI {GED_IRQ}");
    }

    /// ACPICA's disassembler, an independent AML parser, reads the DSDT back as the ASL the
    /// power button needs.
    #[test]
    fn iasl_disassembles_the_dsdt_into_the_power_button() {
        use isola_device_common::testing::skip::{skip, Missing};
        let dir = std::env::temp_dir().join(format!("isola-dsdt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let aml = dir.join("dsdt.aml");
        std::fs::write(&aml, dsdt_of_image()).unwrap();
        let out = match std::process::Command::new("iasl")
            .arg("-d")
            .arg(&aml)
            .current_dir(&dir)
            .output()
        {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let _ = std::fs::remove_dir_all(&dir);
                skip(
                    Missing::Installable,
                    "no iasl (Debian package acpica-tools)",
                );
                return;
            }
            Err(e) => panic!("iasl: {e}"),
        };
        let asl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "iasl -d failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Comments and white space out, on both sides.
        let squeeze = |text: &str| -> String {
            let mut out = String::new();
            for line in text.lines() {
                let mut line = line.split("//").next().unwrap_or("").to_owned();
                while let (Some(a), Some(b)) = (line.find("/*"), line.find("*/")) {
                    if b < a {
                        break;
                    }
                    line.replace_range(a..b + 2, "");
                }
                out.extend(line.chars().filter(|c| !c.is_whitespace()));
            }
            out
        };
        let squeezed = squeeze(&asl);
        for needle in [
            "Device (\\_SB.PWRB)",
            "Name (_HID, EisaId (\"PNP0C0C\"))",
            "Device (\\_SB.GED)",
            "Name (_HID, \"ACPI0013\")",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000005, }",
            "OperationRegion (GDST, SystemIO, 0x0B00, One)",
            "GDAT, 8",
            "Method (_EVT, 1, Serialized)",
            "Local0 = GDAT",
            "Notify (\\_SB.PWRB, 0x80)",
            "Name (_S5, Package (0x02)",
        ] {
            assert!(
                squeezed.contains(&squeeze(needle)),
                "no `{needle}` in:\n{asl}"
            );
        }
    }
}
