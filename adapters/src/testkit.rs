//! The adapter conformance kit: runs a [`Source`] through its contract, one check per line of it,
//! and reports which lines hold. `ADAPTERS.md` explains each line; this module tests them.
//!
//! Point the kit at your source talking to a test double of the organisation's system (never a
//! live one), with one patient it knows and one it does not:
//!
//! ```no_run
//! use carerecord_adapters::testkit::Conformance;
//! use carerecord_adapters::{NhsNumber, Source};
//!
//! async fn conforms(source: &dyn Source, slow: &dyn Source) {
//!     let known = NhsNumber::parse("9990000018").expect("valid");
//!     let unknown = NhsNumber::parse("9990000026").expect("valid");
//!     let report = Conformance::new(source, known, unknown)
//!         // The same adapter against an upstream that takes seconds to answer (optional).
//!         .with_slow_upstream(slow)
//!         .run()
//!         .await;
//!     println!("{report}");
//!     report.assert_all_passed();
//! }
//! ```
//!
//! Checks are [`Level::Must`] (a failure fails the report) or [`Level::Should`] (a failure is a
//! warning: the broker copes, but the record is poorer). Every fetch runs under a time limit and
//! with panics caught, so a hanging or panicking source fails checks instead of the test run.
//!
//! Garbage from upstream is adapter-specific: [`Garbage`] gives the bodies ([`Garbage::for_format`]:
//! FHIR, other JSON, CSV, binary), [`GarbageServer`] serves one over HTTP, [`survives_garbage`]
//! judges the source's answer, and [`garbage_over_http`] / [`garbage_over_http_as`] do all three
//! for every kind. [`StubServer`] is a loopback test double of an organisation's HTTP API.
//!
//! Run the kit on real (not paused) tokio time: it measures how long the source takes.

use std::fmt;
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use carerecord_proto::{CareRecord, Entry, Purpose, Requester, Section};
use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::{NhsNumber, SectionSet, Source, SourceError, SourceRecord, SourceReply, SourceRequest};

/// The names of the checks, as they appear in a [`Report`]; use them with [`Report::check`].
pub mod checks {
    /// The source has an id and an organisation (ODS) code.
    pub const IDENTIFIES_ITSELF: &str = "identifies itself (id and ODS code)";
    /// The known patient is `Found`, with at least one entry.
    pub const FINDS_KNOWN_PATIENT: &str = "a known patient is found, with entries";
    /// Demographics, when returned, carry the NHS number asked about (normalised).
    pub const RIGHT_PATIENT: &str = "answers about the patient asked about";
    /// An unknown patient is `Ok(SourceReply::NotFound)`, not an error.
    pub const NOT_FOUND_IS_NOT_AN_ERROR: &str = "not-found is not an error";
    /// Every entry has provenance carrying the source's own id for the entry.
    pub const PROVENANCE: &str = "every entry has provenance with the source's entry id";
    /// Every entry's provenance says when the source last updated it (warning only).
    pub const LAST_UPDATED: &str = "entries say when they were last updated";
    /// Every entry has a coded concept, system and code (warning only).
    pub const CODED: &str = "entries carry a coded concept";
    /// Dates are ISO 8601, possibly partial (warning only).
    pub const DATES: &str = "dates are ISO 8601 (possibly partial)";
    /// Asked for one section, nothing comes back in the others (warning only: the broker drops
    /// the excess).
    pub const ONLY_REQUESTED_SECTIONS: &str = "only the sections asked for are returned";
    /// Asked for one section alone, the source gives the same entries as when asked for all.
    pub const SECTION_ALONE: &str = "a section asked for alone has the same entries";
    /// Two fetches in a row give the same record.
    pub const DETERMINISTIC: &str = "two fetches give the same record";
    /// The record does not depend on who asks: the broker applies access policy itself.
    pub const SAME_FOR_EVERY_REQUESTER: &str = "the record does not depend on who asks";
    /// Concurrent fetches all succeed, with the same record.
    pub const CONCURRENT: &str = "concurrent fetches all succeed";
    /// A fetch returns by its deadline (plus a small grace), even a deadline already passed.
    pub const DEADLINE: &str = "answers by the deadline";
    /// Fetches dropped mid-flight leave the source working.
    pub const CANCELLATION_SAFE: &str = "survives being cancelled mid-fetch";
    /// No fetch panicked.
    pub const NEVER_PANICS: &str = "never panics";
    /// No error or warning text contains the patient's NHS number or name.
    pub const REDACTED: &str = "errors and warnings carry no patient data";
}

/// How long an ordinary fetch may take before the kit calls it hung.
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(5);
/// The deadline the deadline check sets.
pub const DEFAULT_SHORT_DEADLINE: Duration = Duration::from_millis(50);
/// How late past a deadline an answer may be: scheduling noise, not work.
pub const DEFAULT_GRACE: Duration = Duration::from_millis(100);
/// How many fetches the concurrency check runs at once.
pub const DEFAULT_CONCURRENCY: usize = 8;

// ---------------------------------------------------------------------------------------------
// Checks and reports
// ---------------------------------------------------------------------------------------------

/// How much a check matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// A line of the contract: failing it fails the report.
    Must,
    /// Good practice the broker copes without: failing it is a warning.
    Should,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked; one of [`checks`], or a [`Garbage::check_name`].
    pub name: &'static str,
    /// Whether failing it fails the report.
    pub level: Level,
    /// Whether the source did what the check asks.
    pub passed: bool,
    /// What happened, and on failure what to change. Never contains patient identifiers.
    pub detail: String,
}

impl Check {
    fn must(name: &'static str, passed: bool, detail: impl Into<String>) -> Check {
        Check {
            name,
            level: Level::Must,
            passed,
            detail: detail.into(),
        }
    }

    fn should(name: &'static str, passed: bool, detail: impl Into<String>) -> Check {
        Check {
            level: Level::Should,
            ..Check::must(name, passed, detail)
        }
    }

    /// A failed [`Level::Must`] check.
    pub fn failed(&self) -> bool {
        !self.passed && self.level == Level::Must
    }

    /// A failed [`Level::Should`] check.
    pub fn warned(&self) -> bool {
        !self.passed && self.level == Level::Should
    }
}

/// The results of a conformance run, in the order the checks ran. `Display` renders one line
/// per check.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The source's id.
    pub source_id: String,
    /// Every check, in the order run.
    pub checks: Vec<Check>,
}

