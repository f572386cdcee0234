//! Messages to `isola-display`'s control socket (`isolactl screenshot`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DisplayRequest {
    /// The current picture of a scanout, as a PNG file's bytes.
    Screenshot { scanout: u32 },
    /// What the display knows: scanouts, sizes, connected VNC clients.
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DisplayResponse {
    Screenshot {
        width: u32,
        height: u32,
        png: Vec<u8>,
    },
    Status(DisplayStatus),
    /// The request was refused; the text says why.
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisplayStatus {
    /// (width, height) of each scanout the GPU has set, `None` where it is disabled.
    pub scanouts: Vec<Option<(u32, u32)>>,
    /// Whether a GPU backend is connected on the display protocol.
    pub gpu_connected: bool,
    pub vnc_clients: u32,
    /// Update messages received from the GPU so far.
    pub updates: u64,
}
