//! Test guests for Isola: small freestanding kernels built from C and GNU assembler sources
//! (in `guest/`) by this crate's build script, with gcc, ld and objcopy.
//!
//! Every guest is an ELF64 image with a PVH note (`NAME.elf`); `boot-check` is also built as a
//! Linux bzImage (`NAME.bzimage`). Both are linked at 0x100000 and share all code after their
//! entry stubs. See `README.md` in this crate for the guest ABI (ports, LAPIC, MP table,
//! memory the guests use) and how to add a guest.
//!
//! # Output conventions (all guests)
//!
//! All output goes to COM1 (port 0x3f8) as lines ending in `\n`. The very first byte of every
//! boot is a lone `\n` written by the first instructions of the entry point (the boot marker),
//! so every guest's output starts with an empty line.
//!
//! * Success ends with a poweroff: byte 0x34 to port 0x3c0 (ACPI S5); if that returns, byte 0
//!   to the debug-exit port 0xf4.
//! * Guest-detected failures write their code (1..=127, see the `EXIT_*` constants) to 0xf4.
//! * An unexpected CPU exception prints
//!   `exception: vector=0x<2 hex> error=0x<16 hex> rip=0x<16 hex>` (after a blank line) and
//!   exits with [`EXIT_EXCEPTION`].
//!
//! Numbers are decimal unless prefixed `0x`; hex is lowercase.
//!
//! # `boot-check` ([`BOOT_CHECK_ELF`], [`BOOT_CHECK_BZIMAGE`])
//!
//! Reads the boot information as Linux does for the entry it came in by (PVH `hvm_start_info`
//! from `%ebx` for the ELF's PVH entry, `boot_params` from `%rsi` for the bzImage's 64-bit
//! entry), then starts the other CPUs. Output:
//!
//! ```text
//!
//! boot-check: protocol=pvh                      (linux64 when entered at the 64-bit entry)
//! cmdline: <command line bytes up to the NUL, at most 2047>
//! e820: entries=<n>                             (n capped at 128)
//! e820: 0x<addr, 16 hex> 0x<size, 16 hex> <type>            (one per entry, table order)
//! initrd: addr=0x<hex, no leading zeros> size=<bytes> crc32=0x<8 hex>   or   initrd: none
//! cpus-described: <enabled processor entries in the MP table; 0 without a table>
//! cpu-started: apic-id=<id>                     (one per AP that came up, by APIC id)
//! cpus-started: <APs that came up + 1>
//! boot-check: ok
//! ```
//!
//! then powers off, or, if the command line holds the token `boot-check.end=reset`, prints
//! `boot-check: resetting` and pulses the i8042 reset line instead. The CRC-32 is the IEEE one (same as the `crc32fast` crate) over the whole
//! initrd. Source of each field:
//!
//! * PVH: command line at `cmdline_paddr`; memory map from `memmap_paddr` /
//!   `memmap_entries` (only if `version >= 1`, else `entries=0`); initrd = module 0 if
//!   `nr_modules > 0` (`initrd: none` if its address or size is 0).
//! * linux64: command line at `cmd_line_ptr | ext_cmd_line_ptr << 32`; memory map from
//!   `e820_entries` / `e820_table`; initrd `ramdisk_image`/`ramdisk_size` (plus the `ext_`
//!   high halves), reported only if `hdr.type_of_loader` is nonzero, as Linux does. As in
//!   Linux's `sanitize_boot_params`, a nonzero `sentinel` (0x1ef) makes the `ext_` fields 0.
//!
//! Failures: wrong PVH magic or missing `HdrS` in the `boot_params` copy of the header →
//! the protocol line, then `boot-check: bad boot info`, exit [`EXIT_BAD_BOOT_INFO`]. Memory map
//! or initrd not below 4 GiB (the guest maps only 0-4 GiB) → `boot-check: memory map not below
//! 4 GiB` / `boot-check: initrd not below 4 GiB`, exit [`EXIT_UNMAPPED`]. Fewer CPUs started
//! than described → all lines up to `cpus-started`, then `boot-check: missing cpus`, exit
//! [`EXIT_MISSING_CPUS`]. The BSP waits about 2 s (5e9 TSC cycles) for the APs.
//!
//! # `msi` ([`MSI_ELF`])
//!
//! Software-enables its LAPIC (SVR = 0x1ff), prints `msi: ready apic-id=<id>` and waits with
//! interrupts enabled only while halted. For each interrupt (any vector 0x20-0xff is counted;
//! the host sends MSIs with address 0xfee00000 and data = vector in 0x40..=0x4f, one at a
//! time, waiting for each line) it prints `msi: vector=0x<2 hex> count=<interrupts so far>`. After
//! [`MSI_COUNT`] it prints `msi: done total=8` and powers off.
//!
//! # `power` ([`POWER_ELF`])
//!
//! Answers the ACPI power button as an OS without an AML interpreter can: from the GED's
//! register directly. It software-enables its LAPIC (masking the 8259s), routes IOAPIC pin
//! [`GED_IRQ`] (the GSI in the DSDT's `\_SB.GED` `_CRS`) to vector 0x35 (fixed, physical
//! destination = its APIC id, edge, active high), prints `power: ready mode=<mode>` and
//! waits for interrupts. After each it reads the GED's event register (one byte at port
//! [`GED_PORT`]; the read clears it); bit 0 ([`GED_EVENT_POWER_BUTTON`]) set means the button
//! was pressed, and it prints `power: button pressed count=<presses so far>
//! irqs=<interrupts on vector 0x35 so far>`. Then, by `power.mode` on the command line:
//!
//! * `answer` (default): prints `power: powering off` and powers off through ACPI S5;
//! * `ignore`: keeps waiting, so only a hard stop ends it.
//!
//! Any other mode: `power: bad power.mode=<mode>`, exit [`EXIT_POWER_BAD_PARAM`].
//!
//! # `triple-fault` ([`TRIPLE_FAULT_ELF`])
//!
//! Prints `triple-fault: faulting now`, loads an IDT with limit 0 and raises #GP in ring 0 (a
//! load from a non-canonical address), so the CPU shuts down (triple fault). It never powers
//! off; if execution somehow continued it would halt forever.
//!
//! # `cpu-check` ([`CPU_CHECK_ELF`])
//!
//! Starts every AP the MP table describes; each executes CPUID in ring 0 for the leaves 0x0,
//! 0x1, 0xb.0, 0xb.1, 0x40000000, 0x40000001, 0x80000001, 0x80000008 and 0x8000001e. The
//! BSP executes them in ring 0 (the `SYS_CPUID` service) and in ring 3. Then the first AP
//! makes the KVM hypercall `KVM_HC_VAPIC_POLL_IRQ` (1; KVM returns 0) in ring 0 with
//! `vmmcall` on AMD/Hygon and `vmcall` otherwise, and the BSP waits up to
//! `cpu-check.wait_ms=<ms>` (default 2000) for it to return (`cpu-check.hypercall=0` skips
//! it: on a host where it never returns, that AP spins in the host until the VM ends). Output:
//!
//! ```text
//!
//! cpu-check: cpus=<described> bsp=<APIC id>
//! cpuid: cpu=<APIC id> ring=<0|3> leaf=0x<8 hex> sub=<n> eax=0x<8 hex> ebx=.. ecx=.. edx=..
//!                                  (BSP ring 0, then each AP ring 0, then BSP ring 3)
//! hypercall: returned rax=0x<hex>  or  hypercall: no return in <ms> ms (state=<1: entered>)
//!                                  or  hypercall: not tried (one cpu | cpu-check.hypercall=0)
//! cpu-check: ok
//! ```
//!
//! then powers off (an AP still inside the hypercall is left there). Fewer CPUs reporting than
//! described → `cpu-check: cpus-reporting=<n>` after the CPUID lines, exit
//! [`EXIT_MISSING_CPUS`].
//!
//! # `virtio-blk` ([`VIRTIO_BLK_ELF`])
//!
//! A virtio 1.x PCI driver (`guest/virtio.c`, reusable by other virtio guests) and a block
//! workload on top (`guest/virtio-blk.c`). It scans bus 0 with configuration mechanism #1 for
//! the first 0x1af4:0x1042 function, sets Memory Space and Bus Master, finds the common,
//! notify, ISR and device-configuration regions and the MSI-X table by walking the capability
//! list, resets the device, negotiates (VERSION_1, FLUSH, RO and, if asked, EVENT_IDX and
//! INDIRECT_DESC; nothing else), checks FEATURES_OK stuck, routes MSI-X entry 0 (config) to
//! IDT vector 0x41 and entry 1 (queue 0) to 0x40 (address 0xfee00000, APIC id 0), enables
//! MSI-X, sets queue 0 up as a split virtqueue of min(device maximum, 128) entries in its
//! .bss (vector read back), enables it and sets DRIVER_OK. If the device offers MQ, the
//! configuration's `num_queues` must not exceed the transport's (else exit 19).
//!
//! Completions are taken from the used ring after MSI-X interrupts (the wait-for-interrupt
//! service; wake-ups that bring nothing are ignored, and one interrupt may cover many
//! entries). A periodic LAPIC timer (vector 0x30, 100 ms) wakes it so every wait is bounded.
//! Times come from the TSC, calibrated at start against the LAPIC timer (KVM's 1 GHz APIC bus).
//!
//! Command line (`key=value` tokens; numbers decimal or `0x` hex):
//!
//! | key | default | meaning |
//! |-----|---------|---------|
//! | `virtio-blk.mode` | `normal` | `normal`, `verify`, `hostile`, `loop` or `bench` (below) |
//! | `virtio-blk.sectors` | 2048 | sectors [0, n) are written / read; must fit the disk |
//! | `virtio-blk.depth` | 16 | requests in flight, at most 128 and what the queue holds (a third of it without indirect descriptors) |
//! | `virtio-blk.req` | 8 | sectors per request, 1..=16 (the last request of a pass may be shorter) |
//! | `virtio-blk.seed` | 1 | generation of the data pattern |
//! | `virtio-blk.event_idx` | 1 | negotiate VIRTIO_F_EVENT_IDX if offered |
//! | `virtio-blk.indirect` | 0 | negotiate VIRTIO_F_INDIRECT_DESC if offered (one descriptor per request); never in hostile mode |
//! | `virtio-blk.reset` | 0 | normal mode: afterwards reset the running device, set it up again and verify once more |
//! | `virtio-blk.cycles`, `virtio-blk.seconds` | 0, 0 | loop mode: stop after this many cycles / seconds (0: no limit; both 0: forever) |
//! | `virtio-blk.report_ms` | 1000 | loop mode: least time between progress lines, 1..=60000 ms |
//! | `virtio-blk.ms` | 3000 | bench mode: how long to read, 1..=3600000 ms |
//! | `virtio-blk.timeout` | 30 | seconds a request may take before the guest gives up (exit 17; hostile follow-ups: 18) |
//! | `virtio-blk.cases` | `all` | hostile mode: comma-separated subset of the cases below |
//!
//! **Data pattern.** Sector `s` of generation `g` (512 bytes, little endian): bytes 0-7 `s`,
//! 8-15 `g`, then for `i` in 2..=62 the word `mix64(g * 0x9e3779b97f4a7c15 + s * 64 + i)`
//! (wrapping arithmetic; `mix64` is the SplitMix64 finaliser: `z ^= z >> 30; z *=
//! 0xbf58476d1ce4e5b9; z ^= z >> 27; z *= 0x94d049bb133111eb; z ^= z >> 31`), bytes 504-507
//! the magic 0x626f7369 (`"isob"`), bytes 508-511 the CRC-32 (as `crc32fast`) of bytes
//! 0-507. Every sector thus says which sector and generation it holds and can be checked on
//! its own. Reads are verified byte for byte against the expected sector.
//!
//! Output, after the boot marker (`<x>` are numbers, hex with `0x`):
//!
//! ```text
//! virtio-blk: found 00:<slot>.<fn> common=0x<a> notify=0x<a>+<multiplier>*n device=0x<a> msix=<vectors>@0x<table>
//! virtio-blk: offered=0x<device features> queue-size=<n> queues=<transport num_queues>
//! virtio-blk: capacity=<sectors> features=0x<negotiated>
//! virtio-blk: mode=<mode> depth=<d> request-sectors=<r> event-idx=<0|1> indirect=<0|1>
//! ```
//!
//! * `normal`: writes generation `seed` to sectors [0, sectors) (`virtio-blk: wrote <n>
//!   sectors`), FLUSH (`virtio-blk: flushed`, or `flush not offered`), reads everything back
//!   (`virtio-blk: verified <n> sectors`), GET_ID (`virtio-blk: id=<up to 20 bytes; others as
//!   ?>` or `virtio-blk: id unavailable status=<s> (<name>)`). With `reset=1` then
//!   `virtio-blk: resetting the device`, the set-up lines again and `virtio-blk: verified <n>
//!   sectors after reset`.
//! * `verify`: only reads [0, sectors) and verifies generation `seed`: `virtio-blk: verified
//!   <n> sectors`.
//! * `loop`: cycle `c` (from 0) writes generation `seed + c` to [0, sectors) and reads it back;
//!   after a cycle, once `report_ms` have passed since the last one, and after the last cycle
//!   `virtio-blk: loop cycles=<done> requests=<so far> interrupts=<so far> ms=<since start>
//!   max-wait-us=<longest wait for a completion since the last such line>` (the pause the guest
//!   saw when its device stalled, e.g. for a restart or upgrade of the device process); then
//!   `virtio-blk: loop done cycles=<n> sectors=<n>`.
//! * `bench`: reads of `req` sectors at random `req`-aligned sectors over the whole disk
//!   (xorshift64 from `seed`), `depth` in flight, for `ms` milliseconds: `virtio-blk: bench
//!   start ms=<ms> chunks=<capacity / req>`, then `virtio-blk: bench reads=<completed> ms=<elapsed>
//!   iops=<reads per second>`. Every sector read must begin with its own number (u64, little
//!   endian), as the host prepares the image (`tests/benches/usb.rs`), else exit 16; a failed
//!   read is exit 15. A read-only device is fine.
//! * `hostile`: `virtio-blk: hostile: cases=<list> bad-address=0x<a> wait=2000ms`, then for
//!   each case in this order: `header-outside-ram` (header descriptor at the bad address),
//!   `data-outside-ram` (a read into the bad address), `short-header` (8-byte header),
//!   `read-past-end` (sector = capacity), `unknown-type` (type 0x7e57, no data),
//!   `looped-chain` (the status descriptor's `next` leads back to the data descriptor) one
//!   line `virtio-blk: hostile <case>: status=<s> (<ok|ioerr|unsupp|unwritten|other>)
//!   len=<used len>` or `virtio-blk: hostile <case>: dropped` (no answer within 2 s; its
//!   descriptors are never reused). `read-past-end` must get IOERR (1), `unknown-type` UNSUPP
//!   (2), `short-header` and `looped-chain` anything but OK, else exit 18; the outside-RAM
//!   cases may get any status (QEMU's own virtio-blk reads unbacked memory as zeros, so its
//!   header is a valid read of sector 0). Before the first and after every case a valid
//!   write, read and verify of sectors 0-7 must work, else `virtio-blk: hostile <case>: valid request
//!   afterwards got no answer (status=0x<device status>)` (or a wrong-status/data line) and
//!   exit 18. The bad address is
//!   0x3_0000_0000, or the first GiB boundary at least 1 GiB past the end of RAM if RAM
//!   reaches further. Last `virtio-blk: hostile ok`.
//!
//! Every mode ends with `virtio-blk: requests=<submitted> notifications=<queue notifies
//! sent>`, `virtio-blk: interrupts=<MSI-X interrupts of the queue>`, `virtio-blk: ok`, and
//! powers off. A failure prints one `virtio-blk: <what>` line, sets FAILED in the device
//! status and debug-exits with one of the `EXIT_VBLK_*` codes; a verification failure is
//! `virtio-blk: verify failed: first bad sector=<lowest bad sector of the pass> (<n> bad
//! sectors)`.
//!
//! # `virtio-net` ([`VIRTIO_NET_ELF`])
//!
//! A virtio-net driver on the same `guest/virtio.c` core (`guest/virtio-net.c`): the first
//! 0x1af4:0x1041 function, VERSION_1, MAC, STATUS, MTU and, per the command line, EVENT_IDX,
//! MRG_RXBUF and CSUM; MSI-X entry 0 (config) -> vector 0x42, 1 (receive queue 0) -> 0x40,
//! 2 (transmit queue 1) -> 0x41; both queues min(device maximum, 256) entries, every receive
//! buffer 2048 bytes (one descriptor each). It is host 10.0.0.2 with the MAC from the
//! configuration space, and runs one polling loop (sleeping on interrupts after ~200 us idle):
//!
//! * ARP requests for 10.0.0.2 get a reply; ICMP echo requests to it an echo reply; UDP to port
//!   7 is echoed to its sender.
//! * UDP to port 6001 carries commands, two big-endian u32s `cmd, arg`: 1 = START (stream `arg`
//!   datagrams to the sender's MAC/IP/port, from port 6001; datagram `s` has a `payload`-byte
//!   payload: `s` as big-endian u32, then byte `i` = `(s + i) & 0xff`; IP id = `s & 0xffff`),
//!   2 = CREDIT (the stream may have sent up to `arg` datagrams in total; it starts at 0),
//!   3 = BYE (print the counters and power off).
//! * UDP to port 6000 is a host stream with the same payload format, verified in order; every
//!   32 datagrams the guest answers the sender (from port 6000) with two big-endian u32s:
//!   datagrams received so far and how many of them were wrong (sequence or bytes).
//! * Received UDP with a complete checksum (no NEEDS_CSUM flag) is verified; with CSUM
//!   negotiated, transmitted UDP uses checksum offload (NEEDS_CSUM, csum_start 34, offset 6).
//!
//! | key | default | meaning |
//! |-----|---------|---------|
//! | `virtio-net.event_idx`, `.mrg`, `.csum` | 1, 1, 1 | negotiate EVENT_IDX, MRG_RXBUF, CSUM if offered |
//! | `virtio-net.payload` | 64 | UDP payload bytes of the guest's stream, 8..=1472 |
//! | `virtio-net.idle` | 60 | seconds without any traffic before it gives up (exit 17) |
//!
//! Output: `virtio-net: ready mac=<xx:..> link=<0|1> mtu=<n> features=0x<negotiated>
//! queue-size=<n> mrg=<0|1> csum=<0|1> event-idx=<0|1>`; on START `virtio-net: stream start
//! frames=<n> payload=<n>`, when all are sent `virtio-net: stream sent=<n>`; on BYE
//! `virtio-net: stream-in received=<n> errors=<n>`, `virtio-net: counters rx=<n> tx=<n>
//! arp=<n> icmp=<n> echo=<n> bad=<n> interrupts=<n>`, `virtio-net: ok`, then poweroff.
//! Exits: 10 no device, 11 capabilities / fewer than 3 MSI-X vectors, 12 features (no MAC),
//! 13 queue set-up, 14 bad parameter, 17 idle timeout or transmit ring stuck, 19 the device
//! broke the protocol (used id or length out of range, num_buffers != 1 for a frame that fits
//! one buffer).
//!
//! # `virtio-gpu` ([`VIRTIO_GPU_ELF`])
//!
//! A 2D virtio-gpu driver on the same `guest/virtio.c` core (`guest/virtio-gpu.c`): the first
//! 0x1af4:0x1050 function, VERSION_1 and EDID negotiated, MSI-X entry 0 (config) on vector
//! 0x41, entry 1 (control queue 0) on 0x40, entry 2 (cursor queue 1) on 0x42, both queues of
//! up to 64 entries. One command at a time on each queue.
//!
//! | key | default | meaning |
//! |-----|---------|---------|
//! | `virtio-gpu.mode` | `draw` | `draw` or `hostile` |
//! | `virtio-gpu.chunks` | 4 | backing entries the framebuffer is attached in (1..=64) |
//! | `virtio-gpu.wait` | 0 | draw: after frame 1, wait for an MSI on vector 0x50 (`isolactl inject-msi`), then draw frame 2 |
//! | `virtio-gpu.reset` | 0 | draw: after frame 1, reset the device, set it up again (resource 1 anew) and draw frame 2 |
//! | `virtio-gpu.frames` | 0 | draw: then repeat full-screen TRANSFER_TO_HOST_2D + RESOURCE_FLUSH this many times |
//! | `virtio-gpu.timeout` | 30 | seconds a command may take (exit 17; hostile: 18) |
//!
//! **Picture** ([`gpu_pixel`]): resource 1, B8G8R8X8, the size GET_DISPLAY_INFO reports for
//! scanout 0 (at most 1280x800), pixel (x, y) of frame f has blue `(5x + 40f) & 0xff`, green
//! `(3y + 64 (x >> 8)) & 0xff`, red `((x ^ y) + 100f) & 0xff`, fourth byte 0xff. Cursor:
//! resource 2, 64x64 B8G8R8A8, pixel (x, y) = blue `4x`, green `4y`, red 0x80, alpha 0xff if
//! x + y < 64 else 0, hot spot (3, 5), set at (10, 20) then moved to (30, 40).
//!
//! Output:
//!
//! ```text
//! virtio-gpu: features=0x<negotiated> scanouts=<n>
//! virtio-gpu: display <w>x<h> enabled=<0|1>
//! virtio-gpu: edid size=<n> checksum=<ok|bad> preferred=<w>x<h>       (if EDID negotiated)
//! virtio-gpu: frame 1 flushed <w>x<h>
//! virtio-gpu: cursor set
//! virtio-gpu: waiting for vector 0x50                                  (wait=1)
//! virtio-gpu: resetting the device                                   (reset=1; then the set-up lines again)
//! virtio-gpu: frame 2 flushed <w>x<h>                                  (wait=1 or reset=1)
//! virtio-gpu: frames=<n> us=<microseconds>                             (frames=n)
//! virtio-gpu: ok
//! ```
//!
//! `hostile` mode sets up the framebuffer, then sends one malformed command at a time and
//! checks the response type, printing `virtio-gpu: hostile <case> ok` for each: unknown and
//! 3D commands and a short header (ERR_UNSPEC), a short CREATE_2D, id 0 and an id in use, a
//! bad format, zero and 0xffffffff sizes, 16384x16384 (ERR_OUT_OF_MEMORY), unknown ids for
//! every command, a second ATTACH_BACKING, backing 1 GiB past the end of RAM and wrapping
//! past 2^64 (ERR_UNSPEC), 0x7fffffff entries that are not there, transfers with no backing,
//! outside the resource, with an overflowing rectangle, past the backing and with a wrapping
//! offset, scanout 5, a scanout rectangle outside its resource, an overflowing flush
//! rectangle, GET_EDID for scanout 9; a response buffer too small and none at all (nothing
//! written, used length 0: `hostile short-response ok`); bad cursor commands
//! (`hostile cursor ok`). Then frame 1 as above and `virtio-gpu: hostile ok`.
//!
//! Exit codes: 10 no device, 11 capabilities, 12 features, 13 queue set-up, 14 bad parameter
//! or display too large, 15 a valid command failed, 17 timeout, 18 hostile case answered
//! wrongly or not at all, 19 protocol violation.

