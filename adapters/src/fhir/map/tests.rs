//! Mapping tests. Resource shapes follow the UK Core examples (NHSDigital/FHIR-R4-UKCORE-STAGING-MAIN
//! `examples/`, e.g. `UKCore-AllergyIntolerance-Amoxicillin-Example`,
//! `UKCore-MedicationStatement-Example`), converted to JSON, plus odd-but-valid and invalid
//! variants.

use super::*;
use crate::fhir::model::parse_resource;

fn ctx() -> MapContext {
    MapContext {
        sections: SectionSet::ALL,
        medications: MedicationKinds::Both,
        today: "2026-06-01".to_owned(),
    }
}

/// Maps a JSON array of resources as one page.
fn map_resources(json: &str, ctx: &MapContext) -> Collected {
    let values: Vec<serde_json::Value> = serde_json::from_str(json).expect("test JSON is an array");
    let resources: Vec<PageResource> = values
        .iter()
        .map(|v| PageResource {
            full_url: v
                .get("id")
                .and_then(|id| id.as_str())
                .map(|id| format!("https://fhir.example/{}", id)),
            resource: Box::new(parse_resource(v.to_string().as_bytes()).expect("object")),
        })
        .collect();
    let mut out = Collected::default();
    map_page(&resources, ctx, &mut out);
    out
}

fn only(entries: &[Entry]) -> &Entry {
    assert_eq!(entries.len(), 1, "expected one entry: {entries:#?}");
    &entries[0]
}

fn concept(entry: &Entry) -> (&str, &str, &str) {
    let c = entry.concept.as_ref().expect("a concept");
    (c.system.as_str(), c.code.as_str(), c.display.as_str())
}

#[test]
fn uk_core_allergy_example_maps_with_reactions_type_and_dates() {
    let out = map_resources(
        r#"[{
          "resourceType": "AllergyIntolerance",
          "id": "UKCore-AllergyIntolerance-Amoxicillin-Example",
          "meta": {"profile": ["https://fhir.nhs.uk/R4/StructureDefinition/UKCore-AllergyIntolerance"],
                   "lastUpdated": "2019-12-10T13:05:00+00:00"},
          "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active", "display": "Active"}]},
          "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": "confirmed", "display": "Confirmed"}]},
          "type": "allergy",
          "category": ["medication"],
          "code": {"coding": [{"system": "http://snomed.info/sct", "code": "372687004", "display": "Amoxicillin"}]},
          "patient": {"reference": "Patient/UKCore-RichardSmith-Patient-Example"},
          "encounter": {"reference": "Encounter/UKCore-Encounter-InpatientEncounter-Example"},
          "recordedDate": "2019-12-10T13:00:00+00:00",
          "recorder": {"reference": "Practitioner/UKCore-Practitioner-ConsultantSandraGose-Example"},
          "reaction": [{"manifestation": [{"coding": [{"system": "http://snomed.info/sct", "code": "247472004", "display": "Urticarial rash"}]}],
                        "severity": "mild"}]
        }]"#,
        &ctx(),
    );
    let (record, warnings) = out.into_parts();
    assert!(warnings.is_empty(), "{warnings:?}");
    let entry = only(&record.allergies);
    assert_eq!(concept(entry), (SNOMED, "372687004", "Amoxicillin"));
    assert_eq!(entry.summary, "Amoxicillin — Urticarial rash");
    assert_eq!(entry.status, "active");
    assert_eq!(entry.effective, "2019-12-10T13:00:00+00:00");
    assert_eq!(entry.recorded, "2019-12-10T13:00:00+00:00");
    assert_eq!(
        entry.provenance,
        vec![Provenance {
            source_entry_id: "UKCore-AllergyIntolerance-Amoxicillin-Example".into(),
            last_updated: "2019-12-10T13:05:00+00:00".into(),
            ..Provenance::default()
        }]
    );
    let Some(Detail::Allergy(detail)) = &entry.detail else {
        panic!("allergy detail");
    };
    assert_eq!(detail.reactions, vec!["Urticarial rash".to_owned()]);
    assert_eq!(detail.allergy_type, "allergy");
    assert_eq!(detail.criticality, "");
}

#[test]
fn allergy_summary_names_reaction_and_criticality() {
    let out = map_resources(
        r#"[{"resourceType": "AllergyIntolerance", "id": "a1", "criticality": "high",
             "code": {"coding": [{"system": "http://snomed.info/sct", "code": "91936005", "display": "Penicillin allergy"}]},
             "reaction": [{"manifestation": [{"coding": [{"system": "http://snomed.info/sct", "code": "39579001", "display": "Anaphylaxis"}]}]}],
             "onsetDateTime": "2008"}]"#,
        &ctx(),
    );
    let entry = only(&out.record.allergies);
    assert_eq!(entry.summary, "Penicillin allergy — Anaphylaxis (high)");
    assert_eq!(entry.effective, "2008", "partial dates are kept as written");
}

