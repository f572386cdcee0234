//! virtio-input through the crate's `VirtIOInput`, on every virtio-input function (device `n`
//! is the n-th on the bus). Modes (`vdrivers.mode=`):
//!
//! * `events` (default): each device's configuration, read through the crate (name, serial,
//!   ids, property bits, the event bitmaps of EV_SYN, EV_KEY, EV_REL, EV_ABS, EV_MSC, EV_LED,
//!   EV_REP, the ranges of every absolute axis), then `ready devices=<n>`, then every report
//!   (events up to and including SYN_REPORT) in arrival order until the Escape key is pressed;
//!   reports with nothing but the SYN are not printed.
//! * `resets`: `resets` rounds of a new keyboard driver (reset + initialisation): its name, then
//!   `ready <k>`, then the first non-empty report (`round <k> report ...`).
//!
//! Lines: `dev=<n> name="<name>"`, `dev=<n> serial="<s>"`, `dev=<n> ids=<bus>:<vendor>:<product>:<version>`
//! (4 hex digits each), `dev=<n> props size=<s> bits=<hex>`, `dev=<n> ev=0x<tt> size=<s>
//! bits=<hex>` (bytes in order, 2 hex digits each), `dev=<n> abs=<axis> min=.. max=.. fuzz=..
//! flat=.. res=..`, `dev=<n> report <type>:<code>:<value> ... 0:0:0` (decimal), `done`.

use alloc::vec::Vec;

use crate::pci::SpecTransport;
use virtio_drivers::device::input::{InputEvent, VirtIOInput};
use virtio_drivers::transport::DeviceType;

use crate::hal::{dma_pages_in_use, IdentityHal};
use crate::pci::{self, Root};
use crate::rt::{self, exit, Deadline};
use crate::{fail, say};

type Input = VirtIOInput<IdentityHal, SpecTransport>;

const EV_TYPES: [u8; 7] = [0x00, 0x01, 0x02, 0x03, 0x04, 0x11, 0x14];
const EV_ABS: u8 = 0x03;
const KEY_ESC: u16 = 1;

pub fn run() {
    let mut buf = [0u8; 16];
    let mode = rt::arg("mode", &mut buf).unwrap_or("events");
    let mut root = pci::root();
    match mode {
        "events" => events(&mut root),
        "resets" => resets(&mut root),
        _ => fail!(exit::SETUP, "unknown vdrivers.mode={mode:?}"),
    }
}

fn count(root: &mut Root) -> usize {
    root.enumerate_bus(0)
        .filter(|(_, info)| {
            virtio_drivers::transport::pci::virtio_device_type(info) == Some(DeviceType::Input)
        })
        .count()
}

fn open(root: &mut Root, index: usize, report: bool) -> Input {
    let function = pci::find(root, DeviceType::Input, index);
    let mut transport = pci::transport(root, function);
    if report {
        pci::report_features(&mut transport);
    }
    match Input::new(transport) {
        Ok(i) => i,
        Err(e) => fail!(exit::FAILED, "VirtIOInput::new: {e}"),
    }
}

struct Hex<'a>(&'a [u8]);

impl core::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

