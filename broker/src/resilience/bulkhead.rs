//! The bulkhead: a cap on calls in flight to one source (or locator), so one slow organisation
//! cannot hold every connection and task. A full bulkhead refuses at once rather than queueing:
//! a queued call would only start late and time out.

use std::future::Future;

use tokio::sync::Semaphore;

use super::Failure;

/// Calls in flight to one callee, at most `capacity`.
#[derive(Debug)]
pub struct Bulkhead {
    permits: Semaphore,
    capacity: usize,
}

impl Bulkhead {
    /// At least one call is always allowed.
    pub fn new(capacity: usize) -> Bulkhead {
        let capacity = capacity.max(1);
        Bulkhead {
            permits: Semaphore::new(capacity),
            capacity,
        }
    }

    /// Calls allowed in flight at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Runs `call` holding one of the bulkhead's places, or refuses with
/// [`Failure::BulkheadFull`] without polling it.
pub async fn enter<T>(
    bulkhead: &Bulkhead,
    call: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    let Ok(_place) = bulkhead.permits.try_acquire() else {
        return Err(Failure::BulkheadFull);
    };
    call.await
}
