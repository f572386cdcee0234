//! When a queue's reads go to the kernel polling thread (SQPOLL) and when they stay on the
//! queue's own thread, decided by measuring both.
//!
//! On a host with a CPU to spare, a polling thread takes the page-cache copies off the queue's
//! thread and random reads at depth 32 run about 1.9x faster (`benches/blk.rs`); on a host
//! whose CPUs are all busy the same thread competes with the guest and the queue's own
//! thread and runs at 0.4x. Which host this is changes from minute to minute, so neither can
//! be the default. The chooser runs the queue in one mode (its "home") in epochs of
//! [`EPOCH`], and now and then runs [`PROBE_LEN`] epochs in the other mode: a probe, judged
//! by its last epoch. It moves home to polling only when that completed clearly more
//! requests per second than the home epoch before the probe ([`GAIN`]), and back to the
//! queue's thread as soon as that does about as well ([`KEEP`]), so a CPU is spent on polling
//! only for a measured gain. A queue that is not busy (its thread mostly asleep, or few
//! requests) is never probed from its own thread: polling cannot make it faster. Probes that
//! change nothing come less and less often (up to every [`MAX_PROBE_EVERY`] epochs), so a
//! host that stays busy pays about 3 epochs in 256; two home epochs well under the best
//! since the last decision ([`FALL`]) bring the next probe forward.

use std::time::{Duration, Instant};

use nix::time::ClockId;

/// How long each mode runs before its rate is taken.
pub const EPOCH: Duration = Duration::from_millis(10);
/// Polling becomes home when a probe runs this much faster than the epoch before it.
pub const GAIN: f64 = 1.15;
/// The queue's thread becomes home again when a probe of it runs at least this fraction of
/// the polling epoch before it.
pub const KEEP: f64 = 0.9;
/// Epochs a probe lasts; it is judged by its last, once the other mode has settled (the
/// polling thread woken, the queue thread's own poll window adapted).
pub const PROBE_LEN: u32 = 3;
/// Two home epochs in a row whose rate falls below this fraction of the best since the last
/// decision bring the next probe forward (the other CPU got busy, or the threads moved).
pub const FALL: f64 = 0.75;
/// Epochs between probes at first, and after every change of home.
pub const PROBE_EVERY: u32 = 8;
/// Most epochs between probes (doubling after each probe that did not change home).
pub const MAX_PROBE_EVERY: u32 = 256;
/// A queue is busy enough to probe when its thread ran at least this fraction of the epoch...
pub const BUSY_CPU: f64 = 0.5;
/// ...and completed at least this many requests per second.
pub const BUSY_RATE: f64 = 20_000.0;

/// What one epoch measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Epoch {
    /// Requests completed per second.
    pub rate: f64,
    /// The queue thread's CPU time over the epoch's wall time.
    pub cpu: f64,
}

/// Where the next submissions go.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Submitted from the queue's thread; page-cache reads are copied inside the submission.
    #[default]
    Inline,
    /// Handed to the kernel polling thread.
    Polled,
}

impl Mode {
    fn other(self) -> Mode {
        match self {
            Mode::Inline => Mode::Polled,
            Mode::Polled => Mode::Inline,
        }
    }
}

/// The decision, from epochs' measurements alone (no clock: see [`Chooser`]).
#[derive(Debug, Clone)]
pub struct Decider {
    home: Mode,
    /// The mode of the epoch under way.
    current: Mode,
    /// The probe under way: the home epoch before it, and its epochs so far.
    probe: Option<(Epoch, u32)>,
    /// Home epochs since the last probe (or since the last time one was due).
    epochs: u32,
    probe_every: u32,
    /// The best home rate since the last decision: a fall well below it brings a probe
    /// forward.
    reference: Option<f64>,
    /// The last home epoch was under [`FALL`] of `reference`.
    low: bool,
}

impl Default for Decider {
    fn default() -> Self {
        Decider {
            home: Mode::Inline,
            current: Mode::Inline,
            probe: None,
            epochs: 0,
            probe_every: PROBE_EVERY,
            reference: None,
            low: false,
        }
    }
}

impl Decider {
    pub fn mode(&self) -> Mode {
        self.current
    }

    pub fn home(&self) -> Mode {
        self.home
    }

