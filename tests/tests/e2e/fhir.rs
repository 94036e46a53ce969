//! The FHIR R4 face over real HTTP, read with `reqwest` as a FHIR client would: the same core
//! as gRPC behind it (access policy, cache, audit), its own way in (a signed requester token),
//! and errors as OperationOutcome carrying the gRPC reasons.

use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::Source;
use carerecord_broker::access::AccessConfig;
use carerecord_broker::lookup::LoadLimits;
use carerecord_e2e::fhir::{AUDIENCE, FhirFace, clinician_claims, now, parameters, start_fhir};
use carerecord_e2e::*;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(5);

async fn face_over(sources: Vec<Arc<dyn Source>>, settings: Settings) -> (TestBroker, FhirFace) {
    let broker = start_broker(sources.into_iter().map(|s| (s, LONG)).collect(), settings).await;
    let face = start_fhir(broker.broker.clone()).await;
    (broker, face)
}

async fn gp_and_hospital() -> (TestBroker, FhirFace) {
    face_over(
        vec![Arc::new(gp_source()), Arc::new(hospital_source())],
        Settings::default(),
    )
    .await
}

#[tokio::test]
async fn a_signed_token_gets_a_bundle_and_the_access_is_audited_under_the_tokens_user() {
    let audit_file = temp_path("fhir-audit.jsonl");
    let (_broker, face) = face_over(
        vec![Arc::new(gp_source()), Arc::new(hospital_source())],
        Settings {
            audit_file: audit_file.clone(),
            ..Settings::default()
        },
    )
    .await;
    let token = face.token_with(|c| c["sub"] = json!("dr-fhir"));
    let nhs = shared_patient().as_digits();
    let answer = face
        .structured_record(&parameters(&nhs, vec![]), Some(&token))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["resourceType"], "Bundle");
    assert_eq!(answer.body["type"], "collection");
    assert_eq!(
        answer.headers["content-type"],
        "application/fhir+json; charset=utf-8"
    );
    assert_eq!(answer.headers["cache-control"], "no-store");
    let request_id = answer.headers["x-request-id"]
        .to_str()
        .expect("a request id")
        .to_owned();

    // The same audit trail as gRPC: this access, by the token's user, before anything was sent.
    let trail = std::fs::read_to_string(&audit_file).expect("audit trail");
    let event: Value = trail
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|line| line["event"].clone())
        .find(|e| e["request_id"] == request_id.as_str())
        .expect("the lookup is in the audit trail");
    assert_eq!(event["user_id"], "dr-fhir");
    assert_eq!(event["kind"], "access");
    assert_eq!(event["patient"], nhs);
}

