//! A lookup answer as a FHIR R4 `collection` Bundle, shaped like GP Connect Access Record:
//! Structured with UK Core resources: the Patient, one `List` per section asked, the section's
//! resources, the reporting `Organization`s, one `Provenance` per resource, and one
//! `OperationOutcome` saying what is missing.
//!
//! Pure mapping, no I/O: the face parses the GP Connect-style Parameters into [`BundleOptions`]
//! and calls [`structured_record`].
//!
//! What the Bundle keeps that a naive mapping would lose (SAFETY.md H2–H4, H11, H12):
//! - **Who said what.** Every clinical resource has `meta.source` (its first reporting
//!   organisation's `Organization` fullUrl) and a `Provenance` with one agent per reporting
//!   organisation, each carrying that organisation's own asserted values ([`EXT_ASSERTION`]).
//! - **Disagreement.** Each `Entry.conflicts` becomes an [`EXT_CONFLICT`] extension (field, each
//!   organisation's value, the resolution) and a plain-words sentence in `note` and the narrative.
//! - **Empty vs unknown.** A List's `emptyReason` is `nilknown` only when every organisation asked
//!   said none recorded; otherwise `unavailable` (or `withheld`). The section's state and each
//!   organisation's part are in [`EXT_SECTION_STATE`].
//! - **Verification status** (refuted, entered-in-error) is carried, never dropped; a "no known
//!   allergy" assertion stays an `AllergyIntolerance` with its own code, flagged
//!   ([`EXT_ASSERTS_ABSENCE`], `meta.tag`) so it can never read as an allergy.
//! - **Missing sources and warnings** are `OperationOutcome` issues; withheld data and emergency
//!   access are said too.
//!
//! Extensions defined here (all under `https://carerecord.example/fhir/StructureDefinition/`):
//! [`EXT_SECTION_STATE`], [`EXT_CONFLICT`], [`EXT_ASSERTION`], [`EXT_IDENTITY_DISPUTED`],
//! [`EXT_INCOMPLETE`], [`EXT_ASSERTS_ABSENCE`], [`EXT_VERIFICATION_STATUS`], [`EXT_ENDED`],
//! [`EXT_LATEST_ISSUE`]. Code systems: [`CS_SECTION_STATE`], [`CS_SOURCE_SECTION_STATE`],
//! [`CS_SOURCE_OUTCOME`], [`CS_WARNING_KIND`], [`CS_RECORD_FLAG`].
//!
//! The NHS number appears once, in the Patient's identifier: resource ids are hashes of source
//! ids, and any other text that would carry it (a source's entry id, a message) is scrubbed.

use std::collections::{BTreeMap, HashSet};

use carerecord_adapters::calendar::rfc3339;
use carerecord_proto::{
    Coding, Conflict, Entry, Provenance, Section, SectionState, SectionStatus, SourceOutcome,
    SourceSectionState, SourceStatus, VerificationStatus, Warning, WarningKind, entry::Detail,
};
use serde_json::{Map, Value, json};

use crate::lookup::LookupAnswer;

/// Section state on a `List` (complex): `state` (valueCode from [`CS_SECTION_STATE`]), `summary`
/// (valueString), and one `organisation` per organisation asked (`organisation` valueReference,
/// `state` valueCode from [`CS_SOURCE_SECTION_STATE`], `entries` valueUnsignedInt, `reason`
/// valueString). How a clinician tells "none recorded" from "not known".
pub const EXT_SECTION_STATE: &str =
    "https://carerecord.example/fhir/StructureDefinition/carerecord-section-state";
/// Organisations disagreeing about one field of a resource (complex): `field` (valueString),
/// one `value` per organisation (`organisation` valueReference, `sourceId` valueString, `value`
/// valueString), and `resolution` (valueString: which value is shown and why).
pub const EXT_CONFLICT: &str =
    "https://carerecord.example/fhir/StructureDefinition/carerecord-conflict";
/// On `Provenance.agent`: one organisation's assertion as it made it (complex, every part
/// valueString unless said): `sourceId`, `sourceEntryId`, `lastUpdated`, `kind`, `status`,
/// `verificationStatus` (valueCode), `effective`, `ended`, `recorded`, `dosage`, `criticality`,
/// `severity`, `identityDisputed` (valueBoolean). Repeated when one organisation sent several
/// rows (a medicine's authorisation and issues).
pub const EXT_ASSERTION: &str =
    "https://carerecord.example/fhir/StructureDefinition/carerecord-organisation-assertion";
/// valueBoolean true: only organisations whose demographics for this patient disagree with the
/// others' reported this: check it belongs to this person before acting on it.
pub const EXT_IDENTITY_DISPUTED: &str =
    "https://carerecord.example/fhir/StructureDefinition/carerecord-identity-disputed";
/// Part of the entry could not be read (complex): `reason` (valueString).
pub const EXT_INCOMPLETE: &str =
    "https://carerecord.example/fhir/StructureDefinition/carerecord-incomplete";
/// valueBoolean true: the resource asserts an absence ("no known allergy"), it is not a finding.
pub const EXT_ASSERTS_ABSENCE: &str =
    "https://carerecord.example/fhir/StructureDefinition/carerecord-asserts-absence";
/// valueCode: verification status on resources FHIR gives none (condition-ver-status codes).
pub const EXT_VERIFICATION_STATUS: &str =
    "https://carerecord.example/fhir/StructureDefinition/carerecord-verification-status";
/// valueDateTime: when it ended, on resources FHIR gives no end date (AllergyIntolerance).
pub const EXT_ENDED: &str = "https://carerecord.example/fhir/StructureDefinition/carerecord-ended";
/// valueDateTime on MedicationStatement: date of the latest issue (prescription) from any
/// organisation.
pub const EXT_LATEST_ISSUE: &str =
    "https://carerecord.example/fhir/StructureDefinition/carerecord-latest-issue";

/// Section states: `recorded`, `none-recorded`, `partial`, `unknown`.
pub const CS_SECTION_STATE: &str = "https://carerecord.example/fhir/CodeSystem/section-state";
/// One organisation's part of a section: `entries`, `none-recorded`, `incomplete`, `unknown`,
/// `not-asked`.
pub const CS_SOURCE_SECTION_STATE: &str =
    "https://carerecord.example/fhir/CodeSystem/source-section-state";
/// Source outcomes as the contract names them (`TIMEOUT`, `WRONG_PATIENT`, ...).
pub const CS_SOURCE_OUTCOME: &str = "https://carerecord.example/fhir/CodeSystem/source-outcome";
/// Warning kinds as the contract names them (`CONFLICT`, `DEMOGRAPHICS_MISMATCH`, ...).
pub const CS_WARNING_KIND: &str = "https://carerecord.example/fhir/CodeSystem/warning-kind";
/// `meta.tag` codes: `identity-disputed`, `asserts-absence`, `incomplete`, `conflict`.
pub const CS_RECORD_FLAG: &str = "https://carerecord.example/fhir/CodeSystem/record-flag";

const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const SNOMED: &str = "http://snomed.info/sct";
const UKCORE_PATIENT: &str = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient";
const LIST_EMPTY_REASON: &str = "http://terminology.hl7.org/CodeSystem/list-empty-reason";
const XHTML_NS: &str = "http://www.w3.org/1999/xhtml";

/// What the caller asked for, from the GP Connect-style Parameters.
#[derive(Debug, Clone, Default)]
pub struct BundleOptions {
    /// Absolute base URL of the face, ending in '/', e.g. "https://broker.example/fhir/": used for fullUrls.
    pub base_url: String,
    /// GP Connect includeAllergies.includeResolvedAllergies: false → allergies whose status is resolved/inactive are left out of the allergy List (and the List says so in a note).
    pub include_resolved_allergies: bool,
    /// GP Connect includeMedication.medicationSearchFromDate (YYYY-MM-DD): medicines whose latest date is before it are left out (note says so). None = all.
    pub medications_from: Option<String>,
    /// Sections asked for (carerecord_proto::Section); empty = all.
    pub sections: Vec<carerecord_proto::Section>,
}

/// The answer as a GP Connect-style structured record `collection` Bundle. Always a Bundle: a
/// partial answer is the normal case, and what is missing is in its `OperationOutcome` and Lists.
pub fn structured_record(answer: &LookupAnswer, options: &BundleOptions) -> Value {
    let assembled = rfc3339(answer.assembled_at);
    let nhs = answer
        .record
        .patient
        .as_ref()
        .map(|p| p.nhs_number.clone())
        .unwrap_or_default();
    let mut b = Builder {
        base: options.base_url.clone(),
        assembled: assembled.clone(),
        orgs: Orgs::collect(answer),
        ids: HashSet::new(),
        patient_ref: String::new(),
        resources: Vec::new(),
        provenances: Vec::new(),
    };

    let mut patient = b.patient(answer);
    let mut lists = Vec::new();
    for section in asked_sections(&options.sections) {
        lists.push(b.section(answer, options, section));
    }
    let outcome = outcome(answer, &b.orgs);

    // Scrub every resource, then give the Patient its identifier: the one place the number goes.
    scrub(&mut patient, &nhs);
    if !nhs.is_empty()
        && let Some(p) = patient.as_object_mut()
    {
        p.insert(
            "identifier".into(),
            json!([{ "system": NHS_NUMBER_SYSTEM, "value": nhs }]),
        );
    }
    let mut resources = vec![patient];
    resources.extend(outcome);
    resources.extend(lists);
    resources.append(&mut b.resources);
    resources.extend(b.orgs.resources());
    resources.append(&mut b.provenances);

    let entries: Vec<Value> = resources
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            if i > 0 {
                scrub(&mut r, &nhs);
            }
            let url = format!(
                "{}{}/{}",
                options.base_url,
                r["resourceType"].as_str().unwrap_or_default(),
                r["id"].as_str().unwrap_or_default()
            );
            json!({ "fullUrl": url, "resource": r })
        })
        .collect();

    json!({
        "resourceType": "Bundle",
        "id": safe_id(&answer.request_id, "bundle"),
        "meta": { "lastUpdated": assembled },
        "type": "collection",
        "timestamp": assembled,
        "entry": entries,
    })
}

/// The sections asked, in record order, each once; empty means all.
fn asked_sections(asked: &[Section]) -> Vec<Section> {
    Section::ALL
        .into_iter()
        .filter(|s| asked.is_empty() || asked.contains(s))
        .collect()
}

/// Builds the Bundle's resources, keeping ids unique and references to the Patient and the
/// Organizations consistent.
struct Builder {
    base: String,
    assembled: String,
    orgs: Orgs,
    /// Ids already given, so a hash collision (or two identical entries) still yields unique ids.
    ids: HashSet<String>,
    patient_ref: String,
    resources: Vec<Value>,
    provenances: Vec<Value>,
}

impl Builder {
    /// A Bundle-unique id `{prefix}-{hash of parts}`.
    fn unique_id(&mut self, prefix: &str, parts: &[&str]) -> String {
        let base = format!("{prefix}-{}", short_hash(parts));
        let mut id = base.clone();
        let mut n = 2;
        while !self.ids.insert(id.clone()) {
            id = format!("{base}-{n}");
            n += 1;
        }
        id
    }

    fn patient(&mut self, answer: &LookupAnswer) -> Value {
        let p = answer.record.patient.clone().unwrap_or_default();
        // A fixed id: the source's own Patient id may be the NHS number, and a hash of a
        // ten-digit number is no disguise. One Patient per Bundle, so it is unique.
        let id = "patient".to_string();
        self.ids.insert(id.clone());
        self.patient_ref = format!("Patient/{id}");

        let mut meta = Map::new();
        meta.insert("profile".into(), json!([UKCORE_PATIENT]));
        if let Some(src) = self.meta_source(&p.provenance) {
            meta.insert("source".into(), json!(src));
        }
        if p.restricted {
            meta.insert(
                "security".into(),
                json!([{
                    "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                    "code": "R",
                    "display": "restricted"
                }]),
            );
        }
        let mut r = Map::new();
        r.insert("resourceType".into(), json!("Patient"));
        r.insert("id".into(), json!(id));
        r.insert("meta".into(), Value::Object(meta));
        let mut name = Map::new();
        put(&mut name, "family", &p.family_name);
        let given: Vec<&String> = p.given_names.iter().filter(|g| !g.is_empty()).collect();
        if !given.is_empty() {
            name.insert("given".into(), json!(given));
        }
        if !name.is_empty() {
            name.insert("use".into(), json!("official"));
            r.insert("name".into(), json!([name]));
        }
        if matches!(p.gender.as_str(), "male" | "female" | "other" | "unknown") {
            r.insert("gender".into(), json!(p.gender));
        }
        if let Some(d) = fhir_date(&p.birth_date) {
            r.insert("birthDate".into(), json!(d));
        }
        if !p.address.is_empty() {
            r.insert("address".into(), json!([{ "text": p.address }]));
        }
        if !p.registered_gp_code.is_empty() {
            r.insert(
                "generalPractitioner".into(),
                json!([{ "identifier": { "system": ODS_SYSTEM, "value": p.registered_gp_code } }]),
            );
        }
        let resource = Value::Object(r);
        if let Some(prov) = self.provenance("Patient", &id, &p.provenance) {
            self.provenances.push(prov);
        }
        resource
    }