fn config(dev: usize, input: &mut Input) {
    match input.name() {
        Ok(name) => say!("dev={dev} name=\"{name}\""),
        Err(e) => fail!(exit::FAILED, "dev={dev} name: {e}"),
    }
    match input.serial_number() {
        Ok(serial) => say!("dev={dev} serial=\"{serial}\""),
        Err(e) => fail!(exit::FAILED, "dev={dev} serial: {e}"),
    }
    match input.ids() {
        Ok(ids) => say!(
            "dev={dev} ids={:04x}:{:04x}:{:04x}:{:04x}",
            ids.bustype,
            ids.vendor,
            ids.product,
            ids.version
        ),
        Err(e) => fail!(exit::FAILED, "dev={dev} ids: {e}"),
    }
    match input.prop_bits() {
        Ok(bits) => say!("dev={dev} props size={} bits={}", bits.len(), Hex(&bits)),
        Err(e) => fail!(exit::FAILED, "dev={dev} props: {e}"),
    }
    let mut abs_bits = Vec::new();
    for ev in EV_TYPES {
        match input.ev_bits(ev) {
            Ok(bits) => {
                say!(
                    "dev={dev} ev={ev:#04x} size={} bits={}",
                    bits.len(),
                    Hex(&bits)
                );
                if ev == EV_ABS {
                    abs_bits = bits.to_vec();
                }
            }
            Err(e) => fail!(exit::FAILED, "dev={dev} ev={ev:#04x}: {e}"),
        }
    }
    for (byte, bits) in abs_bits.iter().enumerate() {
        for bit in 0..8 {
            if bits & (1 << bit) == 0 {
                continue;
            }
            let axis = (byte * 8 + bit) as u8;
            match input.abs_info(axis) {
                Ok(a) => say!(
                    "dev={dev} abs={axis} min={} max={} fuzz={} flat={} res={}",
                    a.min as i32,
                    a.max as i32,
                    a.fuzz,
                    a.flat,
                    a.res
                ),
                Err(e) => fail!(exit::FAILED, "dev={dev} abs={axis}: {e}"),
            }
        }
    }
}

/// Collects events into reports (a report ends with SYN_REPORT, type 0 code 0).
#[derive(Default)]
struct Reports {
    pending: Vec<InputEvent>,
}

impl Reports {
    /// Feeds one event; returns the finished report if this was its SYN_REPORT.
    fn push(&mut self, e: InputEvent) -> Option<Vec<InputEvent>> {
        self.pending.push(e);
        (e.event_type == 0 && e.code == 0).then(|| core::mem::take(&mut self.pending))
    }
}

struct Events<'a>(&'a [InputEvent]);

impl core::fmt::Display for Events<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{}:{}:{}", e.event_type, e.code, e.value as i32)?;
        }
        Ok(())
    }
}

fn events(root: &mut Root) {
    let n = count(root);
    if n == 0 {
        fail!(exit::SETUP, "no virtio-input function");
    }
    let mut inputs: Vec<Input> = (0..n).map(|i| open(root, i, i == 0)).collect();
    for (dev, input) in inputs.iter_mut().enumerate() {
        config(dev, input);
    }
    let mut reports: Vec<Reports> = (0..n).map(|_| Reports::default()).collect();
    let idle_ms = rt::arg_u64("idle", 60_000);
    say!("ready devices={n}");
    let mut idle = Deadline::after_ms(idle_ms);
    let mut stop = false;
    while !stop {
        let mut any = false;
        for dev in 0..n {
            while let Some(e) = inputs[dev].pop_pending_event() {
                any = true;
                let Some(report) = reports[dev].push(e) else {
                    continue;
                };
                if report.len() > 1 {
                    say!("dev={dev} report {}", Events(&report));
                }
                if report
                    .iter()
                    .any(|e| e.event_type == 1 && e.code == KEY_ESC && e.value == 1)
                {
                    // Drain the other devices' reports first (they may be older).
                    stop = true;
                }
            }
        }
        if any {
            idle = Deadline::after_ms(idle_ms);
        } else {
            idle.check("no input events");
            core::hint::spin_loop();
        }
    }
    say!("done");
}

fn resets(root: &mut Root) {
    let times = rt::arg_u64("resets", 100);
    let baseline = dma_pages_in_use();
    for round in 0..times {
        let mut kbd = open(root, 0, round == 0);
        if let Err(e) = kbd.name() {
            fail!(exit::FAILED, "round {round}: name: {e}");
        }
        say!("ready {round}");
        let mut reports = Reports::default();
        let report = rt::wait_for(20_000, "a key report", || {
            let e = kbd.pop_pending_event()?;
            reports.push(e).filter(|r| r.len() > 1)
        });
        say!("round {round} report {}", Events(&report));
        drop(kbd);
        if dma_pages_in_use() != baseline {
            fail!(exit::FAILED, "round {round}: DMA pages not returned");
        }
    }
    say!("resets={times} each got a key");
}