//!
//! # `virtio-console` ([`VIRTIO_CONSOLE_ELF`])
//!
//! Drives the first virtio-console function (0x1af4:0x1043, `guest/virtio-console.c`): offers
//! VERSION_1 and MULTIPORT; with MULTIPORT it reads `max_nr_ports` (at most 4), sets up
//! 2 x ports + 2 queues of up to 64 entries (all on MSI-X entry 1), posts 16 control buffers,
//! sends DEVICE_READY, answers each DEVICE_ADD with PORT_READY, and prints what the device
//! tells it: `console: port <id> is the console`, `console: port <id> name=<name>`,
//! `console: port <id> host-open=<0|1>`, `console: resize port=<id> cols=<c> rows=<r>`. It
//! then uses port 0, or the port named `console.name` (waiting up to 10 s for it to be
//! added and named), sends
//! PORT_OPEN 1 for it and prints `console: features=0x<f> multiport=<0|1> ports=<n>
//! queues=<transport>` (after set-up) and `console: mode=<mode> port=<id>`.
//!
//! | parameter | default | meaning |
//! |---|---|---|
//! | `console.mode` | `echo` | `echo`, `stream`, `sink`, `shell` or `hostile` |
//! | `console.name` | (none) | use the port with this name (needs MULTIPORT) |
//! | `console.bytes` | 1048576 | echo: bytes to echo before finishing |
//! | `console.seconds` | 5 | stream: seconds to write; sink: the most seconds to wait |
//! | `console.fill` | 1 | stream: 0 sends the buffers without writing the pattern into them (for throughput measurements, where the guest's own filling would be the limit) |
//!
//! * `echo`: 16 receive buffers of 4 KiB; each filled buffer is sent back as it is (one
//!   transmit chain) and posted again when the device returns it. After `console.bytes`
//!   bytes: `console: echoed bytes=<n> crc=<CRC-32 of them, 8 hex digits>`. No progress for
//!   60 s: exit 17.
//! * `stream` (on the chosen port): transmit chains of 1 to 65536 bytes (xorshift lengths; over 1 KiB split into
//!   two descriptors), 8 in flight, carrying the stream whose byte `p` is byte `p % 4` of the
//!   little-endian u32 `p / 4`. Every 50 ms `console: tick rounds=<loop rounds> sent=<bytes
//!   queued> buffers-done=<returned>` (rounds advance on a 10 ms timer even when the device
//!   is gone). Input on the port ends the stream early (`console: stream stopped by input`). At
//!   the end `console: stream done bytes=<n> buffers=<n>` once all are returned.
//! * `sink` (on the chosen port): 8 receive buffers of 64 KiB, each posted again as soon as
//!   it is returned; prints `console: sink ready`, then, one second after the last input (or
//!   after `console.seconds` with none), `console: sink done bytes=<n> buffers=<n>`.
//! * `shell`: writes `guest> ` on the port, prints `console: shell ready`; each line the user
//!   sends (ended by CR or LF) is printed as `console: shell line '<line>'` and answered on the
//!   port with `you typed: <line>\r\nguest> `; the line `exit` is answered with `bye\r\n`.
//!
//! * `hostile` (needs MULTIPORT): `console: hostile: bad-address=0x<a>` (0x3_0000_0000, or
//!   the first GiB boundary at least 1 GiB past RAM), then one chain at a time, each of which
//!   must be returned within 2 s with nothing written (`console: hostile <case>: returned
//!   len=0`, else exit 18): on the control transmit queue `unknown-event` (event 99),
//!   `device-only-event` (DEVICE_ADD from the driver), `bad-port-ready` (port 9),
//!   `bad-port-open` (port 0xffffffff), `short-message` (4 bytes), `control-outside-ram`,
//!   `control-oversized` (0xfffff000 bytes from a valid address), `control-device-writable`;
//!   none may make the device send a control message. On port 0 `tx-outside-ram`,
//!   `tx-oversized`, `tx-device-writable`, `tx-half-outside` (8 valid bytes `LEAKED!!`, then
//!   8 outside RAM: nothing of it may be written anywhere), `rx-device-readable`,
//!   `rx-outside-ram`. Then it writes `after hostile\n` on port 0 and prints `console:
//!   hostile ok`.
//!
//! Every mode ends with `console: ok` and powers off. Exit codes: 10 no device, 11 bad
//! capabilities, 12 features, 13 queue set-up, 14 bad parameter, 17 timeout, 18 hostile case
//! failed, 19 protocol (bad used id or length, `max_nr_ports` the transport has no queues
//! for).
//! # `virtio-input` ([`VIRTIO_INPUT_ELF`])
//!
//! A virtio-input driver (`guest/virtio-input.c` on `guest/virtio.c`) for every
//! 0x1af4:0x1052 function on bus 0 (at most 4, numbered `dev=0..` in bus order). Each gets
//! VERSION_1 and EVENT_IDX (if offered), MSI-X entries 0 (config), 1 (event queue) and 2
//! (status queue) routed to IDT vectors 0x40 + 4 x dev + entry, and two split queues of
//! min(device maximum, 64) entries. Command line:
//!
//! | key | default | meaning |
//! |-----|---------|---------|
//! | `virtio-input.mode` | `normal` | `normal` or `hostile` (below) |
//! | `virtio-input.stop` | 1 | key code whose press (value 1) on any device ends the run |
//! | `virtio-input.timeout` | 60 | seconds without any event before the guest gives up (exit 43) |
//!
//! Output, per device, then the events:
//!
//! ```text
//! virtio-input: dev=<n> at 00:<slot>.<fn>
//! virtio-input: dev=<n> name="<ID_NAME>"
//! virtio-input: dev=<n> ids=<bustype>:<vendor>:<product>:<version>       (4 hex digits each)
//! virtio-input: dev=<n> ev=0x<type> size=<bytes> bits=<bitmap, 2 hex digits per byte>
//!                       (for EV_SYN 0x00, EV_KEY 0x01, EV_REL 0x02, EV_ABS 0x03, EV_LED 0x11, EV_REP 0x14)
//! virtio-input: dev=<n> abs=<axis> min=<> max=<> fuzz=<> flat=<> res=<>  (axes 0, 1 if present)
//! virtio-input: dev=<n> leds sent          (devices with EV_LED bits: caps lock on + SYN on
//!                                           the status queue, returned by the device)
//! virtio-input: ready devices=<n>
//! virtio-input: dev=<n> report <type>:<code>:<value> ... 0:0:0   (one line per report, when
//!                                           its EV_SYN arrives; every event of it, in order)
//! virtio-input: done reports=<n> events=<n>      (after the report pressing the stop key)
//! ```
//!
//! then powers off. Every event buffer (8 bytes, one descriptor) is re-posted as soon as it
//! is consumed, so the device always has the whole queue. In `hostile` mode, per device and
//! before `ready`: out-of-range selectors must read as size 0 and writes to `size`, the
//! reserved bytes and the union must not change them (else exit 45); five malformed status
//! buffers (5 bytes; device-writable; at the bad address; an unknown event type; 1 MiB long)
//! must all be returned within 2 s (`virtio-input: dev=<n> hostile status returned=5`); and
//! event descriptors 0-3 are malformed (device-readable; 4 bytes; at the bad address; `next`
//! = 200 outside the queue), posted before the good ones: they must come back first, in
//! order, with length 0 and nothing written (`virtio-input: dev=<n> hostile events
//! returned=4` after the first event), else exit 45. The bad address is as in `virtio-blk`.
//! Exit codes: [`EXIT_VINPUT_NO_DEVICE`] and following.

