//! Harness for end-to-end tests over a synthetic region: mock-sources organisations serving FHIR
//! R4 over real HTTP on loopback, and a real broker built from the configuration mock-sources
//! writes (parsed by the broker's own config code, sources built by its own registry), exactly as
//! `carerecord-dev demo` and `carerecord serve` do. Also a small recording TCP proxy (optionally
//! terminating TLS) for what mock-sources cannot show: the bytes a source actually received.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carerecord_broker::config::Config;
use carerecord_broker::registry;
use carerecord_mock_sources::NhsNumber;
use carerecord_mock_sources::{
    FhirMode, LatencyProfile, PatientSummary, Region, RegionServer, RegionSpec,
    RunningOrganisation, ServerOptions,
};
use carerecord_proto::{
    CacheDirective, CareRecord, GetCareRecordRequest, GetCareRecordResponse, Requester, Section,
    SourceOutcome,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::pki::Leaf;
use crate::{TestBroker, clinician, start_with, temp_path};

/// A small region: enough organisations for every kind, few enough patients to generate in
/// microseconds. `page_size` is the servers' default search page (what `$everything` pages by).
pub fn small_region(seed: u64, page_size: usize) -> RegionSpec {
    RegionSpec {
        seed,
        patients: 200,
        organisations: 10,
        page_size,
    }
}

/// The first patient known to at least three organisations (GP first), whose demographics
/// agree everywhere.
pub fn shared_patient(server: &RegionServer) -> PatientSummary {
    server
        .region()
        .patients_known_to_at_least(3)
        .find(|p| p.conflict.is_none())
        .expect("the region has a patient known to three organisations")
}

/// Starts `spec`'s organisations on loopback with no added latency.
pub async fn start_region(spec: &RegionSpec) -> RegionServer {
    RegionServer::start_with(
        Arc::new(Region::generate(spec)),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        ServerOptions {
            latency: Some(LatencyProfile::ZERO),
            ..ServerOptions::default()
        },
    )
    .await
    .expect("start the mock region")
}

/// The broker configuration mock-sources writes for `server`, parsed by the broker, with every
/// source on `mode` and `source_timeout`, and test-friendly settings: a private audit file, the
/// test requester's asserted relationship trusted, and its role allowed to see sensitive
/// entries (so records compare whole).
pub fn region_config(server: &RegionServer, mode: FhirMode, source_timeout: Duration) -> Config {
    let text = server.broker_config_toml_with("127.0.0.1:0", |_| mode);
    let mut config =
        Config::parse(&text, Path::new("<mock-sources region>")).expect("the mock config parses");
    config.audit.file = temp_path("region-audit.jsonl");
    config.access.trust_unverified_assertions = true;
    config.access.sensitive_roles = vec![clinician().role_code];
    config.budget.max_lookup_ms = 5_000;
    config.budget.merge_headroom_ms = 10;
    let ms = u64::try_from(source_timeout.as_millis()).expect("a sane timeout");
    for source in &mut config.sources {
        source.timeout_ms = Some(ms);
    }
    config
}

/// Builds the broker from `config` the way `carerecord serve` does, and serves it on loopback.
pub async fn start_region_broker(config: &Config) -> TestBroker {
    let sources = registry::build(config, 1).expect("sources build from the mock config");
    let broker = carerecord_broker::assemble::broker_with_sources(config, sources)
        .expect("broker builds from the mock config");
    start_with(Arc::new(broker)).await
}

/// A request for `nhs` from [`clinician`] (who asserts a relationship) that insists on asking
/// the sources, never the cache.
pub fn fresh_request(nhs: &NhsNumber, timeout: Duration) -> tonic::Request<GetCareRecordRequest> {
    fresh_request_as(nhs, timeout, clinician())
}

/// A request for `nhs` from `requester` that insists on asking the sources, never the cache.
pub fn fresh_request_as(
    nhs: &NhsNumber,
    timeout: Duration,
    requester: Requester,
) -> tonic::Request<GetCareRecordRequest> {
    let mut r = tonic::Request::new(GetCareRecordRequest {
        nhs_number: nhs.as_digits(),
        requester: Some(requester),
        cache: CacheDirective::RequireFresh as i32,
        ..GetCareRecordRequest::default()
    });
    r.set_timeout(timeout);
    r
}

/// Per organisation code, the outcome the response reports.
pub fn outcomes(response: &GetCareRecordResponse) -> BTreeMap<String, SourceOutcome> {
    response
        .sources
        .iter()
        .map(|s| {
            (
                s.organisation_code.clone(),
                SourceOutcome::try_from(s.outcome).unwrap_or(SourceOutcome::Unspecified),
            )
        })
        .collect()
}

/// What mock-sources says the outcomes must be: OK where the patient is known, NOT_FOUND
/// elsewhere (`patient` `None`: nobody knows them).
pub fn expected_outcomes(
    server: &RegionServer,
    patient: Option<&PatientSummary>,
) -> BTreeMap<String, SourceOutcome> {
    server
        .organisations()
        .into_iter()
        .map(|o| {
            let known = patient.is_some_and(|p| p.organisations.contains(&o.code));
            let outcome = if known {
                SourceOutcome::Ok
            } else {
                SourceOutcome::NotFound
            };
            (o.code, outcome)
        })
        .collect()
}

/// Organisation codes an entry's provenance names.
pub fn provenance_orgs(provenance: &[carerecord_proto::Provenance]) -> BTreeSet<String> {
    provenance
        .iter()
        .map(|p| p.organisation_code.clone())
        .collect()
}

/// One merged entry reduced to what the merge decides: concept, day, and who reported it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EntryShape {
    pub system: String,
    pub code: String,
    pub effective: String,
    pub orgs: BTreeSet<String>,
}

