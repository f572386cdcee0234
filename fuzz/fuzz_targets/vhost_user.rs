//! The device-common vhost-user backend: the `vhost` crate's message layer and Isola's
//! request handler (handler.rs, memory.rs, inflight.rs), driven through `serve_connection`
//! with a frontend's byte stream over a socket pair. Each message of the input may carry a
//! file descriptor the way a frontend passes them: a sealed memfd (guest RAM, an in-flight
//! region) or an eventfd (kick, call, err). The connection must end (refused or
//! disconnected) once the frontend has sent everything and shut its end.
#![no_main]

use std::os::fd::OwnedFd;
use std::sync::Arc;

use isola_device_common::{
    serve_connection, DeviceError, Progress, QueueContext, QueueError, QueueHandler, VirtioDevice,
};
use isola_fuzz::Reader;
use libfuzzer_sys::fuzz_target;
use memfd::{FileSeal, MemfdOptions};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// A two-queue device whose queues return every request unanswered.
struct Dummy;

struct Drain;

impl QueueHandler for Drain {
    fn process(&mut self, queue: &mut QueueContext<'_>) -> Result<Progress, QueueError> {
        while let Some(chain) = queue.pop()? {
            let _ = chain.segments();
            queue.complete(chain.head(), 0)?;
        }
        Ok(Progress::Idle)
    }
}

impl VirtioDevice for Dummy {
    fn name(&self) -> &str {
        "fuzz"
    }

    fn num_queues(&self) -> u16 {
        2
    }

    fn max_queue_size(&self) -> u16 {
        64
    }

    fn features(&self) -> u64 {
        (1 << 32) | (1 << 29) // VERSION_1, EVENT_IDX
    }

    fn config(&self) -> Vec<u8> {
        (0..32u8).collect()
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        if offset < 4 && data.len() <= 4 {
            Ok(())
        } else {
            Err(DeviceError::ReadOnlyConfig {
                offset,
                len: data.len(),
            })
        }
    }

    fn queue_handler(
        &self,
        _index: u16,
        _features: u64,
    ) -> Result<Box<dyn QueueHandler>, DeviceError> {
        Ok(Box::new(Drain))
    }
}

/// Guest RAM as the core passes it: a memfd of 64 KiB sealed against resizing.
fn memfd() -> OwnedFd {
    let fd = MemfdOptions::default()
        .allow_sealing(true)
        .create("fuzz-guest-ram")
        .expect("memfd");
    fd.as_file().set_len(64 * 1024).expect("sized");
    fd.add_seals(&[FileSeal::SealShrink, FileSeal::SealGrow, FileSeal::SealSeal])
        .expect("sealed");
    OwnedFd::from(fd.into_file())
}

fn eventfd() -> OwnedFd {
    let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK).expect("eventfd");
    OwnedFd::from(fd)
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let mut messages = Vec::new();
    while !r.is_empty() && messages.len() < 64 {
        let kind = r.u8();
        let len = usize::from(r.u16() % 1024);
        let bytes = r.bytes(len).to_vec();
        let fds = match kind & 3 {
            0 => Vec::new(),
            1 => vec![memfd()],
            2 => vec![eventfd()],
            _ => vec![memfd(), eventfd()],
        };
        messages.push((bytes, fds));
    }
    let device = Arc::new(Dummy);
    isola_fuzz::over_socket(messages, |stream| {
        let _ = serve_connection(stream, &device);
    });
});
