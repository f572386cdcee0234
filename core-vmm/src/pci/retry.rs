//! Retry pacing for a peer the core reconnects to: a device backend, or a GPU's display
//! process. One that went away is tried again at once; one that keeps dying right after
//! coming back is tried ever more slowly; one that was refused, once a second. A planned
//! handover (`isolactl restart` or `upgrade` told the core first) is never a flap: the peer
//! is tried again at once however soon it goes away after the last one.

use std::time::{Duration, Instant};

/// A backend that was refused (changed features or disk size) is retried this often.
pub const REFUSED_RETRY: Duration = Duration::from_secs(1);
/// A peer that dies within this time of being restored is flapping: back off.
const FLAP_WINDOW: Duration = Duration::from_millis(250);
const FLAP_BACKOFF_MIN: Duration = Duration::from_millis(50);

/// Retry pacing for one peer (the backend, or a GPU's display process).
#[derive(Default)]
pub struct Watch {
    /// No attempt before this moment.
    pub not_before: Option<Instant>,
    /// When the peer last came back, to spot one that dies again at once.
    pub back_at: Option<Instant>,
    backoff: Duration,
    /// When the peer went away, until it is back.
    away_since: Option<Instant>,
}

impl Watch {
    /// The peer went away: the next attempt comes at once, or after a growing back-off when
    /// it went away within [`FLAP_WINDOW`] of the last success and the going was not a
    /// `planned` handover. Returns the back-off (zero: at once).
    pub fn went_away(&mut self, planned: bool) -> Duration {
        let flapping = !planned && self.back_at.is_some_and(|at| at.elapsed() < FLAP_WINDOW);
        self.backoff = if flapping {
            (self.backoff * 2).clamp(FLAP_BACKOFF_MIN, REFUSED_RETRY)
        } else {
            Duration::ZERO
        };
        let now = Instant::now();
        self.not_before = Some(now + self.backoff);
        self.away_since.get_or_insert(now);
        self.backoff
    }

    /// The peer is back; returns how long it was away (since it first went away).
    pub fn came_back(&mut self) -> Option<Duration> {
        let now = Instant::now();
        self.back_at = Some(now);
        self.away_since
            .take()
            .map(|at| now.saturating_duration_since(at))
    }

    pub fn due(&self) -> bool {
        self.not_before.is_none_or(|at| Instant::now() >= at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_that_keeps_dying_right_after_coming_back_is_retried_ever_more_slowly() {
        let mut watch = Watch::default();
        assert_eq!(
            watch.went_away(false),
            Duration::ZERO,
            "first loss: at once"
        );
        let mut last = Duration::ZERO;
        for _ in 0..8 {
            watch.back_at = Some(Instant::now());
            assert_eq!(watch.went_away(false), watch.backoff);
            assert!(watch.backoff >= FLAP_BACKOFF_MIN && watch.backoff >= last);
            assert!(watch.backoff <= REFUSED_RETRY);
            last = watch.backoff;
        }
        assert_eq!(last, REFUSED_RETRY, "capped");
        // Up for longer than the flap window: at once again.
        watch.back_at = Instant::now().checked_sub(FLAP_WINDOW * 2);
        watch.went_away(false);
        assert_eq!(watch.backoff, Duration::ZERO);
    }

    #[test]
    fn planned_handovers_back_to_back_are_retried_at_once_and_reset_the_back_off() {
        let mut watch = Watch::default();
        for _ in 0..3 {
            watch.back_at = Some(Instant::now());
            watch.went_away(false);
        }
        assert!(watch.backoff >= FLAP_BACKOFF_MIN, "flapping before");
        for _ in 0..10 {
            watch.back_at = Some(Instant::now());
            assert_eq!(watch.went_away(true), Duration::ZERO);
            assert!(watch.due());
        }
        // An unplanned loss right after a planned one starts the back-off from its minimum.
        watch.back_at = Some(Instant::now());
        assert_eq!(watch.went_away(false), FLAP_BACKOFF_MIN);
    }
}
