//! A source-protocol server (`[sources.grpc]`) behind a real broker built from configuration:
//! served and merged with the other sources, not known, slow, failing, about another patient,
//! and malformed — each with the outcome a clinician's screen shows.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::memory::{Behaviour, InMemorySource};
use carerecord_adapters::protocol_server::SourceServer;
use carerecord_adapters::{Source, SourceError};
use carerecord_broker::config::Config;
use carerecord_broker::registry;
use carerecord_e2e::*;
use carerecord_proto::{CareRecord, GetCareRecordResponse, Patient, SourceOutcome};
use tokio::sync::oneshot;

const LONG: Duration = Duration::from_secs(5);

/// `source` served over the protocol on loopback; stops when the sender is dropped.
async fn serve(source: InMemorySource) -> (String, oneshot::Sender<()>) {
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

/// The configuration an operator writes for the hospital's protocol server.
fn config(url: &str, timeout_ms: u64, extra: &str) -> Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
plaintext = true

[[sources]]
id = "hospital"
organisation_code = "RJ122"
organisation_name = "Royal Infirmary"
timeout_ms = {timeout_ms}
[sources.grpc]
url = "{url}"
{extra}
"#
    );
    Config::parse(&text, Path::new("e2e.toml")).expect("valid configuration")
}

/// A broker over the in-memory GP and the configured protocol hospital, built the way `serve`
/// builds it (registry, resilience layers).
async fn broker(config: &Config) -> TestBroker {
    let mut sources = registry::build(config, 1).expect("sources").sources;
    sources.push(registry::configured(
        config,
        Arc::new(gp_source()) as Arc<dyn Source>,
        LONG,
        None,
    ));
    start_with(build_broker_from(sources, Settings::default())).await
}

async fn lookup_through(source: InMemorySource, timeout_ms: u64) -> GetCareRecordResponse {
    let (url, _stop) = serve(source).await;
    let broker = broker(&config(&url, timeout_ms, "")).await;
    broker
        .lookup(request(&shared_patient().as_digits(), LONG))
        .await
}

fn hospital_status(r: &GetCareRecordResponse) -> &carerecord_proto::SourceStatus {
    r.sources
        .iter()
        .find(|s| s.source_id == "hospital")
        .expect("hospital status")
}

#[tokio::test]
async fn a_protocol_source_is_merged_with_the_others() {
    let r = lookup_through(hospital_source(), 2_000).await;
    assert_eq!(hospital_status(&r).outcome, SourceOutcome::Ok as i32);
    assert!(r.complete, "{:?}", r.sources);
    let record = r.record.expect("record");
    // The GP's and the hospital's penicillin allergy are one entry, from both.
    assert_eq!(record.allergies.len(), 1);
    let from: Vec<&str> = record.allergies[0]
        .provenance
        .iter()
        .map(|p| p.source_id.as_str())
        .collect();
    assert_eq!(from.len(), 2, "{from:?}");
    assert!(
        from.contains(&"gp") && from.contains(&"hospital"),
        "{from:?}"
    );
    assert_eq!(
        record.conditions.len(),
        2,
        "diabetes (GP) and AF (hospital)"
    );
}

#[tokio::test]
async fn a_patient_the_protocol_source_does_not_know_is_not_found() {
    let (url, _stop) = serve(hospital_source()).await;
    let broker = broker(&config(&url, 2_000, "")).await;
    let r = broker
        .lookup(request(&gp_only_patient().as_digits(), LONG))
        .await;
    assert_eq!(hospital_status(&r).outcome, SourceOutcome::NotFound as i32);
    assert!(r.complete, "not known is an answer: {:?}", r.sources);
}

#[tokio::test]
async fn a_slow_protocol_source_times_out_and_the_rest_arrives() {
    let r = lookup_through(hospital_source().with_delay(Duration::from_secs(30)), 300).await;
    assert_eq!(hospital_status(&r).outcome, SourceOutcome::Timeout as i32);
    assert!(!r.complete);
    assert_eq!(r.record.expect("the GP's record").allergies.len(), 1);
}

#[tokio::test]
async fn a_failing_protocol_source_is_an_error() {
    let r = lookup_through(
        hospital_source().with_behaviour(Behaviour::Fail(SourceError::Other(
            "export database locked".into(),
        ))),
        2_000,
    )
    .await;
    let status = hospital_status(&r);
    assert_eq!(status.outcome, SourceOutcome::Error as i32);
    assert!(
        status.message.contains("export database locked"),
        "{}",
        status.message
    );
}

