//! Micro-benchmarks of the broker's hot paths (issue 7), on realistic records: every record here
//! was produced by the real FHIR adapter reading a synthetic region of mock organisations.
//!
//! - `merge`: ten organisations' answers for a patient several of them know (overlapping codes).
//! - `fhir`: the adapter's JSON → model mapping. The mapping is crate-private, so it is measured
//!   through `FhirSource::fetch` against a loopback server replaying pre-rendered bodies (HTTP
//!   included), next to the same two GETs with a bare reqwest client and a `serde_json::Value`
//!   parse of the same bodies; mapping ≈ fetch − GETs.
//! - `proto`: `encode_to_vec` of a typical and a large response.
//! - `cache_hit`: `Broker::lookup` on a warm cache: the door, admission, cache get, relationship
//!   check, access filtering (which clones the record) and the audit write to a temporary file;
//!   then with the gRPC face's translation and encoding of the response.
//!
//! Run: `cargo bench -p carerecord-broker --bench hot_paths` (CI only builds it).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::memory::InMemorySource;
use carerecord_adapters::{NhsNumber, SectionSet, SourceRecord, SourceReply, SourceRequest};
use carerecord_broker::CallingSystem;
use carerecord_broker::access::{Caller, UNVERIFIED};
use carerecord_broker::config::Config;
use carerecord_broker::fanout::{Answer, ConfiguredSource, SourceSet};
use carerecord_broker::merge::{self, MergedRecord};
use carerecord_broker::registry;
use carerecord_broker::routing::Route;
use carerecord_broker::validate::{self, LookupRequest};
use carerecord_mock_sources::{
    FhirMode, LatencyProfile, Region, RegionServer, RegionSpec, ServerOptions,
};
use carerecord_proto::{
    CacheDirective, GetCareRecordRequest, GetCareRecordResponse, Purpose, Requester, SourceOutcome,
    SourceStatus,
};
use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";

/// Everything the benchmarks share, read once from a running mock region.
struct Fixture {
    rt: tokio::runtime::Runtime,
    nhs: NhsNumber,
    gp: String,
    /// The broker config for the region (for building sources).
    config_text: String,
    /// Each organisation's answer for the patient, in configuration order.
    answers: Vec<Arc<Answer>>,
    /// The same answers' records, for in-memory sources.
    records: Vec<(String, String, String, Option<SourceRecord>)>,
    /// The patient search and `$everything` bodies the GP served.
    patient_body: prost::bytes::Bytes,
    everything_body: prost::bytes::Bytes,
    /// Ten other patients' merged records, for a large response.
    others: Vec<MergedRecord>,
}

fn fixture() -> Fixture {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let spec = RegionSpec {
            seed: 42,
            patients: 2000,
            organisations: 10,
            page_size: 100,
        };
        let region = Arc::new(Region::generate(&spec));
        let mock = RegionServer::start_with(
            region.clone(),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            ServerOptions {
                latency: Some(LatencyProfile::ZERO),
                ..ServerOptions::default()
            },
        )
        .await
        .expect("mock region");
        let config_text = mock.broker_config_toml_with("127.0.0.1:1", |_| FhirMode::Everything);
        let config = Config::parse(&config_text, Path::new("<bench>")).expect("config");
        let set = registry::build(&config, 1).expect("sources");
        let route = Route::all(Arc::new(registry::build(&config, 1).expect("sources")));
        // The patient known to the most organisations: the most overlap to merge.
        let patient = region
            .patients()
            .max_by_key(|p| p.organisations.len())
            .expect("a patient");
        let (answers, records) =
            fetch_answers(&set, product_nhs(&patient.nhs_number), &patient.gp).await;

        let gp = mock
            .organisation(&patient.gp)
            .expect("the GP is served")
            .clone();
        let id = region
            .patient_id_at(&patient.nhs_number, &gp.code)
            .expect("the GP knows the patient");
        let http = reqwest::Client::new();
        let get = |url: String| {
            let http = http.clone();
            async move {
                http.get(url)
                    .send()
                    .await
                    .expect("GET")
                    .bytes()
                    .await
                    .expect("body")
            }
        };
        let patient_body = get(format!(
            "{}/Patient?identifier={NHS_NUMBER_SYSTEM}%7C{}&_count=100",
            gp.base_url,
            patient.nhs_number.as_digits()
        ))
        .await;
        let everything_body = get(format!("{}/Patient/{id}/$everything", gp.base_url)).await;

        let mut others = Vec::new();
        for p in region.patients_known_to_at_least(3).take(10) {
            let (a, _) = fetch_answers(&set, product_nhs(&p.nhs_number), &p.gp).await;
            let asked = merge::asked(&route.set, &route.selected_by);
            others.push(merge::merge(merge::MergeInput::new(
                product_nhs(&p.nhs_number),
                &asked,
                &a,
                std::time::SystemTime::now(),
                tokio::time::Instant::now(),
            )));
        }
        mock.shutdown().await;
        Fixture {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            nhs: product_nhs(&patient.nhs_number),
            gp: patient.gp,
            config_text,
            answers,
            records,
            patient_body,
            everything_body,
            others,
        }
    })
}