    /// The first reporting organisation's Organization fullUrl: `meta.source` holds one URI, and
    /// the Provenance names them all.
    fn meta_source(&self, provenance: &[Provenance]) -> Option<String> {
        let p = provenance.first()?;
        let org = self.orgs.get(&p.organisation_code, &p.source_id)?;
        Some(format!("{}Organization/{}", self.base, org.id))
    }

    /// One section: its resources (pushed to `self.resources`) and its List (returned).
    fn section(&mut self, answer: &LookupAnswer, options: &BundleOptions, s: Section) -> Value {
        let status = answer
            .section_statuses
            .iter()
            .find(|st| st.section == s as i32);
        let mut notes: Vec<String> = Vec::new();
        let all = answer.record.section(s);
        let mut filtered = 0usize;
        let kept: Vec<&Entry> = match s {
            Section::Allergies if !options.include_resolved_allergies => {
                let kept: Vec<&Entry> = all.iter().filter(|e| !resolved_allergy(e)).collect();
                filtered = all.len() - kept.len();
                notes.push(format!(
                    "Resolved allergies were not asked for (includeResolvedAllergies=false): \
                     {filtered} left out. Allergies some organisation still reports as active are kept."
                ));
                kept
            }
            Section::Medications => match options.medications_from.as_deref() {
                Some(from) if is_full_date(from) => {
                    let kept: Vec<&Entry> =
                        all.iter().filter(|e| !medicine_before(e, from)).collect();
                    filtered = all.len() - kept.len();
                    notes.push(format!(
                        "Medicines whose latest date is before {from} were not asked for \
                         (medicationSearchFromDate): {filtered} left out. Current medicines, \
                         disputed ones and undated ones are kept."
                    ));
                    kept
                }
                Some(from) => {
                    notes.push(format!(
                        "medicationSearchFromDate '{from}' is not a YYYY-MM-DD date: all medicines are shown."
                    ));
                    all.iter().collect()
                }
                None => all.iter().collect(),
            },
            _ => all.iter().collect(),
        };

        let mut items = Vec::new();
        let mut absences = Vec::new();
        for e in kept {
            let reference = self.clinical(s, e);
            let mut item = json!({ "item": { "reference": reference } });
            if e.asserts_absence {
                item["flag"] = json!({ "text": "assertion of absence (not a finding)" });
                absences.push(self.orgs.labels(&e.provenance));
            }
            items.push(item);
        }
        if !absences.is_empty() {
            notes.push(format!(
                "Includes {} assertion(s) that none is known (e.g. 'no known allergy'), from {}: \
                 these are not findings.",
                absences.len(),
                absences.join("; ")
            ));
        }

        let state = status
            .map(|st| st.state())
            .unwrap_or(SectionState::Unspecified);
        // What a clinician must read first: the section's state and who is missing, then the
        // caller's own filters.
        let mut head: Vec<String> = Vec::new();
        match status {
            Some(st) if items.is_empty() && !st.summary.is_empty() => head.push(st.summary.clone()),
            Some(_) => {}
            None => head.push("The state of this section is not known.".into()),
        }
        let missing = status.map(|st| self.missing(st)).unwrap_or_default();
        if !missing.is_empty() {
            head.push(format!(
                "Entries may be missing: no full answer for this section from {}.",
                missing.join("; ")
            ));
        }
        head.append(&mut notes);
        let notes = head;

        let id = format!("list-{}", s.short_name().replace('_', "-"));
        self.ids.insert(id.clone());
        let mut list = Map::new();
        list.insert("resourceType".into(), json!("List"));
        list.insert("id".into(), json!(id));
        if let Some(st) = status {
            list.insert("extension".into(), json!([self.section_state(st)]));
        }
        list.insert("status".into(), json!("current"));
        list.insert("mode".into(), json!("snapshot"));
        list.insert("title".into(), json!(s.title()));
        list.insert("code".into(), list_code(s));
        list.insert("subject".into(), json!({ "reference": self.patient_ref }));
        list.insert("date".into(), json!(self.assembled));
        if !notes.is_empty() {
            let notes: Vec<Value> = notes.iter().map(|n| json!({ "text": n })).collect();
            list.insert("note".into(), json!(notes));
        }
        if items.is_empty() {
            if let Some(reason) = empty_reason(state, status, filtered, answer.withheld) {
                list.insert("emptyReason".into(), reason);
            }
        } else {
            list.insert("entry".into(), json!(items));
        }
        Value::Object(list)
    }

    /// Organisations that could not answer for a section in full, with why.
    fn missing(&self, st: &SectionStatus) -> Vec<String> {
        st.sources
            .iter()
            .filter(|o| {
                matches!(
                    o.state(),
                    SourceSectionState::Unknown | SourceSectionState::Incomplete
                )
            })
            .map(|o| {
                let label = self.orgs.label(&o.organisation_code, &o.source_id);
                let what = if o.state() == SourceSectionState::Incomplete {
                    "answered in part"
                } else {
                    "unknown"
                };
                if o.reason.is_empty() {
                    format!("{label} ({what})")
                } else {
                    format!("{label} ({what}: {})", o.reason)
                }
            })
            .collect()
    }

    fn section_state(&self, st: &SectionStatus) -> Value {
        let mut parts = vec![json!({
            "url": "state",
            "valueCoding": { "system": CS_SECTION_STATE, "code": section_state_code(st.state()) }
        })];
        if !st.summary.is_empty() {
            parts.push(json!({ "url": "summary", "valueString": st.summary }));
        }
        for o in &st.sources {
            let mut sub = vec![json!({
                "url": "state",
                "valueCoding": {
                    "system": CS_SOURCE_SECTION_STATE,
                    "code": source_section_state_code(o.state())
                }
            })];
            if let Some(r) = self.orgs.reference(&o.organisation_code, &o.source_id) {
                sub.insert(0, json!({ "url": "organisation", "valueReference": r }));
            }
            sub.push(json!({ "url": "entries", "valueUnsignedInt": o.entries }));
            if !o.reason.is_empty() {
                sub.push(json!({ "url": "reason", "valueString": o.reason }));
            }
            parts.push(json!({ "url": "organisation", "extension": sub }));
        }
        json!({ "url": EXT_SECTION_STATE, "extension": parts })
    }

