//! `isolactl logs NAME [--follow]`: one log of a VM started by `scripts/isola-run`, from its
//! run directory's `logs/` (a daemon's `NAME.log`, `supervisor.log`, `core.log`). With
//! `--json`, each line is `{"log": NAME, "line": TEXT}`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

/// How often `--follow` looks for more.
const POLL: Duration = Duration::from_millis(100);

pub fn print(dir: &Path, name: &str, follow: bool, json: bool) -> anyhow::Result<()> {
    let plausible = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !plausible {
        bail!("'{name}' is not a log name (a daemon's name, supervisor or core)");
    }
    let path = dir.join(format!("{name}.log"));
    let mut file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "no log named '{name}' in {} (there are: {})",
                dir.display(),
                names(dir)
            )
        }
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    let mut out = Out {
        json: json.then(|| (name.to_owned(), Vec::new())),
        stdout: std::io::stdout().lock(),
    };
    let mut offset = copy(&mut file, &mut out)?;
    if !follow {
        return out.finish();
    }
    // Until the file goes (isola-run removes the run directory when the VM ends).
    loop {
        std::thread::sleep(POLL);
        let len = match std::fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(_) => {
                out.finish()?;
                crate::tell!("isolactl: {} is gone: the VM has ended", path.display());
                return Ok(());
            }
        };
        if len < offset {
            // Truncated: start again from its beginning.
            offset = file.seek(SeekFrom::Start(0))?;
        }
        offset += copy(&mut file, &mut out)?;
    }
}

/// Where the log goes: stdout as it is, or (`--json`) a JSON line per log line, a partial
/// line held until its end comes.
struct Out<W: Write> {
    json: Option<(String, Vec<u8>)>,
    stdout: W,
}

impl<W: Write> Out<W> {
    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        let Some((name, partial)) = &mut self.json else {
            return self.stdout.write_all(data);
        };
        partial.extend_from_slice(data);
        while let Some(at) = partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial.drain(..=at).collect();
            let text = String::from_utf8_lossy(&line[..at]);
            let record = serde_json::json!({ "log": name, "line": text });
            writeln!(self.stdout, "{record}")?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stdout.flush()
    }

    /// The last line, if the log does not end with a newline.
    fn finish(&mut self) -> anyhow::Result<()> {
        if let Some((_, partial)) = &self.json {
            if !partial.is_empty() {
                self.write_all(b"\n")
                    .and_then(|()| self.flush())
                    .or_else(quiet)?;
            }
        }
        Ok(())
    }
}

/// A reader that went away (`| head`) ends the program quietly.
fn quiet(e: std::io::Error) -> anyhow::Result<()> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    Err(e).context("cannot write to stdout")
}

/// Copies what `file` holds from its position on; how many bytes. A reader that went away
/// (`| head`) ends the program quietly.
fn copy<W: Write>(file: &mut std::fs::File, out: &mut Out<W>) -> anyhow::Result<u64> {
    let mut buf = [0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).context("cannot read the log")?;
        if n == 0 {
            break;
        }
        if let Err(e) = out.write_all(&buf[..n]).and_then(|()| out.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            return Err(e).context("cannot write to stdout");
        }
        total += n as u64;
    }
    Ok(total)
}

/// The log names in `dir`, for an error message.
fn names(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    name.strip_suffix(".log").map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
