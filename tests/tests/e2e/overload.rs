//! Overload with the shipped defaults: far more concurrent lookups than the broker can hold, over
//! real gRPC. The excess is refused at the door (RESOURCE_EXHAUSTED with a retry hint), never by
//! the broker's own per-source bulkheads (which would surface as UNAVAILABLE: the requester's own
//! organisation unanswered, the relationship unconfirmed), and what is admitted completes.
//!
//! Bounded in count, no timing assertions: latency figures belong in BENCHMARKS.md.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::memory::InMemorySource;
use carerecord_broker::breaker::BreakerConfig;
use carerecord_broker::config::Config;
use carerecord_broker::fanout::{ConfiguredSource, SourceSet};
use carerecord_e2e::*;
use carerecord_proto::{CareRecord, GetCareRecordRequest, Patient, SourceOutcome};
use tonic::Code;
use tonic_types::StatusExt;

/// Several times what the shipped limits hold at once.
const CONCURRENT: u32 = 160;

#[tokio::test]
async fn beyond_capacity_the_door_sheds_and_every_admitted_lookup_completes() {
    // The shipped defaults, as `carerecord serve` reads them from a minimal file; only the audit
    // trail moves somewhere private.
    let mut config = Config::parse(
        "[server]\nlisten = \"127.0.0.1:0\"\nplaintext = true\n",
        Path::new("<overload>"),
    )
    .expect("a minimal config parses");
    config.audit.file = temp_path("overload-audit.jsonl");
    let r = config.resilience.clone();

    // Every patient is registered at the GP practice the requester works for, so the
    // relationship rests on the GP source answering: a GP call refused by its bulkhead would
    // show up as UNAVAILABLE (relationship unconfirmed).
    let patients: Vec<_> = (0..CONCURRENT).map(|i| nhs(999_100_000 + i * 10)).collect();
    let mut gp = InMemorySource::new("gp", "A81001", "Riverside Medical Practice")
        .with_delay(Duration::from_millis(300));
    let mut hospital = InMemorySource::new("hospital", "RJ122", "Royal Infirmary")
        .with_delay(Duration::from_millis(200));
    for p in &patients {
        let record = CareRecord {
            patient: Some(Patient {
                family_name: "Smith".into(),
                ..Patient::default()
            }),
            ..CareRecord::default()
        };
        gp = gp.with_patient(*p, record.clone());
        hospital = hospital.with_patient(*p, record);
    }
    let breaker = BreakerConfig {
        failures: r.breaker_failures,
        open_for: Duration::from_millis(r.breaker_open_ms),
    };
    let timeout = Duration::from_millis(config.budget.default_source_timeout_ms);
    let sources = SourceSet::new(
        vec![
            ConfiguredSource::with_limits(Arc::new(gp), timeout, breaker, r.source_max_in_flight),
            ConfiguredSource::with_limits(
                Arc::new(hospital),
                timeout,
                breaker,
                r.source_max_in_flight,
            ),
        ],
        1,
    );
    let broker = Arc::new(
        carerecord_broker::assemble::broker_with_sources(&config, sources).expect("broker builds"),
    );
    let b = start_with(broker).await;
    let client = b.client().await;

    let lookups = patients.iter().map(|p| {
        let mut c = client.clone();
        let mut request = tonic::Request::new(GetCareRecordRequest {
            nhs_number: p.as_digits(),
            requester: Some(clinician_of("A81001")),
            ..GetCareRecordRequest::default()
        });
        request.set_timeout(Duration::from_secs(10));
        async move { c.get_care_record(request).await }
    });
    let results = futures::future::join_all(lookups).await;

    let mut admitted = 0;
    let mut shed = 0;
    for result in &results {
        match result {
            Ok(response) => {
                admitted += 1;
                let response = response.get_ref();
                assert!(
                    response.complete,
                    "an admitted lookup is served whole: {:?}",
                    response.sources
                );
                assert!(
                    response
                        .sources
                        .iter()
                        .all(|s| s.outcome == SourceOutcome::Ok as i32)
                );
            }
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::ResourceExhausted,
                    "refused only at the door: {status:?}"
                );
                let info = status.get_details_error_info().expect("ErrorInfo");
                assert_eq!(info.reason, "OVERLOADED");
                let retry = status
                    .get_details_retry_info()
                    .and_then(|r| r.retry_delay)
                    .expect("RetryInfo with a delay");
                assert_eq!(retry, Duration::from_millis(r.shed_retry_after_ms));
                assert!(status.metadata().get("grpc-retry-pushback-ms").is_some());
                shed += 1;
            }
        }
    }
    assert!(shed > 0, "the excess was shed ({admitted} admitted)");
    assert!(admitted > 0, "the door still admits work");
    assert_eq!(admitted + shed, results.len());

    // Capacity is given back, and the broker reports itself healthy.
    let mut c = client.clone();
    let mut again = tonic::Request::new(GetCareRecordRequest {
        nhs_number: patients[0].as_digits(),
        requester: Some(clinician_of("A81001")),
        ..GetCareRecordRequest::default()
    });
    again.set_timeout(Duration::from_secs(10));
    assert!(c.get_care_record(again).await.is_ok());
    let channel = tonic::transport::Channel::from_shared(b.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "carerecord.v1.CareRecordService".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}
