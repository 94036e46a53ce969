//! The foundation over real gRPC: fan-out, deadlines, merge, cache, validation, streaming,
//! health.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use carerecord_adapters::memory::{Behaviour, InMemorySource};
use carerecord_adapters::{Source, SourceError, SourceInfo};
use carerecord_e2e::*;
use carerecord_proto::care_record_event::Event;
use carerecord_proto::{CacheDirective, Section, SourceOutcome, WarningKind};
use tonic::Code;

const LONG: Duration = Duration::from_secs(5);

fn outcome_of(r: &carerecord_proto::GetCareRecordResponse, id: &str) -> SourceOutcome {
    let status = r
        .sources
        .iter()
        .find(|s| s.source_id == id)
        .unwrap_or_else(|| panic!("no status for {id}"));
    SourceOutcome::try_from(status.outcome).expect("known outcome")
}

#[tokio::test]
async fn duplicates_across_organisations_merge_into_one_entry_with_both_provenances() {
    let b = start_broker(
        vec![
            (Arc::new(gp_source()) as Arc<dyn Source>, LONG),
            (Arc::new(hospital_source()), LONG),
        ],
        Settings::default(),
    )
    .await;
    let r = b.lookup(request(&shared_patient().grouped(), LONG)).await;
    let record = r.record.clone().expect("record");
    assert!(r.complete);
    assert_eq!(
        record.allergies.len(),
        1,
        "the same penicillin allergy from two organisations"
    );
    let orgs: Vec<&str> = record.allergies[0]
        .provenance
        .iter()
        .map(|p| p.organisation_code.as_str())
        .collect();
    assert_eq!(orgs, ["A81001", "RJ122"], "priority order, both kept");
    let ids: Vec<&str> = record.allergies[0]
        .provenance
        .iter()
        .map(|p| p.source_entry_id.as_str())
        .collect();
    assert_eq!(ids, ["gp-allergy-1", "rj-allergy-77"]);
    assert_eq!(record.medications.len(), 1);
    // Two different conditions: most recent first.
    let conditions: Vec<&str> = record
        .conditions
        .iter()
        .map(|c| c.concept.as_ref().map(|c| c.code.as_str()).unwrap_or(""))
        .collect();
    assert_eq!(conditions, ["49436004", "44054006"]);
    assert_eq!(outcome_of(&r, "gp"), SourceOutcome::Ok);
    assert_eq!(r.sources[0].entries, 3);
    assert_eq!(r.sources[1].entries, 3);
    assert_eq!(
        record.patient.expect("patient").nhs_number,
        shared_patient().as_digits()
    );
    assert!(!r.request_id.is_empty());
}

#[tokio::test]
async fn conflicting_dates_of_birth_are_a_visible_warning_not_overwritten() {
    let b = start_broker(
        vec![
            (Arc::new(gp_source()) as Arc<dyn Source>, LONG),
            (Arc::new(hospital_source()), LONG),
        ],
        Settings::default(),
    )
    .await;
    let r = b.lookup(request(&shared_patient().as_digits(), LONG)).await;
    let mismatch: Vec<_> = r
        .warnings
        .iter()
        .filter(|w| w.kind == WarningKind::DemographicsMismatch as i32)
        .collect();
    assert_eq!(mismatch.len(), 1, "{:?}", r.warnings);
    assert!(mismatch[0].message.contains("1957-03-02"));
    assert!(mismatch[0].message.contains("1957-03-20"));
    assert_eq!(mismatch[0].source_ids, ["gp", "hospital"]);
    // Family names differ only in case: not a mismatch.
    assert!(!r.warnings.iter().any(|w| w.message.contains("Family name")));
    let patient = r.record.and_then(|r| r.patient).expect("patient");
    assert_eq!(
        patient.birth_date, "1957-03-02",
        "highest-priority source shown"
    );
}