#[test]
fn uk_core_medication_statement_example_maps() {
    let out = map_resources(
        r#"[{
          "resourceType": "MedicationStatement",
          "id": "UKCore-MedicationStatement-Example",
          "status": "active",
          "medicationCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "27658006", "display": "Amoxicillin (product)"}]},
          "subject": {"reference": "Patient/UKCore-Patient-Example", "display": "Richard SMITH"},
          "effectiveDateTime": "2017-01-23",
          "dateAsserted": "2017-02-22",
          "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "65363002", "display": "Otitis Media"}]}],
          "dosage": [{"text": "500mg three times a day"}]
        }]"#,
        &ctx(),
    );
    let entry = only(&out.record.medications);
    assert_eq!(
        concept(entry),
        (SNOMED, "27658006", "Amoxicillin (product)")
    );
    assert_eq!(
        entry.summary,
        "Amoxicillin (product) — 500mg three times a day"
    );
    assert_eq!(entry.status, "active");
    assert_eq!(entry.effective, "2017-01-23");
    assert_eq!(entry.recorded, "2017-02-22");
    assert_eq!(
        entry.detail,
        Some(Detail::Medication(MedicationDetail {
            dosage: "500mg three times a day".into(),
            kind: "statement".into(),
            ..MedicationDetail::default()
        }))
    );
}

#[test]
fn medication_request_with_contained_dmd_medication() {
    let out = map_resources(
        r##"[{
          "resourceType": "MedicationRequest", "id": "mr1", "status": "active", "intent": "order",
          "contained": [{"resourceType": "Medication", "id": "med",
                         "code": {"coding": [{"system": "https://dmd.nhs.uk", "code": "325278007", "display": "Metformin 500mg tablets"}]}}],
          "medicationReference": {"reference": "#med"},
          "authoredOn": "2024-02-01",
          "dosageInstruction": [{"text": "One tablet twice a day"}]
        }]"##,
        &ctx(),
    );
    let entry = only(&out.record.medications);
    assert_eq!(
        concept(entry),
        (DMD, "325278007", "Metformin 500mg tablets")
    );
    assert_eq!(
        entry.summary,
        "Metformin 500mg tablets — One tablet twice a day"
    );
    assert_eq!(entry.effective, "2024-02-01");
    let Some(Detail::Medication(detail)) = &entry.detail else {
        panic!("medication detail");
    };
    assert_eq!(detail.kind, "request");
}

#[test]
fn medication_reference_resolves_to_an_included_medication_or_falls_back_to_display() {
    let out = map_resources(
        r#"[
          {"resourceType": "MedicationRequest", "id": "mr1", "status": "active",
           "medicationReference": {"reference": "Medication/m1"}},
          {"resourceType": "Medication", "id": "m1",
           "code": {"coding": [{"system": "https://dmd.nhs.uk", "code": "39732311000001104", "display": "Amlodipine 5mg tablets"}]}},
          {"resourceType": "MedicationRequest", "id": "mr2", "status": "active",
           "medicationReference": {"reference": "Medication/unknown", "display": "Ramipril 2.5mg capsules"}}
        ]"#,
        &ctx(),
    );
    assert_eq!(out.record.medications.len(), 2);
    assert_eq!(
        concept(&out.record.medications[0]).2,
        "Amlodipine 5mg tablets"
    );
    assert_eq!(
        concept(&out.record.medications[1]),
        ("", "", "Ramipril 2.5mg capsules")
    );
    assert!(!out.record.medications[0].incomplete);
    let ramipril = &out.record.medications[1];
    assert!(ramipril.incomplete, "kept, but marked");
    assert!(ramipril.incomplete_reason.contains("could not be read"));
    let record = out.into_source_record(SectionSet::ALL);
    assert_eq!(
        record.shortfalls,
        vec![Shortfall {
            sections: SectionSet::NONE.with(Section::Medications),
            reason:
                "1 medicine's Medication could not be read; was shown by what the prescription says"
                    .into(),
        }]
    );
}

