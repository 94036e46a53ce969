//! The lookup pipeline driven directly with paused time: cache expiry and the shared fetch
//! surviving its first caller, without sleeping in real time.

use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::Source;
use carerecord_adapters::memory::InMemorySource;
use carerecord_broker::access::{Caller, UNVERIFIED};
use carerecord_broker::config::CacheConfig;
use carerecord_broker::validate::{self, LookupRequest};
use carerecord_broker::{Broker, CallingSystem};
use carerecord_e2e::*;
use carerecord_proto::GetCareRecordRequest;

const LONG: Duration = Duration::from_secs(5);

fn broker_over(sources: Vec<Arc<dyn Source>>, cache: CacheConfig) -> Arc<Broker> {
    let settings = Settings {
        cache,
        broker_id: "b1".into(),
        ..Settings::default()
    };
    build_broker(sources.into_iter().map(|s| (s, LONG)).collect(), settings)
}

fn lookup_request(broker: &Broker, fresh: bool) -> LookupRequest {
    let mut r = validate::check(
        GetCareRecordRequest {
            nhs_number: shared_patient().as_digits(),
            requester: Some(clinician()),
            ..GetCareRecordRequest::default()
        },
        broker.new_request_id(),
        None,
    )
    .expect("valid");
    r.require_fresh = fresh;
    r
}

fn unverified() -> CallingSystem {
    CallingSystem::Identified(Caller {
        system: UNVERIFIED.into(),
        trusted_assertions: false,
    })
}

/// Runs one lookup to its end; returns (from_cache, complete).
async fn lookup(broker: &Broker, fresh: bool) -> (bool, bool) {
    let request = lookup_request(broker, fresh);
    let answer = broker.lookup(request, unverified()).await.expect("lookup");
    (answer.from_cache(), answer.complete)
}

#[tokio::test(start_paused = true)]
async fn a_cached_record_expires_after_its_ttl() {
    let gp = Arc::new(gp_source().with_delay(Duration::from_millis(50)));
    let cache = CacheConfig {
        ttl_secs: 60,
        ..CacheConfig::default()
    };
    let broker = broker_over(vec![gp.clone()], cache);
    assert_eq!(lookup(&broker, false).await, (false, true));
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(
        lookup(&broker, false).await,
        (true, true),
        "still fresh at 59 s"
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        lookup(&broker, false).await,
        (false, true),
        "expired at 61 s"
    );
    assert_eq!(gp.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_partial_record_expires_sooner_than_a_complete_one() {
    let gp = Arc::new(gp_source());
    let slow = Arc::new(
        InMemorySource::new("slow", "RX1", "Slow Trust").with_delay(Duration::from_secs(60)),
    );
    let cache = CacheConfig {
        ttl_secs: 60,
        partial_ttl_secs: 5,
        ..CacheConfig::default()
    };
    let broker = broker_over(vec![gp.clone(), slow], cache);
    assert_eq!(lookup(&broker, false).await, (false, false));
    tokio::time::advance(Duration::from_secs(4)).await;
    assert_eq!(lookup(&broker, false).await, (true, false));
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(!lookup(&broker, false).await.0, "partial TTL of 5 s passed");
}

#[tokio::test(start_paused = true)]
async fn the_shared_fetch_survives_its_first_caller_cancelling() {
    let gp = Arc::new(gp_source().with_delay(Duration::from_secs(1)));
    let broker = broker_over(vec![gp.clone()], CacheConfig::default());

    // The first caller starts the fetch, then goes away (tonic drops the handler future).
    let first = {
        let broker = broker.clone();
        tokio::spawn(async move { lookup(&broker, false).await })
    };
    tokio::time::advance(Duration::from_millis(100)).await;
    tokio::task::yield_now().await;
    // A second caller joins the same flight.
    let second = {
        let broker = broker.clone();
        tokio::spawn(async move { lookup(&broker, false).await })
    };
    tokio::time::advance(Duration::from_millis(100)).await;
    first.abort();
    assert!(first.await.is_err(), "first caller cancelled");

    assert_eq!(second.await.expect("second caller"), (false, true));
    assert_eq!(gp.calls(), 1, "one fetch, shared");
    assert_eq!(gp.completed(), 1, "it ran to completion despite the cancel");
    // And it was cached for the next caller.
    assert_eq!(lookup(&broker, false).await, (true, true));
}

#[tokio::test(start_paused = true)]
async fn require_fresh_joins_a_fetch_already_in_progress() {
    let gp = Arc::new(gp_source().with_delay(Duration::from_millis(500)));
    let broker = broker_over(vec![gp.clone()], CacheConfig::default());
    let (a, b) = tokio::join!(lookup(&broker, false), lookup(&broker, true));
    assert_eq!((a, b), ((false, true), (false, true)));
    assert_eq!(gp.calls(), 1);
}

#[tokio::test]
async fn a_lookup_that_already_passed_through_this_broker_is_refused() {
    let broker = broker_over(vec![Arc::new(gp_source())], CacheConfig::default());
    let mut request = lookup_request(&broker, false);
    request.via_brokers = vec!["elsewhere".into(), "b1".into()];
    let err = match broker.lookup(request, unverified()).await {
        Err(e) => e,
        Ok(_) => panic!("loop not refused"),
    };
    assert_eq!(err.reason(), "FEDERATION_LOOP");
}

#[tokio::test]
async fn a_deadline_too_short_for_any_source_is_deadline_exceeded() {
    let broker = broker_over(vec![Arc::new(gp_source())], CacheConfig::default());
    let mut request = lookup_request(&broker, false);
    request.caller_timeout = Some(Duration::from_millis(5));
    let err = match broker.lookup(request, unverified()).await {
        Err(e) => e,
        Ok(_) => panic!("accepted"),
    };
    assert_eq!(err.reason(), "DEADLINE_TOO_SHORT");
}

#[tokio::test(start_paused = true)]
async fn a_fan_out_whose_caller_left_keeps_its_place_at_the_door_until_its_sources_finish() {
    let gp = Arc::new(gp_source().with_delay(Duration::from_secs(1)));
    let broker = broker_over(vec![gp.clone()], CacheConfig::default());
    let caller = {
        let broker = broker.clone();
        tokio::spawn(async move { lookup(&broker, false).await })
    };
    tokio::time::advance(Duration::from_millis(100)).await;
    tokio::task::yield_now().await;
    assert_eq!(broker.lookups_in_flight(), 1);
    caller.abort();
    assert!(caller.await.is_err(), "the caller went away");
    // Its fan-out is still calling the GP: the door still counts it, so calls to a source can
    // never outnumber the places at the door.
    assert_eq!(broker.flights_in_progress(), 1);
    assert_eq!(broker.lookups_in_flight(), 1);
    tokio::time::advance(Duration::from_secs(1)).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(gp.completed(), 1);
    assert_eq!(
        broker.lookups_in_flight(),
        0,
        "given back when its sources finished"
    );
}
