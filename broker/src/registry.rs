//! Builds the running source set from configuration: one adapter per `[[sources]]` entry.

use std::sync::Arc;

use carerecord_adapters::federation::BrokerSource;
use carerecord_adapters::fhir::FhirSource;
use carerecord_adapters::{Source, SourceInfo};

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
        sources.push(ConfiguredSource {
            source,
            timeout: config.source_timeout(s),
        });
    }
    Ok(SourceSet { sources, epoch })
}