#[test]
fn a_relative_medication_reference_never_resolves_to_another_servers_medication() {
    let parse = |json: &str| Box::new(parse_resource(json.as_bytes()).expect("object"));
    let base = "https://gp.example/fhir/";
    let foreign = PageResource {
        full_url: Some("https://hospital.example/fhir/Medication/m1".into()),
        resource: parse(
            r#"{"resourceType": "Medication", "id": "m1", "code": {"text": "Warfarin"}}"#,
        ),
    };
    let index = Medications::new(base, [&foreign]);
    assert!(index.get("Medication/m1").is_none(), "another server's m1");
    assert!(
        index
            .get("https://hospital.example/fhir/Medication/m1")
            .is_some(),
        "named by its own full URL, it is found"
    );
    let ours = PageResource {
        full_url: Some(format!("{base}Medication/m1")),
        resource: parse(
            r#"{"resourceType": "Medication", "id": "m1", "code": {"text": "Aspirin"}}"#,
        ),
    };
    let index = Medications::new(base, [&ours]);
    assert!(index.get("Medication/m1").is_some(), "this server's m1");
}

#[test]
fn thousands_of_repeated_codings_are_kept_once_each() {
    let coding = |i: usize| {
        format!(
            r#"{{"system": "http://snomed.info/sct", "code": "{}"}}"#,
            i % 50
        )
    };
    let codings: Vec<String> = (0..5_000).map(coding).collect();
    let json = format!(
        r#"[{{"resourceType": "Condition", "id": "c1", "code": {{"coding": [{}]}}}}]"#,
        codings.join(",")
    );
    let out = map_resources(&json, &ctx());
    assert_eq!(only(&out.record.conditions).codings.len(), 50);
}

#[test]
fn a_medicine_named_by_nothing_readable_is_kept_and_marked_incomplete() {
    let out = map_resources(
        r#"[{"resourceType": "MedicationRequest", "id": "mr1", "status": "active", "intent": "order",
             "medicationReference": {"reference": "urn:uuid:8d3bd2c6-6b0e-4f4b-9d0f-4b0f5d1a7c11"},
             "dosageInstruction": [{"text": "One daily"}]}]"#,
        &ctx(),
    );
    let entry = only(&out.record.medications);
    assert!(entry.incomplete);
    assert!(entry.concept.is_none());
    assert_eq!(
        entry.summary,
        "Medicine not named (its Medication could not be read) — One daily"
    );
}

#[test]
fn snomed_coding_is_preferred_even_when_not_first() {
    let out = map_resources(
        r#"[{"resourceType": "Condition", "id": "c1",
             "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "resolved"}]},
             "code": {"coding": [
                 {"system": "http://read.info/ctv3", "code": "X40J5", "display": "Type II diabetes"},
                 {"system": "http://snomed.info/sct", "code": "44054006"}],
               "text": "Type 2 diabetes mellitus"},
             "onsetDateTime": "2019",
             "abatementDateTime": "2023-05",
             "recordedDate": "2019-03-14"}]"#,
        &ctx(),
    );
    let entry = only(&out.record.conditions);
    assert_eq!(
        concept(entry),
        (SNOMED, "44054006", "Type 2 diabetes mellitus"),
        "display falls back to code.text"
    );
    assert_eq!(entry.status, "resolved");
    assert_eq!(entry.effective, "2019");
    assert_eq!(entry.ended, "2023-05");
    assert_eq!(entry.recorded, "2019-03-14");
}

#[test]
fn condition_onset_period_and_text_only_code_are_accepted() {
    let out = map_resources(
        r#"[{"resourceType": "Condition", "id": "c2",
             "code": {"text": "Chronic back pain"},
             "onsetPeriod": {"start": "2015-06-01", "end": "2016-01-01"}},
            {"resourceType": "Condition", "id": "c3",
             "code": {"coding": [{"system": "http://snomed.info/sct", "code": "195967001", "display": "Asthma"}]},
             "recordedDate": "2001-09-01"}]"#,
        &ctx(),
    );
    assert_eq!(out.record.conditions.len(), 2);
    assert_eq!(
        concept(&out.record.conditions[0]),
        ("", "", "Chronic back pain")
    );
    assert_eq!(out.record.conditions[0].effective, "2015-06-01");
    assert_eq!(
        out.record.conditions[1].effective, "2001-09-01",
        "recordedDate as last resort"
    );
    assert_eq!(out.record.conditions[1].status, "");
}

