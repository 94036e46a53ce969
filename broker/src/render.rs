//! Renders a care record for a person at a terminal: what a clinician would read first, then
//! where it came from and which organisations did not answer.

use std::fmt::Write;

use carerecord_proto::entry::Detail;
use carerecord_proto::{
    Entry, GetCareRecordResponse, Section, SectionState, SectionStatus, SourceOutcome,
    SourceStatus, VerificationStatus,
};

/// The whole response as text.
pub fn response(r: &GetCareRecordResponse) -> String {
    let mut out = String::new();
    let record = r.record.clone().unwrap_or_default();
    match &record.patient {
        Some(p) => {
            let _ = writeln!(
                out,
                "{} {}  NHS {}  born {}  {}",
                p.given_names.join(" "),
                p.family_name.to_uppercase(),
                group_nhs(&p.nhs_number),
                or_dash(&p.birth_date),
                or_dash(&p.gender)
            );
            if !p.address.is_empty() {
                let _ = writeln!(out, "Address: {}", p.address);
            }
            if !p.registered_gp_code.is_empty() {
                let _ = writeln!(out, "Registered GP: {}", p.registered_gp_code);
            }
        }
        None if r.complete => {
            let _ = writeln!(out, "No organisation that answered knows this patient.");
        }
        None => {
            let _ = writeln!(
                out,
                "No demographics: no organisation that answered knows this patient, and some could not answer (see below)."
            );
        }
    }
    let freshness = if r.from_cache {
        format!("from cache, {} ms old", r.cache_age_ms)
    } else {
        "fresh".to_owned()
    };
    let _ = writeln!(
        out,
        "Request {}  assembled {}  {}  {}",
        r.request_id,
        r.assembled_at,
        freshness,
        if r.complete {
            "complete"
        } else {
            "INCOMPLETE: data may be missing (see warnings and each section's status)"
        }
    );
    if r.emergency_access {
        let _ = writeln!(out, "EMERGENCY ACCESS: this view is audited and reported.");
    }
    if r.withheld {
        let _ = writeln!(out, "Some information has been withheld from this view.");
    }
    if !r.warnings.is_empty() {
        let _ = writeln!(out, "\nWarnings");
        for w in &r.warnings {
            let _ = writeln!(out, "  ! {}", w.message);
        }
    }
    for section in Section::ALL {
        let entries = record.section(section);
        let status = r
            .section_statuses
            .iter()
            .find(|s| s.section == section as i32);
        if status.is_some_and(|s| s.state == SectionState::Unspecified as i32) {
            // Not requested.
            continue;
        }
        if status.is_none() && entries.is_empty() {
            // A broker too old to say why a section is empty: say nothing rather than guess.
            continue;
        }
        out.push_str(&section_block(section, entries, status));
    }
    let _ = writeln!(out, "\nSources");
    for s in &r.sources {
        out.push_str(&source_line(s, 1));
    }
    out
}

/// One section: its heading with the section status ("none recorded by ..., unknown from ...
/// — timed out"), then its entries (medicines split into current and past).
pub fn section_block(
    section: Section,
    entries: &[Entry],
    status: Option<&SectionStatus>,
) -> String {
    let mut out = String::new();
    let state = match status.map(|s| SectionState::try_from(s.state)) {
        Some(Ok(SectionState::Recorded)) => "",
        Some(Ok(SectionState::NoneRecorded)) => "  NONE RECORDED",
        Some(Ok(SectionState::Partial)) => "  PARTIAL: entries may be missing",
        Some(Ok(SectionState::Unknown)) => "  UNKNOWN: no organisation could answer",
        _ => "",
    };
    let _ = writeln!(out, "\n{} ({}){state}", section.title(), entries.len());
    if let Some(s) = status {
        let _ = writeln!(out, "  {}", s.summary);
    }
    if section == Section::Medications
        && let Some((current, past)) = current_and_past(entries)
    {
        for (label, group) in [("Current", current), ("Past", past)] {
            if group.is_empty() {
                continue;
            }
            let _ = writeln!(out, "  {label}:");
            for e in group {
                out.push_str(&entry_block(e, "    "));
            }
        }
    } else {
        for e in entries {
            out.push_str(&entry_block(e, "  "));
        }
    }
    out
}

/// Medicines split into current and past (an entry without medication detail counts as
/// current: never hidden among the past); `None` when no entry carries medication detail.
pub fn current_and_past(entries: &[Entry]) -> Option<(Vec<&Entry>, Vec<&Entry>)> {
    let current = |e: &Entry| match &e.detail {
        Some(Detail::Medication(m)) => Some(m.current),
        _ => None,
    };
    if !entries.iter().any(|e| current(e).is_some()) {
        return None;
    }
    Some(entries.iter().partition(|e| current(e).unwrap_or(true)))
}

