//! The per-source NHS number -> Patient id cache: what lets a repeat lookup skip the Patient
//! search and read the record by id in one round trip.
//!
//! The id is a hint, never a trust decision. The lookup that uses it verifies, on that very
//! answer, that the Patient at the id still carries the NHS number (and is active) before any
//! resource is used; an answer that fails is discarded and the entry evicted (see
//! `query::Lookup::by_cached_id`). Only a verified Patient search that found exactly one Patient
//! fills it, and failures are never cached.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::NhsNumber;

/// Bounded (least recently used out first) and expiring: a patient nobody looks up again does
/// not stay in memory.
#[derive(Clone)]
pub(crate) struct PatientIds {
    cache: moka::future::Cache<NhsNumber, Arc<str>>,
}

impl PatientIds {
    pub(crate) fn new(capacity: u64, ttl: Duration) -> PatientIds {
        PatientIds {
            cache: moka::future::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        }
    }

    /// The server id last verified for this NHS number, if any.
    pub(crate) async fn get(&self, nhs_number: &NhsNumber) -> Option<Arc<str>> {
        self.cache.get(nhs_number).await
    }

    /// Remembers the id a verified Patient search found.
    pub(crate) async fn insert(&self, nhs_number: NhsNumber, id: &str) {
        self.cache.insert(nhs_number, Arc::from(id)).await;
    }

    /// Forgets an id whose Patient failed verification (or is gone).
    pub(crate) async fn evict(&self, nhs_number: &NhsNumber) {
        self.cache.invalidate(nhs_number).await;
    }
}

/// Never the entries: NHS numbers and ids stay out of logs.
impl fmt::Debug for PatientIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PatientIds")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}
