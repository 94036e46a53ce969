//! Audit for many brokers: each broker instance writes its own trail, `carerecord audit ship`
//! carries every trail into a real PostgreSQL (started here on a private port and directory),
//! and the store answers for the whole region — who looked at a patient, whether every chain
//! holds, and the board's usage figures.

use std::path::Path;
use std::time::Duration;

use carerecord_broker::audit::{AuditEvent, AuditLog};
use carerecord_broker::audit_store::report::{self, Figures, Period};
use carerecord_broker::audit_store::ship::{ShipError, Shipped, ship};
use carerecord_broker::audit_store::{AuditStore, schema, verify};
use carerecord_e2e::postgres::Postgres;
use carerecord_e2e::region::{
    fresh_request_as, region_config, small_region, start_region, start_region_broker,
};
use carerecord_e2e::{clinician, temp_path};
use carerecord_mock_sources::FhirMode;
use carerecord_proto::{Purpose, Requester};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A fresh server and a store with the shipper's schema; `None` (after a loud message) when no
/// PostgreSQL can be started here.
async fn store(name: &str) -> Option<(Postgres, AuditStore)> {
    let pg = Postgres::start(name)?;
    let mut store = AuditStore::connect(&pg.url, false)
        .await
        .expect("connect to the test server");
    schema::create(&mut store).await.expect("create the schema");
    // Creating it again (a second shipper starting) changes nothing.
    schema::create(&mut store)
        .await
        .expect("create is idempotent");
    Some((pg, store))
}

/// A direct client, for what only an operator (or an insider) does to the store.
async fn sql(pg: &Postgres) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

async fn count(pg: &Postgres, instance: &str) -> i64 {
    sql(pg)
        .await
        .query_one(
            "SELECT count(*) FROM carerecord_audit.event WHERE instance = $1",
            &[&instance],
        )
        .await
        .expect("count")
        .get(0)
}

fn event(
    time: &str,
    kind: &str,
    organisation: &str,
    role: &str,
    user: &str,
    patient: &str,
) -> AuditEvent {
    AuditEvent {
        time: time.into(),
        request_id: format!("r-{time}"),
        kind: kind.into(),
        system: "epr".into(),
        user_id: user.into(),
        user_name: String::new(),
        role: role.into(),
        organisation: organisation.into(),
        patient: patient.into(),
        purpose: if kind == "break_glass" {
            "emergency_access"
        } else {
            "direct_care"
        }
        .into(),
        emergency_reason: if kind == "break_glass" {
            "unconscious in ED".into()
        } else {
            String::new()
        },
        decision: "test".into(),
        sources: vec!["gp:OK".into()],
        returned: vec!["allergies:1".into()],
        withheld: false,
        from_cache: false,
    }
}

/// `n` events of `instance` appended to its trail at `path` through the broker's own writer.
async fn write(path: &Path, instance: &str, events: &[AuditEvent]) {
    let log = AuditLog::open_named(path, false, instance).expect("open the trail");
    for e in events {
        log.record(e).await.expect("record");
    }
}

fn simple(n: usize) -> Vec<AuditEvent> {
    (0..n)
        .map(|i| {
            event(
                &format!("2026-11-25T12:00:{i:02}.000Z"),
                "access",
                "RJ1",
                "R8000",
                "u1",
                "9434765919",
            )
        })
        .collect()
}

