//! One round trip per source (issue 12): chained mode and the patient id cache, counted at a
//! real FHIR server on 127.0.0.1:0, and the identity guarantee on both fast paths: nothing about
//! another person is used, whatever the server resolves a chain or a remembered id to.
//!
//! The server here is small and mutable: two people (`p1` carries the NHS number looked up,
//! `p2` another), a Condition and an AllergyIntolerance each, and switches to refuse chained
//! searches, resolve them to someone else, or move a person to another id between lookups.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use carerecord_adapters::fhir::{FhirConfig, FhirSource, QueryMode};
use carerecord_adapters::proto::{Purpose, Requester};
use carerecord_adapters::{
    NhsNumber, SectionSet, Source, SourceError, SourceInfo, SourceRecord, SourceReply,
    SourceRequest,
};
use reqwest::Url;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// The NHS number looked up.
const NHS: &str = "9990000018";
/// Someone else's.
const OTHER_NHS: &str = "9990000026";
const SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
/// What only the other person's record holds: must never reach the record looked up.
const OTHER_CONDITION: &str = "Other person's condition";
const OTHER_ALLERGY: &str = "Other person's allergy";
const WITHIN: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// A FHIR server that counts requests
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Server {
    /// Every resource the server holds (Patients, Conditions, AllergyIntolerances).
    resources: Mutex<Vec<Value>>,
    /// Every HTTP request, `METHOD path?query`; batch entries are listed as `BATCH url`.
    seen: Mutex<Vec<String>>,
    /// Answers chained searches (`patient.identifier=`) with 400, as servers without chaining do.
    refuse_chain: bool,
    /// Resolves every chained search to these Patients' resources, whatever the identifier
    /// says: a server that gets the chain wrong.
    chain_resolves_to: Option<Vec<&'static str>>,
}

impl Server {
    fn two_people() -> Server {
        Server {
            resources: Mutex::new(vec![
                patient("p1", NHS),
                condition("c1", "p1", "195967001", "Asthma"),
                allergy("a1", "p1", "91936005", "Allergy to penicillin"),
                patient("p2", OTHER_NHS),
                condition("c2", "p2", "38341003", OTHER_CONDITION),
                allergy("a2", "p2", "300916003", OTHER_ALLERGY),
            ]),
            ..Server::default()
        }
    }

    fn requests(&self) -> Vec<String> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|s| !s.starts_with("BATCH "))
            .cloned()
            .collect()
    }

    fn batch_entries(&self) -> Vec<String> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|s| s.strip_prefix("BATCH ").map(str::to_owned))
            .collect()
    }

    fn clear(&self) {
        self.seen.lock().expect("lock").clear();
    }

    /// The person at `id` is replaced by the person `other_nhs`, and the patient looked up
    /// moves to `new_id` with their own record: the id a cache may hold now names someone else.
    fn reassign(&self, id: &str, other_nhs: &str, new_id: &'static str) {
        let mut resources = self.resources.lock().expect("lock");
        for r in resources.iter_mut() {
            if r["resourceType"] == "Patient" && r["id"] == id {
                *r = patient(id, other_nhs);
            } else if points_at(r, id) {
                // Their record moves with them.
                let field = if r["resourceType"] == "AllergyIntolerance" {
                    "patient"
                } else {
                    "subject"
                };
                r[field] = json!({"reference": format!("Patient/{new_id}")});
            }
        }
        resources.push(patient(new_id, NHS));
        // And the new person at `id` has a record of their own.
        resources.push(condition("c-new", id, "38341003", OTHER_CONDITION));
    }

    /// One GET: `(status, body)`.
    fn get(&self, path: &str, query: &[(String, String)]) -> (u16, Value) {
        let param = |name: &str| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let resources = self.resources.lock().expect("lock");
        match segments.as_slice() {
            ["Patient"] => {
                let wanted = param("identifier").unwrap_or_default();
                let found = resources
                    .iter()
                    .filter(|r| r["resourceType"] == "Patient" && identifier_of(r) == wanted);
                (200, searchset(found))
            }
            ["Patient", id, "$everything"] => {
                let Some(patient) = resources
                    .iter()
                    .find(|r| r["resourceType"] == "Patient" && r["id"] == *id)
                else {
                    return (404, json!({"resourceType": "OperationOutcome"}));
                };
                let record = resources.iter().filter(|r| points_at(r, id));
                (200, searchset(std::iter::once(patient).chain(record)))
            }
            [resource_type, id] => match resources
                .iter()
                .find(|r| r["resourceType"] == *resource_type && r["id"] == *id)
            {
                Some(r) => (200, r.clone()),
                None => (404, json!({"resourceType": "OperationOutcome"})),
            },
            [resource_type] => {
                let patients: Vec<String> = if let Some(id) = param("patient") {
                    vec![id]
                } else if let Some(identifier) = param("patient.identifier") {
                    if self.refuse_chain {
                        return (400, json!({"resourceType": "OperationOutcome"}));
                    }
                    match &self.chain_resolves_to {
                        Some(ids) => ids.iter().map(|id| (*id).to_owned()).collect(),
                        None => resources
                            .iter()
                            .filter(|r| {
                                r["resourceType"] == "Patient" && identifier_of(r) == identifier
                            })
                            .filter_map(|r| r["id"].as_str().map(str::to_owned))
                            .collect(),
                    }
                } else {
                    return (400, json!({"resourceType": "OperationOutcome"}));
                };
                let found = resources.iter().filter(|r| {
                    r["resourceType"] == *resource_type
                        && patients.iter().any(|id| points_at(r, id))
                });
                (200, searchset(found))
            }
            _ => (404, json!({"resourceType": "OperationOutcome"})),
        }
    }

    fn batch(&self, body: &[u8]) -> Value {
        let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let entries: Vec<Value> = request["entry"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|entry| {
                let url = entry["request"]["url"].as_str().unwrap_or("");
                self.seen.lock().expect("lock").push(format!("BATCH {url}"));
                let (path, query) = split(url);
                match self.get(&path, &query) {
                    (200, resource) => {
                        json!({"resource": resource, "response": {"status": "200 OK"}})
                    }
                    (status, _) => json!({"response": {"status": format!("{status}")}}),
                }
            })
            .collect();
        json!({"resourceType": "Bundle", "type": "batch-response", "entry": entries})
    }
}

