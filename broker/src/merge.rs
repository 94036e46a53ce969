//! Merge: many organisations' partial records into one care record, as a pure function.
//!
//! Input: the sources asked (who they are and why they were selected, in configuration order),
//! their answers, and plain facts from the caller (the sections requested, route warnings,
//! whether a record locator failed, the time of assembly). Output: the record, one status per
//! source, warnings, one status per section, and whether the record is complete. No access,
//! audit, cache or routing type appears here, and nothing reads a clock.
//!
//! The record does not depend on the order the answers arrived in, nor on configuration order:
//! every choice between organisations follows the safety rules below, and ties end in a
//! content-based order (organisation code, source id, the source's entry id). The one place
//! configuration (priority) order still counts is demographics, and only to break a tie between
//! equally supported identities (see [`merge_patient`]).
//!
//! # Safety rules (quoted in SAFETY.md)
//!
//! 1. **Same entry.** Standing facts (conditions, medicines, allergies, care plans) are the same
//!    entry when their code is the same (SNOMED CT and dm+d codes compare as one namespace);
//!    events (results, documents, encounters, appointments) also need the same day. A "no
//!    known ..." assertion (`asserts_absence`) is never the same entry as a finding. Uncoded
//!    entries are never merged. The same source reporting the same code twice stays two entries,
//!    except medicines, where every row of one medicine is grouped, and rows whose concepts
//!    differ but that share any other coding (dm+d product and SNOMED CT concept) are one medicine.
//! 2. **Who said what.** Every organisation's copy is kept as a `Provenance` carrying what it
//!    asserted (status, verification status, dates, dosage, criticality, severity, kind).
//! 3. **Headline value** (what the entry shows): the most recent assertion wins — its date is
//!    `recorded`, else `last_updated`, else `effective`, compared to the day. On a tie, the more
//!    cautious assertion wins: a finding not refuted beats a refuted one; then clinical status
//!    active > recurrence > relapse > on-hold > intended/draft > unstated > inactive >
//!    remission/not-taken > resolved/completed/stopped/cancelled; then criticality high >
//!    unable-to-assess > low; then severity severe > moderate > mild; then verification
//!    confirmed > unstated > provisional > differential > unconfirmed. A remaining tie goes to
//!    the lowest (organisation code, source id, entry id) — never configuration order. Assertions
//!    from a source whose demographics are disputed only win when no undisputed one exists.
//!    Empty headline fields are filled from the other assertions in the same order.
//! 4. **Conflicts.** When organisations disagree on status, verification status, effective or
//!    end date (dates disagree when neither is a prefix of the other, to the day), dosage,
//!    criticality or severity, the entry carries a `Conflict` (one value per organisation, and
//!    the rule that picked the headline) and one CONFLICT warning naming the entry and the
//!    organisations.
//! 5. **Verification status.** Entered-in-error assertions never count: an entry only
//!    entered-in-error assertions support is removed; when another organisation reports the same
//!    code, the entry stays and a `verification_status` conflict names the entered-in-error
//!    assertion. A refuted headline is never current: the entry's `status` becomes "refuted"
//!    (its `verification_status` stays REFUTED) and refuted entries sort after the others.
//!    Unconfirmed, provisional and differential are kept as the source said.
//! 6. **"No known ..."** assertions are shown as entries with `asserts_absence`; when any
//!    organisation reports an active finding in the same section (not refuted, status active,
//!    recurrence, relapse or unstated; for medicines, a current one), the assertion carries an
//!    "assertion" conflict and a CONFLICT warning ("X says no known allergies; Y reports active
//!    allergy to ...").
//! 7. **Medicines.** One entry per medicine: statements and authorisations (MedicationRequest
//!    intent plan/proposal/directive, or kind "statement"/"authorisation") and issues (intent
//!    order/original-order/instance-order/reflex-order/filler-order, or kind "issue") of one code,
//!    from every organisation. Each organisation's representative row is its most recent
//!    statement or authorisation, else its latest issue; rule 3 picks the headline among them.
//!    `current` is true when the headline is a statement/authorisation with status active,
//!    on-hold or intended, or when an issue is dated within 90 days before the assembly date and
//!    no statement/authorisation stopped, cancelled or completed it on or after that issue.
//!    Current medicines sort first.
//! 8. **Demographics** come only from Patients carrying the requested NHS number (another number
//!    is a WRONG_PATIENT warning and the source's entries are identity-disputed). Fields are
//!    never borrowed from a source whose name, date of birth or sex disagrees with the headline
//!    demographics; entries reported only by such sources are `identity_disputed`.
//! 9. **Section status and completeness.** Every section gets a status per organisation:
//!    ENTRIES, NONE_RECORDED, INCOMPLETE (a shortfall or an incomplete entry touches it), UNKNOWN
//!    (no usable answer, or the registered GP did not know the patient) or NOT_ASKED. An OK
//!    answer with shortfalls or incomplete entries is PARTIAL (with a DATA_CUT_SHORT warning).
//!    The record is complete only when every source answered OK or NOT_FOUND, none answered
//!    about another patient, every locator answered, and the registered GP (as the merged
//!    demographics name it) did not answer NOT_FOUND.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use carerecord_adapters::{NhsNumber, SectionSet, SourceInfo};
use carerecord_proto::entry::Detail;
use carerecord_proto::{
    CareRecord, Conflict, ConflictValue, Entry, LocatorStatus, Patient, Provenance, Section,
    SectionState, SectionStatus, SourceOutcome, SourceSectionState, SourceSectionStatus,
    SourceStatus, VerificationStatus, Warning, WarningKind,
};
use tokio::time::Instant;

use crate::fanout::{Answer, millis};

/// A merged lookup: what the cache holds and every response is built from.
#[derive(Debug, Clone)]
pub struct MergedRecord {
    pub record: CareRecord,
    /// One status per source asked, in configuration order.
    pub sources: Vec<SourceStatus>,
    pub warnings: Vec<Warning>,
    /// One status per section, in `Section` order.
    pub section_statuses: Vec<SectionStatus>,
    /// See the crate docs, rule 9.
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
    /// Whether the broker's access policy holds anything of `record` back from a requester who
    /// may not see sensitive entries: judged on first disclosure, not again on every cache hit
    /// (a broker's policy is fixed for its life, and so for every record it caches).
    pub restricted_content: std::sync::OnceLock<bool>,
}

/// A source that was asked, and why.
#[derive(Debug, Clone)]
pub struct Asked {
    pub info: SourceInfo,
    /// Why routing selected it ("all", "always_ask", a locator's name).
    pub selected_by: String,
}

/// Everything merge needs, as plain values. `answers[i].index` is a position in `asked`, or —
/// when `positions` is given — in the set `positions` indexes.
pub struct MergeInput<'a> {
    pub nhs_number: NhsNumber,
    /// The sections requested: the others get no section status line beyond "not requested".
    pub sections: SectionSet,
    /// The sources asked, in configuration order.
    pub asked: &'a [Asked],
    /// Where each of `asked` is in the fan-out's whole source set (ascending); empty when
    /// `asked` is that set.
    pub positions: &'a [usize],
    /// Organisations deliberately not asked, to list as NOT_ASKED (may be empty).
    pub not_asked: &'a [SourceInfo],
    /// The answers that arrived, in any order; sources with none are reported TIMEOUT.
    pub answers: &'a [Arc<Answer>],
    /// Warnings from choosing the sources (locator trouble).
    pub route_warnings: &'a [Warning],
    /// What each record locator said.
    pub locators: &'a [LocatorStatus],
    /// A record locator failed: organisations may be missing, so the record is never complete.
    pub degraded: bool,
    /// How long the sources that did not answer were waited for.
    pub waited: Duration,
    /// Wall-clock time of assembly: `assembled_at`, and "today" for current medicines.
    pub now: SystemTime,
    /// Monotonic time of assembly, for cache age.
    pub assembled: Instant,
}