#[tokio::test]
async fn a_protocol_source_answering_about_another_patient_is_refused_whole() {
    let someone_else = nhs(999_000_100);
    let mut record = hospital_source_record().await;
    record.patient = Some(Patient {
        nhs_number: someone_else.as_digits(),
        family_name: "Other".into(),
        ..Patient::default()
    });
    let liar = InMemorySource::new("hospital", "RJ122", "Royal Infirmary")
        .with_patient(shared_patient(), record);
    let r = lookup_through(liar, 2_000).await;
    assert_eq!(
        hospital_status(&r).outcome,
        SourceOutcome::WrongPatient as i32
    );
    let record = r.record.expect("the GP's record");
    assert!(
        record
            .conditions
            .iter()
            .all(|e| e.provenance.iter().all(|p| p.source_id != "hospital")),
        "nothing the hospital said was used"
    );
    assert_eq!(record.patient.map(|p| p.family_name), Some("Smith".into()));
}

#[tokio::test]
async fn a_protocol_source_sending_malformed_entries_is_an_error_and_the_broker_carries_on() {
    let mut record = hospital_source_record().await;
    record.conditions[0].effective = "2nd of November".into();
    let garbled = InMemorySource::new("hospital", "RJ122", "Royal Infirmary")
        .with_patient(shared_patient(), record);
    let r = lookup_through(garbled, 2_000).await;
    let status = hospital_status(&r);
    assert_eq!(status.outcome, SourceOutcome::Error as i32);
    assert!(
        status.message.contains("not ISO 8601"),
        "{}",
        status.message
    );
    assert_eq!(r.record.expect("the GP's record").conditions.len(), 1);
}

#[tokio::test]
async fn only_a_source_declared_requester_dependent_scopes_the_cache_by_requester() {
    let shared = registry::build(&config("http://127.0.0.1:1", 500, ""), 1).expect("sources");
    assert!(!shared.requester_scoped);
    let scoped = registry::build(
        &config(
            "http://127.0.0.1:1",
            500,
            "answers_depend_on_requester = true",
        ),
        1,
    )
    .expect("sources");
    assert!(scoped.requester_scoped);
}

/// The hospital fixture's record for the shared patient.
async fn hospital_source_record() -> CareRecord {
    let probe = hospital_source();
    let request = carerecord_adapters::testkit::request(
        shared_patient(),
        carerecord_adapters::SectionSet::ALL,
        tokio::time::Instant::now() + LONG,
    );
    probe
        .fetch(&request)
        .await
        .ok()
        .and_then(|reply| match reply {
            carerecord_adapters::SourceReply::Found(r) => Some(r.record),
            carerecord_adapters::SourceReply::NotFound => None,
        })
        .expect("the fixture knows the shared patient")
}

/// `source` served over the protocol with TLS, requiring client certificates from `ca`.
async fn serve_mutual_tls(
    source: InMemorySource,
    ca: &pki::TestCa,
) -> (String, oneshot::Sender<()>) {
    use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "https://localhost:{}",
        listener.local_addr().expect("addr").port()
    );
    let server_leaf = ca.server();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            &server_leaf.cert_pem,
            &server_leaf.key_pem,
        ))
        .client_ca_root(Certificate::from_pem(ca.cert_pem()));
    let incoming = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let server = Server::builder()
        .tls_config(tls)
        .expect("server TLS")
        .add_service(SourceServer::new(Arc::new(source)).into_service());
    tokio::spawn(server.serve_with_incoming_shutdown(incoming, async {
        let _ = stopped.await;
    }));
    (url, stop)
}

#[tokio::test]
async fn a_protocol_source_behind_mutual_tls_answers_only_a_broker_with_a_client_certificate() {
    let ca = pki::TestCa::new("hospice CA");
    let (url, _stop) = serve_mutual_tls(hospital_source(), &ca).await;
    let ca_file = temp_path("hospice-ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).expect("write");
    let broker_leaf = ca.client("broker.example");
    let cert_file = temp_path("broker.pem");
    let key_file = temp_path("broker.key");
    std::fs::write(&cert_file, &broker_leaf.cert_pem).expect("write");
    std::fs::write(&key_file, &broker_leaf.key_pem).expect("write");

    let with_identity = format!(
        "ca_cert = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
        ca_file.display(),
        cert_file.display(),
        key_file.display()
    );
    let broker_ok = broker(&config(&url, 2_000, &with_identity)).await;
    let r = broker_ok
        .lookup(request(&shared_patient().as_digits(), LONG))
        .await;
    assert_eq!(
        hospital_status(&r).outcome,
        SourceOutcome::Ok as i32,
        "{:?}",
        r.sources
    );

    let without_identity = format!("ca_cert = \"{}\"", ca_file.display());
    let broker_anonymous = broker(&config(&url, 2_000, &without_identity)).await;
    let r = broker_anonymous
        .lookup(request(&shared_patient().as_digits(), LONG))
        .await;
    assert_eq!(
        hospital_status(&r).outcome,
        SourceOutcome::Error as i32,
        "no client certificate, no answer: {:?}",
        r.sources
    );
}