    /// One clinical resource and its Provenance; returns the reference to the resource.
    fn clinical(&mut self, s: Section, e: &Entry) -> String {
        let (rtype, prefix) = resource_type(s);
        let mut parts: Vec<String> = vec![s.short_name().into()];
        parts.extend(provenance_keys(&e.provenance));
        if e.provenance.is_empty() {
            // No source ids to hash: the concept and summary keep the id stable all the same.
            let c = e.concept.clone().unwrap_or_default();
            parts.push(format!("{}|{}|{}", c.system, c.code, e.summary));
        }
        let id = self.unique_id(
            prefix,
            &parts.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let reference = format!("{rtype}/{id}");

        let mut notes: Vec<String> = Vec::new();
        let mut ext: Vec<Value> = Vec::new();
        let mut tags: Vec<Value> = Vec::new();
        for c in &e.conflicts {
            ext.push(self.conflict_extension(c));
            notes.push(self.conflict_words(c));
        }
        if !e.conflicts.is_empty() {
            tags.push(flag("conflict", "Organisations disagree about this entry"));
        }
        if e.asserts_absence {
            ext.push(json!({ "url": EXT_ASSERTS_ABSENCE, "valueBoolean": true }));
            tags.push(flag("asserts-absence", "Assertion that none is known"));
            notes.push(
                "This records that none is known (an assertion of absence); it is not a finding."
                    .into(),
            );
        }
        if e.identity_disputed {
            ext.push(json!({ "url": EXT_IDENTITY_DISPUTED, "valueBoolean": true }));
            tags.push(flag(
                "identity-disputed",
                "Reported only by organisations whose demographics disagree",
            ));
            notes.push(format!(
                "Reported only by {}, whose details for this patient disagree with other \
                 organisations': check it belongs to this person before acting on it.",
                self.orgs.labels(&e.provenance)
            ));
        }
        if e.incomplete {
            let mut inc = Vec::new();
            if !e.incomplete_reason.is_empty() {
                inc.push(json!({ "url": "reason", "valueString": e.incomplete_reason }));
            } else {
                inc.push(json!({ "url": "reason", "valueString": "not stated" }));
            }
            ext.push(json!({ "url": EXT_INCOMPLETE, "extension": inc }));
            tags.push(flag("incomplete", "Part of this entry could not be read"));
            notes.push(if e.incomplete_reason.is_empty() {
                "Incomplete: part of this entry could not be read.".to_string()
            } else {
                format!("Incomplete: {}.", e.incomplete_reason.trim_end_matches('.'))
            });
        }
        let verification = e.verification_status();
        if matches!(
            verification,
            VerificationStatus::Refuted | VerificationStatus::EnteredInError
        ) {
            notes.push(format!(
                "{}: never a current finding.",
                if verification == VerificationStatus::Refuted {
                    "Refuted (ruled out)"
                } else {
                    "Entered in error"
                }
            ));
        }

        let mut r = Map::new();
        r.insert("resourceType".into(), json!(rtype));
        r.insert("id".into(), json!(id));
        let mut meta = Map::new();
        if let Some(src) = self.meta_source(&e.provenance) {
            meta.insert("source".into(), json!(src));
        }
        let security: Vec<Value> = e.security_labels.iter().filter_map(coding).collect();
        if !security.is_empty() {
            meta.insert("security".into(), json!(security));
        }
        if !tags.is_empty() {
            meta.insert("tag".into(), json!(tags));
        }
        if !meta.is_empty() {
            r.insert("meta".into(), Value::Object(meta));
        }

        let patient = json!({ "reference": self.patient_ref });
        let code = concept(e);
        let has_note = match (s, &e.detail) {
            (Section::Conditions, _) => {
                self.condition(&mut r, e, code, patient);
                true
            }
            (Section::Allergies, detail) => {
                let d = match detail {
                    Some(Detail::Allergy(d)) => d.clone(),
                    _ => Default::default(),
                };
                allergy(&mut r, e, &d, code, patient, &mut ext);
                true
            }
            (Section::Medications, detail) => {
                let d = match detail {
                    Some(Detail::Medication(d)) => d.clone(),
                    _ => Default::default(),
                };
                if !d.latest_issue.is_empty() {
                    if let Some(dt) = fhir_date_time(&d.latest_issue) {
                        ext.push(json!({ "url": EXT_LATEST_ISSUE, "valueDateTime": dt }));
                    }
                    notes.push(format!("Latest issue: {}.", d.latest_issue));
                }
                self.medication(&mut r, e, &d, code, patient);
                true
            }
            (Section::TestResults, detail) => {
                let d = match detail {
                    Some(Detail::Result(d)) => d.clone(),
                    _ => Default::default(),
                };
                self.observation(&mut r, e, &d, code, patient);
                true
            }
            (Section::CarePlans, _) => {
                care_plan(&mut r, e, code, patient);
                true
            }
            (Section::Documents, detail) => {
                let d = match detail {
                    Some(Detail::Document(d)) => d.clone(),
                    _ => Default::default(),
                };
                self.document(&mut r, e, &d, code, patient);
                false
            }
            (Section::Encounters, detail) => {
                let d = match detail {
                    Some(Detail::Encounter(d)) => d.clone(),
                    _ => Default::default(),
                };
                self.encounter(&mut r, e, &d, code, patient);
                false
            }
            (Section::Appointments | Section::Unspecified, detail) => {
                let d = match detail {
                    Some(Detail::Appointment(d)) => d.clone(),
                    _ => Default::default(),
                };
                appointment(&mut r, e, &d, code, patient, &notes);
                false
            }
        };
        if !matches!(s, Section::Conditions | Section::Allergies)
            && verification != VerificationStatus::Unspecified
        {
            ext.push(json!({
                "url": EXT_VERIFICATION_STATUS,
                "valueCode": verification_code(verification)
            }));
        }
        if !ext.is_empty() {
            r.insert("extension".into(), json!(ext));
        }
        if has_note && !notes.is_empty() {
            let n: Vec<Value> = notes.iter().map(|n| json!({ "text": n })).collect();
            r.insert("note".into(), json!(n));
        }
        r.insert("text".into(), narrative(&e.summary, &notes));

        self.resources.push(Value::Object(r));
        if let Some(prov) = self.provenance(rtype, &id, &e.provenance) {
            self.provenances.push(prov);
        }
        reference
    }

    fn condition(&self, r: &mut Map<String, Value>, e: &Entry, code: Value, subject: Value) {
        let v = e.verification_status();
        if v != VerificationStatus::EnteredInError {
            // A refuted condition is never current: it shows as inactive, and says why.
            let clinical = if v == VerificationStatus::Refuted {
                json!({
                    "coding": [{ "system": CONDITION_CLINICAL, "code": "inactive" }],
                    "text": "inactive (refuted)"
                })
            } else {
                status_concept(
                    CONDITION_CLINICAL,
                    &e.status,
                    &[
                        "active",
                        "recurrence",
                        "relapse",
                        "inactive",
                        "remission",
                        "resolved",
                    ],
                )
            };
            r.insert("clinicalStatus".into(), clinical);
        }
        if v != VerificationStatus::Unspecified {
            let code = verification_code(v);
            r.insert(
                "verificationStatus".into(),
                json!({
                    "coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                        "code": code
                    }],
                    "text": code
                }),
            );
        }
        r.insert(
            "category".into(),
            json!([{ "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                "code": "problem-list-item",
                "display": "Problem List Item"
            }] }]),
        );
        r.insert("code".into(), code);
        r.insert("subject".into(), subject);
        if let Some(d) = fhir_date_time(&e.effective) {
            r.insert("onsetDateTime".into(), json!(d));
        }
        if let Some(d) = fhir_date_time(&e.ended) {
            r.insert("abatementDateTime".into(), json!(d));
        }
        if let Some(d) = fhir_date_time(&e.recorded) {
            r.insert("recordedDate".into(), json!(d));
        }
    }

    fn medication(
        &self,
        r: &mut Map<String, Value>,
        e: &Entry,
        d: &carerecord_proto::MedicationDetail,
        code: Value,
        subject: Value,
    ) {
        r.insert(
            "status".into(),
            json!(medication_status(&e.status, d.current)),
        );
        r.insert("medicationCodeableConcept".into(), code);
        r.insert("subject".into(), subject);
        let mut period = Map::new();
        if let Some(x) = fhir_date_time(&e.effective) {
            period.insert("start".into(), json!(x));
        }
        if let Some(x) = fhir_date_time(&e.ended) {
            period.insert("end".into(), json!(x));
        }
        if !period.is_empty() {
            r.insert("effectivePeriod".into(), Value::Object(period));
        }
        if let Some(x) = fhir_date_time(&e.recorded) {
            r.insert("dateAsserted".into(), json!(x));
        }
        if let Some(org) = self.orgs.first_reference(&e.provenance) {
            r.insert("informationSource".into(), org);
        }
        if !d.dosage.is_empty() {
            r.insert("dosage".into(), json!([{ "text": d.dosage }]));
        }
    }

    fn observation(
        &self,
        r: &mut Map<String, Value>,
        e: &Entry,
        d: &carerecord_proto::ResultDetail,
        code: Value,
        subject: Value,
    ) {
        const OBS_STATUS: [&str; 8] = [
            "registered",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "cancelled",
            "entered-in-error",
            "unknown",
        ];
        let status = if e.verification_status() == VerificationStatus::EnteredInError {
            "entered-in-error"
        } else {
            OBS_STATUS
                .into_iter()
                .find(|s| *s == e.status)
                .unwrap_or("final")
        };
        r.insert("status".into(), json!(status));
        r.insert("code".into(), code);
        r.insert("subject".into(), subject);
        if let Some(x) = fhir_date_time(&e.effective) {
            r.insert("effectiveDateTime".into(), json!(x));
        }
        let performers = self.orgs.all_references(&e.provenance);
        if !performers.is_empty() {
            r.insert("performer".into(), json!(performers));
        }
        match numeric(&d.value) {
            Some(n) if !d.unit.is_empty() => {
                r.insert(
                    "valueQuantity".into(),
                    json!({ "value": n, "unit": d.unit }),
                );
            }
            _ if !d.value.is_empty() => {
                let text = if d.unit.is_empty() {
                    d.value.clone()
                } else {
                    format!("{} {}", d.value, d.unit)
                };
                r.insert("valueString".into(), json!(text));
            }
            _ => {}
        }
        if !d.interpretation.is_empty() {
            let mut i = json!({ "text": d.interpretation });
            if let Some(display) = interpretation_display(&d.interpretation) {
                i["coding"] = json!([{
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                    "code": d.interpretation,
                    "display": display
                }]);
            }
            r.insert("interpretation".into(), json!([i]));
        }
        if !d.reference_range.is_empty() {
            r.insert(
                "referenceRange".into(),
                json!([{ "text": d.reference_range }]),
            );
        }
    }

    fn document(
        &self,
        r: &mut Map<String, Value>,
        e: &Entry,
        d: &carerecord_proto::DocumentDetail,
        code: Value,
        subject: Value,
    ) {
        r.insert("status".into(), json!("current"));
        let mut doc_type = code;
        if !d.document_type.is_empty() {
            doc_type["text"] = json!(d.document_type);
        }
        r.insert("type".into(), doc_type);
        r.insert("subject".into(), subject);
        // `date` is an instant: only a full timestamp fits; a partial date goes to the period.
        if let Some(x) = fhir_instant(&e.effective).or_else(|| fhir_instant(&e.recorded)) {
            r.insert("date".into(), json!(x));
        }
        if !d.author.is_empty() {
            r.insert("author".into(), json!([{ "display": d.author }]));
        }
        if let Some(org) = self.orgs.first_reference(&e.provenance) {
            r.insert("custodian".into(), org);
        }
        if !e.summary.is_empty() {
            r.insert("description".into(), json!(e.summary));
        }
        let mut attachment = Map::new();
        put(&mut attachment, "contentType", &d.content_type);
        // Passed through exactly: the face has already made it a broker-relative `Binary/{id}`.
        put(&mut attachment, "url", &d.url);
        let title = if d.document_type.is_empty() {
            &e.summary
        } else {
            &d.document_type
        };
        put(&mut attachment, "title", title);
        if let Some(x) = fhir_date_time(&e.effective).filter(|x| fhir_instant(x).is_some()) {
            attachment.insert("creation".into(), json!(x));
        }
        r.insert("content".into(), json!([{ "attachment": attachment }]));
        if let Some(x) = fhir_date_time(&e.effective) {
            r.insert("context".into(), json!({ "period": { "start": x } }));
        }
    }

    fn encounter(
        &self,
        r: &mut Map<String, Value>,
        e: &Entry,
        d: &carerecord_proto::EncounterDetail,
        code: Value,
        subject: Value,
    ) {
        const ENC_STATUS: [&str; 9] = [
            "planned",
            "arrived",
            "triaged",
            "in-progress",
            "onleave",
            "finished",
            "cancelled",
            "entered-in-error",
            "unknown",
        ];
        let status = ENC_STATUS
            .into_iter()
            .find(|s| *s == e.status)
            .unwrap_or("unknown");
        r.insert("status".into(), json!(status));
        r.insert("class".into(), encounter_class(&d.encounter_class));
        if code.get("coding").is_some() {
            r.insert("type".into(), json!([code]));
        }
        r.insert("subject".into(), subject);
        let mut period = Map::new();
        if let Some(x) = fhir_date_time(&e.effective) {
            period.insert("start".into(), json!(x));
        }
        if let Some(x) = fhir_date_time(&e.ended) {
            period.insert("end".into(), json!(x));
        }
        if !period.is_empty() {
            r.insert("period".into(), Value::Object(period));
        }
        if !d.reason.is_empty() {
            r.insert("reasonCode".into(), json!([{ "text": d.reason }]));
        }
        if !d.location.is_empty() {
            r.insert(
                "location".into(),
                json!([{ "location": { "display": d.location } }]),
            );
        }
        if let Some(org) = self.orgs.first_reference(&e.provenance) {
            r.insert("serviceProvider".into(), org);
        }
    }

    /// "RJ1 (Guy's) says active; H81005 says resolved. Shown: ..." — who said what, in words.
    fn conflict_words(&self, c: &Conflict) -> String {
        let said: Vec<String> = c
            .values
            .iter()
            .map(|v| {
                let who = self.orgs.label(&v.organisation_code, &v.source_id);
                if v.value.is_empty() {
                    format!("{who} does not say")
                } else {
                    format!("{who} says {}", v.value)
                }
            })
            .collect();
        let mut s = format!(
            "Organisations disagree about {}: {}.",
            c.field.replace('_', " "),
            said.join("; ")
        );
        if !c.resolution.is_empty() {
            s.push_str(&format!(" Shown: {}.", c.resolution.trim_end_matches('.')));
        }
        s
    }

    fn conflict_extension(&self, c: &Conflict) -> Value {
        let mut parts =
            vec![json!({ "url": "field", "valueString": non_empty(&c.field, "unstated") })];
        for v in &c.values {
            let mut sub = Vec::new();
            if let Some(r) = self.orgs.reference(&v.organisation_code, &v.source_id) {
                sub.push(json!({ "url": "organisation", "valueReference": r }));
            }
            if !v.source_id.is_empty() {
                sub.push(json!({ "url": "sourceId", "valueString": v.source_id }));
            }
            sub.push(json!({ "url": "value", "valueString": non_empty(&v.value, "(not stated)") }));
            parts.push(json!({ "url": "value", "extension": sub }));
        }
        if !c.resolution.is_empty() {
            parts.push(json!({ "url": "resolution", "valueString": c.resolution }));
        }
        json!({ "url": EXT_CONFLICT, "extension": parts })
    }

    /// The Provenance of one resource: one agent per reporting organisation, each with its own
    /// assertions, and one entity per source row. `None` when no organisation is recorded.
    fn provenance(&mut self, rtype: &str, id: &str, rows: &[Provenance]) -> Option<Value> {
        if rows.is_empty() {
            return None;
        }
        let prov_id = self.unique_id("prov", &[rtype, id]);
        // One agent per organisation, in the order they first appear (configuration order).
        let mut agents: Vec<(String, Vec<&Provenance>)> = Vec::new();
        for p in rows {
            let key = org_key(&p.organisation_code, &p.source_id);
            match agents.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(p),
                None => agents.push((key, vec![p])),
            }
        }
        let agents: Vec<Value> = agents
            .iter()
            .map(|(_, ps)| {
                let mut a = Map::new();
                let assertions: Vec<Value> = ps.iter().filter_map(|p| assertion(p)).collect();
                if !assertions.is_empty() {
                    a.insert("extension".into(), json!(assertions));
                }
                a.insert(
                    "type".into(),
                    json!({ "coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                        "code": "author",
                        "display": "Author"
                    }] }),
                );
                let who = self
                    .orgs
                    .reference(&ps[0].organisation_code, &ps[0].source_id)
                    .unwrap_or_else(|| json!({ "display": ps[0].source_id }));
                a.insert("who".into(), who);
                Value::Object(a)
            })
            .collect();
        let entities: Vec<Value> = rows
            .iter()
            .filter(|p| !p.source_entry_id.is_empty())
            .map(|p| {
                json!({
                    "role": "source",
                    "what": {
                        "identifier": {
                            "system": format!("urn:carerecord:source:{}", uri_safe(&p.source_id)),
                            "value": p.source_entry_id
                        },
                        "display": format!(
                            "{} entry {}",
                            self.orgs.label(&p.organisation_code, &p.source_id),
                            p.source_entry_id
                        )
                    }
                })
            })
            .collect();
        let recorded = rows
            .iter()
            .filter_map(|p| fhir_instant(&p.last_updated))
            .max()
            .map(str::to_string)
            .unwrap_or_else(|| self.assembled.clone());
        let mut prov = Map::new();
        prov.insert("resourceType".into(), json!("Provenance"));
        prov.insert("id".into(), json!(prov_id));
        if rows.iter().any(|p| p.identity_disputed) {
            prov.insert(
                "meta".into(),
                json!({ "tag": [flag("identity-disputed", "An organisation's demographics for this patient disagree with others'")] }),
            );
        }
        prov.insert(
            "target".into(),
            json!([{ "reference": format!("{rtype}/{id}") }]),
        );
        prov.insert("recorded".into(), json!(recorded));
        prov.insert("agent".into(), json!(agents));
        if !entities.is_empty() {
            prov.insert("entity".into(), json!(entities));
        }
        Some(Value::Object(prov))
    }
}

/// One organisation's assertion, as it made it (values kept as strings: faithful, even when not
/// a valid FHIR date).
fn assertion(p: &Provenance) -> Option<Value> {
    let mut parts = Vec::new();
    for (name, value) in [
        ("sourceId", &p.source_id),
        ("sourceEntryId", &p.source_entry_id),
        ("lastUpdated", &p.last_updated),
        ("kind", &p.kind),
        ("status", &p.status),
    ] {
        if !value.is_empty() {
            parts.push(json!({ "url": name, "valueString": value }));
        }
    }
    if p.verification_status() != VerificationStatus::Unspecified {
        parts.push(json!({
            "url": "verificationStatus",
            "valueCode": verification_code(p.verification_status())
        }));
    }
    for (name, value) in [
        ("effective", &p.effective),
        ("ended", &p.ended),
        ("recorded", &p.recorded),
        ("dosage", &p.dosage),
        ("criticality", &p.criticality),
        ("severity", &p.severity),
    ] {
        if !value.is_empty() {
            parts.push(json!({ "url": name, "valueString": value }));
        }
    }
    if p.identity_disputed {
        parts.push(json!({ "url": "identityDisputed", "valueBoolean": true }));
    }
    (!parts.is_empty()).then(|| json!({ "url": EXT_ASSERTION, "extension": parts }))
}

