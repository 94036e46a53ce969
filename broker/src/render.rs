//! Renders a care record for a person at a terminal: what a clinician would read first, then
//! where it came from and which organisations did not answer.

use std::fmt::Write;

use carerecord_proto::{Entry, GetCareRecordResponse, Section, SourceOutcome, SourceStatus};

/// Human title of a section.
pub fn section_title(section: Section) -> &'static str {
    match section {
        Section::Unspecified => "Other",
        Section::Conditions => "Conditions",
        Section::Medications => "Medications",
        Section::Allergies => "Allergies",
        Section::TestResults => "Test results",
        Section::CarePlans => "Care plans",
        Section::Documents => "Documents",
        Section::Encounters => "Encounters",
        Section::Appointments => "Appointments",
    }
}

/// Upper-case outcome word, fixed width friendly.
pub fn outcome_label(outcome: i32) -> &'static str {
    match SourceOutcome::try_from(outcome) {
        Ok(SourceOutcome::Ok) => "OK",
        Ok(SourceOutcome::NotFound) => "NOT_FOUND",
        Ok(SourceOutcome::Timeout) => "TIMEOUT",
        Ok(SourceOutcome::Error) => "ERROR",
        Ok(SourceOutcome::Unavailable) => "UNAVAILABLE",
        Ok(SourceOutcome::CircuitOpen) => "CIRCUIT_OPEN",
        Ok(SourceOutcome::Refused) => "REFUSED",
        Ok(SourceOutcome::Partial) => "PARTIAL",
        Ok(SourceOutcome::WrongPatient) => "WRONG_PATIENT",
        _ => "UNKNOWN",
    }
}

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
        None => {
            let _ = writeln!(out, "No organisation that answered knows this patient.");
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
            "INCOMPLETE: some organisations did not answer"
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
        if entries.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n{} ({})", section_title(section), entries.len());
        for e in entries {
            let _ = writeln!(out, "  {}", entry_line(e));
        }
    }
    let _ = writeln!(out, "\nSources");
    for s in &r.sources {
        out.push_str(&source_line(s, 1));
    }
    out
}

/// One entry: date, summary, status, and who reported it.
pub fn entry_line(e: &Entry) -> String {
    let date = e.effective.get(..10).unwrap_or(&e.effective);
    let what = if e.summary.is_empty() {
        e.concept
            .as_ref()
            .map(|c| c.display.clone())
            .unwrap_or_default()
    } else {
        e.summary.clone()
    };
    let who: Vec<&str> = e
        .provenance
        .iter()
        .map(|p| p.organisation_code.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let status = if e.status.is_empty() {
        String::new()
    } else {
        format!(" ({})", e.status)
    };
    format!(
        "{:<10}  {what}{status}  [{}]",
        or_dash(date),
        who.join(", ")
    )
}

/// One source status line, with nested broker sources indented beneath.
pub fn source_line(s: &SourceStatus, depth: usize) -> String {
    let mut line = format!(
        "{}{:<12} {:<8} {:<40} {:>6} ms {:>4} entries",
        "  ".repeat(depth),
        outcome_label(s.outcome),
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

fn group_nhs(d: &str) -> String {
    if d.len() == 10 && d.is_ascii() {
        format!("{} {} {}", &d[..3], &d[3..6], &d[6..])
    } else {
        d.to_owned()
    }
}
