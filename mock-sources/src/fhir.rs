//! FHIR R4 JSON shapes shared by every response: codings, references, Bundles, OperationOutcome
//! and the CapabilityStatement.
//!
//! Kept apart from `record` (which decides *what* an organisation knows) so that the
//! wire shapes the broker parses, and that the FHIR validator checks, live in one place.

use serde_json::{Value, json};

use crate::codes::Concept;
use crate::population::Organisation;

pub const FHIR_JSON: &str = "application/fhir+json";
pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const UK_CORE: &str = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-";

/// The resource types an organisation serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceType {
    Patient,
    Condition,
    AllergyIntolerance,
    MedicationStatement,
    MedicationRequest,
    Observation,
    DiagnosticReport,
    CarePlan,
    DocumentReference,
    Encounter,
    Appointment,
    /// Not in the patient compartment: read by id (`Medication/{id}`), contained in a
    /// MedicationRequest, or `_include`d with one. Never searched.
    Medication,
}

impl ResourceType {
    /// The searchable clinical types (everything but Patient), in `$everything` order.
    pub const CLINICAL: [ResourceType; 10] = [
        ResourceType::Condition,
        ResourceType::AllergyIntolerance,
        ResourceType::MedicationStatement,
        ResourceType::MedicationRequest,
        ResourceType::Observation,
        ResourceType::DiagnosticReport,
        ResourceType::CarePlan,
        ResourceType::DocumentReference,
        ResourceType::Encounter,
        ResourceType::Appointment,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResourceType::Patient => "Patient",
            ResourceType::Condition => "Condition",
            ResourceType::AllergyIntolerance => "AllergyIntolerance",
            ResourceType::MedicationStatement => "MedicationStatement",
            ResourceType::MedicationRequest => "MedicationRequest",
            ResourceType::Observation => "Observation",
            ResourceType::DiagnosticReport => "DiagnosticReport",
            ResourceType::CarePlan => "CarePlan",
            ResourceType::DocumentReference => "DocumentReference",
            ResourceType::Encounter => "Encounter",
            ResourceType::Appointment => "Appointment",
            ResourceType::Medication => "Medication",
        }
    }

    pub fn parse(s: &str) -> Option<ResourceType> {
        [ResourceType::Patient, ResourceType::Medication]
            .into_iter()
            .chain(ResourceType::CLINICAL)
            .find(|t| t.as_str() == s)
    }

    /// Short tag used inside resource ids.
    pub fn abbreviation(self) -> &'static str {
        match self {
            ResourceType::Patient => "pat",
            ResourceType::Condition => "cond",
            ResourceType::AllergyIntolerance => "alg",
            ResourceType::MedicationStatement => "mst",
            ResourceType::MedicationRequest => "mrq",
            ResourceType::Observation => "obs",
            ResourceType::DiagnosticReport => "dr",
            ResourceType::CarePlan => "cp",
            ResourceType::DocumentReference => "doc",
            ResourceType::Encounter => "enc",
            ResourceType::Appointment => "appt",
            ResourceType::Medication => "med",
        }
    }

    /// The search parameter naming the patient (`subject` is accepted too where FHIR has it).
    pub fn has_subject(self) -> bool {
        !matches!(
            self,
            ResourceType::Patient
                | ResourceType::AllergyIntolerance
                | ResourceType::Appointment
                | ResourceType::Medication
        )
    }
}

/// `meta` with the UK Core profile for the type.
pub fn meta(rt: ResourceType, last_updated: &str) -> Value {
    json!({
        "lastUpdated": last_updated,
        "profile": [format!("{UK_CORE}{}", rt.as_str())],
    })
}

pub fn coding(system: &str, c: Concept) -> Value {
    json!({ "system": system, "code": c.code, "display": c.display })
}

pub fn concept(system: &str, c: Concept) -> Value {
    json!({ "coding": [coding(system, c)], "text": c.display })
}

/// A CodeableConcept from a HL7 terminology code system.
pub fn hl7(system_tail: &str, code: &str, display: &str) -> Value {
    json!({
        "coding": [{
            "system": format!("http://terminology.hl7.org/CodeSystem/{system_tail}"),
            "code": code,
            "display": display,
        }]
    })
}

pub fn org_reference(org: &Organisation) -> Value {
    json!({
        "identifier": { "system": ODS_SYSTEM, "value": org.code },
        "display": org.name,
    })
}

pub fn reference(rt: ResourceType, id: &str) -> Value {
    json!({ "reference": format!("{}/{id}", rt.as_str()) })
}

/// One search result entry.
pub fn entry(base_url: &str, resource: Value) -> Value {
    let full_url = format!(
        "{base_url}/{}/{}",
        resource["resourceType"].as_str().unwrap_or(""),
        resource["id"].as_str().unwrap_or("")
    );
    json!({ "fullUrl": full_url, "resource": resource, "search": { "mode": "match" } })
}

/// A resource `_include`d with the matches (or referenced by them, in `$everything`).
pub fn include_entry(base_url: &str, resource: Value) -> Value {
    let mut e = entry(base_url, resource);
    e["search"]["mode"] = json!("include");
    e
}