const CONDITION_CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";
const ALLERGY_CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical";

fn allergy(
    r: &mut Map<String, Value>,
    e: &Entry,
    d: &carerecord_proto::AllergyDetail,
    code: Value,
    patient: Value,
    ext: &mut Vec<Value>,
) {
    let v = e.verification_status();
    if v != VerificationStatus::EnteredInError {
        let clinical = if v == VerificationStatus::Refuted {
            json!({
                "coding": [{ "system": ALLERGY_CLINICAL, "code": "inactive" }],
                "text": "inactive (refuted)"
            })
        } else {
            status_concept(
                ALLERGY_CLINICAL,
                &e.status,
                &["active", "inactive", "resolved"],
            )
        };
        r.insert("clinicalStatus".into(), clinical);
    }
    if v != VerificationStatus::Unspecified {
        // R4's allergy verification has no provisional/differential: unconfirmed, said in text.
        let fhir_code = match v {
            VerificationStatus::Provisional | VerificationStatus::Differential => "unconfirmed",
            other => verification_code(other),
        };
        r.insert(
            "verificationStatus".into(),
            json!({
                "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                    "code": fhir_code
                }],
                "text": verification_code(v)
            }),
        );
    }
    if matches!(d.allergy_type.as_str(), "allergy" | "intolerance") {
        r.insert("type".into(), json!(d.allergy_type));
    }
    if matches!(d.criticality.as_str(), "low" | "high" | "unable-to-assess") {
        r.insert("criticality".into(), json!(d.criticality));
    }
    r.insert("code".into(), code);
    r.insert("patient".into(), patient);
    if let Some(x) = fhir_date_time(&e.effective) {
        r.insert("onsetDateTime".into(), json!(x));
    }
    if let Some(x) = fhir_date_time(&e.ended) {
        ext.push(json!({ "url": EXT_ENDED, "valueDateTime": x }));
    }
    if let Some(x) = fhir_date_time(&e.recorded) {
        r.insert("recordedDate".into(), json!(x));
    }
    let reactions: Vec<Value> = d
        .reactions
        .iter()
        .filter(|x| !x.is_empty())
        .map(|x| json!({ "text": x }))
        .collect();
    let severity = matches!(d.severity.as_str(), "mild" | "moderate" | "severe");
    if !reactions.is_empty() || severity {
        let manifestation = if reactions.is_empty() {
            vec![json!({ "text": "not stated" })]
        } else {
            reactions
        };
        let mut reaction = json!({ "manifestation": manifestation });
        if severity {
            reaction["severity"] = json!(d.severity);
        }
        r.insert("reaction".into(), json!([reaction]));
    }
}

fn care_plan(r: &mut Map<String, Value>, e: &Entry, code: Value, subject: Value) {
    const PLAN_STATUS: [&str; 7] = [
        "draft",
        "active",
        "on-hold",
        "revoked",
        "completed",
        "entered-in-error",
        "unknown",
    ];
    let status = PLAN_STATUS
        .into_iter()
        .find(|s| *s == e.status)
        .unwrap_or("unknown");
    r.insert("status".into(), json!(status));
    r.insert("intent".into(), json!("plan"));
    if code.get("coding").is_some() {
        r.insert("category".into(), json!([code]));
    }
    if !e.summary.is_empty() {
        r.insert("title".into(), json!(e.summary));
    }
    r.insert("subject".into(), subject);
    let mut period = Map::new();
    if let Some(x) = fhir_date_time(&e.effective) {
        period.insert("start".into(), json!(x));
    }
    if let Some(x) = fhir_date_time(&e.ended) {
        period.insert("end".into(), json!(x));
    }
    if !period.is_empty() {
        r.insert("period".into(), Value::Object(period));
    }
    if let Some(x) = fhir_date_time(&e.recorded) {
        r.insert("created".into(), json!(x));
    }
}

fn appointment(
    r: &mut Map<String, Value>,
    e: &Entry,
    d: &carerecord_proto::AppointmentDetail,
    code: Value,
    patient: Value,
    notes: &[String],
) {
    const APPT_STATUS: [&str; 10] = [
        "proposed",
        "pending",
        "booked",
        "arrived",
        "fulfilled",
        "cancelled",
        "noshow",
        "entered-in-error",
        "checked-in",
        "waitlist",
    ];
    let status = APPT_STATUS
        .into_iter()
        .find(|s| *s == e.status)
        .unwrap_or("booked");
    r.insert("status".into(), json!(status));
    if !d.service.is_empty() {
        r.insert("serviceType".into(), json!([{ "text": d.service }]));
    }
    if code.get("coding").is_some() {
        r.insert("appointmentType".into(), code);
    }
    if !e.summary.is_empty() {
        r.insert("description".into(), json!(e.summary));
    }
    // `start`/`end` are instants; a date-only appointment keeps its date as the requested period.
    match (fhir_instant(&e.effective), fhir_date_time(&e.effective)) {
        (Some(start), _) => {
            r.insert("start".into(), json!(start));
            if let Some(end) = fhir_instant(&e.ended) {
                r.insert("end".into(), json!(end));
            }
        }
        (None, Some(date)) => {
            r.insert("requestedPeriod".into(), json!([{ "start": date }]));
        }
        (None, None) => {}
    }
    if let Some(x) = fhir_date_time(&e.recorded).filter(|x| fhir_instant(x).is_none()) {
        r.insert("created".into(), json!(x));
    }
    if !notes.is_empty() {
        r.insert("comment".into(), json!(notes.join(" ")));
    }
    let mut participants = vec![json!({ "actor": patient, "status": "accepted" })];
    if !d.location.is_empty() {
        participants.push(json!({ "actor": { "display": d.location }, "status": "accepted" }));
    }
    r.insert("participant".into(), json!(participants));
}

/// FHIR resource type and id prefix of a section's resources.
fn resource_type(s: Section) -> (&'static str, &'static str) {
    match s {
        Section::Conditions => ("Condition", "cond"),
        Section::Medications => ("MedicationStatement", "med"),
        Section::Allergies => ("AllergyIntolerance", "allergy"),
        Section::TestResults => ("Observation", "obs"),
        Section::CarePlans => ("CarePlan", "plan"),
        Section::Documents => ("DocumentReference", "doc"),
        Section::Encounters => ("Encounter", "enc"),
        Section::Appointments | Section::Unspecified => ("Appointment", "appt"),
    }
}

/// The List's code: the SNOMED CT concept GP Connect uses where there is one, else text only
/// (no invented codes).
fn list_code(s: Section) -> Value {
    let snomed = match s {
        Section::Allergies => Some(("886921000000105", "Allergies and adverse reactions")),
        Section::Medications => Some(("933361000000108", "Medications and medical devices")),
        Section::Conditions => Some(("717711000000103", "Problems")),
        _ => None,
    };
    match snomed {
        Some((code, display)) => json!({
            "coding": [{ "system": SNOMED, "code": code, "display": display }],
            "text": s.title()
        }),
        None => json!({ "text": s.title() }),
    }
}

/// Why a List is empty. `nilknown` only when every organisation asked said none recorded.
fn empty_reason(
    state: SectionState,
    status: Option<&SectionStatus>,
    filtered: usize,
    withheld: bool,
) -> Option<Value> {
    let everyone_said_none = status.is_some_and(|st| {
        st.sources.iter().all(|o| {
            matches!(
                o.state(),
                SourceSectionState::NoneRecorded | SourceSectionState::NotAsked
            )
        }) && st
            .sources
            .iter()
            .any(|o| o.state() == SourceSectionState::NoneRecorded)
    });
    let (code, display) = match state {
        // Something was held back from this requester (another organisation's data under a
        // patient's objection, sensitive entries): never "nil known".
        _ if withheld => ("withheld", "Information Withheld"),
        SectionState::NoneRecorded if everyone_said_none => ("nilknown", "Nil Known"),
        // Entries exist but the caller's own filters left them out: the notes say so.
        SectionState::Recorded if filtered > 0 => return None,
        SectionState::Recorded if withheld => ("withheld", "Information Withheld"),
        _ => ("unavailable", "Unavailable"),
    };
    Some(json!({
        "coding": [{ "system": LIST_EMPTY_REASON, "code": code, "display": display }],
        "text": display
    }))
}

/// An allergy left out when resolved allergies are not asked for: its shown status is resolved
/// or inactive and no organisation disputes the status (a disputed one stays, with its conflict).
fn resolved_allergy(e: &Entry) -> bool {
    matches!(
        e.status.to_ascii_lowercase().as_str(),
        "resolved" | "inactive"
    ) && !e.conflicts.iter().any(|c| c.field == "status")
}

/// A medicine left out by `medicationSearchFromDate`: not current, undisputed, and every date
/// known about it (latest issue, start, end, each organisation's dates) is before `from`.
fn medicine_before(e: &Entry, from: &str) -> bool {
    let (current, latest_issue) = match &e.detail {
        Some(Detail::Medication(d)) => (d.current, d.latest_issue.as_str()),
        _ => (false, ""),
    };
    if current || !e.conflicts.is_empty() {
        return false;
    }
    let mut dates: Vec<&str> = vec![latest_issue, &e.effective, &e.ended];
    for p in &e.provenance {
        dates.extend([p.effective.as_str(), p.ended.as_str()]);
    }
    let dates: Vec<&str> = dates.into_iter().filter(|d| !d.is_empty()).collect();
    !dates.is_empty() && dates.iter().all(|d| date_before(d, from))
}

/// Whether a (possibly partial) date lies wholly before `from` (YYYY-MM-DD): "2019" is before
/// "2020-01-01"; "2020" is not before "2020-03-01" (it may be later that year).
fn date_before(date: &str, from: &str) -> bool {
    let date = date.split('T').next().unwrap_or_default();
    if !date.is_ascii() || !from.is_ascii() {
        return false;
    }
    let n = date.len().min(from.len());
    date[..n] < from[..n]
}

fn medication_status(status: &str, current: bool) -> &'static str {
    match status {
        "entered-in-error" => "entered-in-error",
        "on-hold" if current => "on-hold",
        "intended" if current => "intended",
        _ if current => "active",
        "stopped" | "cancelled" => "stopped",
        "not-taken" => "not-taken",
        _ => "completed",
    }
}

fn encounter_class(class: &str) -> Value {
    const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
    let known = match class.to_ascii_lowercase().as_str() {
        "emergency" => Some(("EMER", "emergency")),
        "inpatient" => Some(("IMP", "inpatient encounter")),
        "ambulatory" | "outpatient" => Some(("AMB", "ambulatory")),
        "home" | "home health" => Some(("HH", "home health")),
        "virtual" => Some(("VR", "virtual")),
        "field" => Some(("FLD", "field")),
        _ => None,
    };
    match known {
        Some((code, display)) => json!({ "system": ACT_CODE, "code": code, "display": display }),
        // No v3 code for e.g. "ambulance": keep the source's word rather than invent a code.
        None if !class.is_empty() => json!({ "display": class }),
        None => json!({
            "system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor",
            "code": "UNK",
            "display": "unknown"
        }),
    }
}

fn interpretation_display(code: &str) -> Option<&'static str> {
    Some(match code {
        "H" => "High",
        "L" => "Low",
        "N" => "Normal",
        "A" => "Abnormal",
        "HH" => "Critical high",
        "LL" => "Critical low",
        _ => return None,
    })
}

fn verification_code(v: VerificationStatus) -> &'static str {
    match v {
        VerificationStatus::Unspecified => "unknown",
        VerificationStatus::Confirmed => "confirmed",
        VerificationStatus::Unconfirmed => "unconfirmed",
        VerificationStatus::Provisional => "provisional",
        VerificationStatus::Differential => "differential",
        VerificationStatus::Refuted => "refuted",
        VerificationStatus::EnteredInError => "entered-in-error",
    }
}

fn section_state_code(s: SectionState) -> &'static str {
    match s {
        SectionState::Unspecified => "unspecified",
        SectionState::Recorded => "recorded",
        SectionState::NoneRecorded => "none-recorded",
        SectionState::Partial => "partial",
        SectionState::Unknown => "unknown",
    }
}

fn source_section_state_code(s: SourceSectionState) -> &'static str {
    match s {
        SourceSectionState::Unspecified => "unspecified",
        SourceSectionState::Entries => "entries",
        SourceSectionState::NoneRecorded => "none-recorded",
        SourceSectionState::Incomplete => "incomplete",
        SourceSectionState::Unknown => "unknown",
        SourceSectionState::NotAsked => "not-asked",
    }
}

