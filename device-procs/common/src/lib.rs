//! What every Isola device process shares.
//!
//! - [`server`]: the vhost-user backend server, one frontend connection at a time, with
//!   reconnect; its request handler implements the whole backend side of the protocol
//!   (including `GET_INFLIGHT_FD`/`SET_INFLIGHT_FD`) on the `vhost` crate's message layer.
//! - [`device`]: the trait a device implements; blk, net, gpu, input and console differ
//!   only there.
//! - [`queue`], [`chain`]: what a device sees of a running queue and of one request.
//! - [`inflight`]: in-flight I/O tracking, so a restarted backend resubmits what a dead one
//!   had taken but not finished.
//! - [`cli`], [`logging`], [`thread`]: `--socket`/`--fd`, log lines that name the process,
//!   named threads.
//! - [`sandbox`]: namespaces, empty root, no capabilities, limits and a seccomp allowlist,
//!   entered by every device process before it serves.

pub mod chain;
pub mod cli;
pub mod device;
mod handler;
pub mod inflight;
pub mod logging;
pub mod memory;
pub mod queue;
pub mod sandbox;
pub mod server;
pub mod stop;
pub mod thread;
mod worker;

#[cfg(any(test, feature = "test-support"))]
pub mod testing;

pub use chain::{DescriptorChain, Segment};
pub use device::{DeviceError, Progress, QueueHandler, VirtioDevice};
pub use handler::{is_eventfd, offered_protocol_features, HandlerError};
pub use memory::Memory;
pub use queue::{QueueContext, QueueError};
pub use server::{serve, serve_connection, serve_until, Ending, ServeError};
pub use worker::WorkerError;
