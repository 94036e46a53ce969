//! The FHIR adapter against a small FHIR server run in the test (axum on 127.0.0.1:0, plain HTTP
//! and TLS): real HTTP, real paging, real TLS handshakes, no external network.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use carerecord_adapters::fhir::{FhirConfig, FhirConfigError, FhirSource, QueryMode};
use carerecord_adapters::proto::{CareRecord, Purpose, Requester, Section};
use carerecord_adapters::{
    NhsNumber, SectionSet, Shortfall, Source, SourceError, SourceInfo, SourceRecord, SourceReply,
    SourceRequest,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::Instant;

const NHS: &str = "9990000018";
const FAR_FUTURE: &str = "2099-03-01T09:00:00Z";

// ---------------------------------------------------------------------------------------------
// The in-test FHIR server
// ---------------------------------------------------------------------------------------------

/// What the server does wrong, on requests whose path and query contain `at`.
#[derive(Clone)]
enum Fault {
    Status(u16),
    MalformedJson,
    NotABundle,
    Hang,
    Oversize { chunked: bool },
    BatchEntryStatus(u16),
    NextLinkElsewhere,
}

#[derive(Default)]
struct Fhir {
    patients: Vec<Value>,
    resources: Vec<Value>,
    page_size: usize,
    /// Answers every Patient search with all its patients (as a server that ignores an
    /// unsupported search parameter does).
    ignore_identifier: bool,
    delay: Duration,
    fault: Mutex<Option<(&'static str, Fault)>>,
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    base: OnceLock<String>,
}

#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
}

impl Fhir {
    fn with_standard_record() -> Fhir {
        Fhir {
            patients: vec![patient("p1", NHS)],
            resources: standard_resources(),
            page_size: 2,
            ..Fhir::default()
        }
    }

    fn fail(&self, at: &'static str, fault: Fault) {
        *self.fault.lock().unwrap() = Some((at, fault));
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn base(&self) -> &str {
        self.base.get().expect("server started")
    }

    fn search(&self, resource_type: &str, query: &[(String, String)]) -> Value {
        let param = |name: &str| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let date_from = param("date").and_then(|d| d.strip_prefix("ge"));
        let matches: Vec<&Value> = self
            .resources
            .iter()
            .filter(|r| r["resourceType"] == resource_type)
            .filter(|r| match (date_from, r["start"].as_str()) {
                (Some(from), Some(start)) => start >= from,
                _ => true,
            })
            .collect();
        let page: usize = param("_page").and_then(|p| p.parse().ok()).unwrap_or(1);
        let mut entries: Vec<Value> = matches
            .iter()
            .skip((page - 1) * self.page_size)
            .take(self.page_size)
            .map(|r| json!({"fullUrl": format!("{}/{}/{}", self.base(), resource_type, r["id"].as_str().unwrap_or("")), "resource": r, "search": {"mode": "match"}}))
            .collect();
        if param("_include").is_some() {
            for medication in self
                .resources
                .iter()
                .filter(|r| r["resourceType"] == "Medication")
            {
                entries.push(json!({"resource": medication, "search": {"mode": "include"}}));
            }
        }
        let mut links = vec![];
        if page * self.page_size < matches.len() {
            let rest: Vec<String> = query
                .iter()
                .filter(|(k, _)| k != "_page")
                .map(|(k, v)| format!("{k}={}", encode(v)))
                .collect();
            links.push(json!({"relation": "next", "url": format!("{}/{resource_type}?{}&_page={}", self.base(), rest.join("&"), page + 1)}));
        }
        json!({"resourceType": "Bundle", "type": "searchset", "total": matches.len(), "link": links, "entry": entries})
    }

    fn everything(&self, id: &str, query: &[(String, String)]) -> Value {
        let page: usize = query
            .iter()
            .find(|(k, _)| k == "_page")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(1);
        let mut all: Vec<Value> = self.patients.clone();
        all.extend(self.resources.iter().cloned());
        all.push(
            json!({"resourceType": "Practitioner", "id": "pr1", "name": [{"family": "Patel"}]}),
        );
        let entries: Vec<Value> = all
            .iter()
            .skip((page - 1) * self.page_size)
            .take(self.page_size)
            .map(|r| json!({"resource": r}))
            .collect();
        let mut links = vec![];
        if page * self.page_size < all.len() {
            // A relative link, unlike the searches' absolute ones.
            links.push(json!({"relation": "next", "url": format!("Patient/{id}/$everything?_page={}", page + 1)}));
        }
        json!({"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries})
    }

    fn batch(&self, body: &[u8]) -> Value {
        let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let fault = self.fault.lock().unwrap().clone();
        let entries: Vec<Value> = request["entry"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|entry| {
                let url = entry["request"]["url"].as_str().unwrap_or("");
                assert_eq!(entry["request"]["method"], "GET");
                if let Some((at, Fault::BatchEntryStatus(status))) = &fault
                    && url.contains(at)
                {
                    return json!({"response": {"status": format!("{status} Error")}});
                }
                let (resource_type, query) = url.split_once('?').unwrap_or((url, ""));
                let query = parse_query(query);
                json!({"resource": self.search(resource_type, &query), "response": {"status": "200 OK"}})
            })
            .collect();
        json!({"resourceType": "Bundle", "type": "batch-response", "entry": entries})
    }
}

struct InFlight<'a>(&'a Fhir);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    State(fhir): State<Arc<Fhir>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path_and_query = uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    fhir.seen.lock().unwrap().push(Seen {
        method: method.clone(),
        path_and_query: path_and_query.clone(),
        headers: headers.clone(),
    });
    let now = fhir.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    fhir.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _guard = InFlight(&fhir);
    if !fhir.delay.is_zero() {
        tokio::time::sleep(fhir.delay).await;
    }
    let fault = fhir.fault.lock().unwrap().clone();
    if let Some((at, fault)) = fault
        && (path_and_query.contains(at) || (method == Method::POST && at == "batch"))
    {
        match fault {
            Fault::Status(code) => {
                return (
                    StatusCode::from_u16(code).unwrap(),
                    "Patient 9990000018 exploded",
                )
                    .into_response();
            }
            Fault::MalformedJson => {
                return fhir_json(r#"{"resourceType": "Bundle", "entry": [{"#.into());
            }
            Fault::NotABundle => {
                return fhir_json(
                    json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing"}]})
                        .to_string(),
                );
            }
            Fault::Hang => std::future::pending::<()>().await,
            Fault::Oversize { chunked } => {
                let chunk = Bytes::from(vec![b' '; 64 * 1024]);
                return if chunked {
                    let chunks = (0..32).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
                    Response::new(Body::from_stream(futures::stream::iter(chunks)))
                } else {
                    Response::new(Body::from(vec![b' '; 2 * 1024 * 1024]))
                };
            }
            Fault::NextLinkElsewhere => {
                return fhir_json(
                    json!({"resourceType": "Bundle", "type": "searchset",
                           "link": [{"relation": "next", "url": "http://attacker.invalid/collect?page=2"}],
                           "entry": []})
                    .to_string(),
                );
            }
            Fault::BatchEntryStatus(_) => {}
        }
    }
    let query = parse_query(uri.query().unwrap_or(""));
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let answer = match (method, segments.as_slice()) {
        (Method::GET, ["fhir", "Patient"]) => {
            let identifier = query
                .iter()
                .find(|(k, _)| k == "identifier")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let entries: Vec<Value> = fhir
                .patients
                .iter()
                .filter(|p| {
                    fhir.ignore_identifier
                        || identifier
                            == format!(
                                "https://fhir.nhs.uk/Id/nhs-number|{}",
                                p["identifier"][0]["value"].as_str().unwrap_or("")
                            )
                })
                .map(|p| json!({"resource": p, "search": {"mode": "match"}}))
                .collect();
            json!({"resourceType": "Bundle", "type": "searchset", "entry": entries})
        }
        (Method::GET, ["fhir", "Patient", id, "$everything"]) => fhir.everything(id, &query),
        (Method::GET, ["fhir", resource_type]) => fhir.search(resource_type, &query),
        (Method::POST, ["fhir"]) => fhir.batch(&body),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    fhir_json(answer.to_string())
}

fn fhir_json(body: String) -> Response {
    ([("content-type", "application/fhir+json")], body).into_response()
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://x/?{query}"))
        .map(|u| {
            u.query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn encode(value: &str) -> String {
    let mut url = reqwest::Url::parse("http://x/").expect("static");
    url.query_pairs_mut().append_pair("v", value);
    url.query()
        .unwrap_or("")
        .trim_start_matches("v=")
        .to_owned()
}

fn router(fhir: Arc<Fhir>) -> Router {
    Router::new().fallback(handle).with_state(fhir)
}

/// Starts a plain-HTTP server; returns it and its FHIR base URL.
async fn serve(fhir: Fhir) -> (Arc<Fhir>, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}/fhir", listener.local_addr().expect("addr"));
    fhir.base.set(base.clone()).expect("fresh server");
    let fhir = Arc::new(fhir);
    let app = router(fhir.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (fhir, base)
}

// ---------------------------------------------------------------------------------------------
// Test data: one patient's UK Core shaped record
// ---------------------------------------------------------------------------------------------

fn patient(id: &str, nhs: &str) -> Value {
    json!({
        "resourceType": "Patient", "id": id,
        "meta": {"lastUpdated": "2024-01-01T00:00:00Z"},
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs}],
        "name": [{"use": "official", "family": "Smith", "given": ["Richard"]}],
        "gender": "male", "birthDate": "1954-10-03",
        "address": [{"use": "home", "line": ["100 Chequers Lane"], "city": "Leeds", "postalCode": "LS10 1AB"}],
        "generalPractitioner": [{"identifier": {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "Y12345"}}]
    })
}

fn snomed(code: &str, display: &str) -> Value {
    json!({"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]})
}

fn standard_resources() -> Vec<Value> {
    let subject = json!({"reference": "Patient/p1"});
    vec![
        json!({"resourceType": "Condition", "id": "c1", "subject": subject, "code": snomed("44054006", "Type 2 diabetes mellitus"), "onsetDateTime": "2019"}),
        json!({"resourceType": "Condition", "id": "c2", "subject": subject, "code": snomed("38341003", "Hypertension"), "onsetDateTime": "2015-04-01"}),
        json!({"resourceType": "Condition", "id": "c3", "subject": subject, "code": snomed("195967001", "Asthma"), "onsetPeriod": {"start": "1990"}}),
        json!({"resourceType": "Condition", "id": "c4", "subject": subject, "code": snomed("35489007", "Depressive disorder")}),
        json!({"resourceType": "Condition", "id": "c5", "subject": subject, "code": snomed("13645005", "COPD")}),
        json!({"resourceType": "AllergyIntolerance", "id": "a1", "patient": subject, "code": snomed("91936005", "Penicillin allergy"), "criticality": "high",
               "reaction": [{"manifestation": [snomed("39579001", "Anaphylaxis")]}]}),
        json!({"resourceType": "MedicationStatement", "id": "ms1", "subject": subject, "status": "active",
               "medicationCodeableConcept": {"coding": [{"system": "https://dmd.nhs.uk", "code": "325278007", "display": "Metformin 500mg tablets"}]},
               "dosage": [{"text": "One tablet twice a day"}]}),
        json!({"resourceType": "MedicationRequest", "id": "mr1", "subject": subject, "status": "active", "intent": "order",
               "medicationReference": {"reference": "Medication/med1"}, "authoredOn": "2024-02-01"}),
        json!({"resourceType": "Medication", "id": "med1", "code": {"coding": [{"system": "https://dmd.nhs.uk", "code": "39732311000001104", "display": "Amlodipine 5mg tablets"}]}}),
        json!({"resourceType": "Observation", "id": "o1", "subject": subject, "status": "final", "code": snomed("1049301000000100", "HbA1c level"),
               "valueQuantity": {"value": 48, "unit": "mmol/mol"}, "effectiveDateTime": "2024-03-01"}),
        json!({"resourceType": "Observation", "id": "o2", "subject": subject, "status": "final", "code": snomed("27113001", "Body weight"),
               "valueQuantity": {"value": 81.2, "unit": "kg"}}),
        json!({"resourceType": "DiagnosticReport", "id": "dr1", "subject": subject, "status": "final", "code": snomed("399208008", "Chest X-ray"),
               "conclusion": "No acute abnormality"}),
        json!({"resourceType": "CarePlan", "id": "cp1", "subject": subject, "status": "active", "title": "Diabetes care plan"}),
        json!({"resourceType": "Composition", "id": "comp1", "subject": subject, "status": "final", "type": snomed("373942005", "Discharge summary"),
               "title": "Discharge summary", "date": "2024-02-03T12:00:00Z"}),
        json!({"resourceType": "DocumentReference", "id": "d1", "subject": subject, "status": "current", "type": snomed("373942005", "Discharge summary"),
               "date": "2024-02-03T12:00:00Z"}),
        json!({"resourceType": "Encounter", "id": "e1", "subject": subject, "status": "finished",
               "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER"},
               "period": {"start": "2024-05-01T02:10:00Z"}}),
        json!({"resourceType": "Appointment", "id": "ap1", "status": "booked", "start": FAR_FUTURE,
               "serviceType": [snomed("310123008", "Diabetic medicine service")],
               "participant": [{"actor": {"reference": "Patient/p1"}}]}),
        json!({"resourceType": "Appointment", "id": "ap-past", "status": "fulfilled", "start": "2001-01-01T09:00:00Z",
               "description": "Long ago", "participant": [{"actor": {"reference": "Patient/p1"}}]}),
    ]
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn info() -> SourceInfo {
    SourceInfo {
        id: "leeds-gp".into(),
        organisation_code: "Y12345".into(),
        organisation_name: "Chequers Lane Surgery".into(),
    }
}

fn source(base: &str, configure: impl FnOnce(&mut FhirConfig)) -> FhirSource {
    let mut config = FhirConfig::new(base);
    configure(&mut config);
    FhirSource::new(info(), &config).expect("valid config")
}

fn request(within: Duration) -> SourceRequest {
    SourceRequest {
        request_id: "req-123".into(),
        nhs_number: NhsNumber::parse(NHS).expect("valid"),
        sections: SectionSet::ALL,
        deadline: Instant::now() + within,
        requester: Requester {
            user_id: "555123456789".into(),
            user_name: "Dr Test".into(),
            role_code: "R8000".into(),
            organisation_code: "RJ1".into(),
            purpose: Purpose::DirectCare as i32,
            emergency_reason: String::new(),
            ..Requester::default()
        },
        via_brokers: vec![],
    }
}

const WITHIN: Duration = Duration::from_secs(5);

fn found(reply: Result<SourceReply, SourceError>) -> SourceRecord {
    match reply {
        Ok(SourceReply::Found(record)) => record,
        other => panic!("expected a record, got {other:?}"),
    }
}

/// Entry ids per section, sorted: what a lookup found, independent of order.
fn ids(record: &CareRecord) -> BTreeMap<&'static str, Vec<String>> {
    Section::ALL
        .iter()
        .map(|s| {
            let mut ids: Vec<String> = record
                .section(*s)
                .iter()
                .map(|e| e.provenance[0].source_entry_id.clone())
                .collect();
            ids.sort();
            (s.short_name(), ids)
        })
        .collect()
}

fn sorted(mut record: CareRecord) -> CareRecord {
    for section in Section::ALL {
        if let Some(entries) = record.section_mut(section) {
            entries.sort_by(|a, b| {
                a.provenance[0]
                    .source_entry_id
                    .cmp(&b.provenance[0].source_entry_id)
            });
        }
    }
    record
}

// ---------------------------------------------------------------------------------------------
// Lookups
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn search_mode_reads_every_section_across_pages() {
    let (fhir, base) = serve(Fhir::with_standard_record()).await;
    let record = found(source(&base, |_| {}).fetch(&request(WITHIN)).await);
    assert!(record.warnings.is_empty(), "{:?}", record.warnings);
    let ids = ids(&record.record);
    assert_eq!(
        ids["conditions"],
        ["c1", "c2", "c3", "c4", "c5"],
        "five conditions over three pages"
    );
    assert_eq!(ids["allergies"], ["a1"]);
    assert_eq!(ids["medications"], ["mr1", "ms1"]);
    assert_eq!(ids["test_results"], ["dr1", "o1", "o2"]);
    assert_eq!(ids["care_plans"], ["cp1"]);
    assert_eq!(ids["documents"], ["comp1", "d1"]);
    assert_eq!(ids["encounters"], ["e1"]);
    assert_eq!(ids["appointments"], ["ap1"], "future appointments only");

    let patient = record.record.patient.as_ref().expect("demographics");
    assert_eq!(patient.nhs_number, NHS);
    assert_eq!(patient.family_name, "Smith");
    assert_eq!(patient.registered_gp_code, "Y12345");
    assert_eq!(patient.address, "100 Chequers Lane, Leeds, LS10 1AB");

    let amlodipine = record
        .record
        .medications
        .iter()
        .find(|e| e.provenance[0].source_entry_id == "mr1")
        .expect("mr1");
    assert_eq!(
        amlodipine.concept.as_ref().map(|c| c.display.as_str()),
        Some("Amlodipine 5mg tablets"),
        "medicationReference resolved through _include"
    );
    let provenance = &record.record.conditions[0].provenance[0];
    assert_eq!(provenance.source_id, "leeds-gp");
    assert_eq!(provenance.organisation_code, "Y12345");
    assert_eq!(provenance.organisation_name, "Chequers Lane Surgery");

    let condition_pages = fhir
        .seen()
        .iter()
        .filter(|s| s.path_and_query.starts_with("/fhir/Condition?"))
        .count();
    assert_eq!(condition_pages, 3);
    let appointment_search = fhir
        .seen()
        .into_iter()
        .find(|s| s.path_and_query.starts_with("/fhir/Appointment?"))
        .expect("appointments searched");
    assert!(
        appointment_search.path_and_query.contains("date=ge"),
        "{}",
        appointment_search.path_and_query
    );
}

#[tokio::test]
async fn search_everything_and_batch_give_the_same_record() {
    let (fhir, base) = serve(Fhir::with_standard_record()).await;
    let search = found(source(&base, |_| {}).fetch(&request(WITHIN)).await);
    let everything = found(
        source(&base, |c| c.mode = QueryMode::Everything)
            .fetch(&request(WITHIN))
            .await,
    );
    let batch = found(
        source(&base, |c| c.mode = QueryMode::Batch)
            .fetch(&request(WITHIN))
            .await,
    );
    assert!(everything.warnings.is_empty(), "{:?}", everything.warnings);
    assert!(batch.warnings.is_empty(), "{:?}", batch.warnings);
    assert_eq!(search.record.entry_count(), 16);
    assert!(
        search
            .record
            .documents
            .iter()
            .any(|d| d.provenance[0].source_entry_id == "comp1"),
        "search asks for Compositions too, as $everything returns them"
    );
    assert_eq!(sorted(everything.record), sorted(search.record.clone()));
    assert_eq!(sorted(batch.record), sorted(search.record));

    let seen = fhir.seen();
    assert!(
        seen.iter()
            .any(|s| s.path_and_query == "/fhir/Patient/p1/$everything?_page=2"),
        "relative next link followed"
    );
    let posts: Vec<_> = seen.iter().filter(|s| s.method == Method::POST).collect();
    assert_eq!(posts.len(), 1, "one batch request");
    assert_eq!(posts[0].path_and_query, "/fhir");
    assert!(
        seen.iter().any(|s| s.method == Method::GET
            && s.path_and_query.starts_with("/fhir/Condition?")
            && s.path_and_query.contains("_page=2")),
        "later pages of a batch answer fetched with GET"
    );
}

#[tokio::test]
async fn only_wanted_sections_are_searched() {
    let (fhir, base) = serve(Fhir::with_standard_record()).await;
    let mut req = request(WITHIN);
    req.sections = SectionSet::NONE.with(Section::Allergies);
    let record = found(source(&base, |_| {}).fetch(&req).await);
    assert_eq!(record.record.entry_count(), 1);
    let paths: Vec<String> = fhir.seen().into_iter().map(|s| s.path_and_query).collect();
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert!(
        paths[1].starts_with("/fhir/AllergyIntolerance?patient=p1&_count=100"),
        "{paths:?}"
    );
}

#[tokio::test]
async fn unknown_patient_is_not_found_not_an_error() {
    let (fhir, base) = serve(Fhir {
        patients: vec![],
        ..Fhir::with_standard_record()
    })
    .await;
    let reply = source(&base, |_| {}).fetch(&request(WITHIN)).await;
    assert!(matches!(reply, Ok(SourceReply::NotFound)), "{reply:?}");
    let seen = fhir.seen();
    assert_eq!(seen.len(), 1, "nothing else asked");
    assert_eq!(
        seen[0].path_and_query,
        "/fhir/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9990000018",
        "the system|value separator is percent-encoded"
    );
}

#[tokio::test]
async fn a_server_ignoring_the_identifier_search_does_not_yield_someone_else() {
    // Only someone else comes back: that is an answer about another patient, not "not found"
    // (which a clinician would believe).
    let (_fhir, base) = serve(Fhir {
        patients: vec![patient("other", "9434765919")],
        ignore_identifier: true,
        ..Fhir::with_standard_record()
    })
    .await;
    let reply = source(&base, |_| {}).fetch(&request(WITHIN)).await;
    assert!(
        matches!(reply, Err(SourceError::WrongPatient(_))),
        "{reply:?}"
    );

    // Ours among others: ours is used, the others are rejected and reported.
    let (_fhir, base) = serve(Fhir {
        patients: vec![patient("other", "9434765919"), patient("p1", NHS)],
        ignore_identifier: true,
        ..Fhir::with_standard_record()
    })
    .await;
    let record = found(source(&base, |_| {}).fetch(&request(WITHIN)).await);
    assert_eq!(record.record.conditions.len(), 5);
    assert_eq!(record.wrong_patient.len(), 1, "{:?}", record.wrong_patient);
    assert!(!record.wrong_patient[0].contains("9434765919"));
}

#[tokio::test]
async fn two_patient_records_use_the_active_one_and_warn() {
    let mut inactive = patient("old", NHS);
    inactive["active"] = json!(false);
    let (_fhir, base) = serve(Fhir {
        patients: vec![inactive, patient("p1", NHS)],
        ..Fhir::with_standard_record()
    })
    .await;
    let record = found(source(&base, |_| {}).fetch(&request(WITHIN)).await);
    assert_eq!(
        record
            .record
            .patient
            .as_ref()
            .map(|p| p.provenance[0].source_entry_id.as_str()),
        Some("p1")
    );
    assert_eq!(record.record.conditions.len(), 5);
    assert!(
        record
            .warnings
            .iter()
            .any(|w| w.contains("2 patient records")),
        "{:?}",
        record.warnings
    );
}

#[tokio::test]
async fn page_limit_stops_paging_with_a_warning() {
    let (_fhir, base) = serve(Fhir::with_standard_record()).await;
    let record = found(
        source(&base, |c| c.page_limit = 2)
            .fetch(&request(WITHIN))
            .await,
    );
    assert_eq!(record.record.conditions.len(), 4, "two pages of two");
    assert_eq!(
        record.warnings,
        vec!["Condition results run past 2 pages; later pages were not read".to_owned()]
    );
    assert_eq!(
        record.shortfalls,
        vec![Shortfall {
            sections: SectionSet::NONE.with(Section::Conditions),
            reason: "Condition results run past 2 pages; later pages were not read".into(),
        }],
        "the cut is a shortfall: the source is PARTIAL, not complete"
    );
}

#[tokio::test]
async fn malformed_resources_are_warnings_and_the_rest_is_kept() {
    let mut fhir = Fhir::with_standard_record();
    fhir.resources
        .push(json!({"resourceType": "Condition", "id": "bad1", "subject": {"reference": "Patient/p1"}, "code": "not-a-concept"}));
    fhir.resources.push(json!({"resourceType": "Condition", "id": "bad2", "subject": {"reference": "Patient/p1"}, "onsetDateTime": "2020"}));
    let (_fhir, base) = serve(fhir).await;
    let record = found(source(&base, |_| {}).fetch(&request(WITHIN)).await);
    assert_eq!(record.record.conditions.len(), 5);
    assert_eq!(
        record.warnings,
        vec!["2 Condition resources could not be read".to_owned()]
    );
    assert_eq!(
        record.shortfalls,
        vec![Shortfall {
            sections: SectionSet::NONE.with(Section::Conditions),
            reason: "2 Condition resources could not be read".into(),
        }]
    );
}

// ---------------------------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn server_error_is_a_status_error() {
    let (fhir, base) = serve(Fhir::with_standard_record()).await;
    fhir.fail("/fhir/Observation", Fault::Status(500));
    let reply = source(&base, |_| {}).fetch(&request(WITHIN)).await;
    assert_eq!(reply.err(), Some(SourceError::Status(500)));
}

#[tokio::test]
async fn a_server_that_cannot_search_composition_still_answers() {
    let (fhir, base) = serve(Fhir::with_standard_record()).await;
    fhir.fail("/fhir/Composition", Fault::Status(404));
    let record = found(source(&base, |_| {}).fetch(&request(WITHIN)).await);
    assert_eq!(ids(&record.record)["documents"], ["d1"]);
    assert!(record.shortfalls.is_empty(), "{:?}", record.shortfalls);

    let (fhir, base) = serve(Fhir::with_standard_record()).await;
    fhir.fail("Composition", Fault::BatchEntryStatus(501));
    let record = found(
        source(&base, |c| c.mode = QueryMode::Batch)
            .fetch(&request(WITHIN))
            .await,
    );
    assert_eq!(ids(&record.record)["documents"], ["d1"]);

    // Any other search failing still fails the source: its data would be missing unmarked.
    let (fhir, base) = serve(Fhir::with_standard_record()).await;
    fhir.fail("/fhir/DocumentReference", Fault::Status(404));
    let reply = source(&base, |_| {}).fetch(&request(WITHIN)).await;
    assert_eq!(reply.err(), Some(SourceError::Status(404)));
}

#[tokio::test]
async fn failing_batch_entry_is_a_status_error() {
    let (fhir, base) = serve(Fhir::with_standard_record()).await;
    fhir.fail("CarePlan", Fault::BatchEntryStatus(403));
    let reply = source(&base, |c| c.mode = QueryMode::Batch)
        .fetch(&request(WITHIN))
        .await;
    assert_eq!(reply.err(), Some(SourceError::Status(403)));
}

#[tokio::test]
async fn malformed_json_is_an_invalid_response() {
    let (fhir, base) = serve(Fhir::with_standard_record()).await;
    fhir.fail("/fhir/Condition", Fault::MalformedJson);
    let reply = source(&base, |_| {}).fetch(&request(WITHIN)).await;
    assert_eq!(
        reply.err(),
        Some(SourceError::InvalidResponse(
            "body is truncated JSON".into()
        ))
    );
}

#[tokio::test]
async fn a_resource_that_is_not_a_bundle_is_an_invalid_response() {
    let (fhir, base) = serve(Fhir::with_standard_record()).await;
    fhir.fail("$everything", Fault::NotABundle);
    let reply = source(&base, |c| c.mode = QueryMode::Everything)
        .fetch(&request(WITHIN))
        .await;
    assert_eq!(
        reply.err(),
        Some(SourceError::InvalidResponse(
            "expected a FHIR Bundle".into()
        ))
    );
}

#[tokio::test]
async fn next_links_to_another_host_are_not_followed() {
    let (fhir, base) = serve(Fhir::with_standard_record()).await;
    fhir.fail("/fhir/Encounter", Fault::NextLinkElsewhere);
    let reply = source(&base, |_| {}).fetch(&request(WITHIN)).await;
    assert!(
        matches!(reply, Err(SourceError::InvalidResponse(ref m)) if m.contains("outside")),
        "{reply:?}"
    );
}

#[tokio::test]
async fn a_hanging_server_times_out_at_the_deadline() {
    let (fhir, base) = serve(Fhir::with_standard_record()).await;
    fhir.fail("/fhir/Condition", Fault::Hang);
    let started = Instant::now();
    let reply = source(&base, |_| {})
        .fetch(&request(Duration::from_millis(200)))
        .await;
    let took = started.elapsed();
    assert_eq!(reply.err(), Some(SourceError::Timeout));
    assert!(
        took >= Duration::from_millis(190),
        "answered early: {took:?}"
    );
    assert!(
        took < Duration::from_millis(1000),
        "answered late: {took:?}"
    );
}

#[tokio::test]
async fn a_dropped_lookup_releases_its_request_slots() {
    let (fhir, base) = serve(Fhir::with_standard_record()).await;
    fhir.fail("/fhir/Condition", Fault::Hang);
    let source = source(&base, |c| c.max_concurrent_requests = 1);
    // The broker drops the future at its own deadline, before the source's.
    let dropped =
        tokio::time::timeout(Duration::from_millis(150), source.fetch(&request(WITHIN))).await;
    assert!(dropped.is_err(), "the lookup hangs");
    *fhir.fault.lock().unwrap() = None;
    let record = found(
        tokio::time::timeout(WITHIN, source.fetch(&request(WITHIN)))
            .await
            .expect("answers"),
    );
    assert_eq!(record.record.conditions.len(), 5);
}

#[tokio::test]
async fn oversize_bodies_are_refused() {
    for chunked in [false, true] {
        let (fhir, base) = serve(Fhir::with_standard_record()).await;
        fhir.fail("/fhir/Observation", Fault::Oversize { chunked });
        let reply = source(&base, |c| c.max_response_bytes = 256 * 1024)
            .fetch(&request(WITHIN))
            .await;
        assert_eq!(
            reply.err(),
            Some(SourceError::TooLarge(256 * 1024)),
            "chunked: {chunked}"
        );
    }
}

#[tokio::test]
async fn unreachable_source_is_a_redacted_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let reply = source(&format!("http://{addr}/fhir"), |_| {})
        .fetch(&request(WITHIN))
        .await;
    let Err(SourceError::Connect(message)) = reply else {
        panic!("expected a connect error, got {reply:?}");
    };
    assert!(
        !message.contains(NHS) && !message.contains("http://"),
        "{message}"
    );
}

#[tokio::test]
async fn requests_in_flight_are_capped_per_source() {
    let (fhir, base) = serve(Fhir {
        delay: Duration::from_millis(30),
        ..Fhir::with_standard_record()
    })
    .await;
    let record = found(
        source(&base, |c| c.max_concurrent_requests = 2)
            .fetch(&request(WITHIN))
            .await,
    );
    assert_eq!(record.record.conditions.len(), 5);
    assert_eq!(
        fhir.max_in_flight.load(Ordering::SeqCst),
        2,
        "searches run concurrently, two at a time"
    );
}

// ---------------------------------------------------------------------------------------------
// Headers and credentials
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn requester_and_token_are_sent_on_every_request() {
    let (fhir, base) = serve(Fhir::with_standard_record()).await;
    let source = source(&base, |c| c.mode = QueryMode::Batch)
        .with_bearer_token("s3cret-token")
        .expect("valid token");
    let mut req = request(WITHIN);
    req.requester.purpose = Purpose::EmergencyAccess as i32;
    req.requester.emergency_reason = "Unconscious in ED".into();
    found(source.fetch(&req).await);
    let seen = fhir.seen();
    assert!(seen.len() >= 3, "patient search, batch, later pages");
    for s in &seen {
        let h = |name: &str| {
            s.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("<missing>")
        };
        assert_eq!(h("x-request-id"), "req-123", "{}", s.path_and_query);
        assert_eq!(h("x-carerecord-user"), "555123456789");
        assert_eq!(h("x-carerecord-role"), "R8000");
        assert_eq!(h("x-carerecord-organisation"), "RJ1");
        assert_eq!(h("x-carerecord-purpose"), "emergency-access");
        assert_eq!(h("authorization"), "Bearer s3cret-token");
        assert_eq!(h("accept"), "application/fhir+json");
        assert!(
            !s.headers
                .values()
                .any(|v| v.to_str().is_ok_and(|v| v.contains("Unconscious"))),
            "the free-text reason stays in the broker's audit"
        );
    }
    let post = seen
        .iter()
        .find(|s| s.method == Method::POST)
        .expect("batch");
    assert_eq!(
        post.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/fhir+json")
    );
}

#[tokio::test]
async fn bearer_token_comes_from_the_named_environment_variable() {
    let (fhir, base) = serve(Fhir::with_standard_record()).await;
    // PATH is set in any environment that runs tests; setting a variable of our own is unsafe
    // in edition 2024.
    let mut config = FhirConfig::new(&base);
    config.bearer_token_env = Some("PATH".into());
    let expected = std::env::var("PATH").expect("PATH is set");
    let source = FhirSource::new(info(), &config).expect("variable is set");
    found(source.fetch(&request(WITHIN)).await);
    let seen = fhir.seen();
    assert_eq!(
        seen[0]
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some(format!("Bearer {}", expected.trim()).as_str())
    );

    config.bearer_token_env = Some("CARERECORD_FHIR_TEST_UNSET_VARIABLE".into());
    let err = FhirSource::new(info(), &config).expect_err("unset variable");
    assert!(
        matches!(err, FhirConfigError::TokenEnvMissing { ref var } if var == "CARERECORD_FHIR_TEST_UNSET_VARIABLE"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

mod tls {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::TlsAcceptor;

    struct Ca(CertifiedIssuer<'static, KeyPair>);

    struct Leaf {
        cert: CertificateDer<'static>,
        cert_pem: String,
        key_pem: String,
        key_der: Vec<u8>,
    }

    impl Ca {
        fn new(name: &str) -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            Ca(
                CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key"))
                    .expect("CA"),
            )
        }

        fn issue(&self, san: &str, usage: ExtendedKeyUsagePurpose) -> Leaf {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(vec![san.to_owned()]).expect("params");
            params.distinguished_name.push(DnType::CommonName, san);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &self.0).expect("signed");
            Leaf {
                cert: cert.der().clone(),
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
                key_der: key.serialize_der(),
            }
        }

        fn pem(&self) -> String {
            self.0.pem()
        }

        fn der(&self) -> CertificateDer<'static> {
            self.0.der().clone()
        }
    }

    /// A scratch directory for PEM files, removed on drop.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("carerecord-fhir-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            Scratch(dir)
        }
        fn write(&self, file: &str, contents: &str) -> PathBuf {
            let path = self.0.join(file);
            std::fs::write(&path, contents).expect("write PEM");
            path
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    struct TlsListener {
        tcp: TcpListener,
        acceptor: TlsAcceptor,
    }

    impl axum::serve::Listener for TlsListener {
        type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
        type Addr = std::net::SocketAddr;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            loop {
                let Ok((tcp, addr)) = self.tcp.accept().await else {
                    continue;
                };
                // Failed handshakes (the refusals under test) are skipped.
                if let Ok(tls) = self.acceptor.accept(tcp).await {
                    return (tls, addr);
                }
            }
        }

        fn local_addr(&self) -> std::io::Result<Self::Addr> {
            self.tcp.local_addr()
        }
    }

    /// Starts an HTTPS server presenting `leaf`, optionally requiring client certificates
    /// issued by `client_ca`. Returns its FHIR base URL.
    async fn serve_tls(leaf: &Leaf, client_ca: Option<&Ca>) -> String {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocols");
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.der()).expect("root");
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .expect("verifier");
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let key = PrivateKeyDer::try_from(leaf.key_der.clone()).expect("key");
        let config = builder
            .with_single_cert(vec![leaf.cert.clone()], key)
            .expect("server config");
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!(
            "https://127.0.0.1:{}/fhir",
            tcp.local_addr().expect("addr").port()
        );
        let fhir = Fhir::with_standard_record();
        fhir.base.set(base.clone()).expect("fresh");
        let listener = TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        };
        let app = router(Arc::new(fhir));
        tokio::spawn(async move { axum::serve(listener, app).await });
        base
    }

    #[tokio::test]
    async fn https_with_a_private_ca_works() {
        let ca = Ca::new("carerecord test CA");
        let server = ca.issue("127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth);
        let scratch = Scratch::new("private-ca");
        let ca_path = scratch.write("ca.pem", &ca.pem());
        let base = serve_tls(&server, None).await;
        let record = found(
            source(&base, |c| c.ca_cert = Some(ca_path))
                .fetch(&request(WITHIN))
                .await,
        );
        assert_eq!(record.record.conditions.len(), 5);
    }

    #[tokio::test]
    async fn a_server_certificate_from_another_ca_is_refused() {
        let trusted = Ca::new("trusted CA");
        let other = Ca::new("someone else's CA");
        let server = other.issue("127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth);
        let scratch = Scratch::new("other-ca");
        let ca_path = scratch.write("ca.pem", &trusted.pem());
        let base = serve_tls(&server, None).await;
        let reply = source(&base, |c| c.ca_cert = Some(ca_path))
            .fetch(&request(WITHIN))
            .await;
        let Err(SourceError::Connect(message)) = reply else {
            panic!("expected a connect error, got {reply:?}");
        };
        assert!(
            message.contains("certificate"),
            "the cause survives redaction: {message}"
        );
        assert!(
            !message.contains(NHS) && !message.contains("https://"),
            "{message}"
        );

        // Nor is it trusted by the default (Mozilla) roots.
        let reply = source(&base, |_| {}).fetch(&request(WITHIN)).await;
        assert!(matches!(reply, Err(SourceError::Connect(_))), "{reply:?}");
    }

    #[tokio::test]
    async fn mutual_tls_needs_the_configured_client_certificate() {
        let ca = Ca::new("carerecord test CA");
        let server = ca.issue("127.0.0.1", ExtendedKeyUsagePurpose::ServerAuth);
        let client = ca.issue("carerecord-broker", ExtendedKeyUsagePurpose::ClientAuth);
        let scratch = Scratch::new("mtls");
        let ca_path = scratch.write("ca.pem", &ca.pem());
        let cert_path = scratch.write("client.pem", &client.cert_pem);
        let key_path = scratch.write("client.key", &client.key_pem);
        let base = serve_tls(&server, Some(&ca)).await;

        let with_identity = source(&base, |c| {
            c.ca_cert = Some(ca_path.clone());
            c.client_cert = Some(cert_path.clone());
            c.client_key = Some(key_path.clone());
        });
        let record = found(with_identity.fetch(&request(WITHIN)).await);
        assert_eq!(record.record.allergies.len(), 1);

        let without = source(&base, |c| c.ca_cert = Some(ca_path.clone()));
        let reply = without.fetch(&request(WITHIN)).await;
        assert!(matches!(reply, Err(SourceError::Connect(_))), "{reply:?}");
    }

    #[test]
    fn certificate_file_problems_name_the_file() {
        let scratch = Scratch::new("bad-pem");
        let not_pem = scratch.write("ca.pem", "this is not a certificate\n");
        let mut config = FhirConfig::new("https://fhir.example/R4");
        config.ca_cert = Some(not_pem.clone());
        let err = FhirSource::new(info(), &config).expect_err("no certificate in file");
        assert!(
            err.to_string().contains(&*not_pem.to_string_lossy()),
            "{err}"
        );

        let ca = Ca::new("carerecord test CA");
        let client = ca.issue("broker", ExtendedKeyUsagePurpose::ClientAuth);
        let cert_path = scratch.write("client.pem", &client.cert_pem);
        let mut config = FhirConfig::new("https://fhir.example/R4");
        config.client_cert = Some(cert_path.clone());
        config.client_key = Some(cert_path.clone());
        let err = FhirSource::new(info(), &config).expect_err("a certificate is not a key");
        assert!(err.to_string().contains("client_key"), "{err}");
        assert!(
            err.to_string().contains(&*cert_path.to_string_lossy()),
            "{err}"
        );
    }
}