async fn handle(
    State(server): State<Arc<Server>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let path_and_query = uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    server
        .seen
        .lock()
        .expect("lock")
        .push(format!("{method} {path_and_query}"));
    let Some(path) = uri.path().strip_prefix("/fhir") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let (status, answer) = match method {
        Method::POST if path.trim_matches('/').is_empty() => (200, server.batch(&body)),
        Method::GET => server.get(path, &split(&path_and_query).1),
        _ => (405, Value::Null),
    };
    (
        StatusCode::from_u16(status).expect("status"),
        [("content-type", "application/fhir+json")],
        answer.to_string(),
    )
        .into_response()
}

async fn serve(server: Server) -> (Arc<Server>, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}/fhir", listener.local_addr().expect("addr"));
    let server = Arc::new(server);
    let app = Router::new().fallback(handle).with_state(server.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (server, base)
}

// ---------------------------------------------------------------------------------------------
// Resources and helpers
// ---------------------------------------------------------------------------------------------

fn patient(id: &str, nhs: &str) -> Value {
    json!({
        "resourceType": "Patient", "id": id,
        "identifier": [{"system": SYSTEM, "value": nhs}],
        "name": [{"family": format!("Person-{nhs}"), "given": ["Pat"]}],
        "birthDate": "1960-01-01",
    })
}

fn condition(id: &str, patient: &str, code: &str, display: &str) -> Value {
    json!({
        "resourceType": "Condition", "id": id,
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "recordedDate": "2019-03-14",
    })
}

fn allergy(id: &str, patient: &str, code: &str, display: &str) -> Value {
    json!({
        "resourceType": "AllergyIntolerance", "id": id,
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": "confirmed"}]},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]},
        "patient": {"reference": format!("Patient/{patient}")},
        "recordedDate": "2009-02-01",
    })
}

fn points_at(r: &Value, id: &str) -> bool {
    let reference = format!("Patient/{id}");
    r["subject"]["reference"] == *reference || r["patient"]["reference"] == *reference
}

fn identifier_of(r: &Value) -> String {
    let i = &r["identifier"][0];
    format!(
        "{}|{}",
        i["system"].as_str().unwrap_or(""),
        i["value"].as_str().unwrap_or("")
    )
}

fn searchset<'a>(resources: impl Iterator<Item = &'a Value>) -> Value {
    let entry: Vec<Value> = resources.map(|r| json!({"resource": r})).collect();
    json!({"resourceType": "Bundle", "type": "searchset", "entry": entry})
}

