//! What a lookup answers, in the core's own terms. Faces translate it: the gRPC face into
//! `GetCareRecordResponse` and `CareRecordEvent`, the CLI into text, the coming FHIR and web faces
//! into theirs. The record itself is the shared domain vocabulary (`CareRecord` and friends).

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use carerecord_proto::{CareRecord, LocatorStatus, SectionStatus, SourceStatus, Warning};

use crate::merge::MergedRecord;

/// The record as disclosed to one requester: the cached merged record itself when nothing was
/// withheld from them (shared, not copied: a cache hit then costs no copy of the record), or
/// their own filtered copy. Reads as a `CareRecord`.
#[derive(Debug, Clone, Default)]
pub struct Disclosed {
    /// The merged record, shared, when all of it is disclosed.
    whole: Option<Arc<MergedRecord>>,
    /// Otherwise this requester's copy.
    own: CareRecord,
}

impl Disclosed {
    /// All of `merged`'s record, as merged.
    pub fn whole(merged: Arc<MergedRecord>) -> Self {
        Disclosed {
            whole: Some(merged),
            own: CareRecord::default(),
        }
    }

    /// Whether this is the merged record itself, shared.
    pub fn is_shared(&self) -> bool {
        self.whole.is_some()
    }

    /// The record by value (copied when shared).
    pub fn into_owned(self) -> CareRecord {
        match self.whole {
            Some(merged) => merged.record.clone(),
            None => self.own,
        }
    }
}

impl Deref for Disclosed {
    type Target = CareRecord;

    fn deref(&self) -> &CareRecord {
        match &self.whole {
            Some(merged) => &merged.record,
            None => &self.own,
        }
    }
}

impl DerefMut for Disclosed {
    /// Copies a shared record first: the cached one is never changed.
    fn deref_mut(&mut self) -> &mut CareRecord {
        if let Some(merged) = self.whole.take() {
            self.own = merged.record.clone();
        }
        &mut self.own
    }
}

impl From<CareRecord> for Disclosed {
    fn from(own: CareRecord) -> Self {
        Disclosed { whole: None, own }
    }
}

/// A care record as this requester may see it, with how it was assembled.
#[derive(Debug, Clone)]
pub struct LookupAnswer {
    pub request_id: String,
    /// The merged record, filtered for this requester.
    pub record: Disclosed,
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
