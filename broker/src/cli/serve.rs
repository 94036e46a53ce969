//! `carerecord serve` and `carerecord check-config`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use carerecord_broker::access::Policy;
use carerecord_broker::audit::AuditLog;
use carerecord_broker::config::Config;
use carerecord_broker::fanout::SourceSet;
use carerecord_broker::lookup::BrokerParts;
use carerecord_broker::server::Transport;
use carerecord_broker::{Broker, registry, server};

pub async fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let sources = registry::build(&config, 1)?;
    if config.server.plaintext {
        tracing::warn!(
            listen = %config.server.listen,
            "SERVING WITHOUT TLS: plaintext gRPC is for local development only; patient data crosses the network unencrypted"
        );
    }
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let transport = Transport::from_config(&config.server)?;
    let broker = Arc::new(build_broker(&config, sources)?);
    tracing::info!(
        listen = %listener.local_addr()?,
        sources = config.sources.len(),
        "carerecord broker serving"
    );
    server::run(listener, broker, transport, shutdown_signal()).await?;
    tracing::info!("carerecord broker stopped");
    Ok(())
}

/// A broker from config: policy, audit trail and sources.
pub fn build_broker(config: &Config, sources: SourceSet) -> anyhow::Result<Broker> {
    let policy = Policy::new(&config.access)?;
    let audit = AuditLog::open(&config.audit.file, config.audit.fsync)?;
    Ok(Broker::new(
        BrokerParts {
            broker_id: config.server.broker_id.clone(),
            budget: config.budget.clone(),
            cache: config.cache.clone(),
            policy,
            audit,
        },
        sources,
    ))
}

pub fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    registry::build(&config, 1)?;
    Policy::new(&config.access)?;
    Transport::from_config(&config.server)?;
    println!(
        "{}: OK ({} sources, listening on {}{})",
        path.display(),
        config.sources.len(),
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
