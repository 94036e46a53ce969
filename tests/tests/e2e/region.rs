//! Broker ↔ FHIR adapter ↔ mock-sources over real HTTP: a real broker, built from the config
//! mock-sources writes, asked over real gRPC for patients of a synthetic region whose
//! organisations serve FHIR R4 on loopback, with faults and latency switched at runtime.
//!
//! Expectations come from the region's own index (who knows whom, who disagrees), never from
//! the broker, so each assertion could fail. Regions are small and served with no added latency;
//! the few slow cases use short source timeouts, and nothing sleeps to wait.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use carerecord_e2e::pki::TestCa;
use carerecord_e2e::region::*;
use carerecord_e2e::{TestBroker, clinician_of, temp_path};
use carerecord_mock_sources::NhsNumber;
use carerecord_mock_sources::{Fault, FhirMode, LatencyProfile, PatientSummary, RegionServer};
use carerecord_proto::care_record_event::Event;
use carerecord_proto::{
    GetCareRecordResponse, Purpose, Section, SourceOutcome, SourceStatus, WarningKind,
};

/// The caller's deadline for ordinary lookups: generous, since nothing here is slow.
const DEADLINE: Duration = Duration::from_secs(3);
/// Per-source timeout for ordinary lookups.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(2);
const SEED: u64 = 7;

/// The first patient known to at least three organisations (GP first).
fn shared_patient(server: &RegionServer) -> PatientSummary {
    server
        .region()
        .patients_known_to_at_least(3)
        .next()
        .expect("the region has a patient known to three organisations")
}

async fn lookup(
    broker: &TestBroker,
    patient: &NhsNumber,
    deadline: Duration,
) -> GetCareRecordResponse {
    broker
        .client()
        .await
        .get_care_record(fresh_request(patient, deadline))
        .await
        .expect("the lookup answers")
        .into_inner()
}

fn status_of<'a>(response: &'a GetCareRecordResponse, org: &str) -> &'a SourceStatus {
    response
        .sources
        .iter()
        .find(|s| s.organisation_code == org)
        .unwrap_or_else(|| panic!("no status for {org}"))
}

#[tokio::test]
async fn a_patient_known_to_several_organisations_gets_one_merged_record() {
    let server = start_region(&small_region(SEED, 100)).await;
    let patient = shared_patient(&server);
    let broker =
        start_region_broker(&region_config(&server, FhirMode::Search, SOURCE_TIMEOUT)).await;

    let response = lookup(&broker, &patient.nhs_number, DEADLINE).await;

    assert_eq!(
        outcomes(&response),
        expected_outcomes(&server, Some(&patient)),
        "OK exactly where mock-sources says the patient is known, NOT_FOUND elsewhere"
    );
    assert!(response.complete, "every source answered");
    let known: BTreeSet<String> = patient.organisations.iter().cloned().collect();
    assert_eq!(
        contributing_orgs(&response),
        known,
        "the record is merged from every organisation that knows the patient, and only those"
    );
    for s in &response.sources {
        let outcome = SourceOutcome::try_from(s.outcome).unwrap_or_default();
        assert_eq!(
            s.entries > 0,
            outcome == SourceOutcome::Ok,
            "{}: entries counted only for sources that had data",
            s.organisation_code
        );
    }

    let record = response.record.expect("a record");
    let shared: Vec<(String, EntryShape)> = record_shape(&record)
        .into_iter()
        .flat_map(|(section, entries)| entries.into_iter().map(move |e| (section.clone(), e)))
        .filter(|(_, e)| e.orgs.len() >= 2)
        .collect();
    assert!(
        !shared.is_empty(),
        "an entry recorded by several organisations is merged into one carrying each one's provenance"
    );
    let gp = &patient.gp;
    assert!(
        shared
            .iter()
            .any(|(section, e)| section == Section::Conditions.as_str_name() && e.orgs.contains(gp)),
        "a long-term condition the GP shares with a trust is one entry: {shared:?}"
    );
    for entries in record_shape(&record).values() {
        let keys: BTreeSet<_> = entries
            .iter()
            .map(|e| (&e.system, &e.code, &e.effective))
            .collect();
        assert_eq!(
            keys.len(),
            entries.len(),
            "no duplicate entries survive the merge"
        );
    }

    let demographics = record.patient.expect("demographics");
    assert_eq!(demographics.nhs_number, patient.nhs_number.as_digits());
    assert!(
        demographics
            .family_name
            .eq_ignore_ascii_case(&patient.family)
    );
    assert_eq!(demographics.birth_date, patient.birth_date);
    assert_eq!(demographics.gender, patient.gender);
    assert_eq!(demographics.registered_gp_code, patient.gp);
}