#[tokio::test]
async fn a_slow_source_times_out_and_the_answer_arrives_by_its_timeout() {
    let slow = InMemorySource::new("slow", "RX1", "Slow Trust")
        .with_patient(shared_patient(), Default::default())
        .with_delay(Duration::from_secs(10));
    let b = start_broker(
        vec![
            (Arc::new(gp_source()) as Arc<dyn Source>, LONG),
            (Arc::new(slow), Duration::from_millis(300)),
        ],
        Settings::default(),
    )
    .await;
    let started = Instant::now();
    let r = b.lookup(request(&shared_patient().as_digits(), LONG)).await;
    let took = started.elapsed();
    assert_eq!(outcome_of(&r, "slow"), SourceOutcome::Timeout);
    assert_eq!(outcome_of(&r, "gp"), SourceOutcome::Ok);
    assert!(!r.complete);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.kind == WarningKind::Incomplete as i32)
    );
    assert_eq!(
        r.record.expect("record").allergies.len(),
        1,
        "the GP's data is kept"
    );
    // Bounded by the slow source's 300 ms timeout, far below its 10 s delay.
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn a_caller_deadline_shorter_than_source_timeouts_is_honoured() {
    let slow = InMemorySource::new("slow", "RX1", "Slow Trust")
        .with_patient(shared_patient(), Default::default())
        .with_delay(Duration::from_secs(10));
    let b = start_broker(
        vec![
            (Arc::new(gp_source()) as Arc<dyn Source>, LONG),
            (Arc::new(slow), LONG),
        ],
        Settings::default(),
    )
    .await;
    // If the broker waited for the 5 s source timeout, the client would fail with
    // DEADLINE_EXCEEDED; instead it answers inside the caller's 400 ms with what arrived.
    let r = b
        .client()
        .await
        .get_care_record(request(
            &shared_patient().as_digits(),
            Duration::from_millis(400),
        ))
        .await
        .expect("answered within the caller's deadline")
        .into_inner();
    assert_eq!(outcome_of(&r, "slow"), SourceOutcome::Timeout);
    assert_eq!(outcome_of(&r, "gp"), SourceOutcome::Ok);
    let slow_status = r
        .sources
        .iter()
        .find(|s| s.source_id == "slow")
        .expect("slow");
    assert!(
        slow_status.latency_ms < 400,
        "waited {} ms",
        slow_status.latency_ms
    );
}

#[tokio::test]
async fn outstanding_source_calls_are_cancelled_at_the_deadline() {
    let hung = Arc::new(DropCounting::new("hung", Duration::from_secs(30)));
    let b = start_broker(
        vec![(hung.clone() as Arc<dyn Source>, Duration::from_millis(150))],
        Settings::default(),
    )
    .await;
    let r = b.lookup(request(&shared_patient().as_digits(), LONG)).await;
    assert_eq!(outcome_of(&r, "hung"), SourceOutcome::Timeout);
    assert_eq!(hung.started.load(Ordering::SeqCst), 1);
    // The call was dropped, not left running in the background.
    assert_eq!(hung.dropped_unfinished.load(Ordering::SeqCst), 1);
    assert_eq!(b.broker.flights_in_progress(), 0);
}

#[tokio::test]
async fn a_failing_source_is_an_error_outcome_while_the_rest_is_served() {
    let failing = InMemorySource::new("broken", "RX2", "Broken Trust")
        .with_behaviour(Behaviour::Fail(SourceError::Status(503)));
    let panicking = Panicking(SourceInfo {
        id: "buggy".into(),
        organisation_code: "RX3".into(),
        organisation_name: "Buggy Adapter".into(),
    });
    let b = start_broker(
        vec![
            (Arc::new(gp_source()) as Arc<dyn Source>, LONG),
            (Arc::new(failing), LONG),
            (Arc::new(panicking), LONG),
        ],
        Settings::default(),
    )
    .await;
    let r = b.lookup(request(&shared_patient().as_digits(), LONG)).await;
    assert_eq!(outcome_of(&r, "broken"), SourceOutcome::Error);
    assert_eq!(outcome_of(&r, "buggy"), SourceOutcome::Error);
    let broken = r
        .sources
        .iter()
        .find(|s| s.source_id == "broken")
        .expect("status");
    assert_eq!(broken.message, "source answered with status 503");
    assert!(!r.complete);
    assert_eq!(r.record.expect("record").conditions.len(), 1);
    // The broker survived the panic and still answers.
    let again = b
        .client()
        .await
        .get_care_record(request(&gp_only_patient().as_digits(), LONG))
        .await;
    assert!(again.is_ok());
}

