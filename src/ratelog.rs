//! Rate limits for repeated log messages: the first one of a kind is written, the next ones
//! within the period are counted, and the next line written says how many were left out
//! ("… 3,998 more in the last 10 s"). Pure: the caller passes the time in.
//!
//! Used where input or load can repeat one message without bound: refused connections, an
//! exhausted descriptor table, garbage watch lines, a broken source file.

use std::time::{Duration, Instant};

/// One kind of message, written at most once per `period`.
#[derive(Debug)]
pub struct Every {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Every {
    pub fn new(period: Duration) -> Every {
        Every { period, last: None, suppressed: 0 }
    }

    /// `Some(n)`: write the message now, `n` like it having been left out since the last one;
    /// `None`: leave this one out (it is counted).
    pub fn due(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.period => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    pub fn period(&self) -> Duration {
        self.period
    }
}

/// The tail of a rate-limited line: empty, or `" (… N more like it left out)"`.
pub fn summary(left_out: u64) -> String {
    match left_out {
        0 => String::new(),
        n => format!(" ({n} more like it left out)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_is_written_repeats_are_counted_and_reported() {
        let t0 = Instant::now();
        let mut e = Every::new(Duration::from_secs(10));
        assert_eq!(e.due(t0), Some(0));
        for i in 1..=3998 {
            assert_eq!(e.due(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(e.due(t0 + Duration::from_secs(10)), Some(3998));
        assert_eq!(e.due(t0 + Duration::from_secs(11)), None);
        assert_eq!(e.due(t0 + Duration::from_secs(25)), Some(1));
        assert_eq!(summary(0), "");
        assert_eq!(summary(3998), " (3998 more like it left out)");
    }
}