//! # `desktop` ([`DESKTOP_ELF`])
//!
//! A screen, a keyboard and a tablet (`guest/desktop.c`), for the end-to-end desktop tests.
//! The GPU half is `guest/virtio-gpu.c` itself, included with its entry point renamed: the
//! first virtio-gpu function is set up and draws frame 1 of [`gpu_pixel`] and the cursor
//! exactly as the `virtio-gpu` guest's `draw` mode does, with the same output lines
//! (`virtio-gpu: display <w>x<h> enabled=1`, `virtio-gpu: frame 1 flushed <w>x<h>`,
//! `virtio-gpu: cursor set`; `virtio-gpu.chunks` and `virtio-gpu.timeout` apply). Then up to
//! two virtio-input functions (in bus order, `dev=0..`) get VERSION_1 and EVENT_IDX, MSI-X
//! entries 0-2 routed to vectors 0x60 + 4 x dev + entry, and a 64-entry event queue kept
//! full of 8-byte buffers. Command line:
//!
//! | key | default | meaning |
//! |-----|---------|---------|
//! | `desktop.stop` | 1 | key code whose press ends the run |
//! | `desktop.redraw` | 57 | key code whose press draws the next frame (2, 3, ...) through the GPU |
//! | `desktop.timeout` | 60 | seconds without any event before the guest gives up (exit 52) |
//!
//! ```text
//! virtio-input: dev=<n> abs=<axis> min=<> max=<>     (devices with absolute axes 0, 1)
//! desktop: ready inputs=<n>
//! virtio-input: dev=<n> report <type>:<code>:<value> ... 0:0:0   (as the virtio-input guest)
//! virtio-gpu: frame <k> flushed <w>x<h>                  (after a report pressing the redraw key)
//! desktop: done frames=<k>                               (after a report pressing the stop key)
//! ```
//!
//! then powers off. Exit codes: those of `virtio-gpu` for the GPU half, 14 bad parameter,
//! [`EXIT_DESKTOP_NO_INPUT`] and following for the input half.
//!
//! # vdrivers
//!
//! The ring-3 payload is Rust (`vdrivers/`): the crates.io `virtio-drivers` crate, pinned and
//! unchanged, drives the first virtio function of the kind `vdrivers.dev=` names (`blk`, `net`,
//! `console`, `gpu`, `input`) through its PCI transport over the ECAM window at 0xe000_0000.
//! `vdrivers.mode=` picks the work (see README.md for each device's modes and lines). Every
//! line starts with `vdrivers: `; the first is `vdrivers: start dev=<dev>`, the last of a
//! successful run `vdrivers: ok` (then power-off). A failure prints `vdrivers: FAIL: <why>` and
//! exits with one of the `EXIT_VDRIVERS_*` codes.