#[tokio::test]
async fn a_patient_unknown_to_a_source_is_not_found_and_the_record_is_complete() {
    let b = start_broker(
        vec![
            (Arc::new(gp_source()) as Arc<dyn Source>, LONG),
            (Arc::new(hospital_source()), LONG),
        ],
        Settings::default(),
    )
    .await;
    let r = b
        .lookup(request(&gp_only_patient().as_digits(), LONG))
        .await;
    assert_eq!(outcome_of(&r, "hospital"), SourceOutcome::NotFound);
    assert!(r.complete);
    let nobody = b
        .lookup(request(&unknown_patient().as_digits(), LONG))
        .await;
    assert!(nobody.record.expect("record").patient.is_none());
    assert!(nobody.complete);
}

#[tokio::test]
async fn fifty_concurrent_identical_lookups_make_one_call_per_source() {
    let gp = Arc::new(gp_source().with_delay(Duration::from_millis(200)));
    let hospital = Arc::new(hospital_source().with_delay(Duration::from_millis(100)));
    let b = start_broker(
        vec![
            (gp.clone() as Arc<dyn Source>, LONG),
            (hospital.clone() as Arc<dyn Source>, LONG),
        ],
        // The door counts every lookup, joiners too: room for all fifty (the default sheds
        // beyond 48, see `lookup::admission`).
        Settings {
            limits: carerecord_broker::lookup::LoadLimits {
                max_in_flight: 64,
                ..Default::default()
            },
            ..Settings::default()
        },
    )
    .await;
    let client = b.client().await;
    let lookups = (0..50).map(|_| {
        let mut c = client.clone();
        async move {
            c.get_care_record(request(&shared_patient().as_digits(), LONG))
                .await
                .map(|r| r.into_inner())
        }
    });
    let results = futures::future::join_all(lookups).await;
    for r in &results {
        let r = r.as_ref().expect("every lookup answered");
        assert_eq!(r.record.as_ref().map(|r| r.allergies.len()), Some(1));
    }
    assert_eq!(gp.calls(), 1);
    assert_eq!(hospital.calls(), 1);
}

#[tokio::test]
async fn a_second_lookup_is_served_from_cache_unless_fresh_is_required() {
    let gp = Arc::new(gp_source());
    let b = start_broker(
        vec![(gp.clone() as Arc<dyn Source>, LONG)],
        Settings::default(),
    )
    .await;
    let mut c = b.client().await;
    let first = c
        .get_care_record(request(&shared_patient().as_digits(), LONG))
        .await
        .expect("lookup")
        .into_inner();
    assert!(!first.from_cache);
    let second = c
        .get_care_record(request(&shared_patient().as_digits(), LONG))
        .await
        .expect("lookup")
        .into_inner();
    assert!(second.from_cache);
    assert_eq!(gp.calls(), 1);
    assert_eq!(second.record, first.record);
    assert_ne!(second.request_id, first.request_id);

    let mut fresh = request(&shared_patient().as_digits(), LONG);
    fresh.get_mut().cache = CacheDirective::RequireFresh as i32;
    let third = c.get_care_record(fresh).await.expect("lookup").into_inner();
    assert!(!third.from_cache);
    assert_eq!(gp.calls(), 2);

    // Another section selection is another record.
    let mut allergies = request(&shared_patient().as_digits(), LONG);
    allergies.get_mut().sections = vec![Section::Allergies as i32];
    let only = c
        .get_care_record(allergies)
        .await
        .expect("lookup")
        .into_inner();
    assert!(!only.from_cache);
    let only = only.record.expect("record");
    assert_eq!(only.allergies.len(), 1);
    assert!(only.conditions.is_empty() && only.medications.is_empty());
}