#[tokio::test]
async fn search_everything_and_batch_give_the_same_record_with_fewer_requests_for_the_bulk_modes() {
    let server = start_region(&small_region(SEED, 100)).await;
    let patient = shared_patient(&server);

    let mut shapes = BTreeMap::new();
    let mut requests = BTreeMap::new();
    for (name, mode) in [
        ("search", FhirMode::Search),
        ("everything", FhirMode::Everything),
        ("batch", FhirMode::Batch),
    ] {
        let broker = start_region_broker(&region_config(&server, mode, SOURCE_TIMEOUT)).await;
        let before = requests_by_org(&server);
        let response = lookup(&broker, &patient.nhs_number, DEADLINE).await;
        let after = requests_by_org(&server);
        assert!(response.complete, "{name}: complete");
        assert_eq!(
            outcomes(&response),
            expected_outcomes(&server, Some(&patient)),
            "{name}"
        );
        let delta: BTreeMap<String, u64> = after
            .iter()
            .map(|(org, n)| (org.clone(), n - before[org]))
            .collect();
        shapes.insert(name, record_shape(&response.record.expect("a record")));
        requests.insert(name, delta);
    }

    assert!(
        shapes["search"].values().map(Vec::len).sum::<usize>() > 0,
        "the record is not empty"
    );
    assert_eq!(
        shapes["everything"], shapes["search"],
        "everything ≡ search"
    );
    assert_eq!(shapes["batch"], shapes["search"], "batch ≡ search");

    for org in server.organisations() {
        let n = |mode: &str| requests[mode][&org.code];
        if patient.organisations.contains(&org.code) {
            assert!(
                n("everything") < n("search") && n("batch") < n("search"),
                "{}: one bulk request instead of a search per type (search {}, everything {}, batch {})",
                org.code,
                n("search"),
                n("everything"),
                n("batch")
            );
            assert_eq!(
                n("everything"),
                2,
                "{}: Patient search + $everything",
                org.code
            );
            assert_eq!(n("batch"), 2, "{}: Patient search + one batch", org.code);
        } else {
            for mode in ["search", "everything", "batch"] {
                assert_eq!(
                    n(mode),
                    1,
                    "{}: only the Patient search where the patient is unknown ({mode})",
                    org.code
                );
            }
        }
    }
}

