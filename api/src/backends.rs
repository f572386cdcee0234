//! The API process's clients of the VM's internal sockets: the core's control socket, the
//! supervisor's, isola-display's and isola-input's. Each call is one request and one answer
//! on a fresh connection, framed by `isola_ipc`, within [`CALL_TIMEOUT`]: a peer that hangs
//! costs the API request that needed it one error, never the API process.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

/// Deadline of one internal call, waiting for a slot and connect included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Calls in flight to one peer at once; more wait for a slot. The core serves at most 16
/// control clients (isolactl's included) and closes the connections beyond, so however many
/// API clients come at once, the API process never crowds it.
const SLOTS_PER_PEER: usize = 4;

static CORE_SLOTS: Semaphore = Semaphore::const_new(SLOTS_PER_PEER);
static SUPERVISOR_SLOTS: Semaphore = Semaphore::const_new(SLOTS_PER_PEER);
static DISPLAY_SLOTS: Semaphore = Semaphore::const_new(SLOTS_PER_PEER);
static INPUT_SLOTS: Semaphore = Semaphore::const_new(SLOTS_PER_PEER);
static OTHER_SLOTS: Semaphore = Semaphore::const_new(SLOTS_PER_PEER);

fn slots(who: &str) -> &'static Semaphore {
    match who {
        "isola-core" => &CORE_SLOTS,
        "isola-supervisor" => &SUPERVISOR_SLOTS,
        "isola-display" => &DISPLAY_SLOTS,
        "isola-input" => &INPUT_SLOTS,
        _ => &OTHER_SLOTS,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{who} is not there ({path}): {source}")]
    Absent {
        who: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{who} did not answer within {CALL_TIMEOUT:?}")]
    Timeout { who: &'static str },
    #[error("{who}: connection failed")]
    Io {
        who: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{who} answered {what}")]
    Unexpected {
        who: &'static str,
        what: &'static str,
    },
    #[error("{who} sent a bad answer")]
    Ipc {
        who: &'static str,
        #[source]
        source: isola_ipc::IpcError,
    },
}

impl BackendError {
    /// The peer's socket is not there (no such daemon in this VM, or it ended).
    pub fn is_absent(&self) -> bool {
        matches!(self, BackendError::Absent { .. })
    }
}

/// The sockets of one VM's run directory.
#[derive(Debug, Clone)]
pub struct Sockets {
    pub core: PathBuf,
    pub supervisor: PathBuf,
    pub display: PathBuf,
    pub input: PathBuf,
    /// The VM file `isola-run` wrote for this VM (`DIR/vm.toml`), served as `/vm/config`.
    pub vm_file: PathBuf,
}

impl Sockets {
    pub fn in_dir(dir: &Path) -> Sockets {
        Sockets {
            core: dir.join("control.sock"),
            supervisor: dir.join("supervisor.sock"),
            display: dir.join("display-control.sock"),
            input: dir.join("input-control.sock"),
            vm_file: dir.join("vm.toml"),
        }
    }
}

/// One request and its answer on a fresh connection to `path`.
pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
    who: &'static str,
    path: &Path,
    request: &Req,
) -> Result<Resp, BackendError> {
    call_with_pid(who, path, request).await.map(|(r, _)| r)
}

/// A request whose answer takes up to `limit` by design (a graceful shutdown is answered when
/// the VM ends). It takes no slot, so it cannot hold up the short calls for that long; the
/// peer counts it among its clients like any other.
pub async fn call_long<Req: Serialize, Resp: DeserializeOwned>(
    who: &'static str,
    path: &Path,
    request: &Req,
    limit: Duration,
) -> Result<Resp, BackendError> {
    match tokio::time::timeout(limit, exchange(who, path, request)).await {
        Ok(result) => result.map(|(r, _)| r),
        Err(_) => Err(BackendError::Timeout { who }),
    }
}

/// [`call`], also returning the answering process's pid (`SO_PEERCRED`).
pub async fn call_with_pid<Req: Serialize, Resp: DeserializeOwned>(
    who: &'static str,
    path: &Path,
    request: &Req,
) -> Result<(Resp, Option<u32>), BackendError> {
    let call = async {
        let _slot = slots(who)
            .acquire()
            .await
            .map_err(|_| BackendError::Timeout { who })?;
        exchange(who, path, request).await
    };
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(result) => result,
        Err(_) => Err(BackendError::Timeout { who }),
    }
}

async fn exchange<Req: Serialize, Resp: DeserializeOwned>(
    who: &'static str,
    path: &Path,
    request: &Req,
) -> Result<(Resp, Option<u32>), BackendError> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| BackendError::Absent {
            who,
            path: path.display().to_string(),
            source,
        })?;
    let pid = stream
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .and_then(|p| u32::try_from(p).ok());
    let mut frame = Vec::new();
    isola_ipc::write_message(&mut frame, request)
        .map_err(|source| BackendError::Ipc { who, source })?;
    let io = |source| BackendError::Io { who, source };
    stream.write_all(&frame).await.map_err(io)?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.map_err(io)?;
    let body_len = u32::from_le_bytes(len);
    if body_len > isola_ipc::MAX_FRAME {
        return Err(BackendError::Ipc {
            who,
            source: isola_ipc::IpcError::FrameSize(body_len),
        });
    }
    let mut whole = len.to_vec();
    whole.resize(4 + body_len as usize, 0);
    stream.read_exact(&mut whole[4..]).await.map_err(io)?;
    let answer = isola_ipc::read_message(&mut Cursor::new(whole))
        .map_err(|source| BackendError::Ipc { who, source })?;
    Ok((answer, pid))
}
