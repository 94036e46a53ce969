//! Staying up when sources and callers misbehave: breakers, bulkheads, shedding, reload.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use carerecord_adapters::memory::{Behaviour, InMemorySource};
use carerecord_adapters::{Source, SourceError};
use carerecord_broker::breaker::BreakerConfig;
use carerecord_broker::fanout::{ConfiguredSource, SourceSet};
use carerecord_broker::lookup::LoadLimits;
use carerecord_e2e::*;
use carerecord_proto::{CacheDirective, SourceOutcome};
use tonic::Code;

const LONG: Duration = Duration::from_secs(5);

fn fresh(nhs: &str, timeout: Duration) -> tonic::Request<carerecord_proto::GetCareRecordRequest> {
    let mut r = request(nhs, timeout);
    r.get_mut().cache = CacheDirective::RequireFresh as i32;
    r
}

fn outcome(r: &carerecord_proto::GetCareRecordResponse, id: &str) -> SourceOutcome {
    r.sources
        .iter()
        .find(|s| s.source_id == id)
        .and_then(|s| SourceOutcome::try_from(s.outcome).ok())
        .unwrap_or(SourceOutcome::Unspecified)
}

fn breaker(failures: u32) -> BreakerConfig {
    BreakerConfig {
        failures,
        open_for: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn a_dead_source_trips_its_breaker_and_is_then_not_asked() {
    let dead = Arc::new(
        InMemorySource::new("dead", "RX9", "Dead Trust").with_behaviour(Behaviour::Fail(
            SourceError::Connect("connection refused".into()),
        )),
    );
    let b = start_with(build_broker_from(
        vec![
            ConfiguredSource::new(Arc::new(gp_source()), LONG),
            ConfiguredSource::with_limits(dead.clone(), LONG, breaker(3), 64),
        ],
        Settings::default(),
    ))
    .await;
    let mut c = b.client().await;
    for _ in 0..3 {
        let r = c
            .get_care_record(fresh(&shared_patient().as_digits(), LONG))
            .await
            .expect("lookup")
            .into_inner();
        assert_eq!(outcome(&r, "dead"), SourceOutcome::Error);
    }
    for _ in 0..5 {
        let r = c
            .get_care_record(fresh(&shared_patient().as_digits(), LONG))
            .await
            .expect("lookup")
            .into_inner();
        assert_eq!(outcome(&r, "dead"), SourceOutcome::CircuitOpen);
        assert_eq!(
            outcome(&r, "gp"),
            SourceOutcome::Ok,
            "the healthy source is still served"
        );
    }
    assert_eq!(dead.calls(), 3, "an open circuit is not called");
}

#[tokio::test]
async fn once_a_hung_source_trips_lookups_stop_waiting_for_its_timeout() {
    let hung = Arc::new(DropCounting::new("hung", Duration::from_secs(60)));
    let b = start_with(build_broker_from(
        vec![
            ConfiguredSource::new(Arc::new(gp_source()), LONG),
            ConfiguredSource::with_limits(hung.clone(), Duration::from_millis(100), breaker(2), 64),
        ],
        Settings::default(),
    ))
    .await;
    let mut c = b.client().await;
    for _ in 0..2 {
        let r = c
            .get_care_record(fresh(&shared_patient().as_digits(), LONG))
            .await
            .expect("lookup")
            .into_inner();
        assert_eq!(outcome(&r, "hung"), SourceOutcome::Timeout);
    }
    let r = c
        .get_care_record(fresh(&shared_patient().as_digits(), LONG))
        .await
        .expect("lookup")
        .into_inner();
    assert_eq!(outcome(&r, "hung"), SourceOutcome::CircuitOpen);
    let status = r
        .sources
        .iter()
        .find(|s| s.source_id == "hung")
        .expect("status");
    assert!(
        status.latency_ms < 100,
        "reported at once, not after its timeout: {} ms",
        status.latency_ms
    );
    assert_eq!(hung.started.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_hung_source_cannot_take_more_than_its_bulkhead() {
    let hung = Arc::new(DropCounting::new("hung", Duration::from_secs(60)));
    let b = start_with(build_broker_from(
        vec![
            ConfiguredSource::new(Arc::new(gp_source()), LONG),
            ConfiguredSource::with_limits(hung.clone(), Duration::from_millis(800), breaker(0), 2),
        ],
        Settings::default(),
    ))
    .await;
    let client = b.client().await;
    // Four different patients at once: four flights, but only two calls to the hung source.
    let lookups = (0..4u32).map(|i| {
        let mut c = client.clone();
        async move {
            c.get_care_record(request(&nhs(999_000_100 + i * 10).as_digits(), LONG))
                .await
                .map(|r| r.into_inner())
        }
    });
    let results = futures::future::join_all(lookups).await;
    let outcomes: Vec<SourceOutcome> = results
        .iter()
        .map(|r| outcome(r.as_ref().expect("answered"), "hung"))
        .collect();
    let timed_out = outcomes
        .iter()
        .filter(|o| **o == SourceOutcome::Timeout)
        .count();
    let refused = outcomes
        .iter()
        .filter(|o| **o == SourceOutcome::Unavailable)
        .count();
    assert_eq!((timed_out, refused), (2, 2), "{outcomes:?}");
    assert_eq!(hung.started.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn overload_is_shed_with_resource_exhausted_and_a_retry_hint() {
    let slow = Arc::new(gp_source().with_delay(Duration::from_millis(400)));
    let settings = Settings {
        limits: LoadLimits {
            max_in_flight: 2,
            retry_after: Duration::from_millis(250),
        },
        ..Settings::default()
    };
    let b = start_broker(vec![(slow as Arc<dyn Source>, LONG)], settings).await;
    let client = b.client().await;
    let lookups = (0..6u32).map(|i| {
        let mut c = client.clone();
        async move {
            c.get_care_record(request(&nhs(999_000_200 + i * 10).as_digits(), LONG))
                .await
        }
    });
    let results = futures::future::join_all(lookups).await;
    let admitted = results.iter().filter(|r| r.is_ok()).count();
    let shed: Vec<&tonic::Status> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(admitted, 2, "exactly the limit was admitted");
    assert_eq!(shed.len(), 4);
    for s in shed {
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(
            s.metadata()
                .get("grpc-retry-pushback-ms")
                .and_then(|v| v.to_str().ok()),
            Some("250")
        );
    }
    // Capacity is given back: the next lookup is admitted.
    let mut c = client.clone();
    assert!(
        c.get_care_record(request(&shared_patient().as_digits(), LONG))
            .await
            .is_ok()
    );
    assert_eq!(b.broker.lookups_in_flight(), 0);
}

#[tokio::test]
async fn sources_replaced_under_load_lose_no_lookup() {
    let gp: Arc<dyn Source> = Arc::new(gp_source().with_delay(Duration::from_millis(150)));
    let b = start_broker(vec![(gp.clone(), LONG)], Settings::default()).await;
    let client = b.client().await;
    let lookups: Vec<_> = (0..20u32)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move {
                c.get_care_record(fresh(&nhs(999_000_300 + i * 10).as_digits(), LONG))
                    .await
                    .map(|r| r.into_inner().sources.len())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let hospital: Arc<dyn Source> = Arc::new(hospital_source());
    b.broker.replace_sources(SourceSet::new(
        vec![
            ConfiguredSource::new(gp, LONG),
            ConfiguredSource::new(hospital, LONG),
        ],
        2,
    ));
    for l in lookups {
        let n = l.await.expect("task").expect("every lookup answered");
        assert!(n == 1 || n == 2);
    }
    let after = client
        .clone()
        .get_care_record(request(&shared_patient().as_digits(), LONG))
        .await
        .expect("lookup")
        .into_inner();
    assert_eq!(after.sources.len(), 2, "new lookups use the new sources");
}

#[tokio::test]
async fn an_invalid_reloaded_config_is_rejected_and_the_old_sources_stay() {
    let broker = build_broker(
        vec![(Arc::new(gp_source()) as Arc<dyn Source>, LONG)],
        Settings::default(),
    );
    let path = temp_path("reload.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\nplaintext = true\n[[sources]]\nid = 1\n",
    )
    .expect("write");
    let err = carerecord_broker::registry::reload(&broker, &path).expect_err("invalid");
    assert!(err.to_string().contains("line 5"), "{err}");
    assert_eq!(broker.sources().epoch, 1);
    assert_eq!(broker.sources().sources.len(), 1);

    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\nplaintext = true\n[[sources]]\nid = \"a\"\norganisation_code = \"A\"\norganisation_name = \"A\"\n[sources.fhir]\nbase_url = \"http://127.0.0.1:9/fhir\"\n[[sources]]\nid = \"b\"\norganisation_code = \"B\"\norganisation_name = \"B\"\n[sources.fhir]\nbase_url = \"http://127.0.0.1:9/fhir\"\n",
    )
    .expect("write");
    assert_eq!(
        carerecord_broker::registry::reload(&broker, &path).expect("valid"),
        2
    );
    assert_eq!(broker.sources().epoch, 2);
}

#[tokio::test]
async fn a_callers_tight_deadline_neither_trips_breakers_nor_poisons_the_cache() {
    let hospital = Arc::new(hospital_source().with_delay(Duration::from_millis(300)));
    let b = start_with(build_broker_from(
        vec![
            ConfiguredSource::new(Arc::new(gp_source()), LONG),
            ConfiguredSource::with_limits(hospital.clone(), LONG, breaker(2), 64),
        ],
        Settings::default(),
    ))
    .await;
    let mut c = b.client().await;
    for _ in 0..4 {
        let r = c
            .get_care_record(fresh(
                &shared_patient().as_digits(),
                Duration::from_millis(100),
            ))
            .await
            .expect("answered within the short deadline")
            .into_inner();
        assert_eq!(outcome(&r, "hospital"), SourceOutcome::Timeout);
    }
    // A caller with time to wait: not served the cut-short record from cache, and the hospital's
    // circuit is still closed although it "timed out" four times.
    let r = c
        .get_care_record(request(&shared_patient().as_digits(), LONG))
        .await
        .expect("lookup")
        .into_inner();
    assert!(!r.from_cache);
    assert_eq!(outcome(&r, "hospital"), SourceOutcome::Ok);
    assert!(r.complete);
}

#[tokio::test]
async fn a_caller_with_more_time_does_not_inherit_a_tight_deadline_fetch() {
    let hospital = Arc::new(hospital_source().with_delay(Duration::from_millis(300)));
    let b = start_broker(
        vec![
            (Arc::new(gp_source()) as Arc<dyn Source>, LONG),
            (hospital.clone() as Arc<dyn Source>, LONG),
        ],
        Settings::default(),
    )
    .await;
    let client = b.client().await;
    let mut hurried = client.clone();
    let mut patient = client.clone();
    let (short, long) = tokio::join!(
        hurried.get_care_record(request(
            &shared_patient().as_digits(),
            Duration::from_millis(120)
        )),
        async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            patient
                .get_care_record(request(&shared_patient().as_digits(), LONG))
                .await
        }
    );
    let short = short.expect("short answered").into_inner();
    let long = long.expect("long answered").into_inner();
    assert_eq!(outcome(&short, "hospital"), SourceOutcome::Timeout);
    assert_eq!(
        outcome(&long, "hospital"),
        SourceOutcome::Ok,
        "its own fetch, not the hurried one"
    );
    assert!(long.complete);
}