impl Report {
    /// The check with this name (see [`checks`]).
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// The failed [`Level::Must`] checks.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.failed())
    }

    /// The failed [`Level::Should`] checks.
    pub fn warnings(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.warned())
    }

    /// Whether every [`Level::Must`] check passed.
    pub fn all_passed(&self) -> bool {
        self.failures().next().is_none()
    }

    /// Panics, listing the failed checks, unless every [`Level::Must`] check passed.
    #[track_caller]
    pub fn assert_all_passed(&self) {
        if !self.all_passed() {
            let failures: Vec<String> = self
                .failures()
                .map(|c| format!("  - {}: {}", c.name, c.detail))
                .collect();
            panic!(
                "source {:?} failed {} conformance check(s):\n{}\n\nfull report:\n{self}",
                self.source_id,
                failures.len(),
                failures.join("\n")
            );
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let failed = self.failures().count();
        let warned = self.warnings().count();
        writeln!(
            f,
            "conformance of source {:?}: {} passed, {warned} warning(s), {failed} failed",
            self.source_id,
            self.checks.len() - failed - warned,
        )?;
        for check in &self.checks {
            let mark = match (check.passed, check.level) {
                (true, _) => "pass",
                (false, Level::Should) => "WARN",
                (false, Level::Must) => "FAIL",
            };
            writeln!(f, "  {mark}  {}: {}", check.name, check.detail)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The conformance run
// ---------------------------------------------------------------------------------------------

/// A conformance run over one source. Build it with [`Conformance::new`], adjust it with the
/// `with_*` methods, and [`run`](Conformance::run) it.
pub struct Conformance<'a> {
    /// The source under test.
    source: &'a dyn Source,
    /// The same adapter against an upstream slower than the short deadline, so the deadline and
    /// cancellation checks see the source mid-work rather than already finished.
    slow: Option<&'a dyn Source>,
    /// A patient the source knows, with entries in at least one section.
    known: NhsNumber,
    /// A patient the source does not know.
    unknown: NhsNumber,
    /// How long an ordinary fetch may take before it counts as hung.
    patience: Duration,
    /// The deadline the deadline check sets.
    short_deadline: Duration,
    /// How late past a deadline an answer may arrive.
    grace: Duration,
    /// Fetches run at once by the concurrency check.
    concurrency: usize,
}

impl<'a> Conformance<'a> {
    /// A run over `source`, which knows `known` (with entries) and does not know `unknown`.
    pub fn new(source: &'a dyn Source, known: NhsNumber, unknown: NhsNumber) -> Self {
        Conformance {
            source,
            slow: None,
            known,
            unknown,
            patience: DEFAULT_PATIENCE,
            short_deadline: DEFAULT_SHORT_DEADLINE,
            grace: DEFAULT_GRACE,
            concurrency: DEFAULT_CONCURRENCY,
        }
    }

    /// Uses `slow` (the same adapter, pointed at an upstream that takes longer than a second to
    /// answer) for the deadline check, and cancels fetches on it mid-flight. Without it those
    /// checks run against the normal source, which may finish before any deadline bites.
    pub fn with_slow_upstream(mut self, slow: &'a dyn Source) -> Self {
        self.slow = Some(slow);
        self
    }

    /// How long an ordinary fetch may take before it counts as hung (default 5 s).
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// How late past a deadline an answer may arrive (default 100 ms).
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// How many fetches the concurrency check runs at once (default 8).
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Runs every check and reports. Never panics on the source's account.
    pub async fn run(&self) -> Report {
        let mut run = Run {
            kit: self,
            checks: Vec::new(),
            texts: Vec::new(),
            panics: Vec::new(),
            fetches: 0,
        };
        run.identifies_itself();
        let baseline = run.finds_known_patient().await;
        let baseline = baseline.as_ref();
        run.right_patient(baseline);
        run.provenance(baseline);
        run.last_updated(baseline);
        run.coded(baseline);
        run.dates(baseline);
        run.not_found().await;
        run.sections(baseline).await;
        run.deterministic(baseline).await;
        run.same_for_every_requester(baseline).await;
        run.concurrent(baseline).await;
        let deadline_ok = run.deadline().await;
        // Last: a source that is not cancellation-safe may be wedged afterwards.
        run.cancellation_safe(baseline, deadline_ok).await;
        run.never_panics();
        run.redacted(baseline);
        Report {
            source_id: self.source.info().id.clone(),
            checks: run.checks,
        }
    }
}

/// A lookup as the broker would send it: request id, a clinician in direct care, no brokers
/// passed through. For adapter authors' own tests too.
pub fn request(nhs_number: NhsNumber, sections: SectionSet, deadline: Instant) -> SourceRequest {
    SourceRequest {
        request_id: "conformance".into(),
        nhs_number,
        sections,
        deadline,
        requester: Requester {
            user_id: "555000000001".into(),
            user_name: "Dr Conformance".into(),
            role_code: "R8000".into(),
            organisation_code: "RX1".into(),
            purpose: Purpose::DirectCare as i32,
            ..Requester::default()
        },
        via_brokers: Vec::new(),
    }
}

/// A different requester: another organisation, role and purpose (emergency access).
fn other_requester() -> Requester {
    Requester {
        user_id: "555000000002".into(),
        user_name: "Paramedic Conformance".into(),
        role_code: "R8003".into(),
        organisation_code: "RX9".into(),
        purpose: Purpose::EmergencyAccess as i32,
        emergency_reason: "conformance check".into(),
        asserted_relationship: String::new(),
    }
}

/// What one fetch did.
struct Attempt {
    outcome: Outcome,
    elapsed: Duration,
}

// Like `SourceReply`: boxing the common case to shrink the rare ones is not worth it.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    Replied(Result<SourceReply, SourceError>),
    Panicked(String),
    /// No answer within this limit; the fetch was dropped.
    Hung(Duration),
}

impl Attempt {
    fn record(&self) -> Option<&SourceRecord> {
        match &self.outcome {
            Outcome::Replied(Ok(SourceReply::Found(record))) => Some(record),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        let ms = self.elapsed.as_millis();
        match &self.outcome {
            Outcome::Replied(Ok(SourceReply::Found(r))) => format!(
                "Found ({} entries, {} warning(s)) in {ms} ms",
                r.record.entry_count(),
                r.warnings.len()
            ),
            Outcome::Replied(Ok(SourceReply::NotFound)) => format!("NotFound in {ms} ms"),
            Outcome::Replied(Err(e)) => format!("Err({}) \"{e}\" in {ms} ms", variant(e)),
            Outcome::Panicked(message) => format!("panicked: {message}"),
            Outcome::Hung(limit) => format!("no answer within {} ms", limit.as_millis()),
        }
    }
}

/// Calls `source.fetch` with panics caught, giving up after `limit`.
async fn call(source: &dyn Source, request: &SourceRequest, limit: Duration) -> Attempt {
    let started = Instant::now();
    let fetch = AssertUnwindSafe(source.fetch(request)).catch_unwind();
    let outcome = match tokio::time::timeout(limit, fetch).await {
        Err(_elapsed) => Outcome::Hung(limit),
        Ok(Err(panic)) => Outcome::Panicked(panic_message(panic.as_ref())),
        Ok(Ok(result)) => Outcome::Replied(result),
    };
    Attempt {
        outcome,
        elapsed: started.elapsed(),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".into())
}

fn variant(error: &SourceError) -> &'static str {
    match error {
        SourceError::Timeout => "Timeout",
        SourceError::Connect(_) => "Connect",
        SourceError::Status(_) => "Status",
        SourceError::InvalidResponse(_) => "InvalidResponse",
        SourceError::TooLarge(_) => "TooLarge",
        SourceError::Refused(_) => "Refused",
        SourceError::WrongPatient(_) => "WrongPatient",
        SourceError::Unavailable(_) => "Unavailable",
        SourceError::CircuitOpen => "CircuitOpen",
        SourceError::Other(_) => "Other",
    }
}

/// The state of one run: the checks so far and what the source said along the way.
struct Run<'k, 'a> {
    kit: &'k Conformance<'a>,
    checks: Vec<Check>,
    /// Every error and warning text the source produced, for the redaction check.
    texts: Vec<String>,
    /// Panics seen, for the never-panics check.
    panics: Vec<String>,
    /// Fetches made, for the summaries.
    fetches: usize,
}

impl Run<'_, '_> {
    /// Adds a check, its detail scrubbed of the NHS numbers the source may have echoed.
    fn push(&mut self, mut check: Check) {
        check.detail = scrub(&check.detail, &[self.kit.known, self.kit.unknown]);
        self.checks.push(check);
    }

    /// Records what a fetch said, for the run-wide checks.
    fn observe(&mut self, attempt: &Attempt) {
        self.fetches += 1;
        match &attempt.outcome {
            Outcome::Replied(Err(e)) => self.texts.push(e.to_string()),
            Outcome::Replied(Ok(SourceReply::Found(r))) => {
                self.texts.extend(r.warnings.iter().cloned());
                // Shortfall reasons and wrong-patient descriptions reach callers as warnings too.
                self.texts
                    .extend(r.shortfalls.iter().map(|s| s.reason.clone()));
                self.texts.extend(r.wrong_patient.iter().cloned());
            }
            Outcome::Panicked(message) => self.panics.push(message.clone()),
            Outcome::Replied(Ok(SourceReply::NotFound)) | Outcome::Hung(_) => {}
        }
    }

    /// One fetch from `source`, observed.
    async fn fetch_from(
        &mut self,
        source: &dyn Source,
        request: SourceRequest,
        limit: Duration,
    ) -> Attempt {
        let attempt = call(source, &request, limit).await;
        self.observe(&attempt);
        attempt
    }

    /// An ordinary fetch from the source under test: the patient, these sections, full patience.
    async fn fetch(&mut self, nhs_number: NhsNumber, sections: SectionSet) -> Attempt {
        let request = request(nhs_number, sections, Instant::now() + self.kit.patience);
        self.fetch_from(self.kit.source, request, self.kit.patience + self.kit.grace)
            .await
    }

    /// Records a check that needs the known patient's record when there is none.
    fn skip(&mut self, name: &'static str, level: Level) {
        self.push(Check {
            name,
            level,
            passed: false,
            detail: format!(
                "not checked: no record for the known patient (see \"{}\")",
                checks::FINDS_KNOWN_PATIENT
            ),
        });
    }

    fn identifies_itself(&mut self) {
        let info = self.kit.source.info();
        let passed = !info.id.trim().is_empty() && !info.organisation_code.trim().is_empty();
        let detail = if passed {
            format!(
                "id {:?}, organisation {:?} ({:?})",
                info.id, info.organisation_code, info.organisation_name
            )
        } else {
            "SourceInfo needs a non-empty id and organisation_code: they label every status, \
             provenance and audit line"
                .to_owned()
        };
        self.push(Check::must(checks::IDENTIFIES_ITSELF, passed, detail));
    }

    async fn finds_known_patient(&mut self) -> Option<SourceRecord> {
        let attempt = self.fetch(self.kit.known, SectionSet::ALL).await;
        let described = attempt.describe();
        let record = match attempt.outcome {
            Outcome::Replied(Ok(SourceReply::Found(record))) => record,
            _ => {
                self.push(Check::must(
                    checks::FINDS_KNOWN_PATIENT,
                    false,
                    format!("asked for every section of the known patient: {described}"),
                ));
                return None;
            }
        };
        let count = record.record.entry_count();
        if count == 0 {
            self.push(Check::must(
                checks::FINDS_KNOWN_PATIENT,
                false,
                format!(
                    "{described}: a known patient with no entries proves nothing; give the kit \
                     one with entries in at least one section"
                ),
            ));
            return None;
        }
        let sections: Vec<&str> = Section::ALL
            .iter()
            .filter(|s| !record.record.section(**s).is_empty())
            .map(|s| s.short_name())
            .collect();
        self.push(Check::must(
            checks::FINDS_KNOWN_PATIENT,
            true,
            format!("{described}, in {}", sections.join(", ")),
        ));
        Some(record)
    }

    fn right_patient(&mut self, baseline: Option<&SourceRecord>) {
        let Some(baseline) = baseline else {
            return self.skip(checks::RIGHT_PATIENT, Level::Must);
        };
        let check = match &baseline.record.patient {
            None => Check::must(
                checks::RIGHT_PATIENT,
                true,
                "no demographics returned (the broker takes them from other sources)",
            ),
            Some(p) if p.nhs_number.is_empty() => Check::must(
                checks::RIGHT_PATIENT,
                true,
                "demographics carry no NHS number",
            ),
            Some(p) if p.nhs_number == self.kit.known.as_digits() => Check::must(
                checks::RIGHT_PATIENT,
                true,
                "demographics carry the NHS number asked about",
            ),
            Some(p) => {
                let detail = match NhsNumber::parse(&p.nhs_number) {
                    Ok(n) if n == self.kit.known => {
                        "demographics carry the NHS number asked about, but not normalised to \
                         ten digits without spaces"
                    }
                    _ => {
                        "demographics carry a different NHS number from the one asked about: \
                         the source answered about another patient"
                    }
                };
                Check::must(checks::RIGHT_PATIENT, false, detail)
            }
        };
        self.push(check);
    }

    fn provenance(&mut self, baseline: Option<&SourceRecord>) {
        let Some(baseline) = baseline else {
            return self.skip(checks::PROVENANCE, Level::Must);
        };
        let bad = entries_where(&baseline.record, |e| {
            e.provenance.is_empty()
                || e.provenance
                    .iter()
                    .any(|p| p.source_entry_id.trim().is_empty())
        });
        let total = baseline.record.entry_count();
        self.push(if bad.is_empty() {
            Check::must(
                checks::PROVENANCE,
                true,
                format!("all {total} entries name their source entry"),
            )
        } else {
            Check::must(
                checks::PROVENANCE,
                false,
                format!(
                    "{} of {total} entries have no provenance or an empty source_entry_id ({}): \
                     give each entry one Provenance with the source's own id for it",
                    bad.len(),
                    sample(&bad)
                ),
            )
        });
    }

    fn last_updated(&mut self, baseline: Option<&SourceRecord>) {
        let Some(baseline) = baseline else {
            return self.skip(checks::LAST_UPDATED, Level::Should);
        };
        let bad = entries_where(&baseline.record, |e| {
            e.provenance.iter().all(|p| p.last_updated.is_empty())
        });
        let total = baseline.record.entry_count();
        self.push(if bad.is_empty() {
            Check::should(
                checks::LAST_UPDATED,
                true,
                format!("all {total} entries say when they were last updated"),
            )
        } else {
            Check::should(
                checks::LAST_UPDATED,
                false,
                format!(
                    "{} of {total} entries have no last_updated ({}): fill it where the system \
                     records it, so clinicians can judge how current an entry is",
                    bad.len(),
                    sample(&bad)
                ),
            )
        });
    }

    fn coded(&mut self, baseline: Option<&SourceRecord>) {
        let Some(baseline) = baseline else {
            return self.skip(checks::CODED, Level::Should);
        };
        let bad = entries_where(&baseline.record, |e| {
            e.concept
                .as_ref()
                .is_none_or(|c| c.system.trim().is_empty() || c.code.trim().is_empty())
        });
        let total = baseline.record.entry_count();
        self.push(if bad.is_empty() {
            Check::should(
                checks::CODED,
                true,
                format!("all {total} entries have a code system and code"),
            )
        } else {
            Check::should(
                checks::CODED,
                false,
                format!(
                    "{} of {total} entries have no code system and code ({}): uncoded entries \
                     cannot be merged with the same entry from other organisations",
                    bad.len(),
                    sample(&bad)
                ),
            )
        });
    }

    fn dates(&mut self, baseline: Option<&SourceRecord>) {
        let Some(baseline) = baseline else {
            return self.skip(checks::DATES, Level::Should);
        };
        let mut bad = Vec::new();
        let mut checked = 0usize;
        let mut look = |at: String, field: &str, value: &str| {
            if !value.is_empty() {
                checked += 1;
                if !is_iso8601(value) {
                    bad.push(format!("{at} {field} shaped {:?}", shape(value)));
                }
            }
        };
        if let Some(p) = &baseline.record.patient {
            look("patient".into(), "birth_date", &p.birth_date);
        }
        for_each_entry(&baseline.record, |at, e| {
            look(at.clone(), "effective", &e.effective);
            look(at.clone(), "ended", &e.ended);
            look(at.clone(), "recorded", &e.recorded);
            for p in &e.provenance {
                look(at.clone(), "last_updated", &p.last_updated);
            }
        });
        self.push(if bad.is_empty() {
            Check::should(
                checks::DATES,
                true,
                format!("all {checked} dates are ISO 8601"),
            )
        } else {
            Check::should(
                checks::DATES,
                false,
                format!(
                    "{} of {checked} dates are not ISO 8601 ({}): write YYYY, YYYY-MM, \
                     YYYY-MM-DD or an RFC 3339 date-time",
                    bad.len(),
                    sample(&bad)
                ),
            )
        });
    }

    async fn not_found(&mut self) {
        let attempt = self.fetch(self.kit.unknown, SectionSet::ALL).await;
        let described = attempt.describe();
        let check = match attempt.outcome {
            Outcome::Replied(Ok(SourceReply::NotFound)) => {
                Check::must(checks::NOT_FOUND_IS_NOT_AN_ERROR, true, described)
            }
            Outcome::Replied(Ok(SourceReply::Found(_))) => Check::must(
                checks::NOT_FOUND_IS_NOT_AN_ERROR,
                false,
                format!(
                    "{described} for the unknown patient: either it is known after all, or the \
                     source ignores the NHS number"
                ),
            ),
            Outcome::Replied(Err(_)) => Check::must(
                checks::NOT_FOUND_IS_NOT_AN_ERROR,
                false,
                format!(
                    "{described} for the unknown patient: a patient the source does not know \
                     is Ok(SourceReply::NotFound), which the broker reports as NOT_FOUND, not \
                     as a failure"
                ),
            ),
            _ => Check::must(checks::NOT_FOUND_IS_NOT_AN_ERROR, false, described),
        };
        self.push(check);
    }

    async fn sections(&mut self, baseline: Option<&SourceRecord>) {
        let Some(baseline) = baseline else {
            self.skip(checks::ONLY_REQUESTED_SECTIONS, Level::Should);
            return self.skip(checks::SECTION_ALONE, Level::Must);
        };
        let full = &baseline.record;
        // Allergies if the patient has any (the section a clinician most often asks for alone),
        // else the first section with entries.
        let Some(probe) = std::iter::once(Section::Allergies)
            .chain(Section::ALL)
            .find(|s| !full.section(*s).is_empty())
        else {
            return;
        };
        let attempt = self
            .fetch(self.kit.known, SectionSet::NONE.with(probe))
            .await;
        let Some(alone) = attempt.record() else {
            let described = attempt.describe();
            let why = format!("asked for {} alone: {described}", probe.short_name());
            self.push(Check::should(
                checks::ONLY_REQUESTED_SECTIONS,
                false,
                why.clone(),
            ));
            return self.push(Check::must(checks::SECTION_ALONE, false, why));
        };
        let alone = &alone.record;
        let extras: Vec<String> = Section::ALL
            .iter()
            .filter(|s| **s != probe && !alone.section(**s).is_empty())
            .map(|s| format!("{} ({})", s.short_name(), alone.section(*s).len()))
            .collect();
        self.push(if extras.is_empty() {
            Check::should(
                checks::ONLY_REQUESTED_SECTIONS,
                true,
                format!("asked for {} alone; got nothing else", probe.short_name()),
            )
        } else {
            Check::should(
                checks::ONLY_REQUESTED_SECTIONS,
                false,
                format!(
                    "asked for {} alone; also got {}: the broker drops these, but fetching them \
                     spends the deadline",
                    probe.short_name(),
                    extras.join(", ")
                ),
            )
        });
        let same =
            canonical_entries(alone.section(probe)) == canonical_entries(full.section(probe));
        self.push(Check::must(
            checks::SECTION_ALONE,
            same,
            if same {
                format!(
                    "{} alone: the same {} entries as when every section was asked for",
                    probe.short_name(),
                    full.section(probe).len()
                )
            } else {
                format!(
                    "{} alone: {} entries, but {} when every section was asked for",
                    probe.short_name(),
                    alone.section(probe).len(),
                    full.section(probe).len()
                )
            },
        ));
    }

    async fn deterministic(&mut self, baseline: Option<&SourceRecord>) {
        let Some(baseline) = baseline else {
            return self.skip(checks::DETERMINISTIC, Level::Must);
        };
        let attempt = self.fetch(self.kit.known, SectionSet::ALL).await;
        let check = match attempt.record() {
            Some(again) => match differences(baseline, again) {
                None => Check::must(
                    checks::DETERMINISTIC,
                    true,
                    "the second fetch gave the same record (order aside)",
                ),
                Some(diff) => Check::must(
                    checks::DETERMINISTIC,
                    false,
                    format!("the second fetch differs: {diff}"),
                ),
            },
            None => Check::must(
                checks::DETERMINISTIC,
                false,
                format!("the second fetch: {}", attempt.describe()),
            ),
        };
        self.push(check);
    }

    async fn same_for_every_requester(&mut self, baseline: Option<&SourceRecord>) {
        let Some(baseline) = baseline else {
            return self.skip(checks::SAME_FOR_EVERY_REQUESTER, Level::Must);
        };
        let mut request = request(
            self.kit.known,
            SectionSet::ALL,
            Instant::now() + self.kit.patience,
        );
        request.requester = other_requester();
        let attempt = self
            .fetch_from(self.kit.source, request, self.kit.patience + self.kit.grace)
            .await;
        let check = match attempt.record() {
            Some(other) => match differences(baseline, other) {
                None => Check::must(
                    checks::SAME_FOR_EVERY_REQUESTER,
                    true,
                    "another organisation's paramedic, in emergency access, got the same record",
                ),
                Some(diff) => Check::must(
                    checks::SAME_FOR_EVERY_REQUESTER,
                    false,
                    format!(
                        "another requester got a different record ({diff}): sources must not \
                         filter by requester; the broker shares one fetch between requesters and \
                         applies access policy itself"
                    ),
                ),
            },
            None => Check::must(
                checks::SAME_FOR_EVERY_REQUESTER,
                false,
                format!(
                    "another requester (emergency access): {}",
                    attempt.describe()
                ),
            ),
        };
        self.push(check);
    }

    async fn concurrent(&mut self, baseline: Option<&SourceRecord>) {
        let Some(baseline) = baseline else {
            return self.skip(checks::CONCURRENT, Level::Must);
        };
        let n = self.kit.concurrency;
        let requests: Vec<SourceRequest> = (0..n)
            .map(|_| {
                request(
                    self.kit.known,
                    SectionSet::ALL,
                    Instant::now() + self.kit.patience,
                )
            })
            .collect();
        let limit = self.kit.patience + self.kit.grace;
        let attempts =
            futures::future::join_all(requests.iter().map(|r| call(self.kit.source, r, limit)))
                .await;
        let mut problems = Vec::new();
        for attempt in &attempts {
            self.observe(attempt);
            match attempt.record() {
                Some(record) => {
                    if let Some(diff) = differences(baseline, record) {
                        problems.push(format!("a different record ({diff})"));
                    }
                }
                None => problems.push(attempt.describe()),
            }
        }
        let slowest = attempts.iter().map(|a| a.elapsed).max().unwrap_or_default();
        self.push(if problems.is_empty() {
            Check::must(
                checks::CONCURRENT,
                true,
                format!(
                    "{n} fetches at once all gave the same record; slowest {} ms",
                    slowest.as_millis()
                ),
            )
        } else {
            Check::must(
                checks::CONCURRENT,
                false,
                format!(
                    "{} of {n} fetches at once went wrong: {}",
                    problems.len(),
                    sample(&tally(&problems))
                ),
            )
        });
    }

    /// Returns whether the check passed, for the cancellation check.
    async fn deadline(&mut self) -> bool {
        let kit = self.kit;
        let source = kit.slow.unwrap_or(kit.source);
        let short = request(
            kit.known,
            SectionSet::ALL,
            Instant::now() + kit.short_deadline,
        );
        let soon = self
            .fetch_from(source, short, kit.short_deadline + kit.grace)
            .await;
        let passed_already = request(kit.known, SectionSet::ALL, Instant::now());
        let already = self.fetch_from(source, passed_already, kit.grace).await;
        let late = |a: &Attempt| matches!(a.outcome, Outcome::Hung(_) | Outcome::Panicked(_));
        let passed = !late(&soon) && !late(&already);
        let mut detail = format!(
            "with a {} ms deadline: {}; with a deadline already passed: {}",
            kit.short_deadline.as_millis(),
            soon.describe(),
            already.describe()
        );
        if !passed {
            detail.push_str(
                ": stop work at request.deadline, e.g. wrap the fetch in \
                 tokio::time::timeout_at(request.deadline, ..) and return Err(Timeout) or what \
                 you have",
            );
        } else if kit.slow.is_none() {
            detail.push_str(" (the source was not slowed down: with_slow_upstream tests more)");
        } else {
            detail.push_str(" (against the slow upstream)");
        }
        self.push(Check::must(checks::DEADLINE, passed, detail));
        passed
    }

    async fn cancellation_safe(&mut self, baseline: Option<&SourceRecord>, deadline_ok: bool) {
        let kit = self.kit;
        // Drop fetches after 0..8 ms: early ones mid-setup, later ones mid-I/O.
        let drops = 8u64;
        let mut mid_flight = 0;
        for ms in 0..drops {
            let request = request(kit.known, SectionSet::ALL, Instant::now() + kit.patience);
            let attempt = call(kit.source, &request, Duration::from_millis(ms)).await;
            if matches!(attempt.outcome, Outcome::Hung(_)) {
                mid_flight += 1;
            } else {
                self.observe(&attempt);
            }
        }
        let after = self.fetch(kit.known, SectionSet::ALL).await;
        let mut problems = Vec::new();
        let mut detail = format!(
            "dropped {drops} fetches after 0..{} ms ({mid_flight} mid-flight); the next fetch: {}",
            drops - 1,
            after.describe()
        );
        match (after.record(), baseline) {
            (Some(record), Some(baseline)) => match differences(baseline, record) {
                Some(diff) => problems.push(format!("the next fetch gave another record ({diff})")),
                None => detail.push_str(", the same record"),
            },
            (Some(_), None) => {}
            (None, _) => problems.push("the next fetch did not return the record".to_owned()),
        }
        if let Some(slow) = kit.slow {
            for _ in 0..3 {
                let request = request(kit.known, SectionSet::ALL, Instant::now() + kit.patience);
                let attempt = call(slow, &request, Duration::from_millis(10)).await;
                if !matches!(attempt.outcome, Outcome::Hung(_)) {
                    self.observe(&attempt);
                }
            }
            let short = request(
                kit.known,
                SectionSet::ALL,
                Instant::now() + kit.short_deadline,
            );
            let after_slow = self
                .fetch_from(slow, short, kit.short_deadline + kit.grace)
                .await;
            let wedged = matches!(after_slow.outcome, Outcome::Hung(_) | Outcome::Panicked(_));
            detail.push_str(&format!(
                "; dropped 3 on the slow upstream after 10 ms, then a {} ms deadline: {}",
                kit.short_deadline.as_millis(),
                after_slow.describe()
            ));
            match (wedged, deadline_ok) {
                (true, true) => {
                    problems.push("the slow upstream's next fetch missed its deadline".to_owned())
                }
                (true, false) => detail.push_str(" (not counted: it misses deadlines anyway)"),
                (false, _) => {}
            }
        } else if mid_flight == 0 {
            detail.push_str(
                " (every fetch finished before it could be dropped, which proves little: \
                 with_slow_upstream tests more)",
            );
        }
        self.push(if problems.is_empty() {
            Check::must(checks::CANCELLATION_SAFE, true, detail)
        } else {
            Check::must(
                checks::CANCELLATION_SAFE,
                false,
                format!(
                    "{detail}: {}; a dropped fetch must not leave locks, permits or half-written \
                     state behind (release them in Drop guards, not after an await)",
                    problems.join("; ")
                ),
            )
        });
    }

    fn never_panics(&mut self) {
        let fetches = self.fetches;
        self.push(if self.panics.is_empty() {
            Check::must(
                checks::NEVER_PANICS,
                true,
                format!("no panic in {fetches} fetches"),
            )
        } else {
            Check::must(
                checks::NEVER_PANICS,
                false,
                format!(
                    "{} of {fetches} fetches panicked ({}): return a SourceError or a warning",
                    self.panics.len(),
                    sample(&tally(&self.panics))
                ),
            )
        });
    }

    fn redacted(&mut self, baseline: Option<&SourceRecord>) {
        let mut secrets: Vec<(String, &str)> = Vec::new();
        for n in [self.kit.known, self.kit.unknown] {
            secrets.push((n.as_digits(), "an NHS number"));
            secrets.push((n.grouped(), "an NHS number"));
        }
        if let Some(p) = baseline.and_then(|b| b.record.patient.as_ref()) {
            for name in std::iter::once(&p.family_name).chain(&p.given_names) {
                if name.trim().chars().count() >= 3 {
                    secrets.push((name.trim().to_owned(), "the patient's name"));
                }
            }
        }
        let leaks: Vec<String> = self
            .texts
            .iter()
            .filter_map(|text| {
                secrets
                    .iter()
                    .find(|(s, _)| text.contains(s.as_str()))
                    .map(|(s, what)| {
                        format!(
                            "{:?} contains {what}",
                            text.replace(s.as_str(), "<redacted>")
                        )
                    })
            })
            .collect();
        let checked = self.texts.len();
        self.push(if leaks.is_empty() {
            Check::must(
                checks::REDACTED,
                true,
                if checked == 0 {
                    "the source produced no error or warning text to check".to_owned()
                } else {
                    format!("none of {checked} error and warning texts carry an NHS number or the patient's name")
                },
            )
        } else {
            Check::must(
                checks::REDACTED,
                false,
                format!(
                    "{} of {checked} error and warning texts carry patient data ({}): they reach \
                     callers and logs; describe the problem, not the patient",
                    leaks.len(),
                    sample(&tally(&leaks))
                ),
            )
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Record helpers
// ---------------------------------------------------------------------------------------------

/// Calls `f` with "section/entry-id" (or "section[index]" when the id is missing) and each entry.
fn for_each_entry(record: &CareRecord, mut f: impl FnMut(String, &Entry)) {
    for section in Section::ALL {
        for (i, entry) in record.section(section).iter().enumerate() {
            let id = entry
                .provenance
                .first()
                .map(|p| p.source_entry_id.as_str())
                .unwrap_or_default();
            let at = if id.is_empty() {
                format!("{}[{i}]", section.short_name())
            } else {
                format!("{}/{id}", section.short_name())
            };
            f(at, entry);
        }
    }
}

/// Where the entries matching `bad` are.
fn entries_where(record: &CareRecord, bad: impl Fn(&Entry) -> bool) -> Vec<String> {
    let mut found = Vec::new();
    for_each_entry(record, |at, e| {
        if bad(e) {
            found.push(at);
        }
    });
    found
}

/// The distinct items in first-seen order, repeats counted: "a (×3), b".
fn tally(items: &[String]) -> Vec<String> {
    let mut counted: Vec<(&String, usize)> = Vec::new();
    for item in items {
        match counted.iter_mut().find(|(seen, _)| *seen == item) {
            Some((_, n)) => *n += 1,
            None => counted.push((item, 1)),
        }
    }
    counted
        .into_iter()
        .map(|(item, n)| {
            if n == 1 {
                item.clone()
            } else {
                format!("{item} (×{n})")
            }
        })
        .collect()
}

/// The first few items, for a detail line.
fn sample(items: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut text = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(", and {} more", items.len() - SHOWN));
    }
    text
}

/// A section's entries in a fixed order: the contract asks for the same entries, not the same
/// order (the broker sorts when it merges).
fn canonical_entries(entries: &[Entry]) -> Vec<Entry> {
    let mut keyed: Vec<(String, Entry)> = entries
        .iter()
        .map(|e| (format!("{e:?}"), e.clone()))
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    keyed.into_iter().map(|(_, e)| e).collect()
}

/// How `b` differs from `a`, in a line without patient data; `None` when they are the same
/// (order of entries aside). Warnings are not compared.
fn differences(a: &SourceRecord, b: &SourceRecord) -> Option<String> {
    let mut diffs = Vec::new();
    if a.record.patient != b.record.patient {
        diffs.push("demographics differ".to_owned());
    }
    for section in Section::ALL {
        let (x, y) = (a.record.section(section), b.record.section(section));
        if x.len() != y.len() {
            diffs.push(format!(
                "{}: {} entries, then {}",
                section.short_name(),
                x.len(),
                y.len()
            ));
        } else if canonical_entries(x) != canonical_entries(y) {
            diffs.push(format!("{}: entries differ", section.short_name()));
        }
    }
    (!diffs.is_empty()).then(|| diffs.join(", "))
}

/// `text` with these NHS numbers (either form) replaced, so a report can quote a source's error.
fn scrub(text: &str, numbers: &[NhsNumber]) -> String {
    numbers.iter().fold(text.to_owned(), |text, n| {
        text.replace(&n.as_digits(), "<NHS number>")
            .replace(&n.grouped(), "<NHS number>")
    })
}

/// The shape of a value with its digits hidden, e.g. "14/03/2019" becomes "nn/nn/nnnn".
fn shape(value: &str) -> String {
    value
        .chars()
        .take(32)
        .map(|c| if c.is_ascii_digit() { 'n' } else { c })
        .collect()
}

/// Whether `text` is a date or date-time the record contract allows: ISO 8601 `YYYY`, `YYYY-MM`,
/// `YYYY-MM-DD`, or `YYYY-MM-DDThh:mm[:ss[.fraction]]` with an optional `Z` or `±hh:mm` offset.
pub fn is_iso8601(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |r: Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    let number =
        |r: Range<usize>| -> u32 { b[r].iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')) };
    let field =
        |r: Range<usize>, max: u32, min: u32| digits(r.clone()) && (min..=max).contains(&number(r));
    if !digits(0..4) {
        return false;
    }
    if b.len() == 4 {
        return true;
    }
    if b.get(4) != Some(&b'-') || !field(5..7, 12, 1) {
        return false;
    }
    if b.len() == 7 {
        return true;
    }
    if b.get(7) != Some(&b'-') || !field(8..10, 31, 1) {
        return false;
    }
    if b.len() == 10 {
        return true;
    }
    if b.get(10) != Some(&b'T')
        || !field(11..13, 23, 0)
        || b.get(13) != Some(&b':')
        || !field(14..16, 59, 0)
    {
        return false;
    }
    let mut at = 16;
    if b.get(at) == Some(&b':') {
        if !field(17..19, 60, 0) {
            return false;
        }
        at = 19;
        if b.get(at) == Some(&b'.') {
            let fraction = b[at + 1..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count();
            if fraction == 0 {
                return false;
            }
            at += 1 + fraction;
        }
    }
    match &b[at..] {
        [] | [b'Z'] => true,
        [b'+' | b'-', ..] if b.len() == at + 6 => {
            field(at + 1..at + 3, 14, 0) && b[at + 3] == b':' && field(at + 4..at + 6, 59, 0)
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Garbage from upstream
// ---------------------------------------------------------------------------------------------

/// Bodies a broken or hostile upstream might send instead of an answer. Each (but `Empty` and
/// `Huge`) contains [`Garbage::MARKER`], so [`survives_garbage`] can tell when an adapter echoes
/// raw upstream bodies into error or warning text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Garbage {
    /// JSON cut off mid-resource (a dropped connection, a proxy timeout).
    TruncatedJson,
    /// Well-formed JSON of an unexpected resource type.
    WrongResourceType,
    /// An HTML error page from a proxy, with status 200.
    NotJson,
    /// JSON with invalid UTF-8 inside a string.
    NotUtf8,
    /// A 200 with an empty body.
    Empty,
    /// A well-formed but [`Garbage::HUGE_BYTES`]-byte body: only a size cap stops it.
    Huge,
    /// Well-formed JSON of an unexpected shape (an object with none of the fields an API sends).
    JsonWrongShape,
    /// The JSON literal `null`.
    JsonNull,
    /// CSV whose header names none of the columns an export has.
    CsvWrongColumns,
    /// CSV with a quote opened and never closed.
    CsvUnterminatedQuote,
    /// CSV with invalid UTF-8 and NUL bytes in it.
    CsvNotUtf8,
    /// Bytes with no structure at all (noise, as from a wrong file or a corrupted transfer).
    BinaryNoise,
    /// A binary document cut off after its header (a PDF that stops mid-stream).
    BinaryTruncated,
}

/// What an adapter reads from its upstream, for choosing the garbage it must survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// FHIR JSON ([`Garbage::ALL`]).
    Fhir,
    /// Any other JSON API.
    Json,
    /// A CSV export or API.
    Csv,
    /// Binary files or bodies (documents, proprietary exports).
    Binary,
}

impl Garbage {
    /// The kinds a FHIR adapter must survive ([`Format::Fhir`]; see [`Garbage::for_format`]
    /// for JSON, CSV and binary inputs).
    pub const ALL: [Garbage; 6] = [
        Garbage::TruncatedJson,
        Garbage::WrongResourceType,
        Garbage::NotJson,
        Garbage::NotUtf8,
        Garbage::Empty,
        Garbage::Huge,
    ];

    /// The garbage an adapter reading `format` must survive: what a broken upstream of that kind
    /// sends, plus what any HTTP upstream can send (an HTML error page, an empty or a huge body).
    pub fn for_format(format: Format) -> &'static [Garbage] {
        match format {
            Format::Fhir => &Self::ALL,
            Format::Json => &[
                Garbage::TruncatedJson,
                Garbage::JsonWrongShape,
                Garbage::JsonNull,
                Garbage::NotJson,
                Garbage::NotUtf8,
                Garbage::Empty,
                Garbage::Huge,
            ],
            Format::Csv => &[
                Garbage::CsvWrongColumns,
                Garbage::CsvUnterminatedQuote,
                Garbage::CsvNotUtf8,
                Garbage::BinaryNoise,
                Garbage::NotJson,
                Garbage::Empty,
                Garbage::Huge,
            ],
            Format::Binary => &[
                Garbage::BinaryNoise,
                Garbage::BinaryTruncated,
                Garbage::NotJson,
                Garbage::Empty,
                Garbage::Huge,
            ],
        }
    }

    /// Size of the [`Garbage::Huge`] body: above any sensible response cap.
    pub const HUGE_BYTES: usize = 16 * 1024 * 1024;

    /// Text inside the bodies that must never reappear in an error or warning.
    pub const MARKER: &str = "CONFORMANCE-RAW-BODY-5dc1";

    /// The check's name in a report.
    pub fn check_name(self) -> &'static str {
        match self {
            Garbage::TruncatedJson => "survives garbage: truncated JSON",
            Garbage::WrongResourceType => "survives garbage: the wrong resource type",
            Garbage::NotJson => "survives garbage: an HTML error page",
            Garbage::NotUtf8 => "survives garbage: invalid UTF-8",
            Garbage::Empty => "survives garbage: an empty body",
            Garbage::Huge => "survives garbage: a huge body",
            Garbage::JsonWrongShape => "survives garbage: JSON of the wrong shape",
            Garbage::JsonNull => "survives garbage: JSON null",
            Garbage::CsvWrongColumns => "survives garbage: CSV with the wrong columns",
            Garbage::CsvUnterminatedQuote => "survives garbage: CSV with an unterminated quote",
            Garbage::CsvNotUtf8 => "survives garbage: CSV with invalid UTF-8",
            Garbage::BinaryNoise => "survives garbage: binary noise",
            Garbage::BinaryTruncated => "survives garbage: a truncated binary document",
        }
    }

    /// The content type an HTTP upstream would label the body with.
    pub fn content_type(self) -> &'static str {
        match self {
            Garbage::NotJson => "text/html; charset=utf-8",
            Garbage::JsonWrongShape | Garbage::JsonNull => "application/json",
            Garbage::CsvWrongColumns | Garbage::CsvUnterminatedQuote | Garbage::CsvNotUtf8 => {
                "text/csv; charset=utf-8"
            }
            Garbage::BinaryTruncated => "application/pdf",
            Garbage::BinaryNoise => "application/octet-stream",
            _ => "application/fhir+json",
        }
    }

    /// The body.
    pub fn body(self) -> Vec<u8> {
        let marker = Self::MARKER;
        match self {
            Garbage::TruncatedJson => format!(
                r#"{{"resourceType":"Bundle","type":"searchset","entry":[{{"resource":{{"resourceType":"Patient","id":"{marker}","name":[{{"family":"{marker}"#
            )
            .into_bytes(),
            Garbage::WrongResourceType => format!(
                r#"{{"resourceType":"Basic","id":"{marker}","code":{{"text":"{marker}"}}}}"#
            )
            .into_bytes(),
            Garbage::NotJson => format!(
                "<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1>\
                 <p>{marker}</p></body></html>"
            )
            .into_bytes(),
            Garbage::NotUtf8 => {
                let mut body = format!(
                    r#"{{"resourceType":"Bundle","type":"searchset","total":1,"entry":[{{"resource":{{"resourceType":"OperationOutcome","id":"{marker}"#
                )
                .into_bytes();
                body.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
                body.extend_from_slice(br#""}}]}"#);
                body
            }
            Garbage::Empty => Vec::new(),
            Garbage::JsonWrongShape => {
                format!(r#"{{"unexpected":[{{"{marker}":true}}],"note":"{marker}"}}"#).into_bytes()
            }
            Garbage::JsonNull => b"null".to_vec(),
            Garbage::CsvWrongColumns => {
                format!("{marker},colour,shoe_size\r\nred,{marker},9\r\nblue,x,7\r\n").into_bytes()
            }
            Garbage::CsvUnterminatedQuote => {
                format!("\"{marker},kind,code\r\nallergy,\"91936005,{marker}\r\n").into_bytes()
            }
            Garbage::CsvNotUtf8 => {
                let mut body = format!("{marker},kind\n").into_bytes();
                body.extend_from_slice(&[0xff, 0xfe, 0x00, 0x00, b',', 0xc3, 0x28, b'\n']);
                body
            }
            Garbage::BinaryNoise => {
                // Deterministic noise (a 64-bit LCG), with the marker in the middle.
                let mut state: u64 = 0x5dc1_5dc1_5dc1_5dc1;
                let mut body: Vec<u8> = (0..4096)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1_442_695_040_888_963_407);
                        (state >> 56) as u8
                    })
                    .collect();
                body.splice(2048..2048, marker.bytes());
                body
            }
            Garbage::BinaryTruncated => {
                let mut body = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Title (".to_vec();
                body.extend_from_slice(marker.as_bytes());
                body.extend_from_slice(b") /Length 9999 >>\nstream\nx\x9c\x03\x00");
                body
            }
            Garbage::Huge => {
                let open = br#"{"resourceType":"Bundle","type":"searchset","entry":[],"padding":""#;
                let close = br#""}"#;
                let mut body = Vec::with_capacity(Self::HUGE_BYTES);
                body.extend_from_slice(open);
                body.resize(Self::HUGE_BYTES - close.len(), b'x');
                body.extend_from_slice(close);
                body
            }
        }
    }
}

/// Asks `source` (pointed at an upstream answering with `garbage`) for `patient`, and checks it
/// answers with an error, or a record with a warning: never a panic, a hang, `NotFound` (garbage
/// is not "the patient is unknown"), or text repeating the body or the NHS number.
pub async fn survives_garbage(source: &dyn Source, patient: NhsNumber, garbage: Garbage) -> Check {
    let name = garbage.check_name();
    let request = request(patient, SectionSet::ALL, Instant::now() + DEFAULT_PATIENCE);
    let attempt = call(source, &request, DEFAULT_PATIENCE + DEFAULT_GRACE).await;
    let described = attempt.describe();
    let leaks = |text: &str| {
        text.contains(Garbage::MARKER)
            || text.contains(&patient.as_digits())
            || text.contains(&patient.grouped())
    };
    let (passed, why) = match &attempt.outcome {
        Outcome::Replied(Err(e)) if leaks(&e.to_string()) => (
            false,
            "the error text repeats the upstream body or the NHS number; describe the problem \
             instead",
        ),
        Outcome::Replied(Err(_)) => (true, ""),
        Outcome::Replied(Ok(SourceReply::Found(r))) if r.warnings.is_empty() => (
            false,
            "a record with no warning, from garbage: say what could not be read",
        ),
        Outcome::Replied(Ok(SourceReply::Found(r))) if r.warnings.iter().any(|w| leaks(w)) => (
            false,
            "a warning repeats the upstream body or the NHS number",
        ),
        Outcome::Replied(Ok(SourceReply::Found(_))) => (true, ""),
        Outcome::Replied(Ok(SourceReply::NotFound)) => (
            false,
            "garbage taken for \"patient not known\", which a clinician would believe: return \
             SourceError::InvalidResponse (or TooLarge)",
        ),
        Outcome::Panicked(_) | Outcome::Hung(_) => (false, "return a SourceError instead"),
    };
    let detail = if why.is_empty() {
        described
    } else {
        format!("{described}: {why}")
    };
    Check::must(name, passed, scrub(&detail, &[patient]))
}

/// Runs [`survives_garbage`] for every kind of FHIR [`Garbage`] ([`Garbage::ALL`]), each against
/// a fresh [`GarbageServer`]: `make` builds the source for a server's base URL (append your
/// API's path). For other inputs, [`garbage_over_http_as`].
pub async fn garbage_over_http(
    patient: NhsNumber,
    make: impl FnMut(&str) -> Box<dyn Source>,
) -> Report {
    garbage_over_http_as(Format::Fhir, patient, make).await
}

/// [`garbage_over_http`] with the garbage for `format` ([`Garbage::for_format`]): a JSON API, a
/// CSV endpoint, binary bodies.
pub async fn garbage_over_http_as(
    format: Format,
    patient: NhsNumber,
    mut make: impl FnMut(&str) -> Box<dyn Source>,
) -> Report {
    let mut report = Report::default();
    for &garbage in Garbage::for_format(format) {
        let check = match GarbageServer::start(garbage).await {
            Ok(server) => {
                let source = make(server.url());
                report.source_id.clone_from(&source.info().id);
                survives_garbage(source.as_ref(), patient, garbage).await
            }
            Err(e) => Check::must(
                garbage.check_name(),
                false,
                format!("could not start the garbage server: {e}"),
            ),
        };
        report.checks.push(check);
    }
    report
}

/// A loopback HTTP/1.1 server answering every request with one [`Garbage`] body and status 200.
/// Stops when dropped.
pub struct GarbageServer {
    /// The stub it runs on.
    stub: StubServer,
}

impl GarbageServer {
    /// Binds `127.0.0.1:0` and starts answering.
    pub async fn start(garbage: Garbage) -> std::io::Result<GarbageServer> {
        let body = bytes::Bytes::from(garbage.body());
        let content_type = garbage.content_type();
        let stub = StubServer::start(move |_path| StubResponse {
            status: 200,
            content_type,
            body: body.clone(),
        })
        .await?;
        Ok(GarbageServer { stub })
    }

    /// The server's base URL, `http://127.0.0.1:PORT` (any path answers).
    pub fn url(&self) -> &str {
        self.stub.url()
    }
}

/// One answer of a [`StubServer`].
#[derive(Debug, Clone)]
pub struct StubResponse {
    /// The HTTP status code.
    pub status: u16,
    /// The `content-type` header.
    pub content_type: &'static str,
    /// The body.
    pub body: bytes::Bytes,
}

impl StubResponse {
    /// A 200 with a JSON body.
    pub fn json(body: impl Into<bytes::Bytes>) -> StubResponse {
        StubResponse {
            status: 200,
            content_type: "application/json",
            body: body.into(),
        }
    }

    /// An empty answer with this status (404 for "no such patient", 500, ...).
    pub fn status(status: u16) -> StubResponse {
        StubResponse {
            status,
            content_type: "text/plain",
            body: bytes::Bytes::new(),
        }
    }
}

/// A loopback HTTP/1.1 test double of an organisation's API: every request is answered by a
/// function of its path (and query), one request per connection. For adapter authors' tests of
/// their source against something that speaks real HTTP. Stops when dropped.
pub struct StubServer {
    /// `http://127.0.0.1:PORT`, for the source's base URL.
    url: String,
    /// The accept loop, aborted on drop.
    task: tokio::task::JoinHandle<()>,
}

type Responder = Arc<dyn Fn(&str) -> StubResponse + Send + Sync>;

impl StubServer {
    /// Binds `127.0.0.1:0` and answers each request with `answer(path_and_query)`.
    pub async fn start(
        answer: impl Fn(&str) -> StubResponse + Send + Sync + 'static,
    ) -> std::io::Result<StubServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let answer: Responder = Arc::new(answer);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer_with(stream, answer.clone()));
            }
        });
        Ok(StubServer { url, task })
    }

    /// The server's base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for StubServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers one connection's first request, then closes it.
