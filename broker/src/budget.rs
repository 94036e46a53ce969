//! The deadline budget of one lookup.
//!
//! tonic does not hand the caller's deadline to handlers, so we read the `grpc-timeout` header
//! ourselves. Overall budget = min(caller's timeout − merge headroom, configured cap); each source
//! gets min(its own timeout, the overall budget). Everything is an absolute tokio `Instant` so
//! paused-time tests drive it.

use std::time::Duration;

use tokio::time::Instant;

/// The deadlines of one lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// When the lookup started.
    pub started: Instant,
    /// When the broker stops waiting for sources and merges what it has.
    pub sources_deadline: Instant,
    /// The caller's own deadline (or the cap when the caller set none).
    pub caller_deadline: Instant,
    /// The caller's deadline, not the configured cap, bounds this lookup: sources timing out
    /// at it were cut short by this caller, not slow by their own measure.
    pub caller_limited: bool,
}

/// Why a budget cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error("the deadline of {0:?} leaves no time to ask any source")]
    TooShort(Duration),
}

impl Budget {
    /// Derives the budget from the caller's timeout (if any), the configured cap and headroom.
    pub fn new(
        now: Instant,
        caller_timeout: Option<Duration>,
        cap: Duration,
        headroom: Duration,
    ) -> Result<Budget, BudgetError> {
        let caller_limited = caller_timeout.is_some_and(|t| t < cap);
        let caller = caller_timeout.unwrap_or(cap).min(cap);
        let for_sources = caller.saturating_sub(headroom);
        if for_sources.is_zero() {
            return Err(BudgetError::TooShort(caller));
        }
        Ok(Budget {
            started: now,
            sources_deadline: now + for_sources,
            caller_deadline: now + caller,
            caller_limited,
        })
    }

    /// The deadline for one source: its own timeout, but never past the overall budget.
    pub fn source_deadline(&self, source_timeout: Duration) -> Instant {
        (self.started + source_timeout).min(self.sources_deadline)
    }
}

/// Parses a gRPC `grpc-timeout` header value: up to 8 digits and a unit
/// (`H` hours, `M` minutes, `S` seconds, `m` millis, `u` micros, `n` nanos).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a duration as a `grpc-timeout` header value (milliseconds, rounded down, at least 1).
pub fn format_grpc_timeout(d: Duration) -> String {
    let ms = d.as_millis().clamp(1, 99_999_999);
    format!("{ms}m")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(5);
    const HEADROOM: Duration = Duration::from_millis(20);

    #[test]
    fn parses_every_grpc_timeout_unit() {
        let cases = [
            ("1H", Some(Duration::from_secs(3600))),
            ("2M", Some(Duration::from_secs(120))),
            ("3S", Some(Duration::from_secs(3))),
            ("250m", Some(Duration::from_millis(250))),
            ("7u", Some(Duration::from_micros(7))),
            ("99999999n", Some(Duration::from_nanos(99_999_999))),
            ("", None),
            ("m", None),
            ("10", None),
            ("10x", None),
            ("-1m", None),
            ("123456789m", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_grpc_timeout(input), want, "{input:?}");
        }
    }

    #[test]
    fn caller_deadline_shorter_than_cap_wins_minus_headroom() {
        let now = Instant::now();
        let b = Budget::new(now, Some(Duration::from_millis(300)), CAP, HEADROOM).expect("ok");
        assert_eq!(b.sources_deadline - now, Duration::from_millis(280));
        assert_eq!(b.caller_deadline - now, Duration::from_millis(300));
    }

    #[test]
    fn no_caller_deadline_means_the_cap() {
        let now = Instant::now();
        let b = Budget::new(now, None, CAP, HEADROOM).expect("ok");
        assert_eq!(b.sources_deadline - now, CAP - HEADROOM);
        let long = Budget::new(now, Some(Duration::from_secs(60)), CAP, HEADROOM).expect("ok");
        assert_eq!(long, b);
    }

    #[test]
    fn source_timeout_is_bounded_by_the_overall_budget() {
        let now = Instant::now();
        let b = Budget::new(now, Some(Duration::from_millis(300)), CAP, HEADROOM).expect("ok");
        assert_eq!(
            b.source_deadline(Duration::from_millis(100)) - now,
            Duration::from_millis(100)
        );
        assert_eq!(
            b.source_deadline(Duration::from_secs(2)) - now,
            Duration::from_millis(280)
        );
    }

    #[test]
    fn a_deadline_within_the_headroom_is_too_short() {
        let now = Instant::now();
        assert_eq!(
            Budget::new(now, Some(Duration::from_millis(20)), CAP, HEADROOM),
            Err(BudgetError::TooShort(Duration::from_millis(20)))
        );
    }
}