use std::path::{Path, PathBuf};

pub mod elf;

/// `boot-check` as an ELF with a PVH note.
pub const BOOT_CHECK_ELF: &str = concat!(env!("OUT_DIR"), "/boot-check.elf");
/// `boot-check` as a Linux bzImage (64-bit entry at load address + 0x200).
pub const BOOT_CHECK_BZIMAGE: &str = concat!(env!("OUT_DIR"), "/boot-check.bzimage");
/// `msi` as an ELF with a PVH note.
pub const MSI_ELF: &str = concat!(env!("OUT_DIR"), "/msi.elf");
/// The `power` guest (see the module documentation) as an ELF with a PVH note.
pub const POWER_ELF: &str = concat!(env!("OUT_DIR"), "/power.elf");
/// `triple-fault` as an ELF with a PVH note.
pub const TRIPLE_FAULT_ELF: &str = concat!(env!("OUT_DIR"), "/triple-fault.elf");
/// `cpu-check` (each vCPU's CPUID, and whether a hypercall returns) as an ELF with a PVH note.
pub const CPU_CHECK_ELF: &str = concat!(env!("OUT_DIR"), "/cpu-check.elf");
/// `virtio-blk` as an ELF with a PVH note.
pub const VIRTIO_BLK_ELF: &str = concat!(env!("OUT_DIR"), "/virtio-blk.elf");
/// `virtio-net` as an ELF with a PVH note.
pub const VIRTIO_NET_ELF: &str = concat!(env!("OUT_DIR"), "/virtio-net.elf");
/// `virtio-gpu` as an ELF with a PVH note.
pub const VIRTIO_GPU_ELF: &str = concat!(env!("OUT_DIR"), "/virtio-gpu.elf");
/// `virtio-console` as an ELF with a PVH note.
pub const VIRTIO_CONSOLE_ELF: &str = concat!(env!("OUT_DIR"), "/virtio-console.elf");

