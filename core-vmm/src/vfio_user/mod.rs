//! The vfio-user frontend's protocol side: the wire format ([`wire`]) and one session as
//! the core's client ([`client`]). The PCI function in front of it is
//! [`crate::pci::vfio_user_pci`], its backend thread [`crate::pci::vfio_backend`].
//!
//! Written here rather than taken from the `vfio_user` crate's `Client`: that client has no
//! way to bound an exchange (it connects and negotiates inside its constructor, on a socket
//! it never exposes), trusts reply sizes (a hostile `message_size` underflows or allocates
//! gigabytes), never checks message ids, command numbers or the error bit (an error reply
//! leaves the stream out of step), has no GET_REGION_IO_FDS, and reads the RESET flag
//! inverted. Its `Server` is what the tests drive this frontend against.

pub mod client;
pub mod wire;

use std::path::PathBuf;

/// One `--device vfio-user,socket=PATH[,ioeventfds=on]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioUserSpec {
    pub socket: PathBuf,
    /// Ask the server for doorbell ioeventfds (GET_REGION_IO_FDS). Off by default: the
    /// command is optional, and a server that does not implement it may not skip its body
    /// (the `vfio_user` crate's server, 0.1.7, then reads that body as the next message and
    /// the session falls out of step).
    pub ioeventfds: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VfioUserSpecError {
    #[error("device 'vfio-user' needs socket=PATH")]
    NoSocket,
    #[error("bad option '{0}' in --device vfio-user (expected socket=PATH or ioeventfds=on|off)")]
    BadOption(String),
}

impl VfioUserSpec {
    /// Parses what follows `vfio-user,` in `--device`.
    pub fn parse(options: &str) -> Result<Self, VfioUserSpecError> {
        let (mut socket, mut ioeventfds) = (None, false);
        for part in options.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("socket", path)) if !path.is_empty() => socket = Some(PathBuf::from(path)),
                Some(("ioeventfds", "on")) => ioeventfds = true,
                Some(("ioeventfds", "off")) => ioeventfds = false,
                _ => return Err(VfioUserSpecError::BadOption(part.to_owned())),
            }
        }
        Ok(VfioUserSpec {
            socket: socket.ok_or(VfioUserSpecError::NoSocket)?,
            ioeventfds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_refuse_nonsense() {
        assert_eq!(
            VfioUserSpec::parse("socket=/run/usb.sock"),
            Ok(VfioUserSpec {
                socket: "/run/usb.sock".into(),
                ioeventfds: false,
            })
        );
        assert!(
            VfioUserSpec::parse("ioeventfds=on,socket=/s")
                .unwrap()
                .ioeventfds
        );
        assert_eq!(
            VfioUserSpec::parse("socket=/s,ioeventfds=maybe"),
            Err(VfioUserSpecError::BadOption("ioeventfds=maybe".into()))
        );
        assert_eq!(VfioUserSpec::parse(""), Err(VfioUserSpecError::NoSocket));
        assert_eq!(
            VfioUserSpec::parse("socket=/s,queues=2"),
            Err(VfioUserSpecError::BadOption("queues=2".into()))
        );
        assert_eq!(
            VfioUserSpec::parse("socket="),
            Err(VfioUserSpecError::BadOption("socket=".into()))
        );
    }
}
