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