/// `virtio-input` as an ELF with a PVH note.
pub const VIRTIO_INPUT_ELF: &str = concat!(env!("OUT_DIR"), "/virtio-input.elf");
/// `desktop` as an ELF with a PVH note.
pub const DESKTOP_ELF: &str = concat!(env!("OUT_DIR"), "/desktop.elf");

/// `vfio-user` (a driver for the vfio-user test device) as an ELF with a PVH note.
pub const VFIO_USER_ELF: &str = concat!(env!("OUT_DIR"), "/vfio-user.elf");
/// `usb` (a small xHCI driver for isola-usb: `guest/usb.c`, its header comment has the
/// command line) as an ELF with a PVH note.
pub const USB_ELF: &str = concat!(env!("OUT_DIR"), "/usb.elf");

/// `vdrivers` (the virtio-drivers crate's drivers) as an ELF with a PVH note.
pub const VDRIVERS_ELF: &str = concat!(env!("OUT_DIR"), "/vdrivers.elf");

/// File names of all images, as accepted by [`image`].
pub const IMAGES: &[&str] = &[
    "boot-check.elf",
    "boot-check.bzimage",
    "msi.elf",
    "power.elf",
    "triple-fault.elf",
    "cpu-check.elf",
    "virtio-blk.elf",
    "virtio-net.elf",
    "virtio-gpu.elf",
    "virtio-console.elf",
    "virtio-input.elf",
    "desktop.elf",
    "vfio-user.elf",
    "usb.elf",
    "vdrivers.elf",
];

