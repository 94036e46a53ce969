//! From FHIR R4 / UK Core resources to carerecord entries and demographics.
//!
//! Tolerant of what FHIR leaves optional (partial dates, a period instead of a date-time, text
//! instead of codes), strict about garbage: a resource with a wrong-typed field the mapping needs,
//! or without the code that says what it is, is counted and skipped. One bad resource never
//! costs its good siblings, and the count (never the content) becomes a warning.

use std::collections::{BTreeMap, HashMap, HashSet};

use carerecord_proto::{
    AllergyDetail, CareRecord, Coding as ProtoCoding, DocumentDetail, EncounterDetail, Entry,
    MedicationDetail, Patient, Provenance, ResultDetail, Section, VerificationStatus,
    entry::Detail,
};

use super::config::MedicationKinds;
use super::json::{Field, Malformed};
use super::model::{CodeOrConcept, CodeableConcept, Coding, Quantity, Reference, Resource};
use crate::{NhsNumber, SectionSet, Shortfall, SourceRecord};

pub(crate) const SNOMED: &str = "http://snomed.info/sct";
pub(crate) const DMD: &str = "https://dmd.nhs.uk";
pub(crate) const LOINC: &str = "http://loinc.org";
pub(crate) const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
pub(crate) const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";

/// Longest summary kept; conclusions and descriptions can be whole paragraphs.
const SUMMARY_MAX_CHARS: usize = 200;

/// The resource types the adapter maps to a record section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    Condition,
    AllergyIntolerance,
    MedicationStatement,
    MedicationRequest,
    Observation,
    DiagnosticReport,
    CarePlan,
    DocumentReference,
    Composition,
    Encounter,
    Appointment,
}

impl Kind {
    pub(crate) fn from_name(name: &str) -> Option<Kind> {
        Some(match name {
            "Condition" => Kind::Condition,
            "AllergyIntolerance" => Kind::AllergyIntolerance,
            "MedicationStatement" => Kind::MedicationStatement,
            "MedicationRequest" => Kind::MedicationRequest,
            "Observation" => Kind::Observation,
            "DiagnosticReport" => Kind::DiagnosticReport,
            "CarePlan" => Kind::CarePlan,
            "DocumentReference" => Kind::DocumentReference,
            "Composition" => Kind::Composition,
            "Encounter" => Kind::Encounter,
            "Appointment" => Kind::Appointment,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Condition => "Condition",
            Kind::AllergyIntolerance => "AllergyIntolerance",
            Kind::MedicationStatement => "MedicationStatement",
            Kind::MedicationRequest => "MedicationRequest",
            Kind::Observation => "Observation",
            Kind::DiagnosticReport => "DiagnosticReport",
            Kind::CarePlan => "CarePlan",
            Kind::DocumentReference => "DocumentReference",
            Kind::Composition => "Composition",
            Kind::Encounter => "Encounter",
            Kind::Appointment => "Appointment",
        }
    }

    pub(crate) fn section(self) -> Section {
        match self {
            Kind::Condition => Section::Conditions,
            Kind::AllergyIntolerance => Section::Allergies,
            Kind::MedicationStatement | Kind::MedicationRequest => Section::Medications,
            Kind::Observation | Kind::DiagnosticReport => Section::TestResults,
            Kind::CarePlan => Section::CarePlans,
            Kind::DocumentReference | Kind::Composition => Section::Documents,
            Kind::Encounter => Section::Encounters,
            Kind::Appointment => Section::Appointments,
        }
    }

    /// The resource types searched for in `search` and `batch` mode, for the wanted sections:
    /// every type that is mapped, so a server gives the same record whichever mode reads it
    /// (`$everything` returns Compositions too). A server that cannot search `Composition`
    /// costs a shortfall of documents, not the source (see `query`).
    pub(crate) fn searched(sections: SectionSet, medications: MedicationKinds) -> Vec<Kind> {
        let mut kinds = Vec::with_capacity(11);
        for section in sections.iter() {
            match section {
                Section::Conditions => kinds.push(Kind::Condition),
                Section::Allergies => kinds.push(Kind::AllergyIntolerance),
                Section::Medications => {
                    if medications.statements() {
                        kinds.push(Kind::MedicationStatement);
                    }
                    if medications.requests() {
                        kinds.push(Kind::MedicationRequest);
                    }
                }
                Section::TestResults => kinds.extend([Kind::Observation, Kind::DiagnosticReport]),
                Section::CarePlans => kinds.push(Kind::CarePlan),
                Section::Documents => kinds.extend([Kind::DocumentReference, Kind::Composition]),
                Section::Encounters => kinds.push(Kind::Encounter),
                Section::Appointments => kinds.push(Kind::Appointment),
                Section::Unspecified => {}
            }
        }
        kinds
    }
}

/// What the mapping is asked for, fixed for one lookup.
#[derive(Debug, Clone)]
pub(crate) struct MapContext {
    pub sections: SectionSet,
    pub medications: MedicationKinds,
    /// Today's date (UTC), `YYYY-MM-DD`: appointments before it are not "future".
    pub today: String,
}

impl MapContext {
    pub(crate) fn wants(&self, kind: Kind) -> bool {
        self.sections.contains(kind.section())
            && match kind {
                Kind::MedicationStatement => self.medications.statements(),
                Kind::MedicationRequest => self.medications.requests(),
                _ => true,
            }
    }
}

/// Entries gathered from a whole answer (every page, every search), and what could not be read.
#[derive(Debug, Default)]
pub(crate) struct Collected {
    pub record: CareRecord,
    /// Unreadable resources per resource type name.
    unreadable: BTreeMap<&'static str, u32>,
    /// Medicines kept although the Medication they name could not be read.
    unresolved_medications: u32,
    /// Redacted warnings (counts and codes only).
    pub warnings: Vec<String>,
    /// Where the answer is known to be short (page limits, unsupported searches); unreadable
    /// resources and unresolved references are added by [`Collected::into_source_record`].
    pub shortfalls: Vec<Shortfall>,
    /// Resources about someone else, discarded: type and reason only.
    pub wrong_patient: Vec<String>,
}

impl Collected {
    /// Adds `other`'s entries and problems to this one.
    pub(crate) fn absorb(&mut self, other: Collected) {
        for section in Section::ALL {
            let theirs = other.record.section(section);
            if theirs.is_empty() {
                continue;
            }
            if let Some(mine) = self.record.section_mut(section) {
                mine.extend_from_slice(theirs);
            }
        }
        for (kind, n) in other.unreadable {
            *self.unreadable.entry(kind).or_default() += n;
        }
        self.unresolved_medications += other.unresolved_medications;
        for warning in other.warnings {
            self.warn(warning);
        }
        self.shortfalls.extend(other.shortfalls);
        self.wrong_patient.extend(other.wrong_patient);
    }

