//! The broker's lookup pipeline: checked request → (access policy) → cache → single-flight
//! fan-out → merge → response.
//!
//! Access decisions belong before the cache and filtering after it, on every request: a cached
//! record is what the sources said, not what this requester may see.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use carerecord_adapters::SourceRequest;
use carerecord_proto::{CareRecord, GetCareRecordResponse, Purpose, Section, SourceEvent};
use tokio::time::Instant;
use tonic::Status;

use crate::access::{Caller, Denial, Policy};

/// A merged record as one requester may see it.
pub struct Visible {
    pub record: CareRecord,
    pub withheld: bool,
    pub sources: Vec<carerecord_proto::SourceStatus>,
    pub warnings: Vec<carerecord_proto::Warning>,
}
use crate::audit::{AuditEvent, AuditLog};

use crate::budget::Budget;
use crate::cache::{CacheKey, RecordCache};
use crate::config::{BudgetConfig, CacheConfig};
use crate::error::LookupError;
use crate::fanout::{Answer, SourceSet};
use crate::flight::{Flight, Flights};
use crate::merge::MergedRecord;
use crate::routing::Router;
use crate::validate::LookupRequest;

/// The broker: everything a lookup needs, shared by all requests.
pub struct Broker {
    /// Our name in federation chains; a lookup that already passed through it is refused.
    broker_id: String,
    /// Deadline rules.
    budget: BudgetConfig,
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
    /// Lookups being answered now, against `limits.max_in_flight`.
    in_flight: Arc<AtomicUsize>,
    limits: LoadLimits,
    /// Set on SIGTERM: new lookups are refused while in-flight ones finish.
    draining: AtomicBool,
}

/// Global load limits: shed instead of queueing until everything is late.
#[derive(Debug, Clone, Copy)]
pub struct LoadLimits {
    pub max_in_flight: usize,
    pub retry_after: Duration,
}

impl Default for LoadLimits {
    fn default() -> Self {
        LoadLimits {
            max_in_flight: 512,
            retry_after: Duration::from_secs(1),
        }
    }
}

/// Holds one lookup's place in the in-flight count.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.0.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!(crate::metrics::IN_FLIGHT).set(now as f64);
    }
}

/// What a broker is made of, besides its sources.
pub struct BrokerParts {
    pub broker_id: String,
    pub budget: BudgetConfig,
    pub cache: CacheConfig,
    pub policy: Policy,
    pub audit: AuditLog,
    pub limits: LoadLimits,
    pub router: Router,
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

/// A broker that cannot be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Policy(#[from] crate::access::PolicyError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Routing(#[from] crate::registry::BuildError),
}

impl Broker {
    /// A broker as `carerecord serve` builds it: policy, audit trail and limits from `config`.
    pub fn from_config(
        config: &crate::config::Config,
        sources: SourceSet,
    ) -> Result<Broker, BuildError> {
        let parts = BrokerParts {
            broker_id: config.server.broker_id.clone(),
            budget: config.budget.clone(),
            cache: config.cache.clone(),
            policy: Policy::new(&config.access)?,
            audit: AuditLog::open(&config.audit.file, config.audit.fsync)?,
            limits: LoadLimits {
                max_in_flight: config.resilience.max_lookups_in_flight,
                retry_after: Duration::from_millis(config.resilience.shed_retry_after_ms),
            },
            router: crate::registry::router(config)?,
        };
        Ok(Broker::new(parts, sources))
    }