fn shipped(instance: &str, events: u64, head: u64) -> Shipped {
    Shipped {
        instance: Some(instance.into()),
        events,
        head,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_trails_shipped_tell_a_patient_everyone_who_looked_region_wide() {
    let Some((_pg, mut store)) = store("two-brokers").await else {
        return;
    };
    let region = start_region(&small_region(11, 50)).await;
    let patient = region
        .region()
        .patients_known_to_at_least(2)
        .next()
        .expect("a shared patient");
    let nhs = carerecord_adapters::NhsNumber::parse(&patient.nhs_number.to_string())
        .expect("the region's NHS numbers are valid");
    let mut trails = Vec::new();
    let mut brokers = Vec::new();
    for instance in ["broker-a", "broker-b"] {
        let mut config = region_config(&region, FhirMode::Everything, TIMEOUT);
        config.audit.instance = Some(instance.into());
        config.audit.file = temp_path(&format!("audit-{instance}.jsonl"));
        trails.push(config.audit.file.clone());
        brokers.push(start_region_broker(&config).await);
    }
    // Broker A: a clinician of RJ1, then the same clinician again; broker B: an emergency
    // access by an ED doctor of RXH.
    let rj1 = Requester {
        organisation_code: "RJ1".into(),
        ..clinician()
    };
    let ed = Requester {
        organisation_code: "RXH".into(),
        user_id: "dr-ed".into(),
        purpose: Purpose::EmergencyAccess as i32,
        emergency_reason: "collapsed, unconscious".into(),
        ..clinician()
    };
    for requester in [rj1.clone(), rj1] {
        brokers[0]
            .lookup(fresh_request_as(&patient.nhs_number, TIMEOUT, requester))
            .await;
    }
    let answer = brokers[1]
        .lookup(fresh_request_as(&patient.nhs_number, TIMEOUT, ed))
        .await;
    assert!(answer.emergency_access);

    for (trail, (instance, n)) in trails.iter().zip([("broker-a", 2), ("broker-b", 1)]) {
        assert_eq!(
            ship(&mut store, trail).await.expect("ship"),
            shipped(instance, n, n)
        );
    }
    let seen = store.patient(&nhs.as_digits()).await.expect("query");
    let who: Vec<(&str, &str, &str, &str)> = seen
        .iter()
        .map(|s| {
            (
                s.instance.as_str(),
                s.event.kind.as_str(),
                s.event.organisation.as_str(),
                s.event.user_id.as_str(),
            )
        })
        .collect();
    assert_eq!(who.len(), 3, "{who:?}");
    for expected in [
        ("broker-a", "access", "RJ1", "dr-test"),
        ("broker-b", "break_glass", "RXH", "dr-ed"),
    ] {
        assert!(who.contains(&expected), "{expected:?} missing from {who:?}");
    }
    assert!(
        seen.windows(2).all(|w| w[0].event.time <= w[1].event.time),
        "oldest first"
    );
    let checks = verify::verify(&store).await.expect("verify");
    assert_eq!(checks.len(), 2);
    assert!(checks.iter().all(|c| c.broken.is_none()), "{checks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipping_again_stores_nothing_twice_and_a_grown_trail_ships_only_its_new_events() {
    let Some((pg, mut store)) = store("again").await else {
        return;
    };
    let trail = temp_path("again.jsonl");
    let events = simple(8);
    write(&trail, "b0", &events[..5]).await;
    assert_eq!(
        ship(&mut store, &trail).await.expect("ship"),
        shipped("b0", 5, 5)
    );
    assert_eq!(
        ship(&mut store, &trail).await.expect("again"),
        shipped("b0", 0, 5)
    );
    assert_eq!(count(&pg, "b0").await, 5);

    write(&trail, "b0", &events[5..]).await;
    assert_eq!(
        ship(&mut store, &trail).await.expect("grown"),
        shipped("b0", 3, 8)
    );
    assert_eq!(count(&pg, "b0").await, 8);

    // A line being written (no newline yet) waits for the next pass.
    let mut partial = std::fs::read(&trail).expect("read");
    let whole = partial.clone();
    write(&trail, "b0", &simple(1)).await;
    let grown = std::fs::read(&trail).expect("read");
    partial.extend_from_slice(&grown[whole.len()..grown.len() - 10]);
    std::fs::write(&trail, &partial).expect("write");
    assert_eq!(
        ship(&mut store, &trail).await.expect("partial"),
        shipped("b0", 0, 8)
    );
    std::fs::write(&trail, &grown).expect("write");
    assert_eq!(
        ship(&mut store, &trail).await.expect("completed"),
        shipped("b0", 1, 9)
    );
    assert_eq!(count(&pg, "b0").await, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ship_cut_short_resumes_and_stores_every_event_exactly_once() {
    let Some((pg, mut store)) = store("resume").await else {
        return;
    };
    let trail = temp_path("resume.jsonl");
    write(&trail, "b1", &simple(6)).await;
    // A shipper that got only part-way (here: a copy of the first three lines, as if it had read
    // no further before it died) stored those three with their head...
    let text = std::fs::read_to_string(&trail).expect("read");
    let prefix = temp_path("resume-prefix.jsonl");
    let three: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
    std::fs::write(&prefix, three).expect("write");
    assert_eq!(
        ship(&mut store, &prefix).await.expect("prefix"),
        shipped("b1", 3, 3)
    );
    // ...and the next pass over the whole trail stores exactly the rest.
    assert_eq!(
        ship(&mut store, &trail).await.expect("whole"),
        shipped("b1", 3, 6)
    );
    assert_eq!(count(&pg, "b1").await, 6);
    let seqs: Vec<i64> = sql(&pg)
        .await
        .query(
            "SELECT seq FROM carerecord_audit.event WHERE instance = 'b1' ORDER BY seq",
            &[],
        )
        .await
        .expect("seqs")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    // The older copy is now behind the store: refused, not silently taken as "nothing new".
    assert!(matches!(
        ship(&mut store, &prefix).await,
        Err(ShipError::Behind {
            events: 3,
            stored: 6,
            ..
        })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_or_forked_trail_is_refused_and_nothing_of_it_is_stored() {
    let Some((pg, mut store)) = store("tamper").await else {
        return;
    };
    // An altered line in the middle of a never-shipped trail.
    let trail = temp_path("tampered.jsonl");
    write(&trail, "b2", &simple(5)).await;
    let text = std::fs::read_to_string(&trail).expect("read");
    std::fs::write(
        &trail,
        text.replacen("\"user_id\":\"u1\"", "\"user_id\":\"u9\"", 3),
    )
    .expect("write");
    let err = ship(&mut store, &trail).await.expect_err("tampered");
    assert!(matches!(err, ShipError::Tampered { line: 1, .. }), "{err}");
    assert!(err.to_string().contains("Nothing was shipped"), "{err}");
    assert_eq!(count(&pg, "b2").await, 0);
    let heads: i64 = sql(&pg)
        .await
        .query_one(
            "SELECT count(*) FROM carerecord_audit.trail WHERE instance = 'b2'",
            &[],
        )
        .await
        .expect("heads")
        .get(0);
    assert_eq!(heads, 0, "not even the instance's head was stored");

    // A trail shipped in part, then rewritten from event 3 on (a fork), then grown.
    let original = temp_path("fork.jsonl");
    write(&original, "b3", &simple(4)).await;
    assert_eq!(
        ship(&mut store, &original).await.expect("ship"),
        shipped("b3", 4, 4)
    );
    let text = std::fs::read_to_string(&original).expect("read");
    let forked = temp_path("forked.jsonl");
    let two: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&forked, two).expect("write");
    let mut other = simple(4);
    other[2].user_id = "someone-else".into();
    // The broker's own writer continues the two genuine lines with a different history.
    write(&forked, "b3", &other[2..]).await;
    let err = ship(&mut store, &forked).await.expect_err("forked");
    assert!(matches!(err, ShipError::Forked { seq: 4, .. }), "{err}");
    assert_eq!(count(&pg, "b3").await, 4);

    // A line added in the middle of an already-shipped trail's new part.
    write(&original, "b3", &simple(3)).await;
    let text = std::fs::read_to_string(&original).expect("read");
    let mut lines: Vec<&str> = text.lines().collect();
    lines.remove(5);
    std::fs::write(&original, lines.join("\n") + "\n").expect("write");
    let err = ship(&mut store, &original)
        .await
        .expect_err("a removed line");
    assert!(matches!(err, ShipError::Tampered { line: 6, .. }), "{err}");
    assert_eq!(
        count(&pg, "b3").await,
        4,
        "not even the intact event 5 before the gap"
    );

    // An unnamed trail (written before trails were named) is not shipped.
    let unnamed = temp_path("unnamed.jsonl");
    let log = AuditLog::open(&unnamed, false).expect("open");
    log.record(&simple(1)[0]).await.expect("record");
    assert!(matches!(
        ship(&mut store, &unnamed).await,
        Err(ShipError::Unnamed { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_append_only_and_verify_finds_an_event_changed_behind_its_back() {
    let Some((pg, mut store)) = store("verify").await else {
        return;
    };
    let trail = temp_path("verify.jsonl");
    write(&trail, "b4", &simple(4)).await;
    ship(&mut store, &trail).await.expect("ship");
    let checks = verify::verify(&store).await.expect("verify");
    assert_eq!(checks.len(), 1);
    assert_eq!((checks[0].events, checks[0].broken.clone()), (4, None));

    let db = sql(&pg).await;
    let refused = db
        .execute(
            "UPDATE carerecord_audit.event SET user_id = 'nobody' WHERE instance = 'b4' AND seq = 2",
            &[],
        )
        .await
        .expect_err("append-only");
    assert!(
        refused.to_string().contains("append-only")
            || format!("{refused:?}").contains("append-only"),
        "{refused:?}"
    );
    // An owner can switch the trigger off; the chain still tells.
    db.batch_execute(
        "ALTER TABLE carerecord_audit.event DISABLE TRIGGER event_append_only; \
         UPDATE carerecord_audit.event SET user_id = 'nobody' WHERE instance = 'b4' AND seq = 2;",
    )
    .await
    .expect("an insider's change");
    let checks = verify::verify(&store).await.expect("verify");
    let (seq, why) = checks[0].broken.clone().expect("found");
    assert_eq!(seq, 2);
    assert!(why.contains("altered"), "{why}");

    db.batch_execute("DELETE FROM carerecord_audit.event WHERE instance = 'b4' AND seq = 4")
        .await
        .expect("an insider's delete");
    db.batch_execute(
        "UPDATE carerecord_audit.event SET user_id = 'u1' WHERE instance = 'b4' AND seq = 2",
    )
    .await
    .expect("put back");
    let checks = verify::verify(&store).await.expect("verify");
    let (seq, why) = checks[0]
        .broken
        .clone()
        .expect("a removed last event is found");
    assert_eq!(seq, 4, "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_counts_views_per_organisation_role_and_month_and_unique_people() {
    let Some((_pg, mut store)) = store("report").await else {
        return;
    };
    let (p1, p2, p3) = ("9434765919", "9990000018", "9990000026");
    let a = vec![
        event(
            "2026-10-03T09:00:00.000Z",
            "access",
            "RJ1",
            "R8000",
            "u1",
            p1,
        ),
        event(
            "2026-10-03T09:05:00.000Z",
            "access",
            "RJ1",
            "R8000",
            "u1",
            p1,
        ),
        event(
            "2026-10-20T10:00:00.000Z",
            "break_glass",
            "RJ1",
            "R8001",
            "u2",
            p2,
        ),
        event(
            "2026-10-21T10:00:00.000Z",
            "denied",
            "RJ1",
            "R0001",
            "u3",
            p3,
        ),
    ];
    let b = vec![
        event(
            "2026-11-01T00:00:00.000Z",
            "access",
            "A81001",
            "R8000",
            "u1",
            p1,
        ),
        event(
            "2026-11-02T08:00:00.000Z",
            "document",
            "A81001",
            "R8000",
            "u1",
            p3,
        ),
        event(
            "2026-11-30T23:59:59.000Z",
            "break_glass",
            "RJ1",
            "R8000",
            "u4",
            p3,
        ),
    ];
    for (name, events) in [("rep-a", &a), ("rep-b", &b)] {
        let trail = temp_path(&format!("{name}.jsonl"));
        write(&trail, name, events).await;
        ship(&mut store, &trail).await.expect("ship");
    }
    let figures = |views, emergency, documents, denied, unique_patients, unique_staff| Figures {
        views,
        emergency,
        documents,
        denied,
        unique_patients,
        unique_staff,
    };
    let all = report::report(&store, &Period::default())
        .await
        .expect("report");
    // Views are accesses and emergency accesses; staff are (organisation, user) pairs — u1 of
    // RJ1 and u1 of A81001 are two people.
    assert_eq!(all.total, figures(5, 2, 1, 1, 3, 4));
    let by = |rows: &[report::Row]| -> Vec<(String, Figures)> {
        rows.iter()
            .map(|r| (r.key.clone(), r.figures.clone()))
            .collect()
    };
    assert_eq!(
        by(&all.by_organisation),
        [
            ("A81001".to_owned(), figures(1, 0, 1, 0, 2, 1)),
            ("RJ1".to_owned(), figures(4, 2, 0, 1, 3, 3)),
        ]
    );
    assert_eq!(
        by(&all.by_role),
        [
            ("R0001".to_owned(), figures(0, 0, 0, 1, 0, 0)),
            ("R8000".to_owned(), figures(4, 1, 1, 0, 2, 3)),
            ("R8001".to_owned(), figures(1, 1, 0, 0, 1, 1)),
        ]
    );
    assert_eq!(
        by(&all.by_month),
        [
            ("2026-10".to_owned(), figures(3, 1, 0, 1, 2, 2)),
            ("2026-11".to_owned(), figures(2, 1, 1, 0, 2, 2)),
        ]
    );
    let november = report::report(
        &store,
        &Period {
            from: Some("2026-11-01".into()),
            to: Some("2026-12-01".into()),
        },
    )
    .await
    .expect("report");
    assert_eq!(november.total, figures(2, 1, 1, 0, 2, 2));
    let json = serde_json::to_value(&november).expect("json");
    assert_eq!(json["total"]["views"], 2);
    assert_eq!(json["by_month"][0]["key"], "2026-11");
    assert!(november.table().contains("2026-11"), "{}", november.table());
}
