//! The source protocol over real gRPC on loopback: [`GrpcSource`] (the broker's client) against
//! [`SourceServer`] (any `Source` served over the protocol) and against servers that break the
//! protocol's rules, one way each.

use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::grpc::{GrpcSource, GrpcSourceConfig};
use carerecord_adapters::memory::{Behaviour, InMemorySource};
use carerecord_adapters::proto::{CareRecord, Coding, Entry, Patient, Provenance, SourceOutcome};
use carerecord_adapters::protocol_server::SourceServer;
use carerecord_adapters::testkit::{self, Conformance};
use carerecord_adapters::{
    NhsNumber, SectionSet, Source, SourceError, SourceInfo, SourceReply, SourceRequest,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;

const KNOWN: &str = "9990000018";
const UNKNOWN: &str = "9990000026";
const SOMEONE_ELSE: &str = "9990000034";

fn nhs(digits: &str) -> NhsNumber {
    NhsNumber::parse(digits).expect("valid")
}

fn info() -> SourceInfo {
    SourceInfo {
        id: "hospice".into(),
        organisation_code: "NHOSP1".into(),
        organisation_name: "St Elsewhere Hospice".into(),
    }
}

fn record(nhs_number: &str, effective: &str) -> CareRecord {
    CareRecord {
        patient: Some(Patient {
            nhs_number: nhs_number.into(),
            family_name: "Example".into(),
            given_names: vec!["Pat".into()],
            birth_date: "1950-01-01".into(),
            ..Patient::default()
        }),
        care_plans: vec![Entry {
            concept: Some(Coding {
                system: "http://snomed.info/sct".into(),
                code: "713058002".into(),
                display: "Palliative care plan".into(),
            }),
            summary: "Palliative care plan".into(),
            status: "active".into(),
            effective: effective.into(),
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

/// A source-protocol server on 127.0.0.1:0 serving `source`; stops when dropped.
struct Served {
    url: String,
    _stop: oneshot::Sender<()>,
}

async fn serve(source: impl Source + 'static) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(SourceServer::new(Arc::new(source)).serve(listener, async {
        let _ = stopped.await;
    }));
    Served { url, _stop: stop }
}

fn client(url: &str) -> GrpcSource {
    GrpcSource::new(info(), &GrpcSourceConfig::new(url)).expect("client")
}

fn ask(patient: &str, within: Duration) -> SourceRequest {
    testkit::request(nhs(patient), SectionSet::ALL, Instant::now() + within)
}

fn hospice() -> InMemorySource {
    InMemorySource::new("hospice", "NHOSP1", "St Elsewhere Hospice")
        .with_patient(nhs(KNOWN), record(KNOWN, "2026-10-01"))
}

#[tokio::test]
async fn a_served_patient_arrives_with_entries_and_demographics() {
    let server = serve(hospice()).await;
    let reply = client(&server.url)
        .fetch(&ask(KNOWN, Duration::from_secs(5)))
        .await
        .expect("served");
    let SourceReply::Found(found) = reply else {
        panic!("found");
    };
    assert_eq!(found.record.care_plans.len(), 1);
    assert_eq!(
        found.record.care_plans[0].provenance[0].source_entry_id,
        "plan-1"
    );
    assert_eq!(
        found.record.patient.as_ref().map(|p| p.nhs_number.as_str()),
        Some(KNOWN)
    );
}

#[tokio::test]
async fn a_patient_not_known_is_not_found() {
    let server = serve(hospice()).await;
    let reply = client(&server.url)
        .fetch(&ask(UNKNOWN, Duration::from_secs(5)))
        .await
        .expect("answered");
    assert!(matches!(reply, SourceReply::NotFound), "{reply:?}");
}

#[tokio::test]
async fn a_slow_server_is_a_timeout_by_the_deadline() {
    let server = serve(hospice().with_delay(Duration::from_secs(30))).await;
    let error = client(&server.url)
        .fetch(&ask(KNOWN, Duration::from_millis(300)))
        .await
        .expect_err("too slow");
    assert_eq!(error, SourceError::Timeout);
}

#[tokio::test]
async fn a_failing_server_is_an_error_with_its_redacted_reason() {
    let server = serve(
        hospice().with_behaviour(Behaviour::Fail(SourceError::Other(format!(
            "export database locked while reading {KNOWN}"
        )))),
    )
    .await;
    let error = client(&server.url)
        .fetch(&ask(KNOWN, Duration::from_secs(5)))
        .await
        .expect_err("failed");
    assert_eq!(error.outcome(), SourceOutcome::Error);
    let text = error.to_string();
    assert!(text.contains("export database locked"), "{text}");
    assert!(!text.contains(KNOWN), "the NHS number is masked: {text}");
}

#[tokio::test]
async fn an_unavailable_upstream_is_unavailable() {
    let server = serve(
        hospice().with_behaviour(Behaviour::Fail(SourceError::Unavailable(
            "the export system is down for maintenance".into(),
        ))),
    )
    .await;
    let error = client(&server.url)
        .fetch(&ask(KNOWN, Duration::from_secs(5)))
        .await
        .expect_err("failed");
    assert_eq!(error.outcome(), SourceOutcome::Unavailable);
}

#[tokio::test]
async fn malformed_entries_are_an_error_not_a_record() {
    let server = serve(
        InMemorySource::new("hospice", "NHOSP1", "St Elsewhere Hospice")
            .with_patient(nhs(KNOWN), record(KNOWN, "01/10/2026")),
    )
    .await;
    let error = client(&server.url)
        .fetch(&ask(KNOWN, Duration::from_secs(5)))
        .await
        .expect_err("malformed");
    assert!(
        matches!(error, SourceError::InvalidResponse(_)),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains("care_plans entry 1: effective is not ISO 8601"),
        "{error}"
    );
}

#[tokio::test]
async fn another_patients_demographics_pass_through_for_the_broker_to_refuse() {
    // The adapter does not judge identity: the broker's fan-out does, for every kind of source
    // (tested end to end in tests/tests/e2e/source_protocol.rs). Here: nothing is lost on the way.
    let server = serve(
        InMemorySource::new("hospice", "NHOSP1", "St Elsewhere Hospice")
            .with_patient(nhs(KNOWN), record(SOMEONE_ELSE, "2026-10-01")),
    )
    .await;
    let SourceReply::Found(found) = client(&server.url)
        .fetch(&ask(KNOWN, Duration::from_secs(5)))
        .await
        .expect("answered")
    else {
        panic!("found");
    };
    assert_eq!(
        found.record.patient.map(|p| p.nhs_number),
        Some(SOMEONE_ELSE.to_owned())
    );
}

/// A gRPC server that answers Fetch with a well-framed message whose payload is not protobuf.
#[derive(Clone)]
struct GarbageServer;

impl tonic::server::NamedService for GarbageServer {
    const NAME: &'static str = "carerecord.source.v1.SourceService";
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for GarbageServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: http::Request<tonic::body::Body>) -> Self::Future {
        let payload = b"\xff\xff\xff\xff CONFORMANCE-RAW-BODY not protobuf".to_vec();
        let mut frame = vec![0u8];
        frame.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(0).to_be_bytes());
        frame.extend_from_slice(&payload);
        let body = tonic::body::Body::new(axum::body::Body::from(frame));
        let mut response = http::Response::new(body);
        response.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        std::future::ready(Ok(response))
    }
}