/// The adapter asks for `page_size` entries a page (default 100); a source configured with
/// small pages makes a record span many `$everything` pages.
#[tokio::test]
async fn a_record_spread_over_many_pages_is_read_whole() {
    let paged = start_region(&small_region(SEED, 3)).await;
    let whole = start_region(&small_region(SEED, 100)).await;
    let patient = shared_patient(&paged);
    assert_eq!(
        patient,
        shared_patient(&whole),
        "same seed, same population"
    );

    let read = |server: &RegionServer| region_config(server, FhirMode::Everything, SOURCE_TIMEOUT);
    let mut small_pages = read(&paged);
    for source in &mut small_pages.sources {
        if let Some(fhir) = source.fhir_mut() {
            fhir.page_size = 3;
        }
    }
    let paged_broker = start_region_broker(&small_pages).await;
    let whole_broker = start_region_broker(&read(&whole)).await;
    let from_pages = lookup(&paged_broker, &patient.nhs_number, DEADLINE).await;
    let from_one = lookup(&whole_broker, &patient.nhs_number, DEADLINE).await;

    assert!(from_pages.complete && from_one.complete);
    assert!(
        from_pages.warnings.is_empty(),
        "no page limit was hit: {:?}",
        from_pages.warnings
    );
    for code in &patient.organisations {
        let pages = paged.stats(code).expect("stats").everything;
        assert!(
            pages > 1,
            "{code}: $everything was read over {pages} page(s)"
        );
        assert_eq!(whole.stats(code).expect("stats").everything, 1, "{code}");
    }
    let record = from_pages.record.expect("a record");
    assert!(
        entry_count(&record) > 3,
        "more entries than one page holds: {}",
        entry_count(&record)
    );
    assert_eq!(
        record_shape(&record),
        record_shape(&from_one.record.expect("a record")),
        "paging loses and duplicates nothing"
    );
    assert_eq!(
        record.patient.map(|p| p.birth_date),
        Some(patient.birth_date)
    );
}

#[tokio::test]
async fn organisations_that_disagree_on_demographics_raise_a_mismatch_warning() {
    let server = start_region(&small_region(SEED, 100)).await;
    let patient = server
        .region()
        .patients_with_conflicting_demographics()
        .next()
        .expect("the region has a patient whose demographics disagree");
    let conflict = patient.conflict.clone().expect("a conflict");
    let broker =
        start_region_broker(&region_config(&server, FhirMode::Search, SOURCE_TIMEOUT)).await;

    let response = lookup(&broker, &patient.nhs_number, DEADLINE).await;

    assert!(response.complete);
    let (label, truth, odd) = match conflict.field {
        carerecord_mock_sources::ConflictField::FamilyName => (
            "Family name",
            patient.family.to_uppercase(),
            conflict.value.to_uppercase(),
        ),
        carerecord_mock_sources::ConflictField::BirthDate => (
            "Date of birth",
            patient.birth_date.clone(),
            conflict.value.clone(),
        ),
    };
    let mismatches: Vec<_> = response
        .warnings
        .iter()
        .filter(|w| w.kind == WarningKind::DemographicsMismatch as i32)
        .collect();
    assert_eq!(
        mismatches.len(),
        1,
        "one mismatch warning: {:?}",
        response.warnings
    );
    let warning = mismatches[0];
    let odd_org = organisation(&server, &conflict.organisation);
    let gp = organisation(&server, &patient.gp);
    assert!(warning.message.starts_with(label), "{}", warning.message);
    assert!(
        warning
            .message
            .contains(&format!("{odd} ({})", odd_org.name)),
        "names the odd value and who holds it: {}",
        warning.message
    );
    assert!(
        warning.message.contains(&format!("{truth} (")) && warning.message.contains(&gp.name),
        "names the GP's value: {}",
        warning.message
    );
    let ids: BTreeSet<&str> = warning.source_ids.iter().map(String::as_str).collect();
    assert!(
        ids.contains(conflict.organisation.to_ascii_lowercase().as_str())
            && ids.contains(patient.gp.to_ascii_lowercase().as_str()),
        "names both sources: {ids:?}"
    );
}

struct FaultCase {
    fault: Fault,
    expected: SourceOutcome,
}

