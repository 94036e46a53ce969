//! A whole region: thousands of organisations from a directory file, one mock process serving
//! them by path, and a real FHIR record locator — only the organisations that know the patient
//! (plus always-ask) are called, counted at the mock server.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use carerecord_broker::config::Config;
use carerecord_e2e::region::{fresh_request, requests_by_org, start_region_broker};
use carerecord_e2e::*;
use carerecord_mock_sources::{
    Fault, LOCATOR, LatencyProfile, Region, RegionServer, RegionSpec, ServerOptions,
};
use carerecord_proto::{GetCareRecordResponse, SourceOutcome, WarningKind};

const LONG: Duration = Duration::from_secs(5);

async fn thousands() -> RegionServer {
    let region = Arc::new(Region::generate(&RegionSpec {
        seed: 7,
        patients: 2_000,
        organisations: 3_000,
        page_size: 50,
    }));
    RegionServer::start_shared(
        region,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        ServerOptions {
            latency: Some(LatencyProfile::ZERO),
            ..ServerOptions::default()
        },
    )
    .await
    .expect("start a 3,000-organisation region")
}

/// The routed config mock-sources writes, loaded the way `carerecord serve` loads it, with a
/// private audit file and the test requester's assertion trusted.
fn routed_config(server: &RegionServer, drop_org: Option<&str>) -> Config {
    let directory = temp_path("organisations.csv");
    let mut csv = server.directory_csv();
    if let Some(code) = drop_org {
        csv = csv
            .lines()
            .filter(|l| !l.starts_with(&format!("{code},")))
            .map(|l| format!("{l}\n"))
            .collect();
    }
    std::fs::write(&directory, csv).expect("write directory");
    let path = temp_path("routed.toml");
    std::fs::write(
        &path,
        server.broker_config_toml_routed("127.0.0.1:0", &directory),
    )
    .expect("write config");
    let mut config = Config::load(&path).expect("the routed config loads");
    config.audit.file = temp_path("scale-audit.jsonl");
    config.access.trust_unverified_assertions = true;
    config
}

fn asked(r: &GetCareRecordResponse) -> BTreeSet<String> {
    r.sources
        .iter()
        .map(|s| s.organisation_code.clone())
        .collect()
}

#[tokio::test]
async fn only_the_located_and_always_ask_organisations_of_thousands_are_called() {
    let server = thousands().await;
    let config = routed_config(&server, None);
    let b = start_region_broker(&config).await;
    let patient = server
        .region()
        .patients()
        .find(|p| p.organisations.len() >= 4)
        .expect("a patient known to several organisations");
    let before = requests_by_org(&server);
    let r = b.lookup(fresh_request(&patient.nhs_number, LONG)).await;
    let located: BTreeSet<String> = patient.organisations.iter().cloned().collect();
    let always: BTreeSet<String> = server.always_ask().into_iter().collect();
    let expected: BTreeSet<String> = located.union(&always).cloned().collect();
    assert_eq!(
        asked(&r),
        expected,
        "statuses for exactly the organisations asked"
    );
    assert!(r.sources.len() < 12, "a handful of 3,000");
    for s in &r.sources {
        let outcome = SourceOutcome::try_from(s.outcome).expect("outcome");
        if located.contains(&s.organisation_code) {
            assert_eq!(outcome, SourceOutcome::Ok, "{}", s.organisation_code);
            assert!(s.selected_by.contains("locator:"), "{}", s.selected_by);
        } else {
            assert_eq!(s.selected_by, "always_ask");
        }
    }
    assert!(r.complete);
    assert_eq!(r.locators.len(), 1);
    assert_eq!(r.locators[0].outcome, SourceOutcome::Ok as i32);

    // Counted at the mock server: nobody else was called.
    let after = requests_by_org(&server);
    let called: BTreeSet<String> = after
        .iter()
        .filter(|(code, n)| **n > before.get(*code).copied().unwrap_or(0))
        .map(|(code, _)| code.clone())
        .filter(|code| code != LOCATOR)
        .collect();
    assert_eq!(called, expected);
    // The locator's record pointers carry each organisation's own id for the patient: an
    // organisation only the locator named is read in one request ($everything by that id,
    // its Patient verified), with no Patient search first, on this first lookup.
    for code in located.difference(&always) {
        let n = after[code] - before.get(code).copied().unwrap_or(0);
        assert_eq!(
            n, 1,
            "{code}: one request, not a search and then the record"
        );
    }
}

#[tokio::test]
async fn with_the_locator_down_always_ask_is_still_served_and_flagged() {
    let server = thousands().await;
    let config = routed_config(&server, None);
    let b = start_region_broker(&config).await;
    server
        .faults()
        .set_fault(LOCATOR, Fault::Http500)
        .expect("locator fault");
    let patient = server.region().patients().next().expect("a patient");
    let r = b.lookup(fresh_request(&patient.nhs_number, LONG)).await;
    let always: BTreeSet<String> = server.always_ask().into_iter().collect();
    assert_eq!(asked(&r), always);
    assert!(!r.complete);
    assert_eq!(r.locators[0].outcome, SourceOutcome::Error as i32);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.kind == WarningKind::LocatorUnavailable as i32)
    );
}

#[tokio::test]
async fn an_organisation_the_locator_names_but_the_directory_lacks_is_reported() {
    let server = thousands().await;
    let patient = server
        .region()
        .patients()
        .find(|p| p.organisations.len() >= 3)
        .expect("a patient");
    let missing = patient.organisations[0].clone(); // the GP
    let config = routed_config(&server, Some(&missing));
    let b = start_region_broker(&config).await;
    let r = b.lookup(fresh_request(&patient.nhs_number, LONG)).await;
    assert!(!asked(&r).contains(&missing));
    let warning = r
        .warnings
        .iter()
        .find(|w| w.kind == WarningKind::UnknownOrganisation as i32)
        .expect("unknown organisation warning");
    assert!(warning.message.contains(&missing), "{}", warning.message);
}
