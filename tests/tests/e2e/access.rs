//! Only staff involved in the person's care: TLS and mutual TLS, the access policy on every
//! request (hit or miss), sensitive data and objections, and the audit trail.

use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::Source;
use carerecord_broker::access::AccessConfig;
use carerecord_broker::audit::{self, Verified};
use carerecord_broker::config::SystemConfig;
use carerecord_broker::server::Transport;
use carerecord_e2e::pki::TestCa;
use carerecord_e2e::*;
use carerecord_proto::care_record_event::Event;
use carerecord_proto::care_record_service_client::CareRecordServiceClient;
use carerecord_proto::{CareRecord, Entry, GetCareRecordRequest, Purpose, Requester};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig};

const LONG: Duration = Duration::from_secs(5);

/// Strict policy: no trusted assertions; R8000 may see sensitive data, R8001 may not.
fn strict(audit_file: std::path::PathBuf) -> Settings {
    Settings {
        access: AccessConfig {
            roles: vec!["R8000".into(), "R8001".into()],
            sensitive_roles: vec!["R8000".into()],
            emergency_roles: vec!["R8000".into(), "R8001".into()],
            trust_unverified_assertions: false,
            ..AccessConfig::default()
        },
        audit_file,
        ..Settings::default()
    }
}

fn hiv() -> Entry {
    Entry {
        concept: coding(SNOMED, "86406008", "Human immunodeficiency virus infection"),
        summary: "HIV infection".into(),
        effective: "2010-01-01".into(),
        ..Entry::default()
    }
}

/// The GP and the hospital, with a sensitive entry at the GP for the shared patient.
fn region() -> Vec<(Arc<dyn Source>, Duration)> {
    let mut gp = gp_source();
    gp = gp.with_patient(
        shared_patient(),
        CareRecord {
            conditions: vec![hiv()],
            ..gp_record()
        },
    );
    vec![
        (Arc::new(gp) as Arc<dyn Source>, LONG),
        (Arc::new(hospital_source()), LONG),
    ]
}

/// The GP's record for the shared patient, as `gp_source` holds it.
fn gp_record() -> CareRecord {
    CareRecord {
        patient: Some(carerecord_proto::Patient {
            family_name: "Smith".into(),
            given_names: vec!["Jane".into()],
            birth_date: "1957-03-02".into(),
            gender: "female".into(),
            registered_gp_code: "A81001".into(),
            address: "1 High Street, Riverside, RV1 1AA".into(),
            ..Default::default()
        }),
        allergies: vec![],
        ..CareRecord::default()
    }
}

fn as_(requester: Requester, timeout: Duration) -> tonic::Request<GetCareRecordRequest> {
    let mut r = tonic::Request::new(GetCareRecordRequest {
        nhs_number: shared_patient().as_digits(),
        requester: Some(requester),
        ..GetCareRecordRequest::default()
    });
    r.set_timeout(timeout);
    r
}

fn with_role(org: &str, role: &str) -> Requester {
    Requester {
        role_code: role.into(),
        ..clinician_of(org)
    }
}

fn audit_events(path: &std::path::Path) -> Vec<audit::AuditEvent> {
    audit::events_for_patient(path, &shared_patient().as_digits()).expect("audit readable")
}

#[tokio::test]
async fn each_denial_path_is_permission_denied_and_audited() {
    let audit_file = temp_path("denials.jsonl");
    let b = start_broker(region(), strict(audit_file.clone())).await;
    let mut c = b.client().await;

    // A role that may not view records.
    let s = c
        .get_care_record(as_(with_role("RJ122", "R0001"), LONG))
        .await
        .expect_err("role");
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("R0001"), "{}", s.message());

    // An organisation with no relationship to the patient.
    let s = c
        .get_care_record(as_(clinician_of("Y99999"), LONG))
        .await
        .expect_err("no relationship");
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(
        s.message().contains("legitimate relationship"),
        "{}",
        s.message()
    );

    // An asserted relationship from an unverified caller is not trusted.
    let asserting = Requester {
        asserted_relationship: "referral".into(),
        ..clinician_of("Y99999")
    };
    let s = c
        .get_care_record(as_(asserting, LONG))
        .await
        .expect_err("untrusted assertion");
    assert_eq!(s.code(), Code::PermissionDenied);

    // The streaming call discloses nothing either: no source event before the denial.
    let denied = match c
        .stream_care_record(as_(clinician_of("Y99999"), LONG))
        .await
    {
        Err(status) => status,
        Ok(stream) => stream
            .into_inner()
            .message()
            .await
            .expect_err("denied before any event"),
    };
    assert_eq!(denied.code(), Code::PermissionDenied);

    let events = audit_events(&audit_file);
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["denied", "denied", "denied", "denied"]);
    assert!(events.iter().all(|e| e.returned.is_empty()));
    assert!(matches!(
        audit::verify(&audit_file).expect("read"),
        Verified::Intact { events: 4, .. }
    ));
}

