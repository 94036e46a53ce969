//! Fan-out: ask these sources concurrently, and report each answer the moment it arrives.
//!
//! Each call goes through the source's resilience layers ([`crate::resilience`]: breaker,
//! bulkhead, deadline, panic containment); fan-out itself only asks concurrently, turns each
//! outcome into a status, and counts it. Sources run as futures inside one task (not spawned),
//! so when the overall deadline passes or the lookup is dropped, every outstanding source call
//! is dropped with it: nothing is left running.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::{
    NhsNumber, Source, SourceError, SourceRecord, SourceReply, SourceRequest,
};
use carerecord_proto::{SourceOutcome, SourceStatus};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;
use tracing::Instrument;

use crate::budget::Budget;
use crate::resilience::breaker::BreakerConfig;
use crate::resilience::{Failure, Guards};

/// A source as the broker runs it: the adapter, its time budget, and its guards (circuit
/// breaker, and a bulkhead capping calls in flight so one slow organisation cannot hold every
/// connection). Cloning shares the guards (routing builds per-lookup subsets of the set).
#[derive(Clone)]
pub struct ConfiguredSource {
    pub source: Arc<dyn Source>,
    pub timeout: Duration,
    pub guards: Guards,
}

/// Defaults for sources built without explicit resilience settings (tests, embedding).
pub const DEFAULT_BREAKER: BreakerConfig = BreakerConfig {
    failures: 5,
    open_for: Duration::from_secs(10),
};
/// The default bulkhead: calls in flight to one source. The door's default limit is derived
/// from it (see `lookup::admission`).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

impl ConfiguredSource {
    /// A source with the default breaker and bulkhead.
    pub fn new(source: Arc<dyn Source>, timeout: Duration) -> Self {
        Self::with_limits(source, timeout, DEFAULT_BREAKER, DEFAULT_MAX_IN_FLIGHT)
    }

    pub fn with_limits(
        source: Arc<dyn Source>,
        timeout: Duration,
        breaker: BreakerConfig,
        max_in_flight: usize,
    ) -> Self {
        ConfiguredSource {
            source,
            timeout,
            guards: Guards::new(breaker, max_in_flight),
        }
    }

    /// One fetch through every resilience layer, bounded by `request.deadline`.
    /// `callers_deadline`: that deadline is the caller's, nearer than this source's own timeout.
    pub async fn fetch(
        &self,
        request: &SourceRequest,
        callers_deadline: bool,
    ) -> Result<SourceReply, Failure> {
        self.guards
            .call(
                request.deadline,
                callers_deadline,
                self.source.fetch(request),
            )
            .await
    }
}

/// The sources of one configuration, in priority order. Replaced whole on reload; a lookup
/// keeps the set it started with.
pub struct SourceSet {
    pub sources: Vec<ConfiguredSource>,
    /// Changes whenever the set changes, so cache keys from an older set never match.
    pub epoch: u64,
    /// Source positions by upper-case organisation code, for routing.
    by_organisation: HashMap<String, Vec<usize>>,
    /// Some source's answer depends on the requester (a federated broker): fetches are then
    /// shared and cached only between identical requesters.
    pub requester_scoped: bool,
    /// Computed once: read on every lookup, and a region has thousands of sources.
    longest_timeout: Duration,
}

impl SourceSet {
    pub fn new(sources: Vec<ConfiguredSource>, epoch: u64) -> SourceSet {
        let mut by_organisation: HashMap<String, Vec<usize>> = HashMap::new();
        for (index, s) in sources.iter().enumerate() {
            by_organisation
                .entry(s.source.info().organisation_code.to_ascii_uppercase())
                .or_default()
                .push(index);
        }
        let requester_scoped = sources
            .iter()
            .any(|s| s.source.answers_depend_on_requester());
        let longest_timeout = sources.iter().map(|s| s.timeout).max().unwrap_or_default();
        SourceSet {
            sources,
            epoch,
            by_organisation,
            requester_scoped,
            longest_timeout,
        }
    }

    /// The longest per-source timeout: no lookup of this set needs longer.
    pub fn longest_timeout(&self) -> Duration {
        self.longest_timeout
    }

