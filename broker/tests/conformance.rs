//! `carerecord conformance` against live endpoints: the mock region's FHIR servers (they pass),
//! deliberately broken ones (each fails with the check and fix meant for it), and
//! source-protocol servers, good and broken. One process test pins the exit status.

mod common;

use std::process::Command;
use std::sync::Arc;

use carerecord_adapters::memory::InMemorySource;
use carerecord_adapters::proto::{CareRecord, Coding, Entry, Patient, Provenance};
use carerecord_adapters::protocol_server::SourceServer;
use carerecord_adapters::testkit::{Garbage, GarbageServer, checks};
use carerecord_adapters::{
    NhsNumber, Source, SourceError, SourceInfo, SourceReply, SourceRequest, async_trait,
};
use carerecord_broker::cli::conformance::{
    CAPABILITY_STATEMENT, ConformanceArgs, DESCRIBES_ITSELF, LiveReport, check,
};
use carerecord_mock_sources::{Fault, RegionServer};
use tokio::sync::oneshot;

const KNOWN: &str = "9990000018";

fn args(known: &str) -> ConformanceArgs {
    ConformanceArgs {
        grpc: None,
        fhir: None,
        known: known.into(),
        unknown: "9999999999".into(),
        organisation_code: None,
        ca_cert: None,
        client_cert: None,
        client_key: None,
        tls_domain: None,
        bearer_token_env: None,
        patience_ms: 5_000,
    }
}

fn fhir(url: &str, known: &str) -> ConformanceArgs {
    ConformanceArgs {
        fhir: Some(url.into()),
        ..args(known)
    }
}

fn grpc(url: &str) -> ConformanceArgs {
    ConformanceArgs {
        grpc: Some(url.into()),
        ..args(KNOWN)
    }
}

/// A small region with no latency, and one organisation's base URL and a patient it knows.
async fn region() -> (RegionServer, String, String) {
    let (region, server) = common::mock_region(60, 3).await;
    assert!(
        region
            .patients()
            .all(|p| p.nhs_number.as_digits() != "9999999999"),
        "the default unknown patient must be unknown"
    );
    let org = server.organisations()[0].clone();
    let patient = region
        .patients()
        .find(|p| p.organisations.contains(&org.code))
        .expect("a patient of the organisation");
    (server, org.base_url, patient.nhs_number.as_digits())
}