#[tokio::test]
async fn invalid_nhs_numbers_are_invalid_argument_with_the_reason() {
    let b = start_broker(
        vec![(Arc::new(gp_source()) as Arc<dyn Source>, LONG)],
        Settings::default(),
    )
    .await;
    let mut c = b.client().await;
    let cases = [
        ("9434765918", "check digit"),
        ("94347659", "10 digits"),
        ("943476591X", "only digits"),
        ("", "empty"),
        ("0000000060", "not valid"),
    ];
    for (nhs, says) in cases {
        let status = c
            .get_care_record(request(nhs, LONG))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{nhs:?}");
        assert!(
            status.message().contains(says),
            "{nhs:?}: {}",
            status.message()
        );
    }
    let mut anonymous = request(&shared_patient().as_digits(), LONG);
    anonymous.get_mut().requester = None;
    let status = c.get_care_record(anonymous).await.expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn streaming_sends_each_source_in_completion_order_then_the_merged_record() {
    let gp = gp_source().with_delay(Duration::from_millis(300));
    let hospital = hospital_source().with_delay(Duration::from_millis(20));
    let slow = InMemorySource::new("slow", "RX1", "Slow Trust").with_delay(Duration::from_secs(10));
    let b = start_broker(
        vec![
            (Arc::new(gp) as Arc<dyn Source>, LONG),
            (Arc::new(hospital), LONG),
            (Arc::new(slow), Duration::from_millis(600)),
        ],
        Settings::default(),
    )
    .await;
    let mut stream = b
        .client()
        .await
        .stream_care_record(request(&shared_patient().as_digits(), LONG))
        .await
        .expect("stream")
        .into_inner();
    let mut order = Vec::new();
    let mut last = None;
    while let Some(event) = stream.message().await.expect("event") {
        match event.event.expect("event set") {
            Event::Source(s) => {
                let status = s.status.expect("status");
                if status.source_id == "hospital" {
                    assert_eq!(s.contribution.map(|c| c.allergies.len()), Some(1));
                }
                order.push((status.source_id, status.outcome));
            }
            Event::Complete(r) => last = Some(r),
        }
    }
    assert_eq!(
        order,
        [
            ("hospital".to_owned(), SourceOutcome::Ok as i32),
            ("gp".to_owned(), SourceOutcome::Ok as i32),
            ("slow".to_owned(), SourceOutcome::Timeout as i32),
        ]
    );
    let last = last.expect("final event");
    assert_eq!(last.record.expect("record").allergies.len(), 1);
    assert_eq!(last.sources.len(), 3);

    // A cache hit replays the same sources, then the record.
    let mut again = b
        .client()
        .await
        .stream_care_record(request(&shared_patient().as_digits(), LONG))
        .await
        .expect("stream")
        .into_inner();
    let mut events = 0;
    let mut complete = None;
    while let Some(event) = again.message().await.expect("event") {
        match event.event.expect("set") {
            Event::Source(_) => events += 1,
            Event::Complete(r) => complete = Some(r),
        }
    }
    assert_eq!(events, 3);
    assert!(complete.expect("final").from_cache);
}

#[tokio::test]
async fn health_reports_serving() {
    let b = start_broker(vec![], Settings::default()).await;
    let channel = tonic::transport::Channel::from_shared(b.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "carerecord.v1.CareRecordService".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}