    /// Counts a resource that could not be read.
    pub(crate) fn unreadable(&mut self, what: &'static str) {
        *self.unreadable.entry(what).or_default() += 1;
    }

    /// Adds a warning once.
    pub(crate) fn warn(&mut self, warning: String) {
        if !self.warnings.contains(&warning) {
            self.warnings.push(warning);
        }
    }

    /// How many resources of a type could not be read (for tests and logs).
    #[cfg(test)]
    pub(crate) fn unreadable_count(&self, what: &str) -> u32 {
        self.unreadable.get(what).copied().unwrap_or(0)
    }

    /// The warnings, with the unreadable counts spelled out.
    pub(crate) fn into_parts(self) -> (CareRecord, Vec<String>) {
        let mut warnings = self.warnings;
        for (what, n) in &self.unreadable {
            let noun = if *n == 1 { "resource" } else { "resources" };
            warnings.push(format!("{n} {what} {noun} could not be read"));
        }
        (self.record, warnings)
    }

    /// The source's answer: every unreadable resource and unresolved reference is also a
    /// [`Shortfall`] of its section (`wanted` for resources of unknown type), so the source is
    /// PARTIAL and the record not complete, never silently short.
    pub(crate) fn into_source_record(mut self, wanted: SectionSet) -> SourceRecord {
        let mut shortfalls = std::mem::take(&mut self.shortfalls);
        for (what, n) in &self.unreadable {
            let sections = match Kind::from_name(what) {
                Some(kind) => SectionSet::NONE.with(kind.section()),
                None => wanted,
            };
            let noun = if *n == 1 { "resource" } else { "resources" };
            shortfalls.push(Shortfall {
                sections,
                reason: format!("{n} {what} {noun} could not be read"),
            });
        }
        if self.unresolved_medications > 0 {
            let n = self.unresolved_medications;
            let (noun, verb) = if n == 1 {
                ("medicine's", "was")
            } else {
                ("medicines'", "were")
            };
            let reason = format!(
                "{n} {noun} Medication could not be read; {verb} shown by what the prescription says"
            );
            self.warnings.push(reason.clone());
            shortfalls.push(Shortfall {
                sections: SectionSet::NONE.with(Section::Medications),
                reason,
            });
        }
        let wrong_patient = std::mem::take(&mut self.wrong_patient);
        let (record, warnings) = self.into_parts();
        SourceRecord {
            record,
            warnings,
            shortfalls,
            wrong_patient,
            ..SourceRecord::default()
        }
    }

    fn push(&mut self, section: Section, entry: Entry) {
        if let Some(entries) = self.record.section_mut(section) {
            entries.push(entry);
        }
    }
}

/// One resource from a page, with the `fullUrl` it was listed under (for resolving references
/// to included resources).
#[derive(Debug)]
pub(crate) struct PageResource {
    pub full_url: Option<String>,
    pub resource: Box<Resource>,
}

impl PageResource {
    /// The resource's mapped type: `Ok(None)` for types the adapter does not map, `Err` when
    /// it has no readable `resourceType`.
    pub(crate) fn kind(&self) -> Result<Option<Kind>, Malformed> {
        match self.resource.resource_type.str() {
            Ok(Some(name)) => Ok(Kind::from_name(name)),
            Ok(None) | Err(Malformed) => Err(Malformed),
        }
    }
}

/// The Medications of a whole answer (every page, `_include`d, `$everything` output, and any
/// read afterwards), by `fullUrl` and by id, for resolving `medicationReference`s.
pub(crate) struct Medications<'a> {
    /// The source's base URL: `{base}Medication/{id}` is matched by id.
    base: &'a str,
    by_url: HashMap<&'a str, &'a Resource>,
    by_id: HashMap<&'a str, &'a Resource>,
}

impl<'a> Medications<'a> {
    pub(crate) fn new(
        base: &'a str,
        resources: impl IntoIterator<Item = &'a PageResource>,
    ) -> Self {
        let mut index = Medications {
            base,
            by_url: HashMap::new(),
            by_id: HashMap::new(),
        };
        for item in resources {
            let r = &*item.resource;
            if r.resource_type.str() != Ok(Some("Medication")) {
                continue;
            }
            // By id only when it is this server's: a Medication whose fullUrl names another
            // server must not answer this server's relative `Medication/{id}`.
            let ours = item.full_url.as_deref().is_none_or(|url| {
                url.starts_with(base)
                    || !(url.starts_with("http://") || url.starts_with("https://"))
            });
            if ours && let Ok(Some(id)) = r.id.str() {
                index.by_id.insert(id, r);
            }
            if let Some(url) = &item.full_url {
                index.by_url.insert(without_history(url), r);
            }
        }
        index
    }

    /// The Medication a (non-contained) reference names, if the answer holds it. Matched by
    /// `fullUrl`, or by id when the reference is relative or on this source: another server's
    /// `Medication/123` is not this server's.
    fn get(&self, reference: &str) -> Option<&'a Resource> {
        let reference = without_history(reference);
        if let Some(found) = self.by_url.get(reference) {
            return Some(found);
        }
        let relative = match reference.strip_prefix(self.base) {
            Some(rest) => rest,
            None if reference.contains(':') => return None,
            None => reference,
        };
        match relative.split_once('/') {
            Some(("Medication", id)) => self.by_id.get(id).copied(),
            _ => None,
        }
    }
}

/// `Medication/1/_history/2` → `Medication/1`.
pub(crate) fn without_history(reference: &str) -> &str {
    match reference.find("/_history/") {
        Some(at) => &reference[..at],
        None => reference,
    }
}

