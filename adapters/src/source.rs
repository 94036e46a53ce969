//! The `Source` trait: the one extension point through which carerecord reads an organisation.
//!
//! A source is to carerecord what `tower::Service` is to tower. Built-in adapters (FHIR R4, another
//! broker), the in-memory test source and any adapter an outside author writes all implement it.

use std::time::Duration;

use async_trait::async_trait;
use carerecord_proto::{CareRecord, Entry, Requester, SourceOutcome, SourceStatus};
use tokio::time::Instant;

use crate::{NhsNumber, SectionSet};

/// Static facts about a source: who it is in the broker's configuration and in the NHS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInfo {
    /// The broker's identifier for the source, unique within a configuration.
    pub id: String,
    /// ODS code of the organisation behind the source.
    pub organisation_code: String,
    /// Human name of the organisation.
    pub organisation_name: String,
}

/// One lookup, as a source sees it.
#[derive(Debug, Clone)]
pub struct SourceRequest {
    /// The broker's request id, for the source's own logs and audit.
    pub request_id: String,
    /// The patient.
    pub nhs_number: NhsNumber,
    /// The sections wanted; never empty. A source may return more; the broker drops the excess.
    pub sections: SectionSet,
    /// When the broker stops waiting. A source should stop its own work by then, and may return
    /// what it has gathered so far rather than nothing.
    pub deadline: Instant,
    /// Who is asking, forwarded so the source system can keep its own audit. A source must not
    /// filter by requester: the broker applies access policy itself, after its cache, on every
    /// request, and shares one fetch between concurrent requesters.
    pub requester: Requester,
    /// Brokers this lookup has passed through (for federation loop detection).
    pub via_brokers: Vec<String>,
}

impl SourceRequest {
    /// Time left before the deadline (zero once it has passed).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// What a source knows about the patient.
// Boxing `Found` would cost an allocation on the common path to save bytes on the rarer one.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum SourceReply {
    /// The source knows the patient: here is its part of the record.
    Found(SourceRecord),
    /// The source answered and does not know this patient. Not a failure.
    NotFound,
}

/// One source's part of a care record, before merging.
#[derive(Debug, Default, Clone)]
pub struct SourceRecord {
    /// Demographics and entries. Each entry should carry one provenance naming this source, with
    /// the source's own id for the entry and its last-updated time; the broker fills the source id
    /// and organisation from [`SourceInfo`] where an adapter leaves them empty.
    pub record: CareRecord,
    /// Problems the source had that did not stop it answering, e.g. resources it could not read.
    /// Redacted text: no patient data, no raw bodies. Each becomes a warning on the response.
    pub warnings: Vec<String>,
    /// When the source is itself a broker: the statuses of its sources.
    pub nested: Vec<SourceStatus>,
    /// Where this answer is known to be incomplete: sections cut at the page limit, resources
    /// that could not be read, references that could not be resolved, or (for a federated
    /// broker) its own sources not all answering. Any shortfall makes the source PARTIAL and the
    /// record not complete. Redacted text only.
    pub shortfalls: Vec<Shortfall>,
    /// Resources the source returned about another patient, discarded before they reached the
    /// record: one redacted description each (resource type and why, never content). Non-empty
    /// raises a WRONG_PATIENT warning and makes the record not complete.
    pub wrong_patient: Vec<String>,
}

/// Part of a source's answer that is known to be missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    /// The sections affected.
    pub sections: SectionSet,
    /// What is missing and why, e.g. "results cut at the 20-page limit". Redacted text.
    pub reason: String,
}

impl SourceRecord {
    /// Fills empty provenance fields of every entry (and the demographics) from `info`, and gives
    /// entries with no provenance at all one naming `info`.
    pub fn stamp_provenance(&mut self, info: &SourceInfo) {
        let stamp = |p: &mut carerecord_proto::Provenance| {
            if p.source_id.is_empty() {
                p.source_id.clone_from(&info.id);
            }
            if p.organisation_code.is_empty() {
                p.organisation_code.clone_from(&info.organisation_code);
            }
            if p.organisation_name.is_empty() {
                p.organisation_name.clone_from(&info.organisation_name);
            }
        };
        let fill = |provenance: &mut Vec<carerecord_proto::Provenance>| {
            if provenance.is_empty() {
                provenance.push(carerecord_proto::Provenance::default());
            }
            provenance.iter_mut().for_each(stamp);
        };
        if let Some(patient) = self.record.patient.as_mut() {
            fill(&mut patient.provenance);
        }
        for section in carerecord_proto::Section::ALL {
            if let Some(entries) = self.record.section_mut(section) {
                entries
                    .iter_mut()
                    .for_each(|e: &mut Entry| fill(&mut e.provenance));
            }
        }
    }
}

