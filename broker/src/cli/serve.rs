//! `carerecord serve` and `carerecord check-config`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::assemble::{Trail, assemble};
use crate::config::Config;
use crate::{Broker, registry, server};

/// Runs the broker until SIGTERM/Ctrl-C has drained it.
pub async fn run(path: &Path) -> anyhow::Result<()> {
    let (config, text) = Config::read(path)?;
    run_loaded(path, config, text).await
}

/// As [`run`], with the configuration already read from `path` (its parsed form and its text).
pub async fn run_loaded(path: &Path, config: Config, started_with: String) -> anyhow::Result<()> {
    // The probes answer first (503 "starting") so an orchestrator can tell a slow start from a
    // dead one; everything else is built and checked before the gRPC port is bound.
    let ops = match config.metrics.listen {
        Some(listen) => Some(start_ops(listen).await?),
        None => None,
    };
    let assembly = assemble(&config, Trail::Open)?;
    let broker = Arc::new(
        assembly
            .broker
            .context("the broker was not built (no audit trail opened)")?,
    );
    let transport = assembly.transport;
    if config.server.plaintext {
        tracing::warn!(
            listen = %config.server.listen,
            "SERVING WITHOUT TLS: plaintext gRPC is for local development only; patient data crosses the network unencrypted"
        );
    }
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        sources = assembly.source_count,
        "carerecord broker serving"
    );

    let (stop, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested");
        let _ = stop.send(true);
    });
    tokio::spawn(reload_on_hangup(
        broker.clone(),
        path.to_owned(),
        started_with,
    ));

    if let (Some(face), Some(fhir)) = (assembly.fhir, &config.fhir) {
        let listener =
            bind_face("FHIR face", fhir.listen, &face.settings.base_url, face.tls).await?;
        let face = Arc::new(crate::fhir_api::Face {
            broker: broker.clone(),
            settings: face.settings,
        });
        let stopping = stopping.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::fhir_api::serve(listener, face, wait_for(stopping)).await {
                tracing::error!(error = %e, "FHIR face stopped");
            }
        });
    }
    if let (Some(view), Some(listen)) = (assembly.view, config.view.as_ref().map(|v| v.listen)) {
        let listener = bind_face("web view", listen, &view.settings.base_url, view.tls).await?;
        let view = Arc::new(crate::view::View::new(broker.clone(), view.settings));
        let stopping = stopping.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::view::serve(listener, view, wait_for(stopping)).await {
                tracing::error!(error = %e, "web view stopped");
            }
        });
    }
    if let Some(ops) = &ops {
        ops.serving(broker.clone());
    }
    let drain = std::time::Duration::from_millis(config.resilience.drain_ms);
    let serving = server::run(
        listener,
        broker.clone(),
        transport,
        wait_for(stopping.clone()),
    );
    let drain_deadline = async {
        wait_for(stopping).await;
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        result = serving => result?,
        () = drain_deadline => tracing::warn!(
            in_flight = broker.lookups_in_flight(),
            "drain time ({} ms) passed: exiting with lookups still in flight",
            drain.as_millis()
        ),
    }
    tracing::info!("carerecord broker stopped");
    Ok(())
}

/// Binds an HTTP face's listener (plaintext, or TLS with its calling systems' certificates).
async fn bind_face(
    what: &'static str,
    listen: std::net::SocketAddr,
    base_url: &str,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> anyhow::Result<crate::fhir_api::FaceListener> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} for the {what}"))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        base_url = %base_url,
        tls = tls.is_some(),
        "{what} serving"
    );
    Ok(crate::fhir_api::FaceListener::new(listener, tls)?)
}

/// Binds the ops listener (`/livez`, `/readyz`, `/metrics`) and serves it until the process ends.
pub async fn start_ops(listen: std::net::SocketAddr) -> anyhow::Result<Arc<crate::ops::Ops>> {
    let metrics =
        crate::metrics::install().map_err(|e| anyhow::anyhow!("cannot record metrics: {e}"))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} for probes and metrics"))?;
    tracing::info!(listen = %listener.local_addr()?, "probes at /livez and /readyz, Prometheus metrics at /metrics");
    let ops = crate::ops::Ops::new(Some(metrics));
    let serving = ops.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::ops::serve(listener, serving).await {
            tracing::error!(error = %e, "ops listener stopped");
        }
    });
    Ok(ops)
}

async fn wait_for(mut flag: tokio::sync::watch::Receiver<bool>) {
    let _ = flag.wait_for(|stop| *stop).await;
}

/// SIGHUP re-reads the sources; an invalid file is rejected and the running sources stay.
/// Edited keys a reload cannot apply are named, compared with the file the broker started with.
async fn reload_on_hangup(broker: Arc<Broker>, path: std::path::PathBuf, started_with: String) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            return;
        };
        while hangups.recv().await.is_some() {
            let edited = std::fs::read_to_string(&path).unwrap_or_default();
            let pending = crate::reload::keys_needing_restart(&started_with, &edited);
            if !pending.is_empty() {
                tracing::warn!(
                    keys = %pending.join(", "),
                    "changed in the file but applied only by a restart"
                );
            }
            match registry::reload(&broker, &path) {
                Ok(n) => tracing::info!(
                    sources = n,
                    epoch = broker.sources().epoch,
                    "configuration reloaded"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "configuration reload rejected; keeping the running sources")
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (broker, path, started_with);
    }
}

/// `carerecord check-config`: parses the file and runs exactly what `serve` builds and checks
/// before binding a port (sources, directory, router, objections file, TLS material, the audit
/// trail), without binding ports or holding the audit trail's lock.
pub fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let assembly = assemble(&config, Trail::Check)?;
    println!(
        "{}: OK ({} sources, listening on {}{})",
        path.display(),
        assembly.source_count,
        config.server.listen,
        if config.server.plaintext {
            ", plaintext"
        } else {
            ""
        }
    );
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