/// `path?query` split, the query percent-decoded.
fn split(url: &str) -> (String, Vec<(String, String)>) {
    let parsed = Url::parse(&format!("http://x/{}", url.trim_start_matches('/'))).expect("url");
    let path = parsed.path().to_owned();
    let query = parsed
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    (path, query)
}

fn source(base: &str, mode: QueryMode) -> FhirSource {
    let mut config = FhirConfig::new(base);
    config.mode = mode;
    let info = SourceInfo {
        id: "leeds-gp".into(),
        organisation_code: "Y12345".into(),
        organisation_name: "Chequers Lane Surgery".into(),
    };
    FhirSource::new(info, &config).expect("valid config")
}

fn request() -> SourceRequest {
    SourceRequest {
        request_id: "req-round-trips".into(),
        nhs_number: NhsNumber::parse(NHS).expect("valid"),
        sections: SectionSet::ALL,
        deadline: Instant::now() + WITHIN,
        requester: Requester {
            user_id: "555123456789".into(),
            role_code: "R8000".into(),
            organisation_code: "RJ1".into(),
            purpose: Purpose::DirectCare as i32,
            ..Requester::default()
        },
        via_brokers: vec![],
    }
}

async fn found(source: &FhirSource, what: &str) -> SourceRecord {
    match source.fetch(&request()).await {
        Ok(SourceReply::Found(record)) => record,
        other => panic!("{what}: expected a record, got {other:?}"),
    }
}

/// The record holds the patient's own Condition and allergy, the patient is the one asked for,
/// and nothing of the other person appears anywhere in it.
fn assert_own_record(record: &SourceRecord, what: &str) {
    let text = format!("{:?}", record.record);
    assert!(
        text.contains("Asthma"),
        "{what}: own Condition missing: {text}"
    );
    assert!(
        text.contains("Allergy to penicillin"),
        "{what}: own allergy missing: {text}"
    );
    assert!(
        !text.contains(OTHER_CONDITION) && !text.contains(OTHER_ALLERGY),
        "{what}: the other person's record leaked in: {text}"
    );
    assert!(
        !text.contains(&format!("Person-{OTHER_NHS}")),
        "{what}: the other person's demographics leaked in: {text}"
    );
    let patient = record.record.patient.as_ref().expect("patient");
    assert_eq!(patient.nhs_number, NHS, "{what}");
    assert_eq!(record.record.entry_count(), 2, "{what}: {text}");
}