#[tokio::test]
async fn organisations_holding_records_and_the_registered_gp_may_look() {
    let audit_file = temp_path("allowed.jsonl");
    let b = start_broker(region(), strict(audit_file.clone())).await;
    let mut c = b.client().await;
    // The hospital holds records for the patient.
    let r = c
        .get_care_record(as_(clinician_of("RJ122"), LONG))
        .await
        .expect("hospital")
        .into_inner();
    assert!(!r.emergency_access);
    // The GP both holds records and is the registered practice.
    c.get_care_record(as_(clinician_of("A81001"), LONG))
        .await
        .expect("gp");
    let events = audit_events(&audit_file);
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].kind, "access");
    assert!(
        events[0].decision.contains("holds records"),
        "{}",
        events[0].decision
    );
    assert!(events[0].sources.contains(&"gp:OK".to_owned()));
    assert!(
        events[0]
            .returned
            .iter()
            .any(|r| r.starts_with("allergies:"))
    );
    assert!(
        events[1].from_cache,
        "second look served from cache, still audited"
    );
}

#[tokio::test]
async fn break_glass_is_allowed_with_a_reason_flagged_and_audited_distinctly() {
    let audit_file = temp_path("breakglass.jsonl");
    let b = start_broker(region(), strict(audit_file.clone())).await;
    let emergency = Requester {
        purpose: Purpose::EmergencyAccess as i32,
        emergency_reason: "Unconscious in ED, no history available".into(),
        ..clinician_of("Y99999")
    };
    let r = b
        .client()
        .await
        .get_care_record(as_(emergency, LONG))
        .await
        .expect("break-glass allowed")
        .into_inner();
    assert!(r.emergency_access);
    assert_eq!(r.record.expect("record").allergies.len(), 1);
    let events = audit_events(&audit_file);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, "break_glass");
    assert_eq!(events[0].purpose, "emergency_access");
    assert_eq!(
        events[0].emergency_reason,
        "Unconscious in ED, no history available"
    );
}

#[tokio::test]
async fn sensitive_entries_are_withheld_by_role_and_never_leak_through_the_cache() {
    let b = start_broker(region(), strict(temp_path("sensitive.jsonl"))).await;
    let mut c = b.client().await;
    // R8000 may see sensitive data: this populates the cache with the full record.
    let full = c
        .get_care_record(as_(with_role("RJ122", "R8000"), LONG))
        .await
        .expect("r8000")
        .into_inner();
    assert!(!full.withheld);
    let has_hiv = |r: &carerecord_proto::GetCareRecordResponse| {
        r.record
            .as_ref()
            .is_some_and(|r| r.conditions.iter().any(|e| e.summary == "HIV infection"))
    };
    assert!(has_hiv(&full));
    // R8001 may not: the same cached record, filtered for them.
    let nurse = c
        .get_care_record(as_(with_role("RJ122", "R8001"), LONG))
        .await
        .expect("r8001")
        .into_inner();
    assert!(
        nurse.from_cache,
        "served from the cache the R8000 lookup filled"
    );
    assert!(nurse.withheld, "told that something was withheld");
    assert!(!has_hiv(&nurse), "and not what");
    assert!(!format!("{nurse:?}").contains("86406008"));
    // The role that may see it still sees all of it from the same cached record, and the
    // ordinary role is still refused it the second time (the record's judgement is kept).
    let again = c
        .get_care_record(as_(with_role("RJ122", "R8000"), LONG))
        .await
        .expect("r8000 again")
        .into_inner();
    assert!(again.from_cache && !again.withheld && has_hiv(&again));
    let nurse_again = c
        .get_care_record(as_(with_role("RJ122", "R8001"), LONG))
        .await
        .expect("r8001 again")
        .into_inner();
    assert!(nurse_again.withheld && !has_hiv(&nurse_again));
    // Streaming replay from cache is filtered too.
    let mut stream = c
        .stream_care_record(as_(with_role("RJ122", "R8001"), LONG))
        .await
        .expect("stream")
        .into_inner();
    while let Some(event) = stream.message().await.expect("event") {
        assert!(!format!("{event:?}").contains("86406008"), "{event:?}");
        if let Some(Event::Complete(r)) = event.event {
            assert!(r.withheld);
        }
    }
}

