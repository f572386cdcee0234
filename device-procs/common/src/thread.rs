//! Threads of a device process, all spawned through one helper so that every thread has a
//! name (shown in logs, `top -H` and core dumps).

use std::thread::JoinHandle;

/// Linux keeps at most 15 bytes of a thread's name.
const MAX_NAME: usize = 15;

/// Spawns `f` on a thread named `name` (cut to 15 bytes).
pub fn spawn_named<F, T>(name: &str, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let mut end = name.len().min(MAX_NAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    std::thread::Builder::new()
        .name(name[..end].to_owned())
        .spawn(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kept_and_cut() {
        let h = spawn_named("blk-q0", || {
            std::thread::current().name().map(str::to_owned)
        })
        .unwrap();
        assert_eq!(h.join().unwrap().as_deref(), Some("blk-q0"));
        let h = spawn_named("a-very-long-thread-name", || {
            std::thread::current().name().map(str::to_owned)
        })
        .unwrap();
        assert_eq!(h.join().unwrap().as_deref(), Some("a-very-long-thr"));
    }
}
