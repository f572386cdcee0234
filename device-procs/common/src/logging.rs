//! Logging of a device process: every line names the process and its pid, the level, the
//! device and the thread, e.g. `isola-blk[4242]: WARN blk0/blk-q0: ...`. The device is the name
//! the supervisor runs the daemon under (its `ISOLA_DEVICE` environment variable), or the
//! process's name without `isola-` when started by hand. The filter is `--log-level` if given,
//! else `RUST_LOG`, else `info` (env_logger's syntax: `debug`, `warn,isola_blk=trace`). Lines a
//! guest can trigger go through a [`RateLimiter`].

use std::io::Write;
use std::time::{Duration, Instant};

/// The environment variable naming the device a process serves (set by `isola-supervisor` to
/// the daemon's name).
pub const DEVICE_ENV: &str = "ISOLA_DEVICE";

/// Installs the logger for process `name` (e.g. "isola-blk") with the `RUST_LOG` filter.
/// Later calls do nothing.
pub fn init(name: &str) {
    init_with_level(name, None);
}

/// [`init`], with `level` (a `--log-level` value) in place of `RUST_LOG` when given.
pub fn init_with_level(name: &str, level: Option<&str>) {
    let name = name.to_owned();
    let device = device_name(&name, std::env::var(DEVICE_ENV).ok().as_deref());
    let pid = std::process::id();
    let mut builder = match level {
        Some(level) => {
            let mut builder = env_logger::Builder::new();
            builder.parse_filters(level);
            builder
        }
        None => env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")),
    };
    let _ = builder
        .format(move |buf, record| {
            let thread = std::thread::current();
            writeln!(
                buf,
                "{name}[{pid}]: {} {device}/{}: {}",
                record.level(),
                thread.name().unwrap_or("?"),
                record.args()
            )
        })
        .try_init();
}

/// The device a process's lines name: `given` (from [`DEVICE_ENV`]) if it is a plausible name
/// (1-32 letters, digits, `-`, `_`), else the process name without `isola-`.
fn device_name(process: &str, given: Option<&str>) -> String {
    let plausible = |n: &str| {
        (1..=32).contains(&n.len())
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    match given {
        Some(name) if plausible(name) => name.to_owned(),
        _ => process.strip_prefix("isola-").unwrap_or(process).to_owned(),
    }
}

/// An error and its causes on one line: "outer: inner: root".
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// Lets through at most `burst` lines per second.
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    window: Instant,
    used: u32,
    dropped: u64,
}

impl RateLimiter {
    pub fn new(burst: u32) -> Self {
        RateLimiter {
            burst,
            window: Instant::now(),
            used: 0,
            dropped: 0,
        }
    }

    /// `Some(n)` if a line may be written now, `n` being how many were dropped since the last
    /// line that was let through; `None` if this one must be dropped.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.used = 0;
        }
        if self.used >= self.burst {
            self.dropped += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_drops_bursts_and_counts_them() {
        let mut limiter = RateLimiter::new(2);
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(limiter.allow(), Some(0));
        assert_eq!(limiter.allow(), None);
        assert_eq!(limiter.allow(), None);
        limiter.window -= Duration::from_secs(2);
        assert_eq!(limiter.allow(), Some(2));
    }

    #[test]
    fn lines_name_the_device_given_or_the_process() {
        assert_eq!(device_name("isola-blk", Some("blk1")), "blk1");
        assert_eq!(device_name("isola-blk", None), "blk");
        assert_eq!(device_name("isola-blk", Some("bad/name")), "blk");
        assert_eq!(device_name("echo-test", Some("")), "echo-test");
    }

    #[test]
    fn chain_joins_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("root"));
        assert_eq!(chain(&e), "outer: root");
    }
}
