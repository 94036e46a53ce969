//! The out-of-hours adapter, built outside carerecord's workspace, through the conformance kit:
//! the contract, JSON garbage, and the rustls provider trap (nothing in this test binary
//! installs a provider, yet the adapter builds its HTTP client).

use std::sync::Arc;

use carerecord_adapters::grpc::{GrpcSource, GrpcSourceConfig};
use carerecord_adapters::protocol_server::SourceServer;
use carerecord_adapters::testkit::{
    Conformance, Format, StubResponse, StubServer, garbage_over_http_as,
};
use carerecord_adapters::{NhsNumber, Source, SourceInfo};
use out_of_hours_source::OutOfHoursSource;

const KNOWN: &str = "9990000018";
const UNKNOWN: &str = "9990000026";

fn info() -> SourceInfo {
    SourceInfo {
        id: "ooh".into(),
        organisation_code: "NLO01".into(),
        organisation_name: "Northside Out-of-Hours".into(),
    }
}

fn nhs(digits: &str) -> NhsNumber {
    NhsNumber::parse(digits).expect("valid")
}

/// The out-of-hours API's test double: one patient with two contacts.
async fn api() -> StubServer {
    StubServer::start(|path| {
        if path == format!("/patients/{KNOWN}/contacts") {
            StubResponse::json(
                serde_json::json!({
                    "patient": {"nhs_number": KNOWN, "family": "BAKER", "given": "Hannah",
                                "birth_date": "1978-12-18"},
                    "contacts": [
                        {"id": "OOH-77", "date": "2026-11-02T22:10:00Z", "reason_code": "21522001",
                         "reason": "Abdominal pain", "outcome": "Advised to see own GP",
                         "updated": "2026-11-02T23:01:00Z"},
                        {"id": "OOH-78", "date": "2026-11-20", "reason_code": "267036007",
                         "reason": "Breathlessness", "updated": "2026-11-20T08:00:00Z"}
                    ]
                })
                .to_string(),
            )
        } else {
            StubResponse::status(404)
        }
    })
    .await
    .expect("stub API")
}

#[tokio::test]
async fn the_out_of_hours_adapter_passes_the_conformance_kit() {
    let api = api().await;
    let source = OutOfHoursSource::new(info(), api.url()).expect("client builds, no provider");
    let report = Conformance::new(&source, nhs(KNOWN), nhs(UNKNOWN))
        .run()
        .await;
    println!("{report}");
    report.assert_all_passed();
}

#[tokio::test]
async fn the_out_of_hours_adapter_survives_json_garbage() {
    let report = garbage_over_http_as(Format::Json, nhs(KNOWN), |url| {
        Box::new(OutOfHoursSource::new(info(), url).expect("client")) as Box<dyn Source>
    })
    .await;
    println!("{report}");
    report.assert_all_passed();
}

#[tokio::test]
async fn served_over_the_source_protocol_it_still_conforms() {
    let api = api().await;
    let source = OutOfHoursSource::new(info(), api.url()).expect("client");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let server =
        tokio::spawn(SourceServer::new(Arc::new(source)).serve(listener, std::future::pending()));
    let remote = GrpcSource::new(info(), &GrpcSourceConfig::new(url)).expect("client");
    let report = Conformance::new(&remote, nhs(KNOWN), nhs(UNKNOWN))
        .run()
        .await;
    server.abort();
    report.assert_all_passed();
}
