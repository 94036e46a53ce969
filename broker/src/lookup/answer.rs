//! What a lookup answers, in the core's own terms. Faces translate it: the gRPC face into
//! `GetCareRecordResponse` and `CareRecordEvent`, the CLI into text, the coming FHIR and web faces
//! into theirs. The record itself is the shared domain vocabulary (`CareRecord` and friends).

use std::time::{Duration, SystemTime};

use carerecord_proto::{CareRecord, LocatorStatus, SectionStatus, SourceStatus, Warning};

/// A care record as this requester may see it, with how it was assembled.
#[derive(Debug, Clone)]
pub struct LookupAnswer {
    pub request_id: String,
    /// The merged record, filtered for this requester.
    pub record: CareRecord,
    /// One status per source asked (as far as this requester may see them).
    pub sources: Vec<SourceStatus>,
    /// Every source asked answered, and every locator too.
    pub complete: bool,
    /// `Some(age)` when served from the cache.
    pub cache_age: Option<Duration>,
    pub warnings: Vec<Warning>,
    /// Disclosed under emergency ("break-glass") access.
    pub emergency_access: bool,
    /// Something was held back from this requester (sensitive entries, another organisation's
    /// data under a patient's objection, a restricted patient's address).
    pub withheld: bool,
    /// When the merged record was assembled.
    pub assembled_at: SystemTime,
    /// What each record locator said, when the broker routes.
    pub locators: Vec<LocatorStatus>,
    /// Each section's state across the sources asked.
    pub section_statuses: Vec<SectionStatus>,
}

impl LookupAnswer {
    /// Whether this answer came from the cache.
    pub fn from_cache(&self) -> bool {
        self.cache_age.is_some()
    }
}

/// One source's part of a live (or replayed) lookup.
#[derive(Debug, Clone)]
pub struct SourceUpdate {
    pub status: SourceStatus,
    /// What the source contributed, as this requester may see it; `None` when it did not answer.
    pub contribution: Option<CareRecord>,
}

/// One event of a streamed lookup: sources as they finish, then the whole answer.
#[derive(Debug, Clone)]
// The final answer is one per stream; boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum StreamEvent {
    Source(SourceUpdate),
    Complete(LookupAnswer),
}