#[tokio::test]
async fn every_bad_way_in_is_refused_with_an_operation_outcome_and_the_grpc_reason() {
    let (_broker, face) = gp_and_hospital().await;
    let nhs = shared_patient().as_digits();
    let body = parameters(&nhs, vec![]);
    let other_key = carerecord_broker::fhir_api::token::generate("es256").expect("key");
    let forged =
        carerecord_broker::fhir_api::token::sign(&other_key, &clinician_claims()).expect("signed");
    let expired = face.token_with(|c| {
        c["iat"] = json!(now() - 600);
        c["exp"] = json!(now() - 300);
    });
    let elsewhere = face.token_with(|c| c["aud"] = json!("https://another.example/fhir"));
    let cases: Vec<(&str, Value, Option<String>, u16, &str)> = vec![
        ("no token", body.clone(), None, 401, "TOKEN_MISSING"),
        (
            "a token signed by another key",
            body.clone(),
            Some(forged),
            401,
            "TOKEN_INVALID",
        ),
        (
            "an expired token",
            body.clone(),
            Some(expired),
            401,
            "TOKEN_EXPIRED",
        ),
        (
            "a token for another audience",
            body.clone(),
            Some(elsewhere),
            401,
            "TOKEN_INVALID",
        ),
        (
            "an invalid NHS number",
            parameters("1234567890", vec![]),
            Some(face.token(&clinician_claims())),
            400,
            "INVALID_NHS_NUMBER",
        ),
        (
            "a role that may not view records",
            body.clone(),
            Some(face.token_with(|c| c["role"] = json!("R9999"))),
            403,
            "ROLE_NOT_PERMITTED",
        ),
        (
            "a token naming no role",
            body.clone(),
            Some(face.token_with(|c| {
                c.as_object_mut().map(|o| o.remove("role"));
            })),
            401,
            "REQUESTER_FIELD_MISSING",
        ),
        (
            "emergency access without a reason",
            body.clone(),
            Some(face.token_with(|c| c["purpose"] = json!("emergency_access"))),
            400,
            "EMERGENCY_REASON_MISSING",
        ),
        (
            "an unknown section",
            parameters(
                &nhs,
                vec![json!({"name": "includeSection", "valueCode": "horoscope"})],
            ),
            Some(face.token(&clinician_claims())),
            400,
            "UNKNOWN_SECTION",
        ),
        (
            "a patient no organisation knows",
            parameters(&unknown_patient().as_digits(), vec![]),
            Some(face.token(&clinician_claims())),
            404,
            "PATIENT_NOT_FOUND",
        ),
    ];
    for (what, body, token, status, reason) in cases {
        let answer = face.structured_record(&body, token.as_deref()).await;
        assert_eq!(answer.status, status, "{what}: {}", answer.body);
        assert_eq!(answer.body["resourceType"], "OperationOutcome", "{what}");
        assert_eq!(answer.reason(), reason, "{what}: {}", answer.body);
        assert_eq!(
            answer.headers["content-type"], "application/fhir+json; charset=utf-8",
            "{what}"
        );
        if status == 401 {
            assert_eq!(answer.headers["www-authenticate"], "Bearer", "{what}");
        }
    }
}

#[tokio::test]
async fn a_patient_without_a_relationship_is_refused_403_when_assertions_are_not_trusted() {
    let (_broker, face) = face_over(
        vec![Arc::new(gp_source()), Arc::new(hospital_source())],
        Settings {
            access: AccessConfig::default(),
            ..Settings::default()
        },
    )
    .await;
    // An organisation that holds no record for the patient.
    let token = face.token_with(|c| c["organisation"] = json!("Y99999"));
    let answer = face
        .structured_record(
            &parameters(&shared_patient().as_digits(), vec![]),
            Some(&token),
        )
        .await;
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert_eq!(answer.reason(), "NO_LEGITIMATE_RELATIONSHIP");
}

#[tokio::test]
async fn beyond_capacity_the_face_answers_429_with_retry_after() {
    let slow = Arc::new(gp_source().with_delay(Duration::from_millis(400)));
    let (_broker, face) = face_over(
        vec![slow],
        Settings {
            limits: LoadLimits {
                max_in_flight: 1,
                retry_after: Duration::from_millis(1500),
            },
            ..Settings::default()
        },
    )
    .await;
    let token = face.token(&clinician_claims());
    let lookups = (0..4u32).map(|i| {
        let body = parameters(&nhs(999_000_300 + i * 10).as_digits(), vec![]);
        let face = &face;
        let token = token.clone();
        async move { face.structured_record(&body, Some(&token)).await }
    });
    let answers = futures::future::join_all(lookups).await;
    let shed: Vec<_> = answers.iter().filter(|a| a.status == 429).collect();
    assert_eq!(
        shed.len(),
        3,
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    for a in shed {
        assert_eq!(a.reason(), "OVERLOADED");
        assert_eq!(a.headers["retry-after"], "2", "1.5 s rounded up");
    }
}

#[tokio::test]
async fn the_capability_statement_describes_the_face() {
    let (_broker, face) = gp_and_hospital().await;
    let answer = face.get("metadata", None).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["resourceType"], "CapabilityStatement");
    assert_eq!(answer.body["implementation"]["url"], face.base.as_str());
    let unknown = face.get("Observation?code=1234", None).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.body["resourceType"], "OperationOutcome");
    assert_eq!(AUDIENCE, "https://carerecord.test/fhir");
}