/// The `medicationReference`s of these (accepted) medicine resources that neither a contained
/// resource nor the answer resolves: each must be read separately, or its medicine is shown
/// incomplete. Deduplicated, in first-seen order.
pub(crate) fn unresolved_medication_references<'b>(
    resources: impl IntoIterator<Item = &'b PageResource>,
    medications: &Medications<'_>,
) -> Vec<String> {
    let mut missing: Vec<String> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for item in resources {
        let r = &item.resource;
        if !matches!(
            r.resource_type.str(),
            Ok(Some("MedicationRequest" | "MedicationStatement"))
        ) || matches!(r.medication_codeable_concept, Field::Valid(_))
        {
            continue;
        }
        let Some(reference) = r
            .medication_reference
            .ok()
            .and_then(|m| m.reference.ok())
            .map(String::as_str)
        else {
            continue;
        };
        if reference.starts_with('#') || medications.get(reference).is_some() {
            continue;
        }
        let reference = without_history(reference);
        if seen.insert(reference) {
            missing.push(reference.to_owned());
        }
    }
    missing
}

/// Maps every page resource of a wanted type (tests: no identity check, no follow-up reads).
#[cfg(test)]
pub(crate) fn map_page(resources: &[PageResource], ctx: &MapContext, out: &mut Collected) {
    let medications = Medications::new("https://fhir.example/", resources);
    let mut wanted = Vec::new();
    for item in resources {
        match item.kind() {
            Ok(Some(kind)) if ctx.wants(kind) => wanted.push((kind, item)),
            Ok(_) => {}
            Err(Malformed) => out.unreadable("unidentified"),
        }
    }
    map_resources(&wanted, &medications, ctx, out);
}

/// Maps resources that passed the identity check into `out`. A resource that cannot be read
/// is counted, never costing its siblings.
pub(crate) fn map_resources(
    resources: &[(Kind, &PageResource)],
    medications: &Medications<'_>,
    ctx: &MapContext,
    out: &mut Collected,
) {
    for (kind, item) in resources {
        match map_resource(*kind, &item.resource, ctx, medications, out) {
            Ok(Some(entry)) => out.push(kind.section(), entry),
            Ok(None) => {}
            Err(Malformed) => out.unreadable(kind.name()),
        }
    }
}

/// One resource to one entry: `Ok(None)` when it falls outside what was asked (a past
/// appointment) or says the source does not know (IPS "no ... info": a warning, not an entry).
/// Entered-in-error and refuted resources are carried, marked: the merge decides what is current.
fn map_resource(
    kind: Kind,
    r: &Resource,
    ctx: &MapContext,
    medications: &Medications<'_>,
    out: &mut Collected,
) -> Result<Option<Entry>, Malformed> {
    let mut entry = match kind {
        Kind::Condition => condition(r)?,
        Kind::AllergyIntolerance => allergy(r)?,
        Kind::MedicationStatement | Kind::MedicationRequest => medication(kind, r, medications)?,
        Kind::Observation => observation(r)?,
        Kind::DiagnosticReport => diagnostic_report(r)?,
        Kind::CarePlan => care_plan(r)?,
        Kind::DocumentReference => document_reference(r)?,
        Kind::Composition => composition(r)?,
        Kind::Encounter => encounter(r)?,
        Kind::Appointment => {
            let entry = appointment(r)?;
            // Only future appointments: whatever the server did with the `date` parameter.
            if !entry.effective.is_empty() && date_part(&entry.effective) < ctx.today.as_str() {
                return Ok(None);
            }
            entry
        }
    };
    if entry.codings.is_empty() {
        entry.codings = all_codings(entry.concept.as_ref(), concepts_of(kind, r)?)?;
    }
    entry.verification_status = verification(r)? as i32;
    if matches!(
        kind,
        Kind::Condition
            | Kind::AllergyIntolerance
            | Kind::MedicationStatement
            | Kind::MedicationRequest
    ) {
        match absence(&entry.codings) {
            Absence::None => {}
            Absence::Asserted => entry.asserts_absence = true,
            Absence::Unknown(what) => {
                // "No information" is unknown, never "none recorded": the section is short.
                let reason = format!(
                    "the source says it has no information about {what} (not shown as an entry)"
                );
                out.warn(reason.clone());
                let sections = SectionSet::NONE.with(kind.section());
                if !out
                    .shortfalls
                    .iter()
                    .any(|s| s.reason == reason && s.sections == sections)
                {
                    out.shortfalls.push(Shortfall { sections, reason });
                }
                return Ok(None);
            }
        }
    }
    if entry.incomplete {
        out.unresolved_medications += 1;
    }
    let meta = r.meta.get()?;
    entry.provenance.push(Provenance {
        source_entry_id: owned(r.id.str()?),
        last_updated: owned(date(meta.map(|m| &m.last_updated))?),
        ..Provenance::default()
    });
    if let Some(meta) = meta {
        let mut labels = meta
            .security
            .items()?
            .map(plain_coding)
            .collect::<Result<Vec<_>, _>>()?;
        // Labels of a referenced Medication (set by `medication`) are kept after the entry's own.
        labels.append(&mut entry.security_labels);
        entry.security_labels = labels;
    }
    Ok(Some(entry))
}

/// The CodeableConcepts an entry's concept was chosen from, per type: every coding of them
/// goes into `Entry.codings` (medicines fill theirs themselves).
fn concepts_of(kind: Kind, r: &Resource) -> Result<Vec<&CodeableConcept>, Malformed> {
    let mut ccs = Vec::new();
    match kind {
        Kind::Condition | Kind::AllergyIntolerance | Kind::Observation | Kind::DiagnosticReport => {
            ccs.extend(r.code.get()?)
        }
        Kind::MedicationStatement | Kind::MedicationRequest => {}
        Kind::CarePlan => ccs.extend(codes_concepts(&r.category)?),
        Kind::DocumentReference | Kind::Composition | Kind::Encounter => {
            ccs.extend(codes_concepts(&r.type_)?)
        }
        Kind::Appointment => {
            ccs.extend(r.service_type.items()?);
            ccs.extend(r.appointment_type.get()?);
        }
    }
    Ok(ccs)
}

/// The CodeableConcepts of a `type`/`category` field (codes alone carry no coding).
fn codes_concepts(field: &Field<super::model::Codes>) -> Result<Vec<&CodeableConcept>, Malformed> {
    let Some(codes) = field.get()? else {
        return Ok(Vec::new());
    };
    Ok(codes
        .0
        .iter()
        .filter_map(|item| match item {
            Field::Valid(CodeOrConcept::Concept(cc)) => Some(cc),
            _ => None,
        })
        .collect())
}