    pub fn new(parts: BrokerParts, sources: SourceSet) -> Broker {
        Broker {
            broker_id: parts.broker_id,
            budget: parts.budget,
            sources: RwLock::new(Arc::new(sources)),
            router: RwLock::new(Arc::new(parts.router)),
            cache: Arc::new(RecordCache::new(
                parts.cache.max_bytes,
                parts.cache.ttl(),
                parts.cache.partial_ttl(),
            )),
            flights: Arc::new(Flights::default()),
            counter: AtomicU64::new(0),
            policy: parts.policy,
            audit: parts.audit,
            in_flight: Arc::new(AtomicUsize::new(0)),
            limits: parts.limits,
            draining: AtomicBool::new(false),
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

    /// Takes a place among the lookups in flight, or sheds this one: RESOURCE_EXHAUSTED with a
    /// retry hint (`grpc-retry-pushback-ms`), immediately, instead of queueing.
    pub fn admit_load(&self) -> Result<InFlight, Status> {
        if self.draining.load(Ordering::Acquire) {
            return Err(LookupError::ShuttingDown.into());
        }
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(self.in_flight.clone());
        if before >= self.limits.max_in_flight {
            drop(guard);
            metrics::counter!(crate::metrics::SHED).increment(1);
            let mut status = Status::resource_exhausted(format!(
                "the broker is at capacity ({} lookups in flight); retry after {} ms",
                self.limits.max_in_flight,
                self.limits.retry_after.as_millis()
            ));
            if let Ok(v) = self.limits.retry_after.as_millis().to_string().parse() {
                status.metadata_mut().insert("grpc-retry-pushback-ms", v);
            }
            return Err(status);
        }
        metrics::gauge!(crate::metrics::IN_FLIGHT).set((before + 1) as f64);
        Ok(guard)
    }

    /// Lookups being answered now.
    pub fn lookups_in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Refuses new lookups from now on (SIGTERM); in-flight ones finish.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Starts (or joins, or serves from cache) the lookup.
    pub async fn begin(&self, request: &LookupRequest) -> Result<Lookup, LookupError> {
        if request.via_brokers.contains(&self.broker_id) {
            return Err(LookupError::Loop(self.broker_id.clone()));
        }
        let budget = Budget::new(
            Instant::now(),
            request.caller_timeout,
            Duration::from_millis(self.budget.max_lookup_ms),
            Duration::from_millis(self.budget.merge_headroom_ms),
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

    /// Whether the requester may ask at all (role, purpose). Denials are audited.
    pub fn admit(&self, request: &LookupRequest, caller: &Caller) -> Result<(), Status> {
        self.policy
            .admit(request)
            .map_err(|denial| self.deny(request, caller, &denial, None))
    }

    /// Refuses: records the denial (fail closed if even that cannot be written) and returns the
    /// status for the caller.
    pub fn deny(
        &self,
        request: &LookupRequest,
        caller: &Caller,
        denial: &Denial,
        merged: Option<&MergedRecord>,
    ) -> Status {
        let event = self.audit_event(
            request,
            caller,
            "denied",
            denial.to_string(),
            merged,
            None,
            false,
        );
        metrics::counter!(crate::metrics::DENIED, "reason" => denial.label()).increment(1);
        tracing::info!(request_id = %request.request_id, reason = %denial, "access denied");
        if let Err(e) = self.audit.record(&event) {
            tracing::error!(error = %e, "audit trail unavailable");
        }
        Status::new(denial.code(), denial.to_string())
    }

    /// The response for `request` from a merged record: the relationship check, this
    /// requester's view of the record, and the audit event — on cached and fresh records alike.
    /// Nothing is disclosed unless the audit event was written.
    pub fn disclose(
        &self,
        request: &LookupRequest,
        caller: &Caller,
        merged: &MergedRecord,
        from_cache: bool,
        age: Duration,
    ) -> Result<GetCareRecordResponse, Status> {
        let basis = self
            .policy
            .relationship(request, caller, merged)
            .map_err(|denial| self.deny(request, caller, &denial, Some(merged)))?;
        let view = self.visible(request, merged);
        let emergency = request.purpose == Purpose::EmergencyAccess;
        let kind = if emergency { "break_glass" } else { "access" };
        let event = self.audit_event(
            request,
            caller,
            kind,
            basis.to_string(),
            Some(merged),
            Some(&view),
            from_cache,
        );
        if let Err(e) = self.audit.record(&event) {
            tracing::error!(request_id = %request.request_id, error = %e, "audit trail unavailable: not disclosing");
            return Err(Status::unavailable(
                "the audit trail cannot be written, so the record is not disclosed; try again shortly",
            ));
        }
        if emergency {
            tracing::warn!(
                target: "carerecord::audit",
                request_id = %request.request_id,
                user = %request.requester.user_id,
                organisation = %request.requester.organisation_code,
                "emergency access granted: report to the privacy officer"
            );
        }
        tracing::info!(
            target: "carerecord::audit",
            request_id = %request.request_id,
            system = %caller.system,
            user = %request.requester.user_id,
            role = %request.requester.role_code,
            organisation = %request.requester.organisation_code,
            kind,
            withheld = view.withheld,
            "record disclosed"
        );
        Ok(GetCareRecordResponse {
            request_id: request.request_id.clone(),
            record: Some(view.record),
            sources: view.sources,
            complete: merged.complete,
            from_cache,
            cache_age_ms: if from_cache {
                age.as_millis() as u64
            } else {
                0
            },
            warnings: view.warnings,
            emergency_access: emergency,
            withheld: view.withheld,
            assembled_at: carerecord_adapters::calendar::rfc3339(merged.assembled_at),
            locators: merged.locators.clone(),
            // A patient's objection: only the requester's own organisation's lines.
            section_statuses: if self.policy.objection_applies(request) {
                let org = request.requester.organisation_code.trim();
                crate::merge::restrict_section_statuses(&merged.section_statuses, |s| {
                    s.organisation_code.eq_ignore_ascii_case(org)
                })
            } else {
                merged.section_statuses.clone()
            },
        })
    }

    /// What this requester may see of a merged record: everything their role permits, or —
    /// when the patient objected to sharing and this is not an emergency — only their own
    /// organisation's entries as it reported them (re-merged from its own answers, so no other
    /// organisation's content rides under its name), its own source statuses and warnings.
    fn visible(&self, request: &LookupRequest, merged: &MergedRecord) -> Visible {
        if !self.policy.objection_applies(request) {
            let view = self.policy.view(request, &merged.record);
            return Visible {
                record: view.record,
                withheld: view.withheld,
                sources: merged.sources.clone(),
                warnings: merged.warnings.clone(),
            };
        }
        let org = request.requester.organisation_code.trim();
        let ours = |code: &str| code.eq_ignore_ascii_case(org);
        let own: Vec<&Answer> = merged
            .answers
            .iter()
            .map(AsRef::as_ref)
            .filter(|a| ours(&a.status.organisation_code))
            .collect();
        let others_had_data = merged
            .answers
            .iter()
            .any(|a| !ours(&a.status.organisation_code));
        let mut warnings = Vec::new();
        let today = carerecord_adapters::calendar::rfc3339(merged.assembled_at);
        let record = crate::merge::merge_found(
            request.nhs_number,
            &own,
            today.get(..10).unwrap_or(&today),
            &mut warnings,
        );
        let view = self.policy.view(request, &record);
        Visible {
            record: view.record,
            withheld: view.withheld || others_had_data,
            sources: merged
                .sources
                .iter()
                .filter(|s| ours(&s.organisation_code))
                .cloned()
                .collect(),
            warnings,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn audit_event(
        &self,
        request: &LookupRequest,
        caller: &Caller,
        kind: &str,
        decision: String,
        merged: Option<&MergedRecord>,
        view: Option<&Visible>,
        from_cache: bool,
    ) -> AuditEvent {
        let q = &request.requester;
        AuditEvent {
            time: carerecord_adapters::calendar::rfc3339(SystemTime::now()),
            request_id: request.request_id.clone(),
            kind: kind.to_owned(),
            system: caller.system.clone(),
            user_id: q.user_id.clone(),
            user_name: q.user_name.clone(),
            role: q.role_code.clone(),
            organisation: q.organisation_code.clone(),
            patient: request.nhs_number.as_digits(),
            purpose: match request.purpose {
                Purpose::EmergencyAccess => "emergency_access",
                _ => "direct_care",
            }
            .to_owned(),
            emergency_reason: q.emergency_reason.clone(),
            decision,
            sources: merged
                .map(|m| {
                    m.sources
                        .iter()
                        .map(|s| {
                            format!(
                                "{}:{}",
                                s.source_id,
                                crate::render::outcome_label(s.outcome)
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            returned: view
                .map(|v| {
                    Section::ALL
                        .iter()
                        .map(|s| format!("{}:{}", s.short_name(), v.record.section(*s).len()))
                        .collect()
                })
                .unwrap_or_default(),
            withheld: view.is_some_and(|v| v.withheld),
            from_cache,
        }
    }

    /// Whether one source's answer already establishes the relationship (streaming releases
    /// events as soon as it is).
    pub fn released_by(
        &self,
        request: &LookupRequest,
        caller: &Caller,
        answer: Option<&Answer>,
    ) -> bool {
        if request.purpose == Purpose::EmergencyAccess {
            return true;
        }
        if self.policy.trusted_assertion(request, caller) {
            return true;
        }
        answer.is_some_and(|a| {
            self.policy.relationship_from_answer(
                request,
                &a.status.organisation_code,
                a.status.outcome,
            )
        })
    }

    /// Audits the moment a stream starts disclosing, before its first source event: a client
    /// that disconnects mid-stream, or a break-glass view, is still on the record. Fails closed.
    pub fn audit_release(&self, request: &LookupRequest, caller: &Caller) -> Result<(), Status> {
        let emergency = request.purpose == Purpose::EmergencyAccess;
        let basis = if emergency {
            "emergency access"
        } else if self.policy.trusted_assertion(request, caller) {
            "relationship asserted by calling system"
        } else {
            "requesting organisation holds records for the patient"
        };
        let event = self.audit_event(
            request,
            caller,
            if emergency { "break_glass" } else { "access" },
            format!("stream released: {basis}"),
            None,
            None,
            false,
        );
        self.audit.record(&event).map_err(|e| {
            tracing::error!(request_id = %request.request_id, error = %e, "audit trail unavailable: not streaming");
            Status::unavailable(
                "the audit trail cannot be written, so the record is not disclosed; try again shortly",
            )
        })
    }

    /// The stream event for one live answer, as this requester may see it, or `None` when the
    /// requester may not even learn that this source answered (a patient's objection).
    /// Contributions never carry the address: the final event's demographics are authoritative
    /// (another source may mark the patient restricted).
    pub fn source_event(&self, request: &LookupRequest, answer: &Answer) -> Option<SourceEvent> {
        if self.policy.objection_applies(request)
            && !answer
                .status
                .organisation_code
                .eq_ignore_ascii_case(request.requester.organisation_code.trim())
        {
            return None;
        }
        Some(SourceEvent {
            status: Some(answer.status.clone()),
            contribution: answer.record.as_ref().map(|r| {
                let mut view = self.policy.view(request, &r.record).record;
                if let Some(p) = view.patient.as_mut() {
                    p.address.clear();
                    p.registered_gp_code.clear();
                }
                view
            }),
        })
    }

    /// Stream events replayed from a cached record: each source's status, and the merged
    /// entries it reported, as this requester may see them.
    pub fn replayed_source_events(
        &self,
        request: &LookupRequest,
        merged: &MergedRecord,
    ) -> Vec<SourceEvent> {
        let Visible {
            record: visible,
            sources,
            ..
        } = self.visible(request, merged);
        sources
            .iter()
            .map(|status| {
                let mut contribution = CareRecord::default();
                // A federated broker's entries carry "its-id/remote-id".
                let nested_prefix = format!("{}/", status.source_id);
                let ours = |id: &str| id == status.source_id || id.starts_with(&nested_prefix);
                let reported_by =
                    |e: &&carerecord_proto::Entry| e.provenance.iter().any(|p| ours(&p.source_id));
                for section in Section::ALL {
                    if let Some(slot) = contribution.section_mut(section) {
                        slot.extend(visible.section(section).iter().filter(reported_by).cloned());
                    }
                }
                if let Some(p) = &visible.patient
                    && p.provenance.iter().any(|p| ours(&p.source_id))
                {
                    contribution.patient = Some(p.clone());
                }
                SourceEvent {
                    status: Some(status.clone()),
                    contribution: Some(contribution),
                }
            })
            .collect()
    }
}
