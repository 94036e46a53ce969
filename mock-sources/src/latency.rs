//! Response latency profiles for a synthetic organisation.
//!
//! Real sources are not uniformly slow: most answers come quickly and a tail comes very late,
//! which is what exercises the broker's per-source budgets. `tail:MEDIAN:P99` draws from a
//! lognormal with that median and 99th percentile; draws come from a PRNG keyed by the request
//! number, so a replayed test sees the same delays.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::population::OrgKind;
use crate::prng::Prng;

/// z-score of the 99th percentile of the standard normal.
const Z99: f64 = 2.326_347_874;
/// No single delay exceeds this, whatever the profile says.
const MAX_DELAY_MS: f64 = 120_000.0;

/// How long an organisation takes before it starts answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatencyProfile {
    /// Always this many milliseconds (`fixed:MS`; `fixed:0` or `none` for tests).
    Fixed { ms: u64 },
    /// Lognormal with this median and 99th percentile (`tail:MEDIAN_MS:P99_MS`).
    Tail { median_ms: u64, p99_ms: u64 },
}

impl LatencyProfile {
    pub const ZERO: LatencyProfile = LatencyProfile::Fixed { ms: 0 };

    /// The default for a kind of organisation: GP systems are slowest, ambulance fastest.
    pub fn default_for(kind: OrgKind) -> LatencyProfile {
        let ms = match kind {
            OrgKind::GpPractice => 25,
            OrgKind::AcuteTrust => 15,
            OrgKind::MentalHealthTrust => 20,
            OrgKind::AmbulanceService => 5,
            OrgKind::CareHome => 30,
        };
        LatencyProfile::Fixed { ms }
    }

    /// The delay for one request; `key` makes the draw reproducible.
    pub fn sample(&self, key: &[u64]) -> Duration {
        match *self {
            LatencyProfile::Fixed { ms } => Duration::from_millis(ms.min(MAX_DELAY_MS as u64)),
            LatencyProfile::Tail { median_ms, p99_ms } => {
                if median_ms == 0 {
                    return Duration::ZERO;
                }
                let median = median_ms as f64;
                let sigma = ((p99_ms.max(median_ms) as f64) / median).ln() / Z99;
                let z = Prng::keyed(key).normal();
                let ms = (median * (sigma * z).exp()).clamp(0.0, MAX_DELAY_MS);
                Duration::from_micros((ms * 1000.0) as u64)
            }
        }
    }
}

impl fmt::Display for LatencyProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LatencyProfile::Fixed { ms } => write!(f, "fixed:{ms}"),
            LatencyProfile::Tail { median_ms, p99_ms } => write!(f, "tail:{median_ms}:{p99_ms}"),
        }
    }
}

/// Why a latency spec was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid latency {input:?}: {reason} (expected fixed:MS, tail:MEDIAN_MS:P99_MS or none)")]
pub struct ParseLatencyError {
    input: String,
    reason: &'static str,
}

impl FromStr for LatencyProfile {
    type Err = ParseLatencyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseLatencyError {
            input: s.to_string(),
            reason,
        };
        let ms = |v: &str| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| err("not a whole number of milliseconds"))
        };
        let parts: Vec<&str> = s.trim().split(':').collect();
        match parts.as_slice() {
            ["none"] | ["0"] => Ok(LatencyProfile::ZERO),
            ["fixed", v] => Ok(LatencyProfile::Fixed { ms: ms(v)? }),
            ["tail", m, p] => {
                let (median_ms, p99_ms) = (ms(m)?, ms(p)?);
                if p99_ms < median_ms {
                    return Err(err("p99 is below the median"));
                }
                Ok(LatencyProfile::Tail { median_ms, p99_ms })
            }
            _ => Err(err("unknown form")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays_round_trip() {
        for s in ["fixed:0", "fixed:25", "tail:20:400"] {
            assert_eq!(s.parse::<LatencyProfile>().unwrap().to_string(), s);
        }
        assert_eq!("none".parse::<LatencyProfile>(), Ok(LatencyProfile::ZERO));
        for bad in [
            "",
            "fixed",
            "fixed:-1",
            "tail:400:20",
            "tail:a:b",
            "slow",
            "fixed:1:2",
        ] {
            assert!(bad.parse::<LatencyProfile>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tail_profile_hits_its_median_and_p99() {
        let p = LatencyProfile::Tail {
            median_ms: 20,
            p99_ms: 400,
        };
        let mut ms: Vec<f64> = (0..20_000u64)
            .map(|i| p.sample(&[9, i]).as_secs_f64() * 1000.0)
            .collect();
        ms.sort_by(f64::total_cmp);
        let median = ms[ms.len() / 2];
        let p99 = ms[ms.len() * 99 / 100];
        assert!((17.0..23.0).contains(&median), "median {median}");
        assert!((300.0..520.0).contains(&p99), "p99 {p99}");
        assert_eq!(p.sample(&[1, 2]), p.sample(&[1, 2]), "reproducible");
    }
}