/// Every coding of the concept: the chosen one first, then the others in the source's order,
/// each once. Access policy judges sensitivity on all of them.
fn all_codings(
    chosen: Option<&ProtoCoding>,
    ccs: Vec<&CodeableConcept>,
) -> Result<Vec<ProtoCoding>, Malformed> {
    let mut codings: Vec<ProtoCoding> = Vec::new();
    // A set, not a scan: a server may send thousands of codings (quadratic otherwise).
    let mut seen: HashSet<(String, String)> = HashSet::new();
    if let Some(c) = chosen
        && !c.code.is_empty()
    {
        seen.insert((c.system.clone(), c.code.clone()));
        codings.push(c.clone());
    }
    for cc in ccs {
        for coding in cc.coding.items()? {
            let coding = plain_coding(coding)?;
            if coding.code.is_empty() && coding.system.is_empty() {
                continue;
            }
            if seen.insert((coding.system.clone(), coding.code.clone())) {
                codings.push(coding);
            }
        }
    }
    Ok(codings)
}

/// The International Patient Summary's codes for known-absent and unknown data.
const IPS_ABSENT_UNKNOWN: &str = "http://hl7.org/fhir/uv/ips/CodeSystem/absent-unknown-uv-ips";

/// SNOMED CT situations that assert an absence ("no known ..."): not findings. 716186003 No
/// known allergy and its children 409137002 No known drug allergy, 428607008 No known
/// environmental allergy, 429625007 No known food allergy, 428197003 No known insect allergy,
/// 716184000 No known latex allergy; and 160245001 No current problems or disability.
const SNOMED_NO_KNOWN: &[&str] = &[
    "716186003",
    "409137002",
    "428607008",
    "429625007",
    "428197003",
    "716184000",
    "160245001",
];

enum Absence {
    None,
    /// "None known": an assertion the merge sets against findings from elsewhere.
    Asserted,
    /// "Not known" (IPS no-*-info): not an entry at all; the text names the topic.
    Unknown(&'static str),
}

fn absence(codings: &[ProtoCoding]) -> Absence {
    for c in codings {
        if c.system == SNOMED && SNOMED_NO_KNOWN.contains(&c.code.as_str()) {
            return Absence::Asserted;
        }
        if c.system == IPS_ABSENT_UNKNOWN {
            match c.code.as_str() {
                "no-known-allergies"
                | "no-known-medication-allergies"
                | "no-known-environmental-allergies"
                | "no-known-food-allergies"
                | "no-known-medications"
                | "no-known-problems" => return Absence::Asserted,
                "no-allergy-info" => return Absence::Unknown("allergies"),
                "no-medication-info" => return Absence::Unknown("medicines"),
                "no-problem-info" => return Absence::Unknown("problems"),
                _ => {}
            }
        }
    }
    Absence::None
}

/// How certain the source is: `verificationStatus` (conditions, allergies), or a status of
/// `entered-in-error` on any resource.
fn verification(r: &Resource) -> Result<VerificationStatus, Malformed> {
    if r.status.str()? == Some("entered-in-error") {
        return Ok(VerificationStatus::EnteredInError);
    }
    let Some(cc) = r.verification_status.get()? else {
        return Ok(VerificationStatus::Unspecified);
    };
    for coding in cc.coding.items()? {
        let status = match coding.code.str()? {
            Some("confirmed") => VerificationStatus::Confirmed,
            // R5's "presumed" is a kind of unconfirmed.
            Some("unconfirmed" | "presumed") => VerificationStatus::Unconfirmed,
            Some("provisional") => VerificationStatus::Provisional,
            Some("differential") => VerificationStatus::Differential,
            Some("refuted") => VerificationStatus::Refuted,
            Some("entered-in-error") => VerificationStatus::EnteredInError,
            _ => continue,
        };
        return Ok(status);
    }
    Ok(VerificationStatus::Unspecified)
}

fn condition(r: &Resource) -> Result<Entry, Malformed> {
    let code = required(&r.code)?;
    let concept = concept(code)?.ok_or(Malformed)?;
    Ok(Entry {
        summary: shorten(&concept.display),
        concept: Some(concept),
        status: status(r)?,
        effective: owned(first_date(&[
            date(Some(&r.onset_date_time))?,
            period_start(&r.onset_period)?,
            date(Some(&r.recorded_date))?,
        ])),
        ended: owned(first_date(&[
            date(Some(&r.abatement_date_time))?,
            period_end(&r.abatement_period)?,
        ])),
        recorded: owned(date(Some(&r.recorded_date))?),
        ..Entry::default()
    })
}

fn allergy(r: &Resource) -> Result<Entry, Malformed> {
    let concept = concept(required(&r.code)?)?.ok_or(Malformed)?;
    let mut reactions = Vec::new();
    for reaction in r.reaction.items()? {
        for manifestation in reaction.manifestation.items()? {
            if let Some(text) = label(manifestation)?
                && !reactions.iter().any(|r: &String| r == text)
            {
                reactions.push(text.to_owned());
            }
        }
    }
    let criticality = owned(r.criticality.str()?);
    // The most severe reaction: an unknown severity code is ignored rather than guessed.
    let severity = r
        .reaction
        .items()?
        .filter_map(|reaction| reaction.severity.ok())
        .filter_map(|s| {
            ["mild", "moderate", "severe"]
                .iter()
                .position(|known| known == s)
        })
        .max()
        .and_then(|i| ["mild", "moderate", "severe"].get(i))
        .map(|s| (*s).to_owned())
        .unwrap_or_default();
    let allergy_type = match r.type_.get()? {
        Some(codes) => match codes.0.first() {
            Some(Field::Valid(CodeOrConcept::Code(code))) => code.clone(),
            Some(Field::Invalid | Field::Valid(CodeOrConcept::Concept(_))) => {
                return Err(Malformed);
            }
            _ => String::new(),
        },
        None => String::new(),
    };
    let mut summary = concept.display.clone();
    if !reactions.is_empty() {
        summary.push_str(" — ");
        summary.push_str(&reactions.join(", "));
    }
    if !criticality.is_empty() {
        summary.push_str(&format!(" ({criticality})"));
    }
    Ok(Entry {
        summary: shorten(&summary),
        concept: Some(concept),
        status: status(r)?,
        effective: owned(first_date(&[
            date(Some(&r.onset_date_time))?,
            period_start(&r.onset_period)?,
            date(Some(&r.recorded_date))?,
        ])),
        recorded: owned(date(Some(&r.recorded_date))?),
        detail: Some(Detail::Allergy(AllergyDetail {
            criticality,
            reactions,
            allergy_type,
            severity,
        })),
        ..Entry::default()
    })
}

fn medication(kind: Kind, r: &Resource, medications: &Medications<'_>) -> Result<Entry, Malformed> {
    let named = medication_concept(r, medications)?;
    let dosages = if kind == Kind::MedicationStatement {
        &r.dosage
    } else {
        &r.dosage_instruction
    };
    let mut dosage = String::new();
    for d in dosages.items()? {
        if let Some(text) = d.text.str()? {
            if !dosage.is_empty() {
                dosage.push_str("; ");
            }
            dosage.push_str(text);
        }
    }
    let name = match &named.concept {
        Some(c) if !c.display.is_empty() => c.display.clone(),
        _ => "Medicine not named (its Medication could not be read)".to_owned(),
    };
    let mut summary = name;
    if !dosage.is_empty() {
        summary.push_str(" — ");
        summary.push_str(&dosage);
    }
    let (effective, ended, recorded, detail_kind, intent) = if kind == Kind::MedicationStatement {
        (
            first_date(&[
                date(Some(&r.effective_date_time))?,
                period_start(&r.effective_period)?,
            ]),
            period_end(&r.effective_period)?,
            date(Some(&r.date_asserted))?,
            "statement",
            String::new(),
        )
    } else {
        let authored = date(Some(&r.authored_on))?;
        (authored, None, authored, "request", owned(r.intent.str()?))
    };
    Ok(Entry {
        summary: shorten(&summary),
        codings: all_codings(named.concept.as_ref(), named.codings)?,
        concept: named.concept,
        status: status(r)?,
        effective: owned(effective),
        ended: owned(ended),
        recorded: owned(recorded),
        security_labels: named.labels,
        incomplete: named.missing.is_some(),
        incomplete_reason: named.missing.unwrap_or_default().to_owned(),
        detail: Some(Detail::Medication(MedicationDetail {
            dosage,
            kind: detail_kind.to_owned(),
            intent,
            ..MedicationDetail::default()
        })),
        ..Entry::default()
    })
}

/// What a medicine resource says the medicine is.
struct NamedMedicine<'a> {
    concept: Option<ProtoCoding>,
    /// The concepts every coding is taken from.
    codings: Vec<&'a CodeableConcept>,
    /// A referenced Medication's own security labels.
    labels: Vec<ProtoCoding>,
    /// Why the medicine is not fully known, if it is not.
    missing: Option<&'static str>,
}

