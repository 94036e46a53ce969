//! Resilience as layers around a call to the outside: a [`Source`](carerecord_adapters::Source)
//! fetch or a [`Locator`](carerecord_adapters::locator::Locator) lookup. Each layer is one small
//! idea in its own file, wraps the future of the layer inside it, and says what went wrong as a
//! typed [`Failure`]; fan-out and routing only ask concurrently and report.
//!
//! # Layer order, outermost first
//!
//! 1. **breaker** ([`breaker::guard`]) — an open circuit answers CIRCUIT_OPEN without touching
//!    anything inside; otherwise it sees the final outcome of everything inside and owns the
//!    classification of what counts as the source's failure ([`breaker::verdict`]).
//! 2. **bulkhead** ([`bulkhead::enter`]) — a full bulkhead refuses at once (UNAVAILABLE) instead
//!    of queueing. Outside the deadline so a refused call costs no timer; inside the breaker so
//!    our own limit never counts against the source's health.
//! 3. **deadline** ([`deadline::within`]) — the call is dropped at its deadline (TIMEOUT), and the
//!    layer notes whether that deadline was the caller's (cut short) or the source's own.
//! 4. **panic containment** ([`panic::contain`]) — a panicking adapter becomes an ERROR outcome;
//!    innermost, so a panic is an outcome like any other to every layer above.
//! 5. the adapter.
//!
//! Every layer is generic over what the call returns, so sources and locators share the same
//! guard types ([`Guards`]) and the same semantics.

pub mod breaker;
pub mod bulkhead;
pub mod deadline;
pub mod panic;

use std::future::Future;
use std::sync::Arc;

use carerecord_adapters::SourceError;
use tokio::time::Instant;

use self::breaker::{Breaker, BreakerConfig};
use self::bulkhead::Bulkhead;

/// Why a guarded call produced no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The adapter answered with an error of its own.
    Source(SourceError),
    /// No answer by the deadline. `cut_short`: the deadline was the caller's, nearer than the
    /// source's own timeout — it says nothing about the source's health.
    TimedOut { cut_short: bool },
    /// The adapter panicked.
    Panicked,
    /// Our own bulkhead for this source was full: it was not asked.
    BulkheadFull,
    /// Its circuit is open: it was not asked.
    CircuitOpen,
}

impl Failure {
    /// The error reported for this failure, `what` naming the thing called ("adapter",
    /// "locator") in text shown to callers.
    pub fn into_source_error(self, what: &str) -> SourceError {
        match self {
            Failure::Source(e) => e,
            Failure::TimedOut { .. } => SourceError::Timeout,
            Failure::Panicked => SourceError::Other(format!("the {what} failed unexpectedly")),
            Failure::BulkheadFull => {
                SourceError::Unavailable(format!("too many lookups in flight to this {what}"))
            }
            Failure::CircuitOpen => SourceError::CircuitOpen,
        }
    }
}

/// The guards of one source or locator, built once and shared by every lookup (routing's
/// per-lookup subsets clone the `Arc`s, not the state).
#[derive(Debug, Clone)]
pub struct Guards {
    pub breaker: Arc<Breaker>,
    pub bulkhead: Arc<Bulkhead>,
}

impl Guards {
    pub fn new(breaker: BreakerConfig, max_in_flight: usize) -> Guards {
        Guards {
            breaker: Arc::new(Breaker::new(breaker)),
            bulkhead: Arc::new(Bulkhead::new(max_in_flight)),
        }
    }

    /// Runs `call` through every layer, in the order the module comment gives. `deadline` bounds
    /// the call; `callers_deadline` says the deadline is the caller's, nearer than the callee's
    /// own timeout.
    pub async fn call<T>(
        &self,
        deadline: Instant,
        callers_deadline: bool,
        call: impl Future<Output = Result<T, SourceError>>,
    ) -> Result<T, Failure> {
        breaker::guard(
            &self.breaker,
            bulkhead::enter(
                &self.bulkhead,
                deadline::within(deadline, callers_deadline, panic::contain(call)),
            ),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn guards(failures: u32, max_in_flight: usize) -> Guards {
        Guards::new(
            BreakerConfig {
                failures,
                open_for: Duration::from_secs(10),
            },
            max_in_flight,
        )
    }

    async fn never() -> Result<(), SourceError> {
        std::future::pending().await
    }

    async fn panics() -> Result<(), SourceError> {
        panic!("adapter bug")
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_is_an_error_outcome_and_counts_against_the_breaker() {
        let g = guards(2, 4);
        let soon = Instant::now() + Duration::from_secs(1);
        for _ in 0..2 {
            assert_eq!(g.call(soon, false, panics()).await, Err(Failure::Panicked));
        }
        assert_eq!(
            g.call(soon, false, async { Ok(()) }).await,
            Err(Failure::CircuitOpen)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_sources_own_timeout_counts_against_it() {
        let g = guards(2, 4);
        for _ in 0..5 {
            let soon = Instant::now() + Duration::from_millis(100);
            assert_eq!(
                g.call(soon, true, never()).await,
                Err(Failure::TimedOut { cut_short: true })
            );
        }
        assert_eq!(
            g.breaker.state_code(),
            0,
            "the caller's deadline trips nothing"
        );
        for _ in 0..2 {
            let soon = Instant::now() + Duration::from_millis(100);
            assert_eq!(
                g.call(soon, false, never()).await,
                Err(Failure::TimedOut { cut_short: false })
            );
        }
        assert_eq!(g.breaker.state_code(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bulkhead_refuses_at_once_and_says_nothing_about_health() {
        let g = Arc::new(guards(1, 1));
        let far = Instant::now() + Duration::from_secs(60);
        let held = tokio::spawn({
            let g = g.clone();
            async move { g.call(far, false, never()).await }
        });
        tokio::task::yield_now().await;
        for _ in 0..3 {
            assert_eq!(
                g.call(far, false, async { Ok(()) }).await,
                Err(Failure::BulkheadFull)
            );
        }
        assert_eq!(g.breaker.state_code(), 0);
        held.abort();
        let _ = held.await;
        assert_eq!(g.call(far, false, async { Ok(()) }).await, Ok(()));
    }
}