#[tokio::test]
async fn bytes_that_are_not_a_fetch_response_are_an_error_without_panic() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GarbageServer)
            .serve_with_incoming(incoming),
    );
    let error = client(&url)
        .fetch(&ask(KNOWN, Duration::from_secs(5)))
        .await
        .expect_err("garbage");
    task.abort();
    assert_eq!(error.outcome(), SourceOutcome::Error, "{error:?}");
    assert!(
        !error.to_string().contains("CONFORMANCE-RAW-BODY"),
        "{error}"
    );
}

#[tokio::test]
async fn nobody_listening_is_an_error() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let error = client(&format!("http://{closed}"))
        .fetch(&ask(KNOWN, Duration::from_secs(5)))
        .await
        .expect_err("nobody there");
    assert_eq!(error.outcome(), SourceOutcome::Error, "{error:?}");
}

#[tokio::test]
async fn describe_reports_the_served_organisation() {
    let server = serve(hospice()).await;
    let described = client(&server.url)
        .describe(Duration::from_secs(5))
        .await
        .expect("answered")
        .expect("implemented");
    assert_eq!(described.protocol, "carerecord.source.v1");
    assert_eq!(described.organisation_code, "NHOSP1");
    assert!(!described.answers_depend_on_requester);
}

#[tokio::test]
async fn a_source_served_over_the_protocol_still_passes_the_conformance_kit() {
    let server = serve(hospice()).await;
    let slow = serve(hospice().with_delay(Duration::from_secs(30))).await;
    let source = client(&server.url);
    let slow_source = client(&slow.url);
    let report = Conformance::new(&source, nhs(KNOWN), nhs(UNKNOWN))
        .with_slow_upstream(&slow_source)
        .run()
        .await;
    report.assert_all_passed();
}