/// The medicine: coded inline, or a reference to a contained Medication or one elsewhere in the
/// answer (any page, `_include`d, `$everything` output, or read afterwards). A reference that
/// resolves nowhere still yields the entry, by the reference's display text, marked incomplete:
/// dropping a prescription is data loss. `Err` only when there is neither a concept nor a
/// reference.
fn medication_concept<'a>(
    r: &'a Resource,
    medications: &Medications<'a>,
) -> Result<NamedMedicine<'a>, Malformed> {
    if let Some(code) = r.medication_codeable_concept.get()? {
        return Ok(NamedMedicine {
            concept: Some(concept(code)?.ok_or(Malformed)?),
            codings: vec![code],
            labels: Vec::new(),
            missing: None,
        });
    }
    let reference = r.medication_reference.get()?.ok_or(Malformed)?;
    let target = reference.reference.str()?;
    let resolved = match target {
        Some(local) if local.starts_with('#') => {
            let id = &local[1..];
            let mut found = None;
            for contained in r.contained.items()? {
                if contained.resource_type.str()? == Some("Medication")
                    && contained.id.str()? == Some(id)
                {
                    found = Some(contained);
                    break;
                }
            }
            found
        }
        Some(other) => medications.get(other),
        None => None,
    };
    let display = reference.display.str()?.map(|display| ProtoCoding {
        display: display.to_owned(),
        ..ProtoCoding::default()
    });
    let Some(medication) = resolved else {
        return Ok(NamedMedicine {
            concept: display,
            codings: Vec::new(),
            labels: Vec::new(),
            missing: Some("the Medication it names could not be read from the source"),
        });
    };
    let labels = match medication.meta.get()? {
        Some(meta) => meta
            .security
            .items()?
            .map(plain_coding)
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    if let Some(code) = medication.code.get()?
        && let Some(coding) = concept(code)?
    {
        return Ok(NamedMedicine {
            concept: Some(coding),
            codings: vec![code],
            labels,
            missing: None,
        });
    }
    Ok(NamedMedicine {
        concept: display,
        codings: Vec::new(),
        labels,
        missing: Some("the Medication it names has no code"),
    })
}

fn observation(r: &Resource) -> Result<Entry, Malformed> {
    let code = required(&r.code)?;
    let concept = concept(code)?.ok_or(Malformed)?;
    let (mut value, mut unit) = observation_value(
        &r.value_quantity,
        &r.value_string,
        &r.value_codeable_concept,
    )?;
    if let Some(b) = r.value_boolean.get()? {
        value = if *b { "true" } else { "false" }.to_owned();
    }
    if let Some(n) = r.value_integer.get()? {
        value.clone_from(&n.0);
    }
    if value.is_empty() {
        // A panel such as blood pressure: the values are in the components ("120/80 mmHg").
        let mut parts = Vec::new();
        for component in r.component.items()? {
            let (v, u) = observation_value(
                &component.value_quantity,
                &component.value_string,
                &component.value_codeable_concept,
            )?;
            if !v.is_empty() {
                parts.push(v);
                if unit.is_empty() {
                    unit = u;
                }
            }
        }
        value = parts.join("/");
    }
    let reference_range = match r.reference_range.first()? {
        Some(range) => match range.text.str()? {
            Some(text) => text.to_owned(),
            None => {
                let low = quantity_value(range.low.get()?)?;
                let high = quantity_value(range.high.get()?)?;
                match (low, high) {
                    (Some(l), Some(h)) => format!("{l}-{h}"),
                    (Some(l), None) => format!(">={l}"),
                    (None, Some(h)) => format!("<={h}"),
                    (None, None) => String::new(),
                }
            }
        },
        None => String::new(),
    };
    let interpretation = match r.interpretation.first()? {
        Some(cc) => match cc.coding.first()? {
            Some(coding) => owned(coding.code.str()?.or(coding.display.str()?)),
            None => owned(cc.text.str()?),
        },
        None => String::new(),
    };
    let mut summary = code.text.str()?.unwrap_or(&concept.display).to_owned();
    if !value.is_empty() {
        summary.push(' ');
        summary.push_str(&value);
        if !unit.is_empty() {
            summary.push(' ');
            summary.push_str(&unit);
        }
    }
    if !interpretation.is_empty() {
        summary.push_str(&format!(" ({interpretation})"));
    }
    Ok(Entry {
        summary: shorten(&summary),
        concept: Some(concept),
        status: status(r)?,
        effective: owned(first_date(&[
            date(Some(&r.effective_date_time))?,
            period_start(&r.effective_period)?,
            date(Some(&r.effective_instant))?,
            date(Some(&r.issued))?,
        ])),
        recorded: owned(date(Some(&r.issued))?),
        detail: Some(Detail::Result(ResultDetail {
            value,
            unit,
            reference_range,
            interpretation,
            kind: "observation".to_owned(),
        })),
        ..Entry::default()
    })
}

