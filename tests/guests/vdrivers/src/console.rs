//! virtio-console through the crate's `VirtIOConsole` (one port, port 0: the crate does not
//! negotiate MULTIPORT). Modes (`vdrivers.mode=`):
//!
//! * `echo` (default): `ready`, then every byte received on port 0 is sent back, in chunks as
//!   received, until `bytes` bytes have been echoed; then `echoed <n> crc=<crc32>`.
//! * `resets`: `resets` rounds of a new driver (reset + initialisation), each sending
//!   `ready <k>\n` on port 0, waiting for one byte b and answering `round <k> got <b>\n`.

use alloc::vec::Vec;

use crate::pci::SpecTransport;
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::transport::DeviceType;

use crate::hal::{dma_pages_in_use, IdentityHal};
use crate::pci::{self, Root};
use crate::rt::{self, exit, Deadline};
use crate::{fail, say};

type Console = VirtIOConsole<IdentityHal, SpecTransport>;

pub fn run() {
    let mut buf = [0u8; 16];
    let mode = rt::arg("mode", &mut buf).unwrap_or("echo");
    let mut root = pci::root();
    match mode {
        "echo" => echo(&mut root),
        "resets" => resets(&mut root),
        _ => fail!(exit::SETUP, "unknown vdrivers.mode={mode:?}"),
    }
}

fn open(root: &mut Root, report: bool) -> Console {
    let function = pci::find(root, DeviceType::Console, 0);
    let mut transport = pci::transport(root, function);
    if report {
        pci::report_features(&mut transport);
    }
    match Console::new(transport) {
        Ok(c) => c,
        Err(e) => fail!(exit::FAILED, "VirtIOConsole::new: {e}"),
    }
}

/// CRC-32 (IEEE, as crc32fast).
pub fn crc32(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn echo(root: &mut Root) {
    let mut con = open(root, true);
    match con.size() {
        Ok(Some(size)) => say!("size={}x{}", size.columns, size.rows),
        Ok(None) => say!("size=none"),
        Err(e) => fail!(exit::FAILED, "size: {e}"),
    }
    let total = rt::arg_u64("bytes", 65536);
    let idle_ms = rt::arg_u64("idle", 60_000);
    say!("ready");
    let mut echoed = 0u64;
    let mut crc = 0u32;
    let mut chunk = Vec::with_capacity(4096);
    let mut idle = Deadline::after_ms(idle_ms);
    while echoed < total {
        chunk.clear();
        loop {
            match con.recv(true) {
                Ok(Some(b)) => chunk.push(b),
                Ok(None) => break,
                Err(e) => fail!(exit::FAILED, "recv: {e}"),
            }
            if chunk.len() == 4096 {
                break;
            }
        }
        if chunk.is_empty() {
            idle.check("no console input");
            core::hint::spin_loop();
            continue;
        }
        idle = Deadline::after_ms(idle_ms);
        if let Err(e) = con.send_bytes(&chunk) {
            fail!(exit::FAILED, "send_bytes: {e}");
        }
        crc = crc32(crc, &chunk);
        echoed += chunk.len() as u64;
    }
    say!("echoed {echoed} crc={crc:#010x}");
}

/// `text` (formatted) on port 0.
fn send_line(con: &mut Console, args: core::fmt::Arguments) {
    use core::fmt::Write;
    let mut line = [0u8; 64];
    let mut w = crate::net::proto::SliceWriter::new(&mut line);
    let _ = w.write_fmt(args);
    let len = w.len();
    if let Err(e) = con.send_bytes(&line[..len]) {
        fail!(exit::FAILED, "send_bytes: {e}");
    }
}

fn resets(root: &mut Root) {
    let times = rt::arg_u64("resets", 100);
    let baseline = dma_pages_in_use();
    for round in 0..times {
        let mut con = open(root, round == 0);
        send_line(&mut con, format_args!("ready {round}\n"));
        let byte = rt::wait_for(20_000, "a byte on port 0", || match con.recv(true) {
            Ok(b) => b,
            Err(e) => fail!(exit::FAILED, "round {round}: recv: {e}"),
        });
        send_line(&mut con, format_args!("round {round} got {byte}\n"));
        drop(con);
        if dma_pages_in_use() != baseline {
            fail!(exit::FAILED, "round {round}: DMA pages not returned");
        }
    }
    say!("resets={times} each echoed");
}
