//! The merged-record cache: brief, bounded by weight, keyed by everything that changes a merged
//! record.
//!
//! Access policy is not part of the key on purpose: the cache holds what the sources said, and
//! every request — hit or miss — is filtered for its requester after the cache. Expiry is judged
//! on tokio time (so tests can pause it); moka's own time-to-live only reclaims memory.

use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::{NhsNumber, SectionSet};
use moka::future::Cache;
use prost::Message;
use tokio::time::Instant;

use crate::merge::MergedRecord;

/// Bumped whenever the meaning of a cached record changes, so old entries never match.
const KEY_VERSION: u8 = 2;

/// What a merged record depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey {
    version: u8,
    /// The source set the record was merged from (changes on config reload).
    epoch: u64,
    nhs_number: NhsNumber,
    sections: SectionSet,
    /// 0, or — when a source's answer depends on the requester (federation) — a digest of
    /// everything about the requester that can change it.
    requester_scope: u64,
}

impl CacheKey {
    pub fn new(epoch: u64, nhs_number: NhsNumber, sections: SectionSet) -> Self {
        CacheKey {
            version: KEY_VERSION,
            epoch,
            nhs_number,
            sections,
            requester_scope: 0,
        }
    }

    /// This key, for one requester only.
    pub fn scoped_to(mut self, request: &crate::validate::LookupRequest) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let q = &request.requester;
        (
            &q.user_id,
            &q.role_code,
            &q.organisation_code,
            q.purpose,
            &q.asserted_relationship,
            &request.via_brokers,
        )
            .hash(&mut h);
        // Never 0, which means "shared".
        self.requester_scope = h.finish() | 1;
        self
    }
}

/// Merged records, briefly.
pub struct RecordCache {
    entries: Cache<CacheKey, Arc<MergedRecord>>,
    ttl: Duration,
    partial_ttl: Duration,
}

struct Ttl {
    ttl: Duration,
    partial_ttl: Duration,
}

impl moka::Expiry<CacheKey, Arc<MergedRecord>> for Ttl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<MergedRecord>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(if value.complete {
            self.ttl
        } else {
            self.partial_ttl
        })
    }
}

impl RecordCache {
    pub fn new(max_bytes: u64, ttl: Duration, partial_ttl: Duration) -> Self {
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k, v: &Arc<MergedRecord>| weight(v))
            .expire_after(Ttl { ttl, partial_ttl })
            .build();
        RecordCache {
            entries,
            ttl,
            partial_ttl,
        }
    }

    /// A record still fresh enough to serve, with its age.
    pub async fn get(&self, key: &CacheKey) -> Option<(Arc<MergedRecord>, Duration)> {
        let record = self.entries.get(key).await?;
        let age = Instant::now().saturating_duration_since(record.assembled);
        let ttl = if record.complete {
            self.ttl
        } else {
            self.partial_ttl
        };
        if age >= ttl {
            self.entries.invalidate(key).await;
            return None;
        }
        Some((record, age))
    }

    /// Keeps a merged record. Records with no source answering at all are not kept: they carry
    /// no data and would only hide a recovered source.
    pub async fn insert(&self, key: CacheKey, record: Arc<MergedRecord>) {
        if record
            .sources
            .iter()
            .any(|s| crate::merge::answered(s.outcome))
            && !self.ttl.is_zero()
        {
            self.entries.insert(key, record).await;
        }
    }

    /// Number of records held (approximate, for metrics).
    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Total weight held, in bytes (approximate, for metrics).
    pub fn weighted_size(&self) -> u64 {
        self.entries.weighted_size()
    }

    /// Drops everything (config reload, tests).
    pub fn clear(&self) {
        self.entries.invalidate_all();
    }
}

/// Heap bytes a decoded record takes per encoded byte, and a fixed part per cached record:
/// measured with a counting allocator on the mock region's realistic records
/// (`broker/tests/cache_weight.rs` checks the weight never under-counts): prost holds a heap
/// `String` per field, a `Vec` per list and provenance per entry, ~5.5 × the encoded size, plus
/// a few KB of structure per record.
const DECODED_PER_ENCODED: usize = 6;
const FIXED_PER_RECORD: usize = 8 * 1024;

/// The weight of a cached record: an estimate of the heap it holds — the merged record, the
/// statuses and warnings, and the sources' answers it keeps (a patient's objection is answered
/// from them) — so `cache.max_bytes` bounds memory.
pub fn weight(record: &MergedRecord) -> u32 {
    let statuses: usize = record.sources.iter().map(|s| s.encoded_len()).sum();
    let warnings: usize = record.warnings.iter().map(|w| w.encoded_len()).sum();
    let sections: usize = record
        .section_statuses
        .iter()
        .map(|s| s.encoded_len())
        .sum();
    let answers: usize = record
        .answers
        .iter()
        .filter_map(|a| a.record.as_ref())
        .map(|r| r.record.encoded_len() + r.warnings.iter().map(String::len).sum::<usize>())
        .sum();
    let encoded = record.record.encoded_len() + statuses + warnings + sections + answers;
    (encoded * DECODED_PER_ENCODED + FIXED_PER_RECORD)
        .try_into()
        .unwrap_or(u32::MAX)
}
