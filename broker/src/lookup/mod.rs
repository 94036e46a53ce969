//! The broker core: one lookup pipeline for every face.
//!
//! checked request → door (shed or admit) → who is calling → policy admission (role, purpose)
//! → federation loop → budget → cache → single-flight fan-out → merge → disclosure
//! (relationship, this requester's view, audit).
//!
//! [`Broker::lookup`] answers once; [`Broker::stream`] answers source by source. Both return the
//! core's own [`LookupAnswer`] / [`StreamEvent`] and [`LookupError`]: the core imports no face
//! (no transport, no configuration-file types, no renderer). Faces — gRPC (`service.rs`), the
//! CLI, and the coming FHIR and web faces — check their requests in, call one of these, and
//! translate what comes out.
//!
//! Access decisions run on every request, hit or miss: a cached record is what the sources said,
//! not what this requester may see.

mod admission;
mod answer;
mod disclose;
mod document;
mod stream;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use carerecord_adapters::SourceRequest;
use tokio::time::Instant;
use tracing::Instrument;

pub use admission::{DEFAULT_MAX_LOOKUPS_IN_FLIGHT, LoadLimits, Slot};
pub use answer::{Disclosed, LookupAnswer, SourceUpdate, StreamEvent};
pub use document::DocumentAnswer;
pub use stream::LookupStream;

use crate::access::{Caller, Denial, Policy};
use crate::audit::AuditLog;
use crate::budget::Budget;
use crate::cache::{CacheKey, RecordCache};
use crate::documents::DocumentIds;
use crate::error::LookupError;
use crate::fanout::SourceSet;
use crate::flight::{Flight, Flights};
use crate::merge::MergedRecord;
use crate::routing::Router;
use crate::validate::LookupRequest;
use admission::Door;

/// Who is asking, as the face established it from its transport.
#[derive(Debug, Clone)]
pub enum CallingSystem {
    /// A known system (or `unverified` when the transport identifies nobody).
    Identified(Caller),
    /// The transport presented an identity the broker does not recognise: refused, and audited.
    Unrecognised,
}

/// The broker: everything a lookup needs, shared by all requests.
pub struct Broker {
    /// Our name in federation chains; a lookup that already passed through it is refused.
    broker_id: String,
    /// Deadline rules.
    deadlines: DeadlineRules,
    /// The current sources; swapped whole on reload, so in-flight lookups keep theirs.
    sources: RwLock<Arc<SourceSet>>,
    /// How sources are chosen per patient (all, or always-ask plus located); swapped on reload.
    router: RwLock<Arc<Router>>,
    /// Recently merged records.
    cache: Arc<RecordCache>,
    /// Fan-outs in progress, shared by concurrent lookups of the same record.
    flights: Arc<Flights>,
    /// Makes request ids unique within this process.
    counter: AtomicU64,
    /// Who may look and what they see.
    policy: Policy,
    /// Every access, allowed or denied.
    audit: AuditLog,
    /// Sheds excess lookups at once, and everything while draining.
    door: Door,
    /// Seals the broker-relative document references records carry.
    documents: Arc<DocumentIds>,
}

/// How long a lookup may take: the cap on any lookup, and the time kept back from the caller's
/// deadline to merge and answer.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineRules {
    pub max_lookup: Duration,
    pub merge_headroom: Duration,
}

/// How much the record cache holds, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Weight bound (an estimate of memory held).
    pub max_bytes: u64,
    /// How long a complete record is served.
    pub ttl: Duration,
    /// How long a partial record is served (shorter: a recovered source should be seen soon).
    pub partial_ttl: Duration,
}

/// What a broker is made of, besides its sources: the core's own terms, so embedding it needs no
/// configuration file.
pub struct BrokerParts {
    pub broker_id: String,
    pub deadlines: DeadlineRules,
    pub cache: CacheLimits,
    pub policy: Policy,
    pub audit: AuditLog,
    pub limits: LoadLimits,
    pub router: Router,
}