#[tokio::test]
async fn a_patients_objection_limits_others_to_their_own_data_except_in_an_emergency() {
    let objections = temp_path("objections.txt");
    std::fs::write(
        &objections,
        format!("# objected to sharing\n{}\n", shared_patient().grouped()),
    )
    .expect("write objections");
    let mut settings = strict(temp_path("objection.jsonl"));
    settings.access.objections_file = Some(objections);
    let b = start_broker(region(), settings).await;
    let mut c = b.client().await;

    let hospital = c
        .get_care_record(as_(clinician_of("RJ122"), LONG))
        .await
        .expect("hospital")
        .into_inner();
    let record = hospital.record.expect("record");
    assert!(hospital.withheld);
    let orgs: std::collections::BTreeSet<&str> =
        [&record.conditions, &record.allergies, &record.medications]
            .into_iter()
            .flatten()
            .flat_map(|e| e.provenance.iter().map(|p| p.organisation_code.as_str()))
            .collect();
    assert_eq!(
        orgs.into_iter().collect::<Vec<_>>(),
        ["RJ122"],
        "only the hospital's own data"
    );
    assert_eq!(
        record.allergies.len(),
        1,
        "its own allergy entry is still shown"
    );

    let emergency = Requester {
        purpose: Purpose::EmergencyAccess as i32,
        emergency_reason: "Anaphylaxis, needs full medication history".into(),
        ..clinician_of("RJ122")
    };
    let all = c
        .get_care_record(as_(emergency, LONG))
        .await
        .expect("emergency")
        .into_inner();
    let record = all.record.expect("record");
    assert!(
        record
            .conditions
            .iter()
            .any(|e| e.provenance.iter().any(|p| p.organisation_code == "A81001"))
    );
}

#[tokio::test]
async fn when_the_audit_cannot_be_written_nothing_is_disclosed() {
    // /dev/full accepts the open and fails every write (ENOSPC): a full disk, for real.
    let b = start_broker(region(), strict("/dev/full".into())).await;
    let s = b
        .client()
        .await
        .get_care_record(as_(clinician_of("RJ122"), LONG))
        .await
        .expect_err("fail closed");
    assert_eq!(s.code(), Code::Unavailable);
    assert!(s.message().contains("audit"), "{}", s.message());
}

async fn tls_broker(ca: &TestCa, systems: Vec<SystemConfig>) -> (TestBroker, std::path::PathBuf) {
    let server = ca.server();
    let transport = Transport {
        tls: Some(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(&server.cert_pem, &server.key_pem))
                .client_ca_root(Certificate::from_pem(ca.cert_pem())),
        ),
        systems: Some(systems),
    };
    let audit_file = temp_path("mtls.jsonl");
    let broker = build_broker(region(), strict(audit_file.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    (serve_with(listener, broker, transport), audit_file)
}

async fn tls_client(
    url: &str,
    trust: &TestCa,
    identity: Option<&pki_leaf::Leaf>,
) -> Result<CareRecordServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(trust.cert_pem()))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
    }
    let channel = Channel::from_shared(url.to_owned())
        .expect("url")
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(CareRecordServiceClient::new(channel))
}

mod pki_leaf {
    pub use carerecord_e2e::pki::Leaf;
}

fn epr_system() -> SystemConfig {
    SystemConfig {
        id: "rj122-epr".into(),
        dns_name: "epr.rj122.test".into(),
        trusted_assertions: true,
        token_key: None,
    }
}

#[tokio::test]
async fn mutual_tls_identifies_the_calling_system_and_refuses_unknown_ones() {
    let ca = TestCa::new("carerecord test CA");
    let (b, audit_file) = tls_broker(&ca, vec![epr_system()]).await;

    // A listed system: served, and named in the audit trail.
    let known = ca.client("epr.rj122.test");
    let mut c = tls_client(&b.url, &ca, Some(&known))
        .await
        .expect("handshake");
    c.get_care_record(as_(clinician_of("RJ122"), LONG))
        .await
        .expect("served");
    // It is trusted to assert a relationship for an organisation the sources don't show.
    let asserted = Requester {
        asserted_relationship: "referral".into(),
        ..clinician_of("Y99999")
    };
    c.get_care_record(as_(asserted, LONG))
        .await
        .expect("trusted assertion");

    // A certificate from the right CA for a system not on the list.
    let rogue = ca.client("rogue.test");
    let mut c = tls_client(&b.url, &ca, Some(&rogue))
        .await
        .expect("handshake");
    let s = c
        .get_care_record(as_(clinician_of("RJ122"), LONG))
        .await
        .expect_err("unknown system");
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("calling system"), "{}", s.message());

    let events = audit_events(&audit_file);
    let systems: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.system.as_str(), e.kind.as_str()))
        .collect();
    assert_eq!(
        systems,
        [
            ("rj122-epr", "access"),
            ("rj122-epr", "access"),
            ("unknown", "denied")
        ]
    );
}