/// Each fault on one organisation that knows the patient: that source's outcome is the right
/// kind, everyone else is served, and the answer comes by the deadline. `slow_body` is TIMEOUT,
/// not ERROR: the server is answering correctly, just too slowly to finish within the source's
/// budget (64 bytes every 500 ms), so the honest report is that time ran out. `empty_bundle` is
/// a well-formed "no such patient here", so NOT_FOUND and the record is still complete.
#[tokio::test]
async fn each_fault_on_one_source_gives_its_outcome_while_the_others_are_served() {
    const FAULT_SOURCE_TIMEOUT: Duration = Duration::from_millis(300);
    const FAULT_DEADLINE: Duration = Duration::from_secs(2);
    let cases = [
        FaultCase {
            fault: Fault::Hang,
            expected: SourceOutcome::Timeout,
        },
        FaultCase {
            fault: Fault::Http500,
            expected: SourceOutcome::Error,
        },
        FaultCase {
            fault: Fault::MalformedJson,
            expected: SourceOutcome::Error,
        },
        FaultCase {
            fault: Fault::Reset,
            expected: SourceOutcome::Error,
        },
        FaultCase {
            fault: Fault::SlowBody,
            expected: SourceOutcome::Timeout,
        },
        FaultCase {
            fault: Fault::EmptyBundle,
            expected: SourceOutcome::NotFound,
        },
        FaultCase {
            fault: Fault::ErrorRate(1.0),
            expected: SourceOutcome::Error,
        },
    ];
    let server = start_region(&small_region(SEED, 100)).await;
    let patient = shared_patient(&server);
    // A trust, not the GP, so the record keeps its demographics whatever the fault.
    let faulty = patient.organisations[1].clone();
    let healthy = expected_outcomes(&server, Some(&patient));

    for case in cases {
        let fault = case.fault;
        // A broker per case: each case starts with a closed breaker.
        let broker = start_region_broker(&region_config(
            &server,
            FhirMode::Search,
            FAULT_SOURCE_TIMEOUT,
        ))
        .await;
        server
            .faults()
            .set_fault(&faulty, fault)
            .expect("known org");
        let asked_before = server.stats(&faulty).expect("stats").requests;

        let started = Instant::now();
        let response = lookup(&broker, &patient.nhs_number, FAULT_DEADLINE).await;
        let took = started.elapsed();

        assert!(
            took < FAULT_DEADLINE,
            "{fault}: answered by the deadline ({took:?})"
        );
        let mut expected = healthy.clone();
        expected.insert(faulty.clone(), case.expected);
        assert_eq!(outcomes(&response), expected, "{fault}");
        let status = status_of(&response, &faulty);
        if case.expected == SourceOutcome::Timeout {
            assert!(
                status.latency_ms >= 300,
                "{fault}: given its whole budget ({} ms)",
                status.latency_ms
            );
        }
        assert_eq!(
            response.complete,
            case.expected == SourceOutcome::NotFound,
            "{fault}: complete only if the faulty source still answered"
        );
        let incomplete = response.warnings.iter().any(|w| {
            w.kind == WarningKind::Incomplete as i32
                && w.source_ids.contains(&faulty.to_ascii_lowercase())
        });
        assert_eq!(incomplete, !response.complete, "{fault}: the gap is named");
        let contributors = contributing_orgs(&response);
        assert!(
            !contributors.contains(&faulty),
            "{fault}: no data from the faulty source"
        );
        let others: BTreeSet<String> = patient
            .organisations
            .iter()
            .filter(|o| **o != faulty)
            .cloned()
            .collect();
        assert_eq!(
            contributors, others,
            "{fault}: everyone else's data is there"
        );
        assert!(
            server.stats(&faulty).expect("stats").requests > asked_before,
            "{fault}: the faulty source was really asked"
        );

        server.faults().reset();
        let recovered = lookup(&broker, &patient.nhs_number, FAULT_DEADLINE).await;
        assert!(
            !recovered.from_cache && recovered.complete,
            "{fault}: the next fresh lookup after reset is complete"
        );
        assert_eq!(outcomes(&recovered), healthy, "{fault}: recovered");
    }
}