/// A `searchset` Bundle page.
pub fn searchset(
    id: &str,
    last_updated: &str,
    total: usize,
    self_url: &str,
    next_url: Option<&str>,
    entries: Vec<Value>,
) -> Value {
    let mut links = vec![json!({ "relation": "self", "url": self_url })];
    if let Some(next) = next_url {
        links.push(json!({ "relation": "next", "url": next }));
    }
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": id,
        "meta": { "lastUpdated": last_updated },
        "type": "searchset",
        "total": total,
        "link": links,
    });
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    bundle
}

/// An OperationOutcome with one issue. `code` is a FHIR issue type (`not-found`, `invalid`, ...).
pub fn operation_outcome(severity: &str, code: &str, diagnostics: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{ "severity": severity, "code": code, "diagnostics": diagnostics }],
    })
}

/// A stable Bundle id derived from what the Bundle answers (a UUID-shaped hex string).
pub fn bundle_id(key: &str) -> String {
    let h1 = crate::prng::derive(&key.bytes().map(u64::from).collect::<Vec<_>>());
    let h2 = crate::prng::derive(&[h1, key.len() as u64]);
    let hex = format!("{h1:016x}{h2:016x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The CapabilityStatement for one organisation's endpoint.
pub fn capability_statement(org: &Organisation, base_url: &str, date: &str) -> Value {
    let clinical: Vec<Value> = ResourceType::CLINICAL
        .iter()
        .map(|t| {
            // R4 has no element for chains in a CapabilityStatement; the parameter's
            // documentation says which chain is supported, for clients and operators.
            let mut params = vec![json!({
                "name": "patient",
                "type": "reference",
                "documentation": format!(
                    "Patient id or reference; chained: patient.identifier={NHS_NUMBER_SYSTEM}|{{nhs number}}"
                ),
            })];
            if t.has_subject() {
                params.push(json!({
                    "name": "subject",
                    "type": "reference",
                    "documentation": format!(
                        "Patient reference; chained: subject.identifier={NHS_NUMBER_SYSTEM}|{{nhs number}}"
                    ),
                }));
            }
            if *t == ResourceType::Appointment {
                params.push(json!({ "name": "date", "type": "date" }));
            }
            params.push(json!({ "name": "_count", "type": "number" }));
            let mut r = json!({
                "type": t.as_str(),
                "profile": format!("{UK_CORE}{}", t.as_str()),
                "interaction": [{ "code": "read" }, { "code": "search-type" }],
                "searchParam": params,
            });
            if *t == ResourceType::MedicationRequest {
                r["searchInclude"] = json!(["MedicationRequest:medication"]);
            }
            r
        })
        .collect();
    let mut resources = vec![json!({
        "type": "Patient",
        "profile": format!("{UK_CORE}Patient"),
        "interaction": [{ "code": "read" }, { "code": "search-type" }],
        "searchParam": [{
            "name": "identifier",
            "type": "token",
            "documentation": format!("{NHS_NUMBER_SYSTEM}|{{nhs number}}"),
        }],
        "operation": [{
            "name": "everything",
            "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
        }],
    })];
    resources.extend(clinical);
    resources.push(json!({
        "type": "Medication",
        "profile": format!("{UK_CORE}Medication"),
        "interaction": [{ "code": "read" }],
    }));
    json!({
        "resourceType": "CapabilityStatement",
        "id": format!("{}-capabilities", org.code.to_ascii_lowercase()),
        "status": "active",
        "date": date,
        "publisher": org.name,
        "kind": "instance",
        "software": { "name": "carerecord mock-sources", "version": env!("CARGO_PKG_VERSION") },
        "implementation": {
            "description": format!("{} ({}), synthetic data", org.name, org.code),
            "url": base_url,
        },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "resource": resources,
            "interaction": [{ "code": "batch" }],
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_types_round_trip_by_name() {
        for t in [ResourceType::Patient, ResourceType::Medication]
            .into_iter()
            .chain(ResourceType::CLINICAL)
        {
            assert_eq!(ResourceType::parse(t.as_str()), Some(t));
        }
        assert_eq!(ResourceType::parse("Binary"), None);
        assert_eq!(
            ResourceType::parse("condition"),
            None,
            "FHIR type names are case-sensitive"
        );
    }

    #[test]
    fn bundle_ids_are_stable_and_uuid_shaped() {
        let a = bundle_id("Condition?patient=x");
        assert_eq!(a, bundle_id("Condition?patient=x"));
        assert_ne!(a, bundle_id("Condition?patient=y"));
        assert_eq!(a.len(), 36);
    }

    #[test]
    fn empty_searchset_has_total_zero_and_no_entry_array() {
        let b = searchset(
            "id",
            "2026-01-01T00:00:00Z",
            0,
            "http://x/fhir/Condition",
            None,
            vec![],
        );
        assert_eq!(b["total"], 0);
        assert!(b.get("entry").is_none());
        assert_eq!(b["link"].as_array().map(Vec::len), Some(1));
    }
}
