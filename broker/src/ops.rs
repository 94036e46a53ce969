//! The ops listener: Prometheus metrics and the HTTP probes Kubernetes and load balancers ask.
//!
//! `/livez` says the process answers at all (restart it if not); `/readyz` says whether to send
//! it lookups: not before its sources are loaded and its gRPC port is bound, not while it drains,
//! and not while its audit trail fails writes (it would refuse to disclose anything anyway).
//! Everything else is 404. The listener keeps answering while the broker drains, so probes see
//! the drain rather than a closed port.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::lookup::Broker;

/// How long a failed audit write keeps the broker out of rotation. After it, the broker reports
/// ready again so a lookup can try the trail again (a fixed disk recovers without a restart); a
/// trail still failing takes it straight back out.
pub const AUDIT_FAILURE_HOLD: Duration = Duration::from_secs(30);

/// What the probes report on; the broker is attached once it is serving.
pub struct Ops {
    metrics: Option<PrometheusHandle>,
    broker: OnceLock<Arc<Broker>>,
}

impl Ops {
    /// Probes for a broker not yet built (`/readyz` is 503 until [`Ops::serving`]).
    pub fn new(metrics: Option<PrometheusHandle>) -> Arc<Ops> {
        Arc::new(Ops {
            metrics,
            broker: OnceLock::new(),
        })
    }

    /// The broker's sources are loaded and its gRPC port is bound: ready for lookups.
    pub fn serving(&self, broker: Arc<Broker>) {
        let _ = self.broker.set(broker);
    }

    /// `Ok` when the broker should be sent lookups, else why not.
    pub fn readiness(&self) -> Result<(), String> {
        let broker = self
            .broker
            .get()
            .ok_or_else(|| "starting: sources not loaded yet".to_owned())?;
        if broker.is_draining() {
            return Err("draining: finishing lookups in flight before exit".into());
        }
        if let Some(at) = broker.audit_failing_since() {
            let ago = at.elapsed();
            if ago < AUDIT_FAILURE_HOLD {
                return Err(format!(
                    "audit trail unwritable: the last write failed {} s ago",
                    ago.as_secs()
                ));
            }
        }
        Ok(())
    }
}

/// Serves the probes and `/metrics` until the process ends.
pub async fn serve(listener: TcpListener, ops: Arc<Ops>) -> std::io::Result<()> {
    if let Some(handle) = ops.metrics.clone() {
        // Histograms are summarised on upkeep; without it they grow until scraped.
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                handle.run_upkeep();
            }
        });
    }
    axum::serve(listener, router(ops)).await
}

fn router(ops: Arc<Ops>) -> Router {
    Router::new()
        .route(
            "/livez",
            get(|| async { text(StatusCode::OK, "ok\n".into()) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { text(StatusCode::NOT_FOUND, "not found\n".into()) })
        .with_state(ops)
}

async fn readyz(State(ops): State<Arc<Ops>>) -> Response {
    match ops.readiness() {
        Ok(()) => text(StatusCode::OK, "ready\n".into()),
        Err(why) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(ops): State<Arc<Ops>>) -> Response {
    match &ops.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => text(
            StatusCode::NOT_FOUND,
            "metrics are not recorded in this process\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_before_the_broker_is_serving() {
        let ops = Ops::new(None);
        let why = ops.readiness().expect_err("no broker yet");
        assert!(why.starts_with("starting"), "{why}");
    }
}