/// `value[x]` as (value, unit) text.
fn observation_value(
    quantity: &Field<Quantity>,
    string: &Field<String>,
    concept_value: &Field<CodeableConcept>,
) -> Result<(String, String), Malformed> {
    if let Some(q) = quantity.get()? {
        let value = quantity_value(Some(q))?.unwrap_or_default();
        let unit = owned(q.unit.str()?.or(q.code.str()?));
        return Ok((value, unit));
    }
    if let Some(s) = string.str()? {
        return Ok((s.to_owned(), String::new()));
    }
    if let Some(cc) = concept_value.get()? {
        return Ok((owned(label(cc)?), String::new()));
    }
    Ok((String::new(), String::new()))
}

fn quantity_value(q: Option<&Quantity>) -> Result<Option<String>, Malformed> {
    let Some(q) = q else { return Ok(None) };
    let Some(value) = q.value.get()? else {
        return Ok(None);
    };
    Ok(Some(match q.comparator.str()? {
        Some(c) => format!("{c}{}", value.0),
        None => value.0.clone(),
    }))
}

fn diagnostic_report(r: &Resource) -> Result<Entry, Malformed> {
    let code = required(&r.code)?;
    let concept = concept(code)?.ok_or(Malformed)?;
    let conclusion = r.conclusion.str()?;
    let mut summary = code.text.str()?.unwrap_or(&concept.display).to_owned();
    if let Some(conclusion) = conclusion {
        summary.push_str(" — ");
        summary.push_str(conclusion);
    }
    Ok(Entry {
        summary: shorten(&summary),
        concept: Some(concept),
        status: status(r)?,
        effective: owned(first_date(&[
            date(Some(&r.effective_date_time))?,
            period_start(&r.effective_period)?,
            date(Some(&r.issued))?,
        ])),
        recorded: owned(date(Some(&r.issued))?),
        detail: Some(Detail::Result(ResultDetail {
            value: owned(conclusion),
            kind: "report".to_owned(),
            ..ResultDetail::default()
        })),
        ..Entry::default()
    })
}

fn care_plan(r: &Resource) -> Result<Entry, Malformed> {
    let concept = first_concept(&r.category)?;
    let title = r.title.str()?.or(r.description.str()?);
    let summary = match (title, &concept) {
        (Some(t), _) => t.to_owned(),
        (None, Some(c)) if !c.display.is_empty() => c.display.clone(),
        // Neither a category nor a title: nothing says what the plan is.
        _ => return Err(Malformed),
    };
    Ok(Entry {
        summary: shorten(&summary),
        concept,
        status: status(r)?,
        effective: owned(period_start(&r.period)?),
        ended: owned(period_end(&r.period)?),
        recorded: owned(date(Some(&r.created))?),
        ..Entry::default()
    })
}

fn document_reference(r: &Resource) -> Result<Entry, Malformed> {
    let concept = first_concept(&r.type_)?;
    let description = r.description.str()?;
    let document_type = concept
        .as_ref()
        .map(|c| c.display.clone())
        .unwrap_or_default();
    let summary = match (document_type.is_empty(), description) {
        (false, Some(d)) => format!("{document_type} — {d}"),
        (false, None) => document_type.clone(),
        (true, Some(d)) => d.to_owned(),
        (true, None) => return Err(Malformed),
    };
    let attachment = match r.content.first()? {
        Some(content) => content.attachment.get()?,
        None => None,
    };
    let (url, content_type) = match attachment {
        Some(a) => (owned(a.url.str()?), owned(a.content_type.str()?)),
        None => (String::new(), String::new()),
    };
    let context_start = match r.context.get()? {
        Some(context) => period_start(&context.period)?,
        None => None,
    };
    let date_ = date(Some(&r.date))?;
    Ok(Entry {
        summary: shorten(&summary),
        concept,
        status: status(r)?,
        effective: owned(context_start.or(date_)),
        recorded: owned(date_),
        detail: Some(Detail::Document(DocumentDetail {
            document_type,
            url,
            content_type,
            author: author(r)?,
        })),
        ..Entry::default()
    })
}

fn composition(r: &Resource) -> Result<Entry, Malformed> {
    let concept = first_concept(&r.type_)?;
    let document_type = concept
        .as_ref()
        .map(|c| c.display.clone())
        .unwrap_or_default();
    let summary = match r.title.str()? {
        Some(title) => title.to_owned(),
        None if !document_type.is_empty() => document_type.clone(),
        None => return Err(Malformed),
    };
    let date_ = date(Some(&r.date))?;
    Ok(Entry {
        summary: shorten(&summary),
        concept,
        status: status(r)?,
        effective: owned(date_),
        recorded: owned(date_),
        detail: Some(Detail::Document(DocumentDetail {
            document_type,
            author: author(r)?,
            ..DocumentDetail::default()
        })),
        ..Entry::default()
    })
}

fn author(r: &Resource) -> Result<String, Malformed> {
    if let Some(author) = r.author.first()?
        && let Some(display) = author.display.str()?
    {
        return Ok(display.to_owned());
    }
    Ok(match r.custodian.get()? {
        Some(custodian) => owned(custodian.display.str()?),
        None => String::new(),
    })
}