impl<'a> MergeInput<'a> {
    /// Every section requested, nothing routed: the plain case (tests, benches, small regions).
    pub fn new(
        nhs_number: NhsNumber,
        asked: &'a [Asked],
        answers: &'a [Arc<Answer>],
        now: SystemTime,
        assembled: Instant,
    ) -> Self {
        MergeInput {
            nhs_number,
            sections: SectionSet::ALL,
            asked,
            positions: &[],
            not_asked: &[],
            answers,
            route_warnings: &[],
            locators: &[],
            degraded: false,
            waited: Duration::ZERO,
            now,
            assembled,
        }
    }
}

/// The sources of a fan-out, as merge sees them: who each is and why it was selected
/// (`selected_by` parallel to `set.sources`; missing reasons are empty).
pub fn asked(set: &crate::fanout::SourceSet, selected_by: &[String]) -> Vec<Asked> {
    set.sources
        .iter()
        .enumerate()
        .map(|(i, s)| Asked {
            info: s.source.info().clone(),
            selected_by: selected_by.get(i).cloned().unwrap_or_default(),
        })
        .collect()
}

/// Merges the answers that arrived; sources with no answer are reported as TIMEOUT.
pub fn merge(input: MergeInput<'_>) -> MergedRecord {
    let MergeInput {
        nhs_number,
        sections,
        asked,
        positions,
        not_asked,
        answers,
        route_warnings,
        locators,
        degraded,
        waited,
        now,
        assembled,
    } = input;
    let mut by_index: Vec<Option<&Arc<Answer>>> = vec![None; asked.len()];
    for answer in answers {
        let at = if positions.is_empty() {
            Some(answer.index)
        } else {
            positions.binary_search(&answer.index).ok()
        };
        if let Some(slot) = at.and_then(|i| by_index.get_mut(i)) {
            *slot = Some(answer);
        }
    }

    let mut sources = Vec::with_capacity(asked.len());
    let mut warnings: Vec<Warning> = route_warnings.to_vec();
    for (slot, who) in by_index.iter().zip(asked) {
        let mut status = match slot {
            Some(answer) => status_of(answer),
            None => SourceStatus {
                source_id: who.info.id.clone(),
                organisation_code: who.info.organisation_code.clone(),
                organisation_name: who.info.organisation_name.clone(),
                outcome: SourceOutcome::Timeout as i32,
                latency_ms: millis(waited),
                message: "did not answer in time".into(),
                ..SourceStatus::default()
            },
        };
        status.selected_by.clone_from(&who.selected_by);
        sources.push(status);
    }

    // Answers with data, in priority order.
    let found: Vec<Arc<Answer>> = by_index
        .iter()
        .flatten()
        .filter(|a| a.record.is_some())
        .map(|a| Arc::clone(a))
        .collect();
    let refs: Vec<&Answer> = found.iter().map(AsRef::as_ref).collect();
    let today = carerecord_adapters::calendar::rfc3339(now);
    let record = merge_found(
        nhs_number,
        &refs,
        &today[..10.min(today.len())],
        &mut warnings,
    );

    // Answers about another patient (demographics with another NHS number count), and answers
    // cut short.
    let mut wrong_patient = warnings
        .iter()
        .any(|w| w.kind == WarningKind::WrongPatient as i32);
    for answer in &refs {
        let Some(r) = &answer.record else { continue };
        if !r.wrong_patient.is_empty() {
            wrong_patient = true;
            warnings.push(Warning {
                kind: WarningKind::WrongPatient as i32,
                message: format!(
                    "{} returned {} resource(s) about another patient ({}); they were discarded. Report this to the organisation.",
                    answer.status.organisation_name,
                    r.wrong_patient.len(),
                    r.wrong_patient.join("; ")
                ),
                source_ids: vec![answer.status.source_id.clone()],
            });
        }
        let reasons = shortfall_reasons(r, SectionSet::ALL);
        if !reasons.is_empty() {
            warnings.push(Warning {
                kind: WarningKind::DataCutShort as i32,
                message: format!(
                    "{}'s data was cut short; entries may be missing or incomplete: {}",
                    answer.status.organisation_name,
                    reasons.join("; ")
                ),
                source_ids: vec![answer.status.source_id.clone()],
            });
        }
    }
    for status in &sources {
        if status.outcome == SourceOutcome::WrongPatient as i32 {
            wrong_patient = true;
            warnings.push(Warning {
                kind: WarningKind::WrongPatient as i32,
                message: format!(
                    "{} answered about another patient; nothing it said was used. Report this to the organisation.",
                    status.organisation_name
                ),
                source_ids: vec![status.source_id.clone()],
            });
        }
    }

    // The registered GP, as the merged demographics name it, not knowing the patient.
    let gp = record
        .patient
        .as_ref()
        .map(|p| p.registered_gp_code.trim().to_owned())
        .unwrap_or_default();
    let gp_sources: Vec<&SourceStatus> = sources
        .iter()
        .filter(|s| !gp.is_empty() && s.organisation_code.eq_ignore_ascii_case(&gp))
        .collect();
    let gp_not_found = !gp_sources.is_empty()
        && gp_sources
            .iter()
            .all(|s| s.outcome == SourceOutcome::NotFound as i32);
    if gp_not_found {
        warnings.push(Warning {
            kind: WarningKind::RegisteredGpNotFound as i32,
            message: format!(
                "The registered GP practice {} ({}) answered that it does not know this patient: the GP record is missing. Check the patient's identity and registration.",
                gp_sources[0].organisation_name, gp
            ),
            source_ids: gp_sources.iter().map(|s| s.source_id.clone()).collect(),
        });
    }

    let missing: Vec<&SourceStatus> = sources
        .iter()
        .filter(|s| !answered(s.outcome) && s.outcome != SourceOutcome::WrongPatient as i32)
        .collect();
    if !missing.is_empty() {
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
    let complete = sources.iter().all(|s| fully_answered(s.outcome))
        && !wrong_patient
        && !degraded
        && !gp_not_found;

    let section_statuses = section_statuses(
        sections,
        &sources,
        &by_index,
        not_asked,
        if gp_not_found { gp.as_str() } else { "" },
        degraded,
    );

    MergedRecord {
        record,
        sources,
        warnings,
        section_statuses,
        complete,
        locators: locators.to_vec(),
        answers: found,
        assembled_at: now,
        assembled,
        restricted_content: std::sync::OnceLock::new(),
    }
}

/// The status a source's answer is reported with: OK becomes PARTIAL when the answer says it is
/// incomplete (shortfalls, or entries it could not read in full).
pub fn status_of(answer: &Answer) -> SourceStatus {
    let mut status = answer.status.clone();
    if let Some(r) = &answer.record {
        let reasons = shortfall_reasons(r, SectionSet::ALL);
        if status.outcome == SourceOutcome::Ok as i32 && !reasons.is_empty() {
            status.outcome = SourceOutcome::Partial as i32;
            status.message = format!("incomplete: {}", reasons.join("; "));
        }
        if !r.wrong_patient.is_empty() {
            let note = format!(
                "{} resource(s) about another patient discarded",
                r.wrong_patient.len()
            );
            if status.message.is_empty() {
                status.message = note;
            } else {
                status.message = format!("{}; {note}", status.message);
            }
        }
    }
    status
}

/// Why an answer is incomplete for any of `sections`: its shortfalls, and its entries marked
/// incomplete. Empty when it is not.
fn shortfall_reasons(r: &carerecord_adapters::SourceRecord, sections: SectionSet) -> Vec<String> {
    let mut reasons: Vec<String> = r
        .shortfalls
        .iter()
        .filter(|s| s.sections.iter().any(|x| sections.contains(x)))
        .map(|s| s.reason.clone())
        .collect();
    for section in Section::ALL {
        if !sections.contains(section) {
            continue;
        }
        let n = r
            .record
            .section(section)
            .iter()
            .filter(|e| e.incomplete)
            .count();
        if n > 0 {
            let why: BTreeSet<&str> = r
                .record
                .section(section)
                .iter()
                .filter(|e| e.incomplete && !e.incomplete_reason.is_empty())
                .map(|e| e.incomplete_reason.as_str())
                .collect();
            let why: Vec<&str> = why.into_iter().collect();
            reasons.push(format!(
                "{n} {} entr{} incomplete{}",
                section.title().to_lowercase(),
                if n == 1 { "y" } else { "ies" },
                if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", why.join(", "))
                }
            ));
        }
    }
    reasons
}

