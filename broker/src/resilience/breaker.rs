//! A circuit breaker per source: after consecutive failures the source is reported CIRCUIT_OPEN
//! at once instead of making every lookup wait for a timeout that will surely come; after a
//! while one probe is let through, and its result closes or re-opens the circuit.
//!
//! Modelled on linkerd's consecutive-failures breaker. Time is tokio time, so tests pause it.
//!
//! The breaker owns its failure classification ([`verdict`]): which outcomes say the source is
//! unhealthy, which say it is fine, and which say nothing about it (our own limits, a caller's
//! tight deadline).

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use carerecord_proto::SourceOutcome;
use tokio::time::Instant;

use super::Failure;

/// When to open and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures (errors or timeouts) that open the circuit; 0 disables the breaker.
    pub failures: u32,
    /// How long the circuit stays open before a probe is allowed.
    pub open_for: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight; everyone else is turned away until it reports.
    HalfOpen,
}

/// Whether a call may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Closed: call as usual.
    Call,
    /// Half-open: this call is the probe.
    Probe,
    /// Open: do not call.
    Reject,
}

/// Breaker state for metrics: 0 closed, 1 half-open, 2 open.
pub type StateCode = u8;

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: Mutex<State>,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Breaker {
            config,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks to call the source now.
    pub fn acquire(&self) -> Permit {
        if self.config.failures == 0 {
            return Permit::Call;
        }
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Permit::Call,
            State::HalfOpen => Permit::Reject,
            State::Open { until } if Instant::now() >= until => {
                *state = State::HalfOpen;
                Permit::Probe
            }
            State::Open { .. } => Permit::Reject,
        }
    }

    /// Reports how a permitted call went. A probe that was abandoned (its lookup dropped)
    /// reports as a failure, so the circuit never sticks half-open.
    pub fn record(&self, permit: Permit, success: bool) {
        if self.config.failures == 0 || permit == Permit::Reject {
            return;
        }
        let mut state = self.lock();
        *state = match (*state, success) {
            (_, true) => State::Closed { failures: 0 },
            (State::HalfOpen, false) => State::Open {
                until: Instant::now() + self.config.open_for,
            },
            (State::Closed { failures }, false) if failures + 1 >= self.config.failures => {
                tracing::warn!(failures = failures + 1, "circuit opened");
                State::Open {
                    until: Instant::now() + self.config.open_for,
                }
            }
            (State::Closed { failures }, false) => State::Closed {
                failures: failures + 1,
            },
            // A late result from before the circuit opened changes nothing.
            (open @ State::Open { .. }, false) => open,
        };
    }

    /// 0 closed, 1 half-open, 2 open (an open circuit whose time is up still reads open until
    /// the next call probes it).
    pub fn state_code(&self) -> StateCode {
        match *self.lock() {
            State::Closed { .. } => 0,
            State::HalfOpen => 1,
            State::Open { .. } => 2,
        }
    }
}

/// What one outcome says about the callee's health: `Some(true)` healthy, `Some(false)` a
/// failure, `None` nothing (it was not the callee's doing).
pub fn verdict<T>(result: &Result<T, Failure>) -> Option<bool> {
    match result {
        Ok(_) => Some(true),
        // The caller's tight deadline, or our own bulkhead: not the source's fault.
        Err(Failure::TimedOut { cut_short: true }) | Err(Failure::BulkheadFull) => None,
        Err(Failure::TimedOut { cut_short: false }) | Err(Failure::Panicked) => Some(false),
        // Not called at all.
        Err(Failure::CircuitOpen) => None,
        // Errors and its own timeouts count; an answer that refuses, or names another patient,
        // is the source working (and saying something we must act on).
        Err(Failure::Source(e)) => Some(!matches!(
            e.outcome(),
            SourceOutcome::Timeout | SourceOutcome::Error
        )),
    }
}