// ---------------------------------------------------------------------------------------------
// Documents through the broker

const LETTER_URL: &str = "https://hospital.internal/fhir/Binary/discharge-1";
const LETTER: &str = "Discharge summary: admitted with chest pain, troponin negative.";
const SENSITIVE_URL: &str = "https://hospital.internal/fhir/Binary/gum-1";

/// A hospital holding two documents for the shared patient: a discharge summary, and a sexual
/// health clinic letter coded with a sensitive SNOMED CT concept.
fn hospital_with_documents() -> Arc<dyn Source> {
    use carerecord_proto::{CareRecord, Coding, DocumentDetail, Entry, Patient, entry::Detail};
    let document = |code: &str, display: &str, url: &str| Entry {
        concept: Some(Coding {
            system: SNOMED.into(),
            code: code.into(),
            display: display.into(),
        }),
        summary: display.into(),
        effective: "2026-10-01".into(),
        detail: Some(Detail::Document(DocumentDetail {
            document_type: display.into(),
            url: url.into(),
            content_type: "text/plain".into(),
            author: "Riverside Hospital".into(),
        })),
        ..Entry::default()
    };
    Arc::new(
        carerecord_adapters::memory::InMemorySource::new("hospital", "RXX", "Riverside Hospital")
            .with_patient(
                shared_patient(),
                CareRecord {
                    patient: Some(Patient {
                        family_name: "Smith".into(),
                        birth_date: "1957-03-02".into(),
                        ..Patient::default()
                    }),
                    documents: vec![
                        document("373942005", "Discharge summary", LETTER_URL),
                        // 86406008: HIV infection (a built-in sensitive code).
                        document("86406008", "Sexual health clinic letter", SENSITIVE_URL),
                    ],
                    ..CareRecord::default()
                },
            )
            .with_document(LETTER_URL, "text/plain", LETTER)
            .with_document(SENSITIVE_URL, "text/plain", "sensitive content"),
    )
}

/// The broker-relative URLs of the Bundle's DocumentReferences, by type text.
fn document_urls(bundle: &Value) -> Vec<(String, String)> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| &e["resource"])
        .filter(|r| r["resourceType"] == "DocumentReference")
        .filter_map(|r| {
            let url = r["content"][0]["attachment"]["url"].as_str()?;
            Some((
                r["type"]["text"].as_str().unwrap_or("").to_owned(),
                url.to_owned(),
            ))
        })
        .collect()
}

/// The GP and the hospital with documents; R8000 may see sensitive entries, R8001 may not.
async fn documents_face(audit_file: &std::path::Path) -> (TestBroker, FhirFace) {
    face_over(
        vec![Arc::new(gp_source()), hospital_with_documents()],
        Settings {
            audit_file: audit_file.to_owned(),
            access: AccessConfig {
                trust_unverified_assertions: true,
                sensitive_roles: vec!["R8000".into()],
                ..AccessConfig::default()
            },
            ..Settings::default()
        },
    )
    .await
}

