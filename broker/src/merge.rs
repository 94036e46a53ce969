//! Merge: many organisations' partial records into one care record, deterministically.
//!
//! - Sources are merged in configuration (priority) order, whatever order they answered in, so
//!   the same answers always give the same record.
//! - The same coded entry from several organisations becomes one entry listing every reporting
//!   organisation. Standing facts (conditions, medicines, allergies, care plans) are the same entry
//!   when their code is the same; events (results, documents, encounters, appointments) also need
//!   the same date.
//! - Entries are sorted most recent first.
//! - Demographics come from the first source that knows the patient; any disagreement on name,
//!   date of birth or sex is a warning (a wrong-patient risk), never silently overwritten.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use carerecord_adapters::NhsNumber;
use carerecord_proto::{
    CareRecord, Entry, LocatorStatus, Patient, Section, SourceOutcome, SourceStatus, Warning,
    WarningKind,
};
use tokio::time::Instant;

use crate::fanout::{Answer, SourceSet, millis};
use crate::routing::Route;

/// A merged lookup: what the cache holds and every response is built from.
#[derive(Debug, Clone)]
pub struct MergedRecord {
    pub record: CareRecord,
    /// One status per source asked, in configuration order.
    pub sources: Vec<SourceStatus>,
    pub warnings: Vec<Warning>,
    /// Every source answered OK or NOT_FOUND (and every record locator answered).
    pub complete: bool,
    /// What the record locators said, when the broker routes through them.
    pub locators: Vec<LocatorStatus>,
    /// The answers with data, in priority order: a patient's objection needs the requester's
    /// own organisation's entries as it reported them, not as merged with others.
    pub answers: Vec<Arc<Answer>>,
    /// Wall-clock time of assembly, for the response.
    pub assembled_at: SystemTime,
    /// Monotonic time of assembly, for cache age (tokio time, so tests can pause it).
    pub assembled: Instant,
}

/// Merges the answers that arrived; sources with no answer are reported as TIMEOUT.
pub fn merge(
    nhs_number: NhsNumber,
    route: &Route,
    answers: &[Arc<Answer>],
    started: Instant,
) -> MergedRecord {
    let set: &SourceSet = &route.set;
    let now = Instant::now();
    let mut by_index: Vec<Option<&Arc<Answer>>> = vec![None; set.sources.len()];
    for answer in answers {
        if let Some(slot) = by_index.get_mut(answer.index) {
            *slot = Some(answer);
        }
    }

    let mut sources = Vec::with_capacity(set.sources.len());
    let mut warnings = route.warnings.clone();
    for (index, slot) in by_index.iter().enumerate() {
        match slot {
            Some(answer) => sources.push(answer.status.clone()),
            None => {
                let info = set.sources[index].source.info();
                sources.push(SourceStatus {
                    source_id: info.id.clone(),
                    organisation_code: info.organisation_code.clone(),
                    organisation_name: info.organisation_name.clone(),
                    outcome: SourceOutcome::Timeout as i32,
                    latency_ms: millis(now.saturating_duration_since(started)),
                    message: "did not answer in time".into(),
                    ..SourceStatus::default()
                });
            }
        }
    }

    // Answers with data, in priority order.
    let found: Vec<Arc<Answer>> = by_index
        .iter()
        .flatten()
        .filter(|a| a.record.is_some())
        .map(|a| Arc::clone(a))
        .collect();
    let refs: Vec<&Answer> = found.iter().map(AsRef::as_ref).collect();
    let record = merge_found(nhs_number, &refs, &mut warnings);

    for (status, why) in sources.iter_mut().zip(&route.selected_by) {
        status.selected_by.clone_from(why);
    }
    let missing: Vec<&SourceStatus> = sources.iter().filter(|s| !answered(s.outcome)).collect();
    let complete = missing.is_empty() && !route.degraded;
    if !complete {
        let names: Vec<String> = missing
            .iter()
            .map(|s| format!("{} ({})", s.organisation_name, outcome_word(s.outcome)))
            .collect();
        warnings.push(Warning {
            kind: WarningKind::Incomplete as i32,
            message: format!(
                "{} of {} sources did not answer; their data is missing: {}",
                missing.len(),
                sources.len(),
                names.join(", ")
            ),
            source_ids: missing.iter().map(|s| s.source_id.clone()).collect(),
        });
    }

    MergedRecord {
        record,
        sources,
        warnings,
        complete,
        locators: route.locators.clone(),
        answers: found,
        assembled_at: SystemTime::now(),
        assembled: now,
    }
}