type Records = Vec<(String, String, String, Option<SourceRecord>)>;

/// The product's NHS number for one of the mock region's (mock-sources has its own type).
fn product_nhs(n: &carerecord_mock_sources::NhsNumber) -> NhsNumber {
    NhsNumber::parse(&n.as_digits()).expect("the mock region's NHS numbers are valid")
}

async fn fetch_answers(set: &SourceSet, nhs: NhsNumber, gp: &str) -> (Vec<Arc<Answer>>, Records) {
    let request = source_request(nhs, gp);
    let mut answers = Vec::new();
    let mut records = Vec::new();
    for (index, s) in set.sources.iter().enumerate() {
        let info = s.source.info().clone();
        let reply = s.source.fetch(&request).await.expect("mock answers");
        let record = match reply {
            SourceReply::Found(r) => Some(r),
            SourceReply::NotFound => None,
        };
        let status = SourceStatus {
            source_id: info.id.clone(),
            organisation_code: info.organisation_code.clone(),
            organisation_name: info.organisation_name.clone(),
            outcome: if record.is_some() {
                SourceOutcome::Ok
            } else {
                SourceOutcome::NotFound
            } as i32,
            entries: record.as_ref().map_or(0, |r| r.record.entry_count() as u32),
            ..SourceStatus::default()
        };
        records.push((
            info.id,
            info.organisation_code,
            info.organisation_name,
            record.clone(),
        ));
        answers.push(Arc::new(Answer {
            index,
            status,
            cut_short: false,
            record,
        }));
    }
    (answers, records)
}

fn source_request(nhs: NhsNumber, org: &str) -> SourceRequest {
    SourceRequest {
        request_id: "bench".into(),
        nhs_number: nhs,
        sections: SectionSet::ALL,
        deadline: tokio::time::Instant::now() + Duration::from_secs(10),
        requester: Requester {
            user_id: "bench".into(),
            role_code: "R8000".into(),
            organisation_code: org.into(),
            ..Requester::default()
        },
        via_brokers: Vec::new(),
    }
}

fn response_of(merged: &MergedRecord) -> GetCareRecordResponse {
    GetCareRecordResponse {
        request_id: "0123456789abcdef-1".into(),
        record: Some(merged.record.clone()),
        sources: merged.sources.clone(),
        complete: merged.complete,
        warnings: merged.warnings.clone(),
        assembled_at: "2026-01-05T12:00:00Z".into(),
        ..GetCareRecordResponse::default()
    }
}

