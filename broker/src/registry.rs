//! Builds the running source set from configuration: one adapter per `[[sources]]` entry.

use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::federation::BrokerSource;
use carerecord_adapters::fhir::FhirSource;
use carerecord_adapters::{Source, SourceInfo};

use crate::breaker::BreakerConfig;
use crate::config::Config;
use crate::fanout::{ConfiguredSource, SourceSet};

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
        let source: Arc<dyn Source> = match (&s.fhir, &s.broker) {
            (Some(fhir), _) => {
                Arc::new(FhirSource::new(info, fhir).map_err(|e| failed(e.to_string()))?)
            }
            (None, Some(remote)) => {
                Arc::new(BrokerSource::new(info, remote).map_err(|e| failed(e.to_string()))?)
            }
            (None, None) => return Err(failed("no source kind configured".into())),
        };
        let r = &config.resilience;
        sources.push(ConfiguredSource::with_limits(
            source,
            config.source_timeout(s),
            BreakerConfig {
                failures: r.breaker_failures,
                open_for: Duration::from_millis(r.breaker_open_ms),
            },
            s.max_in_flight.unwrap_or(r.source_max_in_flight),
        ));
    }
    Ok(SourceSet { sources, epoch })
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
    let count = set.sources.len();
    broker.replace_sources(set);
    Ok(count)
}
