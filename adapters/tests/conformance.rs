//! The conformance kit, run against every source this crate ships (the in-memory source, the FHIR
//! adapter against a FHIR server run in the test, the worked care home example), and against
//! deliberately broken sources to show it catches each violation with the check meant for it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::extract::State;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use carerecord_adapters::fhir::{FhirConfig, FhirSource};
use carerecord_adapters::memory::{Behaviour, InMemorySource};
use carerecord_adapters::proto::{CareRecord, Coding, Entry, Patient, Provenance, Purpose};
use carerecord_adapters::testkit::{
    self, Conformance, Format, Garbage, Report, checks, garbage_over_http, garbage_over_http_as,
    survives_garbage,
};
use carerecord_adapters::{
    NhsNumber, SectionSet, Source, SourceError, SourceInfo, SourceReply, SourceRequest,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;

#[path = "../examples/care_home_csv/adapter.rs"]
mod care_home_csv;

const KNOWN: &str = "9990000018";
const UNKNOWN: &str = "9990000026";
/// Another valid synthetic NHS number, for a source that answers about the wrong patient.
const SOMEONE_ELSE: &str = "9990000034";

fn known() -> NhsNumber {
    NhsNumber::parse(KNOWN).expect("valid")
}

fn unknown() -> NhsNumber {
    NhsNumber::parse(UNKNOWN).expect("valid")
}

fn info(id: &str) -> SourceInfo {
    SourceInfo {
        id: id.into(),
        organisation_code: "Y12345".into(),
        organisation_name: "Chequers Lane Surgery".into(),
    }
}

/// The names of the failed (must) and warned (should) checks.
fn outcome(report: &Report) -> (BTreeSet<&'static str>, BTreeSet<&'static str>) {
    (
        report.failures().map(|c| c.name).collect(),
        report.warnings().map(|c| c.name).collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// The in-memory source
// ---------------------------------------------------------------------------------------------

fn coded_entry(id: &str, system: &str, code: &str, display: &str, effective: &str) -> Entry {
    Entry {
        concept: Some(Coding {
            system: system.into(),
            code: code.into(),
            display: display.into(),
        }),
        summary: display.into(),
        status: "active".into(),
        effective: effective.into(),
        provenance: vec![Provenance {
            source_entry_id: id.into(),
            last_updated: "2024-05-01T09:30:00Z".into(),
            ..Provenance::default()
        }],
        ..Entry::default()
    }
}

fn memory_record() -> CareRecord {
    let snomed = "http://snomed.info/sct";
    let dmd = "https://dmd.nhs.uk";
    CareRecord {
        patient: Some(Patient {
            nhs_number: KNOWN.into(),
            family_name: "Okafor".into(),
            given_names: vec!["Grace".into()],
            birth_date: "1941-06-30".into(),
            gender: "female".into(),
            ..Patient::default()
        }),
        conditions: vec![coded_entry(
            "c1",
            snomed,
            "44054006",
            "Type 2 diabetes mellitus",
            "2019",
        )],
        allergies: vec![coded_entry(
            "a1",
            snomed,
            "91936005",
            "Allergy to penicillin",
            "2009-03",
        )],
        medications: vec![
            coded_entry(
                "m1",
                dmd,
                "39732311000001104",
                "Amlodipine 5mg tablets",
                "2021-03-01",
            ),
            coded_entry(
                "m2",
                dmd,
                "325278007",
                "Metformin 500mg tablets",
                "2019-02-14T10:00:00Z",
            ),
        ],
        ..CareRecord::default()
    }
}

fn memory_source(id: &str) -> InMemorySource {
    InMemorySource::new(id, "Y12345", "Chequers Lane Surgery")
        .with_patient(known(), memory_record())
}

#[tokio::test]
async fn the_in_memory_source_conforms() {
    let source = memory_source("memory");
    let report = Conformance::new(&source, known(), unknown()).run().await;
    println!("{report}");
    report.assert_all_passed();
    assert_eq!(report.warnings().count(), 0, "{report}");
    assert_eq!(report.checks.len(), 17, "every check ran: {report}");
}

// ---------------------------------------------------------------------------------------------
// The FHIR adapter against a small FHIR server (the approach of tests/fhir_source.rs, cut down)
// ---------------------------------------------------------------------------------------------

struct Fhir {
    patients: Vec<Value>,
    resources: Vec<Value>,
    /// Added before every answer: the slow upstream for the deadline and cancellation checks.
    delay: Duration,
}

async fn handle(State(fhir): State<Arc<Fhir>>, uri: Uri) -> Response {
    tokio::time::sleep(fhir.delay).await;
    let query: Vec<(String, String)> =
        reqwest::Url::parse(&format!("http://x/?{}", uri.query().unwrap_or("")))
            .map(|u| {
                u.query_pairs()
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default();
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let resources: Vec<&Value> = match segments.as_slice() {
        ["fhir", "Patient"] => {
            let identifier = query
                .iter()
                .find(|(k, _)| k == "identifier")
                .map(|(_, v)| v.as_str())
                .unwrap_or_default();
            fhir.patients
                .iter()
                .filter(|p| {
                    identifier
                        == format!(
                            "https://fhir.nhs.uk/Id/nhs-number|{}",
                            p["identifier"][0]["value"].as_str().unwrap_or_default()
                        )
                })
                .collect()
        }
        ["fhir", resource_type] => fhir
            .resources
            .iter()
            .filter(|r| r["resourceType"] == *resource_type)
            .collect(),
        _ => return axum::http::StatusCode::NOT_FOUND.into_response(),
    };
    let entries: Vec<Value> = resources
        .into_iter()
        .map(|r| json!({"resource": r, "search": {"mode": "match"}}))
        .collect();
    (
        [("content-type", "application/fhir+json")],
        json!({"resourceType": "Bundle", "type": "searchset", "entry": entries}).to_string(),
    )
        .into_response()
}

/// Starts a FHIR server on loopback; returns its base URL.
async fn serve_fhir(delay: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}/fhir", listener.local_addr().expect("addr"));
    let updated = json!({"lastUpdated": "2024-05-01T09:30:00Z"});
    let subject = json!({"reference": "Patient/p1"});
    let snomed = |code: &str, display: &str| json!({"coding": [{"system": "http://snomed.info/sct", "code": code, "display": display}]});
    let fhir = Fhir {
        patients: vec![json!({
            "resourceType": "Patient", "id": "p1", "meta": updated,
            "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": KNOWN}],
            "name": [{"use": "official", "family": "Okafor", "given": ["Grace"]}],
            "gender": "female", "birthDate": "1941-06-30"
        })],
        resources: vec![
            json!({"resourceType": "Condition", "id": "c1", "meta": updated, "subject": subject,
                   "code": snomed("44054006", "Type 2 diabetes mellitus"), "onsetDateTime": "2019"}),
            json!({"resourceType": "AllergyIntolerance", "id": "a1", "meta": updated, "patient": subject,
                   "code": snomed("91936005", "Allergy to penicillin"), "criticality": "high"}),
            json!({"resourceType": "MedicationStatement", "id": "ms1", "meta": updated, "subject": subject,
                   "status": "active",
                   "medicationCodeableConcept": {"coding": [{"system": "https://dmd.nhs.uk",
                       "code": "39732311000001104", "display": "Amlodipine 5mg tablets"}]},
                   "dosage": [{"text": "One tablet in the morning"}]}),
            json!({"resourceType": "Observation", "id": "o1", "meta": updated, "subject": subject,
                   "status": "final", "code": snomed("1049301000000100", "HbA1c level"),
                   "valueQuantity": {"value": 48, "unit": "mmol/mol"}, "effectiveDateTime": "2024-03-01"}),
            // A care plan with a title but no code: the kit warns (entries carry a coded concept).
            json!({"resourceType": "CarePlan", "id": "cp1", "meta": updated, "subject": subject,
                   "status": "active", "title": "Diabetes care plan"}),
        ],
        delay,
    };
    let app = Router::new().fallback(handle).with_state(Arc::new(fhir));
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

fn fhir_source(base: &str) -> FhirSource {
    FhirSource::new(info("leeds-gp"), &FhirConfig::new(base)).expect("valid config")
}

#[tokio::test]
async fn the_fhir_adapter_conforms() {
    let base = serve_fhir(Duration::ZERO).await;
    let slow_base = serve_fhir(Duration::from_secs(2)).await;
    let (source, slow) = (fhir_source(&base), fhir_source(&slow_base));
    let report = Conformance::new(&source, known(), unknown())
        .with_slow_upstream(&slow)
        .run()
        .await;
    println!("{report}");
    report.assert_all_passed();
    let (_, warnings) = outcome(&report);
    assert_eq!(warnings, BTreeSet::from([checks::CODED]), "{report}");
    let deadline = report.check(checks::DEADLINE).expect("ran");
    assert!(deadline.detail.contains("Err(Timeout)"), "{report}");
}

#[tokio::test]
async fn the_fhir_adapter_survives_garbage() {
    let report = garbage_over_http(known(), |url| {
        let mut config = FhirConfig::new(format!("{url}/fhir"));
        config.max_response_bytes = 1024 * 1024;
        Box::new(FhirSource::new(info("leeds-gp"), &config).expect("valid config"))
    })
    .await;
    println!("{report}");
    report.assert_all_passed();
    assert_eq!(report.checks.len(), Garbage::ALL.len());
}

#[tokio::test]
async fn the_fhir_adapter_survives_json_and_binary_garbage_too() {
    for format in [Format::Json, Format::Binary] {
        let report = garbage_over_http_as(format, known(), |url| {
            let mut config = FhirConfig::new(format!("{url}/fhir"));
            config.max_response_bytes = 1024 * 1024;
            Box::new(FhirSource::new(info("leeds-gp"), &config).expect("valid config"))
        })
        .await;
        report.assert_all_passed();
        assert_eq!(report.checks.len(), Garbage::for_format(format).len());
    }
}

// ---------------------------------------------------------------------------------------------
// The worked example: the care home's CSV export
// ---------------------------------------------------------------------------------------------

/// A file in the temp directory, removed on drop.
struct TempExport(PathBuf);

impl TempExport {
    fn new(name: &str, content: &[u8]) -> TempExport {
        let path = std::env::temp_dir().join(format!(
            "carerecord-conformance-{}-{name}.csv",
            std::process::id()
        ));
        std::fs::write(&path, content).expect("write the export");
        TempExport(path)
    }
}

impl Drop for TempExport {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn care_home(export: &TempExport) -> care_home_csv::CareHomeCsvSource {
    care_home_csv::CareHomeCsvSource::new(
        SourceInfo {
            id: "rosewood-care-home".into(),
            organisation_code: "VM4Q1".into(),
            organisation_name: "Rosewood Care Home".into(),
        },
        &export.0,
    )
}

#[tokio::test]
async fn the_care_home_example_conforms() {
    let export = TempExport::new("conforms", care_home_csv::SAMPLE_EXPORT.as_bytes());
    let source = care_home(&export);
    let report = Conformance::new(&source, known(), unknown()).run().await;
    println!("{report}");
    report.assert_all_passed();
    assert_eq!(report.warnings().count(), 0, "{report}");
}

#[tokio::test]
async fn the_care_home_example_survives_garbage() {
    let export = TempExport::new("garbage", b"");
    let source = care_home(&export);
    let csv_and_binary = Garbage::for_format(Format::Csv)
        .iter()
        .chain(Garbage::for_format(Format::Binary));
    for &kind in Garbage::ALL.iter().chain(csv_and_binary) {
        std::fs::write(&export.0, kind.body()).expect("write");
        let check = survives_garbage(&source, known(), kind).await;
        assert!(check.passed, "{}: {}", check.name, check.detail);
    }
}

#[tokio::test]
async fn the_care_home_example_maps_rows_to_coded_iso_dated_entries() {
    let export = TempExport::new("maps", care_home_csv::SAMPLE_EXPORT.as_bytes());
    let request = testkit::request(
        known(),
        SectionSet::ALL,
        Instant::now() + Duration::from_secs(5),
    );
    let Ok(SourceReply::Found(record)) = care_home(&export).fetch(&request).await else {
        panic!("the resident is in the export");
    };
    let paracetamol = record
        .record
        .medications
        .iter()
        .find(|e| e.provenance[0].source_entry_id == "MAR-1203")
        .expect("MAR-1203");
    assert_eq!(
        paracetamol.effective, "2024-03-14",
        "DD/MM/YYYY as ISO 8601"
    );
    assert_eq!(
        paracetamol.summary,
        "Paracetamol 500mg tablets — Two tablets, up to four times a day when required",
        "a quoted field keeps its comma"
    );
    let coding = paracetamol.concept.as_ref().expect("coded");
    assert_eq!(
        (coding.system.as_str(), coding.code.as_str()),
        ("https://dmd.nhs.uk", "322236009")
    );
    let provenance = &paracetamol.provenance[0];
    assert_eq!(provenance.source_id, "rosewood-care-home");
    assert_eq!(provenance.last_updated, "2024-05-02T19:40:00Z");
    let latex = record
        .record
        .allergies
        .iter()
        .find(|e| e.provenance[0].source_entry_id == "ALG-0042")
        .expect("ALG-0042");
    assert_eq!(
        latex.effective, "2015-03",
        "a partial date keeps its precision"
    );
}

#[tokio::test]
async fn the_care_home_example_warns_about_bad_rows_without_repeating_them() {
    let text = format!(
        "{}\n{KNOWN},allergy,snomed,91936005,Allergy to penicillin,,2009,active,ALG-1,\n\
         {KNOWN},medication,read2,bxd5.,Amlodipine,,31/02/2021x,active,MAR-1,\n\
         not a row at all\n",
        care_home_csv::HEADER
    );
    let export = TempExport::new("bad-rows", text.as_bytes());
    let source = care_home(&export);
    let request = testkit::request(
        known(),
        SectionSet::ALL,
        Instant::now() + Duration::from_secs(5),
    );
    let Ok(SourceReply::Found(record)) = source.fetch(&request).await else {
        panic!("the resident has a readable row");
    };
    assert_eq!(record.record.entry_count(), 1);
    assert_eq!(
        record.warnings,
        [
            "export line 3: code system is neither snomed nor dmd; row skipped",
            "1 row(s) of the export could not be read and may belong to this patient",
        ]
    );
    // With an unreadable row, "not known here" would be a guess: it is an error instead.
    let request = testkit::request(
        unknown(),
        SectionSet::ALL,
        Instant::now() + Duration::from_secs(5),
    );
    assert!(matches!(
        source.fetch(&request).await,
        Err(SourceError::InvalidResponse(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Broken sources: the kit catches each violation with the check meant for it
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Reports an unknown patient as an error, naming the NHS number.
    ErrorForUnknown,
    /// Sleeps two seconds whatever the deadline.
    IgnoresDeadline,
    /// Leaves source_entry_id empty.
    NoEntryIds,
    /// Panics on every fetch.
    Panics,
    /// Returns every section whatever was asked.
    ExtraSections,
    /// Hides conditions from emergency access.
    FiltersByRequester,
    /// Loses a medicine on every fetch after the first.
    Unstable,
    /// Takes a permit it gives back only if the fetch completes.
    LeaksOnCancel,
    /// Answers with another patient's demographics.
    WrongPatient,
    /// Puts the NHS number in a warning.
    NhsNumberInWarning,
}

/// A well-behaved in-memory source with one fault added.
struct Faulty {
    inner: InMemorySource,
    fault: Fault,
    calls: AtomicU64,
    /// One permit, leaked by a cancelled [`Fault::LeaksOnCancel`] fetch.
    gate: Semaphore,
}

impl Faulty {
    fn new(fault: Fault) -> Faulty {
        Faulty {
            inner: memory_source("faulty"),
            fault,
            calls: AtomicU64::new(0),
            gate: Semaphore::new(1),
        }
    }
}

#[async_trait]
impl Source for Faulty {
    fn info(&self) -> &SourceInfo {
        self.inner.info()
    }

    async fn fetch(&self, request: &SourceRequest) -> Result<SourceReply, SourceError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let mut request = request.clone();
        match self.fault {
            Fault::Panics => panic!("index out of bounds in the adapter"),
            Fault::IgnoresDeadline => tokio::time::sleep(Duration::from_secs(2)).await,
            Fault::LeaksOnCancel => {
                let permit = self
                    .gate
                    .acquire()
                    .await
                    .map_err(|_| SourceError::Other("closed".into()))?;
                permit.forget();
                tokio::time::sleep(Duration::from_millis(3)).await;
                let reply = self.inner.fetch(&request).await;
                self.gate.add_permits(1);
                return reply;
            }
            Fault::ExtraSections => request.sections = SectionSet::ALL,
            _ => {}
        }
        let SourceReply::Found(mut record) = self.inner.fetch(&request).await? else {
            return match self.fault {
                Fault::ErrorForUnknown => Err(SourceError::Other(format!(
                    "no patient with NHS number {}",
                    request.nhs_number
                ))),
                _ => Ok(SourceReply::NotFound),
            };
        };
        let entries = &mut record.record;
        match self.fault {
            Fault::NoEntryIds => entries
                .conditions
                .iter_mut()
                .chain(&mut entries.allergies)
                .chain(&mut entries.medications)
                .for_each(|e| e.provenance[0].source_entry_id.clear()),
            Fault::FiltersByRequester
                if request.requester.purpose == Purpose::EmergencyAccess as i32 =>
            {
                entries.conditions.clear();
            }
            Fault::Unstable if call > 0 => {
                entries.medications.pop();
            }
            Fault::WrongPatient => {
                if let Some(patient) = entries.patient.as_mut() {
                    patient.nhs_number = SOMEONE_ELSE.into();
                }
            }
            Fault::NhsNumberInWarning => record.warnings.push(format!(
                "entry for patient {} has no recorded date",
                request.nhs_number
            )),
            _ => {}
        }
        Ok(SourceReply::Found(record))
    }
}

#[tokio::test]
async fn the_kit_catches_each_violation_with_its_check() {
    use checks::*;
    let cases: &[(Fault, &[&str], &[&str])] = &[
        (
            Fault::ErrorForUnknown,
            &[NOT_FOUND_IS_NOT_AN_ERROR, REDACTED],
            &[],
        ),
        (Fault::NoEntryIds, &[PROVENANCE], &[]),
        (Fault::ExtraSections, &[], &[ONLY_REQUESTED_SECTIONS]),
        (Fault::FiltersByRequester, &[SAME_FOR_EVERY_REQUESTER], &[]),
        (
            Fault::Unstable,
            &[
                DETERMINISTIC,
                SAME_FOR_EVERY_REQUESTER,
                CONCURRENT,
                CANCELLATION_SAFE,
            ],
            &[],
        ),
        (Fault::LeaksOnCancel, &[CANCELLATION_SAFE], &[]),
        (Fault::WrongPatient, &[RIGHT_PATIENT], &[]),
        (Fault::NhsNumberInWarning, &[REDACTED], &[]),
    ];
    for (fault, failures, warnings) in cases {
        let source = Faulty::new(*fault);
        let report = Conformance::new(&source, known(), unknown())
            .with_patience(Duration::from_millis(300))
            .run()
            .await;
        let expected = (
            failures.iter().copied().collect(),
            warnings.iter().copied().collect(),
        );
        assert_eq!(outcome(&report), expected, "{fault:?}:\n{report}");
    }
}

#[tokio::test]
async fn the_kit_catches_a_source_that_ignores_its_deadline() {
    let source = memory_source("fast");
    let slow = Faulty::new(Fault::IgnoresDeadline);
    let started = Instant::now();
    let report = Conformance::new(&source, known(), unknown())
        .with_slow_upstream(&slow)
        .run()
        .await;
    assert_eq!(
        outcome(&report),
        (BTreeSet::from([checks::DEADLINE]), BTreeSet::new()),
        "{report}"
    );
    let detail = &report.check(checks::DEADLINE).expect("ran").detail;
    assert!(detail.contains("no answer within 150 ms"), "{detail}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the kit gave up on time"
    );
}

#[tokio::test]
async fn a_panicking_source_fails_checks_not_the_test() {
    let source = Faulty::new(Fault::Panics);
    let report = Conformance::new(&source, known(), unknown())
        .with_patience(Duration::from_millis(300))
        .run()
        .await;
    let (failures, _) = outcome(&report);
    for name in [
        checks::FINDS_KNOWN_PATIENT,
        checks::NOT_FOUND_IS_NOT_AN_ERROR,
        checks::DEADLINE,
        checks::NEVER_PANICS,
    ] {
        assert!(failures.contains(name), "{name}:\n{report}");
    }
    let found = &report
        .check(checks::FINDS_KNOWN_PATIENT)
        .expect("ran")
        .detail;
    assert!(found.contains("panicked: index out of bounds"), "{found}");
}

#[tokio::test]
async fn a_hanging_source_fails_checks_within_the_patience() {
    let source = memory_source("hangs").with_behaviour(Behaviour::Hang);
    let started = Instant::now();
    let report = Conformance::new(&source, known(), unknown())
        .with_patience(Duration::from_millis(200))
        .run()
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let (failures, _) = outcome(&report);
    for name in [
        checks::FINDS_KNOWN_PATIENT,
        checks::NOT_FOUND_IS_NOT_AN_ERROR,
        checks::DEADLINE,
        checks::CANCELLATION_SAFE,
    ] {
        assert!(failures.contains(name), "{name}:\n{report}");
    }
    assert!(
        report
            .check(checks::IDENTIFIES_ITSELF)
            .is_some_and(|c| c.passed)
    );
}

#[tokio::test]
async fn a_failed_report_panics_listing_its_failures() {
    let source = Faulty::new(Fault::ErrorForUnknown);
    let report = Conformance::new(&source, known(), unknown()).run().await;
    let panic = std::panic::catch_unwind(|| report.assert_all_passed()).expect_err("fails");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("failed 2 conformance check(s)"),
        "{message}"
    );
    assert!(
        message.contains("  - not-found is not an error: "),
        "{message}"
    );
    assert!(
        !message.contains(UNKNOWN),
        "the report itself does not repeat the NHS number: {message}"
    );
    assert!(
        message.contains("FAIL  errors and warnings carry no patient data"),
        "{message}"
    );
}

#[tokio::test]
async fn garbage_that_reads_as_not_found_fails() {
    // A source that shrugs at anything it cannot parse and says "not known here".
    struct Shrugs(SourceInfo);
    #[async_trait]
    impl Source for Shrugs {
        fn info(&self) -> &SourceInfo {
            &self.0
        }
        async fn fetch(&self, _: &SourceRequest) -> Result<SourceReply, SourceError> {
            Ok(SourceReply::NotFound)
        }
    }
    let check = survives_garbage(&Shrugs(info("shrugs")), known(), Garbage::TruncatedJson).await;
    assert!(!check.passed);
    assert!(
        check.detail.contains("patient not known"),
        "{}",
        check.detail
    );

    struct Echoes(SourceInfo);
    #[async_trait]
    impl Source for Echoes {
        fn info(&self) -> &SourceInfo {
            &self.0
        }
        async fn fetch(&self, _: &SourceRequest) -> Result<SourceReply, SourceError> {
            let body = String::from_utf8_lossy(&Garbage::NotJson.body()).into_owned();
            Err(SourceError::InvalidResponse(format!("cannot parse {body}")))
        }
    }
    let check = survives_garbage(&Echoes(info("echoes")), known(), Garbage::NotJson).await;
    assert!(!check.passed);
    assert!(
        check.detail.contains("repeats the upstream body"),
        "{}",
        check.detail
    );
}