/// Pixel (x, y) of frame `frame` of the `virtio-gpu` guest's picture, as (red, green, blue).
pub fn gpu_pixel(x: u32, y: u32, frame: u32) -> [u8; 3] {
    let b = x.wrapping_mul(5).wrapping_add(frame * 40) & 0xff;
    let g = y.wrapping_mul(3).wrapping_add((x >> 8) * 64) & 0xff;
    let r = (x ^ y).wrapping_add(frame * 100) & 0xff;
    [r as u8, g as u8, b as u8]
}

/// Exit codes of the `virtio-gpu` guest.
pub const EXIT_VGPU_COMMAND: u8 = 15;
pub const EXIT_VGPU_TIMEOUT: u8 = 17;
pub const EXIT_VGPU_HOSTILE: u8 = 18;

/// Guest-physical address every image is linked and loaded at.
pub const IMAGE_BASE: u64 = 0x10_0000;
/// Address of the 32-bit PVH entry (the PVH note's value).
pub const PVH_ENTRY: u64 = IMAGE_BASE;
/// Address of the Linux 64-bit boot protocol entry (also the ELF's `e_entry`).
pub const ENTRY64: u64 = IMAGE_BASE + 0x200;
/// Where the guests copy their AP trampoline (STARTUP IPI vector 0x08); the VMM must not
/// need this page after entry.
pub const AP_TRAMPOLINE: u64 = 0x8000;
/// The bytes every entry point starts with: `mov $0x3f8,%dx; mov $0x0a,%al; outb %al,%dx`.
pub const BOOT_MARKER_CODE: [u8; 7] = [0x66, 0xba, 0xf8, 0x03, 0xb0, 0x0a, 0xee];

