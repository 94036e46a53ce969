//! Broker as a source: one broker federating another over real gRPC, and loops refused.

use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::Source;
use carerecord_e2e::*;
use carerecord_proto::SourceOutcome;

const LONG: Duration = Duration::from_secs(5);

fn named(id: &str) -> Settings {
    Settings {
        broker_id: id.into(),
        ..Settings::default()
    }
}

#[tokio::test]
async fn a_broker_federates_another_and_keeps_its_source_statuses_nested() {
    let north = start_broker(
        vec![(Arc::new(hospital_source()) as Arc<dyn Source>, LONG)],
        named("north"),
    )
    .await;
    let central = start_broker(
        vec![
            (Arc::new(gp_source()) as Arc<dyn Source>, LONG),
            (remote_broker("north", &north.url), LONG),
        ],
        named("central"),
    )
    .await;
    let r = central
        .lookup(request(&shared_patient().as_digits(), LONG))
        .await;
    assert!(r.complete, "{:?}", r.sources);
    let north_status = r
        .sources
        .iter()
        .find(|s| s.source_id == "north")
        .expect("north");
    assert_eq!(north_status.outcome, SourceOutcome::Ok as i32);
    assert_eq!(north_status.nested.len(), 1);
    assert_eq!(north_status.nested[0].source_id, "hospital");
    assert_eq!(north_status.nested[0].outcome, SourceOutcome::Ok as i32);
    let record = r.record.expect("record");
    // The GP's and the remote hospital's penicillin allergy are one entry.
    assert_eq!(record.allergies.len(), 1);
    let from: Vec<&str> = record.allergies[0]
        .provenance
        .iter()
        .map(|p| p.source_id.as_str())
        .collect();
    assert_eq!(from, ["gp", "north/hospital"]);
    assert_eq!(record.conditions.len(), 2);
}

#[tokio::test]
async fn a_federation_loop_is_refused_with_a_clear_outcome() {
    // a knows b, b knows a.
    let a_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let a_url = format!("http://{}", a_listener.local_addr().expect("addr"));
    let b = start_broker(
        vec![
            (Arc::new(hospital_source()) as Arc<dyn Source>, LONG),
            (remote_broker("a", &a_url), LONG),
        ],
        named("b"),
    )
    .await;
    let a = serve_on(
        a_listener,
        build_broker(
            vec![
                (Arc::new(gp_source()) as Arc<dyn Source>, LONG),
                (remote_broker("b", &b.url), LONG),
            ],
            named("a"),
        ),
    );
    let r = a.lookup(request(&shared_patient().as_digits(), LONG)).await;
    let via_b = r.sources.iter().find(|s| s.source_id == "b").expect("b");
    assert_eq!(
        via_b.outcome,
        SourceOutcome::Ok as i32,
        "b answered with its hospital"
    );
    let back_to_a = via_b
        .nested
        .iter()
        .find(|s| s.source_id == "a")
        .expect("nested a");
    assert_eq!(back_to_a.outcome, SourceOutcome::Refused as i32);
    assert!(back_to_a.message.contains("loop"), "{}", back_to_a.message);
    // Data from both sides still arrived once each.
    assert_eq!(r.record.expect("record").allergies.len(), 1);
}

#[tokio::test]
async fn an_unreachable_remote_broker_is_an_error_outcome() {
    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let central = start_broker(
        vec![
            (Arc::new(gp_source()) as Arc<dyn Source>, LONG),
            (remote_broker("gone", &format!("http://{closed}")), LONG),
        ],
        named("central"),
    )
    .await;
    let r = central
        .lookup(request(&shared_patient().as_digits(), LONG))
        .await;
    let gone = r
        .sources
        .iter()
        .find(|s| s.source_id == "gone")
        .expect("gone");
    assert_eq!(gone.outcome, SourceOutcome::Error as i32);
    assert!(!r.complete);
}

#[tokio::test]
async fn a_federated_answer_is_never_shared_between_different_requesters() {
    let hospital = Arc::new(hospital_source());
    let north = start_broker(
        vec![(hospital.clone() as Arc<dyn Source>, LONG)],
        named("north"),
    )
    .await;
    let central = start_broker(
        vec![(remote_broker("north", &north.url), LONG)],
        named("central"),
    )
    .await;
    let mut c = central.client().await;
    c.get_care_record(request(&shared_patient().as_digits(), LONG))
        .await
        .expect("first requester");
    let mut other = request(&shared_patient().as_digits(), LONG);
    if let Some(q) = other.get_mut().requester.as_mut() {
        q.user_id = "another-clinician".into();
        q.organisation_code = "RJ122".into();
    }
    let r = c
        .get_care_record(other)
        .await
        .expect("second requester")
        .into_inner();
    assert!(
        !r.from_cache,
        "the remote applied the first requester's policy: not reusable"
    );
    // The same requester again is served from cache.
    let again = c
        .get_care_record(request(&shared_patient().as_digits(), LONG))
        .await
        .expect("first requester again")
        .into_inner();
    assert!(again.from_cache);
}
