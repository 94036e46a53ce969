//! Every whole-request failure, over real gRPC, as a client reads it: the status code and the
//! standard rich error details (`google.rpc.ErrorInfo` reason, domain and request id;
//! `BadRequest` field violations; `RetryInfo`), extracted with tonic-types.

use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::Source;
use carerecord_adapters::memory::InMemorySource;
use carerecord_broker::access::AccessConfig;
use carerecord_broker::config::{BudgetConfig, SystemConfig};
use carerecord_broker::server::Transport;
use carerecord_e2e::pki::TestCa;
use carerecord_e2e::*;
use carerecord_proto::care_record_service_client::CareRecordServiceClient;
use carerecord_proto::{GetCareRecordRequest, Purpose, Requester};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic_types::StatusExt;

const LONG: Duration = Duration::from_secs(5);
const DOMAIN: &str = "carerecord.nhs.uk";

/// What a refusal must carry.
struct Expect {
    code: Code,
    reason: &'static str,
    /// The `BadRequest` field violation, when one field is at fault.
    field: Option<&'static str>,
}

fn expect(code: Code, reason: &'static str, field: Option<&'static str>) -> Expect {
    Expect {
        code,
        reason,
        field,
    }
}

/// Checks a status as a client reads it; `request_id` is the `x-request-id` the client sent.
fn assert_refusal(status: &tonic::Status, want: &Expect, request_id: &str) {
    let reason = want.reason;
    assert_eq!(status.code(), want.code, "{reason}: {}", status.message());
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("{reason}: no ErrorInfo"));
    assert_eq!(info.reason, reason);
    assert_eq!(info.domain, DOMAIN, "{reason}");
    assert_eq!(
        info.metadata.get("request_id").map(String::as_str),
        Some(request_id),
        "{reason}"
    );
    let fields: Vec<String> = status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default();
    let want_fields: Vec<String> = want.field.map(str::to_owned).into_iter().collect();
    assert_eq!(fields, want_fields, "{reason}");
    if want.code != Code::ResourceExhausted {
        assert!(status.get_details_retry_info().is_none(), "{reason}");
    }
}

/// A unary request with a known request id.
fn tagged(
    r: GetCareRecordRequest,
    id: &str,
    timeout: Duration,
) -> tonic::Request<GetCareRecordRequest> {
    let mut r = tonic::Request::new(r);
    r.set_timeout(timeout);
    r.metadata_mut()
        .insert("x-request-id", id.parse().expect("ascii id"));
    r
}

fn asking(requester: Requester) -> GetCareRecordRequest {
    GetCareRecordRequest {
        nhs_number: shared_patient().as_digits(),
        requester: Some(requester),
        ..GetCareRecordRequest::default()
    }
}

/// No trusted assertions; R8001 may view but not break glass.
fn strict() -> Settings {
    Settings {
        access: AccessConfig {
            roles: vec!["R8000".into(), "R8001".into()],
            emergency_roles: vec!["R8000".into()],
            trust_unverified_assertions: false,
            ..AccessConfig::default()
        },
        ..Settings::default()
    }
}

fn two_sources() -> Vec<(Arc<dyn Source>, Duration)> {
    vec![
        (Arc::new(gp_source()) as Arc<dyn Source>, LONG),
        (Arc::new(hospital_source()), LONG),
    ]
}

#[tokio::test]
async fn every_request_and_access_refusal_carries_its_reason_field_and_request_id() {
    let b = start_broker(two_sources(), strict()).await;
    let mut c = b.client().await;
    let gp = || clinician_of("A81001");
    let mut cases: Vec<(GetCareRecordRequest, Expect)> = Vec::new();

    let mut r = asking(gp());
    r.nhs_number = "943 476 5918".into();
    cases.push((
        r,
        expect(
            Code::InvalidArgument,
            "INVALID_NHS_NUMBER",
            Some("nhs_number"),
        ),
    ));
    let mut r = asking(gp());
    r.sections = vec![77];
    cases.push((
        r,
        expect(Code::InvalidArgument, "UNKNOWN_SECTION", Some("sections")),
    ));
    let mut r = asking(gp());
    r.requester = None;
    cases.push((
        r,
        expect(
            Code::Unauthenticated,
            "REQUESTER_MISSING",
            Some("requester"),
        ),
    ));
    let r = asking(Requester {
        role_code: String::new(),
        ..gp()
    });
    cases.push((
        r,
        expect(
            Code::Unauthenticated,
            "REQUESTER_FIELD_MISSING",
            Some("requester.role_code"),
        ),
    ));
    let r = asking(Requester {
        user_id: "x".repeat(300),
        ..gp()
    });
    cases.push((
        r,
        expect(
            Code::InvalidArgument,
            "REQUESTER_FIELD_MALFORMED",
            Some("requester.user_id"),
        ),
    ));
    let mut r = asking(gp());
    r.via_brokers = vec!["elsewhere".into(); 17];
    cases.push((
        r,
        expect(
            Code::InvalidArgument,
            "VIA_BROKERS_MALFORMED",
            Some("via_brokers"),
        ),
    ));
    let r = asking(Requester {
        purpose: Purpose::EmergencyAccess as i32,
        ..gp()
    });
    cases.push((
        r,
        expect(
            Code::InvalidArgument,
            "EMERGENCY_REASON_MISSING",
            Some("requester.emergency_reason"),
        ),
    ));
    let r = asking(Requester {
        purpose: 42,
        ..gp()
    });
    cases.push((
        r,
        expect(
            Code::InvalidArgument,
            "UNKNOWN_PURPOSE",
            Some("requester.purpose"),
        ),
    ));
    let mut r = asking(gp());
    r.cache = 9;
    cases.push((
        r,
        expect(
            Code::InvalidArgument,
            "UNKNOWN_CACHE_DIRECTIVE",
            Some("cache"),
        ),
    ));
    let r = asking(Requester {
        role_code: "R9999".into(),
        ..gp()
    });
    cases.push((
        r,
        expect(
            Code::PermissionDenied,
            "ROLE_NOT_PERMITTED",
            Some("requester.role_code"),
        ),
    ));
    let r = asking(Requester {
        role_code: "R8001".into(),
        purpose: Purpose::EmergencyAccess as i32,
        emergency_reason: "collapsed in clinic".into(),
        ..gp()
    });
    cases.push((
        r,
        expect(
            Code::PermissionDenied,
            "EMERGENCY_ROLE_NOT_PERMITTED",
            Some("requester.role_code"),
        ),
    ));
    let r = asking(clinician_of("Y99999"));
    cases.push((
        r,
        expect(Code::PermissionDenied, "NO_LEGITIMATE_RELATIONSHIP", None),
    ));
    let mut r = asking(gp());
    r.via_brokers = vec!["elsewhere".into(), "test-broker".into()];
    cases.push((r, expect(Code::FailedPrecondition, "FEDERATION_LOOP", None)));

    for (i, (request, want)) in cases.into_iter().enumerate() {
        let id = format!("case-{i}");
        let status = c
            .get_care_record(tagged(request, &id, LONG))
            .await
            .expect_err(want.reason);
        assert_refusal(&status, &want, &id);
    }

    // Streamed, a refusal decided on the record arrives as the stream's error, with the same
    // details.
    let outcome = c
        .stream_care_record(tagged(asking(clinician_of("Y99999")), "streamed", LONG))
        .await;
    let status = match outcome {
        Err(status) => status,
        Ok(stream) => {
            let mut stream = stream.into_inner();
            loop {
                match stream.message().await {
                    Err(status) => break status,
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("stream ended without the denial"),
                }
            }
        }
    };
    assert_refusal(
        &status,
        &expect(Code::PermissionDenied, "NO_LEGITIMATE_RELATIONSHIP", None),
        "streamed",
    );

    // Draining: everything new is refused.
    b.broker.start_draining();
    let status = c
        .get_care_record(tagged(asking(gp()), "draining", LONG))
        .await
        .expect_err("draining");
    assert_refusal(
        &status,
        &expect(Code::Unavailable, "SHUTTING_DOWN", None),
        "draining",
    );
}