/// Why a source could not answer. Every variant's text is safe to show a caller: adapters put
/// no raw upstream bodies, patient data or credentials in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The source did not answer before the deadline.
    #[error("did not answer in time")]
    Timeout,
    /// The source could not be reached (DNS, connect, TLS, reset).
    #[error("could not reach the source: {0}")]
    Connect(String),
    /// The source answered with an HTTP (or gRPC) error status.
    #[error("source answered with status {0}")]
    Status(u16),
    /// The source answered with something that is not a valid response.
    #[error("invalid response: {0}")]
    InvalidResponse(String),
    /// The response exceeded the configured size cap.
    #[error("response larger than the {0}-byte limit")]
    TooLarge(usize),
    /// The source refused the lookup (e.g. a federation loop).
    #[error("refused: {0}")]
    Refused(String),
    /// The source answered about a different patient (its Patient does not carry the requested
    /// NHS number): nothing it said may be used.
    #[error("answered about another patient: {0}")]
    WrongPatient(String),
    /// The source was not asked because it is known to be unavailable.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The source's circuit breaker is open.
    #[error("circuit open after repeated failures")]
    CircuitOpen,
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl SourceError {
    /// The outcome this error is reported as.
    pub fn outcome(&self) -> SourceOutcome {
        match self {
            SourceError::Timeout => SourceOutcome::Timeout,
            SourceError::Refused(_) => SourceOutcome::Refused,
            SourceError::WrongPatient(_) => SourceOutcome::WrongPatient,
            SourceError::Unavailable(_) => SourceOutcome::Unavailable,
            SourceError::CircuitOpen => SourceOutcome::CircuitOpen,
            SourceError::Connect(_)
            | SourceError::Status(_)
            | SourceError::InvalidResponse(_)
            | SourceError::TooLarge(_)
            | SourceError::Other(_) => SourceOutcome::Error,
        }
    }
}

/// A source of care record data: one organisation's system.
///
/// Contract (checked by [`crate::testkit`]):
/// - `fetch` answers by `request.deadline` (the broker also enforces it, and drops the future);
/// - dropping the future at any await point leaves the source usable (cancellation-safe);
/// - a patient the source does not know is `Ok(SourceReply::NotFound)`, not an error;
/// - garbage from upstream becomes a `SourceError` or a warning, never a panic;
/// - entries carry provenance (the source's id for the entry and when it was last updated).
#[async_trait]
pub trait Source: Send + Sync {
    /// Who this source is.
    fn info(&self) -> &SourceInfo;

    /// Reads the patient's record from the source.
    async fn fetch(&self, request: &SourceRequest) -> Result<SourceReply, SourceError>;

    /// Whether this source's answer depends on who is asking. Sources should not filter by
    /// requester (the broker applies access policy itself), and the default says they don't.
    /// A source that cannot help it — another broker applying its own policy — says `true`, and
    /// the broker then never shares its answer between different requesters (cache and
    /// coalescing are keyed by requester too).
    fn answers_depend_on_requester(&self) -> bool {
        false
    }

    /// A record locator's hint: `patient_id` is this organisation's own id for the patient
    /// with `nhs_number`. A source that can read a record by id (the FHIR adapter's verified
    /// patient-id cache) may use it to skip its patient search; it must verify the answer as
    /// for any remembered id (another person's record is discarded and the search made). The
    /// default ignores it.
    async fn hint_patient_id(&self, nhs_number: NhsNumber, patient_id: &str) {
        let _ = (nhs_number, patient_id);
    }

    /// Streams one document this source listed in a patient's record (its `DocumentDetail.url`
    /// as the source gave it). The broker has already decided that the requester may see it and
    /// audited the retrieval; the source must only fetch that URL from its own system (never
    /// follow it elsewhere), say its content type, and stop at `request.max_bytes`. The default:
    /// this source serves no documents.
    async fn fetch_document(&self, request: &DocumentRequest) -> Result<Document, SourceError> {
        let _ = request;
        Err(SourceError::Refused(
            "this source does not serve documents through the broker".into(),
        ))
    }
}

/// One document a source listed in a patient's record, asked for by the source's own URL.
#[derive(Debug, Clone)]
pub struct DocumentRequest {
    /// The broker's request id.
    pub request_id: String,
    /// The source's own URL for the content, exactly as its record gave it.
    pub url: String,
    /// When the broker stops waiting for the content to start.
    pub deadline: Instant,
    /// The largest content the broker passes on.
    pub max_bytes: u64,
    /// Who is asking, for the source's own audit.
    pub requester: Requester,
}

/// A document's content as it streams from the source.
pub struct Document {
    /// The media type the source declared (`application/octet-stream` when it declared none).
    pub content_type: String,
    /// The length, when the source declared it.
    pub length: Option<u64>,
    /// The content; an error ends it (the broker then cuts the response short).
    pub body: futures::stream::BoxStream<'static, Result<bytes::Bytes, SourceError>>,
}

impl std::fmt::Debug for Document {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Document")
            .field("content_type", &self.content_type)
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}