#[tokio::test]
async fn a_document_is_fetched_through_the_broker_and_its_retrieval_audited() {
    let audit_file = temp_path("fhir-documents.jsonl");
    let (_broker, face) = documents_face(&audit_file).await;
    let token = face.token(&clinician_claims());
    let nhs = shared_patient().as_digits();
    let bundle = face
        .structured_record(&parameters(&nhs, vec![]), Some(&token))
        .await;
    assert_eq!(bundle.status, 200, "{}", bundle.body);
    let text = bundle.body.to_string();
    assert!(
        !text.contains("hospital.internal"),
        "no source URL leaves the broker"
    );
    let urls = document_urls(&bundle.body);
    assert_eq!(urls.len(), 2, "{urls:?}");
    let letter = urls
        .iter()
        .find(|(t, _)| t.contains("Discharge"))
        .map(|(_, u)| u.clone())
        .expect("the discharge summary");
    assert!(letter.starts_with("Binary/"), "{letter}");

    // Raw content, its own media type, not cached anywhere.
    let raw = face.get_raw(&letter, &token).await;
    assert_eq!(raw.0, 200);
    assert_eq!(
        raw.1.get("content-type").map(|v| v.to_str().unwrap_or("")),
        Some("text/plain")
    );
    assert_eq!(raw.1["cache-control"], "no-store");
    assert_eq!(raw.2, LETTER.as_bytes());
    // As a FHIR Binary resource for a client that accepts only FHIR.
    let binary = face.get_fhir(&letter, &token).await;
    assert_eq!(binary.status, 200);
    assert_eq!(binary.body["resourceType"], "Binary");
    assert_eq!(binary.body["contentType"], "text/plain");
    assert!(binary.body["data"].as_str().is_some_and(|d| !d.is_empty()));

    // Audited: a "document" event by this user, naming the source.
    let trail = std::fs::read_to_string(&audit_file).expect("audit trail");
    let events: Vec<Value> = trail
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|l| l["event"].clone())
        .collect();
    let retrievals: Vec<&Value> = events.iter().filter(|e| e["kind"] == "document").collect();
    assert_eq!(retrievals.len(), 2, "one per retrieval: {events:?}");
    assert!(
        retrievals
            .iter()
            .all(|e| e["user_id"] == "dr-test" && e["sources"][0] == "hospital")
    );
}

#[tokio::test]
async fn a_withheld_document_cannot_be_fetched_even_with_its_id_and_the_refusal_is_audited() {
    let audit_file = temp_path("fhir-documents-withheld.jsonl");
    let (_broker, face) = documents_face(&audit_file).await;
    let nhs = shared_patient().as_digits();
    // A permitted colleague's view lists the sensitive letter...
    let permitted = face.token(&clinician_claims());
    let bundle = face
        .structured_record(&parameters(&nhs, vec![]), Some(&permitted))
        .await;
    let sensitive = document_urls(&bundle.body)
        .into_iter()
        .find(|(t, _)| t.contains("Sexual health"))
        .map(|(_, u)| u)
        .expect("listed for the permitted role");
    // ...an ordinary role does not see it, and its id gets them nothing.
    let ordinary = face.token_with(|c| c["role"] = json!("R8001"));
    let theirs = face
        .structured_record(&parameters(&nhs, vec![]), Some(&ordinary))
        .await;
    assert!(
        document_urls(&theirs.body)
            .iter()
            .all(|(t, _)| !t.contains("Sexual health")),
        "withheld from the ordinary role"
    );
    let refused = face.get(&sensitive, Some(&ordinary)).await;
    assert_eq!(refused.status, 404, "{}", refused.body);
    assert_eq!(refused.reason(), "DOCUMENT_NOT_FOUND");
    // A forged id, and no token at all.
    let forged = face.get("Binary/bm90LWEtcmVhbC1pZA", Some(&ordinary)).await;
    assert_eq!(forged.reason(), "DOCUMENT_NOT_FOUND");
    let anonymous = face.get(&sensitive, None).await;
    assert_eq!(anonymous.status, 401);

    let trail = std::fs::read_to_string(&audit_file).expect("audit trail");
    assert!(
        trail.lines().any(
            |l| l.contains("document not in the record this requester may see")
                && l.contains("R8001")
        ),
        "the refused retrieval is on the record"
    );
}

/// The discharge summary's document URL in the shared patient's record, over gRPC.
async fn discharge_summary_url(broker: &TestBroker) -> String {
    use carerecord_proto::entry::Detail;
    let record = broker
        .lookup(request(&shared_patient().as_digits(), LONG))
        .await
        .record
        .expect("a record");
    record
        .documents
        .iter()
        .find_map(|e| match &e.detail {
            Some(Detail::Document(d)) if e.summary.contains("Discharge") => Some(d.url.clone()),
            _ => None,
        })
        .expect("the discharge summary")
}