/// The record from answers with data (in priority order): demographics, deduplicated
/// sections, and each source's own warnings.
pub fn merge_found(
    nhs_number: NhsNumber,
    found: &[&Answer],
    warnings: &mut Vec<Warning>,
) -> CareRecord {
    let mut record = CareRecord {
        patient: merge_patient(nhs_number, found, warnings),
        ..CareRecord::default()
    };
    for section in Section::ALL {
        let merged = merge_section(section, found);
        if let Some(slot) = record.section_mut(section) {
            *slot = merged;
        }
    }
    for answer in found {
        if let Some(r) = &answer.record {
            for w in &r.warnings {
                warnings.push(Warning {
                    kind: WarningKind::SourceDataInvalid as i32,
                    message: format!("{}: {w}", answer.status.organisation_name),
                    source_ids: vec![answer.status.source_id.clone()],
                });
            }
        }
    }
    record
}

/// OK and NOT_FOUND are answers; everything else means data may be missing.
pub fn answered(outcome: i32) -> bool {
    outcome == SourceOutcome::Ok as i32 || outcome == SourceOutcome::NotFound as i32
}

fn outcome_word(outcome: i32) -> &'static str {
    match SourceOutcome::try_from(outcome) {
        Ok(SourceOutcome::Timeout) => "not answered in time",
        Ok(SourceOutcome::Error) => "error",
        Ok(SourceOutcome::Unavailable) => "unavailable",
        Ok(SourceOutcome::CircuitOpen) => "circuit open",
        Ok(SourceOutcome::Refused) => "refused",
        _ => "unknown",
    }
}

/// Demographics from the first source that has them; disagreements become warnings.
fn merge_patient(
    nhs: NhsNumber,
    found: &[&Answer],
    warnings: &mut Vec<Warning>,
) -> Option<Patient> {
    let reported: Vec<(&Answer, &Patient)> = found
        .iter()
        .filter_map(|a| Some((*a, a.record.as_ref()?.record.patient.as_ref()?)))
        .collect();
    let (_, first) = reported.first()?;
    let mut patient = (*first).clone();
    patient.nhs_number = nhs.as_digits();
    // Restricted anywhere means restricted: one source's flag must not be undone by another
    // source's address.
    patient.restricted = reported.iter().any(|(_, p)| p.restricted);
    for (_, other) in reported.iter().skip(1) {
        if patient.address.is_empty() {
            patient.address.clone_from(&other.address);
        }
        if patient.registered_gp_code.is_empty() {
            patient
                .registered_gp_code
                .clone_from(&other.registered_gp_code);
        }
        patient.provenance.extend(other.provenance.iter().cloned());
    }

    type Field = (&'static str, fn(&Patient) -> String);
    let fields: [Field; 4] = [
        ("Date of birth", |p| p.birth_date.trim().to_owned()),
        ("Family name", |p| p.family_name.trim().to_uppercase()),
        ("Given name", |p| {
            p.given_names
                .first()
                .map(|g| g.trim().to_uppercase())
                .unwrap_or_default()
        }),
        ("Sex", |p| match p.gender.trim() {
            "unknown" => String::new(),
            g => g.to_lowercase(),
        }),
    ];
    for (label, value) in fields {
        let mut distinct: Vec<(String, Vec<&Answer>)> = Vec::new();
        for (answer, p) in &reported {
            let v = value(p);
            if v.is_empty() {
                continue;
            }
            match distinct.iter_mut().find(|(d, _)| *d == v) {
                Some((_, who)) => who.push(answer),
                None => distinct.push((v, vec![answer])),
            }
        }
        if distinct.len() > 1 {
            let parts: Vec<String> = distinct
                .iter()
                .map(|(v, who)| {
                    let names: Vec<&str> = who
                        .iter()
                        .map(|a| a.status.organisation_name.as_str())
                        .collect();
                    format!("{v} ({})", names.join(", "))
                })
                .collect();
            warnings.push(Warning {
                kind: WarningKind::DemographicsMismatch as i32,
                message: format!(
                    "{label} differs between sources: {}. Check this is the same person before acting on their data.",
                    parts.join(" vs ")
                ),
                source_ids: distinct
                    .iter()
                    .flat_map(|(_, who)| who.iter().map(|a| a.status.source_id.clone()))
                    .collect(),
            });
        }
    }
    Some(patient)
}

/// Whether entries of a section are events (same code at another date is another entry).
fn is_event_section(section: Section) -> bool {
    matches!(
        section,
        Section::TestResults | Section::Documents | Section::Encounters | Section::Appointments
    )
}

#[derive(Hash, PartialEq, Eq)]
struct DedupKey<'a> {
    system: &'a str,
    code: &'a str,
    /// The day of the event, for event sections; empty otherwise.
    day: &'a str,
}

