//! The door: lookups in flight are counted, and beyond the limit a new one is shed at once
//! (OVERLOADED, with a retry hint) instead of queueing until everything is late.
//!
//! # Why the door sheds before any bulkhead refuses
//!
//! Each source has a bulkhead (default [`DEFAULT_MAX_IN_FLIGHT`] calls in flight). If the door
//! let in more lookups than that, the excess would not be refused cleanly: it would be admitted,
//! asked every source, and find the requester's own organisation's bulkhead full — an
//! UNAVAILABLE source, a relationship that "could not be confirmed", a partial record, after
//! having cost a fan-out. So the door is the narrower of the two, and that relation is made to
//! hold, not hoped for:
//!
//! - a flight (one fan-out) asks each source at most once;
//! - every flight holds the [`Slot`] of the lookup that started it until its source calls are
//!   over — even when that caller went away — and joiners hold slots of their own;
//! - so calls in flight to any one source ≤ flights in flight ≤ slots ≤ the door's limit, and a
//!   door limit no larger than the default bulkhead means no default bulkhead is ever full.
//!
//! The shipped default limit is [`DEFAULT_MAX_LOOKUPS_IN_FLIGHT`] (¾ of the default bulkhead: the
//! region benchmark at 3× its sustainable rate shed cleanly at 48 with every admitted answer
//! complete, and sources slow down well before their bulkheads fill); a configured limit above
//! the default bulkhead is lowered to it (`assemble::assemble`). A source given a smaller
//! bulkhead of its own than the door is deliberately throttled: under load it is reported
//! UNAVAILABLE while the other sources are served.
//!
//! An adaptive (latency-driven) limit would also follow slowing sources below this ceiling; it is
//! not here yet, and the fixed ceiling is what guarantees no bulkhead refusal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::error::LookupError;
use crate::fanout::DEFAULT_MAX_IN_FLIGHT;

/// The shipped door limit: ¾ of the default per-source bulkhead (see the module comment).
pub const DEFAULT_MAX_LOOKUPS_IN_FLIGHT: usize = DEFAULT_MAX_IN_FLIGHT * 3 / 4;

/// Global load limits: shed instead of queueing until everything is late.
#[derive(Debug, Clone, Copy)]
pub struct LoadLimits {
    /// Lookups in flight (with the flights they started) before new ones are shed.
    pub max_in_flight: usize,
    /// The retry hint sent with a shed lookup.
    pub retry_after: Duration,
}

impl Default for LoadLimits {
    fn default() -> Self {
        LoadLimits {
            max_in_flight: DEFAULT_MAX_LOOKUPS_IN_FLIGHT,
            retry_after: Duration::from_secs(1),
        }
    }
}

/// Counts lookups in flight against the limit; refuses everything once draining.
pub(crate) struct Door {
    in_flight: Arc<AtomicUsize>,
    limits: LoadLimits,
    /// Set on SIGTERM: new lookups are refused while in-flight ones finish.
    draining: AtomicBool,
}

/// One lookup's place in the in-flight count, shared with the flight it starts: the place is
/// given back when the last holder lets go.
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        let now = self.0.fetch_sub(1, Ordering::AcqRel).saturating_sub(1);
        metrics::gauge!(crate::metrics::IN_FLIGHT).set(now as f64);
    }
}

impl Door {
    pub(crate) fn new(limits: LoadLimits) -> Door {
        Door {
            in_flight: Arc::new(AtomicUsize::new(0)),
            limits,
            draining: AtomicBool::new(false),
        }
    }

    /// A place among the lookups in flight, or the refusal — immediately, never queued.
    pub(crate) fn admit(&self) -> Result<Arc<Slot>, LookupError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(LookupError::ShuttingDown);
        }
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(self.in_flight.clone());
        if before >= self.limits.max_in_flight {
            drop(slot);
            metrics::counter!(crate::metrics::SHED).increment(1);
            return Err(LookupError::Overloaded {
                limit: self.limits.max_in_flight,
                retry_after: self.limits.retry_after,
            });
        }
        metrics::gauge!(crate::metrics::IN_FLIGHT).set((before + 1) as f64);
        Ok(Arc::new(slot))
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheds_beyond_the_limit_and_gives_places_back_when_the_last_holder_lets_go() {
        let door = Door::new(LoadLimits {
            max_in_flight: 2,
            retry_after: Duration::from_millis(250),
        });
        let a = door.admit().expect("first");
        let flight_holds = a.clone();
        let _b = door.admit().expect("second");
        match door.admit() {
            Err(LookupError::Overloaded { limit, retry_after }) => {
                assert_eq!((limit, retry_after), (2, Duration::from_millis(250)));
            }
            other => panic!("not shed: {:?}", other.err()),
        }
        drop(a);
        assert!(door.admit().is_err(), "the flight still holds the place");
        drop(flight_holds);
        assert!(door.admit().is_ok());
        door.start_draining();
        assert!(matches!(door.admit(), Err(LookupError::ShuttingDown)));
    }

    #[test]
    fn the_default_door_is_narrower_than_the_default_bulkhead() {
        const { assert!(DEFAULT_MAX_LOOKUPS_IN_FLIGHT <= DEFAULT_MAX_IN_FLIGHT) };
        assert!(LoadLimits::default().max_in_flight <= DEFAULT_MAX_IN_FLIGHT);
    }
}