/// A status as a CodeableConcept: coded when it is one of `codes`, else the source's word as text.
fn status_concept(system: &str, status: &str, codes: &[&str]) -> Value {
    if codes.contains(&status) {
        json!({ "coding": [{ "system": system, "code": status }], "text": status })
    } else {
        json!({ "text": non_empty(status, "not stated") })
    }
}

/// The entry's concept with every coding the source gave (concept first, each once).
fn concept(e: &Entry) -> Value {
    let mut codings: Vec<Value> = Vec::new();
    for c in e.concept.iter().chain(e.codings.iter()) {
        if let Some(v) = coding(c)
            && !codings.contains(&v)
        {
            codings.push(v);
        }
    }
    let text = e
        .concept
        .as_ref()
        .map(|c| c.display.as_str())
        .filter(|d| !d.is_empty())
        .unwrap_or(&e.summary);
    let mut cc = Map::new();
    if !codings.is_empty() {
        cc.insert("coding".into(), json!(codings));
    }
    cc.insert("text".into(), json!(non_empty(text, "not stated")));
    Value::Object(cc)
}

fn coding(c: &Coding) -> Option<Value> {
    if c.code.is_empty() && c.display.is_empty() {
        return None;
    }
    let mut m = Map::new();
    put(&mut m, "system", &c.system);
    put(&mut m, "code", &c.code);
    put(&mut m, "display", &c.display);
    Some(Value::Object(m))
}

fn flag(code: &str, display: &str) -> Value {
    json!({ "system": CS_RECORD_FLAG, "code": code, "display": display })
}

/// The resource's narrative: its summary and the notes a clinician must read, as XHTML.
fn narrative(summary: &str, notes: &[String]) -> Value {
    let mut div = format!(
        "<div xmlns=\"{XHTML_NS}\"><p>{}</p>",
        escape(non_empty(summary, "(no summary)"))
    );
    for n in notes {
        div.push_str(&format!("<p>{}</p>", escape(n)));
    }
    div.push_str("</div>");
    json!({ "status": "generated", "div": div })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The OperationOutcome: one issue per source (or locator) that did not answer fully, one per
/// warning, and the withheld / emergency / cache facts. `None` when there is nothing to say.
fn outcome(answer: &LookupAnswer, orgs: &Orgs) -> Option<Value> {
    let mut issues = Vec::new();
    for s in &answer.sources {
        source_issues(s, None, orgs, &mut issues);
    }
    for l in &answer.locators {
        let o = SourceOutcome::try_from(l.outcome).unwrap_or(SourceOutcome::Unspecified);
        if o != SourceOutcome::Ok {
            let label = o.labels().0;
            let mut issue = json!({
                "severity": "warning",
                "code": issue_code(o),
                "details": {
                    "coding": [{ "system": CS_SOURCE_OUTCOME, "code": label }],
                    "text": format!(
                        "Record locator {} did not answer ({label}): records held elsewhere may be missing.",
                        l.locator_id
                    )
                }
            });
            if !l.message.is_empty() {
                issue["diagnostics"] = json!(l.message);
            }
            issues.push(issue);
        }
    }
    for w in &answer.warnings {
        issues.push(warning_issue(w));
    }
    if answer.withheld {
        issues.push(json!({
            "severity": "information",
            "code": "suppressed",
            "details": { "text": "Some information is withheld from this view." }
        }));
    }
    if answer.emergency_access {
        issues.push(json!({
            "severity": "information",
            "code": "informational",
            "details": { "text": "Disclosed under emergency (break-glass) access: this access is audited and reported." }
        }));
    }
    if let Some(age) = answer.cache_age {
        issues.push(json!({
            "severity": "information",
            "code": "informational",
            "details": { "text": format!(
                "Served from the broker's cache: assembled {} s before this request.",
                age.as_secs()
            ) }
        }));
    }
    if issues.is_empty() {
        return None;
    }
    Some(json!({
        "resourceType": "OperationOutcome",
        "id": "outcome",
        "issue": issues,
    }))
}

fn source_issues(s: &SourceStatus, via: Option<&str>, orgs: &Orgs, out: &mut Vec<Value>) {
    let o = SourceOutcome::try_from(s.outcome).unwrap_or(SourceOutcome::Unspecified);
    let label = orgs.label_with_name(&s.organisation_code, &s.source_id, &s.organisation_name);
    if !matches!(o, SourceOutcome::Ok | SourceOutcome::NotFound) {
        let what = match o {
            SourceOutcome::Timeout => "did not answer in time; its data is missing",
            SourceOutcome::Error => "failed; its data is missing",
            SourceOutcome::Unavailable => "is unavailable and was not asked; its data is missing",
            SourceOutcome::CircuitOpen => {
                "was not asked after repeated failures (circuit open); its data is missing"
            }
            SourceOutcome::Refused => "refused the lookup; its data is missing",
            SourceOutcome::Partial => "answered in part; some of its data may be missing",
            SourceOutcome::WrongPatient => {
                "answered about a different patient; nothing it said was used"
            }
            _ => "did not say how it answered; its data may be missing",
        };
        let via = via.map(|v| format!(" (via {v})")).unwrap_or_default();
        let mut issue = json!({
            "severity": if o == SourceOutcome::WrongPatient { "error" } else { "warning" },
            "code": issue_code(o),
            "details": {
                "coding": [{ "system": CS_SOURCE_OUTCOME, "code": o.labels().0 }],
                "text": format!("{label}{via} {what} ({}).", o.labels().0)
            }
        });
        if !s.message.is_empty() {
            issue["diagnostics"] = json!(s.message);
        }
        out.push(issue);
    }
    for n in &s.nested {
        source_issues(n, Some(&label), orgs, out);
    }
}

fn issue_code(o: SourceOutcome) -> &'static str {
    match o {
        SourceOutcome::Timeout => "timeout",
        SourceOutcome::Unavailable | SourceOutcome::CircuitOpen => "transient",
        SourceOutcome::Partial => "incomplete",
        SourceOutcome::WrongPatient => "security",
        SourceOutcome::Refused => "forbidden",
        _ => "exception",
    }
}

fn warning_issue(w: &Warning) -> Value {
    let kind = w.kind();
    let name = kind.as_str_name();
    let name = name.strip_prefix("WARNING_KIND_").unwrap_or(name);
    let (severity, code) = match kind {
        WarningKind::WrongPatient => ("error", "security"),
        WarningKind::Conflict | WarningKind::DemographicsMismatch => ("warning", "conflict"),
        WarningKind::Incomplete | WarningKind::DataCutShort => ("warning", "incomplete"),
        WarningKind::SourceDataInvalid => ("warning", "structure"),
        WarningKind::LocatorUnavailable => ("warning", "transient"),
        WarningKind::UnknownOrganisation | WarningKind::RegisteredGpNotFound => {
            ("warning", "not-found")
        }
        WarningKind::Unspecified => ("warning", "informational"),
    };
    let mut issue = json!({
        "severity": severity,
        "code": code,
        "details": {
            "coding": [{ "system": CS_WARNING_KIND, "code": name }],
            "text": non_empty(&w.message, name)
        }
    });
    if !w.source_ids.is_empty() {
        issue["diagnostics"] = json!(format!("sources: {}", w.source_ids.join(", ")));
    }
    issue
}

/// The organisations of the answer, keyed by ODS code (or source id when a source has none),
/// each becoming one Organization so every reference resolves inside the Bundle.
struct Orgs {
    by_key: BTreeMap<String, Org>,
}

struct Org {
    id: String,
    code: String,
    name: String,
}

fn org_key(code: &str, source_id: &str) -> String {
    if code.is_empty() {
        format!("source:{source_id}")
    } else {
        code.to_string()
    }
}

impl Orgs {
    fn collect(answer: &LookupAnswer) -> Orgs {
        let mut orgs = Orgs {
            by_key: BTreeMap::new(),
        };
        fn statuses(orgs: &mut Orgs, s: &SourceStatus) {
            orgs.add(&s.organisation_code, &s.source_id, &s.organisation_name);
            for n in &s.nested {
                statuses(orgs, n);
            }
        }
        for s in &answer.sources {
            statuses(&mut orgs, s);
        }
        let record = &answer.record;
        if let Some(p) = &record.patient {
            for pr in &p.provenance {
                orgs.add(&pr.organisation_code, &pr.source_id, &pr.organisation_name);
            }
        }
        for s in Section::ALL {
            for e in record.section(s) {
                for pr in &e.provenance {
                    orgs.add(&pr.organisation_code, &pr.source_id, &pr.organisation_name);
                }
                for c in &e.conflicts {
                    for v in &c.values {
                        orgs.add(&v.organisation_code, &v.source_id, &v.organisation_name);
                    }
                }
            }
        }
        for st in &answer.section_statuses {
            for o in &st.sources {
                orgs.add(&o.organisation_code, &o.source_id, "");
            }
        }
        orgs
    }

    fn add(&mut self, code: &str, source_id: &str, name: &str) {
        if code.is_empty() && source_id.is_empty() {
            return;
        }
        let key = org_key(code, source_id);
        let org = self.by_key.entry(key.clone()).or_insert_with(|| Org {
            id: if !code.is_empty()
                && code.len() <= 60
                && code.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                format!("ods-{code}")
            } else {
                format!("org-{}", short_hash(&[&key]))
            },
            code: code.to_string(),
            name: String::new(),
        });
        if org.name.is_empty() {
            org.name = name.to_string();
        }
    }

    fn get(&self, code: &str, source_id: &str) -> Option<&Org> {
        self.by_key.get(&org_key(code, source_id))
    }

    fn reference(&self, code: &str, source_id: &str) -> Option<Value> {
        let org = self.get(code, source_id)?;
        let mut r = json!({ "reference": format!("Organization/{}", org.id) });
        let label = self.label(code, source_id);
        r["display"] = json!(label);
        Some(r)
    }

    fn first_reference(&self, rows: &[Provenance]) -> Option<Value> {
        let p = rows.first()?;
        self.reference(&p.organisation_code, &p.source_id)
    }

    /// One reference per reporting organisation, each once.
    fn all_references(&self, rows: &[Provenance]) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        for p in rows {
            if let Some(r) = self.reference(&p.organisation_code, &p.source_id)
                && !out.contains(&r)
            {
                out.push(r);
            }
        }
        out
    }

    /// "Name (CODE)", or what is known.
    fn label(&self, code: &str, source_id: &str) -> String {
        let name = self
            .get(code, source_id)
            .map(|o| o.name.as_str())
            .unwrap_or("");
        self.label_with_name(code, source_id, name)
    }

    fn label_with_name(&self, code: &str, source_id: &str, name: &str) -> String {
        let name = if name.is_empty() {
            self.get(code, source_id)
                .map(|o| o.name.as_str())
                .unwrap_or("")
        } else {
            name
        };
        match (name.is_empty(), code.is_empty()) {
            (false, false) => format!("{name} ({code})"),
            (true, false) => code.to_string(),
            (false, true) => name.to_string(),
            (true, true) => format!("source {source_id}"),
        }
    }

    /// The reporting organisations of an entry, named once each.
    fn labels(&self, rows: &[Provenance]) -> String {
        let mut out: Vec<String> = Vec::new();
        for p in rows {
            let l = self.label(&p.organisation_code, &p.source_id);
            if !out.contains(&l) {
                out.push(l);
            }
        }
        if out.is_empty() {
            "an unnamed organisation".into()
        } else {
            out.join(", ")
        }
    }

    fn resources(&self) -> Vec<Value> {
        self.by_key
            .values()
            .map(|o| {
                let mut r = Map::new();
                r.insert("resourceType".into(), json!("Organization"));
                r.insert("id".into(), json!(o.id));
                if !o.code.is_empty() {
                    r.insert(
                        "identifier".into(),
                        json!([{ "system": ODS_SYSTEM, "value": o.code }]),
                    );
                }
                let name = if o.name.is_empty() { &o.code } else { &o.name };
                put(&mut r, "name", name);
                Value::Object(r)
            })
            .collect()
    }
}

/// `source_id|source_entry_id` per provenance row: what makes an entry's id stable.
fn provenance_keys(rows: &[Provenance]) -> Vec<String> {
    rows.iter()
        .map(|p| format!("{}|{}", p.source_id, p.source_entry_id))
        .collect()
}

/// 16 hex digits of SHA-256 over the parts: stable across runs and Rust versions (unlike
/// `DefaultHasher`), and carrying nothing readable of what it hashes.
fn short_hash(parts: &[&str]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p.as_bytes());
        ctx.update(&[0x1f]);
    }
    ctx.finish()
        .as_ref()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `s` when it is a valid FHIR id, else a hash of it.
fn safe_id(s: &str, prefix: &str) -> String {
    if !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        s.to_string()
    } else {
        format!("{prefix}-{}", short_hash(&[s]))
    }
}

fn uri_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// FHIR forbids empty strings: put a field only when it has a value.
fn put(m: &mut Map<String, Value>, key: &str, value: &str) {
    if !value.is_empty() {
        m.insert(key.into(), json!(value));
    }
}