    /// The epoch in the current mode ended with `epoch`: the mode of the next one.
    pub fn epoch_ended(&mut self, epoch: Epoch) -> Mode {
        if let Some((before, done)) = self.probe {
            if done + 1 < PROBE_LEN {
                self.probe = Some((before, done + 1));
                return self.current;
            }
            self.probe = None;
            let probed = self.current;
            let moves = match probed {
                Mode::Polled => epoch.rate > before.rate * GAIN,
                Mode::Inline => epoch.rate >= before.rate * KEEP,
            };
            if moves {
                self.home = probed;
                self.probe_every = PROBE_EVERY;
            } else {
                self.probe_every = (self.probe_every * 2).min(MAX_PROBE_EVERY);
            }
            self.epochs = 0;
            self.reference = None;
            self.low = false;
            self.current = self.home;
            return self.current;
        }
        self.epochs += 1;
        let reference = self.reference.map_or(epoch.rate, |r| r.max(epoch.rate));
        let low = epoch.rate < reference * FALL;
        // Two low epochs in a row: one is a hiccup (the polling thread is scheduled out for
        // a few milliseconds now and then).
        let fell = low && self.low;
        self.low = low && !fell;
        self.reference = Some(if fell { epoch.rate } else { reference });
        let due = self.epochs >= self.probe_every || fell;
        let busy = epoch.cpu >= BUSY_CPU && epoch.rate >= BUSY_RATE;
        // Polling is always worth questioning; the queue's thread only when it is busy.
        if due && (self.home == Mode::Polled || busy) {
            self.probe = Some((epoch, 0));
            self.current = self.home.other();
        } else if due {
            self.epochs = 0;
        }
        self.current
    }
}

/// A [`Decider`] fed from the clock: completions counted as they are reaped, the epoch closed
/// at the first call after [`EPOCH`] has passed.
#[derive(Debug)]
pub struct Chooser {
    decider: Decider,
    started: Instant,
    cpu_at_start: Duration,
    completed: u64,
    /// Test hook: the other mode at every call, to exercise both rings at once.
    #[cfg(test)]
    alternate: bool,
}

impl Default for Chooser {
    fn default() -> Self {
        Chooser::new()
    }
}

impl Chooser {
    pub fn new() -> Self {
        Chooser {
            decider: Decider::default(),
            started: Instant::now(),
            cpu_at_start: thread_cpu(),
            completed: 0,
            #[cfg(test)]
            alternate: false,
        }
    }

    /// Test hook: a chooser that switches mode at every call.
    #[cfg(test)]
    pub fn alternating() -> Self {
        Chooser {
            alternate: true,
            ..Chooser::new()
        }
    }

    /// `n` more requests completed.
    pub fn completed(&mut self, n: usize) {
        self.completed += n as u64;
    }

    /// The mode for the next submissions.
    pub fn mode(&mut self) -> Mode {
        #[cfg(test)]
        if self.alternate {
            self.decider.current = self.decider.current.other();
            return self.decider.current;
        }
        let elapsed = self.started.elapsed();
        if elapsed < EPOCH {
            return self.decider.mode();
        }
        let cpu = thread_cpu();
        let secs = elapsed.as_secs_f64();
        let epoch = Epoch {
            rate: self.completed as f64 / secs,
            cpu: cpu.saturating_sub(self.cpu_at_start).as_secs_f64() / secs,
        };
        self.started = Instant::now();
        self.cpu_at_start = cpu;
        self.completed = 0;
        let mode = self.decider.epoch_ended(epoch);
        log::debug!(
            "{epoch:?}: next epoch {mode:?} (home {:?})",
            self.decider.home()
        );
        mode
    }
}

