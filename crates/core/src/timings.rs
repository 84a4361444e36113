//! Where a run's wall time went, phase by phase (connection setup, log replay, reads, COPY,
//! index, commit, ...): reported by `sync --timings` and `lakesync bench`, so fixed costs are
//! named. Phases may overlap (a read feeding a COPY): each is its own wall time.

use std::time::{Duration, Instant};

/// Phase timings in the order first recorded; a phase recorded twice adds up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings(Vec<(&'static str, Duration)>);

impl Timings {
    /// Adds `elapsed` to `phase`.
    pub fn add(&mut self, phase: &'static str, elapsed: Duration) {
        match self.0.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, d)) => *d += elapsed,
            None => self.0.push((phase, elapsed)),
        }
    }

    /// Adds the time since `started` to `phase`, and returns now (to start the next phase).
    pub fn lap(&mut self, phase: &'static str, started: Instant) -> Instant {
        let now = Instant::now();
        self.add(phase, now - started);
        now
    }

    /// Adds every phase of `other`.
    pub fn extend(&mut self, other: &Timings) {
        for (p, d) in &other.0 {
            self.add(p, *d);
        }
    }

    /// The phases, in order.
    pub fn phases(&self) -> &[(&'static str, Duration)] {
        &self.0
    }

    /// `phase 0.012s, phase 0.300s, ...` (what `sync --timings` prints).
    pub fn display(&self) -> String {
        self.0.iter().map(|(p, d)| format!("{p} {:.3}s", d.as_secs_f64())).collect::<Vec<_>>().join(", ")
    }

    /// Parses [`Timings::display`]'s text back into (phase, seconds).
    pub fn parse(text: &str) -> Vec<(String, f64)> {
        text.split(", ")
            .filter_map(|part| {
                let (phase, secs) = part.trim().rsplit_once(' ')?;
                Some((phase.to_string(), secs.strip_suffix('s')?.parse().ok()?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up_keep_their_order_and_read_back() {
        let mut t = Timings::default();
        t.add("connect", Duration::from_millis(12));
        t.add("copy", Duration::from_millis(300));
        t.add("connect", Duration::from_millis(3));
        assert_eq!(t.display(), "connect 0.015s, copy 0.300s");
        assert_eq!(Timings::parse(&t.display()), [("connect".to_string(), 0.015), ("copy".to_string(), 0.3)]);
    }
}