// ---------------------------------------------------------------------------------------------
// (a) chained mode: one request per lookup
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn chained_mode_makes_exactly_one_http_request_per_lookup() {
    let (server, base) = serve(Server::two_people()).await;
    let source = source(&base, QueryMode::Chained);
    for lookup in ["first", "second", "third"] {
        server.clear();
        let record = found(&source, lookup).await;
        assert_own_record(&record, lookup);
        assert!(
            record.wrong_patient.is_empty(),
            "{lookup}: {:?}",
            record.wrong_patient
        );
        assert_eq!(
            server.requests(),
            ["POST /fhir"],
            "{lookup}: one batch, nothing else"
        );
        let entries = server.batch_entries();
        assert!(entries[0].starts_with("Patient?identifier="), "{entries:?}");
        assert!(
            entries[1..]
                .iter()
                .all(|e| e.contains("patient.identifier=")),
            "every other entry chained on the NHS number: {entries:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (b) a server refusing the chain
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_server_refusing_the_chain_falls_back_and_still_returns_the_right_record() {
    let (server, base) = serve(Server {
        refuse_chain: true,
        ..Server::two_people()
    })
    .await;
    let source = source(&base, QueryMode::Chained);
    let record = found(&source, "first").await;
    assert_own_record(&record, "first");
    assert_eq!(
        server.requests(),
        ["POST /fhir", "POST /fhir"],
        "the refused chained batch, then the record by id"
    );
    // Later lookups never ask the chain again; the id the first lookup verified is used.
    server.clear();
    let record = found(&source, "second").await;
    assert_own_record(&record, "second");
    assert_eq!(server.requests(), ["POST /fhir"]);
    assert!(
        !server
            .batch_entries()
            .iter()
            .any(|e| e.contains("patient.identifier=")),
        "{:?}",
        server.batch_entries()
    );
}

// ---------------------------------------------------------------------------------------------
// (c) the patient id cache: the second lookup is one round trip
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn with_the_id_cache_the_second_lookup_of_a_patient_is_one_round_trip() {
    let (server, base) = serve(Server::two_people()).await;

    // $everything (what the shared peer benchmark's upstream serves): one request.
    let everything = source(&base, QueryMode::Everything);
    server.clear();
    assert_own_record(
        &found(&everything, "everything, first").await,
        "everything, first",
    );
    assert_eq!(
        server.requests(),
        [
            format!(
                "GET /fhir/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C{NHS}"
            ),
            "GET /fhir/Patient/p1/$everything?_count=100".to_owned(),
        ],
        "a miss: search, then read"
    );
    server.clear();
    assert_own_record(
        &found(&everything, "everything, second").await,
        "everything, second",
    );
    assert_eq!(
        server.requests(),
        ["GET /fhir/Patient/p1/$everything?_count=100"],
        "a hit: the record by id, the Patient in it verified"
    );

    // Batch: the Patient read rides in the one batch.
    let batch = source(&base, QueryMode::Batch);
    found(&batch, "batch, first").await;
    server.clear();
    assert_own_record(&found(&batch, "batch, second").await, "batch, second");
    assert_eq!(server.requests(), ["POST /fhir"]);
    assert_eq!(server.batch_entries()[0], "Patient/p1");

    // Search: the Patient read runs alongside the searches by id; no Patient search.
    let search = source(&base, QueryMode::Search);
    found(&search, "search, first").await;
    server.clear();
    assert_own_record(&found(&search, "search, second").await, "search, second");
    let requests = server.requests();
    assert!(
        requests.contains(&"GET /fhir/Patient/p1".to_owned()),
        "{requests:?}"
    );
    assert!(
        !requests.iter().any(|r| r.starts_with("GET /fhir/Patient?")),
        "no Patient search: {requests:?}"
    );
}

#[tokio::test]
async fn without_the_id_cache_every_lookup_searches_first() {
    let (server, base) = serve(Server::two_people()).await;
    let mut config = FhirConfig::new(&base);
    config.mode = QueryMode::Everything;
    config.patient_id_cache = false;
    let info = SourceInfo {
        id: "leeds-gp".into(),
        organisation_code: "Y12345".into(),
        organisation_name: "Chequers Lane Surgery".into(),
    };
    let source = FhirSource::new(info, &config).expect("valid config");
    found(&source, "first").await;
    server.clear();
    found(&source, "second").await;
    assert_eq!(server.requests().len(), 2, "{:?}", server.requests());
}

// ---------------------------------------------------------------------------------------------
// (d) a cached id that now names someone else
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_cached_id_now_naming_another_person_is_discarded_evicted_and_searched_again() {
    for mode in [QueryMode::Everything, QueryMode::Batch, QueryMode::Search] {
        let (server, base) = serve(Server::two_people()).await;
        let source = source(&base, mode);
        assert_own_record(&found(&source, "first").await, &format!("{mode:?} first"));

        // p1 is now a third person (another NHS number, their own Condition); the patient
        // looked up lives at p9.
        server.reassign("p1", "9990000034", "p9");
        server.clear();
        let record = found(&source, "second").await;
        let what = format!("{mode:?} second");
        assert_own_record(&record, &what);
        assert!(
            !format!("{:?}", record.record).contains("9990000034"),
            "{what}: the person now at p1 leaked in"
        );
        assert!(
            record.wrong_patient.is_empty(),
            "{what}: the discarded answer leaves no trace: {:?}",
            record.wrong_patient
        );
        let requests = server.requests();
        let searched = requests
            .iter()
            .filter(|r| r.starts_with("GET /fhir/Patient?"))
            .count();
        assert_eq!(
            searched, 1,
            "{what}: fell back to the Patient search: {requests:?}"
        );
        let everything = server.batch_entries().into_iter().chain(requests.clone());
        assert!(
            everything.clone().any(|r| r.contains("p9")),
            "{what}: read the record at the new id: {requests:?}"
        );

        // The entry was replaced by the verified one: the next lookup reads p9 directly.
        server.clear();
        assert_own_record(&found(&source, "third").await, &format!("{mode:?} third"));
        let requests = server.requests();
        assert!(
            !requests.iter().any(|r| r.starts_with("GET /fhir/Patient?")),
            "{mode:?} third: the stale entry was evicted and the new id remembered: {requests:?}"
        );
        assert!(
            !requests
                .iter()
                .chain(&server.batch_entries())
                .any(|r| r.contains("p1"))
        );
    }
}

#[tokio::test]
async fn a_cached_id_whose_patient_is_gone_falls_back_to_the_search() {
    let (server, base) = serve(Server::two_people()).await;
    let source = source(&base, QueryMode::Everything);
    found(&source, "first").await;
    // p1 deleted, the patient re-registered as p9 with their record.
    {
        let mut resources = server.resources.lock().expect("lock");
        resources.retain(|r| !(r["resourceType"] == "Patient" && r["id"] == "p1"));
        for r in resources.iter_mut() {
            if points_at(r, "p1") {
                let field = if r["resourceType"] == "AllergyIntolerance" {
                    "patient"
                } else {
                    "subject"
                };
                r[field] = json!({"reference": "Patient/p9"});
            }
        }
        resources.push(patient("p9", NHS));
    }
    server.clear();
    assert_own_record(&found(&source, "second").await, "second");
    assert_eq!(
        server.requests(),
        [
            "GET /fhir/Patient/p1/$everything?_count=100".to_owned(),
            format!(
                "GET /fhir/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C{NHS}"
            ),
            "GET /fhir/Patient/p9/$everything?_count=100".to_owned(),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// (e) a chain resolved to someone else
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_chain_resolved_to_someone_else_is_rejected_by_the_identity_check() {
    // Every chained search answered with the other person's resources: an answer about
    // someone else, not an empty record.
    let (_, base) = serve(Server {
        chain_resolves_to: Some(vec!["p2"]),
        ..Server::two_people()
    })
    .await;
    let reply = source(&base, QueryMode::Chained).fetch(&request()).await;
    let Err(SourceError::WrongPatient(reason)) = reply else {
        panic!("expected WrongPatient, got {reply:?}");
    };
    assert!(reason.contains("about another patient"), "{reason}");

    // The other person's resources mixed into the right ones: those are discarded, named as
    // a shortfall, and never in the record.
    let (_, base) = serve(Server {
        chain_resolves_to: Some(vec!["p1", "p2"]),
        ..Server::two_people()
    })
    .await;
    let record = found(&source(&base, QueryMode::Chained), "mixed").await;
    assert_own_record(&record, "mixed");
    assert_eq!(record.wrong_patient.len(), 2, "{:?}", record.wrong_patient);
    assert!(
        record
            .shortfalls
            .iter()
            .any(|s| s.reason.contains("about another patient")),
        "{:?}",
        record.shortfalls
    );
}

// ---------------------------------------------------------------------------------------------
// (e) a record locator's hint: the organisation's own id for the patient
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_locator_hint_makes_a_first_lookup_one_round_trip() {
    let (server, base) = serve(Server::two_people()).await;
    let source = source(&base, QueryMode::Everything);
    let nhs = NhsNumber::parse(NHS).expect("valid");
    source.hint_patient_id(nhs, "p1").await;
    server.clear();
    assert_own_record(&found(&source, "hinted").await, "hinted");
    assert_eq!(
        server.requests(),
        ["GET /fhir/Patient/p1/$everything?_count=100"],
        "the record by the hinted id, its Patient verified: no search"
    );
}

#[tokio::test]
async fn a_locator_hint_naming_another_person_is_verified_away_and_searched() {
    let (server, base) = serve(Server::two_people()).await;
    let source = source(&base, QueryMode::Everything);
    let nhs = NhsNumber::parse(NHS).expect("valid");
    // p2 is the other person (another NHS number, their own condition and allergy).
    source.hint_patient_id(nhs, "p2").await;
    server.clear();
    let record = found(&source, "wrong hint").await;
    assert_own_record(&record, "wrong hint");
    let text = format!("{:?}", record.record);
    assert!(!text.contains(OTHER_NHS), "the other person leaked in");
    let requests = server.requests();
    assert!(
        requests.iter().any(|r| r.starts_with("GET /fhir/Patient?")),
        "fell back to the Patient search: {requests:?}"
    );
}

#[tokio::test]
async fn a_hint_never_replaces_an_id_the_source_verified_itself() {
    let (server, base) = serve(Server::two_people()).await;
    let source = source(&base, QueryMode::Everything);
    let nhs = NhsNumber::parse(NHS).expect("valid");
    found(&source, "first").await;
    source.hint_patient_id(nhs, "p2").await;
    // Not an id at all (a FHIR id is 1-64 of A-Z a-z 0-9 - .): ignored.
    source.hint_patient_id(nhs, "p1/../../p2").await;
    server.clear();
    assert_own_record(&found(&source, "second").await, "second");
    assert_eq!(
        server.requests(),
        ["GET /fhir/Patient/p1/$everything?_count=100"]
    );
}