#[test]
fn observation_quantity_range_and_interpretation() {
    let out = map_resources(
        r#"[{"resourceType": "Observation", "id": "o1", "status": "final",
             "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
             "code": {"coding": [
                 {"system": "http://loinc.org", "code": "4548-4", "display": "Hemoglobin A1c/Hemoglobin.total in Blood"},
                 {"system": "http://snomed.info/sct", "code": "1049301000000100", "display": "HbA1c level (IFCC standardised)"}],
               "text": "HbA1c"},
             "effectiveDateTime": "2024-03-01T09:30:00+00:00",
             "issued": "2024-03-01T15:02:11.123+00:00",
             "valueQuantity": {"value": 48, "unit": "mmol/mol", "system": "http://unitsofmeasure.org", "code": "mmol/mol"},
             "interpretation": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "H", "display": "High"}]}],
             "referenceRange": [{"low": {"value": 20, "unit": "mmol/mol"}, "high": {"value": 41.5, "unit": "mmol/mol"}}]}]"#,
        &ctx(),
    );
    let entry = only(&out.record.test_results);
    assert_eq!(
        concept(entry),
        (
            SNOMED,
            "1049301000000100",
            "HbA1c level (IFCC standardised)"
        )
    );
    assert_eq!(entry.summary, "HbA1c 48 mmol/mol (H)");
    assert_eq!(entry.effective, "2024-03-01T09:30:00+00:00");
    assert_eq!(entry.recorded, "2024-03-01T15:02:11.123+00:00");
    assert_eq!(
        entry.detail,
        Some(Detail::Result(ResultDetail {
            value: "48".into(),
            unit: "mmol/mol".into(),
            reference_range: "20-41.5".into(),
            interpretation: "H".into(),
            kind: "observation".into(),
        }))
    );
}

#[test]
fn observation_value_string_components_and_issued_only() {
    let out = map_resources(
        r#"[{"resourceType": "Observation", "id": "o2", "status": "final",
             "code": {"coding": [{"system": "http://snomed.info/sct", "code": "365981007", "display": "Tobacco smoking behaviour - finding"}]},
             "valueString": "Ex-smoker", "issued": "2022-01-05T10:00:00Z"},
            {"resourceType": "Observation", "id": "o3", "status": "final",
             "code": {"coding": [{"system": "http://snomed.info/sct", "code": "75367002", "display": "Blood pressure"}]},
             "effectivePeriod": {"start": "2024-04-02T10:00:00Z"},
             "component": [
               {"code": {"coding": [{"system": "http://snomed.info/sct", "code": "72313002"}]}, "valueQuantity": {"value": 128, "unit": "mmHg"}},
               {"code": {"coding": [{"system": "http://snomed.info/sct", "code": "1091811000000102"}]}, "valueQuantity": {"value": 82, "unit": "mmHg"}}],
             "referenceRange": [{"text": "below 140/90"}]}]"#,
        &ctx(),
    );
    assert_eq!(out.record.test_results.len(), 2);
    let smoking = &out.record.test_results[0];
    assert_eq!(
        smoking.summary,
        "Tobacco smoking behaviour - finding Ex-smoker"
    );
    assert_eq!(
        smoking.effective, "2022-01-05T10:00:00Z",
        "issued when no effective time"
    );
    let bp = &out.record.test_results[1];
    assert_eq!(bp.summary, "Blood pressure 128/82 mmHg");
    assert_eq!(bp.effective, "2024-04-02T10:00:00Z");
    let Some(Detail::Result(detail)) = &bp.detail else {
        panic!("result detail");
    };
    assert_eq!(detail.reference_range, "below 140/90");
}

#[test]
fn diagnostic_report_conclusion_is_the_value_and_long_text_is_shortened() {
    let conclusion = "No acute abnormality. ".repeat(20);
    let json = format!(
        r#"[{{"resourceType": "DiagnosticReport", "id": "dr1", "status": "final",
              "code": {{"coding": [{{"system": "http://snomed.info/sct", "code": "399208008", "display": "Plain chest X-ray"}}]}},
              "effectiveDateTime": "2024-01-10", "issued": "2024-01-11T08:00:00Z",
              "conclusion": "{conclusion}"}}]"#
    );
    let out = map_resources(&json, &ctx());
    let entry = only(&out.record.test_results);
    assert!(
        entry
            .summary
            .starts_with("Plain chest X-ray — No acute abnormality.")
    );
    assert!(entry.summary.ends_with('…'));
    assert!(entry.summary.chars().count() <= SUMMARY_MAX_CHARS + 1);
    let Some(Detail::Result(detail)) = &entry.detail else {
        panic!("result detail");
    };
    assert_eq!(detail.kind, "report");
    assert_eq!(
        detail.value, conclusion,
        "the full conclusion is kept in the detail"
    );
}