/// Asserts the check failed, and that the report explains it and says how to fix it.
fn assert_fails_with(live: &LiveReport, name: &str, fix: &str) {
    let text = live.to_string();
    let check = live
        .report
        .check(name)
        .unwrap_or_else(|| panic!("no check {name:?} in\n{text}"));
    assert!(!check.passed, "{name} passed:\n{text}");
    assert!(!live.passed(), "{text}");
    assert!(text.contains(&format!("FAIL  {name}")), "{text}");
    assert!(text.contains(fix), "no fix {fix:?} in\n{text}");
    assert!(text.contains("NOT READY"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fhir_server_of_the_mock_region_passes() {
    let (server, _, _) = region().await;
    let region = server.region().clone();
    for org in server.organisations() {
        let known = region
            .patients()
            .find(|p| p.organisations.contains(&org.code))
            .expect("a patient of the organisation")
            .nhs_number
            .as_digits();
        let live = check(&fhir(&org.base_url, &known)).await.expect("ran");
        assert!(live.passed(), "{}:\n{live}", org.code);
        let text = live.to_string();
        assert!(
            text.contains(&format!("PASS  {CAPABILITY_STATEMENT}")),
            "{text}"
        );
        assert!(
            text.contains("READY — the broker can use this endpoint"),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fhir_server_failing_every_request_fails_finding_the_patient() {
    let (server, url, known) = region().await;
    server.faults().set_fault_all(Fault::Http500);
    let live = check(&fhir(&url, &known)).await.expect("ran");
    assert_fails_with(
        &live,
        checks::FINDS_KNOWN_PATIENT,
        "Patient?identifier=https://fhir.nhs.uk/Id/nhs-number",
    );
    assert_fails_with(
        &live,
        CAPABILITY_STATEMENT,
        "serve GET [base]/metadata with an R4 CapabilityStatement",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fhir_server_that_finds_nobody_fails_finding_the_known_patient() {
    let (server, url, known) = region().await;
    server.faults().set_fault_all(Fault::EmptyBundle);
    let live = check(&fhir(&url, &known)).await.expect("ran");
    assert_fails_with(
        &live,
        checks::FINDS_KNOWN_PATIENT,
        "check that --known is a patient the server holds",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fhir_server_answering_about_another_patient_fails() {
    let (server, url, known) = region().await;
    server.faults().set_fault_all(Fault::WrongPatient);
    let live = check(&fhir(&url, &known)).await.expect("ran");
    let text = live.to_string();
    assert!(!live.passed(), "{text}");
    assert!(
        text.contains("FAIL  a known patient is found") || text.contains("FAIL  answers about"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn something_that_is_not_a_fhir_server_fails_the_capability_statement() {
    let html = GarbageServer::start(Garbage::NotJson)
        .await
        .expect("server");
    let live = check(&fhir(html.url(), KNOWN)).await.expect("ran");
    assert_fails_with(&live, CAPABILITY_STATEMENT, "did not answer with JSON");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let live = check(&fhir(&format!("http://{closed}/fhir"), KNOWN))
        .await
        .expect("ran");
    assert_fails_with(&live, CAPABILITY_STATEMENT, "could not reach");
}

// ---- the source protocol -----------------------------------------------------------------

fn hospice_record() -> CareRecord {
    CareRecord {
        patient: Some(Patient {
            nhs_number: KNOWN.into(),
            family_name: "Example".into(),
            ..Patient::default()
        }),
        care_plans: vec![Entry {
            concept: Some(Coding {
                system: "http://snomed.info/sct".into(),
                code: "713058002".into(),
                display: "Palliative care plan".into(),
            }),
            summary: "Palliative care plan".into(),
            effective: "2026-10-01".into(),
            provenance: vec![Provenance {
                source_entry_id: "plan-1".into(),
                last_updated: "2026-11-01T09:00:00Z".into(),
                ..Provenance::default()
            }],
            ..Entry::default()
        }],
        ..CareRecord::default()
    }
}

fn hospice() -> InMemorySource {
    InMemorySource::new("hospice", "UNDER-TEST", "St Elsewhere Hospice")
        .with_patient(NhsNumber::parse(KNOWN).expect("valid"), hospice_record())
}

async fn serve(source: impl Source + 'static) -> (String, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(SourceServer::new(Arc::new(source)).serve(listener, async {
        let _ = stopped.await;
    }));
    (url, stop)
}

/// Reports an unknown patient as an error rather than "not known".
struct NotFoundAsError(InMemorySource);

#[async_trait]
impl Source for NotFoundAsError {
    fn info(&self) -> &SourceInfo {
        self.0.info()
    }

    async fn fetch(&self, request: &SourceRequest) -> Result<SourceReply, SourceError> {
        match self.0.fetch(request).await? {
            SourceReply::NotFound => Err(SourceError::Status(404)),
            found => Ok(found),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_source_protocol_server_passes() {
    let (url, _stop) = serve(hospice()).await;
    let live = check(&grpc(&url)).await.expect("ran");
    assert!(live.passed(), "{live}");
    assert!(
        live.to_string()
            .contains(&format!("PASS  {DESCRIBES_ITSELF}")),
        "{live}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_describing_another_organisation_is_a_warning_not_a_failure() {
    let (url, _stop) = serve(hospice()).await;
    let live = check(&ConformanceArgs {
        organisation_code: Some("RX1".into()),
        ..grpc(&url)
    })
    .await
    .expect("ran");
    let describe = live.report.check(DESCRIBES_ITSELF).expect("ran");
    assert!(describe.warned(), "{live}");
    assert!(
        describe
            .detail
            .contains("serves UNDER-TEST but --organisation-code is RX1"),
        "{live}"
    );
    assert!(live.passed(), "a warning does not fail the run:\n{live}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_protocol_server_failing_the_unknown_patient_fails_not_found() {
    let (url, _stop) = serve(NotFoundAsError(hospice())).await;
    let live = check(&grpc(&url)).await.expect("ran");
    assert_fails_with(
        &live,
        checks::NOT_FOUND_IS_NOT_AN_ERROR,
        "answer `not_known` (not a Failure, not a gRPC error status)",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_fails_describe_with_a_fix() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let live = check(&grpc(&format!("http://{closed}")))
        .await
        .expect("ran");
    assert_fails_with(&live, DESCRIBES_ITSELF, "implement carerecord.source.v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_exits_zero_when_ready_and_non_zero_when_not() {
    let (server, url, known) = region().await;
    let run = |known: &str| {
        Command::new(env!("CARGO_BIN_EXE_carerecord"))
            .args(["conformance", "--fhir", &url, "--known", known])
            .output()
            .expect("run carerecord conformance")
    };
    let ready = tokio::task::block_in_place(|| run(&known));
    let stdout = String::from_utf8_lossy(&ready.stdout);
    assert!(
        ready.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&ready.stderr)
    );
    assert!(
        stdout.contains("READY — the broker can use this endpoint"),
        "{stdout}"
    );
    server.faults().set_fault_all(Fault::EmptyBundle);
    let broken = tokio::task::block_in_place(|| run(&known));
    let stdout = String::from_utf8_lossy(&broken.stdout);
    assert!(!broken.status.success(), "{stdout}");
    assert!(
        stdout.contains("FAIL  a known patient is found"),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&broken.stderr).contains("failed"),
        "the error line says it failed"
    );
}