/// A merged record reduced, section by section, to its [`EntryShape`]s in record order.
pub fn record_shape(record: &CareRecord) -> BTreeMap<String, Vec<EntryShape>> {
    Section::ALL
        .iter()
        .map(|&section| {
            let entries = record
                .section(section)
                .iter()
                .map(|e| {
                    let concept = e.concept.clone().unwrap_or_default();
                    EntryShape {
                        system: concept.system,
                        code: concept.code,
                        effective: e.effective.clone(),
                        orgs: provenance_orgs(&e.provenance),
                    }
                })
                .collect();
            (section.as_str_name().to_owned(), entries)
        })
        .collect()
}

/// Entries in every section.
pub fn entry_count(record: &CareRecord) -> usize {
    Section::ALL.iter().map(|&s| record.section(s).len()).sum()
}

/// HTTP requests each organisation has received so far.
pub fn requests_by_org(server: &RegionServer) -> BTreeMap<String, u64> {
    server
        .organisations()
        .into_iter()
        .map(|o| {
            let n = server.stats(&o.code).expect("known organisation").requests;
            (o.code, n)
        })
        .collect()
}

/// The organisation of `server` with this code.
pub fn organisation(server: &RegionServer, code: &str) -> RunningOrganisation {
    server
        .organisation(code)
        .cloned()
        .unwrap_or_else(|| panic!("no organisation {code}"))
}

/// A TLS acceptor presenting `leaf` (HTTP/1.1 only: no ALPN is offered).
pub fn tls_acceptor(leaf: &Leaf) -> TlsAcceptor {
    let certs = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("leaf certificate PEM");
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("leaf key PEM");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server certificate");
    TlsAcceptor::from(Arc::new(config))
}

/// One HTTP/1.1 request as a proxied organisation received it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// `GET /fhir/Patient?identifier=... HTTP/1.1`
    pub line: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What one client connection sent.
type Recorded = Arc<Mutex<Vec<u8>>>;

/// A TCP proxy in front of one organisation that keeps a copy of everything clients sent it,
/// per connection, and optionally terminates TLS (mock-sources speaks plain HTTP only).
pub struct RecordingProxy {
    pub addr: SocketAddr,
    /// Bytes sent by the client, one buffer per accepted connection.
    sent: Arc<Mutex<Vec<Recorded>>>,
    accept: JoinHandle<()>,
}

impl RecordingProxy {
    pub async fn start(upstream: SocketAddr, tls: Option<TlsAcceptor>) -> RecordingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let sent: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let connections = sent.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let buffer = Recorded::default();
                connections
                    .lock()
                    .expect("proxy buffers")
                    .push(buffer.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    match tls {
                        Some(acceptor) => {
                            if let Ok(client) = acceptor.accept(client).await {
                                relay(client, server, buffer).await;
                            }
                        }
                        None => relay(client, server, buffer).await,
                    }
                });
            }
        });
        RecordingProxy { addr, sent, accept }
    }

    /// Every request received so far, parsed from the recorded bytes.
    pub fn requests(&self) -> Vec<SeenRequest> {
        let buffers: Vec<Vec<u8>> = self
            .sent
            .lock()
            .expect("proxy buffers")
            .iter()
            .map(|b| b.lock().expect("proxy buffer").clone())
            .collect();
        buffers.iter().flat_map(|b| parse_requests(b)).collect()
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies both ways until either side closes, recording client → server bytes.
async fn relay<C>(client: C, server: TcpStream, record: Recorded)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            record
                .lock()
                .expect("proxy buffer")
                .extend_from_slice(&buf[..n]);
            if server_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let downstream = async {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}

/// HTTP/1.1 requests in `bytes` (heads, skipping `Content-Length` bodies).
fn parse_requests(bytes: &[u8]) -> Vec<SeenRequest> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]);
        let mut lines = head.split("\r\n");
        let line = lines.next().unwrap_or_default().to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let body = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        rest = rest.get(end + 4 + body..).unwrap_or_default();
        out.push(SeenRequest { line, headers });
    }
    out
}

/// Every organisation that reported any part of the record, demographics included.
pub fn contributing_orgs(response: &GetCareRecordResponse) -> BTreeSet<String> {
    let record = response.record.clone().unwrap_or_default();
    let mut orgs: BTreeSet<String> = record_shape(&record)
        .into_values()
        .flatten()
        .flat_map(|e| e.orgs)
        .collect();
    if let Some(p) = &record.patient {
        orgs.extend(provenance_orgs(&p.provenance));
    }
    orgs
}
