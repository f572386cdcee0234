//! Listening Unix sockets for every Isola process: the core's control socket, the device
//! processes' sockets and the supervisor's.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on {}", .path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("another process is already listening on {}", .0.display())]
    InUse(PathBuf),
}

/// Binds `path`, replacing a socket file nobody listens on any more (left by a crash).
///
/// The path appears only once the socket listens: bind and listen are two system calls, and
/// a client that connects the moment the file exists (a test, the core) would otherwise be
/// refused. So the socket is bound under a temporary name beside `path`, and moved into place
/// with a rename that never replaces a file that appeared meanwhile.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let bind_err = |source| BindError::Bind {
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        bind_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}.binding", std::process::id()));
    let temp = path.with_file_name(temp_name);
    let _ = std::fs::remove_file(&temp);
    let listener = UnixListener::bind(&temp).map_err(bind_err)?;
    let placed = loop {
        match rename_noreplace(&temp, path) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                let stale = match std::fs::symlink_metadata(path) {
                    Ok(meta) if !meta.file_type().is_socket() => {
                        break Err(BindError::NotASocket(path.to_owned()))
                    }
                    Ok(_) => !still_listening(path),
                    Err(_) => true, // gone meanwhile: try again
                };
                if !stale {
                    break Err(BindError::InUse(path.to_owned()));
                }
                if let Err(e) = std::fs::remove_file(path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        break Err(bind_err(e));
                    }
                }
            }
            other => break other.map_err(bind_err),
        }
    };
    if placed.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    placed.map(|()| listener)
}

/// rename(2) that fails with EEXIST instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether a process still accepts connections on `path`. A sandboxed device process that
/// was just stopped through its reaper may hold its listener for a few more milliseconds
/// after the reaper is gone, so a listener must answer for a while to count as live.
fn still_listening(path: &Path) -> bool {
    for _ in 0..20 {
        if UnixStream::connect(path).is_err() {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    true
}
