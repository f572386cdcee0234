//! Ring-3 runtime for the Rust guest: serial output, the exits, the command line and TSC
//! deadlines. Port I/O is allowed in ring 3 (the shim's TSS I/O bitmap is all zeros); the
//! exits and the command-line parser are rt.c's, linked into the same image.

use core::arch::asm;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

const COM1: u16 = 0x3f8;

extern "C" {
    fn poweroff() -> !;
    fn debug_exit(v: u8) -> !;
    fn cmdline_get(key: *const u8, out: *mut u8, size: usize) -> i32;
    fn tsc_hz() -> u64;
    fn boot_ram_end() -> u64;
}

/// Writes one byte to an I/O port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: port output has no memory effects; ring 3 may use every port (see shim.S).
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

/// The serial port as a `fmt::Write` sink (Isola's UART is always ready, no LSR polling).
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            outb(COM1, b);
        }
        Ok(())
    }
}

/// `vdrivers: ` + the formatted text + `\n` on the serial port.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::rt::Serial, "vdrivers: ");
        let _ = writeln!($crate::rt::Serial, $($arg)*);
    }};
}

/// Exit codes (the core exits with the value written to the debug-exit port).
pub mod exit {
    /// A check failed (the line before says which).
    pub const FAILED: u8 = 0x50;
    /// No device of the kind asked for, or a bad command line.
    pub const SETUP: u8 = 0x51;
    /// A wait passed its deadline.
    pub const TIMEOUT: u8 = 0x52;
    /// The Rust code panicked (the crate or the guest).
    pub const PANIC: u8 = 0x53;
}

/// Prints `FAIL: ...` and exits with `code`.
pub fn fail(code: u8, args: fmt::Arguments) -> ! {
    say!("FAIL: {}", args);
    // SAFETY: rt.c's debug_exit only writes an I/O port and halts.
    unsafe { debug_exit(code) }
}

/// Successful end of the run: prints `ok` and powers off (core exit status 0).
pub fn done() -> ! {
    say!("ok");
    // SAFETY: rt.c's poweroff only writes I/O ports and halts.
    unsafe { poweroff() }
}

/// End of guest RAM per the boot memory map.
pub fn ram_end() -> u64 {
    // SAFETY: reads the boot structures the VMM left, read-only.
    unsafe { boot_ram_end() }
}

/// The value of `vdrivers.KEY=VALUE` on the command line, copied into `buf`.
pub fn arg<'a>(key: &str, buf: &'a mut [u8]) -> Option<&'a str> {
    let mut name = [0u8; 64];
    let full = b"vdrivers.";
    let len = full.len() + key.len();
    if len >= name.len() {
        return None;
    }
    name[..full.len()].copy_from_slice(full);
    name[full.len()..len].copy_from_slice(key.as_bytes());
    // SAFETY: `name` is NUL-terminated (zero-filled past `len`), `buf` is writable for its length.
    let found = unsafe { cmdline_get(name.as_ptr(), buf.as_mut_ptr(), buf.len()) };
    if found != 1 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    core::str::from_utf8(&buf[..end]).ok()
}

/// Numeric `vdrivers.KEY=N` (decimal), `default` if absent; a malformed value fails the run.
pub fn arg_u64(key: &str, default: u64) -> u64 {
    let mut buf = [0u8; 32];
    match arg(key, &mut buf) {
        None => default,
        Some(text) => text
            .parse()
            .unwrap_or_else(|_| fail(exit::SETUP, format_args!("bad vdrivers.{key}={text}"))),
    }
}

fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc reads the time-stamp counter (CR4.TSD is off, see shim.S).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

static TSC_HZ: AtomicU64 = AtomicU64::new(0);

fn hz() -> u64 {
    let known = TSC_HZ.load(Ordering::Relaxed);
    if known != 0 {
        return known;
    }
    // SAFETY: rt.c's tsc_hz programs the LAPIC timer (ring 3 may) and leaves it stopped.
    let measured = unsafe { tsc_hz() }.max(1_000_000);
    TSC_HZ.store(measured, Ordering::Relaxed);
    measured
}

/// Milliseconds since an arbitrary start (for the timing lines).
pub fn now_ms() -> u64 {
    rdtsc() / (hz() / 1000)
}

/// A point in time `ms` milliseconds from now.
#[derive(Clone, Copy)]
pub struct Deadline(u64);

impl Deadline {
    pub fn after_ms(ms: u64) -> Deadline {
        Deadline(rdtsc().saturating_add(ms.saturating_mul(hz() / 1000)))
    }

    pub fn passed(self) -> bool {
        rdtsc() > self.0
    }

    /// Fails the run with a timeout if the deadline has passed.
    pub fn check(self, what: &str) {
        if self.passed() {
            fail(exit::TIMEOUT, format_args!("timeout: {what}"));
        }
    }
}

/// Polls `ready` until it returns `Some`, failing the run at `ms` milliseconds.
pub fn wait_for<T>(ms: u64, what: &str, mut ready: impl FnMut() -> Option<T>) -> T {
    let deadline = Deadline::after_ms(ms);
    loop {
        if let Some(v) = ready() {
            return v;
        }
        deadline.check(what);
        core::hint::spin_loop();
    }
}

/// splitmix64: the guest's documented pseudo-random sequence (the tests recompute it).
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }
}

/// The splitmix64 finaliser.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Called by the panic handler: prints the panic and exits with [`exit::PANIC`].
pub fn panicked(info: &core::panic::PanicInfo) -> ! {
    fail(exit::PANIC, format_args!("panic: {info}"))
}