/// The record from answers with data (in priority order): demographics, deduplicated
/// sections with per-organisation assertions and conflicts, and each source's own warnings.
/// `today` (`YYYY-MM-DD`) decides which medicines are current.
pub fn merge_found(
    nhs_number: NhsNumber,
    found: &[&Answer],
    today: &str,
    warnings: &mut Vec<Warning>,
) -> CareRecord {
    let (patient, disputed) = merge_patient(nhs_number, found, warnings);
    let mut record = CareRecord {
        patient,
        ..CareRecord::default()
    };
    for section in Section::ALL {
        let mut merged = merge_section(section, found, &disputed, today);
        contradicted_absences(section, &mut merged, warnings);
        for entry in &merged {
            if !entry.conflicts.is_empty() && !entry.asserts_absence {
                warnings.push(conflict_warning(entry));
            }
        }
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

/// Rebuilds the CONFLICT warnings and the "assertion" conflicts of "no known ..." entries from
/// the entries a requester may see, after some were withheld: a withheld entry's name must
/// never ride out in another entry's conflict or in a warning's text.
pub fn rebuild_conflicts(record: &mut CareRecord, warnings: &mut Vec<Warning>) {
    warnings.retain(|w| w.kind != WarningKind::Conflict as i32);
    for section in Section::ALL {
        let Some(entries) = record.section_mut(section) else {
            continue;
        };
        for entry in entries.iter_mut().filter(|e| e.asserts_absence) {
            entry.conflicts.retain(|c| c.field != "assertion");
        }
        contradicted_absences(section, entries, warnings);
        for entry in entries.iter() {
            if !entry.conflicts.is_empty() && !entry.asserts_absence {
                warnings.push(conflict_warning(entry));
            }
        }
    }
}

/// Whether the source answered (fully, partially, or "not known here").
pub fn answered(outcome: i32) -> bool {
    fully_answered(outcome) || outcome == SourceOutcome::Partial as i32
}

/// OK and NOT_FOUND are full answers; everything else means data may be missing.
fn fully_answered(outcome: i32) -> bool {
    outcome == SourceOutcome::Ok as i32 || outcome == SourceOutcome::NotFound as i32
}

fn outcome_word(outcome: i32) -> &'static str {
    match SourceOutcome::try_from(outcome) {
        Ok(SourceOutcome::Timeout) => "not answered in time",
        Ok(SourceOutcome::Error) => "error",
        Ok(SourceOutcome::Unavailable) => "unavailable",
        Ok(SourceOutcome::CircuitOpen) => "circuit open",
        Ok(SourceOutcome::Refused) => "refused",
        Ok(SourceOutcome::WrongPatient) => "answered about another patient",
        Ok(SourceOutcome::Partial) => "incomplete",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------------------------
// Demographics

type Field = (&'static str, fn(&Patient) -> String);
const IDENTITY_FIELDS: [Field; 4] = [
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

/// Whether two Patients can be the same person: no identity field both state differs.
fn compatible(a: &Patient, b: &Patient) -> bool {
    IDENTITY_FIELDS.iter().all(|(_, f)| {
        let (x, y) = (f(a), f(b));
        x.is_empty() || y.is_empty() || x == y
    })
}

/// Demographics, and the sources whose identity is disputed.
///
/// Only Patients carrying the requested NHS number count (one with another number is a
/// WRONG_PATIENT warning, and its source is disputed). The headline is the Patient the most
/// other sources agree with (no name, date of birth or sex both state differs); a tie goes to
/// configuration (priority) order. Sources that disagree with the headline are disputed: none of
/// their fields are used. Restricted anywhere means restricted.
fn merge_patient(
    nhs: NhsNumber,
    found: &[&Answer],
    warnings: &mut Vec<Warning>,
) -> (Option<Patient>, HashSet<String>) {
    let mut disputed = HashSet::new();
    let wanted = nhs.as_digits();
    let mut reported: Vec<(&Answer, &Patient)> = Vec::new();
    let mut restricted = false;
    for answer in found {
        let Some(p) = answer
            .record
            .as_ref()
            .and_then(|r| r.record.patient.as_ref())
        else {
            continue;
        };
        let digits: String = p.nhs_number.chars().filter(char::is_ascii_digit).collect();
        if !digits.is_empty() && digits != wanted {
            disputed.insert(answer.status.source_id.clone());
            warnings.push(Warning {
                kind: WarningKind::WrongPatient as i32,
                message: format!(
                    "{} returned demographics for a patient with another NHS number; they were not used, and its entries are marked as disputed. Report this to the organisation.",
                    answer.status.organisation_name
                ),
                source_ids: vec![answer.status.source_id.clone()],
            });
            continue;
        }
        restricted |= p.restricted;
        reported.push((answer, p));
    }
    let support = |p: &Patient| reported.iter().filter(|(_, q)| compatible(p, q)).count();
    let identity = |p: &Patient| IDENTITY_FIELDS.map(|(_, f)| f(p));
    let best = reported.iter().map(|(_, p)| support(p)).max().unwrap_or(0);
    // Among the best supported, the choice must not depend on configuration order: by content,
    // then (only between identical identities) by position.
    let Some(head) = reported
        .iter()
        .enumerate()
        .filter(|(_, (_, p))| support(p) == best)
        .min_by_key(|(i, (_, p))| (identity(p), *i))
        .map(|(i, _)| i)
    else {
        return (None, disputed);
    };
    let headline = reported[head].1;
    // A tie between incompatible people: nobody can say which is right, so nobody's entries
    // are marked disputed (the DEMOGRAPHICS_MISMATCH warning below still says so).
    let contested = reported
        .iter()
        .any(|(_, p)| support(p) == best && !compatible(headline, p));
    let mut patient = headline.clone();
    patient.nhs_number = wanted;
    patient.restricted = restricted;
    for (i, (answer, other)) in reported.iter().enumerate() {
        if i == head {
            continue;
        }
        if !compatible(headline, other) {
            if !contested {
                disputed.insert(answer.status.source_id.clone());
            }
            continue;
        }
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
    patient
        .provenance
        .sort_by(|a, b| prov_key(a).cmp(&prov_key(b)));

    for (label, value) in IDENTITY_FIELDS {
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
            distinct.sort_by(|a, b| a.0.cmp(&b.0));
            let parts: Vec<String> = distinct
                .iter()
                .map(|(v, who)| {
                    let mut names: Vec<&str> = who
                        .iter()
                        .map(|a| a.status.organisation_name.as_str())
                        .collect();
                    names.sort_unstable();
                    format!("{v} ({})", names.join(", "))
                })
                .collect();
            warnings.push(Warning {
                kind: WarningKind::DemographicsMismatch as i32,
                message: format!(
                    "{label} differs between sources: {}. Check this is the same person before acting on their data; {}",
                    parts.join(" vs "),
                    if contested {
                        "the sources are evenly split, so no organisation's entries are marked."
                    } else {
                        "entries only the disagreeing organisations report are marked."
                    }
                ),
                source_ids: {
                    let mut ids: Vec<String> = distinct
                        .iter()
                        .flat_map(|(_, who)| who.iter().map(|a| a.status.source_id.clone()))
                        .collect();
                    ids.sort();
                    ids
                },
            });
        }
    }
    (Some(patient), disputed)
}

// ---------------------------------------------------------------------------------------------
// Sections

/// Whether entries of a section are events (same code at another date is another entry).
fn is_event_section(section: Section) -> bool {
    matches!(
        section,
        Section::TestResults | Section::Documents | Section::Encounters | Section::Appointments
    )
}

/// SNOMED CT and dm+d codes share one namespace (dm+d identifiers are SNOMED identifiers).
fn code_system(system: &str) -> String {
    let s = system.trim().trim_end_matches('/').to_ascii_lowercase();
    if s == "http://snomed.info/sct" || s.contains("dmd.nhs.uk") || s.ends_with("/dm+d") {
        "sct".to_owned()
    } else {
        s
    }
}

#[derive(PartialEq, Eq, PartialOrd, Ord, Clone)]
struct DedupKey {
    absence: bool,
    system: String,
    code: String,
    /// The day of the event, for event sections; empty otherwise.
    day: String,
    /// A result's value and unit: two organisations' different values for one test on one day
    /// are both shown, never one kept.
    value: String,
}

fn dedup_key(section: Section, entry: &Entry) -> Option<DedupKey> {
    let concept = entry.concept.as_ref()?;
    if concept.code.trim().is_empty() {
        return None;
    }
    let day = if is_event_section(section) {
        day(&entry.effective).to_owned()
    } else {
        String::new()
    };
    let value = match &entry.detail {
        Some(Detail::Result(r)) if section == Section::TestResults => format!(
            "{} {}",
            r.value.trim().to_lowercase(),
            r.unit.trim().to_lowercase()
        ),
        // Two organisations' documents of one type on one day are two documents, each
        // retrievable: neither is folded into the other.
        Some(Detail::Document(d)) if section == Section::Documents => d.url.clone(),
        _ => String::new(),
    };
    Some(DedupKey {
        absence: entry.asserts_absence,
        system: code_system(&concept.system),
        code: concept.code.trim().to_owned(),
        day,
        value,
    })
}

fn day(date: &str) -> &str {
    date.get(..10).unwrap_or(date)
}

/// One organisation's copy of an entry, as it reached the merge.
struct Item {
    source_id: String,
    entry: Entry,
}

impl Item {
    /// Content order, for deterministic grouping and filling. Borrowed: a sort evaluates it
    /// twice per comparison.
    fn order_key(&self) -> (&str, &str, &str, &str) {
        let p = self.entry.provenance.first();
        (
            &self.entry.effective,
            p.map_or("", |p| &p.source_entry_id),
            &self.entry.summary,
            &self.source_id,
        )
    }
}

/// Stamps what the source asserted on each provenance that does not say already.
fn stamp_assertions(entry: &mut Entry, disputed: bool) {
    let (dosage, criticality, severity, kind) = match &entry.detail {
        Some(Detail::Medication(m)) => (
            m.dosage.clone(),
            String::new(),
            String::new(),
            medicine_kind(&m.kind, &m.intent).to_owned(),
        ),
        Some(Detail::Allergy(a)) => (
            String::new(),
            a.criticality.clone(),
            a.severity.clone(),
            String::new(),
        ),
        _ => Default::default(),
    };
    for p in &mut entry.provenance {
        let said = !p.status.is_empty()
            || p.verification_status != 0
            || !p.effective.is_empty()
            || !p.recorded.is_empty()
            || !p.kind.is_empty();
        if !said {
            p.status.clone_from(&entry.status);
            p.verification_status = entry.verification_status;
            p.effective.clone_from(&entry.effective);
            p.ended.clone_from(&entry.ended);
            p.recorded.clone_from(&entry.recorded);
            p.dosage.clone_from(&dosage);
            p.criticality.clone_from(&criticality);
            p.severity.clone_from(&severity);
            p.kind.clone_from(&kind);
        }
        if let Some(Detail::Medication(m)) = &entry.detail {
            // Adapters may say "request": the grouping needs authorisation or issue.
            let said = if p.kind.is_empty() { &m.kind } else { &p.kind };
            p.kind = medicine_kind(said, &m.intent).to_owned();
        }
        p.identity_disputed |= disputed;
    }
}

/// "statement", "authorisation" or "issue" from a medicine row's kind and intent.
fn medicine_kind<'a>(kind: &'a str, intent: &str) -> &'a str {
    match kind {
        "statement" | "authorisation" | "issue" => kind,
        _ => match intent.trim() {
            "plan" | "proposal" | "directive" => "authorisation",
            _ => "issue",
        },
    }
}

fn merge_section(
    section: Section,
    found: &[&Answer],
    disputed: &HashSet<String>,
    today: &str,
) -> Vec<Entry> {
    let mut keyed: BTreeMap<DedupKey, Vec<Item>> = BTreeMap::new();
    let mut singles: Vec<Vec<Item>> = Vec::new();
    for answer in found {
        let Some(record) = &answer.record else {
            continue;
        };
        let source_id = answer.status.source_id.clone();
        let is_disputed = disputed.contains(&source_id);
        for entry in record.record.section(section) {
            let mut entry = entry.clone();
            stamp_assertions(&mut entry, is_disputed);
            let item = Item {
                source_id: source_id.clone(),
                entry,
            };
            match dedup_key(section, &item.entry) {
                Some(key) => keyed.entry(key).or_default().push(item),
                None => singles.push(vec![item]),
            }
        }
    }

    let mut groups: Vec<Vec<Item>> = singles;
    if section == Section::Medications {
        keyed = join_shared_codings(keyed);
    }
    for (_, mut items) in keyed {
        items.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        if section == Section::Medications {
            groups.push(items);
            continue;
        }
        // The same source reporting the same code twice (two potassium results on one day, two
        // letters) is two entries: the n-th copy of each source (content order) forms group n.
        let mut by_source: BTreeMap<String, Vec<Item>> = BTreeMap::new();
        for item in items {
            by_source
                .entry(item.source_id.clone())
                .or_default()
                .push(item);
        }
        let depth = by_source.values().map(Vec::len).max().unwrap_or(0);
        let mut layers: Vec<Vec<Item>> = (0..depth).map(|_| Vec::new()).collect();
        for copies in by_source.into_values() {
            for (n, item) in copies.into_iter().enumerate() {
                layers[n].push(item);
            }
        }
        groups.extend(layers);
    }

    let mut out: Vec<Entry> = groups
        .into_iter()
        .filter_map(|items| combine(section, items, today))
        .collect();
    out.sort_by(|a, b| entry_order(section, a, b));
    out
}

/// Medicines: rows whose concepts differ but that share another coding (a dm+d product and its
/// SNOMED CT concept, say) are one medicine. Groups are the connected components of "shares a
/// code", keyed by their smallest concept key, so the result does not depend on input order.
fn join_shared_codings(keyed: BTreeMap<DedupKey, Vec<Item>>) -> BTreeMap<DedupKey, Vec<Item>> {
    let keys: Vec<DedupKey> = keyed.keys().cloned().collect();
    let mut parent: Vec<usize> = (0..keys.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut owner: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (i, key) in keys.iter().enumerate() {
        if !key.absence {
            owner
                .entry((key.system.clone(), key.code.clone()))
                .or_insert(i);
        }
    }
    for (i, (key, items)) in keyed.iter().enumerate() {
        for item in items {
            for c in &item.entry.codings {
                if c.code.trim().is_empty() || key.absence {
                    continue;
                }
                let code = (code_system(&c.system), c.code.trim().to_owned());
                match owner.get(&code) {
                    Some(&j) => {
                        let (a, b) = (root(&mut parent, i), root(&mut parent, j));
                        // The smaller index (smaller key) becomes the root.
                        parent[a.max(b)] = a.min(b);
                    }
                    None => {
                        owner.insert(code, i);
                    }
                }
            }
        }
    }
    let mut out: BTreeMap<DedupKey, Vec<Item>> = BTreeMap::new();
    for (i, (_, items)) in keyed.into_iter().enumerate() {
        let r = root(&mut parent, i);
        out.entry(keys[r].clone()).or_default().extend(items);
    }
    out
}

/// Most recent first (current medicines first; refuted entries last); undated last; then a
/// stable, content-based order.
fn entry_order(section: Section, a: &Entry, b: &Entry) -> Ordering {
    let refuted = |e: &Entry| e.verification_status == VerificationStatus::Refuted as i32;
    let current = |e: &Entry| match &e.detail {
        Some(Detail::Medication(m)) if section == Section::Medications => m.current,
        _ => true,
    };
    fn date(e: &Entry) -> (bool, &str) {
        let latest = match &e.detail {
            Some(Detail::Medication(m)) if m.latest_issue > e.effective => &m.latest_issue,
            _ => &e.effective,
        };
        (!latest.is_empty(), latest.as_str())
    }
    refuted(a)
        .cmp(&refuted(b))
        .then_with(|| current(b).cmp(&current(a)))
        .then_with(|| date(b).cmp(&date(a)))
        .then_with(|| code_of(a).cmp(code_of(b)))
        .then_with(|| a.summary.cmp(&b.summary))
        .then_with(|| first_provenance(a).cmp(&first_provenance(b)))
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

fn is_eie(p: &Provenance) -> bool {
    p.verification_status == VerificationStatus::EnteredInError as i32
}

fn prov_key(p: &Provenance) -> (&str, &str, &str) {
    (
        p.organisation_code.as_str(),
        p.source_id.as_str(),
        p.source_entry_id.as_str(),
    )
}

/// The date an assertion was made: recorded, else last updated, else effective; to the day.
fn asserted_on(p: &Provenance) -> &str {
    [&p.recorded, &p.last_updated, &p.effective]
        .into_iter()
        .find(|d| !d.trim().is_empty())
        .map(|d| day(d.trim()))
        .unwrap_or("")
}

fn status_rank(status: &str) -> u8 {
    match status.trim() {
        "active" => 10,
        "recurrence" => 9,
        "relapse" => 8,
        "on-hold" => 7,
        "intended" | "draft" => 6,
        "inactive" => 4,
        "remission" | "not-taken" => 3,
        "resolved" | "completed" | "stopped" | "cancelled" => 2,
        "refuted" | "entered-in-error" => 1,
        _ => 5,
    }
}

fn criticality_rank(c: &str) -> u8 {
    match c.trim() {
        "high" => 3,
        "unable-to-assess" => 2,
        "low" => 1,
        _ => 0,
    }
}

fn severity_rank(s: &str) -> u8 {
    match s.trim() {
        "severe" => 3,
        "moderate" => 2,
        "mild" => 1,
        _ => 0,
    }
}

fn verification_rank(v: i32) -> u8 {
    match VerificationStatus::try_from(v) {
        Ok(VerificationStatus::Confirmed) => 5,
        Ok(VerificationStatus::Unspecified) => 4,
        Ok(VerificationStatus::Provisional) => 3,
        Ok(VerificationStatus::Differential) => 2,
        Ok(VerificationStatus::Unconfirmed) => 1,
        _ => 0,
    }
}

/// How cautious an assertion is (greater is more cautious): rule 3's tie-break.
fn caution(p: &Provenance) -> (bool, u8, u8, u8, u8) {
    (
        p.verification_status != VerificationStatus::Refuted as i32,
        status_rank(&p.status),
        criticality_rank(&p.criticality),
        severity_rank(&p.severity),
        verification_rank(p.verification_status),
    )
}

/// Rule 3: the assertion the entry shows. `None` when `candidates` is empty.
fn headline<'a>(candidates: impl Iterator<Item = &'a Provenance>) -> Option<&'a Provenance> {
    let all: Vec<&Provenance> = candidates.collect();
    let undisputed: Vec<&Provenance> = all
        .iter()
        .copied()
        .filter(|p| !p.identity_disputed)
        .collect();
    let pool = if undisputed.is_empty() {
        all
    } else {
        undisputed
    };
    pool.into_iter().max_by(|a, b| {
        asserted_on(a)
            .cmp(asserted_on(b))
            .then_with(|| caution(a).cmp(&caution(b)))
            .then_with(|| prov_key(b).cmp(&prov_key(a)))
    })
}

/// Why the headline assertion won, for a conflict's resolution.
fn why_headline(winner: &Provenance, pool: &[&Provenance]) -> String {
    let on = asserted_on(winner);
    let tied = pool
        .iter()
        // The winner is a copy of one of the pool's assertions: compare by identity key.
        .filter(|p| prov_key(p) != prov_key(winner))
        .any(|p| asserted_on(p) == on);
    let who = if winner.organisation_code.is_empty() {
        winner.source_id.as_str()
    } else {
        winner.organisation_code.as_str()
    };
    if tied || on.is_empty() {
        format!("more cautious of equally recent assertions ({who})")
    } else {
        format!("most recent assertion ({who}, {on})")
    }
}

fn verification_word(v: i32) -> &'static str {
    match VerificationStatus::try_from(v) {
        Ok(VerificationStatus::Confirmed) => "confirmed",
        Ok(VerificationStatus::Unconfirmed) => "unconfirmed",
        Ok(VerificationStatus::Provisional) => "provisional",
        Ok(VerificationStatus::Differential) => "differential",
        Ok(VerificationStatus::Refuted) => "refuted",
        Ok(VerificationStatus::EnteredInError) => "entered-in-error",
        _ => "",
    }
}

type Getter = fn(&Provenance) -> String;

/// The clinically meaningful fields compared between organisations.
const COMPARED: [(&str, Getter, bool); 7] = [
    ("status", |p| p.status.trim().to_lowercase(), false),
    (
        "verification_status",
        |p| verification_word(p.verification_status).to_owned(),
        false,
    ),
    ("effective", |p| day(p.effective.trim()).to_owned(), true),
    ("ended", |p| day(p.ended.trim()).to_owned(), true),
    ("dosage", |p| p.dosage.trim().to_owned(), false),
    (
        "criticality",
        |p| p.criticality.trim().to_lowercase(),
        false,
    ),
    ("severity", |p| p.severity.trim().to_lowercase(), false),
];

/// Whether two stated values disagree (dates: neither is a prefix of the other).
fn disagree(a: &str, b: &str, is_date: bool) -> bool {
    if is_date {
        !(a.starts_with(b) || b.starts_with(a))
    } else {
        !a.eq_ignore_ascii_case(b)
    }
}

/// Conflicts between the assertions in `reps` (one per organisation), resolved by `winner`.
fn conflicts(
    reps: &[&Provenance],
    winner: &Provenance,
    why: &str,
    fields: &[&str],
) -> Vec<Conflict> {
    let mut out = Vec::new();
    for (field, get, is_date) in COMPARED {
        if !fields.contains(&field) {
            continue;
        }
        let stated: Vec<String> = reps
            .iter()
            .map(|p| get(p))
            .filter(|v| !v.is_empty())
            .collect();
        let split = stated
            .iter()
            .enumerate()
            .any(|(i, a)| stated[i + 1..].iter().any(|b| disagree(a, b, is_date)));
        if !split {
            continue;
        }
        let shown = get(winner);
        out.push(Conflict {
            field: field.to_owned(),
            values: reps
                .iter()
                .map(|p| ConflictValue {
                    source_id: p.source_id.clone(),
                    organisation_code: p.organisation_code.clone(),
                    organisation_name: p.organisation_name.clone(),
                    value: get(p),
                })
                .collect(),
            resolution: format!(
                "{}: {why}",
                if shown.is_empty() {
                    "not stated"
                } else {
                    &shown
                }
            ),
        });
    }
    out
}

/// One assertion per reporting source: its most recent (rule 3 within the source).
fn representatives<'a>(assertions: &[&'a Provenance]) -> Vec<&'a Provenance> {
    let mut by_source: BTreeMap<&str, Vec<&'a Provenance>> = BTreeMap::new();
    for p in assertions {
        by_source.entry(p.source_id.as_str()).or_default().push(p);
    }
    let mut reps: Vec<&Provenance> = by_source
        .into_values()
        .filter_map(|ps| headline(ps.into_iter()))
        .collect();
    reps.sort_by(|a, b| prov_key(a).cmp(&prov_key(b)));
    reps
}

