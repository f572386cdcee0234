//! `isolactl notify VAR=VALUE...`: one sd_notify(3) datagram to `$NOTIFY_SOCKET`, which is
//! how `scripts/isola-run` tells systemd (Type=notify) that the VM runs. The protocol: the
//! assignments, newline-separated, in one datagram to the Unix socket named by the variable
//! (a path, or `@name` for the abstract namespace).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use anyhow::{bail, Context};

pub fn send(assignments: &[String]) -> anyhow::Result<()> {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        bail!("NOTIFY_SOCKET is not set (not started by systemd with Type=notify?)");
    };
    for a in assignments {
        if !a.contains('=') || a.contains('\n') {
            bail!("'{a}' is not one VAR=VALUE line");
        }
    }
    let target = target
        .into_string()
        .map_err(|_| anyhow::anyhow!("NOTIFY_SOCKET is not UTF-8"))?;
    let addr = match target.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None if target.starts_with('/') => SocketAddr::from_pathname(&target),
        None => bail!("NOTIFY_SOCKET '{target}' is neither a path nor @abstract"),
    }
    .with_context(|| format!("NOTIFY_SOCKET '{target}'"))?;
    let socket = UnixDatagram::unbound().context("cannot create a datagram socket")?;
    let message = assignments.join("\n");
    socket
        .send_to_addr(message.as_bytes(), &addr)
        .with_context(|| format!("cannot send to NOTIFY_SOCKET '{target}'"))?;
    Ok(())
}