fn non_empty<'a>(s: &'a str, otherwise: &'a str) -> &'a str {
    if s.trim().is_empty() { otherwise } else { s }
}

/// A result value as a number, when it is plainly one ("7.2", "-1", "140").
fn numeric(s: &str) -> Option<f64> {
    let t = s.trim();
    if t.is_empty()
        || !t
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+'))
    {
        return None;
    }
    t.parse::<f64>().ok().filter(|n| n.is_finite())
}

fn is_digits(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit())
}

fn in_range(s: &str, lo: u32, hi: u32) -> bool {
    s.parse::<u32>().is_ok_and(|n| (lo..=hi).contains(&n))
}

/// A FHIR `date` (YYYY, YYYY-MM or YYYY-MM-DD), or `None`.
fn fhir_date(s: &str) -> Option<&str> {
    let s = s.trim();
    let parts: Vec<&str> = s.split('-').collect();
    let ok = match parts.as_slice() {
        [y] => is_digits(y, 4),
        [y, m] => is_digits(y, 4) && is_digits(m, 2) && in_range(m, 1, 12),
        [y, m, d] => {
            is_digits(y, 4)
                && is_digits(m, 2)
                && in_range(m, 1, 12)
                && is_digits(d, 2)
                && in_range(d, 1, 31)
        }
        _ => false,
    };
    ok.then_some(s)
}

fn is_full_date(s: &str) -> bool {
    s.len() == 10 && fhir_date(s).is_some()
}

/// A FHIR `instant`: YYYY-MM-DDThh:mm:ss[.fff](Z|±hh:mm), or `None`.
fn fhir_instant(s: &str) -> Option<&str> {
    let s = s.trim();
    if !s.is_ascii() {
        return None;
    }
    let (date, time) = s.split_once('T')?;
    if !is_full_date(date) {
        return None;
    }
    let clock = if let Some(c) = time.strip_suffix('Z') {
        c
    } else if time.len() > 6 {
        let (c, zone) = time.split_at(time.len() - 6);
        let zb = zone.as_bytes();
        let zone_ok = matches!(zb[0], b'+' | b'-')
            && is_digits(&zone[1..3], 2)
            && zb[3] == b':'
            && is_digits(&zone[4..6], 2);
        if !zone_ok {
            return None;
        }
        c
    } else {
        return None;
    };
    let (hms, frac) = match clock.split_once('.') {
        Some((h, f)) => (h, Some(f)),
        None => (clock, None),
    };
    let hms: Vec<&str> = hms.split(':').collect();
    let ok = matches!(hms.as_slice(), [h, m, sec]
        if is_digits(h, 2) && in_range(h, 0, 23)
            && is_digits(m, 2) && in_range(m, 0, 59)
            && is_digits(sec, 2) && in_range(sec, 0, 60))
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()));
    ok.then_some(s)
}

/// A FHIR `dateTime`: a (partial) date or an instant. A date-time without a zone keeps only its
/// date (FHIR requires a zone with a time); the organisation's exact value stays in its
/// Provenance assertion.
fn fhir_date_time(s: &str) -> Option<String> {
    if let Some(d) = fhir_date(s) {
        return Some(d.to_string());
    }
    if let Some(i) = fhir_instant(s) {
        return Some(i.to_string());
    }
    let (date, _) = s.trim().split_once('T')?;
    fhir_date(date).map(str::to_string)
}

/// Removes the NHS number (plain, spaced or hyphenated) from every string: it belongs only in
/// the Patient's identifier, which is added after this runs.
fn scrub(v: &mut Value, nhs: &str) {
    if nhs.len() != 10 || !nhs.is_ascii() {
        return;
    }
    let spaced = format!("{} {} {}", &nhs[..3], &nhs[3..6], &nhs[6..]);
    let hyphened = format!("{}-{}-{}", &nhs[..3], &nhs[3..6], &nhs[6..]);
    scrub_with(v, &[nhs, &spaced, &hyphened]);
}

