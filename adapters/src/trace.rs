//! The W3C trace context of the broker's call to a source, for sources to forward.
//!
//! The broker runs each source call inside [`with_traceparent`]; an adapter that talks to
//! another system puts [`traceparent`] on its requests (`traceparent` header, or gRPC metadata),
//! so the organisation's own traces join the broker's. Outside a traced call it is `None` and
//! nothing is sent. A task-local rather than a field on `SourceRequest`: the value belongs to the
//! call, not to the question asked, and adapters that do not forward it need not know it exists.

use std::future::Future;

tokio::task_local! {
    static TRACEPARENT: Option<String>;
}

/// The header (and gRPC metadata key) that carries the trace context.
pub const HEADER: &str = "traceparent";

/// Runs `call` with `traceparent` as the context adapters forward.
pub async fn with_traceparent<F: Future>(traceparent: Option<String>, call: F) -> F::Output {
    TRACEPARENT.scope(traceparent, call).await
}

/// The context of the source call in progress, if the broker is tracing it.
pub fn traceparent() -> Option<String> {
    TRACEPARENT.try_with(Clone::clone).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_context_is_seen_inside_the_call_only() {
        assert_eq!(traceparent(), None);
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned();
        let seen = with_traceparent(Some(tp.clone()), async { traceparent() }).await;
        assert_eq!(seen, Some(tp));
        assert_eq!(traceparent(), None);
    }
}
