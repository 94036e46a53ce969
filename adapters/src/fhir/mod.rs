//! The FHIR R4 source adapter: reads one organisation's FHIR API (UK Core) as a [`Source`].
//!
//! Most organisations carerecord reads expose FHIR R4 over HTTPS, so this is the adapter most
//! sources use. It finds the patient by NHS number, reads the wanted sections (by search,
//! `$everything` or batch, see [`QueryMode`]; or both in one batch of chained searches), and
//! maps the resources to carerecord entries.
//! A resource it cannot read costs a warning, not the source's answer.
//!
//! Code map: `config` (settings, config errors), `client` (HTTP, TLS, limits, redaction),
//! `query` (the lookup flows), `patient_ids` (the NHS number -> Patient id cache), `bundle`
//! (Bundles, paging, OperationOutcome), `identity` (every resource is about the patient matched
//! by NHS number), `model` and `json` (lenient single-pass parsing), `map` (resources to entries).
//!
//! A lookup gathers the whole answer (every page of every search) before mapping anything, so a
//! reference is resolved wherever in the answer its target is, and every resource passes the
//! identity check whichever query mode brought it.

mod bundle;
mod client;
mod config;
mod identity;
mod json;
mod locator;
mod map;
mod model;
mod patient_ids;
mod query;

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use async_trait::async_trait;
use tracing::{Instrument, debug, info_span};

pub use client::SharedClient;
pub use config::{FhirConfig, FhirConfigError, MedicationKinds, QueryMode};
pub use locator::{FhirLocator, FhirLocatorConfig};

use crate::{NhsNumber, Source, SourceError, SourceInfo, SourceReply, SourceRequest};

/// A FHIR R4 server as a carerecord source.
#[derive(Debug)]
pub struct FhirSource {
    /// Who the source is, for provenance and logs.
    info: SourceInfo,
    /// The pooled HTTP client, shared by every lookup against this source.
    http: client::FhirHttp,
    /// How lookups ask the server.
    mode: QueryMode,
    /// Most pages followed per search, so a runaway server cannot keep a lookup paging.
    page_limit: usize,
    /// `_count` asked for per page, ready for the query string.
    page_size: String,
    /// Which medication resources count.
    medications: MedicationKinds,
    /// Set once the server has refused a chained search (`QueryMode::Chained`): later lookups
    /// go straight to the two-round-trip flow instead of paying for a refused batch each time,
    /// and the fallback is logged once per source rather than once per lookup. Never cleared:
    /// a server that gains the capability is read in one round trip after a restart.
    chain_unsupported: AtomicBool,
    /// NHS number -> the server's Patient id, learnt from Patient searches that found exactly
    /// one Patient carrying the NHS number: with it a lookup reads the record by id in one round
    /// trip. Only a hint: the Patient at the id is verified on every answer that uses it (see
    /// `query::Lookup::by_cached_id`). `None` when `patient_id_cache = false`.
    patient_ids: Option<patient_ids::PatientIds>,
}

impl FhirSource {
    /// Builds the source: reads certificate files, resolves the bearer token from its environment
    /// variable, and builds the pooled HTTP client. Fails with a message naming the setting or
    /// file at fault.
    pub fn new(info: SourceInfo, config: &FhirConfig) -> Result<FhirSource, FhirConfigError> {
        Self::with_client(info, config, SharedClient::new(config)?)
    }

    /// As [`FhirSource::new`], on an HTTP client shared with other sources of the same TLS
    /// settings (a directory's organisations). Limits, caches and token stay this source's own.
    pub fn with_client(
        info: SourceInfo,
        config: &FhirConfig,
        client: SharedClient,
    ) -> Result<FhirSource, FhirConfigError> {
        if config.page_limit == 0 {
            return Err(FhirConfigError::ZeroLimit {
                field: "page_limit",
            });
        }
        if config.page_size == 0 {
            return Err(FhirConfigError::ZeroLimit { field: "page_size" });
        }
        let patient_ids = if config.patient_id_cache {
            if config.patient_id_cache_capacity == 0 {
                return Err(FhirConfigError::ZeroLimit {
                    field: "patient_id_cache_capacity",
                });
            }
            if config.patient_id_cache_ttl_secs == 0 {
                return Err(FhirConfigError::ZeroLimit {
                    field: "patient_id_cache_ttl_secs",
                });
            }
            Some(patient_ids::PatientIds::new(
                config.patient_id_cache_capacity,
                Duration::from_secs(config.patient_id_cache_ttl_secs),
            ))
        } else {
            None
        };
        Ok(FhirSource {
            info,
            http: client::FhirHttp::with_client(config, client)?,
            mode: config.mode,
            page_limit: config.page_limit,
            page_size: config.page_size.to_string(),
            medications: config.medications,
            chain_unsupported: AtomicBool::new(false),
            patient_ids,
        })
    }

    /// Uses `token` as the bearer token, replacing any from `bearer_token_env`: for embedders
    /// that hold the token themselves, and for tests (setting process environment is `unsafe` in
    /// edition 2024).
    pub fn with_bearer_token(mut self, token: &str) -> Result<FhirSource, FhirConfigError> {
        self.http.set_bearer_token(token)?;
        Ok(self)
    }
}

#[async_trait]
impl Source for FhirSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    async fn fetch(&self, request: &SourceRequest) -> Result<SourceReply, SourceError> {
        let span =
            info_span!("fhir_fetch", request_id = %request.request_id, source = %self.info.id);
        async {
            let lookup = query::Lookup::new(self, request);
            let result = tokio::time::timeout_at(request.deadline, lookup.run(&request.nhs_number))
                .await
                .unwrap_or(Err(SourceError::Timeout));
            match &result {
                Ok(SourceReply::Found(record)) => debug!(
                    entries = record.record.entry_count(),
                    warnings = record.warnings.len(),
                    "fhir lookup answered"
                ),
                Ok(SourceReply::NotFound) => debug!("fhir lookup: patient not known"),
                Err(error) => debug!(%error, "fhir lookup failed"),
            }
            result
        }
        .instrument(span)
        .await
    }

    /// Seeds the verified id cache (never over an id this source verified itself): the next
    /// lookup reads the record by id and checks its Patient like any remembered id.
    async fn hint_patient_id(&self, nhs_number: NhsNumber, patient_id: &str) {
        let Some(ids) = &self.patient_ids else {
            return;
        };
        if is_fhir_id(patient_id) && ids.get(&nhs_number).await.is_none() {
            ids.insert(nhs_number, patient_id).await;
        }
    }

    async fn fetch_document(
        &self,
        request: &crate::DocumentRequest,
    ) -> Result<crate::Document, SourceError> {
        let mut headers = reqwest::header::HeaderMap::new();
        client::insert(&mut headers, "x-request-id", &request.request_id);
        client::insert(
            &mut headers,
            "x-carerecord-user",
            &request.requester.user_id,
        );
        client::insert(
            &mut headers,
            "x-carerecord-role",
            &request.requester.role_code,
        );
        tokio::time::timeout_at(
            request.deadline,
            self.http
                .get_document(&request.url, &headers, request.max_bytes),
        )
        .await
        .unwrap_or(Err(SourceError::Timeout))
    }
}

/// A FHIR logical id: 1–64 of `A-Z a-z 0-9 - .` (R4 `id` datatype). Anything else a locator
/// says is not used as one.
fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}
