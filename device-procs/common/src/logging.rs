//! Logging of a device process: every line names the process and its pid, then the level and
//! the thread, e.g. `isola-blk[4242]: WARN blk-q0: ...`. `RUST_LOG` sets the filter (default
//! `info`). Lines a guest can trigger go through a [`RateLimiter`].

use std::io::Write;
use std::time::{Duration, Instant};

/// Installs the logger for process `name` (e.g. "isola-blk"). Later calls do nothing.
pub fn init(name: &str) {
    let name = name.to_owned();
    let pid = std::process::id();
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| {
            let thread = std::thread::current();
            writeln!(
                buf,
                "{name}[{pid}]: {} {}: {}",
                record.level(),
                thread.name().unwrap_or("?"),
                record.args()
            )
        })
        .try_init();
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
    fn chain_joins_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("root"));
        assert_eq!(chain(&e), "outer: root");
    }
}