#[test]
fn care_plan_document_composition_encounter_and_appointment() {
    let out = map_resources(
        r#"[
          {"resourceType": "CarePlan", "id": "cp1", "status": "active", "intent": "plan",
           "title": "Diabetes care plan",
           "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "736285004", "display": "Hyperglycaemia care plan"}]}],
           "period": {"start": "2023-01-01", "end": "2024-01-01"}, "created": "2022-12-20"},
          {"resourceType": "DocumentReference", "id": "d1", "status": "current",
           "type": {"coding": [{"system": "http://snomed.info/sct", "code": "373942005", "display": "Discharge summary"}]},
           "date": "2024-02-03T12:00:00Z", "description": "Ward 7 discharge",
           "author": [{"reference": "Organization/RJ1", "display": "Guy's and St Thomas'"}],
           "content": [{"attachment": {"contentType": "application/pdf", "url": "https://fhir.example/Binary/b1"}}]},
          {"resourceType": "Composition", "id": "comp1", "status": "final",
           "type": {"coding": [{"system": "http://snomed.info/sct", "code": "371531000", "display": "Report of clinical encounter"}]},
           "date": "2024-02-04", "title": "Clinic letter", "author": [{"display": "Dr A Jones"}]},
          {"resourceType": "Encounter", "id": "e1", "status": "finished",
           "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER", "display": "emergency"},
           "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "1105781000000106", "display": "Ambulance service attendance"}]}],
           "period": {"start": "2024-05-01T02:10:00Z", "end": "2024-05-01T03:00:00Z"},
           "reasonCode": [{"text": "Fall"}],
           "location": [{"location": {"display": "Patient's home"}}]},
          {"resourceType": "Encounter", "id": "e2", "status": "finished",
           "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
           "period": {"start": "2023-11-01"}},
          {"resourceType": "Appointment", "id": "ap1", "status": "booked",
           "serviceType": [{"coding": [{"system": "http://snomed.info/sct", "code": "310123008", "display": "Diabetic medicine service"}]}],
           "start": "2026-07-14T09:30:00+01:00", "end": "2026-07-14T10:00:00+01:00",
           "participant": [{"actor": {"reference": "Patient/p1", "display": "Mr Smith"}},
                           {"actor": {"reference": "Location/l1", "display": "Diabetes Centre, St Thomas'"}},
                           {"actor": {"reference": "Practitioner/pr1", "display": "Dr B Patel"}}]},
          {"resourceType": "Appointment", "id": "ap-past", "status": "fulfilled",
           "start": "2026-05-31T09:30:00Z", "description": "Yesterday's clinic"}
        ]"#,
        &ctx(),
    );
    let (record, warnings) = out.into_parts();
    assert!(warnings.is_empty(), "{warnings:?}");

    let plan = only(&record.care_plans);
    assert_eq!(plan.summary, "Diabetes care plan");
    assert_eq!(
        (plan.effective.as_str(), plan.ended.as_str()),
        ("2023-01-01", "2024-01-01")
    );
    assert_eq!(concept(plan).1, "736285004");

    assert_eq!(record.documents.len(), 2);
    let doc = &record.documents[0];
    assert_eq!(doc.summary, "Discharge summary — Ward 7 discharge");
    assert_eq!(
        doc.detail,
        Some(Detail::Document(DocumentDetail {
            document_type: "Discharge summary".into(),
            url: "https://fhir.example/Binary/b1".into(),
            content_type: "application/pdf".into(),
            author: "Guy's and St Thomas'".into(),
        }))
    );
    assert_eq!(record.documents[1].summary, "Clinic letter");

    assert_eq!(record.encounters.len(), 2);
    let ambulance = &record.encounters[0];
    assert_eq!(ambulance.summary, "Ambulance service attendance — Fall");
    assert_eq!(
        ambulance.detail,
        Some(Detail::Encounter(EncounterDetail {
            encounter_class: "ambulance".into(),
            location: "Patient's home".into(),
            reason: "Fall".into(),
        }))
    );
    assert_eq!(ambulance.ended, "2024-05-01T03:00:00Z");
    let inpatient = &record.encounters[1];
    assert_eq!(inpatient.summary, "Inpatient");
    assert_eq!(
        concept(inpatient).1,
        "IMP",
        "class coding stands in for a missing type"
    );

    let appointment = only(&record.appointments);
    assert_eq!(
        appointment.summary,
        "Diabetic medicine service with Dr B Patel"
    );
    assert_eq!(appointment.status, "booked");
    assert_eq!(appointment.effective, "2026-07-14T09:30:00+01:00");
    assert_eq!(
        appointment.detail,
        Some(Detail::Appointment(carerecord_proto::AppointmentDetail {
            location: "Diabetes Centre, St Thomas'".into(),
            service: "Diabetic medicine service".into(),
        }))
    );
}

