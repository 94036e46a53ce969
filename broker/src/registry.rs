//! Builds the running source set from configuration: one adapter per `[[sources]]` entry.

use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::federation::BrokerSource;
use carerecord_adapters::fhir::{FhirConfig, FhirLocator, FhirSource};
use carerecord_adapters::grpc::GrpcSource;
use carerecord_adapters::locator::Locator;
use carerecord_adapters::{Source, SourceInfo};

use crate::breaker::BreakerConfig;
use crate::config::{Config, RoutingMode, SourceKind};
use crate::directory::LazyFhirSource;
use crate::fanout::{ConfiguredSource, SourceSet};
use crate::routing::Router;

/// A source that could not be built (bad certificate, missing token variable, ...).
#[derive(Debug, thiserror::Error)]
#[error("source {id}: {message}")]
pub struct BuildError {
    pub id: String,
    pub message: String,
}

/// Builds every configured source. `epoch` distinguishes this set from earlier ones.
pub fn build(config: &Config, epoch: u64) -> Result<SourceSet, BuildError> {
    let mut sources = Vec::with_capacity(config.sources.len());
    for s in &config.sources {
        let info = SourceInfo {
            id: s.id.clone(),
            organisation_code: s.organisation_code.clone(),
            organisation_name: s.organisation_name.clone(),
        };
        let failed = |message: String| BuildError {
            id: s.id.clone(),
            message,
        };
        let source: Arc<dyn Source> = match &s.kind {
            SourceKind::Fhir(fhir) => {
                Arc::new(FhirSource::new(info, fhir).map_err(|e| failed(e.to_string()))?)
            }
            SourceKind::Broker(remote) => {
                Arc::new(BrokerSource::new(info, remote).map_err(|e| failed(e.to_string()))?)
            }
            SourceKind::Grpc(server) => {
                Arc::new(GrpcSource::new(info, server).map_err(|e| failed(e.to_string()))?)
            }
        };
        sources.push(configured(
            config,
            source,
            config.source_timeout(s),
            s.max_in_flight,
        ));
    }
    if let Some(directory) = &config.directory {
        let rows = crate::directory::load(directory).map_err(|e| BuildError {
            id: "directory".into(),
            message: e.to_string(),
        })?;
        let timeout = Duration::from_millis(
            directory
                .timeout_ms
                .unwrap_or(config.budget.default_source_timeout_ms),
        );
        let client = crate::directory::DirectoryClient::default();
        for row in rows {
            let mut fhir = FhirConfig::new(row.base_url);
            fhir.mode = directory.mode;
            fhir.ca_cert.clone_from(&directory.ca_cert);
            let info = SourceInfo {
                id: row.code.to_ascii_lowercase(),
                organisation_code: row.code,
                organisation_name: row.name,
            };
            sources.push(configured(
                config,
                Arc::new(LazyFhirSource::new(info, fhir, client.clone())),
                timeout,
                None,
            ));
        }
    }
    Ok(SourceSet::new(sources, epoch))
}

/// A source under the configuration's resilience settings (breaker, bulkhead) and `timeout`.
/// Also for sources built outside the configuration (the development tools' in-process ones).
pub fn configured(
    config: &Config,
    source: Arc<dyn Source>,
    timeout: Duration,
    max_in_flight: Option<usize>,
) -> ConfiguredSource {
    let r = &config.resilience;
    ConfiguredSource::with_limits(
        source,
        timeout,
        BreakerConfig {
            failures: r.breaker_failures,
            open_for: Duration::from_millis(r.breaker_open_ms),
        },
        max_in_flight.unwrap_or(r.source_max_in_flight),
    )
}

/// The router the configuration asks for.
pub fn router(config: &Config) -> Result<Router, BuildError> {
    let routing = &config.routing;
    if routing.mode == RoutingMode::All {
        return Ok(Router::all());
    }
    let mut locators: Vec<Arc<dyn Locator>> = Vec::with_capacity(routing.locators.len());
    for l in &routing.locators {
        locators.push(Arc::new(FhirLocator::new(l).map_err(|e| BuildError {
            id: format!("locator {}", l.id),
            message: e.to_string(),
        })?));
    }
    Ok(Router::located(
        routing.always_ask.iter().cloned(),
        locators,
        Duration::from_millis(routing.locator_timeout_ms.unwrap_or(500)),
        Duration::from_secs(routing.locator_cache_secs.unwrap_or(60)),
    ))
}

/// Why a reload was rejected (the running sources stay as they were).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Re-reads the configuration and swaps in its sources (added, removed or retimed). Lookups in
/// progress finish with the sources they started with; new lookups use the new set, under a new
/// cache epoch. Other sections (listen address, TLS, access, audit) need a restart.
pub fn reload(broker: &crate::Broker, path: &std::path::Path) -> Result<usize, ReloadError> {
    let config = Config::load(path)?;
    let epoch = broker.sources().epoch + 1;
    let set = build(&config, epoch)?;
    let router = router(&config)?;
    let count = set.sources.len();
    broker.replace_router(router);
    broker.replace_sources(set);
    Ok(count)
}