/// CPU time of the calling thread (zero if the clock cannot be read).
fn thread_cpu() -> Duration {
    ClockId::CLOCK_THREAD_CPUTIME_ID
        .now()
        .map_or(Duration::ZERO, Duration::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUSY: f64 = 1.0;

    fn epoch(rate: f64, cpu: f64) -> Epoch {
        Epoch { rate, cpu }
    }

    /// Runs `d` through home epochs at `home_rate` until it probes, then through the probe's
    /// epochs at `probe_rate`. Returns the mode after the probe.
    fn probe(d: &mut Decider, home_rate: f64, cpu: f64, probe_rate: f64) -> Mode {
        let home = d.home();
        for _ in 0..=MAX_PROBE_EVERY {
            if d.epoch_ended(epoch(home_rate, cpu)) != home {
                for _ in 1..PROBE_LEN {
                    assert_eq!(d.epoch_ended(epoch(probe_rate, cpu)), home.other());
                }
                return d.epoch_ended(epoch(probe_rate, cpu));
            }
        }
        panic!("no probe in {MAX_PROBE_EVERY} epochs");
    }

    #[test]
    fn polling_becomes_home_only_for_a_clear_gain_and_is_left_when_it_gives_none() {
        let mut d = Decider::default();
        assert_eq!(d.mode(), Mode::Inline);
        // Probed after PROBE_EVERY busy epochs, for PROBE_LEN epochs.
        for _ in 1..PROBE_EVERY {
            assert_eq!(d.epoch_ended(epoch(1e6, BUSY)), Mode::Inline);
        }
        assert_eq!(d.epoch_ended(epoch(1e6, BUSY)), Mode::Polled);
        for _ in 1..PROBE_LEN {
            assert_eq!(d.epoch_ended(epoch(0.1e6, BUSY)), Mode::Polled);
        }
        // Only the last epoch counts; 10% faster is not enough.
        assert_eq!(d.epoch_ended(epoch(1.1e6, BUSY)), Mode::Inline);
        assert_eq!(d.home(), Mode::Inline);
        // 1.9x is.
        assert_eq!(probe(&mut d, 1e6, BUSY, 1.9e6), Mode::Polled);
        assert_eq!(d.home(), Mode::Polled);
        // While polling keeps its gain, it stays home.
        assert_eq!(probe(&mut d, 1.9e6, BUSY, 1.0e6), Mode::Polled);
        // The load went away: the queue's thread does about as well, and is cheaper.
        assert_eq!(probe(&mut d, 1.0e6, BUSY, 0.95e6), Mode::Inline);
        assert_eq!(d.home(), Mode::Inline);
    }

    #[test]
    fn a_fall_in_the_home_rate_brings_the_probe_forward() {
        let mut d = Decider::default();
        assert_eq!(probe(&mut d, 1e6, BUSY, 1.9e6), Mode::Polled);
        for _ in 0..3 {
            assert_eq!(d.epoch_ended(epoch(1.9e6, BUSY)), Mode::Polled);
        }
        // One slow epoch is a hiccup.
        assert_eq!(d.epoch_ended(epoch(1.2e6, BUSY)), Mode::Polled);
        assert_eq!(d.epoch_ended(epoch(1.9e6, BUSY)), Mode::Polled);
        // The other CPU got busy: polling now runs at a quarter of that. Probed after the
        // second such epoch, and the queue's own thread does better.
        assert_eq!(d.epoch_ended(epoch(0.45e6, BUSY)), Mode::Polled);
        assert_eq!(d.epoch_ended(epoch(0.45e6, BUSY)), Mode::Inline);
        for _ in 1..PROBE_LEN {
            assert_eq!(d.epoch_ended(epoch(1.0e6, BUSY)), Mode::Inline);
        }
        assert_eq!(d.epoch_ended(epoch(1.0e6, BUSY)), Mode::Inline);
        assert_eq!(d.home(), Mode::Inline);
    }

    #[test]
    fn an_idle_or_light_queue_is_never_probed() {
        let mut d = Decider::default();
        for _ in 0..10 * MAX_PROBE_EVERY {
            assert_eq!(
                d.epoch_ended(epoch(1e6, 0.2)),
                Mode::Inline,
                "mostly asleep"
            );
            assert_eq!(d.epoch_ended(epoch(1e4, 1.0)), Mode::Inline, "few requests");
        }
    }

    #[test]
    fn probes_that_change_nothing_come_less_often_down_to_one_epoch_in_max() {
        let mut d = Decider::default();
        let mut gaps = Vec::new();
        for _ in 0..8 {
            let mut gap = 1;
            while d.epoch_ended(epoch(1e6, BUSY)) == Mode::Inline {
                gap += 1;
            }
            gaps.push(gap);
            // Polling was slower (a busy host).
            for _ in 1..PROBE_LEN {
                d.epoch_ended(epoch(0.4e6, BUSY));
            }
            assert_eq!(d.epoch_ended(epoch(0.4e6, BUSY)), Mode::Inline);
        }
        assert_eq!(gaps, vec![8, 16, 32, 64, 128, 256, 256, 256]);
        // A probe that wins resets the interval.
        assert_eq!(probe(&mut d, 1e6, BUSY, 2e6), Mode::Polled);
        let mut gap = 1;
        while d.epoch_ended(epoch(2e6, BUSY)) == Mode::Polled {
            gap += 1;
        }
        assert_eq!(gap, PROBE_EVERY);
    }

    #[test]
    fn the_clock_driven_chooser_closes_an_epoch_only_after_it_has_lasted() {
        let mut c = Chooser::new();
        c.completed(1000);
        assert_eq!(c.mode(), Mode::Inline);
        assert_eq!(c.completed, 1000, "the epoch is still open");
        std::thread::sleep(EPOCH);
        assert_eq!(c.mode(), Mode::Inline);
        assert_eq!(c.completed, 0, "closed and a new one begun");
        assert_eq!(c.decider.epochs, 1);
    }
}