    /// The sources of one organisation (usually one).
    pub fn indices_for_organisation(&self, code: &str) -> &[usize] {
        self.by_organisation
            .get(&code.trim().to_ascii_uppercase())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// One source's answer.
#[derive(Debug)]
pub struct Answer {
    /// The source's position in its [`SourceSet`].
    pub index: usize,
    pub status: SourceStatus,
    /// The source timed out at the caller's deadline, before its own timeout: not the source's
    /// fault, so it neither counts against its breaker nor lets the record be cached.
    pub cut_short: bool,
    /// The source's part of the record when it answered OK.
    pub record: Option<SourceRecord>,
}

/// Asks every source in `set` concurrently and calls `on_answer` as each finishes (completion
/// order). Returns when all have answered or timed out; never later than the budget allows.
pub async fn run(
    set: &SourceSet,
    request: &SourceRequest,
    budget: &Budget,
    on_answer: impl FnMut(Answer),
) {
    run_at(set, 0..set.sources.len(), request, budget, on_answer).await;
}

/// [`run`] for the sources of `set` at `positions` (each answer's `index` is its position):
/// a routed lookup asks some sources before the locator answers and the rest after.
pub async fn run_at(
    set: &SourceSet,
    positions: impl IntoIterator<Item = usize>,
    request: &SourceRequest,
    budget: &Budget,
    mut on_answer: impl FnMut(Answer),
) {
    let mut pending: FuturesUnordered<_> = positions
        .into_iter()
        .filter_map(|index| set.sources.get(index).map(|c| (index, c)))
        .map(|(index, configured)| {
            let deadline = budget.source_deadline(configured.timeout);
            let mut request = request.clone();
            request.deadline = deadline;
            let span = tracing::info_span!(
                "source",
                request_id = %request.request_id,
                source = %configured.source.info().id
            );
            // The organisation's own traces join ours, as children of this call.
            let traceparent = crate::telemetry::traceparent_of(&span);
            carerecord_adapters::trace::with_traceparent(
                traceparent,
                ask(
                    index,
                    configured,
                    request,
                    budget.started,
                    budget.caller_limited,
                ),
            )
            .instrument(span)
        })
        .collect();
    while let Some(answer) = pending.next().await {
        on_answer(answer);
    }
}

/// One source's call, and its outcome as a status.
async fn ask(
    index: usize,
    configured: &ConfiguredSource,
    request: SourceRequest,
    started: Instant,
    caller_limited: bool,
) -> Answer {
    let info = configured.source.info();
    let callers_deadline = caller_limited && request.deadline < started + configured.timeout;
    let result = configured.fetch(&request, callers_deadline).await;
    let cut_short = matches!(result, Err(Failure::TimedOut { cut_short: true }));
    let result = result
        .map_err(|f| f.into_source_error("adapter"))
        .and_then(|reply| about_the_patient(reply, request.nhs_number));
    let latency = started.elapsed();
    let outcome_label = outcome_label(&result);
    metrics::counter!(crate::metrics::SOURCE_REQUESTS, "source" => info.id.clone(), "outcome" => outcome_label)
        .increment(1);
    metrics::histogram!(crate::metrics::SOURCE_DURATION, "source" => info.id.clone())
        .record(latency.as_secs_f64());
    metrics::gauge!(crate::metrics::BREAKER_STATE, "source" => info.id.clone())
        .set(f64::from(configured.guards.breaker.state_code()));
    let mut status = SourceStatus {
        source_id: info.id.clone(),
        organisation_code: info.organisation_code.clone(),
        organisation_name: info.organisation_name.clone(),
        latency_ms: millis(latency),
        ..SourceStatus::default()
    };
    let record = match result {
        Ok(SourceReply::Found(mut record)) => {
            record.stamp_provenance(info);
            retain_sections(&mut record, request.sections);
            status.outcome = SourceOutcome::Ok as i32;
            status.entries = record.record.entry_count().try_into().unwrap_or(u32::MAX);
            status.nested = std::mem::take(&mut record.nested);
            tracing::debug!(
                entries = status.entries,
                latency_ms = status.latency_ms,
                "source answered"
            );
            Some(record)
        }
        Ok(SourceReply::NotFound) => {
            status.outcome = SourceOutcome::NotFound as i32;
            tracing::debug!(
                latency_ms = status.latency_ms,
                "patient not known to source"
            );
            None
        }
        Err(error) => {
            status.outcome = error.outcome() as i32;
            status.message = error.to_string();
            tracing::warn!(error = %error, latency_ms = status.latency_ms, "source failed");
            None
        }
    };
    Answer {
        index,
        status,
        cut_short,
        record,
    }
}

/// The metrics label of a source's answer: as the record will judge it, so an answer that
/// discarded another patient's resources counts as `wrong_patient` (what ops alert on) and one
/// with shortfalls as `partial`.
fn outcome_label(result: &Result<SourceReply, SourceError>) -> &'static str {
    let outcome = match result {
        Ok(SourceReply::Found(r)) if !r.wrong_patient.is_empty() => SourceOutcome::WrongPatient,
        Ok(SourceReply::Found(r)) if !r.shortfalls.is_empty() => SourceOutcome::Partial,
        Ok(SourceReply::Found(_)) => SourceOutcome::Ok,
        Ok(SourceReply::NotFound) => SourceOutcome::NotFound,
        Err(e) => e.outcome(),
    };
    crate::metrics::outcome_label(outcome)
}

/// Refuses a whole answer whose demographics carry another NHS number: whichever kind of
/// source gave it, nothing it said can be trusted to be about this patient (the FHIR adapter
/// checks every resource; this holds every other source to the same rule).
fn about_the_patient(reply: SourceReply, wanted: NhsNumber) -> Result<SourceReply, SourceError> {
    let SourceReply::Found(record) = &reply else {
        return Ok(reply);
    };
    let Some(patient) = &record.record.patient else {
        return Ok(reply);
    };
    let digits: String = patient
        .nhs_number
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    if digits.is_empty() || digits == wanted.as_digits() {
        return Ok(reply);
    }
    Err(SourceError::WrongPatient(
        "its demographics carry another NHS number; nothing it returned was used".into(),
    ))
}

/// Drops sections the request did not ask for: a source may return more than it was asked.
fn retain_sections(record: &mut SourceRecord, wanted: carerecord_adapters::SectionSet) {
    for section in carerecord_proto::Section::ALL {
        if !wanted.contains(section)
            && let Some(entries) = record.record.section_mut(section)
        {
            entries.clear();
        }
    }
}

/// Milliseconds, saturating, for wire fields.
pub fn millis(d: Duration) -> u32 {
    d.as_millis().try_into().unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use carerecord_adapters::{SectionSet, Shortfall};

    #[test]
    fn source_metrics_count_answers_as_the_record_judges_them() {
        let found = |record: SourceRecord| Ok(SourceReply::Found(record));
        assert_eq!(outcome_label(&found(SourceRecord::default())), "ok");
        let short = SourceRecord {
            shortfalls: vec![Shortfall {
                sections: SectionSet::ALL,
                reason: "cut at the page limit".into(),
            }],
            ..SourceRecord::default()
        };
        assert_eq!(outcome_label(&found(short)), "partial");
        let misfiled = SourceRecord {
            wrong_patient: vec!["Condition: subject is another Patient".into()],
            ..SourceRecord::default()
        };
        assert_eq!(outcome_label(&found(misfiled)), "wrong_patient");
        assert_eq!(outcome_label(&Ok(SourceReply::NotFound)), "not_found");
        assert_eq!(outcome_label(&Err(SourceError::Timeout)), "timeout");
    }

    #[test]
    fn demographics_with_another_nhs_number_refuse_the_whole_answer() {
        let wanted = NhsNumber::parse("9434765919").expect("valid");
        let with = |nhs: &str| {
            SourceReply::Found(SourceRecord {
                record: carerecord_proto::CareRecord {
                    patient: Some(carerecord_proto::Patient {
                        nhs_number: nhs.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..SourceRecord::default()
            })
        };
        assert!(about_the_patient(with("943 476 5919"), wanted).is_ok());
        assert!(
            about_the_patient(with(""), wanted).is_ok(),
            "unstated is not another"
        );
        assert!(matches!(
            about_the_patient(with("9434765870"), wanted),
            Err(SourceError::WrongPatient(_))
        ));
    }
}