/// The breaker layer: runs `call` unless the circuit is open, and reports its [`verdict`].
pub async fn guard<T>(
    breaker: &Breaker,
    call: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    let permit = breaker.acquire();
    if permit == Permit::Reject {
        return Err(Failure::CircuitOpen);
    }
    // Reports however the call ends: an abandoned probe (its lookup dropped, or our bulkhead
    // full) counts as a failure, so the circuit never sticks half-open.
    struct Report<'a> {
        breaker: &'a Breaker,
        permit: Permit,
        verdict: Option<bool>,
    }
    impl Drop for Report<'_> {
        fn drop(&mut self) {
            match self.verdict {
                Some(healthy) => self.breaker.record(self.permit, healthy),
                None if self.permit == Permit::Probe => self.breaker.record(self.permit, false),
                None => {}
            }
        }
    }
    let mut report = Report {
        breaker,
        permit,
        verdict: None,
    };
    let result = call.await;
    report.verdict = verdict(&result);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            failures: 3,
            open_for: Duration::from_secs(10),
        })
    }

    fn fail(b: &Breaker) {
        let p = b.acquire();
        b.record(p, false);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_only() {
        let b = breaker();
        fail(&b);
        fail(&b);
        let p = b.acquire();
        b.record(p, true); // a success resets the count
        fail(&b);
        fail(&b);
        assert_eq!(b.acquire(), Permit::Call);
        b.record(Permit::Call, false);
        assert_eq!(b.state_code(), 2);
        assert_eq!(b.acquire(), Permit::Reject);
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_after_the_open_period_then_closes_on_success() {
        let b = breaker();
        (0..3).for_each(|_| fail(&b));
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(b.acquire(), Permit::Reject);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.acquire(), Permit::Probe);
        assert_eq!(b.acquire(), Permit::Reject, "only one probe at a time");
        b.record(Permit::Probe, true);
        assert_eq!(b.state_code(), 0);
        assert_eq!(b.acquire(), Permit::Call);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_another_period() {
        let b = breaker();
        (0..3).for_each(|_| fail(&b));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.acquire(), Permit::Probe);
        b.record(Permit::Probe, false);
        assert_eq!(b.acquire(), Permit::Reject);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(b.acquire(), Permit::Probe);
    }

    #[test]
    fn the_breaker_classifies_outcomes() {
        use carerecord_adapters::SourceError;
        let cases: Vec<(Result<(), Failure>, Option<bool>)> = vec![
            (Ok(()), Some(true)),
            (Err(Failure::TimedOut { cut_short: false }), Some(false)),
            (Err(Failure::TimedOut { cut_short: true }), None),
            (Err(Failure::Panicked), Some(false)),
            (Err(Failure::BulkheadFull), None),
            (Err(Failure::CircuitOpen), None),
            (
                Err(Failure::Source(SourceError::Connect("x".into()))),
                Some(false),
            ),
            (Err(Failure::Source(SourceError::Status(503))), Some(false)),
            (Err(Failure::Source(SourceError::Timeout)), Some(false)),
            (
                Err(Failure::Source(SourceError::Refused("loop".into()))),
                Some(true),
            ),
            (
                Err(Failure::Source(SourceError::WrongPatient("x".into()))),
                Some(true),
            ),
        ];
        for (result, want) in cases {
            assert_eq!(verdict(&result), want, "{result:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_reopens_the_circuit() {
        let b = breaker();
        (0..3).for_each(|_| fail(&b));
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = guard(&b, std::future::pending::<Result<(), Failure>>());
        // Polled once (the probe is taken), then dropped as a cancelled lookup would be.
        assert!(futures::poll!(Box::pin(probe)).is_pending());
        assert_eq!(b.state_code(), 2, "open again, not stuck half-open");
    }

    #[test]
    fn zero_failures_disables_it() {
        let b = Breaker::new(BreakerConfig {
            failures: 0,
            open_for: Duration::from_secs(1),
        });
        for _ in 0..100 {
            assert_eq!(b.acquire(), Permit::Call);
            b.record(Permit::Call, false);
        }
    }
}
