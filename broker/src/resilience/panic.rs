//! Panic containment: a panicking adapter or locator becomes an outcome, not a crashed lookup.
//! An adapter bug must not take the broker, or the other sources' answers, down with it.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use carerecord_adapters::SourceError;
use futures::FutureExt;

use super::Failure;

/// Runs `call`, turning a panic into [`Failure::Panicked`] and the adapter's own error into
/// [`Failure::Source`].
pub async fn contain<T>(call: impl Future<Output = Result<T, SourceError>>) -> Result<T, Failure> {
    // Unwind safety: the adapter's state is behind its own synchronisation; a panic mid-call
    // leaves at worst that adapter's state odd, which its next call must cope with anyway
    // (the same as cancellation at an await point).
    match AssertUnwindSafe(call).catch_unwind().await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Failure::Source(e)),
        Err(_panic) => {
            tracing::error!("adapter panicked: reported as ERROR");
            Err(Failure::Panicked)
        }
    }
}