/// What an entry is, in words: its summary, else its concept's display.
pub fn entry_title(e: &Entry) -> String {
    if e.summary.is_empty() {
        e.concept
            .as_ref()
            .map(|c| c.display.clone())
            .unwrap_or_default()
    } else {
        e.summary.clone()
    }
}

/// An entry's line, then one line per conflict.
fn entry_block(e: &Entry, indent: &str) -> String {
    let mut out = format!("{indent}{}\n", entry_line(e));
    for c in &e.conflicts {
        let said: Vec<String> = c
            .values
            .iter()
            .map(|v| {
                let who = if v.organisation_code.is_empty() {
                    &v.source_id
                } else {
                    &v.organisation_code
                };
                format!("{who} {}", or_dash(&v.value))
            })
            .collect();
        let _ = writeln!(
            out,
            "{indent}  \u{26a0} conflict: {} \u{2014} {}; showing {}",
            c.field,
            said.join(", "),
            c.resolution
        );
    }
    out
}

/// One entry: date, summary, status (with verification status when not plainly confirmed),
/// medicine currency and latest issue, who reported it, and marks for what needs checking.
pub fn entry_line(e: &Entry) -> String {
    let date = e.effective.get(..10).unwrap_or(&e.effective);
    let what = entry_title(e);
    let who: Vec<&str> = e
        .provenance
        .iter()
        .map(|p| p.organisation_code.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut notes: Vec<String> = Vec::new();
    if !e.status.is_empty() {
        notes.push(e.status.clone());
    }
    let verification = match VerificationStatus::try_from(e.verification_status) {
        Ok(VerificationStatus::Unconfirmed) => "unconfirmed",
        Ok(VerificationStatus::Provisional) => "provisional",
        Ok(VerificationStatus::Differential) => "differential",
        Ok(VerificationStatus::Refuted) if e.status != "refuted" => "refuted",
        Ok(VerificationStatus::EnteredInError) => "entered in error",
        _ => "",
    };
    if !verification.is_empty() {
        notes.push(verification.to_owned());
    }
    if let Some(Detail::Medication(m)) = &e.detail {
        if !m.dosage.is_empty() && !what.contains(&m.dosage) {
            notes.push(m.dosage.clone());
        }
        if !m.latest_issue.is_empty() {
            notes.push(format!("last issued {}", m.latest_issue));
        }
        if m.rows > 1 {
            notes.push(format!("{} rows", m.rows));
        }
    }
    let status = if notes.is_empty() {
        String::new()
    } else {
        format!(" ({})", notes.join(", "))
    };
    let mut marks = String::new();
    if e.asserts_absence {
        marks.push_str("  [assertion]");
        if e.conflicts.iter().any(|c| c.field == "assertion") {
            marks.push_str(" \u{26a0} CONTRADICTED");
        }
    }
    if e.identity_disputed {
        marks.push_str("  ? IDENTITY DISPUTED: check this is the same person");
    }
    if e.incomplete {
        let _ = write!(marks, "  INCOMPLETE: {}", or_dash(&e.incomplete_reason));
    }
    format!(
        "{:<10}  {what}{status}  [{}]{marks}",
        or_dash(date),
        who.join(", ")
    )
}

/// One source status line, with nested broker sources indented beneath.
pub fn source_line(s: &SourceStatus, depth: usize) -> String {
    let mut line = format!(
        "{}{:<12} {:<8} {:<40} {:>6} ms {:>4} entries",
        "  ".repeat(depth),
        SourceOutcome::label_of(s.outcome),
        s.organisation_code,
        s.organisation_name,
        s.latency_ms,
        s.entries
    );
    if !s.message.is_empty() {
        let _ = write!(line, "  {}", s.message);
    }
    line.push('\n');
    for n in &s.nested {
        line.push_str(&source_line(n, depth + 1));
    }
    line
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// An NHS number as people read it: 3-3-4.
pub fn group_nhs(d: &str) -> String {
    if d.len() == 10 && d.is_ascii() {
        format!("{} {} {}", &d[..3], &d[3..6], &d[6..])
    } else {
        d.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carerecord_proto::{
        CareRecord, Coding, Conflict, ConflictValue, MedicationDetail, Patient, Provenance,
        SourceSectionStatus,
    };

    fn prov(org: &str) -> Provenance {
        Provenance {
            source_id: org.to_lowercase(),
            organisation_code: org.into(),
            ..Provenance::default()
        }
    }

    fn value(org: &str, v: &str) -> ConflictValue {
        ConflictValue {
            organisation_code: org.into(),
            value: v.into(),
            ..ConflictValue::default()
        }
    }

    fn status(section: Section, state: SectionState, summary: &str) -> SectionStatus {
        SectionStatus {
            section: section as i32,
            state: state as i32,
            sources: vec![SourceSectionStatus::default()],
            summary: summary.into(),
        }
    }

    #[test]
    fn every_section_is_printed_with_its_status_and_entries_with_what_to_check() {
        let record = CareRecord {
            patient: Some(Patient {
                family_name: "Smith".into(),
                ..Patient::default()
            }),
            allergies: vec![
                Entry {
                    summary: "Allergy to penicillin".into(),
                    status: "active".into(),
                    verification_status: VerificationStatus::Unconfirmed as i32,
                    provenance: vec![prov("RJ1"), prov("H81005")],
                    conflicts: vec![Conflict {
                        field: "status".into(),
                        values: vec![value("H81005", "resolved"), value("RJ1", "active")],
                        resolution: "active: most recent assertion (RJ1, 2026-11-02)".into(),
                    }],
                    ..Entry::default()
                },
                Entry {
                    concept: Some(Coding {
                        display: "No known allergy".into(),
                        ..Coding::default()
                    }),
                    asserts_absence: true,
                    provenance: vec![prov("RV5")],
                    conflicts: vec![Conflict {
                        field: "assertion".into(),
                        ..Conflict::default()
                    }],
                    ..Entry::default()
                },
                Entry {
                    summary: "Latex allergy".into(),
                    status: "refuted".into(),
                    verification_status: VerificationStatus::Refuted as i32,
                    identity_disputed: true,
                    provenance: vec![prov("RV5")],
                    ..Entry::default()
                },
            ],
            medications: vec![
                Entry {
                    summary: "Metformin 500mg tablets".into(),
                    status: "active".into(),
                    detail: Some(Detail::Medication(MedicationDetail {
                        current: true,
                        latest_issue: "2026-11-15".into(),
                        rows: 3,
                        ..MedicationDetail::default()
                    })),
                    provenance: vec![prov("H81005")],
                    ..Entry::default()
                },
                Entry {
                    summary: "Amoxicillin 500mg capsules".into(),
                    status: "completed".into(),
                    detail: Some(Detail::Medication(MedicationDetail::default())),
                    provenance: vec![prov("H81005")],
                    ..Entry::default()
                },
            ],
            ..CareRecord::default()
        };
        let response = GetCareRecordResponse {
            record: Some(record),
            section_statuses: vec![
                status(
                    Section::Conditions,
                    SectionState::NoneRecorded,
                    "Conditions: none recorded by H81005, RJ1",
                ),
                status(
                    Section::Allergies,
                    SectionState::Partial,
                    "Allergies: recorded by RJ1 (1); unknown from RV5 — timed out",
                ),
                status(
                    Section::Medications,
                    SectionState::Recorded,
                    "Medications: recorded by H81005 (2)",
                ),
                status(
                    Section::TestResults,
                    SectionState::Unspecified,
                    "Test results: not requested",
                ),
            ],
            sources: vec![SourceStatus {
                organisation_code: "RJ1".into(),
                outcome: SourceOutcome::Partial as i32,
                message: "incomplete: results cut at the 20-page limit".into(),
                ..SourceStatus::default()
            }],
            ..GetCareRecordResponse::default()
        };
        let text = response_text(&response);
        for want in [
            "Conditions (0)  NONE RECORDED",
            "  Conditions: none recorded by H81005, RJ1",
            "Allergies (3)  PARTIAL: entries may be missing",
            "unknown from RV5 — timed out",
            "Allergy to penicillin (active, unconfirmed)  [H81005, RJ1]",
            "⚠ conflict: status — H81005 resolved, RJ1 active; showing active: most recent assertion (RJ1, 2026-11-02)",
            "No known allergy  [RV5]  [assertion] ⚠ CONTRADICTED",
            "Latex allergy (refuted)  [RV5]  ? IDENTITY DISPUTED",
            "  Current:\n    -           Metformin 500mg tablets (active, last issued 2026-11-15, 3 rows)",
            "  Past:\n    -           Amoxicillin 500mg capsules (completed)",
            "PARTIAL",
            "INCOMPLETE: data may be missing",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.contains("Test results"), "not requested: not printed");
    }

    fn response_text(r: &GetCareRecordResponse) -> String {
        response(r)
    }
}
