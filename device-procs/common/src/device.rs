//! The trait a device process implements. blk, net, gpu, input and console differ only here:
//! the vhost-user protocol, queue workers, notifications and in-flight tracking are shared.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use vhost::vhost_user::GpuBackend;

use crate::queue::{QueueContext, QueueError};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("configuration bytes {offset}..+{len} are not writable")]
    ReadOnlyConfig { offset: u32, len: usize },
    #[error("{0} is not supported by this device")]
    Unsupported(&'static str),
    #[error("cannot set up queue {index}")]
    QueueSetup {
        index: u16,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A virtio device served over vhost-user.
pub trait VirtioDevice: Send + Sync + 'static {
    /// Short name, used in thread names and log lines ("blk").
    fn name(&self) -> &str;

    /// Number of queues the device has (GET_QUEUE_NUM); each runs on its own thread.
    fn num_queues(&self) -> u16;

    /// Largest queue the frontend may configure; a power of two.
    fn max_queue_size(&self) -> u16;

    /// Virtio feature bits offered to the driver, including `VIRTIO_F_VERSION_1`.
    /// The vhost-user `PROTOCOL_FEATURES` bit is added by the server.
    fn features(&self) -> u64;

    /// The device configuration space.
    fn config(&self) -> Vec<u8>;

    /// A driver write to the configuration space. Writes the device refuses are logged and
    /// dropped, as a device ignores writes to read-only fields.
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::ReadOnlyConfig {
            offset,
            len: data.len(),
        })
    }

    /// The handler of queue `index`, created each time the queue starts, with the features
    /// the driver acknowledged.
    fn queue_handler(
        &self,
        index: u16,
        features: u64,
    ) -> Result<Box<dyn QueueHandler>, DeviceError>;

    /// The frontend reset the device (RESET_DEVICE or RESET_OWNER, as on a guest reset), after
    /// every queue stopped. Device state the driver created (e.g. a GPU's resources) ends
    /// here; state that lives across connections only (an open image) stays.
    fn reset(&self) {}

    /// The display channel of a GPU device (VHOST_USER_GPU_SET_SOCKET).
    fn set_gpu_socket(&self, _backend: GpuBackend) -> Result<(), DeviceError> {
        Err(DeviceError::Unsupported("VHOST_USER_GPU_SET_SOCKET"))
    }
}

/// What [`QueueHandler::process`] left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Took every available request.
    Idle,
    /// Stopped taking requests (e.g. waiting for its engine); call again on a completion.
    Blocked,
}

/// The per-queue half of a device, run on that queue's worker thread.
pub trait QueueHandler: Send {
    /// An eventfd the worker also waits on, e.g. an I/O engine's completion eventfd. The
    /// worker reads (clears) it before calling [`QueueHandler::process`].
    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// A file the worker watches for input (edge-triggered) without reading it, e.g. a tap
    /// device the handler reads in [`QueueHandler::process`]. Each new arrival wakes the
    /// worker once, so the handler must read until the file would block, or until it cannot
    /// take more and returns [`Progress::Idle`] (the driver's next kick resumes it). Asked
    /// once, when the queue starts.
    fn input_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Takes requests with [`QueueContext::pop`] and returns them with
    /// [`QueueContext::complete`]. Called on every kick and every completion event.
    ///
    /// Errors end the connection: return them only for failures of the device itself, never
    /// for a malformed request (complete that one with an error status instead).
    fn process(&mut self, queue: &mut QueueContext<'_>) -> Result<Progress, QueueError>;

    /// How long the worker keeps watching the available ring (and [`QueueHandler::ready`])
    /// after a pass finds nothing more, before it re-enables kicks and sleeps. While it polls
    /// the driver sends no kicks, and a new request costs neither side a wakeup; the price is
    /// a busy thread for up to this long after each burst. Zero (the default): never poll.
    fn poll_time(&self) -> Duration {
        Duration::ZERO
    }

    /// Whether the handler has work it can do without waiting (e.g. finished I/O waiting to
    /// be reaped). Asked while polling; a `true` starts another pass.
    fn ready(&mut self) -> bool {
        false
    }

    /// The queue is stopping: finish what is in flight and complete it. Requests a handler
    /// drops here stay marked in flight and are resubmitted after a reconnect.
    fn drain(&mut self, queue: &mut QueueContext<'_>) -> Result<(), QueueError> {
        let _ = queue;
        Ok(())
    }
}