#[tokio::test]
async fn a_patient_nobody_knows_is_not_found_everywhere_and_complete() {
    let server = start_region(&small_region(SEED, 100)).await;
    let unknown = server.region().unknown_nhs_number();
    assert!(server.region().patient(&unknown).is_none());
    let broker =
        start_region_broker(&region_config(&server, FhirMode::Search, SOURCE_TIMEOUT)).await;

    let response = lookup(&broker, &unknown, DEADLINE).await;

    assert_eq!(outcomes(&response), expected_outcomes(&server, None));
    assert_eq!(response.sources.len(), server.organisations().len());
    assert!(
        response.complete,
        "not found everywhere is a complete answer"
    );
    let record = response.record.unwrap_or_default();
    assert!(record.patient.is_none(), "no demographics");
    assert_eq!(entry_count(&record), 0, "no entries");
    for org in server.organisations() {
        let stats = server.stats(&org.code).expect("stats");
        assert_eq!(
            (stats.requests, stats.patient_searches),
            (1, 1),
            "{}: asked once, by NHS number, and nothing else",
            org.code
        );
    }
}

/// What a streamed lookup delivered: each source event with its organisation, arrival time and
/// outcome, in arrival order, then the final merged response.
struct Streamed {
    arrivals: Vec<(String, Duration, SourceOutcome)>,
    last: GetCareRecordResponse,
}

async fn stream_lookup(
    broker: &TestBroker,
    request: tonic::Request<carerecord_proto::GetCareRecordRequest>,
) -> Streamed {
    let started = Instant::now();
    let mut stream = broker
        .client()
        .await
        .stream_care_record(request)
        .await
        .expect("the stream starts")
        .into_inner();
    let mut arrivals = Vec::new();
    let mut last = None;
    while let Some(event) = stream.message().await.expect("a well-formed stream") {
        assert!(last.is_none(), "nothing follows the final event");
        match event.event.expect("an event") {
            Event::Source(e) => {
                let status = e.status.expect("a status");
                let outcome = SourceOutcome::try_from(status.outcome).unwrap_or_default();
                arrivals.push((status.organisation_code, started.elapsed(), outcome));
            }
            Event::Complete(response) => last = Some(response),
        }
    }
    Streamed {
        arrivals,
        last: last.expect("the stream ends with the merged record"),
    }
}

const SLOW_MS: u64 = 400;

/// A region whose second organisation for the shared patient answers every request `SLOW_MS`
/// late, and a broker over it.
async fn region_with_a_slow_trust() -> (RegionServer, PatientSummary, String, TestBroker) {
    let server = start_region(&small_region(SEED, 100)).await;
    let patient = shared_patient(&server);
    let slow = patient.organisations[1].clone();
    server
        .faults()
        .set_latency(&slow, LatencyProfile::Fixed { ms: SLOW_MS })
        .expect("known org");
    let broker =
        start_region_broker(&region_config(&server, FhirMode::Search, SOURCE_TIMEOUT)).await;
    (server, patient, slow, broker)
}

/// The fast organisations' events are sent as they land, before the slow one's; the first
/// arrives well before the slow organisation could have answered.
fn assert_streamed_in_arrival_order(
    server: &RegionServer,
    patient: &PatientSummary,
    slow: &str,
    streamed: &Streamed,
) {
    let arrivals = &streamed.arrivals;
    let orgs: BTreeSet<&String> = arrivals.iter().map(|(o, _, _)| o).collect();
    assert_eq!(
        orgs.len(),
        server.organisations().len(),
        "an event per source"
    );
    assert_eq!(arrivals.len(), orgs.len(), "exactly one event per source");
    let (last_org, slow_at, slow_outcome) = arrivals.last().cloned().expect("events");
    assert_eq!(
        last_org, slow,
        "the slow organisation arrives after every fast one"
    );
    assert_eq!(slow_outcome, SourceOutcome::Ok);
    assert!(slow_at >= Duration::from_millis(SLOW_MS), "{slow_at:?}");
    let (_, first_at, _) = &arrivals[0];
    assert!(
        *first_at < Duration::from_millis(SLOW_MS),
        "fast answers are sent as they land, not held for the slow one (first event at {first_at:?}, slow one at {slow_at:?})"
    );
    let streamed: BTreeMap<String, SourceOutcome> = arrivals
        .iter()
        .map(|(o, _, outcome)| (o.clone(), *outcome))
        .collect();
    assert_eq!(streamed, expected_outcomes(server, Some(patient)));
}