/// A loopback HTTP/1.1 server replaying two fixed bodies: the patient search and `$everything`.
async fn replay_server(
    patient: prost::bytes::Bytes,
    everything: prost::bytes::Bytes,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let (patient, everything) = (patient.clone(), everything.clone());
            tokio::spawn(async move {
                let mut buf = Vec::with_capacity(4096);
                let mut chunk = [0u8; 4096];
                loop {
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    buf.drain(..head_end);
                    let body = if head.contains("$everything") {
                        &everything
                    } else {
                        &patient
                    };
                    let header = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    if stream.write_all(header.as_bytes()).await.is_err()
                        || stream.write_all(body).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn benches(c: &mut Criterion) {
    let f = fixture();
    let config = Config::parse(&f.config_text, Path::new("<bench>")).expect("config");
    let route = Route::all(Arc::new(registry::build(&config, 1).expect("sources")));
    let started = tokio::time::Instant::now();
    let asked = merge::asked(&route.set, &route.selected_by);
    let now = std::time::SystemTime::now();
    let merge_input = || merge::MergeInput::new(f.nhs, &asked, &f.answers, now, started);
    let merged = merge::merge(merge_input());
    let found = f.answers.iter().filter(|a| a.record.is_some()).count();
    let input_entries: usize = f
        .answers
        .iter()
        .filter_map(|a| a.record.as_ref())
        .map(|r| r.record.entry_count())
        .sum();
    let response = response_of(&merged);
    let mut large = response.clone();
    if let Some(record) = large.record.as_mut() {
        for other in &f.others {
            for section in carerecord_proto::Section::ALL {
                if let (Some(slot), theirs) =
                    (record.section_mut(section), other.record.section(section))
                {
                    slot.extend_from_slice(theirs);
                }
            }
        }
    }
    eprintln!(
        "fixture: {found} of 10 organisations know the patient; {input_entries} entries in, {} merged; \
         response {} bytes, large response {} bytes; $everything body {} bytes",
        merged.record.entry_count(),
        response.encoded_len(),
        large.encoded_len(),
        f.everything_body.len()
    );

    // ---- merge
    c.bench_function(
        &format!("merge/10 orgs, {found} answering, {input_entries} entries"),
        |b| b.iter(|| black_box(merge::merge(black_box(merge_input())))),
    );

    // ---- proto encoding
    c.bench_function(
        &format!(
            "proto/encode_to_vec typical response ({} B)",
            response.encoded_len()
        ),
        |b| b.iter(|| black_box(black_box(&response).encode_to_vec())),
    );
    c.bench_function(
        &format!(
            "proto/encode_to_vec large response ({} B)",
            large.encoded_len()
        ),
        |b| b.iter(|| black_box(black_box(&large).encode_to_vec())),
    );

    // ---- FHIR JSON → model, through the adapter against a replaying server
    let addr = f.rt.block_on(replay_server(
        f.patient_body.clone(),
        f.everything_body.clone(),
    ));
    let fhir_config = f
        .config_text
        .split("\n[[sources]]")
        .next()
        .unwrap_or_default()
        .to_owned()
        + &format!(
            "\n[[sources]]\nid = \"replay\"\norganisation_code = \"{}\"\norganisation_name = \"Replay\"\n[sources.fhir]\nbase_url = \"http://{addr}/fhir\"\nmode = \"everything\"\n",
            f.gp
        );
    let replay = registry::build(
        &Config::parse(&fhir_config, Path::new("<bench>")).expect("replay config"),
        1,
    )
    .expect("replay source");
    let source = replay.sources[0].source.clone();
    c.bench_function(
        &format!(
            "fhir/adapter fetch ($everything, {} B: 2 GETs + parse + map)",
            f.everything_body.len()
        ),
        |b| {
            b.iter(|| {
                let request = source_request(f.nhs, &f.gp);
                black_box(f.rt.block_on(source.fetch(&request)).expect("fetch"))
            })
        },
    );
    let http = reqwest::Client::new();
    let patient_url = format!("http://{addr}/fhir/Patient?identifier=x");
    let everything_url = format!("http://{addr}/fhir/Patient/1/$everything");
    c.bench_function("fhir/the same 2 GETs, bare reqwest (no parse)", |b| {
        b.iter(|| {
            f.rt.block_on(async {
                let a = http.get(&patient_url).send().await.expect("GET");
                black_box(a.bytes().await.expect("body"));
                let e = http.get(&everything_url).send().await.expect("GET");
                black_box(e.bytes().await.expect("body"));
            })
        })
    });
    c.bench_function("fhir/serde_json::Value parse of both bodies", |b| {
        b.iter(|| {
            let p: serde_json::Value =
                serde_json::from_slice(black_box(&f.patient_body)).expect("json");
            let e: serde_json::Value =
                serde_json::from_slice(black_box(&f.everything_body)).expect("json");
            black_box((p, e))
        })
    });

    // ---- the cache-hit path with access filtering and audit
    let audit_path = std::env::temp_dir().join(format!(
        "carerecord-bench-audit-{}.jsonl",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&audit_path);
    let mut broker_config = config.clone();
    broker_config.audit.file = audit_path.clone();
    let sources: Vec<ConfiguredSource> = f
        .records
        .iter()
        .map(|(id, code, name, record)| {
            let mut s = InMemorySource::new(id, code, name);
            if let Some(r) = record {
                s = s.with_patient(f.nhs, r.record.clone());
            }
            ConfiguredSource::new(Arc::new(s), Duration::from_secs(2))
        })
        .collect();
    let broker = Arc::new(
        carerecord_broker::assemble::broker_with_sources(
            &broker_config,
            SourceSet::new(sources, 1),
        )
        .expect("broker"),
    );
    let request: LookupRequest = validate::check(
        GetCareRecordRequest {
            nhs_number: f.nhs.as_digits(),
            requester: Some(Requester {
                user_id: "bench".into(),
                role_code: "R8000".into(),
                organisation_code: f.gp.clone(),
                purpose: Purpose::DirectCare as i32,
                ..Requester::default()
            }),
            sections: Vec::new(),
            cache: CacheDirective::AllowCached as i32,
            via_brokers: Vec::new(),
        },
        "bench-1".into(),
        Some(Duration::from_secs(2)),
    )
    .expect("valid request");
    let caller = CallingSystem::Identified(Caller {
        system: UNVERIFIED.into(),
        trusted_assertions: false,
    });
    // Warm the cache with one real fan-out.
    f.rt.block_on(async {
        let answer = broker
            .lookup(request.clone(), caller.clone())
            .await
            .expect("lookup");
        assert!(!answer.from_cache());
        // The flight caches after publishing; give it a moment.
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    c.bench_function(
        "cache_hit/lookup (door, cache get, access filter, audit file)",
        |b| {
            b.iter(|| {
                f.rt.block_on(async {
                    let answer = broker
                        .lookup(black_box(request.clone()), caller.clone())
                        .await
                        .expect("lookup");
                    assert!(answer.from_cache(), "expected a cache hit");
                    black_box(answer)
                })
            })
        },
    );
    c.bench_function("cache_hit/lookup + gRPC response encode_to_vec", |b| {
        b.iter(|| {
            f.rt.block_on(async {
                let answer = broker
                    .lookup(black_box(request.clone()), caller.clone())
                    .await
                    .expect("lookup");
                black_box(carerecord_broker::service::response(answer).encode_to_vec())
            })
        })
    });
    c.bench_function(
        "cache_hit/record clone alone (what the access view copies)",
        |b| b.iter(|| black_box(black_box(&merged.record).clone())),
    );
    let _ = std::fs::remove_file(&audit_path);
}

criterion_group! {
    name = hot_paths;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(hot_paths);
