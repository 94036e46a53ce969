//! The broker's lookup pipeline: checked request → (access policy) → cache → single-flight
//! fan-out → merge → response.
//!
//! Access decisions belong before the cache and filtering after it, on every request: a cached
//! record is what the sources said, not what this requester may see.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use carerecord_adapters::SourceRequest;
use carerecord_proto::{CareRecord, GetCareRecordResponse, Section, SourceEvent};
use tokio::time::Instant;

use crate::budget::Budget;
use crate::cache::{CacheKey, RecordCache};
use crate::config::{BudgetConfig, CacheConfig};
use crate::error::LookupError;
use crate::fanout::{Answer, SourceSet};
use crate::flight::{Flight, Flights};
use crate::merge::MergedRecord;
use crate::validate::LookupRequest;

/// The broker: everything a lookup needs, shared by all requests.
pub struct Broker {
    /// Our name in federation chains; a lookup that already passed through it is refused.
    broker_id: String,
    /// Deadline rules.
    budget: BudgetConfig,
    /// The current sources; swapped whole on reload, so in-flight lookups keep theirs.
    sources: RwLock<Arc<SourceSet>>,
    /// Recently merged records.
    cache: Arc<RecordCache>,
    /// Fan-outs in progress, shared by concurrent lookups of the same record.
    flights: Arc<Flights>,
    /// Makes request ids unique within this process.
    counter: AtomicU64,
}

/// How a lookup will be answered.
pub enum Lookup {
    /// From cache.
    Cached {
        record: Arc<MergedRecord>,
        age: Duration,
    },
    /// From a fan-out in progress (possibly shared), waited on until `deadline`.
    Live {
        flight: Arc<Flight>,
        deadline: Instant,
    },
}

impl Broker {
    pub fn new(
        broker_id: String,
        budget: BudgetConfig,
        cache: &CacheConfig,
        sources: SourceSet,
    ) -> Broker {
        Broker {
            broker_id,
            budget,
            sources: RwLock::new(Arc::new(sources)),
            cache: Arc::new(RecordCache::new(
                cache.max_bytes,
                cache.ttl(),
                cache.partial_ttl(),
            )),
            flights: Arc::new(Flights::default()),
            counter: AtomicU64::new(0),
        }
    }

    pub fn broker_id(&self) -> &str {
        &self.broker_id
    }

    /// The sources lookups start with now.
    pub fn sources(&self) -> Arc<SourceSet> {
        self.sources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the sources; lookups in progress finish with the old set.
    pub fn replace_sources(&self, sources: SourceSet) {
        *self.sources.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(sources);
    }

    pub fn cache(&self) -> &RecordCache {
        &self.cache
    }

    pub fn flights_in_progress(&self) -> usize {
        self.flights.len()
    }

    /// A new request id: time-ordered and unique within the process.
    pub fn new_request_id(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        format!("{t:x}-{n:x}")
    }

    /// Starts (or joins, or serves from cache) the lookup.
    pub async fn begin(&self, request: &LookupRequest) -> Result<Lookup, LookupError> {
        if request.via_brokers.iter().any(|b| *b == self.broker_id) {
            return Err(LookupError::Loop(self.broker_id.clone()));
        }
        let budget = Budget::new(
            Instant::now(),
            request.caller_timeout,
            Duration::from_millis(self.budget.max_lookup_ms),
            Duration::from_millis(self.budget.merge_headroom_ms),
        )?;
        let sources = self.sources();
        let key = CacheKey::new(sources.epoch, request.nhs_number, request.sections);
        if !request.require_fresh {
            if let Some((record, age)) = self.cache.get(&key).await {
                tracing::debug!(age_ms = age.as_millis() as u64, "served from cache");
                return Ok(Lookup::Cached { record, age });
            }
        }
        let mut via_brokers = request.via_brokers.clone();
        via_brokers.push(self.broker_id.clone());
        let source_request = SourceRequest {
            request_id: request.request_id.clone(),
            nhs_number: request.nhs_number,
            sections: request.sections,
            deadline: budget.sources_deadline,
            requester: request.requester.clone(),
            via_brokers,
        };
        let (flight, started) =
            self.flights
                .join_or_start(key, sources, source_request, budget, self.cache.clone());
        tracing::debug!(joined = !started, "fan-out");
        // Wait a little past the sources' deadline (half the merge headroom): the flight
        // finishes by its own deadline, and taking its merged record keeps one canonical
        // answer per flight instead of a near-identical re-merge racing the flight's timers.
        let headroom = budget.caller_deadline - budget.sources_deadline;
        Ok(Lookup::Live {
            flight,
            deadline: budget.sources_deadline + headroom / 2,
        })
    }

    /// The response for `request` from a merged record. Access filtering for the requester
    /// happens here, on cached and fresh records alike.
    pub fn respond(
        &self,
        request: &LookupRequest,
        merged: &MergedRecord,
        from_cache: bool,
        age: Duration,
    ) -> GetCareRecordResponse {
        GetCareRecordResponse {
            request_id: request.request_id.clone(),
            record: Some(merged.record.clone()),
            sources: merged.sources.clone(),
            complete: merged.complete,
            from_cache,
            cache_age_ms: if from_cache {
                age.as_millis() as u64
            } else {
                0
            },
            warnings: merged.warnings.clone(),
            emergency_access: false,
            withheld: false,
            assembled_at: crate::time::rfc3339(merged.assembled_at),
        }
    }

    /// The stream event for one live answer.
    pub fn source_event(&self, _request: &LookupRequest, answer: &Answer) -> SourceEvent {
        SourceEvent {
            status: Some(answer.status.clone()),
            contribution: answer.record.as_ref().map(|r| r.record.clone()),
        }
    }

    /// Stream events replayed from a cached record: each source's status, and the merged
    /// entries it reported.
    pub fn replayed_source_events(
        &self,
        _request: &LookupRequest,
        merged: &MergedRecord,
    ) -> Vec<SourceEvent> {
        merged
            .sources
            .iter()
            .map(|status| {
                let mut contribution = CareRecord::default();
                // A federated broker's entries carry "its-id/remote-id".
                let nested_prefix = format!("{}/", status.source_id);
                let ours = |id: &str| id == status.source_id || id.starts_with(&nested_prefix);
                let reported_by = |e: &&carerecord_proto::Entry| {
                    e.provenance.iter().any(|p| ours(&p.source_id))
                };
                for section in Section::ALL {
                    if let Some(slot) = contribution.section_mut(section) {
                        slot.extend(
                            merged
                                .record
                                .section(section)
                                .iter()
                                .filter(reported_by)
                                .cloned(),
                        );
                    }
                }
                if let Some(p) = &merged.record.patient {
                    if p.provenance.iter().any(|p| ours(&p.source_id)) {
                        contribution.patient = Some(p.clone());
                    }
                }
                SourceEvent {
                    status: Some(status.clone()),
                    contribution: Some(contribution),
                }
            })
            .collect()
    }
}
