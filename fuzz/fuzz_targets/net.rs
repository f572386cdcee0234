//! isola-net's guest-fed parsers: the virtio-net header of a transmitted frame (parse and the
//! offload checks that decide whether it reaches the tap) and the control queue's commands
//! over chains the fuzzer builds.
#![no_main]

use isola_fuzz::{Reader, Rig};
use isola_net::device::{CtrlQueue, VnetHeader, MAX_GSO_FRAME, MIN_FRAME};
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_CSUM, VIRTIO_NET_HDR_F_NEEDS_CSUM};

use isola_net::tap::VNET_HDR_LEN;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let features = r.u64();
    let len = usize::from(r.u16()) + usize::from(r.u8() & 1) * 0x1_0000;
    let mtu = r.u16();
    let mut raw = [0u8; VNET_HDR_LEN];
    let got = r.bytes(VNET_HDR_LEN);
    raw[..got.len()].copy_from_slice(got);
    let hdr = VnetHeader::parse(&raw);
    if hdr.tx_problem(features, len, mtu).is_none() {
        // What the tap is promised for an accepted frame.
        assert!(
            (MIN_FRAME..=MAX_GSO_FRAME).contains(&len),
            "{hdr:?} len {len}"
        );
        if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 {
            assert!(features & (1 << VIRTIO_NET_F_CSUM) != 0);
            let end = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2;
            assert!(end <= len, "checksum at {end} outside a {len}-byte frame");
        }
    }
    // The control queue, without a tap (queue-pair changes are accepted, not applied).
    let pairs = u16::from(r.u8() % 8) + 1;
    let mut ctrl = CtrlQueue::new(None, pairs);
    let mut rig = Rig::new(&mut r, 1);
    let ran = rig.run(0, &mut ctrl);
    let used = rig.check();
    if ran.is_ok() {
        rig.all_returned(0, &used[0]);
    }
});