/// Folds one group's copies into one entry (rules 2–5, 7), or `None` when only
/// entered-in-error assertions support it.
fn combine(section: Section, mut items: Vec<Item>, today: &str) -> Option<Entry> {
    items.sort_by(|a, b| {
        let ka = a.entry.provenance.first().map(prov_key);
        let kb = b.entry.provenance.first().map(prov_key);
        ka.cmp(&kb).then_with(|| a.order_key().cmp(&b.order_key()))
    });
    let mut assertions: Vec<Provenance> = items
        .iter()
        .flat_map(|i| i.entry.provenance.iter().cloned())
        .collect();
    assertions.sort_by(|a, b| prov_key(a).cmp(&prov_key(b)));
    let live: Vec<&Provenance> = assertions.iter().filter(|p| !is_eie(p)).collect();
    if live.is_empty() {
        return None;
    }
    let medicine = section == Section::Medications;
    // Medicines: each organisation's statements/authorisations speak for it before its issues.
    let plan = |p: &&Provenance| p.kind != "issue";
    let reps: Vec<&Provenance> = if medicine {
        let mut by_source: BTreeMap<&str, Vec<&Provenance>> = BTreeMap::new();
        for p in &live {
            by_source.entry(p.source_id.as_str()).or_default().push(p);
        }
        let mut reps: Vec<&Provenance> = by_source
            .into_values()
            .filter_map(|ps| {
                let plans: Vec<&Provenance> = ps.iter().copied().filter(plan).collect();
                if plans.is_empty() {
                    headline(ps.into_iter())
                } else {
                    headline(plans.into_iter())
                }
            })
            .collect();
        reps.sort_by(|a, b| prov_key(a).cmp(&prov_key(b)));
        reps
    } else {
        representatives(&live)
    };
    let winner = headline(reps.iter().copied())?.clone();

    // The copy the winner came from is the base; the others fill what it lacks.
    let base_at = items
        .iter()
        .position(|i| {
            i.entry
                .provenance
                .iter()
                .any(|p| prov_key(p) == prov_key(&winner))
        })
        .unwrap_or(0);
    let base = items.remove(base_at);
    let mut entry = base.entry;
    // Sets, not scans: a source may send thousands of codings (quadratic otherwise).
    let key = |c: &carerecord_proto::Coding| (c.system.clone(), c.code.clone(), c.display.clone());
    let mut have_labels: HashSet<_> = entry.security_labels.iter().map(key).collect();
    let mut have_codings: HashSet<_> = entry.codings.iter().map(key).collect();
    for other in &items {
        let e = &other.entry;
        let fill = |k: &mut String, d: &String| {
            if k.is_empty() {
                k.clone_from(d);
            }
        };
        fill(&mut entry.summary, &e.summary);
        fill(&mut entry.effective, &e.effective);
        fill(&mut entry.ended, &e.ended);
        fill(&mut entry.recorded, &e.recorded);
        match (entry.detail.as_mut(), &e.detail) {
            (None, _) => entry.detail.clone_from(&e.detail),
            // Every organisation's reactions are shown: one's "anaphylaxis" is never dropped
            // because another recorded "rash".
            (Some(Detail::Allergy(mine)), Some(Detail::Allergy(theirs))) => {
                for reaction in &theirs.reactions {
                    if !mine
                        .reactions
                        .iter()
                        .any(|r| r.trim().eq_ignore_ascii_case(reaction.trim()))
                    {
                        mine.reactions.push(reaction.clone());
                    }
                }
            }
            _ => {}
        }
        for label in &e.security_labels {
            if have_labels.insert(key(label)) {
                entry.security_labels.push(label.clone());
            }
        }
        for coding in &e.codings {
            if have_codings.insert(key(coding)) {
                entry.codings.push(coding.clone());
            }
        }
        if e.incomplete {
            entry.incomplete = true;
            if entry.incomplete_reason.is_empty() {
                entry.incomplete_reason.clone_from(&e.incomplete_reason);
            }
        }
    }

    // Headline values from the winning assertion.
    let set = |k: &mut String, v: &String| {
        if !v.is_empty() {
            k.clone_from(v);
        }
    };
    set(&mut entry.status, &winner.status);
    set(&mut entry.effective, &winner.effective);
    set(&mut entry.ended, &winner.ended);
    set(&mut entry.recorded, &winner.recorded);
    entry.verification_status = winner.verification_status;
    match entry.detail.as_mut() {
        Some(Detail::Allergy(a)) => {
            set(&mut a.criticality, &winner.criticality);
            set(&mut a.severity, &winner.severity);
        }
        Some(Detail::Medication(m)) => {
            set(&mut m.dosage, &winner.dosage);
        }
        _ => {}
    }
    if entry.verification_status == VerificationStatus::Refuted as i32 {
        entry.status = "refuted".into();
    }
    entry.identity_disputed = live.iter().all(|p| p.identity_disputed);

    // Conflicts: between organisations' representative assertions, plus any entered-in-error
    // assertion against the live ones.
    let reps_pool: Vec<&Provenance> = reps.clone();
    let why = why_headline(&winner, &reps_pool);
    let mut compared: Vec<&Provenance> = reps.clone();
    let eie: Vec<&Provenance> = assertions.iter().filter(|p| is_eie(p)).collect();
    let fields: &[&str] = if medicine {
        &["status", "dosage"]
    } else {
        &[
            "status",
            "verification_status",
            "effective",
            "ended",
            "dosage",
            "criticality",
            "severity",
        ]
    };
    let mut found_conflicts = if medicine {
        // Issues are routinely "completed": only statements/authorisations disagree on status.
        let plans: Vec<&Provenance> = reps.iter().copied().filter(plan).collect();
        let mut c = conflicts(&plans, &winner, &why, &["status"]);
        c.extend(conflicts(&reps, &winner, &why, &["dosage"]));
        c
    } else {
        conflicts(&compared, &winner, &why, fields)
    };
    if !eie.is_empty() {
        found_conflicts.retain(|c| c.field != "verification_status");
        compared.extend(eie);
        compared.sort_by(|a, b| prov_key(a).cmp(&prov_key(b)));
        found_conflicts.extend(conflicts(
            &compared,
            &winner,
            "entered-in-error assertions are never shown as current",
            &["verification_status"],
        ));
    }
    entry.conflicts = found_conflicts;

    if medicine {
        group_medicine(&mut entry, &assertions, &winner, today);
    }
    entry.provenance = assertions;
    Some(entry)
}