#[tokio::test]
async fn grpc_get_document_streams_the_same_content_and_refuses_unknown_ids() {
    use carerecord_proto::GetDocumentRequest;
    let (broker, _face) = face_over(
        vec![Arc::new(gp_source()), hospital_with_documents()],
        Settings::default(),
    )
    .await;
    let letter = discharge_summary_url(&broker).await;
    assert!(letter.starts_with("Binary/") && !letter.contains("hospital.internal"));
    let mut client = broker.client().await;
    let mut stream = client
        .get_document(GetDocumentRequest {
            document_id: letter.clone(),
            requester: Some(clinician()),
        })
        .await
        .expect("the document")
        .into_inner();
    let mut content = Vec::new();
    let mut first = None;
    while let Some(chunk) = stream.message().await.expect("a chunk") {
        if first.is_none() {
            first = Some((chunk.content_type.clone(), chunk.length));
        }
        content.extend_from_slice(&chunk.data);
    }
    assert_eq!(first, Some(("text/plain".to_owned(), LETTER.len() as u64)));
    assert_eq!(content, LETTER.as_bytes());

    let status = client
        .get_document(GetDocumentRequest {
            document_id: "Binary/not-ours".into(),
            requester: Some(clinician()),
        })
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::NotFound);
}

// ---------------------------------------------------------------------------------------------
// The mock region: several organisations, one hung, one failing; gRPC and FHIR agree