async fn answer_with(mut stream: TcpStream, answer: Responder) {
    // Read the whole request first: closing a socket with unread input resets the connection,
    // and the client could see the reset instead of the answer.
    let mut input = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = input.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if input.len() > 64 * 1024 {
            return;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => input.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&input[..head_end]).into_owned();
    let path = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_owned();
    let content_length: usize = head
        .to_ascii_lowercase()
        .lines()
        .find_map(|line| line.strip_prefix("content-length:").map(str::to_owned))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut have = input.len() - head_end;
    while have < content_length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => have += n,
        }
    }
    let response = answer(&path);
    let head = format!(
        "HTTP/1.1 {} STUB\r\ncontent-type: {}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    // The client may hang up early (e.g. at its size cap): nothing to do about it.
    if stream.write_all(head.as_bytes()).await.is_ok()
        && stream.write_all(&response.body).await.is_ok()
    {
        let _ = stream.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_accepts_partial_dates_and_date_times() {
        for ok in [
            "2019",
            "2019-03",
            "2019-03-14",
            "2019-03-14T09:30",
            "2019-03-14T09:30:00",
            "2019-03-14T09:30:00Z",
            "2019-03-14T09:30:00.123Z",
            "2019-03-14T09:30:00+01:00",
            "2019-03-14T23:59:60-05:30",
        ] {
            assert!(is_iso8601(ok), "{ok}");
        }
        for bad in [
            "",
            "19",
            "14/03/2019",
            "2019-3-14",
            "2019-13",
            "2019-03-00",
            "2019-03-14 09:30:00",
            "2019-03-14T24:00",
            "2019-03-14T09:30:00.Z",
            "2019-03-14T09:30:00+0100",
            "2019-03-14Tnoon",
            "２０１９",
        ] {
            assert!(!is_iso8601(bad), "{bad}");
        }
    }

    #[test]
    fn shape_hides_digits() {
        assert_eq!(shape("14/03/2019"), "nn/nn/nnnn");
    }

    #[test]
    fn huge_garbage_is_exactly_its_size_and_well_formed() {
        let body = Garbage::Huge.body();
        assert_eq!(body.len(), Garbage::HUGE_BYTES);
        let parsed: serde_json::Value = serde_json::from_slice(&body).expect("well-formed JSON");
        assert_eq!(parsed["resourceType"], "Bundle");
    }

    #[test]
    fn other_garbage_carries_the_marker_and_is_not_valid_json() {
        for garbage in [Garbage::TruncatedJson, Garbage::NotJson, Garbage::NotUtf8] {
            let body = garbage.body();
            assert!(
                body.windows(Garbage::MARKER.len())
                    .any(|w| w == Garbage::MARKER.as_bytes()),
                "{garbage:?}"
            );
            assert!(
                serde_json::from_slice::<serde_json::Value>(&body).is_err(),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn every_format_has_garbage_that_carries_the_marker_or_is_trivially_empty() {
        for format in [Format::Fhir, Format::Json, Format::Csv, Format::Binary] {
            let kinds = Garbage::for_format(format);
            assert!(kinds.len() >= 5, "{format:?}");
            for &garbage in kinds {
                let body = garbage.body();
                let carries_marker = body
                    .windows(Garbage::MARKER.len())
                    .any(|w| w == Garbage::MARKER.as_bytes());
                assert!(
                    carries_marker
                        || matches!(garbage, Garbage::Empty | Garbage::Huge | Garbage::JsonNull),
                    "{format:?} {garbage:?}"
                );
            }
        }
        for garbage in [
            Garbage::CsvNotUtf8,
            Garbage::BinaryNoise,
            Garbage::BinaryTruncated,
        ] {
            assert!(
                std::str::from_utf8(&garbage.body()).is_err(),
                "{garbage:?} is not text"
            );
        }
    }

    #[test]
    fn a_report_fails_only_on_must_checks() {
        let report = Report {
            source_id: "s".into(),
            checks: vec![
                Check::must("a", true, "fine"),
                Check::should("b", false, "meh"),
            ],
        };
        assert!(report.all_passed());
        assert_eq!(report.warnings().count(), 1);
        report.assert_all_passed();
        let text = report.to_string();
        assert!(text.contains("1 passed, 1 warning(s), 0 failed"), "{text}");
        assert!(text.contains("  WARN  b: meh"), "{text}");
    }
}