fn encounter(r: &Resource) -> Result<Entry, Malformed> {
    let type_concept = first_concept(&r.type_)?;
    let class = r.class.get()?;
    let class_code = match class {
        Some(c) => c.code.str()?,
        None => None,
    };
    let is_ambulance = match &type_concept {
        Some(c) => c.display.to_ascii_lowercase().contains("ambulance"),
        None => false,
    };
    let encounter_class = if is_ambulance {
        "ambulance".to_owned()
    } else {
        match class_code {
            Some("EMER") => "emergency".to_owned(),
            Some("IMP" | "ACUTE" | "NONAC") => "inpatient".to_owned(),
            Some("AMB") => "ambulatory".to_owned(),
            Some("HH") => "home".to_owned(),
            Some("VR") => "virtual".to_owned(),
            Some("FLD") => "field".to_owned(),
            Some("PRENC") => "pre-admission".to_owned(),
            Some("SS") => "short stay".to_owned(),
            Some(other) => other.to_owned(),
            None => String::new(),
        }
    };
    let concept = match type_concept {
        Some(c) => Some(c),
        None => match class {
            Some(c) => Some(plain_coding(c)?),
            None => None,
        },
    };
    let reason = match r.reason_code.first()? {
        Some(cc) => owned(label(cc)?),
        None => String::new(),
    };
    let location = match r.location.first()? {
        Some(l) => match l.location.get()? {
            Some(reference) => owned(reference.display.str()?),
            None => String::new(),
        },
        None => String::new(),
    };
    let mut summary = match &concept {
        Some(c) if !c.display.is_empty() => c.display.clone(),
        _ if !encounter_class.is_empty() => capitalise(&encounter_class),
        _ => return Err(Malformed),
    };
    if !reason.is_empty() {
        summary.push_str(" — ");
        summary.push_str(&reason);
    }
    Ok(Entry {
        summary: shorten(&summary),
        concept,
        status: status(r)?,
        effective: owned(period_start(&r.period)?),
        ended: owned(period_end(&r.period)?),
        detail: Some(Detail::Encounter(EncounterDetail {
            encounter_class,
            location,
            reason,
        })),
        ..Entry::default()
    })
}

fn appointment(r: &Resource) -> Result<Entry, Malformed> {
    let service_concept = match r.service_type.first()? {
        Some(cc) => concept(cc)?,
        None => None,
    };
    let concept = match service_concept {
        Some(c) => Some(c),
        None => match r.appointment_type.get()? {
            Some(cc) => concept(cc)?,
            None => None,
        },
    };
    let mut location = String::new();
    let mut with_whom = String::new();
    for participant in r.participant.items()? {
        let Some(actor) = participant.actor.get()? else {
            continue;
        };
        let Some(display) = actor.display.str()? else {
            continue;
        };
        if reference_type(actor)? == Some("Location") {
            if location.is_empty() {
                location = display.to_owned();
            }
        } else if with_whom.is_empty() && reference_type(actor)? != Some("Patient") {
            with_whom = display.to_owned();
        }
    }
    let service = match &concept {
        Some(c) if !c.display.is_empty() => c.display.clone(),
        _ => with_whom.clone(),
    };
    let mut summary = match r.description.str()? {
        Some(d) => d.to_owned(),
        None if !service.is_empty() => service.clone(),
        None => "Appointment".to_owned(),
    };
    if !with_whom.is_empty() && with_whom != service && !summary.contains(&with_whom) {
        summary.push_str(" with ");
        summary.push_str(&with_whom);
    }
    Ok(Entry {
        summary: shorten(&summary),
        concept,
        status: owned(r.status.str()?),
        effective: owned(date(Some(&r.start))?),
        ended: owned(date(Some(&r.end))?),
        recorded: owned(date(Some(&r.created))?),
        detail: Some(Detail::Appointment(carerecord_proto::AppointmentDetail {
            location,
            service,
        })),
        ..Entry::default()
    })
}

/// The type part of a reference (`Location/abc` → `Location`), if it has one.
fn reference_type(reference: &Reference) -> Result<Option<&str>, Malformed> {
    Ok(reference
        .reference
        .str()?
        .and_then(|r| r.rsplit('/').nth(1)))
}

