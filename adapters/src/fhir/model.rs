//! The parts of FHIR R4 the adapter reads, as lenient serde structs.
//!
//! One `Resource` struct holds the union of the fields of every resource type the adapter maps
//! (and of `Bundle`), so a resource is read in one pass without first looking at its
//! `resourceType`, which JSON does not promise to put first. Where resource types disagree on a
//! field's shape (`type`, `category`), the field accepts either shape ([`Codes`]); elsewhere a
//! shape that does not fit is simply [`Field::Invalid`], which matters only if the mapper for that
//! resource type reads the field. Fields the adapter does not read are skipped unparsed.

use serde::Deserialize;
use serde::de::{MapAccess, SeqAccess};

use super::json::{Decimal, Field, FromJson, List, lenient_object};

/// A FHIR resource of any type the adapter reads, a `Bundle` included.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Resource {
    pub resource_type: Field<String>,
    pub id: Field<String>,
    pub meta: Field<Meta>,
    pub contained: List<Resource>,

    // Bundle
    pub link: List<Link>,
    pub entry: List<BundleEntry>,

    // Patient
    pub identifier: List<Identifier>,
    pub active: Field<bool>,
    pub name: List<HumanName>,
    pub gender: Field<String>,
    pub birth_date: Field<String>,
    pub address: List<Address>,
    pub general_practitioner: List<Reference>,

    // Shared by the clinical resources
    /// Whose record the resource is in (`subject` of most types; `patient` of
    /// AllergyIntolerance): checked against the matched Patient before anything is mapped.
    pub subject: Field<Reference>,
    pub patient: Field<Reference>,
    pub status: Field<String>,
    pub clinical_status: Field<CodeableConcept>,
    pub verification_status: Field<CodeableConcept>,
    pub code: Field<CodeableConcept>,
    pub category: Field<Codes>,
    #[serde(rename = "type")]
    pub type_: Field<Codes>,
    pub title: Field<String>,
    pub description: Field<String>,
    pub period: Field<Period>,
    pub date: Field<String>,
    pub created: Field<String>,
    pub issued: Field<String>,

    // Condition, AllergyIntolerance
    pub onset_date_time: Field<String>,
    pub onset_period: Field<Period>,
    pub abatement_date_time: Field<String>,
    pub abatement_period: Field<Period>,
    pub recorded_date: Field<String>,
    pub criticality: Field<String>,
    pub reaction: List<Reaction>,

    // MedicationStatement, MedicationRequest
    pub medication_codeable_concept: Field<CodeableConcept>,
    pub medication_reference: Field<Reference>,
    pub effective_date_time: Field<String>,
    pub effective_period: Field<Period>,
    pub effective_instant: Field<String>,
    pub date_asserted: Field<String>,
    pub authored_on: Field<String>,
    pub intent: Field<String>,
    pub dosage: List<Dosage>,
    pub dosage_instruction: List<Dosage>,

    // Observation, DiagnosticReport
    pub value_quantity: Field<Quantity>,
    pub value_string: Field<String>,
    pub value_codeable_concept: Field<CodeableConcept>,
    pub value_boolean: Field<bool>,
    pub value_integer: Field<Decimal>,
    pub reference_range: List<ReferenceRange>,
    pub interpretation: List<CodeableConcept>,
    pub component: List<Component>,
    pub conclusion: Field<String>,

    // DocumentReference, Composition
    pub content: List<DocumentContent>,
    pub author: List<Reference>,
    pub custodian: Field<Reference>,
    pub context: Field<DocumentContext>,

    // Encounter
    pub class: Field<Coding>,
    pub reason_code: List<CodeableConcept>,
    pub location: List<EncounterLocation>,

    // Appointment
    pub start: Field<String>,
    pub end: Field<String>,
    pub service_type: List<CodeableConcept>,
    pub appointment_type: Field<CodeableConcept>,
    pub participant: List<Participant>,

    // OperationOutcome
    pub issue: List<Issue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Meta {
    pub last_updated: Field<String>,
    pub security: List<Coding>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Coding {
    pub system: Field<String>,
    pub code: Field<String>,
    pub display: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct CodeableConcept {
    pub coding: List<Coding>,
    pub text: Field<String>,
}

/// A field that is a code in one resource type and a CodeableConcept (or a list of either) in
/// another: `AllergyIntolerance.type` is a code, `DocumentReference.type` a CodeableConcept,
/// `Encounter.type` a list of them.
#[derive(Debug, Default)]
pub(crate) struct Codes(pub Vec<Field<CodeOrConcept>>);

#[derive(Debug)]
pub(crate) enum CodeOrConcept {
    Code(String),
    Concept(CodeableConcept),
}

impl FromJson for CodeOrConcept {
    fn from_str(s: &str) -> Field<Self> {
        Field::Valid(CodeOrConcept::Code(s.to_owned()))
    }
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Field<Self>, A::Error> {
        Ok(match CodeableConcept::from_map(map)? {
            Field::Valid(c) => Field::Valid(CodeOrConcept::Concept(c)),
            Field::Absent => Field::Absent,
            Field::Invalid => Field::Invalid,
        })
    }
}

impl FromJson for Codes {
    fn from_str(s: &str) -> Field<Self> {
        Field::Valid(Codes(vec![CodeOrConcept::from_str(s)]))
    }
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Field<Self>, A::Error> {
        Ok(Field::Valid(Codes(vec![CodeOrConcept::from_map(map)?])))
    }
    fn from_seq<'de, A: SeqAccess<'de>>(seq: A) -> Result<Field<Self>, A::Error> {
        Ok(match Vec::<Field<CodeOrConcept>>::from_seq(seq)? {
            Field::Valid(items) => Field::Valid(Codes(items)),
            Field::Absent => Field::Absent,
            Field::Invalid => Field::Invalid,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Period {
    pub start: Field<String>,
    pub end: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Reference {
    pub reference: Field<String>,
    /// The target's resource type, when the reference states it (`urn:uuid:` references
    /// carry no type in their text).
    #[serde(rename = "type")]
    pub type_: Field<String>,
    pub display: Field<String>,
    pub identifier: Field<Identifier>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Identifier {
    pub system: Field<String>,
    pub value: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct HumanName {
    #[serde(rename = "use")]
    pub use_: Field<String>,
    pub family: Field<String>,
    pub given: List<String>,
    pub text: Field<String>,
    pub period: Field<Period>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Address {
    #[serde(rename = "use")]
    pub use_: Field<String>,
    pub line: List<String>,
    pub city: Field<String>,
    pub district: Field<String>,
    pub postal_code: Field<String>,
    pub text: Field<String>,
    pub period: Field<Period>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Reaction {
    pub manifestation: List<CodeableConcept>,
    pub severity: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Dosage {
    pub text: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Quantity {
    pub value: Field<Decimal>,
    pub comparator: Field<String>,
    pub unit: Field<String>,
    pub code: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct ReferenceRange {
    pub low: Field<Quantity>,
    pub high: Field<Quantity>,
    pub text: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Component {
    pub code: Field<CodeableConcept>,
    pub value_quantity: Field<Quantity>,
    pub value_string: Field<String>,
    pub value_codeable_concept: Field<CodeableConcept>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct DocumentContent {
    pub attachment: Field<Attachment>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Attachment {
    pub url: Field<String>,
    pub content_type: Field<String>,
    pub title: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct DocumentContext {
    pub period: Field<Period>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct EncounterLocation {
    pub location: Field<Reference>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Participant {
    pub actor: Field<Reference>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Issue {
    pub severity: Field<String>,
    pub code: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Link {
    pub relation: Field<String>,
    pub url: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct BundleEntry {
    pub full_url: Field<String>,
    pub resource: Field<Box<Resource>>,
    pub search: Field<EntrySearch>,
    pub response: Field<EntryResponse>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct EntrySearch {
    pub mode: Field<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct EntryResponse {
    pub status: Field<String>,
}

lenient_object!(
    Resource,
    Meta,
    Coding,
    CodeableConcept,
    Period,
    Reference,
    Identifier,
    HumanName,
    Address,
    Reaction,
    Dosage,
    Quantity,
    ReferenceRange,
    Component,
    DocumentContent,
    Attachment,
    DocumentContext,
    EncounterLocation,
    Participant,
    Issue,
    Link,
    BundleEntry,
    EntrySearch,
    EntryResponse,
);

/// Parses a response body as one resource. `Err` only for JSON syntax errors (or a body that is
/// not a JSON object); a message safe to show (no body content).
pub(crate) fn parse_resource(body: &[u8]) -> Result<Resource, &'static str> {
    match serde_json::from_slice::<Field<Resource>>(body) {
        Ok(Field::Valid(resource)) => Ok(resource),
        Ok(_) => Err("body is not a JSON object"),
        Err(e) if e.is_eof() => Err("body is truncated JSON"),
        Err(_) => Err("body is not valid JSON"),
    }
}