/// Rule 7: current vs past, latest issue, rows.
fn group_medicine(entry: &mut Entry, rows: &[Provenance], winner: &Provenance, today: &str) {
    let live: Vec<&Provenance> = rows.iter().filter(|p| !is_eie(p)).collect();
    let issue_date = |p: &Provenance| {
        let d = if p.effective.is_empty() {
            &p.recorded
        } else {
            &p.effective
        };
        day(d.trim()).to_owned()
    };
    let latest_issue = live
        .iter()
        .filter(|p| p.kind == "issue")
        .map(|p| issue_date(p))
        .max()
        .unwrap_or_default();
    let plan_current =
        winner.kind != "issue" && matches!(winner.status.trim(), "active" | "on-hold" | "intended");
    let recent_issue = !latest_issue.is_empty()
        && match (days(&latest_issue), days(today)) {
            (Some(issued), Some(now)) => now - issued <= 90,
            _ => false,
        };
    let stopped_since = live.iter().any(|p| {
        p.kind != "issue"
            && matches!(
                p.status.trim(),
                "stopped" | "cancelled" | "completed" | "entered-in-error"
            )
            && asserted_on(p) >= latest_issue.as_str()
    });
    let current = plan_current || (recent_issue && !stopped_since);
    let mut detail = match entry.detail.take() {
        Some(Detail::Medication(m)) => m,
        _ => Default::default(),
    };
    detail.current = current;
    detail.latest_issue = latest_issue;
    detail.rows = rows.len().try_into().unwrap_or(u32::MAX);
    detail.kind.clone_from(&winner.kind);
    entry.detail = Some(Detail::Medication(detail));
}