#[tokio::test]
async fn without_a_client_certificate_or_with_another_cas_the_handshake_fails() {
    let ca = TestCa::new("carerecord test CA");
    let (b, _) = tls_broker(&ca, vec![epr_system()]).await;

    // tonic reports a refused handshake as UNAVAILABLE or UNKNOWN depending on when it is seen.
    let refused =
        |r: Result<tonic::Response<carerecord_proto::GetCareRecordResponse>, tonic::Status>| {
            let code = r.expect_err("refused").code();
            assert!(
                matches!(code, Code::Unavailable | Code::Unknown),
                "{code:?}"
            );
        };
    // No client certificate: the TLS handshake is refused (at connect, or at the first call).
    match tls_client(&b.url, &ca, None).await {
        Err(_) => {}
        Ok(mut c) => refused(c.get_care_record(as_(clinician_of("RJ122"), LONG)).await),
    }
    // A client certificate from a different CA.
    let other = TestCa::new("someone else's CA");
    let stranger = other.client("epr.rj122.test");
    match tls_client(&b.url, &ca, Some(&stranger)).await {
        Err(_) => {}
        Ok(mut c) => refused(c.get_care_record(as_(clinician_of("RJ122"), LONG)).await),
    }
    // And a plaintext client cannot talk to a TLS broker.
    let plain = CareRecordServiceClient::connect(b.url.replace("https://", "http://")).await;
    if let Ok(mut c) = plain {
        assert!(
            c.get_care_record(as_(clinician_of("RJ122"), LONG))
                .await
                .is_err()
        );
    }
}

#[tokio::test]
async fn when_the_requesters_own_source_does_not_answer_the_relationship_is_unconfirmed_not_denied()
{
    let silent =
        carerecord_adapters::memory::InMemorySource::new("hospital", "RJ122", "Royal Infirmary")
            .with_delay(Duration::from_secs(30));
    let b = start_broker(
        vec![
            (std::sync::Arc::new(gp_source()) as Arc<dyn Source>, LONG),
            (Arc::new(silent), Duration::from_millis(100)),
        ],
        strict(temp_path("unconfirmed.jsonl")),
    )
    .await;
    let s = b
        .client()
        .await
        .get_care_record(as_(clinician_of("RJ122"), LONG))
        .await
        .expect_err("not disclosed");
    assert_eq!(
        s.code(),
        Code::Unavailable,
        "worth retrying: {}",
        s.message()
    );
    assert!(s.message().contains("did not answer"), "{}", s.message());
}

#[tokio::test]
async fn a_stream_is_audited_when_it_starts_disclosing_even_if_the_client_leaves() {
    let audit_file = temp_path("stream-release.jsonl");
    let slow_hospital = hospital_source().with_delay(Duration::from_secs(2));
    let b = start_broker(
        vec![
            (Arc::new(gp_source()) as Arc<dyn Source>, LONG),
            (Arc::new(slow_hospital), LONG),
        ],
        strict(audit_file.clone()),
    )
    .await;
    let emergency = Requester {
        purpose: Purpose::EmergencyAccess as i32,
        emergency_reason: "collapsed in the street".into(),
        ..clinician_of("Y99999")
    };
    let mut stream = b
        .client()
        .await
        .stream_care_record(as_(emergency, LONG))
        .await
        .expect("stream")
        .into_inner();
    let first = stream.message().await.expect("event").expect("an event");
    assert!(matches!(first.event, Some(Event::Source(_))));
    drop(stream); // the client goes away before the final event
    let events = audit_events(&audit_file);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, "break_glass");
    assert!(
        events[0].decision.starts_with("stream released"),
        "{}",
        events[0].decision
    );
    assert_eq!(events[0].emergency_reason, "collapsed in the street");
}