#[test]
fn malformed_resources_are_counted_and_good_siblings_kept() {
    let out = map_resources(
        r#"[
          {"resourceType": "Condition", "id": "good",
           "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003", "display": "Hypertension"}]}},
          {"resourceType": "Condition", "id": "code-is-a-string", "code": "38341003"},
          {"resourceType": "Condition", "id": "no-code", "clinicalStatus": {"coding": [{"code": "active"}]}},
          {"resourceType": "Condition", "id": "numeric-code",
           "code": {"coding": [{"system": "http://snomed.info/sct", "code": 38341003}]}},
          {"resourceType": "Condition", "id": "bad-date",
           "code": {"text": "Asthma"}, "onsetDateTime": "last winter"},
          {"resourceType": "Observation", "id": "value-as-text",
           "code": {"text": "HbA1c"}, "valueQuantity": {"value": "48", "unit": "mmol/mol"}},
          {"resourceType": "Observation", "id": "fine", "code": {"text": "Weight"},
           "valueQuantity": {"value": 72.5, "unit": "kg"}},
          {"resourceType": "AllergyIntolerance", "id": "reaction-not-a-list",
           "code": {"text": "Latex"}, "reaction": {"manifestation": []}},
          {"resourceType": 42, "id": "who-knows"},
          {"resourceType": "Practitioner", "id": "ignored", "name": "not even a list"}
        ]"#,
        &ctx(),
    );
    assert_eq!(out.unreadable_count("Condition"), 4);
    assert_eq!(out.unreadable_count("Observation"), 1);
    let (record, warnings) = out.into_parts();
    assert_eq!(
        only(&record.conditions).provenance[0].source_entry_id,
        "good"
    );
    assert_eq!(only(&record.test_results).summary, "Weight 72.5 kg");
    assert!(record.allergies.is_empty());
    assert_eq!(
        warnings,
        vec![
            "1 AllergyIntolerance resource could not be read".to_owned(),
            "4 Condition resources could not be read".to_owned(),
            "1 Observation resource could not be read".to_owned(),
            "1 unidentified resource could not be read".to_owned(),
        ]
    );
    assert!(
        !warnings
            .iter()
            .any(|w| w.contains("38341003") || w.contains("winter")),
        "warnings carry counts, not content"
    );
}

#[test]
fn entered_in_error_and_refuted_are_carried_and_marked_for_the_merge_to_judge() {
    let out = map_resources(
        r#"[{"resourceType": "AllergyIntolerance", "id": "a1",
             "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": "entered-in-error"}]},
             "code": {"text": "Peanut"}},
            {"resourceType": "MedicationStatement", "id": "m1", "status": "entered-in-error",
             "medicationCodeableConcept": {"text": "Aspirin"}},
            {"resourceType": "Condition", "id": "c1",
             "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "refuted"}]},
             "code": {"coding": [{"system": "http://snomed.info/sct", "code": "195967001", "display": "Asthma"}]}}]"#,
        &ctx(),
    );
    let (record, warnings) = out.into_parts();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(
        only(&record.allergies).verification_status,
        VerificationStatus::EnteredInError as i32
    );
    assert_eq!(
        only(&record.medications).verification_status,
        VerificationStatus::EnteredInError as i32
    );
    assert_eq!(
        only(&record.conditions).verification_status,
        VerificationStatus::Refuted as i32
    );
}

#[test]
fn every_verification_status_code_is_mapped() {
    for (code, expected) in [
        ("confirmed", VerificationStatus::Confirmed),
        ("unconfirmed", VerificationStatus::Unconfirmed),
        ("provisional", VerificationStatus::Provisional),
        ("differential", VerificationStatus::Differential),
        ("refuted", VerificationStatus::Refuted),
        ("entered-in-error", VerificationStatus::EnteredInError),
        ("something-else", VerificationStatus::Unspecified),
    ] {
        let out = map_resources(
            &format!(
                r#"[{{"resourceType": "Condition", "id": "c1",
                     "verificationStatus": {{"coding": [{{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "{code}"}}]}},
                     "code": {{"text": "Chest pain"}}}}]"#
            ),
            &ctx(),
        );
        assert_eq!(
            only(&out.record.conditions).verification_status,
            expected as i32,
            "{code}"
        );
    }
}