fn scrub_with(v: &mut Value, forms: &[&str]) {
    match v {
        Value::String(s) if forms.iter().any(|f| s.contains(f)) => {
            for f in forms {
                *s = s.replace(f, "[NHS number]");
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| scrub_with(x, forms)),
        Value::Object(o) => o.values_mut().for_each(|x| scrub_with(x, forms)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use carerecord_proto::{
        AllergyDetail, CareRecord, ConflictValue, DocumentDetail, EncounterDetail,
        MedicationDetail, Patient, ResultDetail, SourceSectionStatus,
    };

    use super::*;

    const NHS: &str = "9990000018";
    const BASE: &str = "https://broker.example/fhir/";

    fn prov(source: &str, code: &str, name: &str, entry_id: &str) -> Provenance {
        Provenance {
            source_id: source.into(),
            organisation_code: code.into(),
            organisation_name: name.into(),
            source_entry_id: entry_id.into(),
            last_updated: "2026-03-01T10:00:00Z".into(),
            ..Default::default()
        }
    }

    fn gp(entry_id: &str) -> Provenance {
        prov("gp", "H81005", "Riverside Surgery", entry_id)
    }

    fn hospital(entry_id: &str) -> Provenance {
        prov("hospital", "RJ1", "St Thomas' Hospital", entry_id)
    }

    fn entry(code: &str, display: &str, status: &str, provenance: Vec<Provenance>) -> Entry {
        Entry {
            concept: Some(Coding {
                system: SNOMED.into(),
                code: code.into(),
                display: display.into(),
            }),
            summary: display.into(),
            status: status.into(),
            effective: "2020-05-01".into(),
            recorded: "2020-05-02".into(),
            provenance,
            ..Default::default()
        }
    }

    fn source(id: &str, code: &str, name: &str, outcome: SourceOutcome, msg: &str) -> SourceStatus {
        SourceStatus {
            source_id: id.into(),
            organisation_code: code.into(),
            organisation_name: name.into(),
            outcome: outcome as i32,
            message: msg.into(),
            ..Default::default()
        }
    }

    fn part(id: &str, code: &str, state: SourceSectionState, reason: &str) -> SourceSectionStatus {
        SourceSectionStatus {
            source_id: id.into(),
            organisation_code: code.into(),
            state: state as i32,
            entries: u32::from(state == SourceSectionState::Entries),
            reason: reason.into(),
        }
    }

    fn status(
        section: Section,
        state: SectionState,
        parts: Vec<SourceSectionStatus>,
    ) -> SectionStatus {
        SectionStatus {
            section: section as i32,
            state: state as i32,
            sources: parts,
            summary: format!("{}: {}", section.title(), section_state_code(state)),
        }
    }

    fn patient() -> Patient {
        Patient {
            nhs_number: NHS.into(),
            family_name: "Smith".into(),
            given_names: vec!["Jo".into()],
            birth_date: "1970-01-01".into(),
            gender: "female".into(),
            address: "1 High Street, London".into(),
            registered_gp_code: "H81005".into(),
            // A source that uses the NHS number as its Patient id: it must not leak.
            provenance: vec![gp(NHS)],
            restricted: false,
        }
    }

    fn answer(
        record: CareRecord,
        sources: Vec<SourceStatus>,
        statuses: Vec<SectionStatus>,
    ) -> LookupAnswer {
        LookupAnswer {
            request_id: "req-0001".into(),
            record: record.into(),
            sources,
            complete: true,
            cache_age: None,
            warnings: vec![],
            emergency_access: false,
            withheld: false,
            assembled_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000),
            locators: vec![],
            section_statuses: statuses,
        }
    }

    fn options() -> BundleOptions {
        BundleOptions {
            base_url: BASE.into(),
            include_resolved_allergies: true,
            ..Default::default()
        }
    }

    /// A record with every section filled, a conflict, a refuted condition, a "no known
    /// allergy", a resolved allergy, an old medicine, and a mental health trust that timed out.
    fn rich() -> LookupAnswer {
        let mut asthma = entry(
            "195967001",
            "Asthma",
            "active",
            vec![gp("c1"), hospital("c9")],
        );
        asthma.verification_status = VerificationStatus::Confirmed as i32;
        asthma.codings = vec![
            asthma.concept.clone().unwrap_or_default(),
            Coding {
                system: "http://read.info/ctv3".into(),
                code: "H33..".into(),
                display: "Asthma".into(),
            },
        ];
        let mut diabetes = entry(
            "44054006",
            "Type 2 diabetes",
            "refuted",
            vec![hospital("c10")],
        );
        diabetes.verification_status = VerificationStatus::Refuted as i32;
        diabetes.provenance[0].verification_status = VerificationStatus::Refuted as i32;

        let mut penicillin = entry(
            "91936005",
            "Penicillin allergy",
            "active",
            vec![gp("a1"), hospital("a7")],
        );
        penicillin.provenance[0].status = "active".into();
        penicillin.provenance[1].status = "resolved".into();
        penicillin.provenance[1].recorded = "2019-01-01".into();
        penicillin.detail = Some(Detail::Allergy(AllergyDetail {
            criticality: "high".into(),
            reactions: vec!["Anaphylaxis".into()],
            allergy_type: "allergy".into(),
            severity: "severe".into(),
        }));
        penicillin.conflicts = vec![Conflict {
            field: "status".into(),
            values: vec![
                ConflictValue {
                    source_id: "gp".into(),
                    organisation_code: "H81005".into(),
                    organisation_name: "Riverside Surgery".into(),
                    value: "active".into(),
                },
                ConflictValue {
                    source_id: "hospital".into(),
                    organisation_code: "RJ1".into(),
                    organisation_name: "St Thomas' Hospital".into(),
                    value: "resolved".into(),
                },
            ],
            resolution: "active: most recent assertion (H81005, 2020-05-02)".into(),
        }];
        let latex = entry("300916003", "Latex allergy", "resolved", vec![gp("a2")]);
        let mut nka = entry(
            "716186003",
            "No known allergy",
            "active",
            vec![prov("ch", "VM1", "Oak Care Home", "n1")],
        );
        nka.asserts_absence = true;

        let mut amox = entry(
            "27658006",
            "Amoxicillin 500mg capsules",
            "active",
            vec![gp("m1"), gp("m1-issue")],
        );
        amox.detail = Some(Detail::Medication(MedicationDetail {
            dosage: "One three times a day".into(),
            kind: "request".into(),
            current: true,
            latest_issue: "2026-02-20".into(),
            rows: 2,
            intent: "plan".into(),
        }));
        let mut old = entry(
            "322236009",
            "Paracetamol 500mg tablets",
            "stopped",
            vec![hospital("m5")],
        );
        old.effective = "2018-01-01".into();
        old.ended = "2018-02-01".into();
        old.detail = Some(Detail::Medication(MedicationDetail {
            dosage: "Two when needed".into(),
            ..Default::default()
        }));
        old.incomplete = true;
        old.incomplete_reason = "the medicine's reference could not be resolved".into();

        let mut hba1c = entry("1003671000000109", "HbA1c", "final", vec![hospital("r1")]);
        hba1c.detail = Some(Detail::Result(ResultDetail {
            value: "48".into(),
            unit: "mmol/mol".into(),
            reference_range: "20-41".into(),
            interpretation: "H".into(),
            kind: "observation".into(),
        }));
        let mut xray = entry("399208008", "Chest X-ray", "final", vec![hospital("r2")]);
        xray.detail = Some(Detail::Result(ResultDetail {
            value: "No abnormality".into(),
            ..Default::default()
        }));
        let plan = entry("735324008", "Asthma action plan", "active", vec![gp("p1")]);
        let mut letter = entry(
            "373942005",
            "Discharge summary",
            "current",
            vec![hospital("d1")],
        );
        letter.effective = "2026-01-10T09:30:00Z".into();
        letter.detail = Some(Detail::Document(DocumentDetail {
            document_type: "Discharge summary".into(),
            url: "Binary/doc-7f3a".into(),
            content_type: "application/pdf".into(),
            author: "Dr A Jones, St Thomas' Hospital".into(),
        }));
        let mut ae = entry(
            "4525004",
            "Emergency department attendance",
            "finished",
            vec![hospital("e1")],
        );
        ae.effective = "2026-01-09T22:00:00Z".into();
        ae.ended = "2026-01-10T09:00:00Z".into();
        ae.identity_disputed = true;
        ae.provenance[0].identity_disputed = true;
        ae.detail = Some(Detail::Encounter(EncounterDetail {
            encounter_class: "emergency".into(),
            location: "A&E, St Thomas'".into(),
            reason: "Shortness of breath".into(),
        }));
        let mut clinic = entry("185389009", "Asthma clinic", "booked", vec![gp("ap1")]);
        clinic.effective = "2026-07-01T09:15:00+01:00".into();
        clinic.detail = Some(Detail::Appointment(carerecord_proto::AppointmentDetail {
            location: "Riverside Surgery room 2".into(),
            service: "Asthma nurse".into(),
        }));

        let record = CareRecord {
            patient: Some(patient()),
            conditions: vec![asthma, diabetes],
            medications: vec![amox, old],
            allergies: vec![penicillin, latex, nka],
            test_results: vec![hba1c, xray],
            care_plans: vec![plan],
            documents: vec![letter],
            encounters: vec![ae],
            appointments: vec![clinic],
        };
        let sources = vec![
            source("gp", "H81005", "Riverside Surgery", SourceOutcome::Ok, ""),
            source(
                "hospital",
                "RJ1",
                "St Thomas' Hospital",
                SourceOutcome::Ok,
                "",
            ),
            source("ch", "VM1", "Oak Care Home", SourceOutcome::Ok, ""),
            source(
                "mh",
                "RV5",
                "South London and Maudsley",
                SourceOutcome::Timeout,
                &format!("no answer for {NHS} in 2000 ms"),
            ),
        ];
        let statuses = Section::ALL
            .into_iter()
            .map(|s| {
                status(
                    s,
                    SectionState::Partial,
                    vec![
                        part("gp", "H81005", SourceSectionState::Entries, ""),
                        part("hospital", "RJ1", SourceSectionState::Entries, ""),
                        part("ch", "VM1", SourceSectionState::NoneRecorded, ""),
                        part("mh", "RV5", SourceSectionState::Unknown, "timed out"),
                    ],
                )
            })
            .collect();
        let mut a = answer(record, sources, statuses);
        a.complete = false;
        a.warnings = vec![Warning {
            kind: WarningKind::Conflict as i32,
            message: "Organisations disagree about Penicillin allergy".into(),
            source_ids: vec!["gp".into(), "hospital".into()],
        }];
        a
    }

    fn resources<'a>(bundle: &'a Value, rtype: &str) -> Vec<&'a Value> {
        bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["resource"])
            .filter(|r| r["resourceType"] == rtype)
            .collect()
    }

    fn list<'a>(bundle: &'a Value, title: &str) -> &'a Value {
        resources(bundle, "List")
            .into_iter()
            .find(|l| l["title"] == title)
            .unwrap_or_else(|| panic!("no List {title}"))
    }

    fn notes(r: &Value) -> String {
        r["note"]
            .as_array()
            .map(|n| {
                n.iter()
                    .map(|x| x["text"].as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }

    /// Every fullUrl is unique and is `{base}{resourceType}/{id}`; every `reference` anywhere in
    /// the Bundle names a fullUrl or a `Type/id` present in it.
    fn assert_references_resolve(bundle: &Value) {
        let mut present = HashSet::new();
        for e in bundle["entry"].as_array().unwrap() {
            let r = &e["resource"];
            let url = e["fullUrl"].as_str().unwrap();
            let relative = format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            );
            assert_eq!(url, format!("{BASE}{relative}"));
            assert!(present.insert(url.to_string()), "duplicate fullUrl {url}");
            present.insert(relative);
        }
        fn walk(v: &Value, present: &HashSet<String>, seen: &mut usize) {
            match v {
                Value::Object(o) => {
                    if let Some(Value::String(r)) = o.get("reference") {
                        assert!(
                            present.contains(r),
                            "reference {r} does not resolve in the Bundle"
                        );
                        *seen += 1;
                    }
                    o.values().for_each(|x| walk(x, present, seen));
                }
                Value::Array(a) => a.iter().for_each(|x| walk(x, present, seen)),
                _ => {}
            }
        }
        let mut seen = 0;
        walk(bundle, &present, &mut seen);
        assert!(seen > 0, "the Bundle has references to check");
    }

    const CLINICAL: [&str; 8] = [
        "Condition",
        "AllergyIntolerance",
        "MedicationStatement",
        "Observation",
        "CarePlan",
        "DocumentReference",
        "Encounter",
        "Appointment",
    ];

    #[test]
    fn the_bundle_is_a_collection_of_the_request_assembled_at_its_time() {
        let b = structured_record(&rich(), &options());
        assert_eq!(b["resourceType"], "Bundle");
        assert_eq!(b["type"], "collection");
        assert_eq!(b["id"], "req-0001");
        assert_eq!(b["meta"]["lastUpdated"], rfc3339(rich().assembled_at));
        assert_eq!(b["timestamp"], b["meta"]["lastUpdated"]);
        let p = resources(&b, "Patient");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0]["meta"]["profile"][0], UKCORE_PATIENT);
        assert_eq!(
            p[0]["identifier"],
            json!([{ "system": NHS_NUMBER_SYSTEM, "value": NHS }])
        );
        assert_eq!(p[0]["birthDate"], "1970-01-01");
        assert_eq!(
            p[0]["generalPractitioner"][0]["identifier"]["value"],
            "H81005"
        );
        assert_eq!(resources(&b, "List").len(), 8);
        let orgs: Vec<&Value> = resources(&b, "Organization");
        assert_eq!(
            orgs.len(),
            4,
            "GP, hospital, care home and the trust that timed out"
        );
        assert!(
            orgs.iter().any(|o| o["identifier"][0]["value"] == "RV5"
                && o["name"] == "South London and Maudsley")
        );
    }

    #[test]
    fn an_empty_none_recorded_section_is_nil_known() {
        let statuses = vec![status(
            Section::Allergies,
            SectionState::NoneRecorded,
            vec![
                part("gp", "H81005", SourceSectionState::NoneRecorded, ""),
                part("hospital", "RJ1", SourceSectionState::NoneRecorded, ""),
            ],
        )];
        let a = answer(
            CareRecord {
                patient: Some(patient()),
                ..Default::default()
            },
            vec![
                source("gp", "H81005", "Riverside Surgery", SourceOutcome::Ok, ""),
                source(
                    "hospital",
                    "RJ1",
                    "St Thomas' Hospital",
                    SourceOutcome::Ok,
                    "",
                ),
            ],
            statuses,
        );
        let b = structured_record(
            &a,
            &BundleOptions {
                sections: vec![Section::Allergies],
                ..options()
            },
        );
        let l = list(&b, "Allergies");
        assert_eq!(l["emptyReason"]["coding"][0]["code"], "nilknown");
        assert_eq!(l["emptyReason"]["coding"][0]["system"], LIST_EMPTY_REASON);
        // The same answer with something held back from this requester (e.g. another
        // organisation's data under a patient's objection) is never "nil known".
        let held_back = LookupAnswer {
            withheld: true,
            ..a.clone()
        };
        let hb = structured_record(
            &held_back,
            &BundleOptions {
                sections: vec![Section::Allergies],
                ..options()
            },
        );
        assert_eq!(
            list(&hb, "Allergies")["emptyReason"]["coding"][0]["code"],
            "withheld"
        );
        assert!(l.get("entry").is_none());
        assert_eq!(l["code"]["coding"][0]["code"], "886921000000105");
        assert_eq!(l["extension"][0]["url"], EXT_SECTION_STATE);
        assert_eq!(
            l["extension"][0]["extension"][0]["valueCoding"]["code"],
            "none-recorded"
        );
        assert_eq!(resources(&b, "List").len(), 1, "only the section asked");
        assert!(
            resources(&b, "OperationOutcome").is_empty(),
            "nothing to say: no OperationOutcome"
        );
    }

    #[test]
    fn an_unknown_section_after_a_timeout_is_unavailable_names_the_source_and_raises_an_issue() {
        let statuses = vec![status(
            Section::Allergies,
            SectionState::Unknown,
            vec![part(
                "gp",
                "H81005",
                SourceSectionState::Unknown,
                "timed out",
            )],
        )];
        let a = answer(
            CareRecord {
                patient: Some(patient()),
                ..Default::default()
            },
            vec![source(
                "gp",
                "H81005",
                "Riverside Surgery",
                SourceOutcome::Timeout,
                "no answer in 2000 ms",
            )],
            statuses,
        );
        let b = structured_record(&a, &options());
        let l = list(&b, "Allergies");
        assert_eq!(l["emptyReason"]["coding"][0]["code"], "unavailable");
        let n = notes(l);
        assert!(
            n.contains("Riverside Surgery (H81005)") && n.contains("timed out"),
            "{n}"
        );
        let oo = resources(&b, "OperationOutcome");
        assert_eq!(oo.len(), 1);
        let issue = &oo[0]["issue"][0];
        assert_eq!(issue["severity"], "warning");
        assert_eq!(issue["code"], "timeout");
        assert_eq!(issue["details"]["coding"][0]["code"], "TIMEOUT");
        assert!(
            issue["details"]["text"]
                .as_str()
                .unwrap()
                .contains("Riverside Surgery (H81005)")
        );
        assert_eq!(issue["diagnostics"], "no answer in 2000 ms");
        // A section with no status at all is never nil known either.
        assert_eq!(
            list(&b, "Conditions")["emptyReason"]["coding"][0]["code"],
            "unavailable"
        );
    }

    #[test]
    fn none_recorded_is_never_nil_known_when_an_organisation_could_not_answer() {
        // An inconsistent status (NONE_RECORDED while a source is unknown) must not become nilknown.
        let statuses = vec![status(
            Section::Allergies,
            SectionState::NoneRecorded,
            vec![
                part("gp", "H81005", SourceSectionState::NoneRecorded, ""),
                part("mh", "RV5", SourceSectionState::Unknown, "error"),
            ],
        )];
        let a = answer(
            CareRecord {
                patient: Some(patient()),
                ..Default::default()
            },
            vec![],
            statuses,
        );
        let b = structured_record(&a, &options());
        assert_eq!(
            list(&b, "Allergies")["emptyReason"]["coding"][0]["code"],
            "unavailable"
        );
    }

    #[test]
    fn a_partial_section_with_entries_names_the_missing_organisation() {
        let b = structured_record(&rich(), &options());
        let l = list(&b, "Conditions");
        assert!(l.get("emptyReason").is_none());
        assert_eq!(l["entry"].as_array().unwrap().len(), 2);
        let n = notes(l);
        assert!(
            n.contains("South London and Maudsley (RV5) (unknown: timed out)"),
            "{n}"
        );
        assert_eq!(
            l["extension"][0]["extension"][0]["valueCoding"]["code"],
            "partial"
        );
    }

    #[test]
    fn a_conflict_is_carried_as_an_extension_and_a_note_with_each_organisations_value() {
        let b = structured_record(&rich(), &options());
        let allergy = resources(&b, "AllergyIntolerance")
            .into_iter()
            .find(|r| r["code"]["text"] == "Penicillin allergy")
            .unwrap();
        let conflict = allergy["extension"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["url"] == EXT_CONFLICT)
            .unwrap();
        let parts = conflict["extension"].as_array().unwrap();
        assert_eq!(parts[0], json!({ "url": "field", "valueString": "status" }));
        let values: Vec<(&str, &str)> = parts
            .iter()
            .filter(|p| p["url"] == "value")
            .map(|p| {
                let sub = p["extension"].as_array().unwrap();
                let org = sub.iter().find(|s| s["url"] == "organisation").unwrap();
                let val = sub.iter().find(|s| s["url"] == "value").unwrap();
                (
                    org["valueReference"]["reference"].as_str().unwrap(),
                    val["valueString"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            values,
            [
                ("Organization/ods-H81005", "active"),
                ("Organization/ods-RJ1", "resolved")
            ]
        );
        assert!(parts.iter().any(|p| p["url"] == "resolution"
            && p["valueString"] == "active: most recent assertion (H81005, 2020-05-02)"));
        let n = notes(allergy);
        assert!(n.contains("Riverside Surgery (H81005) says active"), "{n}");
        assert!(n.contains("St Thomas' Hospital (RJ1) says resolved"), "{n}");
        assert!(
            allergy["meta"]["tag"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["code"] == "conflict")
        );
        // Who said what, in the Provenance too.
        let prov = resources(&b, "Provenance")
            .into_iter()
            .find(|p| {
                p["target"][0]["reference"]
                    == format!("AllergyIntolerance/{}", allergy["id"].as_str().unwrap())
            })
            .unwrap();
        let agents = prov["agent"].as_array().unwrap();
        assert_eq!(agents.len(), 2);
        let hospital_said = &agents[1]["extension"][0]["extension"];
        assert!(
            hospital_said
                .as_array()
                .unwrap()
                .contains(&json!({ "url": "status", "valueString": "resolved" }))
        );
        // And the response warning is an issue.
        let oo = resources(&b, "OperationOutcome");
        assert!(
            oo[0]["issue"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["details"]["coding"][0]["code"] == "CONFLICT"
                    && i["details"]["coding"][0]["system"] == CS_WARNING_KIND)
        );
    }

    #[test]
    fn a_refuted_condition_is_carried_with_verification_status_refuted() {
        let b = structured_record(&rich(), &options());
        let c = resources(&b, "Condition")
            .into_iter()
            .find(|r| r["code"]["text"] == "Type 2 diabetes")
            .expect("a refuted condition is never dropped");
        assert_eq!(c["verificationStatus"]["coding"][0]["code"], "refuted");
        assert_eq!(c["clinicalStatus"]["coding"][0]["code"], "inactive");
        assert!(notes(c).contains("Refuted"));
        let asthma = resources(&b, "Condition")
            .into_iter()
            .find(|r| r["code"]["text"] == "Asthma")
            .unwrap();
        assert_eq!(
            asthma["verificationStatus"]["coding"][0]["code"],
            "confirmed"
        );
        assert_eq!(
            asthma["code"]["coding"].as_array().unwrap().len(),
            2,
            "every coding carried"
        );
        assert_eq!(asthma["clinicalStatus"]["coding"][0]["code"], "active");
    }

    #[test]
    fn no_known_allergy_stays_an_assertion_distinguishable_from_an_allergy() {
        let b = structured_record(&rich(), &options());
        let nka = resources(&b, "AllergyIntolerance")
            .into_iter()
            .find(|r| r["code"]["coding"][0]["code"] == "716186003")
            .unwrap();
        assert!(
            nka["extension"]
                .as_array()
                .unwrap()
                .contains(&json!({ "url": EXT_ASSERTS_ABSENCE, "valueBoolean": true }))
        );
        assert!(
            nka["meta"]["tag"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["code"] == "asserts-absence")
        );
        assert!(nka.get("criticality").is_none() && nka.get("reaction").is_none());
        let l = list(&b, "Allergies");
        let item = l["entry"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| {
                e["item"]["reference"]
                    == format!("AllergyIntolerance/{}", nka["id"].as_str().unwrap())
            })
            .unwrap();
        assert!(
            item["flag"]["text"]
                .as_str()
                .unwrap()
                .contains("assertion of absence")
        );
        assert!(notes(l).contains("Oak Care Home (VM1)"));
    }

    #[test]
    fn every_clinical_resource_has_a_source_and_a_provenance_targeting_it() {
        let b = structured_record(&rich(), &options());
        let provs = resources(&b, "Provenance");
        let mut count = 0;
        for t in CLINICAL {
            for r in resources(&b, t) {
                count += 1;
                let source = r["meta"]["source"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{t} without meta.source"));
                assert!(
                    source.starts_with(&format!("{BASE}Organization/")),
                    "{source}"
                );
                let target = format!("{t}/{}", r["id"].as_str().unwrap());
                let p: Vec<_> = provs
                    .iter()
                    .filter(|p| p["target"][0]["reference"] == target)
                    .collect();
                assert_eq!(p.len(), 1, "one Provenance for {target}");
                assert_eq!(p[0]["recorded"], "2026-03-01T10:00:00Z");
                for a in p[0]["agent"].as_array().unwrap() {
                    assert_eq!(a["type"]["coding"][0]["code"], "author");
                    assert!(
                        a["who"]["reference"]
                            .as_str()
                            .unwrap()
                            .starts_with("Organization/")
                    );
                }
            }
        }
        assert_eq!(count, 13, "every entry of every section became a resource");
        // Identity disputed: said on the resource and on its Provenance.
        let enc = resources(&b, "Encounter")[0];
        assert!(
            enc["extension"]
                .as_array()
                .unwrap()
                .contains(&json!({ "url": EXT_IDENTITY_DISPUTED, "valueBoolean": true }))
        );
        assert!(
            enc["meta"]["tag"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["code"] == "identity-disputed")
        );
        assert!(
            enc["text"]["div"]
                .as_str()
                .unwrap()
                .contains("check it belongs to this person")
        );
    }

    #[test]
    fn full_urls_are_unique_and_every_reference_resolves_within_the_bundle() {
        let b = structured_record(&rich(), &options());
        assert_references_resolve(&b);
        // The same entries twice (same provenance) still get distinct ids.
        let mut a = rich();
        let dup = a.record.conditions[0].clone();
        a.record.conditions.push(dup);
        assert_references_resolve(&structured_record(&a, &options()));
    }

    #[test]
    fn ids_are_stable_across_calls() {
        let one = structured_record(&rich(), &options());
        let two = structured_record(&rich(), &options());
        assert_eq!(one, two);
    }

    #[test]
    fn resolved_allergies_are_left_out_when_not_asked_for_and_the_list_says_so() {
        let opts = BundleOptions {
            include_resolved_allergies: false,
            ..options()
        };
        let b = structured_record(&rich(), &opts);
        let names: Vec<&str> = resources(&b, "AllergyIntolerance")
            .iter()
            .map(|r| r["code"]["text"].as_str().unwrap())
            .collect();
        assert!(!names.contains(&"Latex allergy"), "{names:?}");
        // Penicillin's status is disputed (one organisation says resolved): it stays.
        assert!(names.contains(&"Penicillin allergy"));
        let n = notes(list(&b, "Allergies"));
        assert!(
            n.contains("includeResolvedAllergies=false") && n.contains("1 left out"),
            "{n}"
        );
        let with = structured_record(&rich(), &options());
        assert_eq!(resources(&with, "AllergyIntolerance").len(), 3);
        assert!(!notes(list(&with, "Allergies")).contains("includeResolvedAllergies"));
    }

    #[test]
    fn medicines_before_the_search_date_are_left_out_and_current_ones_kept() {
        let opts = BundleOptions {
            medications_from: Some("2020-01-01".into()),
            ..options()
        };
        let b = structured_record(&rich(), &opts);
        let meds = resources(&b, "MedicationStatement");
        assert_eq!(meds.len(), 1);
        assert_eq!(
            meds[0]["medicationCodeableConcept"]["text"],
            "Amoxicillin 500mg capsules"
        );
        assert_eq!(meds[0]["status"], "active");
        assert_eq!(meds[0]["dosage"][0]["text"], "One three times a day");
        assert!(
            meds[0]["extension"]
                .as_array()
                .unwrap()
                .contains(&json!({ "url": EXT_LATEST_ISSUE, "valueDateTime": "2026-02-20" }))
        );
        let n = notes(list(&b, "Medications"));
        assert!(
            n.contains("before 2020-01-01") && n.contains("1 left out"),
            "{n}"
        );

        let all = structured_record(&rich(), &options());
        let old = resources(&all, "MedicationStatement")
            .into_iter()
            .find(|m| m["status"] == "stopped")
            .unwrap();
        assert_eq!(
            old["effectivePeriod"],
            json!({ "start": "2018-01-01", "end": "2018-02-01" })
        );
        assert!(
            old["extension"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["url"] == EXT_INCOMPLETE)
        );
        assert!(notes(old).contains("could not be resolved"));
        // A partial date in the search year is not "before" it.
        assert!(!date_before("2020", "2020-03-01"));
        assert!(date_before("2019-12", "2020-01-01"));
    }

    #[test]
    fn the_document_attachment_url_is_passed_through() {
        let b = structured_record(&rich(), &options());
        let d = resources(&b, "DocumentReference")[0];
        assert_eq!(d["status"], "current");
        assert_eq!(d["content"][0]["attachment"]["url"], "Binary/doc-7f3a");
        assert_eq!(
            d["content"][0]["attachment"]["contentType"],
            "application/pdf"
        );
        assert_eq!(d["date"], "2026-01-10T09:30:00Z");
        assert_eq!(d["author"][0]["display"], "Dr A Jones, St Thomas' Hospital");
        assert_eq!(d["type"]["text"], "Discharge summary");
    }

    #[test]
    fn results_encounters_and_appointments_have_their_shapes() {
        let b = structured_record(&rich(), &options());
        let obs = resources(&b, "Observation");
        let hba1c = obs.iter().find(|o| o["code"]["text"] == "HbA1c").unwrap();
        assert_eq!(
            hba1c["valueQuantity"],
            json!({ "value": 48.0, "unit": "mmol/mol" })
        );
        assert_eq!(hba1c["status"], "final");
        assert_eq!(hba1c["referenceRange"][0]["text"], "20-41");
        assert_eq!(hba1c["interpretation"][0]["coding"][0]["code"], "H");
        let xray = obs
            .iter()
            .find(|o| o["code"]["text"] == "Chest X-ray")
            .unwrap();
        assert_eq!(xray["valueString"], "No abnormality");
        let enc = resources(&b, "Encounter")[0];
        assert_eq!(enc["class"]["code"], "EMER");
        assert_eq!(enc["period"]["end"], "2026-01-10T09:00:00Z");
        assert_eq!(enc["location"][0]["location"]["display"], "A&E, St Thomas'");
        assert_eq!(enc["reasonCode"][0]["text"], "Shortness of breath");
        let appt = resources(&b, "Appointment")[0];
        assert_eq!(appt["status"], "booked");
        assert_eq!(appt["start"], "2026-07-01T09:15:00+01:00");
        assert_eq!(appt["serviceType"][0]["text"], "Asthma nurse");
        assert_eq!(
            appt["participant"][0]["actor"]["reference"]
                .as_str()
                .unwrap()
                .split('/')
                .next(),
            Some("Patient")
        );
        let plan = resources(&b, "CarePlan")[0];
        assert_eq!(
            (plan["status"].as_str(), plan["intent"].as_str()),
            (Some("active"), Some("plan"))
        );
    }

    #[test]
    fn the_nhs_number_appears_only_in_the_patient_identifier() {
        let mut a = rich();
        a.warnings.push(Warning {
            kind: WarningKind::DemographicsMismatch as i32,
            message: format!(
                "date of birth differs for {} {} {}",
                &NHS[..3],
                &NHS[3..6],
                &NHS[6..]
            ),
            source_ids: vec!["hospital".into()],
        });
        let b = structured_record(&a, &options());
        let text = serde_json::to_string(&b).unwrap();
        assert_eq!(text.matches(NHS).count(), 1, "{text}");
        assert!(!text.contains("999 000 0018"));
        let mut p = resources(&b, "Patient")[0].clone();
        p.as_object_mut().unwrap().remove("identifier");
        assert!(!serde_json::to_string(&p).unwrap().contains(NHS));
    }

    #[test]
    fn withheld_emergency_and_wrong_patient_are_said_in_the_outcome() {
        let mut a = rich();
        a.withheld = true;
        a.emergency_access = true;
        a.sources.push(source(
            "bad",
            "RXX",
            "Elsewhere Trust",
            SourceOutcome::WrongPatient,
            "Patient mismatch",
        ));
        let b = structured_record(&a, &options());
        let issues = resources(&b, "OperationOutcome")[0]["issue"]
            .as_array()
            .unwrap()
            .clone();
        let wrong = issues
            .iter()
            .find(|i| i["details"]["coding"][0]["code"] == "WRONG_PATIENT")
            .unwrap();
        assert_eq!(wrong["severity"], "error");
        assert!(
            issues
                .iter()
                .any(|i| i["code"] == "suppressed" && i["severity"] == "information")
        );
        assert!(
            issues
                .iter()
                .any(|i| i["details"]["text"].as_str().unwrap().contains("emergency"))
        );
        assert!(issues.iter().any(|i| i["code"] == "timeout"));
    }

    #[test]
    fn dates_become_fhir_types_only_when_they_fit() {
        for (raw, date_time, instant) in [
            ("2019", Some("2019"), None),
            ("2019-03", Some("2019-03"), None),
            ("2019-03-14", Some("2019-03-14"), None),
            (
                "2019-03-14T10:00:00Z",
                Some("2019-03-14T10:00:00Z"),
                Some("2019-03-14T10:00:00Z"),
            ),
            (
                "2019-03-14T10:00:00.250+01:00",
                Some("2019-03-14T10:00:00.250+01:00"),
                Some("2019-03-14T10:00:00.250+01:00"),
            ),
            // A time without a zone is not a FHIR dateTime: only its date is kept.
            ("2019-03-14T10:00:00", Some("2019-03-14"), None),
            ("2019-13-01", None, None),
            ("14/03/2019", None, None),
            ("", None, None),
            ("2019-03-14T10:00:00\u{e9}", Some("2019-03-14"), None),
        ] {
            assert_eq!(fhir_date_time(raw).as_deref(), date_time, "{raw}");
            assert_eq!(fhir_instant(raw), instant, "{raw}");
        }
    }

    /// Writes a sample Bundle for external validation when `CARERECORD_WRITE_FHIR_SAMPLE` is set.
    #[test]
    fn write_a_sample_bundle_for_external_validation() {
        if std::env::var_os("CARERECORD_WRITE_FHIR_SAMPLE").is_none() {
            return;
        }
        let mut a = rich();
        a.withheld = true;
        a.emergency_access = true;
        a.cache_age = Some(Duration::from_secs(3));
        let b = structured_record(
            &a,
            &BundleOptions {
                include_resolved_allergies: false,
                medications_from: Some("2020-01-01".into()),
                ..options()
            },
        );
        let path = std::env::temp_dir().join("carerecord-fhir-face-sample.json");
        std::fs::write(&path, serde_json::to_string_pretty(&b).unwrap()).unwrap();
        let cap = crate::fhir_api::capability::capability_statement(BASE, "0.0.0-test");
        let path = std::env::temp_dir().join("carerecord-fhir-face-capability.json");
        std::fs::write(&path, serde_json::to_string_pretty(&cap).unwrap()).unwrap();
    }
}
