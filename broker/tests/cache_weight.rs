//! The cache's weight is honest: what one cached record holds on the heap — the merged record
//! and the sources' answers it keeps (a patient's objection re-merges from them) — measured by a
//! counting allocator around building it from realistic answers (the mock region's records read
//! by the FHIR adapter over loopback), against `cache::weight`. `cache.max_bytes` bounds memory
//! only if the weight never under-counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use carerecord_adapters::{NhsNumber, SectionSet, SourceReply, SourceRequest};
use carerecord_broker::config::Config;
use carerecord_broker::fanout::Answer;
use carerecord_broker::merge::{self, MergedRecord};
use carerecord_broker::registry;
use carerecord_broker::routing::Route;
use carerecord_mock_sources::{
    FhirMode, LatencyProfile, Region, RegionServer, RegionSpec, ServerOptions,
};
use carerecord_proto::{Requester, SourceOutcome, SourceStatus};

/// Live heap bytes, with a typical allocator's per-allocation overhead (16 bytes).
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
const OVERHEAD: isize = 16;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize + OVERHEAD, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize + OVERHEAD, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::SeqCst)
}

#[test]
fn a_cached_records_weight_covers_what_it_holds_on_the_heap() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut ratios = Vec::new();
    rt.block_on(async {
        let spec = RegionSpec {
            seed: 42,
            patients: 400,
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
        let text = mock.broker_config_toml_with("127.0.0.1:1", |_| FhirMode::Everything);
        let config = Config::parse(&text, Path::new("<test>")).expect("config");
        let set = registry::build(&config, 1).expect("sources");
        let route = Route::all(Arc::new(registry::build(&config, 1).expect("sources")));
        let asked = merge::asked(&route.set, &route.selected_by);
        for patient in region.patients_known_to_at_least(1).take(12) {
            let nhs = NhsNumber::parse(&patient.nhs_number.as_digits()).expect("valid");
            let request = SourceRequest {
                request_id: "weight".into(),
                nhs_number: nhs,
                sections: SectionSet::ALL,
                deadline: tokio::time::Instant::now() + Duration::from_secs(10),
                requester: Requester {
                    user_id: "t".into(),
                    role_code: "R8000".into(),
                    organisation_code: patient.gp.clone(),
                    ..Requester::default()
                },
                via_brokers: Vec::new(),
            };
            let mut fetched = Vec::new();
            for (index, s) in set.sources.iter().enumerate() {
                let record = match s.source.fetch(&request).await.expect("the mock answers") {
                    SourceReply::Found(r) => Some(r),
                    SourceReply::NotFound => None,
                };
                fetched.push((index, s.source.info().clone(), record));
            }
            // What a cache entry holds: built from copies, measured once the builders are gone.
            let before = live();
            let merged: MergedRecord = {
                let answers: Vec<Arc<Answer>> = fetched
                    .iter()
                    .map(|(index, info, record)| {
                        Arc::new(Answer {
                            index: *index,
                            status: SourceStatus {
                                source_id: info.id.clone(),
                                organisation_code: info.organisation_code.clone(),
                                organisation_name: info.organisation_name.clone(),
                                outcome: if record.is_some() {
                                    SourceOutcome::Ok
                                } else {
                                    SourceOutcome::NotFound
                                } as i32,
                                ..SourceStatus::default()
                            },
                            cut_short: false,
                            record: record.clone(),
                        })
                    })
                    .collect();
                merge::merge(merge::MergeInput::new(
                    nhs,
                    &asked,
                    &answers,
                    std::time::SystemTime::now(),
                    tokio::time::Instant::now(),
                ))
            };
            let held = live() - before;
            {
                use prost::Message;
                let rec = merged.record.encoded_len();
                let ans: usize = merged
                    .answers
                    .iter()
                    .filter_map(|a| a.record.as_ref())
                    .map(|r| r.record.encoded_len())
                    .sum();
                println!("record {rec} B, answers {ans} B encoded; held {held} B = {:.2} x (record+answers)", held as f64 / (rec + ans) as f64);
            }
            let weight = i64::from(carerecord_broker::cache::weight(&merged));
            ratios.push((weight as f64 / held as f64, held, weight));
            drop(merged);
        }
        mock.shutdown().await;
    });
    for (ratio, held, weight) in &ratios {
        println!("held {held} B, weight {weight} B, weight/held {ratio:.2}");
    }
    for (ratio, held, weight) in &ratios {
        assert!(
            *ratio >= 1.0,
            "the weight under-counts: {weight} B for {held} B held"
        );
        assert!(
            *ratio <= 1.5,
            "the weight over-counts by more than 1.5x: {weight} B for {held} B held"
        );
    }
}