#[tokio::test]
async fn a_deadline_inside_the_merge_headroom_is_deadline_too_short() {
    let settings = Settings {
        budget: BudgetConfig {
            max_lookup_ms: 3_000,
            merge_headroom_ms: 1_000,
            default_source_timeout_ms: 2_000,
        },
        ..Settings::default()
    };
    let b = start_broker(two_sources(), settings).await;
    // The client's own deadline (800 ms) is far off when the broker refuses at once.
    let status = b
        .client()
        .await
        .get_care_record(tagged(
            asking(clinician()),
            "short",
            Duration::from_millis(800),
        ))
        .await
        .expect_err("too short");
    assert_refusal(
        &status,
        &expect(Code::DeadlineExceeded, "DEADLINE_TOO_SHORT", None),
        "short",
    );
}

#[tokio::test]
async fn an_unwritable_audit_trail_is_audit_unavailable() {
    let settings = Settings {
        audit_file: "/dev/full".into(),
        ..strict()
    };
    let b = start_broker(two_sources(), settings).await;
    let status = b
        .client()
        .await
        .get_care_record(tagged(asking(clinician_of("RJ122")), "full-disk", LONG))
        .await
        .expect_err("fail closed");
    assert_refusal(
        &status,
        &expect(Code::Unavailable, "AUDIT_UNAVAILABLE", None),
        "full-disk",
    );
}

#[tokio::test]
async fn a_silent_own_organisation_is_relationship_unconfirmed() {
    let silent = InMemorySource::new("hospital", "RJ122", "Royal Infirmary")
        .with_delay(Duration::from_secs(30));
    let b = start_broker(
        vec![
            (Arc::new(gp_source()) as Arc<dyn Source>, LONG),
            (Arc::new(silent), Duration::from_millis(100)),
        ],
        strict(),
    )
    .await;
    let status = b
        .client()
        .await
        .get_care_record(tagged(asking(clinician_of("RJ122")), "silent", LONG))
        .await
        .expect_err("not disclosed");
    assert_refusal(
        &status,
        &expect(Code::Unavailable, "RELATIONSHIP_UNCONFIRMED", None),
        "silent",
    );
}

#[tokio::test]
async fn a_certificate_for_no_configured_system_is_unknown_calling_system() {
    let ca = TestCa::new("carerecord test CA");
    let server = ca.server();
    let transport = Transport {
        tls: Some(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(&server.cert_pem, &server.key_pem))
                .client_ca_root(Certificate::from_pem(ca.cert_pem())),
        ),
        systems: Some(vec![SystemConfig {
            id: "rj122-epr".into(),
            dns_name: "epr.rj122.test".into(),
            trusted_assertions: true,
            token_key: None,
        }]),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let b = serve_with(listener, build_broker(two_sources(), strict()), transport);
    let rogue = ca.client("rogue.test");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.cert_pem()))
        .domain_name("localhost")
        .identity(Identity::from_pem(&rogue.cert_pem, &rogue.key_pem));
    let channel = Channel::from_shared(b.url.clone())
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("handshake");
    let status = CareRecordServiceClient::new(channel)
        .get_care_record(tagged(asking(clinician_of("RJ122")), "rogue", LONG))
        .await
        .expect_err("unknown system");
    assert_refusal(
        &status,
        &expect(Code::PermissionDenied, "UNKNOWN_CALLING_SYSTEM", None),
        "rogue",
    );
}