#[tokio::test]
async fn a_restricted_patient_keeps_their_address_withheld_whichever_source_has_it() {
    let mut gp_view = gp_record();
    if let Some(p) = gp_view.patient.as_mut() {
        p.restricted = true;
        p.address.clear();
    }
    let gp = gp_source().with_patient(shared_patient(), gp_view);
    let mut hospital_view = gp_record();
    if let Some(p) = hospital_view.patient.as_mut() {
        p.address = "5 Hidden Lane, Safe Town, ST1 1AA".into();
    }
    let hospital =
        carerecord_adapters::memory::InMemorySource::new("hospital", "RJ122", "Royal Infirmary")
            .with_patient(shared_patient(), hospital_view);
    let b = start_broker(
        vec![
            (Arc::new(gp) as Arc<dyn Source>, LONG),
            (Arc::new(hospital), LONG),
        ],
        strict(temp_path("restricted.jsonl")),
    )
    .await;
    let mut c = b.client().await;
    let nurse = c
        .get_care_record(as_(with_role("RJ122", "R8001"), LONG))
        .await
        .expect("r8001")
        .into_inner();
    let patient = nurse.record.and_then(|r| r.patient).expect("patient");
    assert!(patient.restricted);
    assert_eq!(patient.address, "");
    assert!(nurse.withheld);
    let mut stream = c
        .stream_care_record(as_(with_role("RJ122", "R8001"), LONG))
        .await
        .expect("stream")
        .into_inner();
    while let Some(event) = stream.message().await.expect("event") {
        assert!(!format!("{event:?}").contains("Hidden Lane"), "{event:?}");
    }
}

#[tokio::test]
async fn under_an_objection_the_requester_sees_its_own_organisations_entries_as_it_reported_them() {
    let objections = temp_path("objections-own.txt");
    std::fs::write(&objections, format!("{}\n", shared_patient().as_digits())).expect("write");
    let mut settings = strict(temp_path("objection-own.jsonl"));
    settings.access.objections_file = Some(objections);
    let b = start_broker(region(), settings).await;
    let r = b
        .client()
        .await
        .get_care_record(as_(clinician_of("RJ122"), LONG))
        .await
        .expect("hospital")
        .into_inner();
    let record = r.record.clone().expect("record");
    // The penicillin allergy both recorded: the hospital's own entry (its date, its id), not
    // the GP's content under the hospital's name.
    assert_eq!(record.allergies.len(), 1);
    assert_eq!(record.allergies[0].effective, "2015-02-02");
    assert_eq!(
        record.allergies[0].provenance[0].source_entry_id,
        "rj-allergy-77"
    );
    // Nothing says which other organisations hold records.
    assert!(
        r.sources.iter().all(|s| s.organisation_code == "RJ122"),
        "{:?}",
        r.sources
    );
    assert!(
        !format!("{:?}", r.warnings).contains("Riverside"),
        "{:?}",
        r.warnings
    );
    assert!(r.withheld);
}

#[tokio::test]
async fn the_ops_cli_reaches_a_mutual_tls_broker_with_its_ca_certificate_and_key() {
    use carerecord_broker::cli::lookup::{LookupArgs, lookup_text};
    let ca = TestCa::new("carerecord test CA");
    let (b, audit_file) = tls_broker(&ca, vec![epr_system()]).await;
    let client = ca.client("epr.rj122.test");
    let file = |name: &str, pem: &str| {
        let path = temp_path(name);
        std::fs::write(&path, pem).expect("write pem");
        path
    };
    let args = LookupArgs {
        org: "RJ122".into(),
        ca: Some(file("cli-ca.pem", &ca.cert_pem())),
        cert: Some(file("cli-cert.pem", &client.cert_pem)),
        key: Some(file("cli-key.pem", &client.key_pem)),
        tls_domain: Some("localhost".into()),
        ..LookupArgs::for_patient(&shared_patient().as_digits(), &b.url)
    };
    let text = lookup_text(&args).await.expect("served over mutual TLS");
    assert!(text.contains("RJ122"), "{text}");
    // Streamed: one line per organisation as it answers, then the record.
    let streamed = lookup_text(&LookupArgs {
        stream: true,
        affinity_secret: Some("region secret".into()),
        ..args.clone()
    })
    .await
    .expect("streamed over mutual TLS");
    assert!(streamed.matches("arrived: ").count() >= 2, "{streamed}");
    let systems: Vec<String> = audit_events(&audit_file)
        .into_iter()
        .map(|e| e.system)
        .collect();
    assert_eq!(
        systems,
        ["rj122-epr", "rj122-epr"],
        "named by its certificate"
    );

    // Without the client certificate the broker refuses the handshake.
    let refused = lookup_text(&LookupArgs {
        cert: None,
        key: None,
        ..args.clone()
    })
    .await
    .expect_err("mutual TLS requires the certificate");
    assert!(
        refused.to_string().contains("broker"),
        "the error names what failed: {refused:#}"
    );
}
