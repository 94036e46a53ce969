//! Clinical safety of what the FHIR adapter returns, against hand-written FHIR R4 / UK Core
//! fixtures (`tests/fixtures/fhir/`) served by a small FHIR server in the test (axum on
//! 127.0.0.1:0): every resource is checked against the patient matched by NHS number, references
//! resolve wherever the target is (or the entry is kept and marked), shortfalls are reported,
//! verification status, "no known allergy" assertions, every coding and security labels reach
//! the entries, and every query mode gives the same record.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use carerecord_adapters::fhir::{FhirConfig, FhirSource, QueryMode};
use carerecord_adapters::proto::{
    CareRecord, Entry, Purpose, Requester, Section, VerificationStatus, entry::Detail,
};
use carerecord_adapters::{
    NhsNumber, SectionSet, Source, SourceError, SourceInfo, SourceRecord, SourceReply,
    SourceRequest,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::Instant;

const NHS: &str = "9990000018";
const WITHIN: Duration = Duration::from_secs(5);
const MODES: [QueryMode; 4] = [
    QueryMode::Search,
    QueryMode::Everything,
    QueryMode::Batch,
    QueryMode::Chained,
];

// ---------------------------------------------------------------------------------------------
// A FHIR server serving one fixture
// ---------------------------------------------------------------------------------------------

/// A FHIR server over one fixture Bundle: searches by type (every resource of the type, as a
/// server that ignores or mishandles `patient` would: the adapter must check identity itself),
/// `_include` of referenced Medications, `$everything`, batch, reads by id, paging.
#[derive(Default)]
struct Server {
    /// The fixture Bundle's text.
    fixture: String,
    /// (fullUrl as the fixture gives it, resource), in fixture order.
    resources: Vec<(Option<String>, Value)>,
    page_size: usize,
    /// Answers `_include` with nothing, as many servers do.
    ignore_include: bool,
    /// Puts every `_include`d Medication on the last page, away from the requests naming them.
    includes_on_last_page: bool,
    /// Ids readable only by GET: never in a search, an include or `$everything`.
    read_only: HashSet<&'static str>,
    /// Ids whose GET fails with 500.
    unreadable: HashSet<&'static str>,
    /// Ids whose GET never answers.
    hanging: HashSet<&'static str>,
    /// Ids left out of `$everything`.
    not_in_everything: HashSet<&'static str>,
    /// Answers a search chained on the patient (`patient.identifier=`) with 400, as servers
    /// without chaining do, in a batch entry or a GET.
    refuse_chain: bool,
    seen: Mutex<Vec<String>>,
    base: OnceLock<String>,
}

impl Server {
    /// A server for one fixture file; its resources are read when it starts (`load`), once
    /// `{{base}}` in the fixture can be replaced by the server's base URL.
    fn fixture(name: &str) -> Server {
        let path = format!("{}/tests/fixtures/fhir/{name}", env!("CARGO_MANIFEST_DIR"));
        Server {
            fixture: std::fs::read_to_string(&path).expect("fixture file"),
            page_size: 3,
            ..Server::default()
        }
    }

    fn base(&self) -> &str {
        self.base.get().expect("started")
    }

    fn load(&mut self, base: &str) {
        let bundle: Value =
            serde_json::from_str(&self.fixture.replace("{{base}}", base)).expect("fixture is JSON");
        self.resources = bundle["entry"]
            .as_array()
            .expect("fixture entries")
            .iter()
            .map(|e| {
                (
                    e["fullUrl"].as_str().map(str::to_owned),
                    e["resource"].clone(),
                )
            })
            .collect();
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("lock").clone()
    }

    fn full_url(&self, full_url: &Option<String>, r: &Value) -> String {
        full_url.clone().unwrap_or_else(|| {
            format!(
                "{}/{}/{}",
                self.base(),
                r["resourceType"].as_str().unwrap_or(""),
                r["id"].as_str().unwrap_or("")
            )
        })
    }

    fn listed(&self) -> impl Iterator<Item = &(Option<String>, Value)> {
        self.resources
            .iter()
            .filter(|(_, r)| !self.read_only.contains(r["id"].as_str().unwrap_or("")))
    }

    fn entry(&self, item: &(Option<String>, Value), mode: &str) -> Value {
        json!({"fullUrl": self.full_url(&item.0, &item.1), "resource": item.1, "search": {"mode": mode}})
    }

    fn page(&self, all: Vec<Value>, page: usize, next: impl Fn(usize) -> String) -> Value {
        let entries: Vec<Value> = all
            .iter()
            .skip((page - 1) * self.page_size)
            .take(self.page_size)
            .cloned()
            .collect();
        let mut links = vec![];
        if page * self.page_size < all.len() {
            links.push(json!({"relation": "next", "url": next(page + 1)}));
        }
        json!({"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries})
    }

    /// `Patient?identifier=system|value`: the Patients carrying that identifier.
    fn patient_search(&self, query: &[(String, String)]) -> Value {
        let identifier = query
            .iter()
            .find(|(k, _)| k == "identifier")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let entries: Vec<Value> = self
            .resources
            .iter()
            .filter(|(_, r)| {
                r["resourceType"] == "Patient"
                    && r["identifier"].as_array().is_some_and(|ids| {
                        ids.iter().any(|i| {
                            identifier
                                == format!(
                                    "{}|{}",
                                    i["system"].as_str().unwrap_or(""),
                                    i["value"].as_str().unwrap_or("")
                                )
                        })
                    })
            })
            .map(|item| self.entry(item, "match"))
            .collect();
        json!({"resourceType": "Bundle", "type": "searchset", "entry": entries})
    }

    /// Whether a search is refused: chained on the patient, by a server that cannot chain.
    fn refuses(&self, query: &[(String, String)]) -> bool {
        self.refuse_chain && query.iter().any(|(k, _)| k.contains('.'))
    }

    fn search(&self, resource_type: &str, query: &[(String, String)]) -> Value {
        let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v);
        let page: usize = param("_page").and_then(|p| p.parse().ok()).unwrap_or(1);
        let matches: Vec<&(Option<String>, Value)> = self
            .listed()
            .filter(|(_, r)| r["resourceType"] == resource_type)
            .collect();
        let pages = matches.len().div_ceil(self.page_size).max(1);
        let on_page: Vec<&(Option<String>, Value)> = matches
            .iter()
            .skip((page - 1) * self.page_size)
            .take(self.page_size)
            .copied()
            .collect();
        let mut entries: Vec<Value> = on_page.iter().map(|m| self.entry(m, "match")).collect();
        if param("_include").is_some() && !self.ignore_include {
            let named_by: Vec<&(Option<String>, Value)> = if self.includes_on_last_page {
                if page == pages {
                    matches.clone()
                } else {
                    vec![]
                }
            } else {
                on_page.clone()
            };
            let wanted: HashSet<String> = named_by
                .iter()
                .filter_map(|(_, r)| r["medicationReference"]["reference"].as_str())
                .filter_map(|r| r.rsplit('/').next().map(str::to_owned))
                .collect();
            for medication in self.listed().filter(|(_, r)| {
                r["resourceType"] == "Medication" && wanted.contains(r["id"].as_str().unwrap_or(""))
            }) {
                entries.push(self.entry(medication, "include"));
            }
        }
        let rest: Vec<String> = query
            .iter()
            .filter(|(k, _)| k != "_page")
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        let mut links = vec![];
        if page < pages {
            links.push(json!({"relation": "next", "url": format!("{}/{resource_type}?{}&_page={}", self.base(), rest.join("&"), page + 1)}));
        }
        json!({"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries})
    }

    fn everything(&self, id: &str, query: &[(String, String)]) -> Value {
        let page: usize = query
            .iter()
            .find(|(k, _)| k == "_page")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(1);
        let all: Vec<Value> = self
            .listed()
            .filter(|(_, r)| {
                !self
                    .not_in_everything
                    .contains(r["id"].as_str().unwrap_or(""))
            })
            .map(|item| json!({"fullUrl": self.full_url(&item.0, &item.1), "resource": item.1}))
            .collect();
        self.page(all, page, |next| {
            format!("Patient/{id}/$everything?_page={next}")
        })
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
                let (resource_type, query) = url.split_once('?').unwrap_or((url, ""));
                // A read (`Patient/{id}`) in the batch, as the remembered-id flow sends.
                if let Some((resource_type, id)) = resource_type.split_once('/') {
                    return match self
                        .resources
                        .iter()
                        .find(|(_, r)| r["resourceType"] == resource_type && r["id"] == id)
                    {
                        Some((_, r)) => json!({"resource": r, "response": {"status": "200 OK"}}),
                        None => json!({"response": {"status": "404 Not Found"}}),
                    };
                }
                let query = parse_query(query);
                if self.refuses(&query) {
                    return json!({"response": {"status": "400 Bad Request"}});
                }
                let resource = if resource_type == "Patient" {
                    self.patient_search(&query)
                } else {
                    self.search(resource_type, &query)
                };
                json!({"resource": resource, "response": {"status": "200 OK"}})
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
    let query = parse_query(uri.query().unwrap_or(""));
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let answer = match (method, segments.as_slice()) {
        (Method::GET, ["fhir", "Patient"]) => server.patient_search(&query),
        (Method::GET, ["fhir", "Patient", id, "$everything"]) => server.everything(id, &query),
        (Method::GET, ["fhir", resource_type, id]) => {
            if server.unreadable.contains(id) {
                return (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response();
            }
            if server.hanging.contains(id) {
                std::future::pending::<()>().await;
            }
            match server
                .resources
                .iter()
                .find(|(_, r)| r["resourceType"] == *resource_type && r["id"] == *id)
            {
                Some((_, r)) => r.clone(),
                None => return StatusCode::NOT_FOUND.into_response(),
            }
        }
        (Method::GET, ["fhir", _]) if server.refuses(&query) => {
            return StatusCode::BAD_REQUEST.into_response();
        }
        (Method::GET, ["fhir", resource_type]) => server.search(resource_type, &query),
        (Method::POST, ["fhir"]) => server.batch(&body),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [("content-type", "application/fhir+json")],
        answer.to_string(),
    )
        .into_response()
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

async fn serve(mut server: Server) -> (Arc<Server>, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}/fhir", listener.local_addr().expect("addr"));
    server.load(&base);
    server.base.set(base.clone()).expect("fresh server");
    let server = Arc::new(server);
    let app = Router::new().fallback(handle).with_state(server.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (server, base)
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn source(base: &str, mode: QueryMode) -> FhirSource {
    let mut config = FhirConfig::new(base);
    config.mode = mode;
    config.page_size = 3;
    let info = SourceInfo {
        id: "leeds-gp".into(),
        organisation_code: "Y12345".into(),
        organisation_name: "Chequers Lane Surgery".into(),
    };
    FhirSource::new(info, &config).expect("valid config")
}

fn request(within: Duration) -> SourceRequest {
    SourceRequest {
        request_id: "req-safety".into(),
        nhs_number: NhsNumber::parse(NHS).expect("valid"),
        sections: SectionSet::ALL,
        deadline: Instant::now() + within,
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

async fn fetch(base: &str, mode: QueryMode) -> SourceRecord {
    match source(base, mode).fetch(&request(WITHIN)).await {
        Ok(SourceReply::Found(record)) => record,
        other => panic!("{mode:?}: expected a record, got {other:?}"),
    }
}

fn entry<'a>(entries: &'a [Entry], id: &str) -> &'a Entry {
    entries
        .iter()
        .find(|e| e.provenance[0].source_entry_id == id)
        .unwrap_or_else(|| panic!("no entry {id}"))
}

fn ids(entries: &[Entry]) -> Vec<&str> {
    let mut ids: Vec<&str> = entries
        .iter()
        .map(|e| e.provenance[0].source_entry_id.as_str())
        .collect();
    ids.sort();
    ids
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

fn medicine(entry: &Entry) -> (&str, &str, bool) {
    let c = entry.concept.as_ref();
    (
        c.map_or("", |c| c.code.as_str()),
        c.map_or("", |c| c.display.as_str()),
        entry.incomplete,
    )
}

fn record_server() -> Server {
    Server {
        read_only: HashSet::from(["med-omeprazole"]),
        unreadable: HashSet::from(["med-ramipril"]),
        ..Server::fixture("record-uk-core.json")
    }
}

// ---------------------------------------------------------------------------------------------
// Both query modes, same record
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_query_mode_gives_the_same_record_for_the_same_server() {
    let (_server, base) = serve(record_server()).await;
    let search = fetch(&base, QueryMode::Search).await;
    assert_eq!(
        search.record.documents.len(),
        2,
        "Composition and DocumentReference"
    );
    assert_eq!(search.record.entry_count(), 19);
    for mode in [QueryMode::Everything, QueryMode::Batch, QueryMode::Chained] {
        let other = fetch(&base, mode).await;
        assert_eq!(
            sorted(other.record),
            sorted(search.record.clone()),
            "{mode:?} differs from search"
        );
        assert_eq!(other.shortfalls, search.shortfalls, "{mode:?}");
        assert_eq!(other.wrong_patient, search.wrong_patient, "{mode:?}");
    }
}

/// Chained mode: the Patient search and every search, chained on the NHS number, in one batch:
/// no separate Patient search, no search by server id. (Later pages and the follow-up reads of
/// Medications no answer held are GETs, as in batch mode.)
#[tokio::test]
async fn chained_mode_asks_for_the_patient_and_the_record_in_one_batch() {
    let (server, base) = serve(record_server()).await;
    let record = fetch(&base, QueryMode::Chained).await;
    assert_eq!(record.record.entry_count(), 19);
    let seen = server.seen();
    let posts = seen.iter().filter(|s| s.starts_with("POST ")).count();
    assert_eq!(posts, 1, "one batch: {seen:?}");
    assert!(
        !seen.iter().any(|s| s.starts_with("GET /fhir/Patient")),
        "no Patient search of its own: {seen:?}"
    );
    let batch: Vec<&str> = seen
        .iter()
        .filter_map(|s| s.strip_prefix("BATCH "))
        .collect();
    assert_eq!(
        batch.first().copied(),
        Some("Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9990000018"),
        "{batch:?}"
    );
    assert_eq!(batch.len(), 12, "the Patient search and 11 searches");
    for search in &batch[1..] {
        assert!(
            search.contains(
                "?patient.identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9990000018&"
            ),
            "chained on the NHS number: {search}"
        );
    }
    assert!(
        batch.iter().any(|s| s.starts_with("MedicationRequest?")
            && s.contains("_include=MedicationRequest%3Amedication")),
        "Medications included as in the other modes: {batch:?}"
    );
}

/// A server that refuses the chained parameter still gives the whole record: that lookup
/// reads it by id in a second batch, and the source is not asked the chain again (no refused
/// batch on every lookup). The next lookup reads by the Patient id the first one verified (the
/// patient id cache): one batch holding `Patient/{id}` and the searches by id.
#[tokio::test]
async fn a_server_that_refuses_the_chain_is_read_in_two_round_trips_instead() {
    let (server, base) = serve(Server {
        refuse_chain: true,
        ..record_server()
    })
    .await;
    let search = fetch(&base, QueryMode::Search).await;
    let source = source(&base, QueryMode::Chained);
    let batches = |seen: &[String]| -> Vec<String> {
        seen.iter()
            .filter(|s| s.starts_with("POST ") || s.starts_with("GET /fhir/Patient"))
            .cloned()
            .collect()
    };
    for lookup in ["first", "second"] {
        let before = server.seen().len();
        let record = match source.fetch(&request(WITHIN)).await {
            Ok(SourceReply::Found(record)) => record,
            other => panic!("{lookup}: expected a record, got {other:?}"),
        };
        assert_eq!(
            sorted(record.record),
            sorted(search.record.clone()),
            "{lookup} lookup: the same record as search mode"
        );
        assert_eq!(record.shortfalls, search.shortfalls, "{lookup}");
        assert_eq!(record.wrong_patient, search.wrong_patient, "{lookup}");
        let seen = server.seen()[before..].to_vec();
        let chained = seen
            .iter()
            .filter(|s| s.starts_with("BATCH ") && s.contains("patient.identifier="))
            .count();
        match lookup {
            "first" => {
                assert_eq!(chained, 11, "{seen:?}");
                assert_eq!(
                    batches(&seen),
                    ["POST /fhir", "POST /fhir"],
                    "the refused batch, then the record by id (the Patient came with the first)"
                );
            }
            _ => {
                assert_eq!(chained, 0, "the refusal is remembered: {seen:?}");
                assert_eq!(batches(&seen), ["POST /fhir"], "one batch by id: {seen:?}");
                let batch: Vec<&String> = seen.iter().filter(|s| s.starts_with("BATCH ")).collect();
                assert_eq!(batch[0], "BATCH Patient/p1", "{seen:?}");
                assert!(
                    batch[1..].iter().all(|s| s.contains("?patient=p1&")),
                    "{seen:?}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// References
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn medication_references_resolve_wherever_the_medication_is() {
    let (server, base) = serve(record_server()).await;
    for mode in MODES {
        let record = fetch(&base, mode).await;
        let medications = &record.record.medications;
        assert_eq!(
            medicine(entry(medications, "mr-contained")),
            ("322236009", "Paracetamol 500mg tablets", false),
            "contained"
        );
        assert_eq!(
            medicine(entry(medications, "mr-included")),
            ("319283006", "Amlodipine 5mg tablets", false),
            "{mode:?}: included on the same page, or on another page of $everything"
        );
        assert_eq!(
            medicine(entry(medications, "mr-late")),
            ("320000009", "Simvastatin 40mg tablets", false),
            "{mode:?}: absolute reference"
        );
        assert_eq!(
            medicine(entry(medications, "mr-get")),
            (
                "317335004",
                "Omeprazole 20mg gastro-resistant capsules",
                false
            ),
            "{mode:?}: only readable by GET"
        );
        let ramipril = entry(medications, "mr-unreadable");
        assert_eq!(
            medicine(ramipril),
            ("", "Ramipril 2.5mg capsules", true),
            "{mode:?}: unreadable, kept by its display text"
        );
        assert!(ramipril.summary.starts_with("Ramipril 2.5mg capsules"));
        assert!(!ramipril.incomplete_reason.is_empty());
        assert_eq!(record.shortfalls.len(), 1, "{:?}", record.shortfalls);
        assert_eq!(
            record.shortfalls[0].sections,
            SectionSet::NONE.with(Section::Medications)
        );
    }
    let reads: Vec<String> = server
        .seen()
        .into_iter()
        .filter(|s| s.starts_with("GET /fhir/Medication/"))
        .collect();
    assert_eq!(
        reads.len(),
        2 * MODES.len(),
        "per mode, one follow-up read each for the two Medications no answer held: {reads:?}"
    );
    assert!(
        reads
            .iter()
            .all(|r| r.ends_with("med-omeprazole") || r.ends_with("med-ramipril")),
        "{reads:?}"
    );
}

#[tokio::test]
async fn a_medication_on_another_page_of_the_searchset_resolves_without_a_read() {
    let (server, base) = serve(Server {
        includes_on_last_page: true,
        page_size: 2,
        ..record_server()
    })
    .await;
    let record = fetch(&base, QueryMode::Search).await;
    assert_eq!(
        medicine(entry(&record.record.medications, "mr-included")),
        ("319283006", "Amlodipine 5mg tablets", false)
    );
    assert!(
        !server
            .seen()
            .iter()
            .any(|s| s.ends_with("/Medication/med-amlodipine")),
        "found on the last page, not read again"
    );
}

#[tokio::test]
async fn a_server_that_ignores_include_still_names_every_medicine() {
    let (server, base) = serve(Server {
        ignore_include: true,
        ..record_server()
    })
    .await;
    let record = fetch(&base, QueryMode::Search).await;
    let medications = &record.record.medications;
    assert_eq!(medications.len(), 7, "no prescription dropped");
    for id in ["mr-included", "mr-late", "mr-get"] {
        assert!(!entry(medications, id).incomplete, "{id} read by GET");
    }
    assert!(entry(medications, "mr-unreadable").incomplete);
    let reads = server
        .seen()
        .into_iter()
        .filter(|s| s.starts_with("GET /fhir/Medication/"))
        .count();
    assert_eq!(reads, 4, "amlodipine, simvastatin, omeprazole, ramipril");
}

#[tokio::test]
async fn a_medication_read_that_would_overrun_the_deadline_leaves_the_medicine_incomplete() {
    let (_server, base) = serve(Server {
        hanging: HashSet::from(["med-omeprazole"]),
        ..record_server()
    })
    .await;
    let started = Instant::now();
    let reply = source(&base, QueryMode::Search)
        .fetch(&request(Duration::from_millis(800)))
        .await;
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "answered in time"
    );
    let Ok(SourceReply::Found(record)) = reply else {
        panic!("the answer gathered is kept: {reply:?}");
    };
    let omeprazole = entry(&record.record.medications, "mr-get");
    assert!(omeprazole.incomplete);
    assert_eq!(record.record.conditions.len(), 8);
}

// ---------------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn resources_about_another_patient_are_never_mapped_in_any_mode() {
    let (_server, base) = serve(Server::fixture("wrong-patient.json")).await;
    for mode in MODES {
        let record = fetch(&base, mode).await;
        assert_eq!(ids(&record.record.conditions), ["ours"], "{mode:?}");
        assert_eq!(ids(&record.record.allergies), ["allergy-ours"], "{mode:?}");
        assert!(record.record.appointments.is_empty(), "{mode:?}");
        assert!(record.record.medications.is_empty(), "{mode:?}");
        let mut expected = vec![
            "AllergyIntolerance: refers to another patient",
            "Appointment: has another patient as a participant",
            "Condition: has no patient reference",
            "Condition: refers to another patient",
            "Condition: refers to another patient",
            "Condition: refers to another patient",
            "MedicationStatement: refers to another patient",
        ];
        if mode == QueryMode::Everything {
            // $everything also returned the other person's Patient resource.
            expected.push("Patient: carries another NHS number, or none");
            expected.sort();
        }
        let mut got: Vec<&str> = record.wrong_patient.iter().map(String::as_str).collect();
        got.sort();
        assert_eq!(got, expected, "{mode:?}");
        // The sections that lost resources to the identity check are cut short, not "none
        // recorded": appointments and medicines came back empty only because of it.
        let rejected = record
            .shortfalls
            .iter()
            .find(|s| s.reason.contains("about another patient"))
            .unwrap_or_else(|| panic!("{mode:?}: no shortfall for the discarded resources"));
        for section in [
            Section::Conditions,
            Section::Allergies,
            Section::Appointments,
            Section::Medications,
        ] {
            assert!(rejected.sections.contains(section), "{mode:?}: {section:?}");
        }
        assert!(
            !rejected.sections.contains(Section::TestResults),
            "{mode:?}"
        );
        let patient = record.record.patient.as_ref().expect("demographics");
        assert_eq!(patient.family_name, "Smith", "only from our Patient");
        for text in record.wrong_patient.iter().chain(&record.warnings) {
            for secret in [
                "9990000026",
                "Smythe",
                "p2",
                "Human immunodeficiency",
                "GUM",
            ] {
                assert!(!text.contains(secret), "redacted: {text}");
            }
        }
    }
}

#[tokio::test]
async fn an_everything_answer_about_someone_else_is_wrong_patient() {
    let (_server, base) = serve(Server {
        not_in_everything: HashSet::from(["p1"]),
        ..Server::fixture("everything-someone-else.json")
    })
    .await;
    let reply = source(&base, QueryMode::Everything)
        .fetch(&request(WITHIN))
        .await;
    let Err(SourceError::WrongPatient(reason)) = reply else {
        panic!("expected WrongPatient, got {reply:?}");
    };
    assert!(
        !reason.contains("9990000034") && !reason.contains("Jones"),
        "{reason}"
    );

    // The same server searched: the patient search finds the right person, but every clinical
    // resource is about someone else. That is an answer about another patient, not an empty
    // record ("none recorded" would be false). The same in one chained batch.
    for mode in [QueryMode::Search, QueryMode::Batch, QueryMode::Chained] {
        let reply = source(&base, mode).fetch(&request(WITHIN)).await;
        let Err(SourceError::WrongPatient(reason)) = reply else {
            panic!("{mode:?}: expected WrongPatient, got {reply:?}");
        };
        assert!(
            reason.contains("about another patient"),
            "{mode:?}: {reason}"
        );
    }
}

#[tokio::test]
async fn references_by_urn_uuid_and_nhs_number_identifier_are_the_patients() {
    let (_server, base) = serve(Server::fixture("no-known-allergy.json")).await;
    for mode in MODES {
        let record = fetch(&base, mode).await;
        assert!(
            record.wrong_patient.is_empty(),
            "{mode:?}: {:?}",
            record.wrong_patient
        );
        assert_eq!(
            ids(&record.record.allergies),
            ["nka", "nkda", "peanut"],
            "{mode:?}: by urn:uuid fullUrl, by NHS number identifier, by id"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// What entries carry
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn verification_status_of_each_kind_is_carried_not_filtered() {
    let (_server, base) = serve(record_server()).await;
    let record = fetch(&base, QueryMode::Search).await;
    let status = |entries: &[Entry], id: &str| {
        VerificationStatus::try_from(entry(entries, id).verification_status).expect("known")
    };
    let conditions = &record.record.conditions;
    for (id, expected) in [
        ("cond-confirmed", VerificationStatus::Confirmed),
        ("cond-unconfirmed", VerificationStatus::Unconfirmed),
        ("cond-provisional", VerificationStatus::Provisional),
        ("cond-differential", VerificationStatus::Differential),
        ("cond-refuted", VerificationStatus::Refuted),
        ("cond-entered-in-error", VerificationStatus::EnteredInError),
        ("cond-restricted", VerificationStatus::Unspecified),
    ] {
        assert_eq!(status(conditions, id), expected, "{id}");
    }
    assert_eq!(entry(conditions, "cond-refuted").status, "inactive");
    assert_eq!(
        status(&record.record.allergies, "allergy-refuted"),
        VerificationStatus::Refuted
    );
    assert_eq!(
        status(&record.record.medications, "mr-entered-in-error"),
        VerificationStatus::EnteredInError
    );
}

/// A server holding two Patient records for one NHS number (an unmerged duplicate): the
/// record of one is read, and the answer says it is short in every section asked rather than
/// looking whole.
#[tokio::test]
async fn two_patient_records_for_one_nhs_number_make_the_answer_short() {
    for mode in MODES {
        let (_server, base) = serve(Server::fixture("two-patient-records.json")).await;
        let record = fetch(&base, mode).await;
        assert!(
            record
                .shortfalls
                .iter()
                .any(|s| s.reason.contains("2 patient records")
                    && s.sections
                        .contains(carerecord_adapters::proto::Section::Conditions)),
            "{mode:?}: {:?}",
            record.shortfalls
        );
        assert!(
            record
                .record
                .conditions
                .iter()
                .any(|e| e.summary.contains("Asthma")),
            "{mode:?}: {:?}",
            record.record.conditions
        );
    }
}

#[tokio::test]
async fn no_known_allergy_is_an_assertion_beside_an_active_allergy() {
    let (_server, base) = serve(Server::fixture("no-known-allergy.json")).await;
    let record = fetch(&base, QueryMode::Search).await;
    let allergies = &record.record.allergies;
    assert!(entry(allergies, "nka").asserts_absence);
    assert!(entry(allergies, "nkda").asserts_absence);
    let peanut = entry(allergies, "peanut");
    assert!(!peanut.asserts_absence, "an allergy, not an assertion");
    assert_eq!(peanut.status, "active");
    assert_eq!(
        peanut.verification_status,
        VerificationStatus::Unconfirmed as i32
    );
    assert!(entry(&record.record.conditions, "ips-no-known-problems").asserts_absence);
    assert!(
        record.record.medications.is_empty(),
        "IPS no-medication-info means unknown, not none: not an entry"
    );
    assert!(
        record
            .warnings
            .iter()
            .any(|w| w.contains("no information about medicines")),
        "{:?}",
        record.warnings
    );
    // ... and the medicines section is short for this source (unknown), not "none recorded".
    assert!(
        record.shortfalls.iter().any(|s| s
            .sections
            .contains(carerecord_adapters::proto::Section::Medications)
            && s.reason.contains("no information about medicines")),
        "{:?}",
        record.shortfalls
    );
}

#[tokio::test]
async fn every_coding_and_security_label_reaches_the_entry() {
    let (_server, base) = serve(record_server()).await;
    let record = fetch(&base, QueryMode::Search).await;
    let many = entry(&record.record.conditions, "cond-many-codings");
    let codes: Vec<&str> = many.codings.iter().map(|c| c.code.as_str()).collect();
    assert_eq!(
        codes,
        ["68566005", "GUM-017", "105629000"],
        "the chosen coding first, the sensitive third one kept"
    );
    assert_eq!(
        many.concept.as_ref().map(|c| c.code.as_str()),
        Some("68566005")
    );
    let restricted = entry(&record.record.conditions, "cond-restricted");
    let labels: Vec<&str> = restricted
        .security_labels
        .iter()
        .map(|c| c.code.as_str())
        .collect();
    assert_eq!(labels, ["R", "SDV"]);
}

#[tokio::test]
async fn allergy_severity_and_prescription_intent_are_kept() {
    let (_server, base) = serve(record_server()).await;
    let record = fetch(&base, QueryMode::Search).await;
    let Some(Detail::Allergy(allergy)) =
        &entry(&record.record.allergies, "allergy-penicillin").detail
    else {
        panic!("allergy detail");
    };
    assert_eq!(
        allergy.severity, "severe",
        "the worst of moderate and severe"
    );
    assert_eq!(allergy.criticality, "high");
    let intents: BTreeMap<&str, String> = record
        .record
        .medications
        .iter()
        .filter_map(|e| match &e.detail {
            Some(Detail::Medication(m)) => {
                Some((e.provenance[0].source_entry_id.as_str(), m.intent.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(intents["mr-included"], "plan");
    assert_eq!(intents["mr-contained"], "order");
    assert_eq!(intents["ms-metformin"], "", "statements have no intent");
}

// ---------------------------------------------------------------------------------------------
// Shortfalls
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_search_cut_at_the_page_limit_is_a_shortfall_of_its_section() {
    let (_server, base) = serve(record_server()).await;
    let mut config = FhirConfig::new(&base);
    config.page_size = 3;
    config.page_limit = 1;
    let source = FhirSource::new(
        SourceInfo {
            id: "leeds-gp".into(),
            organisation_code: "Y12345".into(),
            organisation_name: "Chequers Lane Surgery".into(),
        },
        &config,
    )
    .expect("valid");
    let Ok(SourceReply::Found(record)) = source.fetch(&request(WITHIN)).await else {
        panic!("a record");
    };
    let cut: Vec<SectionSet> = record
        .shortfalls
        .iter()
        .filter(|s| s.reason.contains("pages"))
        .map(|s| s.sections)
        .collect();
    assert_eq!(
        cut,
        [
            SectionSet::NONE.with(Section::Conditions),
            SectionSet::NONE.with(Section::Medications)
        ],
        "{:?}",
        record.shortfalls
    );
}
