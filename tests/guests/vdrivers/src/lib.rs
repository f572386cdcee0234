//! The virtio-drivers test guest: the crates.io `virtio-drivers` crate (pinned, unchanged)
//! drives Isola's virtio-pci functions from guest ring 3, over the ECAM window, and reports
//! on the serial port. `vdrivers.dev=` picks the device; see ../README.md for each mode's
//! output and exit codes.

#![no_std]

extern crate alloc;

pub mod blk;
pub mod console;
pub mod gpu;
pub mod hal;
pub mod input;
pub mod mem;
pub mod net;
pub mod pci;
pub mod qsizes;
pub mod rt;

use rt::exit;

#[global_allocator]
static HEAP: hal::Heap = hal::Heap::new();

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    rt::panicked(info)
}

/// `fail!(code, "...", args)`: prints `FAIL: ...` and exits with `code`.
#[macro_export]
macro_rules! fail {
    ($code:expr, $($arg:tt)*) => {
        $crate::rt::fail($code, format_args!($($arg)*))
    };
}

/// Entry from the shim (ring 3, .bss zeroed).
#[no_mangle]
pub extern "C" fn guest_main() {
    if rt::ram_end() < hal::RAM_NEEDED {
        fail!(exit::SETUP, "needs {} MiB of RAM", hal::RAM_NEEDED >> 20);
    }
    let mut buf = [0u8; 32];
    let dev = rt::arg("dev", &mut buf).unwrap_or("");
    say!("start dev={dev}");
    match dev {
        "blk" => blk::run(),
        "net" => net::run(),
        "console" => console::run(),
        "gpu" => gpu::run(),
        "input" => input::run(),
        _ => fail!(exit::SETUP, "unknown vdrivers.dev={dev:?}"),
    }
    let slow = pci::SLOW_RESETS.load(core::sync::atomic::Ordering::Relaxed);
    say!("slow-resets={slow}");
    rt::done()
}
