//! The view's HTML, written by hand in one place: every value that comes from a source, a
//! requester or a configuration goes through [`esc`] on its way into markup, and nothing else
//! builds markup. The templates are plain functions returning `String`; the static parts are
//! literals in this file.
//!
//! What a clinician reads, in order: who the patient is (banner), what must not be missed
//! (demographic and safety warnings, emergency access, withheld information), each section with
//! its status line and every entry's provenance, conflicts and verification status marked where
//! the entry is, then which organisations answered.

use std::fmt::Write;
use std::time::SystemTime;

use carerecord_adapters::calendar;
use carerecord_proto::entry::Detail;
use carerecord_proto::{
    Entry, Patient, Section, SectionState, SectionStatus, SourceOutcome, SourceStatus,
    VerificationStatus, WarningKind,
};

use crate::lookup::{LookupAnswer, SourceUpdate};
use crate::render::{current_and_past, entry_title, group_nhs};

/// `s` as HTML text or a double-quoted attribute value.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// What every page carries besides its main content.
pub struct Chrome<'a> {
    pub title: &'a str,
    /// The session's CSRF token, for the refresh form; `None` on pages without a session.
    pub csrf: Option<&'a str>,
    /// The progressive page: loads the script, and without scripts falls back to
    /// `record-complete`.
    pub live: bool,
}

/// A whole page around `main` (already HTML).
pub fn page(chrome: &Chrome<'_>, main: &str) -> String {
    let mut out = String::with_capacity(main.len() + 2048);
    out.push_str("<!DOCTYPE html>\n<html lang=\"en-GB\">\n<head>\n<meta charset=\"utf-8\">\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    out.push_str("<meta name=\"referrer\" content=\"no-referrer\">\n");
    let _ = writeln!(out, "<title>{} – carerecord</title>", esc(chrome.title));
    out.push_str("<link rel=\"stylesheet\" href=\"assets/view.css\">\n");
    if chrome.live {
        out.push_str("<script src=\"assets/view.js\" defer></script>\n");
        // Without scripts the same page, whole, once every organisation has answered.
        out.push_str(
            "<noscript><meta http-equiv=\"refresh\" content=\"0; url=record-complete\"></noscript>\n",
        );
    }
    out.push_str("</head>\n<body>\n");
    out.push_str("<a class=\"skip-link\" href=\"#main\">Skip to the record</a>\n");
    out.push_str("<header class=\"header\"><div class=\"width\"><span class=\"header__service\">carerecord</span> <span class=\"header__tag\">Shared care record</span>");
    if let Some(csrf) = chrome.csrf {
        let _ = write!(
            out,
            "<form class=\"header__refresh\" method=\"post\" action=\"refresh\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\" class=\"button button--secondary\">Ask every organisation again</button></form>",
            esc(csrf)
        );
    }
    out.push_str("</div></header>\n");
    let _ = write!(
        out,
        "<main id=\"main\" class=\"width\" tabindex=\"-1\">\n{main}\n</main>\n"
    );
    out.push_str("<footer class=\"footer\"><div class=\"width\">Every view of this record is recorded in the audit trail with your name and role.</div></footer>\n");
    out.push_str("</body>\n</html>\n");
    out
}

/// A page saying why there is nothing to show (a refused launch, no session, a refusal).
pub fn message(heading: &str, text: &str, reason: &str) -> String {
    format!(
        "<div class=\"callout callout--error\" role=\"alert\" data-reason=\"{}\"><h1>{}</h1><p>{}</p></div>",
        esc(reason),
        esc(heading),
        esc(text)
    )
}