/// Number of interrupts `msi` waits for.
pub const MSI_COUNT: u32 = 8;
/// The `power` guest: the GED's event register (the core's `GED_PORT`).
pub const GED_PORT: u16 = 0xb00;
/// The `power` guest: the GED's GSI (IOAPIC pin; the core's `GED_IRQ`).
pub const GED_IRQ: u32 = 5;
/// The `power` guest: the power-button bit of the GED's event register.
pub const GED_EVENT_POWER_BUTTON: u8 = 1;
/// The `power` guest: `power.mode` is neither `answer` nor `ignore`.
pub const EXIT_POWER_BAD_PARAM: u8 = 60;
/// Debug-exit value: `boot-check` found a bad PVH magic or no `HdrS`.
pub const EXIT_BAD_BOOT_INFO: u8 = 3;
/// Debug-exit value: `boot-check` started fewer CPUs than the MP table describes.
pub const EXIT_MISSING_CPUS: u8 = 4;
/// Debug-exit value: `boot-check` was given a memory map or initrd it cannot reach (>= 4 GiB).
pub const EXIT_UNMAPPED: u8 = 5;
/// `virtio-blk` exit: no 0x1af4:0x1042 function on bus 0.
pub const EXIT_VBLK_NO_DEVICE: u8 = 10;
/// `virtio-blk` exit: a virtio capability (common, notify, ISR) or MSI-X is missing or unusable,
/// or fewer than 2 MSI-X vectors.
pub const EXIT_VBLK_BAD_CAPS: u8 = 11;
/// `virtio-blk` exit: VERSION_1 not offered, or FEATURES_OK did not stick.
pub const EXIT_VBLK_FEATURES: u8 = 12;
/// `virtio-blk` exit: config or queue MSI-X vector not accepted, queue 0 missing or already
/// enabled, or the device not running after DRIVER_OK (NEEDS_RESET).
pub const EXIT_VBLK_SETUP: u8 = 13;
/// `virtio-blk` exit: bad command-line parameter, or the disk cannot take the workload (too
/// small, read-only).
pub const EXIT_VBLK_BAD_PARAM: u8 = 14;
/// `virtio-blk` exit: a workload request (read, write, flush) completed with a status other
/// than OK.
pub const EXIT_VBLK_IO_ERROR: u8 = 15;
/// `virtio-blk` exit: data read back differs from the pattern.
pub const EXIT_VBLK_MISMATCH: u8 = 16;
/// `virtio-blk` exit: no completion within `virtio-blk.timeout` seconds.
pub const EXIT_VBLK_TIMEOUT: u8 = 17;
/// `virtio-blk` exit: hostile mode: wrong status for a malformed request, or the device no
/// longer serves valid requests afterwards.
pub const EXIT_VBLK_HOSTILE: u8 = 18;
/// `virtio-blk` exit: the device broke the protocol (a used id that is not in flight, or a
/// configuration `num_queues` the transport does not have).
pub const EXIT_VBLK_PROTOCOL: u8 = 19;
/// virtio-input: no virtio-input PCI function found.
pub const EXIT_VINPUT_NO_DEVICE: u8 = 40;
/// virtio-input: set-up failed (MSI-X vectors, features, queues, DRIVER_OK).
pub const EXIT_VINPUT_SETUP: u8 = 41;
/// virtio-input: bad command-line parameter.
pub const EXIT_VINPUT_BAD_PARAM: u8 = 42;
/// virtio-input: no event within `virtio-input.timeout`, or a status buffer not returned.
pub const EXIT_VINPUT_TIMEOUT: u8 = 43;
/// virtio-input: the device broke the protocol (bad used id or length, a report too long).
pub const EXIT_VINPUT_PROTOCOL: u8 = 44;
/// virtio-input: a hostile case was not handled as required.
pub const EXIT_VINPUT_HOSTILE: u8 = 45;
/// desktop: no virtio-input PCI function found.
pub const EXIT_DESKTOP_NO_INPUT: u8 = 50;
/// desktop: input set-up failed (MSI-X vectors, features, queues, DRIVER_OK).
pub const EXIT_DESKTOP_SETUP: u8 = 51;
/// desktop: no event within `desktop.timeout`.
pub const EXIT_DESKTOP_TIMEOUT: u8 = 52;
/// desktop: an input device broke the protocol (bad used id or length, a report too long).
pub const EXIT_DESKTOP_PROTOCOL: u8 = 53;
/// vdrivers: a check failed (the `FAIL:` line says which).
pub const EXIT_VDRIVERS_FAILED: u8 = 0x50;
/// vdrivers: no device of the kind asked for, too little RAM, or a bad command line.
pub const EXIT_VDRIVERS_SETUP: u8 = 0x51;
/// vdrivers: a wait passed its deadline.
pub const EXIT_VDRIVERS_TIMEOUT: u8 = 0x52;
/// vdrivers: the Rust code (the crate or the guest) panicked.
pub const EXIT_VDRIVERS_PANIC: u8 = 0x53;
/// Debug-exit value: a guest's `guest_main` returned (a guest bug).
pub const EXIT_MAIN_RETURNED: u8 = 0x7e;
/// Debug-exit value: unexpected CPU exception (after the `exception:` line).
pub const EXIT_EXCEPTION: u8 = 0x7f;

