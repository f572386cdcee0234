//! Reading a VM file: TOML into a [`VmConfig`], every error one line naming the key path and
//! the line it is on.

use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::VmConfig;

/// Largest VM file read (a VM's description is a few hundred bytes).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Why a VM file was refused. Displayed as one line: `FILE:LINE: KEY: why`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FileError {
    #[error("{}: {why}", .path.display())]
    Read { path: PathBuf, why: String },
    /// A value (or a key, or the syntax) at `line` is wrong. `key` is empty where the fault
    /// is not inside a key (a syntax error).
    #[error("{}:{line}: {}{why}", .path.display(), key_prefix(.key))]
    Value {
        path: PathBuf,
        line: usize,
        key: String,
        why: String,
    },
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("{key}: ")
    }
}

/// Reads the VM file at `path`: parsed, each value checked, relative paths made relative to
/// the file's directory, and every file it names checked to exist.
pub fn load(path: &Path) -> Result<VmConfig, FileError> {
    let read_err = |why: String| FileError::Read {
        path: path.to_owned(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| read_err(e.to_string()))?;
    if !meta.is_file() {
        return Err(read_err("not a regular file".into()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(read_err(format!(
            "{} bytes, more than a VM file's {MAX_FILE_BYTES}",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| read_err(e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|_| read_err("not UTF-8 text".into()))?;
    let located = |(line, key, why): Located| FileError::Value {
        path: path.to_owned(),
        line,
        key,
        why,
    };
    let mut vm = parse(&text).map_err(located)?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = std::path::absolute(base).map_err(|e| read_err(e.to_string()))?;
    vm.make_absolute(&base);
    vm.check_files()
        .map_err(|(key, why)| located((line_of_key(&text, &key), key, why)))?;
    Ok(vm)
}

/// (line, key path, why) of a refused value.
pub type Located = (usize, String, String);

/// Parses and checks the text of a VM file (no file system access).
pub fn parse(text: &str) -> Result<VmConfig, Located> {
    let de = toml::Deserializer::parse(text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(text, s.start));
        let why = e.message().trim().replace('\n', "; ");
        (line, String::new(), format!("not TOML: {why}"))
    })?;
    let vm: VmConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = key_path(e.path());
        let inner = e.into_inner();
        let line = match inner.span() {
            Some(span) => line_of(text, span.start),
            None => line_of_key(text, &key),
        };
        (line, key, inner.message().trim().to_owned())
    })?;
    vm.check_consistency()
        .map_err(|(key, why)| (line_of_key(text, &key), key, why))?;
    Ok(vm)
}

impl VmConfig {
    /// Checks between values: the huge page size, VNC without a display.
    pub fn check_consistency(&self) -> Result<(), (String, String)> {
        if let (true, Some(mib)) = (self.hugepages, self.memory_mib) {
            if mib % 2 != 0 {
                return Err((
                    "memory_mib".into(),
                    format!("{mib} MiB is not a multiple of the 2 MiB huge page size"),
                ));
            }
        }
        Ok(())
    }
}

/// `disk[1].engine` from serde_path_to_error's path (which writes `disk[1].engine` too, but
/// `?` for a place it could not name).
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The line of the value at `key` (`disk[1].path`), or of the nearest enclosing value the
/// document has; line 1 when the text does not parse.
pub fn line_of_key(text: &str, key: &str) -> usize {
    let Ok(root) = DeTable::parse(text) else {
        return 1;
    };
    let mut best = root.span().start;
    let mut table: Option<&DeTable<'_>> = Some(root.get_ref());
    let mut value: Option<&Spanned<DeValue<'_>>>;
    for part in key.split('.') {
        let (name, indexes) = match part.split_once('[') {
            Some((name, rest)) => (name, Some(rest)),
            None => (part, None),
        };
        let Some(found) = table.and_then(|t| t.get(name)) else {
            break;
        };
        best = found.span().start;
        value = Some(found);
        for index in indexes
            .into_iter()
            .flat_map(|rest| rest.split('['))
            .filter_map(|i| i.trim_end_matches(']').parse::<usize>().ok())
        {
            let item = match value.map(|v| v.get_ref()) {
                Some(DeValue::Array(items)) => items.get(index),
                _ => None,
            };
            let Some(item) = item else { break };
            best = item.span().start;
            value = Some(item);
        }
        table = match value.map(|v| v.get_ref()) {
            Some(DeValue::Table(t)) => Some(t),
            _ => None,
        };
    }
    line_of(text, best)
}