/// The progressive page before any organisation has answered: a place for each section and
/// for the organisations, filled by the script as answers arrive, then replaced whole.
pub fn waiting() -> String {
    let mut out = String::from("<div id=\"record\" aria-busy=\"true\">\n");
    out.push_str("<div class=\"callout callout--info\" id=\"progress\" role=\"status\" aria-live=\"polite\"><p><strong>Asking organisations for this record…</strong> What each organisation holds appears as it answers. Entries are not yet checked against each other: conflicts and the patient's details are shown once every organisation has answered or the time limit is reached.</p></div>\n");
    out.push_str("<div class=\"layout\"><div class=\"layout__sections\">\n");
    for section in Section::ALL {
        let key = section.short_name();
        let _ = writeln!(
            out,
            "<section class=\"section\" aria-labelledby=\"h-{key}\"><h2 id=\"h-{key}\">{}</h2><p class=\"section__status\">Waiting for organisations…</p><ul class=\"arrivals\" id=\"arrivals-{key}\" aria-label=\"{} so far\"></ul></section>",
            esc(section.title()),
            esc(section.title()),
        );
    }
    out.push_str("</div>\n<aside class=\"layout__side\">");
    out.push_str("<section class=\"section organisations\" aria-labelledby=\"h-organisations\"><h2 id=\"h-organisations\">Organisations</h2><ul class=\"org-list\" id=\"org-list\"></ul></section>");
    out.push_str("</aside></div>\n</div>");
    out
}