/// The absolute path of image `name` (one of [`IMAGES`], e.g. `"boot-check.elf"`).
pub fn image(name: &str) -> Option<PathBuf> {
    IMAGES
        .contains(&name)
        .then(|| Path::new(env!("OUT_DIR")).join(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn read(name: &str) -> Vec<u8> {
        let path = image(name).unwrap();
        fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// The loaded bytes of an ELF image as they sit in memory from IMAGE_BASE, and the
    /// memory size including .bss.
    fn loaded(bytes: &[u8]) -> (Vec<u8>, u64) {
        let elf = elf::Elf::parse(bytes).unwrap();
        let (start, end) = elf.load_range().unwrap();
        assert_eq!(start, IMAGE_BASE);
        let mut mem = vec![0u8; usize::try_from(end - start).unwrap()];
        for ph in elf
            .program_headers
            .iter()
            .filter(|ph| ph.p_type == elf::PT_LOAD)
        {
            let at = usize::try_from(ph.paddr - start).unwrap();
            let data = elf.segment_bytes(ph).unwrap();
            mem[at..at + data.len()].copy_from_slice(data);
        }
        (mem, end - start)
    }

    #[test]
    fn every_image_exists_and_lookup_matches_constants() {
        for name in IMAGES {
            let path = image(name).unwrap();
            assert!(path.is_absolute());
            assert!(fs::metadata(&path).unwrap().len() > 0, "{name} is empty");
        }
        assert_eq!(image("boot-check.elf").unwrap(), Path::new(BOOT_CHECK_ELF));
        assert_eq!(
            image("boot-check.bzimage").unwrap(),
            Path::new(BOOT_CHECK_BZIMAGE)
        );
        assert_eq!(image("msi.elf").unwrap(), Path::new(MSI_ELF));
        assert_eq!(
            image("triple-fault.elf").unwrap(),
            Path::new(TRIPLE_FAULT_ELF)
        );
        assert_eq!(image("virtio-blk.elf").unwrap(), Path::new(VIRTIO_BLK_ELF));
        assert_eq!(image("nope.elf"), None);
    }

    #[test]
    fn elf_images_have_pvh_note_and_loadable_segments() {
        for name in IMAGES.iter().filter(|n| n.ends_with(".elf")) {
            let bytes = read(name);
            assert_eq!(&bytes[..4], b"\x7fELF", "{name}");
            assert_eq!(bytes[4], 2, "{name}: ELFCLASS64");
            assert_eq!(bytes[5], 1, "{name}: little endian");
            let elf = elf::Elf::parse(&bytes).unwrap();
            assert_eq!(elf.machine, elf::EM_X86_64, "{name}");
            assert_eq!(elf.entry, ENTRY64, "{name}: e_entry");

            let notes = elf.notes().unwrap();
            let pvh = notes
                .iter()
                .find(|n| n.kind == elf::XEN_ELFNOTE_PHYS32_ENTRY)
                .unwrap_or_else(|| panic!("{name}: no PVH note"));
            assert_eq!(pvh.name, b"Xen\0", "{name}");
            assert_eq!(pvh.desc.len(), 4, "{name}");
            assert_eq!(u64::from(elf.pvh_entry().unwrap()), PVH_ENTRY, "{name}");

            let loads: Vec<_> = elf
                .program_headers
                .iter()
                .filter(|ph| ph.p_type == elf::PT_LOAD)
                .collect();
            assert!(!loads.is_empty(), "{name}: no PT_LOAD");
            for ph in loads {
                assert_eq!(ph.align % 0x20_0000, 0, "{name}: p_align {:#x}", ph.align);
                assert!(ph.align > 0, "{name}");
                assert_eq!(ph.paddr, ph.vaddr, "{name}: not identity mapped");
                assert!(ph.paddr >= IMAGE_BASE, "{name}");
                assert!(ph.memsz >= ph.filesz, "{name}");
            }

            // Both entry points start with the boot marker.
            let (mem, _) = loaded(&bytes);
            for entry in [PVH_ENTRY, ENTRY64] {
                let at = usize::try_from(entry - IMAGE_BASE).unwrap();
                assert_eq!(
                    mem[at..at + 7],
                    BOOT_MARKER_CODE,
                    "{name}: entry {entry:#x}"
                );
            }
        }
    }

    #[test]
    fn bzimage_has_a_valid_setup_header_and_the_elf_payload() {
        let bz = read("boot-check.bzimage");
        assert_eq!(u16_at(&bz, 0x1fe), 0xaa55, "boot_flag");
        assert_eq!(&bz[0x202..0x206], b"HdrS");
        assert_eq!(u16_at(&bz, 0x206), 0x020f, "version 2.15");
        let setup_sects = usize::from(bz[0x1f1]);
        assert!(setup_sects > 0);
        assert_eq!(bz[0x211] & 1, 1, "loadflags LOADED_HIGH");
        assert_eq!(u32_at(&bz, 0x214), 0x10_0000, "code32_start");
        assert_eq!(u32_at(&bz, 0x22c), 0x7fff_ffff, "initrd_addr_max");
        assert_eq!(bz[0x234], 0, "relocatable_kernel");
        assert_eq!(u16_at(&bz, 0x236) & 1, 1, "xloadflags XLF_KERNEL_64");
        assert_eq!(u32_at(&bz, 0x238), 2047, "cmdline_size");
        assert_eq!(u64_at(&bz, 0x258), IMAGE_BASE, "pref_address");

        // The payload is the ELF's loaded bytes, byte for byte, and init_size covers .bss.
        let payload = &bz[(setup_sects + 1) * 512..];
        assert_eq!(
            u32_at(&bz, 0x1f4) as usize,
            payload.len().div_ceil(16),
            "syssize"
        );
        let (mem, mem_size) = loaded(&read("boot-check.elf"));
        assert_eq!(payload, &mem[..payload.len()]);
        assert!(
            mem[payload.len()..].iter().all(|&b| b == 0),
            "only .bss after the payload"
        );
        assert!(u64::from(u32_at(&bz, 0x260)) >= mem_size, "init_size");
        let entry = usize::try_from(ENTRY64 - IMAGE_BASE).unwrap();
        assert_eq!(
            payload[entry..entry + 7],
            BOOT_MARKER_CODE,
            "64-bit entry at +0x200"
        );
    }
}
