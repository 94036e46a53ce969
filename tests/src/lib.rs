//! Shared harness for the end-to-end tests: a real broker on `127.0.0.1:0` driven over real
//! gRPC, with sources that are either in-memory or real HTTP mock organisations.

pub mod browser;
pub mod fhir;
pub mod pki;
pub mod postgres;
pub mod region;
pub mod view;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use carerecord_adapters::memory::InMemorySource;
use carerecord_adapters::{NhsNumber, Source, SourceError, SourceInfo, SourceReply, SourceRequest};
use std::path::PathBuf;

use carerecord_adapters::locator::Locator;
use carerecord_broker::Broker;
use carerecord_broker::access::{AccessConfig, Policy};
use carerecord_broker::audit::AuditLog;
use carerecord_broker::config::{BudgetConfig, CacheConfig};
use carerecord_broker::fanout::{ConfiguredSource, SourceSet};
use carerecord_broker::lookup::{BrokerParts, CacheLimits, DeadlineRules, LoadLimits};
use carerecord_broker::routing::Router;
use carerecord_broker::server::Transport;
use carerecord_proto::care_record_service_client::CareRecordServiceClient;
use carerecord_proto::{
    AllergyDetail, CareRecord, Coding, Entry, GetCareRecordRequest, MedicationDetail, Patient,
    Provenance, Requester, entry,
};
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// A broker running on loopback.
pub struct TestBroker {
    pub url: String,
    pub broker: Arc<Broker>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestBroker {
    /// A connected client.
    pub async fn client(&self) -> CareRecordServiceClient<Channel> {
        CareRecordServiceClient::connect(self.url.clone())
            .await
            .expect("connect to test broker")
    }

    /// A unary lookup that must succeed.
    pub async fn lookup(
        &self,
        request: tonic::Request<GetCareRecordRequest>,
    ) -> carerecord_proto::GetCareRecordResponse {
        self.client()
            .await
            .get_care_record(request)
            .await
            .expect("lookup")
            .into_inner()
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Budget, cache, access and audit settings tests commonly tweak.
#[derive(Clone)]
pub struct Settings {
    pub budget: BudgetConfig,
    pub cache: CacheConfig,
    pub broker_id: String,
    /// Tests not about access trust the (unverified) caller's asserted relationship, which
    /// [`clinician`] carries; access tests turn this off.
    pub access: AccessConfig,
    pub audit_file: PathBuf,
    pub limits: LoadLimits,
    /// Organisation codes asked for every patient; with `locators`, turns routing on.
    pub always_ask: Vec<String>,
    pub locators: Vec<Arc<dyn Locator>>,
    pub locator_timeout: Duration,
    /// How long a locator's answer is reused (`[routing] locator_cache_secs`).
    pub locator_cache: Duration,
}

impl Settings {
    /// The router these settings describe: every source, unless locators or always-ask are set.
    pub fn router(&self) -> Router {
        if self.locators.is_empty() && self.always_ask.is_empty() {
            Router::all()
        } else {
            Router::located(
                self.always_ask.clone(),
                self.locators.clone(),
                self.locator_timeout,
                self.locator_cache,
            )
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            budget: BudgetConfig {
                max_lookup_ms: 3_000,
                // Room for the audit writer's thread hop and a busy 2-core CI machine between
                // the broker's answer and a test's tight caller deadline.
                merge_headroom_ms: 30,
                default_source_timeout_ms: 2_000,
            },
            cache: CacheConfig::default(),
            broker_id: "test-broker".into(),
            access: AccessConfig {
                trust_unverified_assertions: true,
                ..AccessConfig::default()
            },
            audit_file: temp_path("audit.jsonl"),
            limits: LoadLimits::default(),
            always_ask: Vec::new(),
            locators: Vec::new(),
            locator_timeout: Duration::from_millis(300),
            locator_cache: Duration::from_secs(60),
        }
    }
}

/// A fresh path in a per-process temporary folder.
pub fn temp_path(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("carerecord-e2e-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir.join(format!("{}-{name}", N.fetch_add(1, Ordering::SeqCst)))
}

/// Starts a broker over `sources` (each with its timeout).
pub async fn start_broker(
    sources: Vec<(Arc<dyn Source>, Duration)>,
    settings: Settings,
) -> TestBroker {
    start_with(build_broker(sources, settings)).await
}

/// Serves an already-built broker on loopback.
pub async fn start_with(broker: Arc<Broker>) -> TestBroker {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    serve_on(listener, broker)
}

/// A broker built over `sources` with `settings`, not yet serving.
pub fn build_broker(sources: Vec<(Arc<dyn Source>, Duration)>, settings: Settings) -> Arc<Broker> {
    build_broker_from(
        sources
            .into_iter()
            .map(|(source, timeout)| ConfiguredSource::new(source, timeout))
            .collect(),
        settings,
    )
}

/// A broker over sources with their own breaker and bulkhead settings.
pub fn build_broker_from(sources: Vec<ConfiguredSource>, settings: Settings) -> Arc<Broker> {
    let set = SourceSet::new(sources, 1);
    let router = settings.router();
    let parts = BrokerParts {
        broker_id: settings.broker_id,
        deadlines: DeadlineRules {
            max_lookup: Duration::from_millis(settings.budget.max_lookup_ms),
            merge_headroom: Duration::from_millis(settings.budget.merge_headroom_ms),
        },
        cache: CacheLimits {
            max_bytes: settings.cache.max_bytes,
            ttl: settings.cache.ttl(),
            partial_ttl: settings.cache.partial_ttl(),
        },
        policy: Policy::new(&settings.access).expect("policy"),
        audit: AuditLog::open(&settings.audit_file, false).expect("audit trail"),
        limits: settings.limits,
        router,
    };
    Arc::new(Broker::new(parts, set))
}

/// Serves `broker` on an already-bound listener (so two brokers can know each other's address
/// before either starts).
pub fn serve_on(listener: tokio::net::TcpListener, broker: Arc<Broker>) -> TestBroker {
    serve_with(listener, broker, Transport::plaintext())
}

/// Serves `broker` on `listener` with the given transport (TLS, mutual TLS).
pub fn serve_with(
    listener: tokio::net::TcpListener,
    broker: Arc<Broker>,
    transport: Transport,
) -> TestBroker {
    let scheme = if transport.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = broker.clone();
    let task = tokio::spawn(async move {
        let _ = carerecord_broker::server::run(listener, serving, transport, async {
            let _ = stopped.await;
        })
        .await;
    });
    TestBroker {
        url: format!("{scheme}://{addr}"),
        broker,
        stop: Some(stop),
        task: Some(task),
    }
}

/// A requester for tests not about access: asserts a relationship (trusted by default
/// [`Settings`]).
pub fn clinician() -> Requester {
    Requester {
        asserted_relationship: "test care team".into(),
        ..clinician_of("A81001")
    }
}

/// A clinician (role R8000) of `organisation`, asserting nothing.
pub fn clinician_of(organisation: &str) -> Requester {
    Requester {
        user_id: "dr-test".into(),
        user_name: "Dr Test".into(),
        role_code: "R8000".into(),
        organisation_code: organisation.into(),
        ..Requester::default()
    }
}

/// A unary request for `nhs` with a deadline.
pub fn request(nhs: &str, timeout: Duration) -> tonic::Request<GetCareRecordRequest> {
    let mut r = tonic::Request::new(GetCareRecordRequest {
        nhs_number: nhs.to_owned(),
        requester: Some(clinician()),
        ..GetCareRecordRequest::default()
    });
    r.set_timeout(timeout);
    r
}

/// The NHS number every fixture source knows.
pub fn shared_patient() -> NhsNumber {
    nhs(999_000_001)
}

/// A patient known only to the GP.
pub fn gp_only_patient() -> NhsNumber {
    nhs(999_000_002)
}

/// A valid NHS number nobody knows.
pub fn unknown_patient() -> NhsNumber {
    nhs(999_000_009)
}

/// The first valid NHS number at or after `stem`.
pub fn nhs(stem: u32) -> NhsNumber {
    (stem..)
        .find_map(NhsNumber::from_stem)
        .expect("a valid NHS number exists")
}

pub fn coding(system: &str, code: &str, display: &str) -> Option<Coding> {
    Some(Coding {
        system: system.into(),
        code: code.into(),
        display: display.into(),
    })
}

pub const SNOMED: &str = "http://snomed.info/sct";
pub const DMD: &str = "https://dmd.nhs.uk";

fn entry_with(
    concept: Option<Coding>,
    summary: &str,
    effective: &str,
    id: &str,
    detail: Option<entry::Detail>,
) -> Entry {
    Entry {
        concept,
        summary: summary.into(),
        status: "active".into(),
        effective: effective.into(),
        provenance: vec![Provenance {
            source_entry_id: id.into(),
            last_updated: "2026-01-01T00:00:00Z".into(),
            ..Provenance::default()
        }],
        detail,
        ..Entry::default()
    }
}

fn penicillin(id: &str, effective: &str) -> Entry {
    entry_with(
        coding(SNOMED, "91936005", "Allergy to penicillin"),
        "Allergy to penicillin — Anaphylaxis (high)",
        effective,
        id,
        Some(entry::Detail::Allergy(AllergyDetail {
            criticality: "high".into(),
            reactions: vec!["Anaphylaxis".into()],
            allergy_type: "allergy".into(),
            ..AllergyDetail::default()
        })),
    )
}

fn metformin(id: &str) -> Entry {
    entry_with(
        coding(DMD, "39720311000001101", "Metformin 500mg tablets"),
        "Metformin 500mg tablets — one tablet twice a day",
        "2021-06-01",
        id,
        Some(entry::Detail::Medication(MedicationDetail {
            dosage: "One tablet twice a day".into(),
            kind: "statement".into(),
            ..MedicationDetail::default()
        })),
    )
}

fn patient(family: &str, birth_date: &str) -> Option<Patient> {
    Some(Patient {
        family_name: family.into(),
        given_names: vec!["Jane".into()],
        birth_date: birth_date.into(),
        gender: "female".into(),
        ..Patient::default()
    })
}

/// The GP practice: knows both test patients; penicillin allergy, metformin, diabetes.
pub fn gp_source() -> InMemorySource {
    InMemorySource::new("gp", "A81001", "Riverside Medical Practice")
        .with_patient(
            shared_patient(),
            CareRecord {
                patient: patient("Smith", "1957-03-02"),
                allergies: vec![penicillin("gp-allergy-1", "2001-05-01")],
                medications: vec![metformin("gp-med-1")],
                conditions: vec![entry_with(
                    coding(SNOMED, "44054006", "Diabetes mellitus type 2"),
                    "Type 2 diabetes",
                    "2019-03-14",
                    "gp-cond-1",
                    None,
                )],
                ..CareRecord::default()
            },
        )
        .with_patient(
            gp_only_patient(),
            CareRecord {
                patient: patient("Jones", "1980-01-01"),
                conditions: vec![entry_with(
                    coding(SNOMED, "195967001", "Asthma"),
                    "Asthma",
                    "1999",
                    "gp-cond-9",
                    None,
                )],
                ..CareRecord::default()
            },
        )
}

/// The acute trust: knows the shared patient with the same allergy and medicine (different ids),
/// a hospital-only condition, and a different date of birth (a demographics mismatch).
pub fn hospital_source() -> InMemorySource {
    InMemorySource::new("hospital", "RJ122", "Royal Infirmary").with_patient(
        shared_patient(),
        CareRecord {
            patient: patient("SMITH", "1957-03-20"),
            allergies: vec![penicillin("rj-allergy-77", "2015-02-02")],
            medications: vec![metformin("rj-med-5")],
            conditions: vec![entry_with(
                coding(SNOMED, "49436004", "Atrial fibrillation"),
                "Atrial fibrillation",
                "2024-11-02",
                "rj-cond-3",
                None,
            )],
            ..CareRecord::default()
        },
    )
}

/// A source that counts how many of its calls were dropped before finishing: proves the broker
/// cancels outstanding work at the deadline instead of leaving it running.
pub struct DropCounting {
    info: SourceInfo,
    delay: Duration,
    pub started: Arc<AtomicU64>,
    pub dropped_unfinished: Arc<AtomicU64>,
}

impl DropCounting {
    pub fn new(id: &str, delay: Duration) -> Self {
        DropCounting {
            info: SourceInfo {
                id: id.into(),
                organisation_code: id.to_uppercase(),
                organisation_name: format!("Slow {id}"),
            },
            delay,
            started: Arc::default(),
            dropped_unfinished: Arc::default(),
        }
    }
}

struct Unfinished(Arc<AtomicU64>, bool);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[async_trait]
impl Source for DropCounting {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    async fn fetch(&self, _request: &SourceRequest) -> Result<SourceReply, SourceError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let mut guard = Unfinished(self.dropped_unfinished.clone(), false);
        tokio::time::sleep(self.delay).await;
        guard.1 = true;
        Ok(SourceReply::NotFound)
    }
}

/// A source that panics: the broker must report it as ERROR and carry on.
pub struct Panicking(pub SourceInfo);

#[async_trait]
impl Source for Panicking {
    fn info(&self) -> &SourceInfo {
        &self.0
    }

    async fn fetch(&self, _request: &SourceRequest) -> Result<SourceReply, SourceError> {
        panic!("adapter bug")
    }
}

/// Another carerecord broker at `url` as a federated source named `id` (plaintext).
pub fn remote_broker(id: &str, url: &str) -> Arc<dyn Source> {
    Arc::new(
        carerecord_adapters::federation::BrokerSource::new(
            carerecord_adapters::SourceInfo {
                id: id.into(),
                organisation_code: id.to_uppercase(),
                organisation_name: format!("{id} exchange"),
            },
            &carerecord_adapters::federation::BrokerSourceConfig {
                url: url.into(),
                ca_cert: None,
                client_cert: None,
                client_key: None,
                tls_domain: None,
            },
        )
        .expect("valid remote"),
    )
}