/// The requester is a clinician of the patient's GP practice: the GP's own (fast) answer
/// establishes the relationship, so events flow from then on.
#[tokio::test]
async fn streaming_sends_fast_organisations_before_a_slow_one_then_the_merged_record() {
    let (server, patient, slow, broker) = region_with_a_slow_trust().await;
    let requester = clinician_of(&patient.gp);

    let streamed = stream_lookup(
        &broker,
        fresh_request_as(&patient.nhs_number, DEADLINE, requester.clone()),
    )
    .await;

    assert_streamed_in_arrival_order(&server, &patient, &slow, &streamed);
    let last = streamed.last;
    assert!(last.complete);
    assert_eq!(outcomes(&last), expected_outcomes(&server, Some(&patient)));
    assert!(
        contributing_orgs(&last).contains(&slow),
        "the merged record includes the slow organisation's data"
    );
    let direct = broker
        .client()
        .await
        .get_care_record(fresh_request_as(&patient.nhs_number, DEADLINE, requester))
        .await
        .expect("the lookup answers")
        .into_inner();
    assert_eq!(
        record_shape(&last.record.expect("a record")),
        record_shape(&direct.record.expect("a record")),
        "the streamed record is the unary one"
    );
}

/// Same as above, but the relationship is asserted by a plaintext (unverified) caller, which
/// this broker's `[access] trust_unverified_assertions = true` trusts: the assertion is accepted
/// for the final record (`Policy::relationship`), so events should be released at once too.
#[tokio::test]
async fn streaming_releases_events_at_once_to_a_trusted_unverified_assertion() {
    let (server, patient, slow, broker) = region_with_a_slow_trust().await;
    // clinician(): asserts a relationship; from an organisation outside the region, so no
    // source answer can establish one.
    let streamed = stream_lookup(&broker, fresh_request(&patient.nhs_number, DEADLINE)).await;

    assert!(
        streamed.last.complete,
        "the assertion is accepted for the record"
    );
    assert_streamed_in_arrival_order(&server, &patient, &slow, &streamed);
}

/// mock-sources keeps no request headers, so the GP is put behind a recording proxy: what it
/// captured is what the organisation's server received.
#[tokio::test]
async fn the_requester_is_sent_to_every_fhir_request() {
    let server = start_region(&small_region(SEED, 100)).await;
    let patient = shared_patient(&server);
    let gp = organisation(&server, &patient.gp);
    let proxy = RecordingProxy::start(gp.addr, None).await;
    let mut config = region_config(&server, FhirMode::Search, SOURCE_TIMEOUT);
    let source = config
        .sources
        .iter_mut()
        .find(|s| s.organisation_code == gp.code)
        .expect("the GP is configured");
    source.fhir_mut().expect("a FHIR source").base_url = format!("http://{}/fhir", proxy.addr);
    let broker = start_region_broker(&config).await;

    let mut request = fresh_request(&patient.nhs_number, DEADLINE);
    let requester = request.get_mut().requester.as_mut().expect("a requester");
    requester.purpose = Purpose::DirectCare as i32;
    let requester = requester.clone();
    let response = broker
        .client()
        .await
        .get_care_record(request)
        .await
        .expect("the lookup answers")
        .into_inner();
    assert_eq!(
        status_of(&response, &gp.code).outcome,
        SourceOutcome::Ok as i32
    );
    assert!(response.complete);

    let seen = proxy.requests();
    let expected = server.stats(&gp.code).expect("stats").requests;
    assert_eq!(
        seen.len() as u64,
        expected,
        "the proxy saw every request: {seen:?}"
    );
    assert!(seen.len() > 1, "patient search and clinical searches");
    for r in &seen {
        assert!(r.line.starts_with("GET /fhir/"), "{}", r.line);
        assert_eq!(
            r.header("x-carerecord-user"),
            Some(requester.user_id.as_str()),
            "{}",
            r.line
        );
        assert_eq!(
            r.header("x-carerecord-role"),
            Some(requester.role_code.as_str()),
            "{}",
            r.line
        );
        assert_eq!(
            r.header("x-carerecord-organisation"),
            Some(requester.organisation_code.as_str()),
            "{}",
            r.line
        );
        assert_eq!(
            r.header("x-carerecord-purpose"),
            Some("direct-care"),
            "{}",
            r.line
        );
        assert_eq!(
            r.header("x-request-id"),
            Some(response.request_id.as_str()),
            "{}: the broker's request id, for tracing across systems",
            r.line
        );
    }
}