/// One organisation's answer while the lookup runs: its line for the organisations list, and
/// per section the entries it sent (unmerged, so marked as provisional by the page).
pub struct Arrival {
    pub organisation: String,
    pub sections: Vec<(&'static str, String)>,
}

pub fn arrival(update: &SourceUpdate) -> Arrival {
    let organisation = org_item(&update.status);
    let mut sections = Vec::new();
    if let Some(record) = &update.contribution {
        for section in Section::ALL {
            let entries = record.section(section);
            if entries.is_empty() {
                continue;
            }
            let mut items = String::new();
            for e in entries {
                let _ = write!(
                    items,
                    "<li class=\"arrival\"><span class=\"arrival__what\">{}</span> <span class=\"arrival__from\">{}</span></li>",
                    esc(&entry_title(e)),
                    esc(&provenance_text(e)),
                );
            }
            sections.push((section.short_name(), items));
        }
    }
    Arrival {
        organisation,
        sections,
    }
}

fn org_item(s: &SourceStatus) -> String {
    let (label, class) = outcome_words(s.outcome);
    let mut out = format!(
        "<li class=\"org org--{class}\" data-org=\"{}\"><span class=\"org__name\">{}</span> <span class=\"tag tag--{class}\">{}</span>",
        esc(&s.organisation_code),
        esc(&org_name(s)),
        esc(label),
    );
    if s.outcome == SourceOutcome::Ok as i32 || s.outcome == SourceOutcome::Partial as i32 {
        let _ = write!(
            out,
            " <span class=\"org__detail\">{} entries, {} ms</span>",
            s.entries, s.latency_ms
        );
    } else {
        let _ = write!(
            out,
            " <span class=\"org__detail\">{} ms</span>",
            s.latency_ms
        );
    }
    if !s.message.is_empty() {
        let _ = write!(
            out,
            "<br><span class=\"org__message\">{}</span>",
            esc(&s.message)
        );
    }
    out.push_str("</li>");
    out
}

fn org_name(s: &SourceStatus) -> String {
    match (
        s.organisation_name.is_empty(),
        s.organisation_code.is_empty(),
    ) {
        (false, false) => format!("{} ({})", s.organisation_name, s.organisation_code),
        (false, true) => s.organisation_name.clone(),
        _ => s.organisation_code.clone(),
    }
}

/// A clinician's words for an outcome, and the class that colours it.
fn outcome_words(outcome: i32) -> (&'static str, &'static str) {
    match SourceOutcome::try_from(outcome).unwrap_or(SourceOutcome::Unspecified) {
        SourceOutcome::Ok => ("Answered", "ok"),
        SourceOutcome::NotFound => ("Does not know this patient", "neutral"),
        SourceOutcome::Timeout => ("Did not answer in time", "bad"),
        SourceOutcome::Error => ("Error", "bad"),
        SourceOutcome::Unavailable | SourceOutcome::CircuitOpen => ("Unavailable", "bad"),
        SourceOutcome::Refused => ("Refused", "bad"),
        SourceOutcome::Partial => ("Answered in part", "warn"),
        SourceOutcome::WrongPatient => ("Answered about another person: ignored", "bad"),
        SourceOutcome::Unspecified => ("Unknown", "bad"),
    }
}

/// The whole record as this requester may see it.
pub fn record(answer: &LookupAnswer, now: SystemTime) -> String {
    let mut out = String::from("<div id=\"record\" aria-busy=\"false\">\n");
    out.push_str(&banner(answer, now));
    out.push_str(&alerts(answer));
    out.push_str("<div class=\"layout\"><div class=\"layout__sections\">\n");
    for section in Section::ALL {
        let status = answer
            .section_statuses
            .iter()
            .find(|s| s.section == section as i32);
        if status.is_some_and(|s| s.state == SectionState::Unspecified as i32) {
            continue; // not asked for
        }
        out.push_str(&section_html(
            section,
            answer.record.section(section),
            status,
        ));
    }
    out.push_str("</div>\n<aside class=\"layout__side\">");
    out.push_str(&organisations(answer));
    out.push_str("</aside></div>\n</div>");
    out
}

fn banner(answer: &LookupAnswer, now: SystemTime) -> String {
    let Some(p) = &answer.record.patient else {
        let text = if answer.complete {
            "No organisation that answered knows this patient."
        } else {
            "No organisation that answered knows this patient, and some organisations did not answer: see Organisations."
        };
        return format!(
            "<section class=\"banner banner--unknown\" aria-label=\"Patient\"><p>{}</p></section>\n",
            esc(text)
        );
    };
    let mut out = String::from("<section class=\"banner\" aria-label=\"Patient\">");
    let given = p.given_names.join(" ");
    let _ = write!(
        out,
        "<h1 class=\"banner__name\">{}, {}</h1><dl class=\"banner__facts\">",
        esc(&p.family_name.to_uppercase()),
        esc(&given)
    );
    let fact = |out: &mut String, term: &str, value: &str| {
        let _ = write!(
            out,
            "<div><dt>{}</dt><dd>{}</dd></div>",
            esc(term),
            esc(value)
        );
    };
    fact(&mut out, "NHS number", &group_nhs(&p.nhs_number));
    let born = match age(&p.birth_date, now) {
        Some(years) => format!("{} ({years} years)", long_date(&p.birth_date)),
        None => or_unknown(&p.birth_date).to_owned(),
    };
    fact(&mut out, "Born", &born);
    fact(&mut out, "Gender", or_unknown(&p.gender));
    fact(
        &mut out,
        "Registered GP",
        &registered_gp(p, &answer.sources),
    );
    if !p.address.is_empty() {
        fact(&mut out, "Address", &p.address);
    }
    out.push_str("</dl></section>\n");
    out
}

fn registered_gp(p: &Patient, sources: &[SourceStatus]) -> String {
    if p.registered_gp_code.is_empty() {
        return "Not known".to_owned();
    }
    let named = flatten(sources)
        .into_iter()
        .find(|s| s.organisation_code == p.registered_gp_code && !s.organisation_name.is_empty());
    match named {
        Some(s) => format!("{} ({})", s.organisation_name, p.registered_gp_code),
        None => p.registered_gp_code.clone(),
    }
}

fn flatten(sources: &[SourceStatus]) -> Vec<&SourceStatus> {
    let mut all = Vec::new();
    for s in sources {
        all.push(s);
        all.extend(flatten(&s.nested));
    }
    all
}

/// What a clinician cannot miss: identity warnings first, then emergency access, withheld
/// information, other warnings, and when the record was assembled.
fn alerts(answer: &LookupAnswer) -> String {
    let mut out = String::new();
    let identity = |k: i32| {
        [
            WarningKind::DemographicsMismatch,
            WarningKind::WrongPatient,
            WarningKind::RegisteredGpNotFound,
        ]
        .iter()
        .any(|w| *w as i32 == k)
    };
    let (first, rest): (Vec<_>, Vec<_>) = answer.warnings.iter().partition(|w| identity(w.kind));
    if !first.is_empty() {
        out.push_str("<div class=\"callout callout--error\" role=\"alert\"><h2>Check the patient's identity</h2><ul>");
        for w in &first {
            let _ = write!(out, "<li>{}</li>", esc(&w.message));
        }
        out.push_str("</ul></div>\n");
    }
    if answer.emergency_access {
        out.push_str("<div class=\"callout callout--error\" role=\"alert\"><h2>Emergency access</h2><p>This record was opened under emergency access. This view is recorded and will be reviewed.</p></div>\n");
    }
    if answer.withheld {
        out.push_str("<div class=\"callout callout--warning\" id=\"withheld\"><h2>Some information is withheld</h2><p>Some information in this record is not shown to your role (sensitive entries, or data the patient has asked not to share). Nothing here says whether such information exists for this patient beyond this notice.</p></div>\n");
    }
    if !rest.is_empty() {
        out.push_str("<div class=\"callout callout--warning\"><h2>Warnings</h2><ul>");
        for w in &rest {
            let _ = write!(out, "<li>{}</li>", esc(&w.message));
        }
        out.push_str("</ul></div>\n");
    }
    let as_of = calendar::rfc3339(answer.assembled_at);
    let as_of = as_of.get(..16).unwrap_or(&as_of).replace('T', " ");
    let freshness = match answer.cache_age {
        Some(age) => format!(
            "from the broker's cache, {} old",
            human_duration(age.as_secs())
        ),
        None => "asked just now".to_owned(),
    };
    let completeness = if answer.complete {
        "Every organisation asked answered."
    } else {
        "Not every organisation answered: information may be missing (see each section and Organisations)."
    };
    let _ = writeln!(
        out,
        "<p class=\"as-of\" id=\"as-of\">Record as of <time datetime=\"{}\">{} UTC</time>, {}. {}</p>",
        esc(&calendar::rfc3339(answer.assembled_at)),
        esc(&as_of),
        esc(&freshness),
        esc(completeness),
    );
    out
}

fn human_duration(secs: u64) -> String {
    match secs {
        0 => "less than a second".to_owned(),
        1 => "1 second".to_owned(),
        s if s < 120 => format!("{s} seconds"),
        s => format!("{} minutes", s / 60),
    }
}

fn section_html(section: Section, entries: &[Entry], status: Option<&SectionStatus>) -> String {
    let key = section.short_name();
    let mut out = format!(
        "<section class=\"section\" id=\"section-{key}\" aria-labelledby=\"h-{key}\"><h2 id=\"h-{key}\">{} <span class=\"count\">({})</span></h2>",
        esc(section.title()),
        entries.len()
    );
    let (state_class, state_words) = match status.map(|s| SectionState::try_from(s.state)) {
        Some(Ok(SectionState::Recorded)) => ("recorded", ""),
        Some(Ok(SectionState::NoneRecorded)) => ("none", "None recorded. "),
        Some(Ok(SectionState::Partial)) => ("partial", "Incomplete: entries may be missing. "),
        Some(Ok(SectionState::Unknown)) => ("unknown", "Unknown: no organisation could answer. "),
        _ => ("recorded", ""),
    };
    if let Some(s) = status {
        let _ = write!(
            out,
            "<p class=\"section__status section__status--{state_class}\">{}{}</p>",
            esc(state_words),
            esc(&s.summary)
        );
    }
    if entries.is_empty() {
        out.push_str("</section>\n");
        return out;
    }
    match current_and_past(entries) {
        Some((current, past)) if section == Section::Medications => {
            for (label, group) in [("Current medicines", current), ("Past medicines", past)] {
                let _ = write!(out, "<h3>{} ({})</h3>", esc(label), group.len());
                if !group.is_empty() {
                    out.push_str(&entries_table(label, &group));
                }
            }
        }
        _ => {
            let all: Vec<&Entry> = entries.iter().collect();
            out.push_str(&entries_table(section.title(), &all));
        }
    }
    out.push_str("</section>\n");
    out
}

fn entries_table(caption: &str, entries: &[&Entry]) -> String {
    let mut out = format!(
        "<table class=\"entries\"><caption class=\"visually-hidden\">{}</caption><thead><tr><th scope=\"col\">Date</th><th scope=\"col\">Entry</th><th scope=\"col\">Status</th><th scope=\"col\">From</th></tr></thead><tbody>",
        esc(caption)
    );
    for e in entries {
        out.push_str(&entry_row(e));
    }
    out.push_str("</tbody></table>");
    out
}

fn entry_row(e: &Entry) -> String {
    let conflicted = !e.conflicts.is_empty();
    let class = if conflicted || e.identity_disputed {
        " class=\"entry entry--attention\""
    } else {
        " class=\"entry\""
    };
    let date = e.effective.get(..10).unwrap_or(&e.effective);
    let mut out = format!(
        "<tr{class}><td data-label=\"Date\">{}</td><td data-label=\"Entry\"><span class=\"entry__what\">{}</span>",
        esc(or_dash(date)),
        esc(&entry_title(e))
    );
    if let Some(Detail::Document(d)) = &e.detail
        && let Some(id) = d.url.strip_prefix(crate::documents::PREFIX)
    {
        let _ = write!(
            out,
            " <a class=\"document-link\" href=\"document/{}\">Open document<span class=\"visually-hidden\"> {}</span></a>",
            esc(id),
            esc(&entry_title(e))
        );
    }
    for detail in details(e) {
        let _ = write!(
            out,
            "<br><span class=\"entry__detail\">{}</span>",
            esc(&detail)
        );
    }
    for c in &e.conflicts {
        let said: Vec<String> = c
            .values
            .iter()
            .map(|v| {
                let who = if v.organisation_name.is_empty() {
                    if v.organisation_code.is_empty() {
                        &v.source_id
                    } else {
                        &v.organisation_code
                    }
                } else {
                    &v.organisation_name
                };
                format!("{who}: {}", or_dash(&v.value))
            })
            .collect();
        let field = if c.field == "assertion" {
            "contradicted".to_owned()
        } else {
            c.field.clone()
        };
        let _ = write!(
            out,
            "<div class=\"conflict\"><strong class=\"tag tag--bad\">Conflict</strong> <span class=\"conflict__field\">{}</span>: {}. <span class=\"conflict__resolution\">Showing {}.</span></div>",
            esc(&field),
            esc(&said.join("; ")),
            esc(&c.resolution)
        );
    }
    out.push_str("</td><td data-label=\"Status\">");
    out.push_str(&tags(e));
    let _ = write!(
        out,
        "</td><td data-label=\"From\">{}</td></tr>",
        esc(&provenance_text(e))
    );
    out
}

/// The status words and marks for what needs checking.
fn tags(e: &Entry) -> String {
    let mut out = String::new();
    if !e.status.is_empty() {
        let _ = write!(out, "<span class=\"status\">{}</span> ", esc(&e.status));
    }
    let verification = match VerificationStatus::try_from(e.verification_status) {
        Ok(VerificationStatus::Unconfirmed) => Some(("Unconfirmed", "warn")),
        Ok(VerificationStatus::Provisional) => Some(("Provisional", "warn")),
        Ok(VerificationStatus::Differential) => Some(("Differential", "warn")),
        Ok(VerificationStatus::Refuted) => Some(("Refuted", "neutral")),
        Ok(VerificationStatus::EnteredInError) => Some(("Entered in error", "bad")),
        _ => None,
    };
    if let Some((words, class)) = verification {
        let _ = write!(out, "<span class=\"tag tag--{class}\">{words}</span> ");
    }
    if e.asserts_absence {
        out.push_str("<span class=\"tag tag--neutral\">Assertion</span> ");
    }
    if e.identity_disputed {
        out.push_str(
            "<span class=\"tag tag--bad\">Identity disputed: check this is the same person</span> ",
        );
    }
    if e.incomplete {
        let _ = write!(
            out,
            "<span class=\"tag tag--warn\">Incomplete: {}</span> ",
            esc(or_dash(&e.incomplete_reason))
        );
    }
    out
}

/// Details worth a line of their own: dosage and last issue of a medicine, a result's value,
/// an allergy's reactions.
fn details(e: &Entry) -> Vec<String> {
    let mut out = Vec::new();
    match &e.detail {
        Some(Detail::Medication(m)) => {
            if !m.dosage.is_empty() && !entry_title(e).contains(&m.dosage) {
                out.push(m.dosage.clone());
            }
            if !m.latest_issue.is_empty() {
                out.push(format!("Last issued {}", m.latest_issue));
            }
        }
        Some(Detail::Allergy(a)) => {
            if !a.reactions.is_empty() {
                out.push(format!("Reaction: {}", a.reactions.join(", ")));
            }
            if !a.criticality.is_empty() {
                out.push(format!("Criticality: {}", a.criticality));
            }
        }
        Some(Detail::Result(r)) if !r.value.is_empty() => {
            let mut v = format!("{} {}", r.value, r.unit).trim().to_owned();
            if !r.reference_range.is_empty() {
                let _ = write!(v, " (range {})", r.reference_range);
            }
            out.push(v);
        }
        _ => {}
    }
    out
}

/// Every organisation that reported the entry, with the date it recorded it.
fn provenance_text(e: &Entry) -> String {
    let mut seen: Vec<String> = Vec::new();
    for p in &e.provenance {
        let who = if p.organisation_name.is_empty() {
            p.organisation_code.clone()
        } else {
            p.organisation_name.clone()
        };
        let when = [&p.recorded, &p.last_updated, &p.effective]
            .into_iter()
            .find(|d| !d.is_empty())
            .map(|d| d.get(..10).unwrap_or(d).to_owned());
        let text = match when {
            Some(d) => format!("{who}, {d}"),
            None => who,
        };
        if !seen.contains(&text) {
            seen.push(text);
        }
    }
    seen.join("; ")
}

fn organisations(answer: &LookupAnswer) -> String {
    let mut out = String::from(
        "<section class=\"section organisations\" id=\"organisations\" aria-labelledby=\"h-organisations\"><h2 id=\"h-organisations\">Organisations</h2><ul class=\"org-list\">",
    );
    for s in flatten(&answer.sources) {
        out.push_str(&org_item(s));
    }
    out.push_str("</ul></section>");
    out
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "–" } else { s }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() { "Not known" } else { s }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

fn ymd(date: &str) -> Option<(i64, u32, u32)> {
    let b = date.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    Some((
        date.get(..4)?.parse().ok()?,
        date.get(5..7)?.parse().ok()?,
        date.get(8..10)?.parse().ok()?,
    ))
}

/// `1984-03-07` as `7 Mar 1984`, the way clinical systems show dates of birth.
fn long_date(date: &str) -> String {
    match ymd(date) {
        Some((y, m, d)) if (1..=12).contains(&m) => format!("{d} {} {y}", MONTHS[m as usize - 1]),
        _ => date.to_owned(),
    }
}

/// Whole years from `birth` to `now`.
fn age(birth: &str, now: SystemTime) -> Option<i64> {
    let (by, bm, bd) = ymd(birth)?;
    let days = now.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs() / 86_400;
    let (y, m, d) = calendar::civil_from_days(days as i64);
    let mut years = y - by;
    if (m, d) < (bm, bd) {
        years -= 1;
    }
    (years >= 0).then_some(years)
}

#[cfg(test)]
mod tests {
    use super::*;
    use carerecord_proto::{
        CareRecord, Conflict, ConflictValue, MedicationDetail, Provenance, Warning,
    };
    use std::time::Duration;