#[test]
fn no_known_allergy_codes_assert_absence_and_unknown_codes_are_not_entries() {
    let out = map_resources(
        r#"[{"resourceType": "AllergyIntolerance", "id": "nka",
             "code": {"coding": [{"system": "http://snomed.info/sct", "code": "716186003", "display": "No known allergy"}]}},
            {"resourceType": "AllergyIntolerance", "id": "nkda",
             "code": {"coding": [{"system": "http://snomed.info/sct", "code": "409137002", "display": "No known drug allergy"}]}},
            {"resourceType": "AllergyIntolerance", "id": "ips-nka",
             "code": {"coding": [{"system": "http://hl7.org/fhir/uv/ips/CodeSystem/absent-unknown-uv-ips", "code": "no-known-allergies"}]}},
            {"resourceType": "AllergyIntolerance", "id": "peanut",
             "code": {"coding": [{"system": "http://snomed.info/sct", "code": "91935009", "display": "Allergy to peanut"}]}},
            {"resourceType": "Condition", "id": "ips-unknown",
             "code": {"coding": [{"system": "http://hl7.org/fhir/uv/ips/CodeSystem/absent-unknown-uv-ips", "code": "no-problem-info"}]}},
            {"resourceType": "MedicationStatement", "id": "ips-nkm",
             "medicationCodeableConcept": {"coding": [{"system": "http://hl7.org/fhir/uv/ips/CodeSystem/absent-unknown-uv-ips", "code": "no-known-medications"}]}}]"#,
        &ctx(),
    );
    let (record, warnings) = out.into_parts();
    let absent: Vec<(&str, bool)> = record
        .allergies
        .iter()
        .map(|e| (e.provenance[0].source_entry_id.as_str(), e.asserts_absence))
        .collect();
    assert_eq!(
        absent,
        [
            ("nka", true),
            ("nkda", true),
            ("ips-nka", true),
            ("peanut", false)
        ]
    );
    assert!(only(&record.medications).asserts_absence);
    assert!(record.conditions.is_empty(), "unknown is not an entry");
    assert_eq!(
        warnings,
        ["the source says it has no information about problems (not shown as an entry)"]
    );
}

#[test]
fn every_coding_is_kept_with_the_chosen_one_first() {
    let out = map_resources(
        r#"[{"resourceType": "Condition", "id": "c1",
             "code": {"coding": [
               {"system": "http://read.info/ctv3", "code": "XaBYZ", "display": "Clinic attendance"},
               {"system": "http://snomed.info/sct", "code": "68566005", "display": "Urinary tract infectious disease"},
               {"system": "http://snomed.info/sct", "code": "105629000", "display": "Chlamydial infection"}]}}]"#,
        &ctx(),
    );
    let entry = only(&out.record.conditions);
    let codes: Vec<&str> = entry.codings.iter().map(|c| c.code.as_str()).collect();
    assert_eq!(codes, ["68566005", "XaBYZ", "105629000"]);
    assert_eq!(concept(entry).1, "68566005");
}

#[test]
fn allergy_severity_is_the_worst_reaction_and_request_intent_is_kept() {
    let out = map_resources(
        r#"[{"resourceType": "AllergyIntolerance", "id": "a1",
             "code": {"text": "Penicillin"},
             "reaction": [{"severity": "mild"}, {"severity": "severe"}, {"severity": "moderate"}, {"severity": "awful"}]},
            {"resourceType": "MedicationRequest", "id": "r1", "intent": "plan",
             "medicationCodeableConcept": {"text": "Aspirin"}}]"#,
        &ctx(),
    );
    let Some(Detail::Allergy(allergy)) = &only(&out.record.allergies).detail else {
        panic!("allergy detail");
    };
    assert_eq!(allergy.severity, "severe");
    let Some(Detail::Medication(medication)) = &only(&out.record.medications).detail else {
        panic!("medication detail");
    };
    assert_eq!(medication.intent, "plan");
    assert_eq!(medication.kind, "request");
}

#[test]
fn unwanted_sections_and_medication_kinds_are_neither_mapped_nor_counted() {
    let ctx = MapContext {
        sections: SectionSet::NONE.with(Section::Medications),
        medications: MedicationKinds::Statement,
        today: "2026-06-01".into(),
    };
    let out = map_resources(
        r#"[{"resourceType": "Condition", "id": "c1", "code": "broken"},
            {"resourceType": "MedicationRequest", "id": "r1", "medicationCodeableConcept": {"text": "Aspirin"}},
            {"resourceType": "MedicationStatement", "id": "s1", "medicationCodeableConcept": {"text": "Aspirin"}}]"#,
        &ctx,
    );
    let (record, warnings) = out.into_parts();
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(record.entry_count(), 1);
    assert_eq!(
        only(&record.medications).provenance[0].source_entry_id,
        "s1"
    );
}

#[test]
fn security_labels_come_from_meta() {
    let out = map_resources(
        r#"[{"resourceType": "Condition", "id": "c1",
             "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R", "display": "restricted"}]},
             "code": {"coding": [{"system": "http://snomed.info/sct", "code": "63650001", "display": "Cholera"}]}}]"#,
        &ctx(),
    );
    let entry = only(&out.record.conditions);
    assert_eq!(entry.security_labels.len(), 1);
    assert_eq!(entry.security_labels[0].code, "R");
    assert_eq!(
        entry.security_labels[0].system,
        "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
    );
}