/// Demographics from a `Patient` resource. Restricted patients (confidentiality `R`) have no
/// address in the result.
pub(crate) fn patient(r: &Resource, nhs_number: &NhsNumber) -> Result<Patient, Malformed> {
    let mut patient = Patient {
        nhs_number: nhs_number.as_digits(),
        ..Patient::default()
    };
    let names: Vec<_> = r.name.items()?.collect();
    let name = ["official", "usual"]
        .iter()
        .find_map(|wanted| {
            names.iter().find(|n| {
                n.use_.str() == Ok(Some(wanted))
                    && n.period.ok().is_none_or(|p| p.end.ok().is_none())
            })
        })
        .or(names.first());
    if let Some(name) = name {
        patient.family_name = owned(name.family.str()?);
        patient.given_names = name.given.items()?.cloned().collect();
    }
    patient.birth_date = owned(date(Some(&r.birth_date))?);
    patient.gender = owned(r.gender.str()?);
    let meta = r.meta.get()?;
    let restricted = match meta {
        Some(m) => m
            .security
            .items()?
            .any(|c| matches!(c.code.str(), Ok(Some("R" | "restricted")))),
        None => false,
    };
    // The broker withholds the address (and practice) of a restricted patient from roles not
    // permitted to see it, whichever source supplied it: it must know.
    patient.restricted = restricted;
    if !restricted {
        let addresses: Vec<_> = r.address.items()?.collect();
        let address = addresses
            .iter()
            .find(|a| {
                a.use_.str() == Ok(Some("home"))
                    && a.period.ok().is_none_or(|p| p.end.ok().is_none())
            })
            .or_else(|| addresses.iter().find(|a| a.use_.str() != Ok(Some("old"))));
        if let Some(a) = address {
            let mut parts: Vec<&str> = a.line.items()?.map(String::as_str).collect();
            for part in [a.city.str()?, a.district.str()?, a.postal_code.str()?]
                .into_iter()
                .flatten()
            {
                parts.push(part);
            }
            patient.address = if parts.is_empty() {
                owned(a.text.str()?)
            } else {
                parts
                    .iter()
                    .map(|p| p.trim())
                    .filter(|p| !p.is_empty())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
        }
    }
    for gp in r.general_practitioner.items()? {
        if let Some(identifier) = gp.identifier.get()?
            && identifier.system.str()? == Some(ODS_SYSTEM)
            && let Some(code) = identifier.value.str()?
        {
            patient.registered_gp_code = code.to_owned();
            break;
        }
    }
    patient.provenance.push(Provenance {
        source_entry_id: owned(r.id.str()?),
        last_updated: owned(date(meta.map(|m| &m.last_updated))?),
        ..Provenance::default()
    });
    Ok(patient)
}

/// Whether a `Patient` resource carries this NHS number. A server that ignores the
/// `identifier` search parameter answers with every patient it has: this keeps those out.
pub(crate) fn patient_has_nhs_number(r: &Resource, nhs_number: &NhsNumber) -> bool {
    let wanted = nhs_number.as_digits();
    let Some(identifiers) = r.identifier.ok() else {
        return false;
    };
    identifiers.iter().filter_map(Field::ok).any(|i| {
        i.system.str() == Ok(Some(NHS_NUMBER_SYSTEM))
            && i.value
                .str()
                .ok()
                .flatten()
                .is_some_and(|v| v.chars().filter(|c| !c.is_whitespace()).eq(wanted.chars()))
    })
}

/// The entry's concept from a CodeableConcept: SNOMED CT first, then dm+d, then LOINC, then
/// whatever coding comes first; the display falls back to the concept's text. Text alone gives
/// an uncoded concept. `None` when there is neither coding nor text.
fn concept(cc: &CodeableConcept) -> Result<Option<ProtoCoding>, Malformed> {
    let codings: Vec<&Coding> = cc.coding.items()?.collect();
    let text = cc.text.str()?;
    let mut best: Option<(usize, &Coding)> = None;
    for coding in &codings {
        let system = coding.system.str()?;
        // Check the other fields' shapes too: a coding with a numeric code is garbage.
        coding.code.str()?;
        coding.display.str()?;
        let rank = match system {
            Some(SNOMED) => 0,
            Some(DMD) => 1,
            Some(LOINC) => 2,
            _ => 3,
        };
        if best.is_none_or(|(r, _)| rank < r) {
            best = Some((rank, coding));
        }
    }
    Ok(match best {
        Some((_, coding)) => {
            let mut out = plain_coding(coding)?;
            if out.display.is_empty() {
                out.display = owned(text);
            }
            Some(out)
        }
        None => text.map(|t| ProtoCoding {
            display: t.to_owned(),
            ..ProtoCoding::default()
        }),
    })
}

fn plain_coding(c: &Coding) -> Result<ProtoCoding, Malformed> {
    Ok(ProtoCoding {
        system: owned(c.system.str()?),
        code: owned(c.code.str()?),
        display: owned(c.display.str()?),
    })
}

/// The first CodeableConcept of a `type`/`category` field, as a concept.
fn first_concept(field: &Field<super::model::Codes>) -> Result<Option<ProtoCoding>, Malformed> {
    let Some(codes) = field.get()? else {
        return Ok(None);
    };
    for item in &codes.0 {
        match item {
            Field::Valid(CodeOrConcept::Concept(cc)) => {
                if let Some(c) = concept(cc)? {
                    return Ok(Some(c));
                }
            }
            Field::Valid(CodeOrConcept::Code(_)) | Field::Invalid => return Err(Malformed),
            Field::Absent => {}
        }
    }
    Ok(None)
}

/// A human label for a CodeableConcept: its text, else the display of its best coding.
fn label(cc: &CodeableConcept) -> Result<Option<&str>, Malformed> {
    if let Some(text) = cc.text.str()? {
        return Ok(Some(text));
    }
    let mut fallback = None;
    for coding in cc.coding.items()? {
        if let Some(display) = coding.display.str()? {
            if coding.system.str()? == Some(SNOMED) {
                return Ok(Some(display));
            }
            fallback = fallback.or(Some(display));
        }
    }
    Ok(fallback)
}

/// clinicalStatus's code, else `status`.
fn status(r: &Resource) -> Result<String, Malformed> {
    Ok(owned(code_of(&r.clinical_status)?.or(r.status.str()?)))
}

fn code_of(cc: &Field<CodeableConcept>) -> Result<Option<&str>, Malformed> {
    match cc.get()? {
        Some(cc) => match cc.coding.first()? {
            Some(coding) => coding.code.str(),
            None => Ok(None),
        },
        None => Ok(None),
    }
}

fn required(cc: &Field<CodeableConcept>) -> Result<&CodeableConcept, Malformed> {
    cc.get()?.ok_or(Malformed)
}

/// A FHIR date, dateTime or instant, checked for shape: four-digit year first, then only the
/// characters those formats use. Partial dates ("2019", "2019-03") are valid FHIR and kept.
fn date(field: Option<&Field<String>>) -> Result<Option<&str>, Malformed> {
    let Some(value) = field.map(Field::str).transpose()?.flatten() else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    let well_formed = bytes.len() >= 4
        && bytes.len() <= 40
        && bytes[..4].iter().all(u8::is_ascii_digit)
        && bytes[4..]
            .iter()
            .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b':' | b'T' | b'Z' | b'+' | b'.'));
    if well_formed {
        Ok(Some(value))
    } else {
        Err(Malformed)
    }
}

fn period_start(period: &Field<super::model::Period>) -> Result<Option<&str>, Malformed> {
    match period.get()? {
        Some(p) => date(Some(&p.start)),
        None => Ok(None),
    }
}

fn period_end(period: &Field<super::model::Period>) -> Result<Option<&str>, Malformed> {
    match period.get()? {
        Some(p) => date(Some(&p.end)),
        None => Ok(None),
    }
}

fn first_date<'a>(candidates: &[Option<&'a str>]) -> Option<&'a str> {
    candidates.iter().flatten().next().copied()
}

/// The `YYYY-MM-DD` part of a date or date-time (the whole of a partial date).
fn date_part(value: &str) -> &str {
    value.get(..10).unwrap_or(value)
}

fn owned(value: Option<&str>) -> String {
    value.map(str::to_owned).unwrap_or_default()
}

fn shorten(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(SUMMARY_MAX_CHARS) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}…", text[..cut].trim_end()),
    }
}

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

pub(crate) use crate::calendar::today_utc;

#[cfg(test)]
mod tests;