/// How a lookup will be answered.
enum Lookup {
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
    pub fn new(parts: BrokerParts, sources: SourceSet) -> Broker {
        Broker {
            broker_id: parts.broker_id,
            deadlines: parts.deadlines,
            sources: RwLock::new(Arc::new(sources)),
            router: RwLock::new(Arc::new(parts.router)),
            cache: Arc::new(RecordCache::new(
                parts.cache.max_bytes,
                parts.cache.ttl,
                parts.cache.partial_ttl,
            )),
            flights: Arc::new(Flights::default()),
            counter: AtomicU64::new(0),
            policy: parts.policy,
            audit: parts.audit,
            door: Door::new(parts.limits),
            documents: Arc::new(DocumentIds::new()),
        }
    }

    /// Answers one lookup: the record as this requester may see it, or why not.
    pub async fn lookup(
        &self,
        request: LookupRequest,
        caller: CallingSystem,
    ) -> Result<LookupAnswer, LookupError> {
        let span = tracing::info_span!("lookup", request_id = %request.request_id);
        async move {
            let started = Instant::now();
            let result = self.lookup_inner(&request, caller).await;
            match &result {
                Ok(answer) => {
                    let outcome = if answer.complete {
                        "complete"
                    } else {
                        "partial"
                    };
                    let cache = if answer.from_cache() { "hit" } else { "miss" };
                    metrics::counter!(crate::metrics::LOOKUPS, "outcome" => outcome).increment(1);
                    metrics::histogram!(crate::metrics::LOOKUP_DURATION, "cache" => cache)
                        .record(started.elapsed().as_secs_f64());
                    tracing::info!(
                        complete = answer.complete,
                        from_cache = answer.from_cache(),
                        sources = answer.sources.len(),
                        "lookup answered"
                    );
                }
                Err(e) => refused(e),
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn lookup_inner(
        &self,
        request: &LookupRequest,
        caller: CallingSystem,
    ) -> Result<LookupAnswer, LookupError> {
        let slot = self.door.admit()?;
        let caller = self.admit(request, caller).await?;
        match self.begin(request, &slot).await? {
            Lookup::Cached { record, age } => {
                self.disclose(request, &caller, &record, Some(age)).await
            }
            Lookup::Live { flight, deadline } => {
                let merged = flight.wait(deadline).await;
                self.disclose(request, &caller, &merged, None).await
            }
        }
    }

    /// Answers one lookup source by source: each source's update as it lands, then the whole
    /// answer. Refusals before any source is asked are the `Err`; the relationship (decided on
    /// the record) may still end the stream with an error, before anything was disclosed.
    pub async fn stream(
        self: &Arc<Self>,
        request: LookupRequest,
        caller: CallingSystem,
    ) -> Result<LookupStream, LookupError> {
        let span = tracing::info_span!("lookup", request_id = %request.request_id);
        let result = self.stream_inner(request, caller).instrument(span).await;
        if let Err(e) = &result {
            refused(e);
        }
        result
    }

    async fn stream_inner(
        self: &Arc<Self>,
        request: LookupRequest,
        caller: CallingSystem,
    ) -> Result<LookupStream, LookupError> {
        let slot = self.door.admit()?;
        let caller = self.admit(&request, caller).await?;
        Ok(match self.begin(&request, &slot).await? {
            Lookup::Cached { record, age } => {
                // The whole record is here: decide before sending anything.
                let answer = self.disclose(&request, &caller, &record, Some(age)).await?;
                let mut events: Vec<Result<StreamEvent, LookupError>> = self
                    .replayed_updates(&request, &record)
                    .into_iter()
                    .map(|u| Ok(StreamEvent::Source(u)))
                    .collect();
                events.push(Ok(StreamEvent::Complete(answer)));
                Box::pin(futures::stream::iter(events))
            }
            Lookup::Live { flight, deadline } => {
                stream::live(self.clone(), request, caller, flight, deadline, slot)
            }
        })
    }

    /// Whether this caller may ask at all, without asking anyone: a face that hands out a way to
    /// look later (the web view's launch) refuses early what the lookup would refuse. A refusal
    /// is audited, as any.
    pub async fn check_admission(
        &self,
        request: &LookupRequest,
        caller: CallingSystem,
    ) -> Result<(), LookupError> {
        let result = self.admit(request, caller).await.map(|_| ());
        if let Err(e) = &result {
            refused(e);
        }
        result
    }

    /// Whether this caller may ask at all: a recognised system, a role and purpose the policy
    /// admits. Every refusal here is audited.
    async fn admit(
        &self,
        request: &LookupRequest,
        caller: CallingSystem,
    ) -> Result<Caller, LookupError> {
        let caller = match caller {
            CallingSystem::Identified(caller) => caller,
            CallingSystem::Unrecognised => {
                let unknown = Caller {
                    system: "unknown".to_owned(),
                    trusted_assertions: false,
                };
                return Err(self
                    .deny(request, &unknown, Denial::UnknownSystem, None)
                    .await);
            }
        };
        if let Err(denial) = self.policy.admit(request) {
            return Err(self.deny(request, &caller, denial, None).await);
        }
        Ok(caller)
    }

    /// Starts (or joins, or serves from cache) the lookup. A flight this lookup starts holds
    /// its `slot` until the flight's source calls are over.
    async fn begin(
        &self,
        request: &LookupRequest,
        slot: &Arc<Slot>,
    ) -> Result<Lookup, LookupError> {
        if request.via_brokers.contains(&self.broker_id) {
            return Err(LookupError::Loop(self.broker_id.clone()));
        }
        let budget = Budget::new(
            Instant::now(),
            request.caller_timeout,
            self.deadlines.max_lookup,
            self.deadlines.merge_headroom,
        )?;
        let sources = self.sources();
        let mut key = CacheKey::new(sources.epoch, request.nhs_number, request.sections);
        if sources.requester_scoped {
            key = key.scoped_to(request);
        }
        if !request.require_fresh
            && let Some((record, age)) = self.cache.get(&key).await
        {
            tracing::debug!(age_ms = age.as_millis() as u64, "served from cache");
            metrics::counter!(crate::metrics::CACHE_HITS).increment(1);
            return Ok(Lookup::Cached { record, age });
        }
        metrics::counter!(crate::metrics::CACHE_MISSES).increment(1);
        metrics::gauge!(crate::metrics::CACHE_ENTRIES).set(self.cache.entry_count() as f64);
        metrics::gauge!(crate::metrics::CACHE_BYTES).set(self.cache.weighted_size() as f64);
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
        let (flight, started) = self.flights.join_or_start(
            key,
            sources,
            self.router(),
            source_request,
            budget,
            self.cache.clone(),
            slot.clone(),
            self.documents.clone(),
        );
        tracing::debug!(joined = !started, "fan-out");
        if !started {
            metrics::counter!(crate::metrics::COALESCED).increment(1);
        }
        // Wait a little past the sources' deadline (half the merge headroom): the flight
        // finishes by its own deadline, and taking its merged record keeps one canonical
        // answer per flight instead of a near-identical re-merge racing the flight's timers.
        let headroom = budget.caller_deadline - budget.sources_deadline;
        Ok(Lookup::Live {
            flight,
            deadline: budget.sources_deadline + headroom / 2,
        })
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

    /// The sources lookups start with now.
    pub fn sources(&self) -> Arc<SourceSet> {
        self.sources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the sources (reload); lookups in progress finish with the old set.
    pub fn replace_sources(&self, sources: SourceSet) {
        *self.sources.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(sources);
    }

    /// Replaces how sources are chosen (reload).
    pub fn replace_router(&self, router: Router) {
        *self.router.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(router);
    }

    fn router(&self) -> Arc<Router> {
        self.router
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Refuses new lookups from now on (SIGTERM); in-flight ones finish.
    pub fn start_draining(&self) {
        self.door.start_draining();
    }

    /// Whether new lookups are being refused (SIGTERM).
    pub fn is_draining(&self) -> bool {
        self.door.is_draining()
    }

    /// When the audit trail last failed a write, if it has not been written since: a broker in
    /// that state refuses to disclose anything.
    pub fn audit_failing_since(&self) -> Option<std::time::Instant> {
        self.audit.failing_since()
    }

    /// Lookups being answered now (with fan-outs whose callers went away).
    pub fn lookups_in_flight(&self) -> usize {
        self.door.in_flight()
    }

    /// Fan-outs in progress.
    pub fn flights_in_progress(&self) -> usize {
        self.flights.len()
    }
}

/// Counts a lookup refused as a whole.
fn refused(e: &LookupError) {
    tracing::info!(reason = e.reason(), error = %e, "lookup refused");
    metrics::counter!(crate::metrics::LOOKUPS, "outcome" => e.metric_outcome()).increment(1);
}
