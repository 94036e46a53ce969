//! The CapabilityStatement of the FHIR face: exactly what it serves, no more. `metadata`,
//! `Patient/$getstructuredrecord` (GP Connect Access Record: Structured, over FHIR R4, plus a
//! carerecord `includeSection` parameter) and `Binary` read (documents fetched through the
//! broker). A client that reads this must not expect search, write or history.

use serde_json::{Value, json};

/// GP Connect's canonical for the operation. Its definition is STU3; this face answers the same
/// parameters with R4 resources, which the operation's documentation says.
pub const GET_STRUCTURED_RECORD: &str =
    "https://fhir.nhs.uk/STU3/OperationDefinition/GPConnect-GetStructuredRecord-Operation-1";

/// The face's CapabilityStatement. `base_url` is the face's absolute base (ending in '/');
/// `software_version` the broker's version.
pub fn capability_statement(base_url: &str, software_version: &str) -> Value {
    let sections = carerecord_proto::Section::ALL
        .iter()
        .map(|s| s.short_name().replace('_', "-"))
        .collect::<Vec<_>>()
        .join(", ");
    json!({
        "resourceType": "CapabilityStatement",
        "id": "carerecord-fhir-face",
        "name": "CarerecordFhirFace",
        "title": "carerecord FHIR R4 face",
        "status": "active",
        "date": "2026-01-01",
        "publisher": "carerecord",
        "description": "A federated care record: each lookup asks every source organisation and \
            merges what answered. Partial answers are normal: the Bundle's OperationOutcome and \
            each List say which organisations did not answer.",
        "kind": "instance",
        "software": { "name": "carerecord", "version": non_empty(software_version) },
        "implementation": {
            "description": "carerecord broker FHIR face",
            "url": base_url
        },
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json"],
        "rest": [{
            "mode": "server",
            "documentation": "Read-only. GET metadata returns this statement; every other call is \
                attributed to an end user and audited.",
            "security": {
                "cors": false,
                "description": "Bearer JWT signed by the calling system, carrying the end user \
                    (user id, role, organisation, purpose) for access control and audit, as GP \
                    Connect does; and a client certificate (mTLS) identifying the calling system."
            },
            "resource": [
                {
                    "type": "Patient",
                    "documentation": "Only the $getstructuredrecord operation; no read or search.",
                    "operation": [{
                        "name": "getstructuredrecord",
                        "definition": GET_STRUCTURED_RECORD,
                        "documentation": format!(
                            "POST Patient/$getstructuredrecord with a Parameters resource: \
                             patientNHSNumber (Identifier, system https://fhir.nhs.uk/Id/nhs-number, \
                             required); includeAllergies with part includeResolvedAllergies \
                             (boolean); includeMedication with part medicationSearchFromDate \
                             (date, YYYY-MM-DD); and carerecord's own includeSection (code, \
                             repeatable: {sections}; none means all, and any GP Connect include* \
                             names its section). Returns a collection Bundle: Patient, one List \
                             per section, the section resources, Organization and Provenance for \
                             each, and an OperationOutcome naming sources that did not answer \
                             fully. Answers with FHIR R4 resources although the definition is \
                             GP Connect's STU3 one."
                        )
                    }]
                },
                {
                    "type": "Binary",
                    "documentation": "Documents named by DocumentReference.content.attachment.url \
                        in a structured record, fetched from the source through the broker.",
                    "interaction": [{ "code": "read" }]
                }
            ]
        }],
    })
}

fn non_empty(s: &str) -> &str {
    if s.is_empty() { "unknown" } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_statement_names_exactly_the_operation_and_binary_read() {
        let c = capability_statement("https://broker.example/fhir/", "1.2.3");
        assert_eq!(c["resourceType"], "CapabilityStatement");
        assert_eq!(c["status"], "active");
        assert_eq!(c["kind"], "instance");
        assert_eq!(c["fhirVersion"], "4.0.1");
        assert_eq!(c["implementation"]["url"], "https://broker.example/fhir/");
        assert_eq!(c["software"]["version"], "1.2.3");
        assert!(c["format"].as_array().unwrap().contains(&json!("json")));

        let rest = &c["rest"][0];
        assert_eq!(rest["mode"], "server");
        let security = rest["security"]["description"].as_str().unwrap();
        assert!(security.contains("Bearer JWT") && security.contains("mTLS"));
        let resources = rest["resource"].as_array().unwrap();
        let types: Vec<&str> = resources
            .iter()
            .map(|r| r["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["Patient", "Binary"]);

        let patient = &resources[0];
        assert!(
            patient.get("interaction").is_none(),
            "no Patient read or search"
        );
        let op = &patient["operation"][0];
        assert_eq!(op["name"], "getstructuredrecord");
        assert_eq!(op["definition"], GET_STRUCTURED_RECORD);
        let doc = op["documentation"].as_str().unwrap();
        for p in [
            "patientNHSNumber",
            "includeResolvedAllergies",
            "medicationSearchFromDate",
            "includeSection",
            "test-results",
        ] {
            assert!(doc.contains(p), "operation documentation names {p}");
        }
        assert_eq!(resources[1]["interaction"], json!([{ "code": "read" }]));
    }
}