const UK_CORE_PATIENT: &str = r#"{
  "resourceType": "Patient",
  "id": "UKCore-Patient-RichardSmith-Example",
  "meta": {"lastUpdated": "2024-01-01T00:00:00Z"},
  "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018"}],
  "active": true,
  "name": [{"use": "usual", "family": "Smith", "given": ["Dick"]},
           {"use": "official", "family": "Smith", "given": ["Richard", "Albert"], "prefix": ["Mr"]}],
  "gender": "male",
  "birthDate": "1954-10-03",
  "address": [{"use": "old", "line": ["1 Old Road"], "postalCode": "LS1 1AA"},
              {"use": "home", "line": ["100 Chequers Lane", ""], "city": "Leeds", "postalCode": "LS10 1AB"}],
  "generalPractitioner": [{"identifier": {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "Y12345"}}]
}"#;

#[test]
fn uk_core_patient_demographics() {
    let resource = parse_resource(UK_CORE_PATIENT.as_bytes()).expect("object");
    let nhs = NhsNumber::parse("9990000018").expect("valid");
    assert!(patient_has_nhs_number(&resource, &nhs));
    let other = NhsNumber::parse("9434765919").expect("valid");
    assert!(!patient_has_nhs_number(&resource, &other));
    let patient = patient(&resource, &nhs).expect("readable");
    assert_eq!(patient.nhs_number, "9990000018");
    assert_eq!(patient.family_name, "Smith");
    assert_eq!(
        patient.given_names,
        vec!["Richard".to_owned(), "Albert".to_owned()]
    );
    assert_eq!(patient.birth_date, "1954-10-03");
    assert_eq!(patient.gender, "male");
    assert_eq!(patient.address, "100 Chequers Lane, Leeds, LS10 1AB");
    assert_eq!(patient.registered_gp_code, "Y12345");
    assert_eq!(
        patient.provenance[0].source_entry_id,
        "UKCore-Patient-RichardSmith-Example"
    );
}

#[test]
fn restricted_patient_has_no_address() {
    let json = UK_CORE_PATIENT.replace(
        r#""meta": {"lastUpdated": "2024-01-01T00:00:00Z"}"#,
        r#""meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]}"#,
    );
    let resource = parse_resource(json.as_bytes()).expect("object");
    let nhs = NhsNumber::parse("9990000018").expect("valid");
    let patient = patient(&resource, &nhs).expect("readable");
    assert_eq!(patient.address, "");
    assert!(
        patient.restricted,
        "the broker must know, to withhold other sources' address"
    );
    assert_eq!(patient.family_name, "Smith");
}

#[test]
fn today_is_a_calendar_date() {
    assert_eq!(crate::calendar::civil_from_days(0), (1970, 1, 1));
    assert_eq!(crate::calendar::civil_from_days(19_723), (2024, 1, 1));
    assert_eq!(crate::calendar::civil_from_days(20_454), (2026, 1, 1));
    assert_eq!(crate::calendar::civil_from_days(19_782), (2024, 2, 29));
    let today = today_utc();
    assert_eq!(today.len(), 10);
    assert!(today.as_str() > "2024-01-01");
}

#[test]
fn a_referenced_medications_security_labels_reach_the_entry() {
    let out = map_resources(
        r#"[{"resourceType": "MedicationRequest", "id": "mr1",
             "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N"}]},
             "medicationReference": {"reference": "Medication/m1"}},
            {"resourceType": "Medication", "id": "m1",
             "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "HIV"}]},
             "code": {"coding": [{"system": "https://dmd.nhs.uk", "code": "17750811000001104", "display": "Biktarvy tablets"},
                                 {"system": "http://snomed.info/sct", "code": "703123003", "display": "Product containing bictegravir"}]}}]"#,
        &ctx(),
    );
    let entry = only(&out.record.medications);
    let labels: Vec<&str> = entry
        .security_labels
        .iter()
        .map(|c| c.code.as_str())
        .collect();
    assert_eq!(labels, ["N", "HIV"]);
    assert_eq!(
        entry.codings.len(),
        2,
        "every coding of the Medication's code"
    );
}

#[test]
fn unreadable_resources_are_shortfalls_of_their_section() {
    let out = map_resources(
        r#"[{"resourceType": "Observation", "id": "o1", "code": 7},
            {"id": "no-type"}]"#,
        &ctx(),
    );
    let record = out.into_source_record(SectionSet::NONE.with(Section::TestResults));
    let sections: Vec<SectionSet> = record.shortfalls.iter().map(|s| s.sections).collect();
    assert_eq!(
        sections,
        [
            SectionSet::NONE.with(Section::TestResults),
            SectionSet::NONE.with(Section::TestResults)
        ],
        "{:?}",
        record.shortfalls
    );
}