/// mock-sources serves plain HTTP, so the GP is put behind a TLS-terminating proxy with a
/// certificate from a test CA: the adapter must trust exactly the configured CA.
#[tokio::test]
async fn a_source_behind_https_with_a_private_ca_is_read_and_an_untrusted_one_is_an_error() {
    let server = start_region(&small_region(SEED, 100)).await;
    let patient = shared_patient(&server);
    let gp = organisation(&server, &patient.gp);
    let ca = TestCa::new("carerecord region test CA");
    let proxy = RecordingProxy::start(gp.addr, Some(tls_acceptor(&ca.server()))).await;
    let write_ca = |pem: String| {
        let path = temp_path("region-ca.pem");
        std::fs::write(&path, pem).expect("write CA");
        path
    };
    let over_https = |ca_file| {
        let mut config = region_config(&server, FhirMode::Search, SOURCE_TIMEOUT);
        let source = config
            .sources
            .iter_mut()
            .find(|s| s.organisation_code == gp.code)
            .expect("the GP is configured");
        let fhir = source.fhir_mut().expect("a FHIR source");
        fhir.base_url = format!("https://localhost:{}/fhir", proxy.addr.port());
        fhir.ca_cert = Some(ca_file);
        config
    };

    let trusted = start_region_broker(&over_https(write_ca(ca.cert_pem()))).await;
    let response = lookup(&trusted, &patient.nhs_number, DEADLINE).await;
    assert_eq!(
        outcomes(&response),
        expected_outcomes(&server, Some(&patient))
    );
    assert!(response.complete);
    assert!(contributing_orgs(&response).contains(&gp.code));
    assert!(
        proxy.requests().len() > 1,
        "the GP was read through the TLS proxy"
    );
    let plain =
        start_region_broker(&region_config(&server, FhirMode::Search, SOURCE_TIMEOUT)).await;
    assert_eq!(
        record_shape(&response.record.expect("a record")),
        record_shape(
            &lookup(&plain, &patient.nhs_number, DEADLINE)
                .await
                .record
                .expect("a record")
        ),
        "the same record over HTTPS as over HTTP"
    );

    let before = proxy.requests().len();
    let stranger = TestCa::new("some other CA");
    let untrusting = start_region_broker(&over_https(write_ca(stranger.cert_pem()))).await;
    let refused = lookup(&untrusting, &patient.nhs_number, DEADLINE).await;
    let status = status_of(&refused, &gp.code);
    assert_eq!(
        status.outcome,
        SourceOutcome::Error as i32,
        "a certificate from another CA is not trusted: {}",
        status.message
    );
    assert!(!refused.complete);
    assert_eq!(
        proxy.requests().len(),
        before,
        "no request crossed the failed handshake"
    );
    let mut others = expected_outcomes(&server, Some(&patient));
    others.insert(gp.code.clone(), SourceOutcome::Error);
    assert_eq!(outcomes(&refused), others, "everyone else is still served");
}
