//! The deadline: a call is dropped (not left running) when its deadline passes.
//!
//! It also decides whose deadline that was. A lookup's budget gives each source
//! min(its own timeout, what the caller left); when the caller's was nearer, a TIMEOUT says the
//! caller was in a hurry, not that the source is slow, so it must neither trip the breaker nor
//! let the record be cached.

use std::future::Future;

use carerecord_adapters::SourceError;
use tokio::time::Instant;

use super::Failure;

/// Runs `call` until `deadline`. `callers_deadline`: the deadline is the caller's, nearer than
/// the callee's own timeout — a timeout then (ours, or one the adapter reports itself on the
/// same deadline) is `cut_short`.
pub async fn within<T>(
    deadline: Instant,
    callers_deadline: bool,
    call: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    match tokio::time::timeout_at(deadline, call).await {
        Err(_elapsed) => Err(Failure::TimedOut {
            cut_short: callers_deadline,
        }),
        Ok(Err(Failure::Source(SourceError::Timeout))) => Err(Failure::TimedOut {
            cut_short: callers_deadline,
        }),
        Ok(result) => result,
    }
}