/// The resources a List names, resolved in the Bundle.
fn list_items<'a>(bundle: &'a Value, title: &str) -> (Option<&'a Value>, Vec<&'a Value>) {
    let entries: Vec<&Value> = bundle["entry"].as_array().into_iter().flatten().collect();
    let list = entries
        .iter()
        .map(|e| &e["resource"])
        .find(|r| r["resourceType"] == "List" && r["title"] == title);
    let items = list
        .and_then(|l| l["entry"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|i| i["item"]["reference"].as_str())
        .filter_map(|reference| {
            entries.iter().map(|e| &e["resource"]).find(|r| {
                format!(
                    "{}/{}",
                    r["resourceType"].as_str().unwrap_or(""),
                    r["id"].as_str().unwrap_or("")
                ) == reference
            })
        })
        .collect();
    (list, items)
}

/// Every coding code of a FHIR resource's main concept, whatever its type.
fn codes_of(resource: &Value) -> std::collections::BTreeSet<String> {
    let concept = [
        "code",
        "medicationCodeableConcept",
        "type",
        "category",
        "appointmentType",
    ]
    .iter()
    .map(|k| &resource[*k])
    .find(|c| c.is_object() || c.is_array())
    .cloned()
    .unwrap_or(Value::Null);
    let concept = if concept.is_array() {
        concept[0].clone()
    } else {
        concept
    };
    concept["coding"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["code"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn over_the_region_the_bundle_carries_the_same_facts_as_grpc_with_a_hung_and_a_failing_organisation()
 {
    use carerecord_e2e::region::*;
    use carerecord_mock_sources::{Fault, FhirMode};
    use carerecord_proto::{CacheDirective, Section, SourceOutcome};

    let server = start_region(&small_region(11, 100)).await;
    let patient = server
        .region()
        .patients_known_to_at_least(4)
        .next()
        .expect("a patient known to four organisations");
    let hung = patient.organisations[1].clone();
    let failing = patient.organisations[2].clone();
    server
        .faults()
        .set_fault(&hung, Fault::Hang)
        .expect("known");
    server
        .faults()
        .set_fault(&failing, Fault::Http500)
        .expect("known");
    let config = region_config(&server, FhirMode::Search, Duration::from_millis(600));
    let broker = start_region_broker(&config).await;
    let face = start_fhir(broker.broker.clone()).await;

    let token = face.token(&clinician_claims());
    let nhs = patient.nhs_number.as_digits();
    let fhir = face
        .structured_record(&parameters(&nhs, vec![]), Some(&token))
        .await;
    assert_eq!(fhir.status, 200, "partial success is a 200: {}", fhir.body);
    // The same lookup on gRPC, served from the record the FHIR call merged.
    let mut request = fresh_request(&patient.nhs_number, Duration::from_secs(3));
    request.get_mut().cache = CacheDirective::AllowCached as i32;
    let grpc = broker.lookup(request).await;
    assert!(grpc.from_cache, "the same merged record");
    assert!(!grpc.complete);
    let outcome = |code: &str| {
        grpc.sources
            .iter()
            .find(|s| s.organisation_code == code)
            .map(|s| s.outcome)
    };
    assert_eq!(outcome(&hung), Some(SourceOutcome::Timeout as i32));
    assert_eq!(outcome(&failing), Some(SourceOutcome::Error as i32));

    let bundle = &fhir.body;
    let resources: Vec<&Value> = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| &e["resource"])
        .collect();
    // The patient.
    let record = grpc.record.clone().expect("a record");
    let p = record.patient.clone().expect("demographics");
    let fhir_patient = resources
        .iter()
        .find(|r| r["resourceType"] == "Patient")
        .expect("a Patient");
    assert_eq!(fhir_patient["identifier"][0]["value"], nhs.as_str());
    assert_eq!(fhir_patient["birthDate"], p.birth_date.as_str());
    // One issue per organisation that did not answer, naming it.
    let outcome_issues = resources
        .iter()
        .find(|r| r["resourceType"] == "OperationOutcome")
        .map(|r| r["issue"].to_string())
        .expect("an OperationOutcome");
    for (code, word) in [(&hung, "TIMEOUT"), (&failing, "ERROR")] {
        assert!(
            outcome_issues.contains(code.as_str()) && outcome_issues.contains(word),
            "{code} {word}: {outcome_issues}"
        );
    }
    // Every section: the same number of entries, the same codes; and an empty section says why.
    for section in Section::ALL {
        let entries = record.section(section);
        let (list, items) = list_items(bundle, section.title());
        let list = list.unwrap_or_else(|| panic!("a List for {}", section.title()));
        assert_eq!(items.len(), entries.len(), "{}", section.title());
        let grpc_codes: std::collections::BTreeSet<String> = entries
            .iter()
            .filter_map(|e| e.concept.as_ref().map(|c| c.code.clone()))
            .collect();
        let fhir_codes: std::collections::BTreeSet<String> =
            items.iter().flat_map(|r| codes_of(r)).collect();
        assert!(
            grpc_codes.is_subset(&fhir_codes),
            "{}: gRPC {grpc_codes:?} FHIR {fhir_codes:?}",
            section.title()
        );
        if entries.is_empty() {
            // Two organisations did not answer: never "nothing recorded".
            assert_eq!(
                list["emptyReason"]["coding"][0]["code"],
                "unavailable",
                "{}: {list}",
                section.title()
            );
        }
    }
    // Every clinical resource says who reported it.
    for r in &resources {
        let t = r["resourceType"].as_str().unwrap_or("");
        if [
            "Condition",
            "AllergyIntolerance",
            "MedicationStatement",
            "Observation",
        ]
        .contains(&t)
        {
            assert!(
                r["meta"]["source"].is_string(),
                "{t} without meta.source: {r}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mutual TLS: the calling system by its certificate, the person by the token it signed

#[tokio::test]
async fn under_mutual_tls_the_certificate_names_the_system_whose_key_verifies_the_token() {
    use carerecord_broker::config::SystemConfig;
    use carerecord_broker::fhir_api::token::{self, TokenKey};
    use carerecord_broker::fhir_api::{Face, FaceListener, FaceSettings, listen};
    use carerecord_e2e::pki::TestCa;

    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let audit_file = temp_path("fhir-mtls-audit.jsonl");
    let broker = start_broker(
        vec![(Arc::new(gp_source()) as Arc<dyn Source>, LONG)],
        Settings {
            audit_file: audit_file.clone(),
            ..Settings::default()
        },
    )
    .await;
    let ca = TestCa::new("carerecord FHIR test CA");
    let tls = carerecord_e2e::pki::server_tls(&ca);
    let private = token::generate("ed25519").expect("key");
    let public = TokenKey::from_pem(&token::public_pem(&private).expect("pem")).expect("parses");
    let system = SystemConfig {
        id: "rj122-epr".into(),
        dns_name: "epr.rj122.test".into(),
        trusted_assertions: true,
        token_key: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let base = format!("https://localhost:{port}/");
    let settings = FaceSettings {
        base_url: base.clone(),
        audience: AUDIENCE.to_owned(),
        max_token_lifetime: Duration::from_secs(300),
        systems: Some(vec![system]),
        keys: [("rj122-epr".to_owned(), public)].into(),
        unverified_key: None,
        max_document_bytes: 1024,
    };
    let listener = FaceListener::new(
        listener,
        Some(listen::tls_config(&tls).expect("TLS config")),
    )
    .expect("listener");
    let face = Arc::new(Face {
        broker: broker.broker.clone(),
        settings,
    });
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(carerecord_broker::fhir_api::serve(listener, face, async {
        let _ = stopped.await;
    }));

    let client_for = |leaf: Option<&carerecord_e2e::pki::Leaf>| {
        carerecord_e2e::pki::https_client(&ca, leaf, LONG)
    };
    let ask = |client: reqwest::Client, token: String| {
        let url = format!("{base}Patient/$getstructuredrecord");
        let body = parameters(&shared_patient().as_digits(), vec![]).to_string();
        async move {
            client
                .post(url)
                .header("content-type", "application/fhir+json")
                .bearer_auth(token)
                .body(body)
                .send()
                .await
        }
    };
    let mut claims = clinician_claims();
    claims["iss"] = json!("rj122-epr");
    claims["organisation"] = json!("RJ122");
    let signed = token::sign(&private, &claims).expect("signed");

    let epr = client_for(Some(&ca.client("epr.rj122.test")));
    let ok = ask(epr.clone(), signed.clone()).await.expect("answered");
    assert_eq!(ok.status(), 200);
    let bundle: Value = ok.json().await.expect("JSON");
    assert_eq!(bundle["resourceType"], "Bundle");

    // The same token from a certificate for another system: that system is not configured.
    let stranger = client_for(Some(&ca.client("stranger.example")));
    let refused = ask(stranger, signed.clone()).await.expect("answered");
    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.expect("JSON");
    assert_eq!(
        body["issue"][0]["details"]["coding"][0]["code"],
        "UNKNOWN_CALLING_SYSTEM"
    );
    // ...and the refusal is on the record, as on gRPC, under the user the token names.
    let trail = std::fs::read_to_string(&audit_file).expect("audit trail");
    let refusal = trail
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|l| l["event"].clone())
        .find(|e| e["kind"] == "denied" && e["system"] == "unknown")
        .expect("the unknown system's refusal is audited");
    assert_eq!(refusal["user_id"], "dr-test");
    assert_eq!(refusal["patient"], shared_patient().as_digits());
    // A token naming another issuer than the certificate's system.
    claims["iss"] = json!("unverified");
    let wrong_issuer = token::sign(&private, &claims).expect("signed");
    let refused = ask(epr, wrong_issuer).await.expect("answered");
    assert_eq!(refused.status(), 401);
    // No client certificate: no connection at all.
    assert!(ask(client_for(None), signed).await.is_err());
}

/// A document held behind a remote broker: the central broker's id opens to the remote's,
/// fetched with the remote's `GetDocument` (which makes its own access decision).
#[tokio::test]
async fn a_document_behind_a_federated_broker_is_fetched_through_both() {
    use carerecord_proto::GetDocumentRequest;
    let remote = start_broker(
        vec![(hospital_with_documents(), LONG)],
        Settings {
            broker_id: "north".into(),
            ..Settings::default()
        },
    )
    .await;
    let central = start_broker(
        vec![(remote_broker("north", &remote.url), LONG)],
        Settings::default(),
    )
    .await;
    let letter = discharge_summary_url(&central).await;
    let mut stream = central
        .client()
        .await
        .get_document(GetDocumentRequest {
            document_id: letter,
            requester: Some(clinician()),
        })
        .await
        .expect("the document")
        .into_inner();
    let mut content = Vec::new();
    while let Some(chunk) = stream.message().await.expect("a chunk") {
        content.extend_from_slice(&chunk.data);
    }
    assert_eq!(content, LETTER.as_bytes());
}
