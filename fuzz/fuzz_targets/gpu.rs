//! isola-gpu's command parser: control-queue and cursor-queue commands as a driver writes
//! them, both straight into the device model (so the fuzzer can chain stateful commands:
//! create, attach backing in guest memory, transfer, scan out, flush, unref) and through the
//! device's queue handlers over chains the fuzzer builds.
#![no_main]

use isola_device_common::VirtioDevice;
use isola_fuzz::{Reader, Rig};
use isola_gpu::backend::GpuDevice;
use isola_gpu::device::Gpu;
use isola_gpu::protocol::{HDR_LEN, RESP_ERR_UNSPEC, RESP_OK_NODATA};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let mut commands = Vec::new();
    for _ in 0..usize::from(r.u8() % 16) {
        let cursor = r.u8() & 0x80 != 0;
        let len = usize::from(r.u16() % 2048);
        commands.push((cursor, r.bytes(len)));
    }
    let mut rig = Rig::new(&mut r, 2);
    let mut gpu = Gpu::new(64, 48, 1 << 20);
    for (cursor, req) in commands {
        if cursor {
            let _ = gpu.cursor(req);
        } else {
            let (resp, _ops) = gpu.control(&rig.mem, req);
            assert!(resp.len() >= HDR_LEN, "a {}-byte response", resp.len());
            let kind = u32::from_le_bytes([resp[0], resp[1], resp[2], resp[3]]);
            assert!(
                (RESP_OK_NODATA..RESP_OK_NODATA + 0x100).contains(&kind)
                    || (RESP_ERR_UNSPEC..RESP_ERR_UNSPEC + 0x100).contains(&kind),
                "response type {kind:#x}"
            );
        }
    }
    let device = GpuDevice::new(64, 48, 1 << 20, 64, None, None);
    for q in 0..2u16 {
        let mut handler = device.queue_handler(q, 0).expect("two queues");
        let _ = rig.run(usize::from(q), handler.as_mut());
    }
    rig.check();
});
