//! The `--log-level` value every Isola process takes (the core, `isola-supervisor`, each
//! device process): env_logger's filter syntax, checked before logging starts so that a typo is
//! a one-line error instead of a filter silently ignored.

/// Whether `filter` is a list of `LEVEL`, `MODULE` or `MODULE=LEVEL` directives, LEVEL being
/// off, error, warn, info, debug or trace (any case).
pub fn valid(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let level_ok = |l: &str| LEVELS.contains(&l.to_ascii_lowercase().as_str());
    let module_ok = |m: &str| {
        !m.is_empty()
            && m.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':' || b == b'-')
    };
    !filter.is_empty()
        && filter
            .split(',')
            .all(|directive| match directive.split_once('=') {
                Some((module, level)) => module_ok(module) && level_ok(level),
                None => level_ok(directive) || module_ok(directive),
            })
}

#[cfg(test)]
mod tests {
    #[test]
    fn filters_are_checked() {
        for good in ["info", "DEBUG", "warn,isola_blk=trace", "isola_blk", "off"] {
            assert!(super::valid(good), "{good}");
        }
        for bad in ["", "info,", "a=b=c", "x=loud", "a b", "=info"] {
            assert!(!super::valid(bad), "{bad}");
        }
    }
}
