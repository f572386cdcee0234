//! The descriptor-chain walker (device-procs/common/src/chain.rs) over descriptor tables and
//! indirect tables the fuzzer builds in a small guest: the walk's structural promises,
//! `split_at`'s arithmetic, and that writing through a chain's writable buffers touches
//! nothing else.
#![no_main]

use isola_device_common::chain::{self, Segment};
use isola_device_common::DescriptorChain;
use isola_fuzz::{Reader, Rig, QSIZE};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

/// Every piece `split_at` returns lies inside one input buffer (no wrapped address).
fn inside(pieces: &[Segment], segs: &[Segment]) {
    for p in pieces {
        let ok = segs.iter().any(|s| {
            s.writable == p.writable
                && p.addr.0 >= s.addr.0
                && (p.addr.0 - s.addr.0)
                    .checked_add(u64::from(p.len))
                    .is_some_and(|end| end <= u64::from(s.len))
        });
        assert!(ok, "split_at made {p:?}, which is in none of {segs:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let at = u64::from(r.u32());
    let rig = Rig::new(&mut r, 1);
    let table = rig.drivers[0].desc;
    let mut reused = Vec::new();
    for &head in &rig.published[0] {
        let chain = DescriptorChain::new(Arc::clone(&rig.mem), table, QSIZE, head);
        let walked = chain.segments();
        let again = chain.segments_into(&mut reused);
        assert_eq!(walked.is_ok(), again.is_ok());
        let Ok(segs) = walked else { continue };
        assert_eq!(segs, reused);
        // At most one descriptor per table entry, and an indirect table has at most 2^16.
        assert!(segs.len() <= usize::from(u16::MAX));
        let total = chain::total_len(&segs);
        assert!(total <= u64::from(u32::MAX), "a chain of {total} bytes");
        if let Some(first_w) = segs.iter().position(|s| s.writable) {
            assert!(
                segs[first_w..].iter().all(|s| s.writable),
                "readable after writable: {segs:?}"
            );
        }
        for cut in [at, at % (total + 1), total.saturating_sub(1), 0] {
            let Ok((a, b)) = chain::split_at(&segs, cut) else {
                panic!("split_at refused a walked chain {segs:?} at {cut}");
            };
            assert_eq!(chain::total_len(&a), cut.min(total));
            assert_eq!(chain::total_len(&a) + chain::total_len(&b), total);
            inside(&a, &segs);
            inside(&b, &segs);
        }
        // As a device does: read the readable part, write the writable part (all of it,
        // and its last byte alone, as a status byte is written).
        let split = segs.iter().position(|s| s.writable).unwrap_or(segs.len());
        let (readable, writable) = segs.split_at(split);
        let mut buf = vec![0u8; chain::total_len(readable).min(4096) as usize];
        let _ = chain::read_bytes(&rig.mem, readable, &mut buf);
        let wlen = chain::total_len(writable);
        let fill = vec![0xa5u8; wlen.min(4096) as usize];
        let _ = chain::write_bytes(&rig.mem, writable, &fill);
        if wlen > 0 {
            if let Ok((_, last)) = chain::split_at(writable, wlen - 1) {
                let _ = chain::write_bytes(&rig.mem, &last, &[0x5a]);
            }
        }
        let _ = chain::host_slices(&rig.mem, &segs);
    }
    rig.check();
});