/// Days since the epoch of a `YYYY-MM-DD` date.
fn days(date: &str) -> Option<i64> {
    let mut parts = day(date).splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    Some(carerecord_adapters::calendar::days_from_civil(y, m, d))
}

fn display(e: &Entry) -> String {
    e.concept
        .as_ref()
        .map(|c| c.display.trim().to_owned())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| e.summary.clone())
}

fn orgs(ps: &[Provenance]) -> Vec<String> {
    let set: BTreeSet<String> = ps
        .iter()
        .map(|p| {
            if p.organisation_code.is_empty() {
                p.source_id.clone()
            } else {
                p.organisation_code.clone()
            }
        })
        .collect();
    set.into_iter().collect()
}

fn conflict_warning(entry: &Entry) -> Warning {
    let fields: Vec<&str> = entry.conflicts.iter().map(|c| c.field.as_str()).collect();
    let parts: Vec<String> = entry
        .conflicts
        .iter()
        .map(|c| {
            let said: Vec<String> = c
                .values
                .iter()
                .map(|v| {
                    format!(
                        "{} {}",
                        v.organisation_code,
                        if v.value.is_empty() { "-" } else { &v.value }
                    )
                })
                .collect();
            format!("{}: {}; showing {}", c.field, said.join(", "), c.resolution)
        })
        .collect();
    let mut source_ids: Vec<String> = entry
        .conflicts
        .iter()
        .flat_map(|c| c.values.iter().map(|v| v.source_id.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    source_ids.dedup();
    Warning {
        kind: WarningKind::Conflict as i32,
        message: format!(
            "Organisations disagree about {} ({}) — {}",
            display(entry),
            fields.join(", "),
            parts.join(" | ")
        ),
        source_ids,
    }
}

/// Whether an entry is an active finding (rule 6).
fn active_finding(section: Section, e: &Entry) -> bool {
    if e.asserts_absence {
        return false;
    }
    if e.verification_status == VerificationStatus::Refuted as i32
        || e.verification_status == VerificationStatus::EnteredInError as i32
    {
        return false;
    }
    match &e.detail {
        Some(Detail::Medication(m)) if section == Section::Medications => m.current,
        _ => matches!(e.status.trim(), "" | "active" | "recurrence" | "relapse"),
    }
}

/// Rule 6: a "no known ..." assertion contradicted by an active finding.
fn contradicted_absences(section: Section, entries: &mut [Entry], warnings: &mut Vec<Warning>) {
    let active: Vec<(String, Vec<Provenance>)> = entries
        .iter()
        .filter(|e| active_finding(section, e))
        .map(|e| (display(e), e.provenance.clone()))
        .collect();
    if active.is_empty() {
        return;
    }
    let noun = section.title().to_lowercase();
    for absence in entries.iter_mut().filter(|e| e.asserts_absence) {
        let what = display(absence);
        let mut values: Vec<ConflictValue> = absence
            .provenance
            .iter()
            .filter(|p| !is_eie(p))
            .map(|p| ConflictValue {
                source_id: p.source_id.clone(),
                organisation_code: p.organisation_code.clone(),
                organisation_name: p.organisation_name.clone(),
                value: what.clone(),
            })
            .collect();
        if values.is_empty() {
            continue;
        }
        let mut by_source: BTreeMap<(String, String, String), Vec<String>> = BTreeMap::new();
        for (name, ps) in &active {
            for p in ps.iter().filter(|p| !is_eie(p)) {
                let list = by_source
                    .entry((
                        p.source_id.clone(),
                        p.organisation_code.clone(),
                        p.organisation_name.clone(),
                    ))
                    .or_default();
                if !list.contains(name) {
                    list.push(name.clone());
                }
            }
        }
        let mut reports = Vec::new();
        for ((source_id, code, name), things) in by_source {
            reports.push(format!(
                "{code} reports active {} {}",
                singular(&noun),
                things.join(", ")
            ));
            values.push(ConflictValue {
                source_id,
                organisation_code: code,
                organisation_name: name,
                value: format!("active: {}", things.join(", ")),
            });
        }
        let sayers = orgs(&absence.provenance);
        let mut source_ids: Vec<String> = values.iter().map(|v| v.source_id.clone()).collect();
        source_ids.sort();
        source_ids.dedup();
        warnings.push(Warning {
            kind: WarningKind::Conflict as i32,
            message: format!(
                "{} {} {}; {}. Check with the patient.",
                sayers.join(", "),
                if sayers.len() == 1 { "says" } else { "say" },
                what.to_lowercase(),
                reports.join("; ")
            ),
            source_ids,
        });
        absence.conflicts.push(Conflict {
            field: "assertion".into(),
            values,
            resolution: "both: an active finding contradicts this assertion".into(),
        });
    }
}

fn singular(noun: &str) -> String {
    match noun {
        "allergies" => "allergy to".into(),
        "medications" => "medicine".into(),
        "conditions" => "condition".into(),
        other => other.trim_end_matches('s').to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Section statuses

fn section_statuses(
    sections: SectionSet,
    sources: &[SourceStatus],
    answers: &[Option<&Arc<Answer>>],
    not_asked: &[SourceInfo],
    gp_not_found: &str,
    degraded: bool,
) -> Vec<SectionStatus> {
    Section::ALL
        .iter()
        .map(|&section| {
            let title = section.title();
            if !sections.contains(section) {
                return SectionStatus {
                    section: section as i32,
                    state: SectionState::Unspecified as i32,
                    sources: Vec::new(),
                    summary: format!("{title}: not requested"),
                };
            }
            let mut lines: Vec<SourceSectionStatus> = sources
                .iter()
                .zip(answers)
                .map(|(status, answer)| {
                    source_section(section, status, answer.map(AsRef::as_ref), gp_not_found)
                })
                .collect();
            lines.extend(not_asked.iter().map(|info| SourceSectionStatus {
                source_id: info.id.clone(),
                organisation_code: info.organisation_code.clone(),
                state: SourceSectionState::NotAsked as i32,
                entries: 0,
                reason: "not asked".into(),
            }));
            let state = section_state(&lines, degraded);
            let summary = section_summary(title, &lines, degraded);
            SectionStatus {
                section: section as i32,
                state: state as i32,
                sources: lines,
                summary,
            }
        })
        .collect()
}

/// A section's state from its organisations' lines (see `SectionState`).
fn section_state(lines: &[SourceSectionStatus], degraded: bool) -> SectionState {
    let is = |s: &SourceSectionStatus, x: SourceSectionState| s.state == x as i32;
    let asked: Vec<&SourceSectionStatus> = lines
        .iter()
        .filter(|s| !is(s, SourceSectionState::NotAsked))
        .collect();
    let full = |s: &&SourceSectionStatus| {
        is(s, SourceSectionState::Entries) || is(s, SourceSectionState::NoneRecorded)
    };
    let some = asked
        .iter()
        .any(|s| full(s) || is(s, SourceSectionState::Incomplete));
    let all = !asked.is_empty() && asked.iter().all(full);
    let any_entries = asked.iter().any(|s| s.entries > 0);
    if !some {
        SectionState::Unknown
    } else if !all || degraded {
        SectionState::Partial
    } else if any_entries {
        SectionState::Recorded
    } else {
        SectionState::NoneRecorded
    }
}

/// Section statuses restricted to the organisations `keep` accepts (a patient's objection:
/// the requester may only learn about its own organisation), with state and summary
/// recomputed from what is left.
pub fn restrict_section_statuses(
    statuses: &[SectionStatus],
    keep: impl Fn(&SourceSectionStatus) -> bool,
) -> Vec<SectionStatus> {
    statuses
        .iter()
        .map(|status| {
            if status.state == SectionState::Unspecified as i32 {
                return status.clone();
            }
            let lines: Vec<SourceSectionStatus> =
                status.sources.iter().filter(|s| keep(s)).cloned().collect();
            let title = Section::try_from(status.section)
                .map(Section::title)
                .unwrap_or("Other");
            SectionStatus {
                section: status.section,
                state: section_state(&lines, false) as i32,
                summary: section_summary(title, &lines, false),
                sources: lines,
            }
        })
        .collect()
}

fn source_section(
    section: Section,
    status: &SourceStatus,
    answer: Option<&Answer>,
    gp_not_found: &str,
) -> SourceSectionStatus {
    let mut line = SourceSectionStatus {
        source_id: status.source_id.clone(),
        organisation_code: status.organisation_code.clone(),
        ..SourceSectionStatus::default()
    };
    let outcome = SourceOutcome::try_from(status.outcome).unwrap_or(SourceOutcome::Unspecified);
    match (outcome, answer.and_then(|a| a.record.as_ref())) {
        (SourceOutcome::Ok | SourceOutcome::Partial, Some(r)) => {
            let n = r
                .record
                .section(section)
                .iter()
                .filter(|e| e.verification_status != VerificationStatus::EnteredInError as i32)
                .count();
            line.entries = n.try_into().unwrap_or(u32::MAX);
            let reasons = shortfall_reasons(r, SectionSet::NONE.with(section));
            line.state = if !reasons.is_empty() {
                line.reason = reasons.join("; ");
                SourceSectionState::Incomplete
            } else if n > 0 {
                SourceSectionState::Entries
            } else {
                SourceSectionState::NoneRecorded
            } as i32;
        }
        (SourceOutcome::NotFound, _) => {
            if !gp_not_found.is_empty()
                && status.organisation_code.eq_ignore_ascii_case(gp_not_found)
            {
                line.state = SourceSectionState::Unknown as i32;
                line.reason = "registered GP does not know the patient".into();
            } else {
                line.state = SourceSectionState::NoneRecorded as i32;
                line.reason = NOT_KNOWN_THERE.into();
            }
        }
        _ => {
            line.state = SourceSectionState::Unknown as i32;
            line.reason = match outcome {
                SourceOutcome::Timeout => "timed out".into(),
                SourceOutcome::CircuitOpen => "circuit open".into(),
                SourceOutcome::Refused => "refused".into(),
                SourceOutcome::Unavailable => "unavailable".into(),
                SourceOutcome::WrongPatient => "answered about another patient".into(),
                _ => "error".into(),
            };
        }
    }
    line
}

/// The reason on a NONE_RECORDED line from a source that does not know the patient.
const NOT_KNOWN_THERE: &str = "patient not known there";

/// "Allergies: 2 recorded by RJ1; none recorded by H81005; unknown from RV5 — timed out".
fn section_summary(title: &str, lines: &[SourceSectionStatus], degraded: bool) -> String {
    let code = |s: &SourceSectionStatus| {
        if s.organisation_code.is_empty() {
            s.source_id.clone()
        } else {
            s.organisation_code.clone()
        }
    };
    let of = |x: SourceSectionState| -> Vec<&SourceSectionStatus> {
        lines.iter().filter(|s| s.state == x as i32).collect()
    };
    let mut parts = Vec::new();
    let with_entries = of(SourceSectionState::Entries);
    if !with_entries.is_empty() {
        let who: Vec<String> = with_entries
            .iter()
            .map(|s| format!("{} ({})", code(s), s.entries))
            .collect();
        parts.push(format!("recorded by {}", who.join(", ")));
    }
    let none = of(SourceSectionState::NoneRecorded);
    let (unknown_patient, none): (Vec<_>, Vec<_>) =
        none.into_iter().partition(|s| s.reason == NOT_KNOWN_THERE);
    if !none.is_empty() {
        let who: Vec<String> = none.iter().map(|s| code(s)).collect();
        parts.push(format!("none recorded by {}", who.join(", ")));
    }
    if !unknown_patient.is_empty() {
        let who: Vec<String> = unknown_patient.iter().map(|s| code(s)).collect();
        parts.push(format!("patient not known to {}", who.join(", ")));
    }
    for s in of(SourceSectionState::Incomplete) {
        parts.push(format!(
            "incomplete from {} ({} entries) — {}",
            code(s),
            s.entries,
            s.reason
        ));
    }
    let unknown = of(SourceSectionState::Unknown);
    if !unknown.is_empty() {
        let who: Vec<String> = unknown
            .iter()
            .map(|s| format!("{} — {}", code(s), s.reason))
            .collect();
        parts.push(format!("unknown from {}", who.join(", ")));
    }
    let not_asked = of(SourceSectionState::NotAsked);
    if !not_asked.is_empty() {
        let who: Vec<String> = not_asked.iter().map(|s| code(s)).collect();
        parts.push(format!("not asked: {}", who.join(", ")));
    }
    if degraded {
        parts.push("other organisations may hold records (a record locator did not answer)".into());
    }
    if parts.is_empty() {
        parts.push("no organisation was asked".into());
    }
    format!("{title}: {}", parts.join("; "))
}

#[cfg(test)]
mod tests;