fn dedup_key(section: Section, entry: &Entry) -> Option<DedupKey<'_>> {
    let concept = entry.concept.as_ref()?;
    if concept.code.trim().is_empty() {
        return None;
    }
    let day = if is_event_section(section) {
        entry.effective.get(..10).unwrap_or(&entry.effective)
    } else {
        ""
    };
    Some(DedupKey {
        system: concept.system.trim_end_matches('/'),
        code: concept.code.trim(),
        day,
    })
}

fn merge_section(section: Section, found: &[&Answer]) -> Vec<Entry> {
    let total: usize = found
        .iter()
        .filter_map(|a| a.record.as_ref())
        .map(|r| r.record.section(section).len())
        .sum();
    let mut out: Vec<Entry> = Vec::with_capacity(total);
    let mut index: HashMap<DedupKey<'_>, usize> = HashMap::with_capacity(total);
    for answer in found {
        let Some(record) = &answer.record else {
            continue;
        };
        for entry in record.record.section(section) {
            // The same source reporting the same code twice (two potassium results on one day,
            // two letters) is two entries: only different organisations' copies are merged.
            let id = answer.status.source_id.as_str();
            let same_source = |kept: &Entry| {
                kept.provenance.iter().any(|p| {
                    p.source_id == id
                        || p.source_id
                            .strip_prefix(id)
                            .is_some_and(|rest| rest.starts_with('/'))
                })
            };
            match dedup_key(section, entry)
                .and_then(|k| index.get(&k).copied().map(|i| (k, i)))
                .filter(|(_, i)| !same_source(&out[*i]))
            {
                Some((_, i)) => absorb(&mut out[i], entry),
                None => {
                    if let Some(key) = dedup_key(section, entry) {
                        index.entry(key).or_insert(out.len());
                    }
                    out.push(entry.clone());
                }
            }
        }
    }
    out.sort_by(|a, b| {
        // Most recent first; undated last; then a stable, content-based order.
        let date = |e: &Entry| (!e.effective.is_empty(), e.effective.clone());
        date(b)
            .cmp(&date(a))
            .then_with(|| code_of(a).cmp(code_of(b)))
            .then_with(|| a.summary.cmp(&b.summary))
            .then_with(|| first_provenance(a).cmp(&first_provenance(b)))
    });
    out
}

fn code_of(e: &Entry) -> &str {
    e.concept.as_ref().map(|c| c.code.as_str()).unwrap_or("")
}

