//! A small HTTP/1.1 client for the VM's API socket (`DIR/api.sock`, served by isola-api):
//! one request per connection (`Connection: close`), the answer read within `--timeout`
//! (`Content-Length`, chunked, or up to the close), or, for `GET /events`, its lines handed
//! on as they come until the server ends the stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use anyhow::{bail, Context};

/// Bound on an answer's head, and on a whole answer but a stream (a PNG screenshot is the
/// largest).
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 64 * 1024 * 1024;

pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as JSON, or the API's `{"error": ...}` as an error for a status >= 400.
    pub fn json(self, what: &str) -> anyhow::Result<serde_json::Value> {
        let value: Result<serde_json::Value, _> = serde_json::from_slice(&self.body);
        if self.status >= 400 {
            let text = value
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned());
            bail!("{what}: {text} (HTTP {})", self.status);
        }
        value.with_context(|| format!("{what}: the API's answer is not JSON"))
    }
}

/// The framing of an answer's body.
enum Framing {
    Length(usize),
    Chunked,
    Close,
}

fn send(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<(BufReader<std::os::unix::net::UnixStream>, u16, Framing)> {
    let mut stream = crate::connect(socket, "isola-api")?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if !body.is_empty() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()))
        .with_context(|| format!("cannot send {method} {path} to isola-api"))?;
    let mut reader = BufReader::new(stream);
    let (status, framing) = read_head(&mut reader)
        .map_err(|e| timed_out(e, socket))
        .with_context(|| format!("{method} {path}"))?;
    Ok((reader, status, framing))
}

/// An I/O error that is a deadline, said so.
fn timed_out(e: anyhow::Error, socket: &Path) -> anyhow::Error {
    let late = e.downcast_ref::<std::io::Error>().is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    });
    if late {
        anyhow::anyhow!(
            "isola-api did not answer on {} within {:?}",
            socket.display(),
            crate::timeout()
        )
    } else {
        e
    }
}

fn read_line(reader: &mut impl BufRead, budget: &mut usize) -> anyhow::Result<String> {
    let mut line = Vec::new();
    reader
        .take(*budget as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if line.len() > *budget {
        bail!("the API's answer head is over {MAX_HEAD} bytes");
    }
    *budget -= line.len();
    if !line.ends_with(b"\n") {
        bail!("the API closed the connection in an answer's head");
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}

fn read_head(reader: &mut impl BufRead) -> anyhow::Result<(u16, Framing)> {
    let mut budget = MAX_HEAD;
    let status_line = read_line(reader, &mut budget)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .with_context(|| format!("not an HTTP answer: {status_line:?}"))?;
    let mut framing = Framing::Close;
    loop {
        let line = read_line(reader, &mut budget)?;
        if line.is_empty() {
            return Ok((status, framing));
        }
        let Some((name, value)) = line.split_once(':') else {
            bail!("bad header line in the API's answer: {line:?}");
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            framing = Framing::Length(value.parse().context("bad Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.eq_ignore_ascii_case("chunked")
        {
            framing = Framing::Chunked;
        }
    }
}

/// The body's next piece: `None` at its end.
fn next_piece(reader: &mut impl BufRead, framing: &mut Framing) -> anyhow::Result<Option<Vec<u8>>> {
    match framing {
        Framing::Length(0) => Ok(None),
        Framing::Length(n) => {
            let want = (*n).min(64 * 1024);
            let mut buf = vec![0; want];
            reader.read_exact(&mut buf)?;
            *n -= want;
            Ok(Some(buf))
        }
        Framing::Chunked => {
            let mut budget = MAX_HEAD;
            let size_line = read_line(reader, &mut budget)?;
            let hex = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(hex, 16)
                .with_context(|| format!("bad chunk size {size_line:?}"))?;
            if size > MAX_BODY {
                bail!("a chunk of {size} bytes is over the bound");
            }
            if size == 0 {
                return Ok(None);
            }
            let mut buf = vec![0; size];
            reader.read_exact(&mut buf)?;
            let mut crlf = [0; 2];
            reader.read_exact(&mut crlf)?;
            Ok(Some(buf))
        }
        Framing::Close => {
            let mut buf = vec![0; 64 * 1024];
            let n = reader.read(&mut buf)?;
            buf.truncate(n);
            Ok((n > 0).then_some(buf))
        }
    }
}

/// One request and its whole answer, within the timeout.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<Answer> {
    let (mut reader, status, mut framing) = send(socket, method, path, body)?;
    let mut all = Vec::new();
    while let Some(piece) = next_piece(&mut reader, &mut framing)
        .map_err(|e| timed_out(e, socket))
        .with_context(|| format!("{method} {path}: the answer's body"))?
    {
        all.extend_from_slice(&piece);
        if all.len() > MAX_BODY {
            bail!("{method} {path}: the answer is over {MAX_BODY} bytes");
        }
    }
    Ok(Answer { status, body: all })
}

/// `GET path` as a stream: each complete line of the body goes to `line`, until the server
/// ends it. The answer's head must come within the timeout; the stream itself may be quiet
/// for as long as nothing happens (it ends when the VM does).
pub fn follow_lines(
    socket: &Path,
    path: &str,
    mut line: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let (mut reader, status, mut framing) = send(socket, "GET", path, None)?;
    if status >= 400 {
        let mut body = Vec::new();
        while let Some(piece) = next_piece(&mut reader, &mut framing)? {
            body.extend_from_slice(&piece);
        }
        Answer { status, body }.json(&format!("GET {path}"))?;
        bail!("GET {path}: HTTP {status}");
    }
    reader.get_ref().set_read_timeout(None)?;
    let mut pending = Vec::new();
    while let Some(piece) =
        next_piece(&mut reader, &mut framing).with_context(|| format!("GET {path}: the stream"))?
    {
        pending.extend_from_slice(&piece);
        while let Some(at) = pending.iter().position(|&b| b == b'\n') {
            let text: Vec<u8> = pending.drain(..=at).collect();
            line(String::from_utf8_lossy(&text).trim_end())?;
        }
        if pending.len() > MAX_HEAD {
            bail!("GET {path}: a line over {MAX_HEAD} bytes");
        }
    }
    Ok(())
}