    fn answer(record: CareRecord) -> LookupAnswer {
        LookupAnswer {
            request_id: "r1".into(),
            record: record.into(),
            sources: vec![SourceStatus {
                organisation_code: "H81005".into(),
                organisation_name: "Riverside Surgery".into(),
                outcome: SourceOutcome::Ok as i32,
                ..SourceStatus::default()
            }],
            complete: true,
            cache_age: Some(Duration::from_secs(5)),
            warnings: vec![Warning {
                kind: WarningKind::DemographicsMismatch as i32,
                message: "Family name differs: <b>Smyth</b> at RJ1".into(),
                source_ids: vec![],
            }],
            emergency_access: false,
            withheld: true,
            assembled_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000),
            locators: vec![],
            section_statuses: vec![],
        }
    }

    #[test]
    fn every_interpolated_value_is_escaped() {
        let hostile = "<script>alert(1)</script>\"'&";
        let record = CareRecord {
            patient: Some(Patient {
                family_name: hostile.into(),
                given_names: vec![hostile.into()],
                nhs_number: "9434765919".into(),
                birth_date: "1984-03-07".into(),
                registered_gp_code: "H81005".into(),
                ..Patient::default()
            }),
            allergies: vec![Entry {
                summary: hostile.into(),
                status: hostile.into(),
                provenance: vec![Provenance {
                    organisation_name: hostile.into(),
                    ..Provenance::default()
                }],
                conflicts: vec![Conflict {
                    field: hostile.into(),
                    values: vec![ConflictValue {
                        value: hostile.into(),
                        ..ConflictValue::default()
                    }],
                    resolution: hostile.into(),
                }],
                ..Entry::default()
            }],
            ..CareRecord::default()
        };
        let html = record_html(&answer(record));
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<b>"), "warnings escaped too");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"));
    }

    fn record_html(a: &LookupAnswer) -> String {
        record(
            a,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000),
        )
    }

    #[test]
    fn the_banner_shows_the_nhs_number_3_3_4_the_age_and_the_gp_by_name() {
        let record = CareRecord {
            patient: Some(Patient {
                family_name: "Smith".into(),
                given_names: vec!["Jane".into()],
                nhs_number: "9434765919".into(),
                birth_date: "1984-03-07".into(),
                registered_gp_code: "H81005".into(),
                ..Patient::default()
            }),
            medications: vec![
                Entry {
                    summary: "Metformin".into(),
                    detail: Some(Detail::Medication(MedicationDetail {
                        current: true,
                        ..MedicationDetail::default()
                    })),
                    ..Entry::default()
                },
                Entry {
                    summary: "Amoxicillin".into(),
                    detail: Some(Detail::Medication(MedicationDetail::default())),
                    ..Entry::default()
                },
            ],
            ..CareRecord::default()
        };
        let html = record_html(&answer(record));
        // 1_780_000_000 s is 2026-05-28.
        for want in [
            "SMITH, Jane",
            "943 476 5919",
            "7 Mar 1984 (42 years)",
            "Riverside Surgery (H81005)",
            "Check the patient's identity",
            "Some information is withheld",
            "from the broker&#39;s cache, 5 seconds old",
            "Current medicines (1)",
            "Past medicines (1)",
        ] {
            assert!(html.contains(want), "missing {want:?} in {html}");
        }
        let identity = html.find("Check the patient").expect("identity warning");
        let first_section = html.find("class=\"section\"").expect("a section");
        assert!(identity < first_section, "warnings before the sections");
    }
}