fn first_provenance(e: &Entry) -> (&str, &str) {
    e.provenance
        .first()
        .map(|p| (p.source_id.as_str(), p.source_entry_id.as_str()))
        .unwrap_or(("", ""))
}

/// Folds a duplicate into the entry kept: its provenance is added; fields the kept entry lacks
/// are filled; nothing the kept (higher-priority) entry says is overwritten.
fn absorb(kept: &mut Entry, dup: &Entry) {
    kept.provenance.extend(dup.provenance.iter().cloned());
    let fill = |k: &mut String, d: &String| {
        if k.is_empty() {
            k.clone_from(d);
        }
    };
    fill(&mut kept.summary, &dup.summary);
    fill(&mut kept.status, &dup.status);
    fill(&mut kept.effective, &dup.effective);
    fill(&mut kept.ended, &dup.ended);
    fill(&mut kept.recorded, &dup.recorded);
    if kept.detail.is_none() {
        kept.detail.clone_from(&dup.detail);
    }
    for label in &dup.security_labels {
        if !kept.security_labels.contains(label) {
            kept.security_labels.push(label.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::ConfiguredSource;
    use carerecord_adapters::memory::InMemorySource;
    use carerecord_adapters::{Source, SourceRecord};
    use carerecord_proto::{Coding, Provenance};
    use std::time::Duration;

    fn set(n: usize) -> SourceSet {
        SourceSet::new(
            (0..n)
                .map(|i| {
                    ConfiguredSource::new(
                        Arc::new(InMemorySource::new(
                            &format!("s{i}"),
                            &format!("ORG{i}"),
                            "Org",
                        )) as Arc<dyn Source>,
                        Duration::from_secs(1),
                    )
                })
                .collect(),
            1,
        )
    }

    fn entry(code: &str, effective: &str, source: &str) -> Entry {
        Entry {
            concept: (!code.is_empty()).then(|| Coding {
                system: "http://snomed.info/sct".into(),
                code: code.into(),
                display: format!("concept {code}"),
            }),
            summary: format!("{code} at {effective}"),
            effective: effective.into(),
            provenance: vec![Provenance {
                source_id: source.into(),
                source_entry_id: format!("{source}-{code}-{effective}"),
                ..Provenance::default()
            }],
            ..Entry::default()
        }
    }

    fn answer(index: usize, record: CareRecord) -> Arc<Answer> {
        Arc::new(Answer {
            index,
            cut_short: false,
            status: SourceStatus {
                source_id: format!("s{index}"),
                organisation_name: format!("Org {index}"),
                outcome: SourceOutcome::Ok as i32,
                ..SourceStatus::default()
            },
            record: Some(SourceRecord {
                record,
                ..SourceRecord::default()
            }),
        })
    }

    fn nhs() -> NhsNumber {
        NhsNumber::parse("9434765919").expect("valid")
    }

    #[test]
    fn dedup_rules_per_section() {
        // (section, entries from s0, entries from s1, expected merged count)
        type Case = (
            Section,
            Vec<(&'static str, &'static str)>,
            Vec<(&'static str, &'static str)>,
            usize,
        );
        let cases: Vec<Case> = vec![
            // Standing facts: same code is the same entry whatever the date.
            (
                Section::Conditions,
                vec![("44054006", "2015")],
                vec![("44054006", "2019-03-01")],
                1,
            ),
            // Events: same code on another day is another result.
            (
                Section::TestResults,
                vec![("4548-4", "2024-01-01")],
                vec![("4548-4", "2024-06-01")],
                2,
            ),
            // Events: same code same day (times differ) is the same result.
            (
                Section::TestResults,
                vec![("4548-4", "2024-01-01T09:00:00Z")],
                vec![("4548-4", "2024-01-01")],
                1,
            ),
            // Uncoded entries are never merged.
            (
                Section::Documents,
                vec![("", "2024-01-01")],
                vec![("", "2024-01-01")],
                2,
            ),
        ];
        for (section, a, b, want) in cases {
            let mut r0 = CareRecord::default();
            let mut r1 = CareRecord::default();
            if let Some(s) = r0.section_mut(section) {
                s.extend(a.iter().map(|(c, d)| entry(c, d, "s0")));
            }
            if let Some(s) = r1.section_mut(section) {
                s.extend(b.iter().map(|(c, d)| entry(c, d, "s1")));
            }
            let merged = merge(
                nhs(),
                &Route::all(Arc::new(set(2))),
                &[answer(0, r0), answer(1, r1)],
                Instant::now(),
            );
            assert_eq!(
                merged.record.section(section).len(),
                want,
                "{section:?} {a:?} {b:?}"
            );
        }
    }

    #[test]
    fn the_same_source_reporting_a_code_twice_keeps_both_entries() {
        let r0 = CareRecord {
            test_results: vec![
                entry("2823-3", "2024-05-01T08:00:00Z", "s0"),
                entry("2823-3", "2024-05-01T20:00:00Z", "s0"),
            ],
            ..CareRecord::default()
        };
        let r1 = CareRecord {
            test_results: vec![entry("2823-3", "2024-05-01", "s1")],
            ..CareRecord::default()
        };
        let merged = merge(
            nhs(),
            &Route::all(Arc::new(set(2))),
            &[answer(0, r0), answer(1, r1)],
            Instant::now(),
        );
        let results = &merged.record.test_results;
        assert_eq!(
            results.len(),
            2,
            "two potassium results from one lab stay two"
        );
        let provenance: usize = results.iter().map(|e| e.provenance.len()).sum();
        assert_eq!(
            provenance, 3,
            "the other organisation's copy joins one of them"
        );
    }

    #[test]
    fn the_result_does_not_depend_on_completion_order() {
        let r0 = CareRecord {
            conditions: vec![entry("1", "2020", "s0"), entry("2", "2021-05", "s0")],
            ..CareRecord::default()
        };
        let r1 = CareRecord {
            conditions: vec![
                entry("2", "2022", "s1"),
                entry("3", "", "s1"),
                entry("4", "2021-05-02", "s1"),
            ],
            ..CareRecord::default()
        };
        let s = Route::all(Arc::new(set(2)));
        let forward = merge(
            nhs(),
            &s,
            &[answer(0, r0.clone()), answer(1, r1.clone())],
            Instant::now(),
        );
        let backward = merge(nhs(), &s, &[answer(1, r1), answer(0, r0)], Instant::now());
        assert_eq!(forward.record, backward.record);
        let order: Vec<&str> = forward
            .record
            .conditions
            .iter()
            .map(|e| e.concept.as_ref().map(|c| c.code.as_str()).unwrap_or(""))
            .collect();
        // Most recent first (partial dates compare sensibly), undated last.
        assert_eq!(order, ["4", "2", "1", "3"]);
        // The kept entry is the higher-priority source's, with both provenances.
        let two = &forward.record.conditions[1];
        assert_eq!(two.effective, "2021-05");
        assert_eq!(two.provenance.len(), 2);
    }

    #[test]
    fn missing_sources_are_timeouts_and_make_the_record_incomplete() {
        let merged = merge(
            nhs(),
            &Route::all(Arc::new(set(3))),
            &[answer(1, CareRecord::default())],
            Instant::now(),
        );
        let outcomes: Vec<i32> = merged.sources.iter().map(|s| s.outcome).collect();
        assert_eq!(
            outcomes,
            [
                SourceOutcome::Timeout as i32,
                SourceOutcome::Ok as i32,
                SourceOutcome::Timeout as i32
            ]
        );
        assert!(!merged.complete);
        let incomplete = merged
            .warnings
            .iter()
            .find(|w| w.kind == WarningKind::Incomplete as i32)
            .expect("incomplete warning");
        assert_eq!(incomplete.source_ids, ["s0", "s2"]);
    }
}
