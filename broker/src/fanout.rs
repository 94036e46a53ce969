//! Fan-out: ask every source concurrently, each bounded by its own deadline within the overall
//! budget, and report each answer the moment it arrives.
//!
//! Sources run as futures inside one task (not spawned), so when the overall deadline passes or
//! the lookup is dropped, every outstanding source call is dropped with it: nothing is left
//! running. A source that panics is reported as ERROR; it cannot take the lookup down.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::{Source, SourceError, SourceRecord, SourceReply, SourceRequest};
use carerecord_proto::{SourceOutcome, SourceStatus};
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;
use tracing::Instrument;

use crate::budget::Budget;

/// A source as the broker runs it: the adapter and its time budget.
pub struct ConfiguredSource {
    pub source: Arc<dyn Source>,
    pub timeout: Duration,
}

/// The sources of one configuration, in priority order. Replaced whole on reload; a lookup
/// keeps the set it started with.
pub struct SourceSet {
    pub sources: Vec<ConfiguredSource>,
    /// Changes whenever the set changes, so cache keys from an older set never match.
    pub epoch: u64,
}

/// One source's answer.
#[derive(Debug)]
pub struct Answer {
    /// The source's position in its [`SourceSet`].
    pub index: usize,
    pub status: SourceStatus,
    /// The source's part of the record when it answered OK.
    pub record: Option<SourceRecord>,
}

/// Asks every source in `set` concurrently and calls `on_answer` as each finishes (completion
/// order). Returns when all have answered or timed out; never later than the budget allows.
pub async fn run(
    set: &SourceSet,
    request: &SourceRequest,
    budget: &Budget,
    mut on_answer: impl FnMut(Answer),
) {
    let mut pending: FuturesUnordered<_> = set
        .sources
        .iter()
        .enumerate()
        .map(|(index, configured)| {
            let deadline = budget.source_deadline(configured.timeout);
            let mut request = request.clone();
            request.deadline = deadline;
            let span = tracing::info_span!(
                "source",
                request_id = %request.request_id,
                source = %configured.source.info().id
            );
            ask(index, configured, request, budget.started).instrument(span)
        })
        .collect();
    while let Some(answer) = pending.next().await {
        on_answer(answer);
    }
}

async fn ask(
    index: usize,
    configured: &ConfiguredSource,
    request: SourceRequest,
    started: Instant,
) -> Answer {
    let info = configured.source.info();
    let call = AssertUnwindSafe(configured.source.fetch(&request)).catch_unwind();
    let result = match tokio::time::timeout_at(request.deadline, call).await {
        Err(_elapsed) => Err(SourceError::Timeout),
        Ok(Err(_panic)) => Err(SourceError::Other("the adapter failed unexpectedly".into())),
        Ok(Ok(result)) => result,
    };
    let latency = started.elapsed();
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
        record,
    }
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
