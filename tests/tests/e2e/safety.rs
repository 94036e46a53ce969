//! Clinical safety of the merged record, end to end: real gRPC to a real broker that speaks
//! real HTTP to mock-sources organisations on loopback, with the clinical-safety faults
//! (`wrong_patient`, `wrong_patient_refs`, `ignore_include`) and the conflict data mode switched
//! at runtime. Each test pins one control of the hazard log (`SAFETY.md`).
//!
//! Expectations come from the region's own index (who knows whom, who disagrees about what) or
//! from the same broker's answer with the fault switched off, never from the faulted answer
//! itself, so each assertion could fail. Regions are small, served with no added latency, and
//! the slow cases use short source timeouts; nothing asserts on timing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::Source;
use carerecord_adapters::memory::InMemorySource;
use carerecord_broker::access::AccessConfig;
use carerecord_broker::cli::lookup::{LookupArgs, lookup_text};
use carerecord_broker::config::Config;
use carerecord_e2e::region::*;
use carerecord_e2e::{Settings, TestBroker, clinician, remote_broker, start_broker};
use carerecord_mock_sources::{
    ClinicalConflict, ClinicalConflictKind, DataMode, Fault, FhirMode, PatientSummary,
    RegionServer, RegionSpec,
};
use carerecord_mock_sources::{NhsNumber, codes};
use carerecord_proto::care_record_event::Event;
use carerecord_proto::{
    CacheDirective, CareRecord, Coding, Entry, GetCareRecordRequest, GetCareRecordResponse,
    Requester, Section, SectionState, SourceOutcome, SourceSectionState, SourceStatus,
    VerificationStatus, Warning, WarningKind, entry,
};

/// The caller's deadline for ordinary lookups: generous, since nothing here is slow.
const DEADLINE: Duration = Duration::from_secs(3);
/// Per-source timeout for ordinary lookups.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(2);
/// Per-source timeout where an organisation is made to hang: short, to keep tests quick.
const HANG_TIMEOUT: Duration = Duration::from_millis(300);
const SEED: u64 = 7;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A region with enough patients for every kind of clinical conflict.
fn conflict_region() -> RegionSpec {
    RegionSpec {
        seed: 42,
        patients: 600,
        organisations: 10,
        page_size: 100,
    }
}

async fn lookup(
    broker: &TestBroker,
    patient: &NhsNumber,
    deadline: Duration,
) -> GetCareRecordResponse {
    lookup_as(broker, patient, deadline, clinician()).await
}

async fn lookup_as(
    broker: &TestBroker,
    patient: &NhsNumber,
    deadline: Duration,
    requester: Requester,
) -> GetCareRecordResponse {
    broker
        .client()
        .await
        .get_care_record(fresh_request_as(patient, deadline, requester))
        .await
        .expect("the lookup answers")
        .into_inner()
}

async fn region_broker(server: &RegionServer, mode: FhirMode) -> TestBroker {
    start_region_broker(&region_config(server, mode, SOURCE_TIMEOUT)).await
}

fn status_of<'a>(response: &'a GetCareRecordResponse, org: &str) -> &'a SourceStatus {
    response
        .sources
        .iter()
        .find(|s| s.organisation_code == org)
        .unwrap_or_else(|| panic!("no status for {org}"))
}

fn outcome_of(response: &GetCareRecordResponse, org: &str) -> SourceOutcome {
    SourceOutcome::try_from(status_of(response, org).outcome).unwrap_or_default()
}

/// The response's warnings of one kind.
fn warnings(response: &GetCareRecordResponse, kind: WarningKind) -> Vec<&Warning> {
    response
        .warnings
        .iter()
        .filter(|w| w.kind == kind as i32)
        .collect()
}

/// Whether a warning names the source of organisation `org` (mock-sources' source ids are
/// the lower-cased organisation codes).
fn names(w: &Warning, org: &str) -> bool {
    w.source_ids.contains(&org.to_ascii_lowercase())
}

/// The source's own ids of the entries organisation `org` contributed, section by section.
fn entry_ids_from(record: &CareRecord, org: &str) -> BTreeSet<(String, String)> {
    let mut ids = BTreeSet::new();
    for section in Section::ALL {
        for e in record.section(section) {
            for p in e.provenance.iter().filter(|p| p.organisation_code == org) {
                ids.insert((section.short_name().to_owned(), p.source_entry_id.clone()));
            }
        }
    }
    ids
}

/// The sections in which organisation `org` contributed entries.
fn sections_from(record: &CareRecord, org: &str) -> BTreeSet<Section> {
    Section::ALL
        .into_iter()
        .filter(|&s| {
            record
                .section(s)
                .iter()
                .any(|e| provenance_orgs(&e.provenance).contains(org))
        })
        .collect()
}

/// One organisation's line in one section's status.
fn section_line(
    response: &GetCareRecordResponse,
    section: Section,
    org: &str,
) -> (SourceSectionState, String) {
    let status = response
        .section_statuses
        .iter()
        .find(|s| s.section == section as i32)
        .unwrap_or_else(|| panic!("no status for {section:?}"));
    let line = status
        .sources
        .iter()
        .find(|l| l.organisation_code == org)
        .unwrap_or_else(|| panic!("no {org} line for {section:?}: {status:?}"));
    (
        SourceSectionState::try_from(line.state).unwrap_or_default(),
        line.reason.clone(),
    )
}

fn section_state(response: &GetCareRecordResponse, section: Section) -> SectionState {
    response
        .section_statuses
        .iter()
        .find(|s| s.section == section as i32)
        .and_then(|s| SectionState::try_from(s.state).ok())
        .unwrap_or_default()
}

/// Whether an entry is about `code` (its concept or any of its codings).
fn is_about(e: &Entry, code: &str) -> bool {
    e.concept.as_ref().is_some_and(|c| c.code == code) || e.codings.iter().any(|c| c.code == code)
}

/// A record with every configuration-ordered list (provenance, conflict values, the patient's
/// provenance) sorted by content, so records from brokers configured in different orders
/// compare equal exactly when they say the same thing.
fn normalised(record: &CareRecord) -> CareRecord {
    let mut r = record.clone();
    let key = |p: &carerecord_proto::Provenance| {
        (
            p.organisation_code.clone(),
            p.source_entry_id.clone(),
            p.kind.clone(),
        )
    };
    if let Some(p) = r.patient.as_mut() {
        p.provenance.sort_by_key(key);
    }
    for section in Section::ALL {
        for e in r.section_mut(section).into_iter().flatten() {
            e.provenance.sort_by_key(key);
            for c in &mut e.conflicts {
                c.values.sort_by(|a, b| {
                    (&a.organisation_code, &a.value).cmp(&(&b.organisation_code, &b.value))
                });
            }
            e.conflicts.sort_by(|a, b| a.field.cmp(&b.field));
            e.security_labels
                .sort_by(|a, b| (&a.system, &a.code).cmp(&(&b.system, &b.code)));
            // Document ids are each broker's own (keyed by a per-process secret).
            if let Some(entry::Detail::Document(d)) = e.detail.as_mut()
                && d.url.starts_with("Binary/")
            {
                d.url = "Binary/{id}".into();
            }
        }
    }
    r
}

/// A patient of `server`'s region whose GP and another organisation disagree in the way
/// `kind` describes, with agreeing demographics.
fn conflict_patient(
    server: &RegionServer,
    kind: ClinicalConflictKind,
) -> (PatientSummary, ClinicalConflict) {
    server
        .region()
        .patients_with_clinical_conflicts()
        .filter(|p| p.conflict.is_none())
        .find_map(|p| {
            let c = p.clinical_conflict.clone()?;
            (c.kind == kind).then_some((p, c))
        })
        .unwrap_or_else(|| panic!("the region has a {kind:?} conflict"))
}

/// The day an assertion was made, as merge rule 3 reads it: recorded, else last updated,
/// else effective.
fn asserted_on(p: &carerecord_proto::Provenance) -> String {
    [&p.recorded, &p.last_updated, &p.effective]
        .into_iter()
        .find(|d| !d.is_empty())
        .map(|d| d.chars().take(10).collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// H1, H7: another patient's data

/// `wrong_patient` on a trust: every resource it returns about the patient is someone else's.
/// In both query modes nothing it sent reaches the record, a WRONG_PATIENT warning names it,
/// the record is not complete, and every other organisation is still served. With
/// `$everything` (whose Patient entry is the other person) the outcome itself is WRONG_PATIENT
/// and the demographics are not taken from it.
#[tokio::test]
async fn a_source_answering_about_another_patient_contributes_nothing_and_is_named() {
    let server = start_region(&small_region(SEED, 100)).await;
    let patient = shared_patient(&server);
    let faulty = patient.organisations[1].clone();
    let others: BTreeSet<String> = patient
        .organisations
        .iter()
        .filter(|o| **o != faulty)
        .cloned()
        .collect();

    for mode in [FhirMode::Search, FhirMode::Everything] {
        server.faults().reset();
        let broker = region_broker(&server, mode).await;
        let healthy = lookup(&broker, &patient.nhs_number, DEADLINE).await;
        assert!(
            contributing_orgs(&healthy).contains(&faulty),
            "{mode:?}: without the fault, {faulty} contributes"
        );

        server
            .faults()
            .set_fault(&faulty, Fault::WrongPatient)
            .expect("known org");
        let response = lookup(&broker, &patient.nhs_number, DEADLINE).await;

        let record = response.record.clone().unwrap_or_default();
        assert!(
            entry_ids_from(&record, &faulty).is_empty(),
            "{mode:?}: no entry's provenance names {faulty}"
        );
        assert!(
            warnings(&response, WarningKind::WrongPatient)
                .iter()
                .any(|w| names(w, &faulty)),
            "{mode:?}: a WRONG_PATIENT warning names {faulty}: {:?}",
            response.warnings
        );
        assert!(!response.complete, "{mode:?}: not complete");
        assert_eq!(
            contributing_orgs(&response)
                .into_iter()
                .filter(|o| *o != faulty)
                .collect::<BTreeSet<_>>(),
            others,
            "{mode:?}: everyone else's data is served"
        );
        let demographics = record.patient.clone().expect("demographics");
        assert_eq!(demographics.nhs_number, patient.nhs_number.as_digits());
        assert!(
            demographics
                .family_name
                .eq_ignore_ascii_case(&patient.family),
            "{mode:?}: the right person's name"
        );
        assert_eq!(demographics.birth_date, patient.birth_date, "{mode:?}");
        if mode == FhirMode::Everything {
            assert_eq!(
                outcome_of(&response, &faulty),
                SourceOutcome::WrongPatient,
                "$everything's Patient is another person"
            );
            assert!(
                !provenance_orgs(&demographics.provenance).contains(&faulty),
                "demographics are not taken from {faulty}"
            );
        }
    }
}

/// `wrong_patient` in search mode: the organisation's Patient search finds the right patient,
/// but every clinical search answers about someone else. Its section lines must not say
/// "none recorded" for sections where it really holds entries for this patient: nothing is
/// known from it.
#[tokio::test]
async fn sections_whose_resources_were_all_about_another_patient_are_not_none_recorded() {
    let server = start_region(&small_region(SEED, 100)).await;
    let patient = shared_patient(&server);
    let faulty = patient.organisations[1].clone();
    let broker = region_broker(&server, FhirMode::Search).await;
    let healthy = lookup(&broker, &patient.nhs_number, DEADLINE).await;
    let held = sections_from(&healthy.record.clone().unwrap_or_default(), &faulty);
    assert!(!held.is_empty(), "{faulty} holds entries for the patient");

    server
        .faults()
        .set_fault(&faulty, Fault::WrongPatient)
        .expect("known org");
    let response = lookup(&broker, &patient.nhs_number, DEADLINE).await;

    for section in held {
        let (state, reason) = section_line(&response, section, &faulty);
        assert!(
            state == SourceSectionState::Unknown || state == SourceSectionState::Incomplete,
            "{section:?}: {faulty} sent another patient's entries; its line is {state:?} ({reason})"
        );
        assert_ne!(
            section_state(&response, section),
            SectionState::Recorded,
            "{section:?}: the section is not known in full"
        );
    }
}

/// `wrong_patient_refs`: the right record with another person's resources mixed in. The
/// organisation's own entries for the patient are kept (the same ones it serves with the fault
/// off), the other person's are not, a WRONG_PATIENT warning names it, and the record is not
/// complete.
#[tokio::test]
async fn misfiled_resources_are_discarded_and_the_patients_own_entries_kept() {
    let server = start_region(&small_region(SEED, 100)).await;
    let patient = shared_patient(&server);
    let faulty = patient.gp.clone();
    let other = server
        .region()
        .wrong_patient_at(&patient.nhs_number, &faulty)
        .expect("someone else at the GP");
    let broker = region_broker(&server, FhirMode::Search).await;
    let own = entry_ids_from(
        &lookup(&broker, &patient.nhs_number, DEADLINE)
            .await
            .record
            .expect("a record"),
        &faulty,
    );
    let theirs = entry_ids_from(
        &lookup(&broker, &other.nhs_number, DEADLINE)
            .await
            .record
            .expect("a record"),
        &faulty,
    );
    assert!(!own.is_empty() && !theirs.is_empty());

    server
        .faults()
        .set_fault(&faulty, Fault::WrongPatientRefs)
        .expect("known org");
    let response = lookup(&broker, &patient.nhs_number, DEADLINE).await;

    let kept = entry_ids_from(&response.record.clone().expect("a record"), &faulty);
    assert_eq!(kept, own, "exactly the patient's own entries from {faulty}");
    assert!(
        kept.is_disjoint(&theirs),
        "none of the other person's entries"
    );
    assert!(
        warnings(&response, WarningKind::WrongPatient)
            .iter()
            .any(|w| names(w, &faulty)),
        "{:?}",
        response.warnings
    );
    assert!(!response.complete);
    let demographics = response
        .record
        .expect("a record")
        .patient
        .expect("demographics");
    assert_eq!(demographics.nhs_number, patient.nhs_number.as_digits());
    assert_eq!(demographics.birth_date, patient.birth_date);
}

/// Streaming: the wrong-patient organisation's event says WRONG_PATIENT and carries nothing of
/// the other person: no entries, no demographics.
#[tokio::test]
async fn a_streamed_wrong_patient_event_carries_nothing_of_the_other_person() {
    let server = start_region(&small_region(SEED, 100)).await;
    let patient = shared_patient(&server);
    let faulty = patient.organisations[1].clone();
    let other = server
        .region()
        .wrong_patient_at(&patient.nhs_number, &faulty)
        .expect("someone else there");
    let broker = region_broker(&server, FhirMode::Everything).await;
    server
        .faults()
        .set_fault(&faulty, Fault::WrongPatient)
        .expect("known org");

    let mut stream = broker
        .client()
        .await
        .stream_care_record(fresh_request(&patient.nhs_number, DEADLINE))
        .await
        .expect("the stream starts")
        .into_inner();
    let mut events = BTreeMap::new();
    let mut last = None;
    while let Some(event) = stream.message().await.expect("a well-formed stream") {
        match event.event.expect("an event") {
            Event::Source(e) => {
                let status = e.status.clone().expect("a status");
                events.insert(status.organisation_code.clone(), e);
            }
            Event::Complete(r) => last = Some(r),
        }
    }
    let last = last.expect("the final event");

    let event = events.get(&faulty).expect("an event for the faulty org");
    let status = event.status.as_ref().expect("a status");
    assert_eq!(status.outcome, SourceOutcome::WrongPatient as i32);
    let contribution = event.contribution.clone().unwrap_or_default();
    assert_eq!(entry_count(&contribution), 0, "no entries from {faulty}");
    assert!(
        contribution
            .patient
            .as_ref()
            .is_none_or(|p| p.nhs_number != other.nhs_number.as_digits()
                && p.birth_date != other.birth_date),
        "not the other person's demographics: {:?}",
        contribution.patient
    );
    for (org, e) in &events {
        if *org != faulty {
            let nhs = e
                .contribution
                .as_ref()
                .and_then(|c| c.patient.as_ref())
                .map(|p| p.nhs_number.clone());
            assert!(
                nhs.as_ref()
                    .is_none_or(|n| *n == patient.nhs_number.as_digits()),
                "{org}: {nhs:?}"
            );
        }
    }
    assert!(!last.complete);
    assert!(
        warnings(&last, WarningKind::WrongPatient)
            .iter()
            .any(|w| names(w, &faulty))
    );
}

// ---------------------------------------------------------------------------------------------
// H5: entries silently dropped

/// A GP whose server ignores `_include` and names every drug by `Medication/{id}`: every
/// medicine is still there, named, via the follow-up read, and the record is complete.
#[tokio::test]
async fn medicines_named_by_reference_survive_a_server_that_ignores_include() {
    let server = start_region(&small_region(SEED, 100)).await;
    for mode in [FhirMode::Search, FhirMode::Everything] {
        server.faults().reset();
        let broker = region_broker(&server, mode).await;
        // A patient whose GP prescribes (MedicationRequests, which the fault turns into
        // references).
        let mut found = None;
        for p in server.region().patients().take(40) {
            let r = lookup(&broker, &p.nhs_number, DEADLINE).await;
            let prescribed = r.record.as_ref().is_some_and(|rec| {
                rec.medications.iter().any(|e| {
                    e.provenance.iter().any(|pr| {
                        pr.organisation_code == p.gp
                            && (pr.kind == "authorisation" || pr.kind == "issue")
                    })
                })
            });
            if prescribed {
                found = Some((p, r));
                break;
            }
        }
        let (patient, healthy) = found.expect("a patient with prescriptions at their GP");
        let medicines = |r: &GetCareRecordResponse| -> BTreeMap<String, String> {
            r.record
                .as_ref()
                .map(|rec| {
                    rec.medications
                        .iter()
                        .map(|e| {
                            let c = e.concept.clone().unwrap_or_default();
                            (c.code, c.display)
                        })
                        .collect()
                })
                .unwrap_or_default()
        };

        server
            .faults()
            .set_fault(&patient.gp, Fault::IgnoreInclude)
            .expect("known org");
        let reads_before = server.stats(&patient.gp).expect("stats").reads;
        let response = lookup(&broker, &patient.nhs_number, DEADLINE).await;

        assert!(
            server.stats(&patient.gp).expect("stats").reads > reads_before,
            "{mode:?}: the drugs were read by id"
        );
        let record = response.record.clone().expect("a record");
        assert_eq!(
            medicines(&response),
            medicines(&healthy),
            "{mode:?}: the same medicines, with the same names"
        );
        assert_eq!(
            record.medications.len(),
            healthy.record.as_ref().expect("a record").medications.len()
        );
        assert!(
            record
                .medications
                .iter()
                .all(|e| !e.incomplete && !e.summary.is_empty()),
            "{mode:?}: every medicine is named"
        );
        assert_eq!(outcome_of(&response, &patient.gp), SourceOutcome::Ok);
        assert!(response.complete, "{mode:?}: {:?}", response.warnings);
    }
}

/// A source configured with a tiny page limit whose answer runs past it: PARTIAL, a
/// DATA_CUT_SHORT warning naming it, its section lines INCOMPLETE, and the record not complete.
#[tokio::test]
async fn a_record_cut_at_the_page_limit_is_partial_and_never_complete() {
    let server = start_region(&small_region(SEED, 3)).await;
    let patient = shared_patient(&server);
    let cut = patient.gp.clone();
    let mut config = region_config(&server, FhirMode::Everything, SOURCE_TIMEOUT);
    let fhir = config
        .sources
        .iter_mut()
        .find(|s| s.organisation_code == cut)
        .and_then(|s| s.fhir_mut())
        .expect("the GP is a FHIR source");
    fhir.page_size = 3;
    fhir.page_limit = 1;
    let broker = start_region_broker(&config).await;

    let response = lookup(&broker, &patient.nhs_number, DEADLINE).await;

    assert_eq!(outcome_of(&response, &cut), SourceOutcome::Partial);
    assert!(
        warnings(&response, WarningKind::DataCutShort)
            .iter()
            .any(|w| names(w, &cut)),
        "{:?}",
        response.warnings
    );
    assert!(!response.complete);
    assert!(
        Section::ALL
            .iter()
            .any(|&s| section_line(&response, s, &cut).0 == SourceSectionState::Incomplete),
        "the cut sections say so: {:?}",
        response.section_statuses
    );
    assert!(
        !contributing_orgs(&response).is_empty(),
        "what was read is still shown"
    );
}

// ---------------------------------------------------------------------------------------------
// H2, H3, H8: disagreements, verification status, medicines

/// Two brokers over the same region, the second with its sources in reverse order.
async fn brokers_in_both_orders(server: &RegionServer) -> (TestBroker, TestBroker) {
    let config = region_config(server, FhirMode::Search, SOURCE_TIMEOUT);
    let mut reversed: Config = region_config(server, FhirMode::Search, SOURCE_TIMEOUT);
    reversed.sources.reverse();
    assert_ne!(
        config.sources.first().map(|s| &s.id),
        reversed.sources.first().map(|s| &s.id)
    );
    (
        start_region_broker(&config).await,
        start_region_broker(&reversed).await,
    )
}

/// An allergy active at the GP and resolved elsewhere: one entry carrying a status conflict
/// with both organisations' values, a CONFLICT warning, a headline that follows merge rule 3
/// (most recent assertion; on a tie, active), and the same record whichever way round the
/// sources are configured.
#[tokio::test]
async fn an_allergy_active_at_one_organisation_and_resolved_at_another_is_a_conflict_in_any_order()
{
    let server = start_region(&conflict_region()).await;
    let (patient, conflict) = conflict_patient(&server, ClinicalConflictKind::AllergyResolved);
    server.faults().set_data_mode_all(DataMode::Conflicts);
    let (forward, backward) = brokers_in_both_orders(&server).await;

    let response = lookup(&forward, &patient.nhs_number, DEADLINE).await;
    let reversed = lookup(&backward, &patient.nhs_number, DEADLINE).await;

    let record = response.record.clone().expect("a record");
    let allergies: Vec<&Entry> = record
        .allergies
        .iter()
        .filter(|e| is_about(e, &conflict.code) && !e.asserts_absence)
        .collect();
    assert_eq!(allergies.len(), 1, "one entry: {allergies:?}");
    let allergy = allergies[0];
    let orgs = provenance_orgs(&allergy.provenance);
    assert!(orgs.contains(&conflict.gp) && orgs.contains(&conflict.organisation));
    let status = allergy
        .conflicts
        .iter()
        .find(|c| c.field == "status")
        .expect("a status conflict");
    let said: BTreeMap<&str, &str> = status
        .values
        .iter()
        .map(|v| (v.organisation_code.as_str(), v.value.as_str()))
        .collect();
    assert_eq!(said.get(conflict.gp.as_str()), Some(&"active"));
    assert_eq!(said.get(conflict.organisation.as_str()), Some(&"resolved"));
    assert!(!status.resolution.is_empty(), "the rule is stated");
    let warned = warnings(&response, WarningKind::Conflict);
    assert!(
        warned
            .iter()
            .any(|w| names(w, &conflict.gp) && names(w, &conflict.organisation)),
        "a CONFLICT warning names both: {warned:?}"
    );

    // Rule 3: the most recent assertion; on a tie, the more cautious (active).
    let latest = allergy
        .provenance
        .iter()
        .map(asserted_on)
        .max()
        .expect("provenance");
    let latest_says: BTreeSet<&str> = allergy
        .provenance
        .iter()
        .filter(|p| asserted_on(p) == latest)
        .map(|p| p.status.as_str())
        .collect();
    let expected = if latest_says.contains("active") {
        "active"
    } else {
        latest_says.iter().next().copied().unwrap_or_default()
    };
    assert_eq!(allergy.status, expected, "headline per rule 3: {allergy:?}");

    assert_eq!(
        normalised(&record),
        normalised(&reversed.record.clone().expect("a record")),
        "configuration order changes nothing the clinician sees"
    );
    let conflict_sources = |r: &GetCareRecordResponse| -> BTreeSet<BTreeSet<String>> {
        warnings(r, WarningKind::Conflict)
            .iter()
            .map(|w| w.source_ids.iter().cloned().collect())
            .collect()
    };
    assert_eq!(conflict_sources(&response), conflict_sources(&reversed));
}

/// The GP asserts "no known allergy" while another organisation reports an active allergy:
/// the assertion is its own entry with `asserts_absence`, never an allergy; it carries an
/// "assertion" conflict naming both, and a CONFLICT warning is raised.
#[tokio::test]
async fn no_known_allergy_against_an_active_allergy_is_flagged_as_a_contradicted_assertion() {
    let server = start_region(&conflict_region()).await;
    let (patient, conflict) = conflict_patient(&server, ClinicalConflictKind::NoKnownAllergy);
    server.faults().set_data_mode_all(DataMode::Conflicts);
    let broker = region_broker(&server, FhirMode::Search).await;

    let response = lookup(&broker, &patient.nhs_number, DEADLINE).await;

    let record = response.record.clone().expect("a record");
    let nka: Vec<&Entry> = record
        .allergies
        .iter()
        .filter(|e| is_about(e, codes::NO_KNOWN_ALLERGY.code))
        .collect();
    assert_eq!(nka.len(), 1, "{:?}", record.allergies);
    let nka = nka[0];
    assert!(nka.asserts_absence, "an assertion, not an allergy");
    assert!(provenance_orgs(&nka.provenance).contains(&conflict.gp));
    let assertion = nka
        .conflicts
        .iter()
        .find(|c| c.field == "assertion")
        .expect("an assertion conflict");
    let who: BTreeSet<&str> = assertion
        .values
        .iter()
        .map(|v| v.organisation_code.as_str())
        .collect();
    assert!(
        who.contains(conflict.gp.as_str()) && who.contains(conflict.organisation.as_str()),
        "{assertion:?}"
    );
    let allergy = record
        .allergies
        .iter()
        .find(|e| is_about(e, &conflict.code))
        .expect("the active allergy is shown too");
    assert!(!allergy.asserts_absence);
    assert!(provenance_orgs(&allergy.provenance).contains(&conflict.organisation));
    assert!(
        warnings(&response, WarningKind::Conflict)
            .iter()
            .any(|w| names(w, &conflict.gp) && names(w, &conflict.organisation)),
        "{:?}",
        response.warnings
    );
}

/// A medicine active at the GP and stopped elsewhere: one medicine entry, a status conflict,
/// every organisation's rows kept in provenance, and the same in either configuration order.
#[tokio::test]
async fn a_medicine_stopped_at_one_organisation_is_one_grouped_entry_with_a_conflict() {
    let server = start_region(&conflict_region()).await;
    let (patient, conflict) = conflict_patient(&server, ClinicalConflictKind::MedicineStopped);
    server.faults().set_data_mode_all(DataMode::Conflicts);
    let (forward, backward) = brokers_in_both_orders(&server).await;

    let response = lookup(&forward, &patient.nhs_number, DEADLINE).await;
    let reversed = lookup(&backward, &patient.nhs_number, DEADLINE).await;

    let record = response.record.clone().expect("a record");
    let medicines: Vec<&Entry> = record
        .medications
        .iter()
        .filter(|e| is_about(e, &conflict.code))
        .collect();
    assert_eq!(medicines.len(), 1, "one medicine: {medicines:?}");
    let medicine = medicines[0];
    let orgs = provenance_orgs(&medicine.provenance);
    assert!(
        orgs.contains(&conflict.gp) && orgs.contains(&conflict.organisation),
        "{orgs:?}"
    );
    let Some(entry::Detail::Medication(detail)) = &medicine.detail else {
        panic!("a medication detail: {medicine:?}");
    };
    assert_eq!(
        detail.rows as usize,
        medicine.provenance.len(),
        "every row is a provenance"
    );
    let status = medicine
        .conflicts
        .iter()
        .find(|c| c.field == "status")
        .expect("a status conflict");
    let values: BTreeSet<&str> = status.values.iter().map(|v| v.value.as_str()).collect();
    assert!(
        values.contains("active") && values.contains("stopped"),
        "{status:?}"
    );
    assert!(
        warnings(&response, WarningKind::Conflict)
            .iter()
            .any(|w| names(w, &conflict.organisation))
    );
    assert_eq!(
        normalised(&record),
        normalised(&reversed.record.clone().expect("a record")),
        "configuration order changes nothing the clinician sees"
    );
}

/// Refuted and entered-in-error findings are never shown as current: wherever the region's
/// data carries them, the merged entry is not "active" and keeps its verification status.
#[tokio::test]
async fn refuted_findings_are_never_shown_as_current() {
    let server = start_region(&small_region(SEED, 100)).await;
    let broker = region_broker(&server, FhirMode::Search).await;
    let mut refuted = 0;
    for p in server.region().patients().take(60) {
        let r = lookup(&broker, &p.nhs_number, DEADLINE).await;
        let record = r.record.unwrap_or_default();
        for e in record.conditions.iter().chain(&record.allergies) {
            if e.verification_status == VerificationStatus::Refuted as i32 {
                refuted += 1;
                assert_eq!(e.status, "refuted", "{e:?}");
            }
            assert_ne!(
                e.verification_status,
                VerificationStatus::EnteredInError as i32,
                "an entry only entered-in-error supports is removed: {e:?}"
            );
        }
    }
    assert!(refuted > 0, "the region has refuted findings");
}

// ---------------------------------------------------------------------------------------------
// H4, H12: empty vs unknown, a source missing

/// One organisation timing out: every one of the eight sections has a status, the timed-out
/// organisation is UNKNOWN in each ("timed out"), and each section is PARTIAL. With every
/// organisation hanging, every section is UNKNOWN. The CLI's JSON output still lists every
/// section (empty ones as `[]`), the section statuses, and `complete: false`.
#[tokio::test]
async fn a_timed_out_source_makes_every_section_partial_and_never_reads_as_none_recorded() {
    let server = start_region(&small_region(SEED, 100)).await;
    let patient = shared_patient(&server);
    let slow = patient.organisations[1].clone();
    let broker = start_region_broker(&region_config(&server, FhirMode::Search, HANG_TIMEOUT)).await;
    server
        .faults()
        .set_fault(&slow, Fault::Hang)
        .expect("known org");

    let response = lookup(&broker, &patient.nhs_number, DEADLINE).await;

    assert_eq!(outcome_of(&response, &slow), SourceOutcome::Timeout);
    assert!(!response.complete);
    let listed: Vec<i32> = response
        .section_statuses
        .iter()
        .map(|s| s.section)
        .collect();
    assert_eq!(
        listed,
        Section::ALL.iter().map(|&s| s as i32).collect::<Vec<_>>(),
        "all eight sections, in order"
    );
    for section in Section::ALL {
        let (state, reason) = section_line(&response, section, &slow);
        assert_eq!(state, SourceSectionState::Unknown, "{section:?}");
        assert!(reason.contains("timed out"), "{section:?}: {reason}");
        assert_eq!(
            section_state(&response, section),
            SectionState::Partial,
            "{section:?}: some answered, one could not"
        );
        let summary = &response
            .section_statuses
            .iter()
            .find(|s| s.section == section as i32)
            .expect("status")
            .summary;
        assert!(
            summary.contains(&slow) && summary.contains("timed out"),
            "{summary}"
        );
    }

    // The terminal client's JSON: every section present, also the empty ones.
    let text = lookup_text(&LookupArgs {
        json: true,
        fresh: true,
        org: patient.gp.clone(),
        timeout_ms: 2_000,
        ..LookupArgs::for_patient(&patient.nhs_number.as_digits(), &broker.url)
    })
    .await
    .expect("the CLI lookup");
    let json: serde_json::Value = serde_json::from_str(&text).expect("JSON output");
    assert_eq!(json["complete"], serde_json::json!(false), "{text}");
    for key in [
        "conditions",
        "medications",
        "allergies",
        "testResults",
        "carePlans",
        "documents",
        "encounters",
        "appointments",
    ] {
        assert!(json["record"][key].is_array(), "{key} present: {text}");
    }
    assert_eq!(
        json["sectionStatuses"].as_array().map(Vec::len),
        Some(8),
        "{text}"
    );

    // Nobody answering: every section UNKNOWN.
    server.faults().set_fault_all(Fault::Hang);
    let none = lookup(&broker, &patient.nhs_number, DEADLINE).await;
    assert!(!none.complete);
    for section in Section::ALL {
        assert_eq!(
            section_state(&none, section),
            SectionState::Unknown,
            "{section:?}"
        );
    }
}

/// With every organisation answering, a section nobody recorded anything in is NONE_RECORDED
/// (each organisation's line NONE_RECORDED), and a section with entries is RECORDED.
#[tokio::test]
async fn a_section_every_organisation_answered_with_nothing_is_none_recorded() {
    let server = start_region(&small_region(SEED, 100)).await;
    let broker = region_broker(&server, FhirMode::Search).await;
    let mut none_recorded = 0;
    for p in server.region().patients().take(10) {
        let r = lookup(&broker, &p.nhs_number, DEADLINE).await;
        assert!(r.complete);
        let record = r.record.clone().unwrap_or_default();
        for section in Section::ALL {
            let state = section_state(&r, section);
            if record.section(section).is_empty() {
                none_recorded += 1;
                assert_eq!(state, SectionState::NoneRecorded, "{section:?}");
                for org in server.organisations() {
                    assert_eq!(
                        section_line(&r, section, &org.code).0,
                        SourceSectionState::NoneRecorded,
                        "{section:?} {}",
                        org.code
                    );
                }
            } else {
                assert_eq!(state, SectionState::Recorded, "{section:?}");
            }
        }
    }
    assert!(none_recorded > 0, "some section was empty for someone");
}

/// The registered GP (as the other organisations name it) answering "not found": a
/// REGISTERED_GP_NOT_FOUND warning names it, its section lines are UNKNOWN, and the record is
/// not complete.
#[tokio::test]
async fn a_registered_gp_that_does_not_know_the_patient_makes_the_record_incomplete() {
    let server = start_region(&small_region(SEED, 100)).await;
    let patient = shared_patient(&server);
    let broker = region_broker(&server, FhirMode::Search).await;
    server
        .faults()
        .set_fault(&patient.gp, Fault::EmptyBundle)
        .expect("known org");

    let response = lookup(&broker, &patient.nhs_number, DEADLINE).await;

    assert_eq!(outcome_of(&response, &patient.gp), SourceOutcome::NotFound);
    assert_eq!(
        response
            .record
            .as_ref()
            .and_then(|r| r.patient.as_ref())
            .map(|p| p.registered_gp_code.clone()),
        Some(patient.gp.clone()),
        "the trusts name the GP"
    );
    assert!(
        warnings(&response, WarningKind::RegisteredGpNotFound)
            .iter()
            .any(|w| names(w, &patient.gp)),
        "{:?}",
        response.warnings
    );
    assert!(!response.complete);
    for section in Section::ALL {
        assert_eq!(
            section_line(&response, section, &patient.gp).0,
            SourceSectionState::Unknown,
            "{section:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// H6, H11: sensitive data judged on every coding, withheld data flagged

/// A hospital codes a diagnosis in SNOMED CT with an ICD-10 coding second. With that ICD-10
/// code configured as sensitive, the merged entry is withheld from an ordinary role (and the
/// response says something was withheld), shown to a permitted role, and withheld again when
/// the ordinary role is served the permitted role's cached record.
#[tokio::test]
async fn a_sensitive_second_coding_withholds_the_entry_from_an_ordinary_role_even_from_cache() {
    let server = start_region(&small_region(SEED, 100)).await;
    let explore = region_broker(&server, FhirMode::Search).await;
    // A condition whose display coding is SNOMED CT and whose ICD-10 coding comes later.
    let mut found = None;
    for p in server.region().patients_known_to_at_least(2).take(30) {
        let r = lookup(&explore, &p.nhs_number, DEADLINE).await;
        let hit = r
            .record
            .unwrap_or_default()
            .conditions
            .into_iter()
            .find_map(|e| {
                let concept = e.concept.clone()?;
                let icd = e
                    .codings
                    .iter()
                    .skip(1)
                    .find(|c| c.system == codes::ICD10)?;
                (concept.system != codes::ICD10).then(|| (concept, icd.clone()))
            });
        if let Some((concept, icd)) = hit {
            found = Some((p, concept, icd));
            break;
        }
    }
    let (patient, concept, icd) = found.expect("a hospital diagnosis with an ICD-10 coding");

    let mut config = region_config(&server, FhirMode::Search, SOURCE_TIMEOUT);
    config.access.sensitive_codes = vec![format!("{}|{}", icd.system, icd.code)];
    config.access.sensitive_roles = vec!["R8000".into()];
    let broker = start_region_broker(&config).await;
    let permitted = clinician();
    let ordinary = Requester {
        role_code: "R8001".into(),
        ..clinician()
    };
    let shows = |r: &GetCareRecordResponse| {
        r.record
            .as_ref()
            .is_some_and(|rec| rec.conditions.iter().any(|e| is_about(e, &concept.code)))
    };

    let seen = lookup_as(&broker, &patient.nhs_number, DEADLINE, permitted).await;
    assert!(shows(&seen), "the permitted role sees it");
    assert!(!seen.withheld);

    let hidden = lookup_as(&broker, &patient.nhs_number, DEADLINE, ordinary.clone()).await;
    assert!(!shows(&hidden), "withheld on its second coding");
    assert!(
        hidden.withheld,
        "and the response says something was withheld"
    );

    let mut cached = fresh_request_as(&patient.nhs_number, DEADLINE, ordinary);
    cached.get_mut().cache = CacheDirective::AllowCached as i32;
    let from_cache = broker
        .client()
        .await
        .get_care_record(cached)
        .await
        .expect("the lookup answers")
        .into_inner();
    assert!(from_cache.from_cache, "served from the cache");
    assert!(!shows(&from_cache), "still withheld on a cache hit");
    assert!(from_cache.withheld);
}

/// An entry sensitive only by its security label (its codes are ordinary), and one sensitive
/// only by its second coding, from an in-memory source: both withheld from an ordinary role,
/// on a miss and on a cache hit, and shown to a permitted role; the ordinary role's terminal
/// view says that something was withheld.
#[tokio::test]
async fn an_entry_sensitive_only_by_a_label_or_a_later_coding_is_withheld_from_an_ordinary_role() {
    let nhs = carerecord_e2e::shared_patient();
    let snomed = |code: &str, display: &str| Coding {
        system: carerecord_e2e::SNOMED.into(),
        code: code.into(),
        display: display.into(),
    };
    let labelled = Entry {
        concept: Some(snomed("35489007", "Depressive disorder")),
        codings: vec![snomed("35489007", "Depressive disorder")],
        summary: "Depressive disorder".into(),
        effective: "2020-01-01".into(),
        security_labels: vec![Coding {
            system: "http://terminology.hl7.org/CodeSystem/v3-Confidentiality".into(),
            code: "R".into(),
            display: "restricted".into(),
        }],
        ..Entry::default()
    };
    let second = Entry {
        concept: Some(snomed("44054006", "Diabetes mellitus type 2")),
        codings: vec![
            snomed("44054006", "Diabetes mellitus type 2"),
            snomed("86406008", "Human immunodeficiency virus infection"),
        ],
        summary: "Diabetes".into(),
        effective: "2019-01-01".into(),
        ..Entry::default()
    };
    let ordinary_entry = Entry {
        concept: Some(snomed("195967001", "Asthma")),
        summary: "Asthma".into(),
        effective: "2001-01-01".into(),
        ..Entry::default()
    };
    let gp = InMemorySource::new("gp", "A81001", "Riverside Medical Practice").with_patient(
        nhs,
        CareRecord {
            patient: Some(carerecord_proto::Patient {
                family_name: "Smith".into(),
                birth_date: "1957-03-02".into(),
                ..Default::default()
            }),
            conditions: vec![labelled, second, ordinary_entry],
            ..CareRecord::default()
        },
    );
    let settings = Settings {
        access: AccessConfig {
            sensitive_roles: vec!["R8000".into()],
            trust_unverified_assertions: true,
            ..AccessConfig::default()
        },
        ..Settings::default()
    };
    let broker = start_broker(
        vec![(Arc::new(gp) as Arc<dyn Source>, SOURCE_TIMEOUT)],
        settings,
    )
    .await;
    let request = |role: &str, cache: CacheDirective| {
        let mut r = tonic::Request::new(GetCareRecordRequest {
            nhs_number: nhs.as_digits(),
            requester: Some(Requester {
                role_code: role.into(),
                ..clinician()
            }),
            cache: cache as i32,
            ..GetCareRecordRequest::default()
        });
        r.set_timeout(DEADLINE);
        r
    };
    let codes_of = |r: &GetCareRecordResponse| -> BTreeSet<String> {
        r.record
            .as_ref()
            .map(|rec| {
                rec.conditions
                    .iter()
                    .filter_map(|e| e.concept.as_ref().map(|c| c.code.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let all: BTreeSet<String> = ["35489007", "44054006", "195967001"]
        .map(String::from)
        .into();
    let ordinary_only: BTreeSet<String> = ["195967001".to_owned()].into();

    let hidden = broker
        .lookup(request("R8001", CacheDirective::RequireFresh))
        .await;
    assert_eq!(codes_of(&hidden), ordinary_only);
    assert!(hidden.withheld);
    let seen = broker
        .lookup(request("R8000", CacheDirective::AllowCached))
        .await;
    assert!(seen.from_cache);
    assert_eq!(codes_of(&seen), all);
    assert!(!seen.withheld);
    let hidden_again = broker
        .lookup(request("R8001", CacheDirective::AllowCached))
        .await;
    assert!(hidden_again.from_cache);
    assert_eq!(codes_of(&hidden_again), ordinary_only);
    assert!(hidden_again.withheld);

    // The terminal view says so to the ordinary role, and only to it.
    let view = |role: &str| LookupArgs {
        role: role.into(),
        org: "A81001".into(),
        ..LookupArgs::for_patient(&nhs.as_digits(), &broker.url)
    };
    let notice = "Some information has been withheld from this view.";
    let ordinary_view = lookup_text(&view("R8001")).await.expect("the CLI lookup");
    assert!(ordinary_view.contains(notice), "{ordinary_view}");
    let permitted_view = lookup_text(&view("R8000")).await.expect("the CLI lookup");
    assert!(!permitted_view.contains(notice), "{permitted_view}");
}

/// A source of any kind (here an in-memory one, not FHIR) whose demographics carry another
/// NHS number is WRONG_PATIENT: none of its entries or demographics reach the record, the
/// record is not complete, and a WRONG_PATIENT warning names it.
#[tokio::test]
async fn a_non_fhir_source_answering_with_another_nhs_number_contributes_nothing() {
    let nhs = carerecord_e2e::shared_patient();
    let other = carerecord_e2e::gp_only_patient();
    assert_ne!(other, nhs);
    let asthma = |effective: &str| Entry {
        concept: Some(Coding {
            system: carerecord_e2e::SNOMED.into(),
            code: "195967001".into(),
            display: "Asthma".into(),
        }),
        summary: "Asthma".into(),
        effective: effective.into(),
        ..Entry::default()
    };
    let gp = InMemorySource::new("gp", "A81001", "Riverside Medical Practice").with_patient(
        nhs,
        CareRecord {
            patient: Some(carerecord_proto::Patient {
                family_name: "Smith".into(),
                birth_date: "1957-03-02".into(),
                ..Default::default()
            }),
            conditions: vec![asthma("2001-01-01")],
            ..CareRecord::default()
        },
    );
    let confused = InMemorySource::new("hospice", "HOS01", "Riverside Hospice").with_patient(
        nhs,
        CareRecord {
            patient: Some(carerecord_proto::Patient {
                nhs_number: other.as_digits(),
                family_name: "Jones".into(),
                birth_date: "1990-07-07".into(),
                ..Default::default()
            }),
            conditions: vec![Entry {
                concept: Some(Coding {
                    system: carerecord_e2e::SNOMED.into(),
                    code: "38341003".into(),
                    display: "Hypertension".into(),
                }),
                summary: "Hypertension".into(),
                ..Entry::default()
            }],
            ..CareRecord::default()
        },
    );
    let settings = Settings {
        access: AccessConfig {
            trust_unverified_assertions: true,
            ..AccessConfig::default()
        },
        ..Settings::default()
    };
    let broker = start_broker(
        vec![
            (Arc::new(gp) as Arc<dyn Source>, SOURCE_TIMEOUT),
            (Arc::new(confused) as Arc<dyn Source>, SOURCE_TIMEOUT),
        ],
        settings,
    )
    .await;
    let mut request = tonic::Request::new(GetCareRecordRequest {
        nhs_number: nhs.as_digits(),
        requester: Some(clinician()),
        ..GetCareRecordRequest::default()
    });
    request.set_timeout(DEADLINE);
    let r = broker.lookup(request).await;
    assert_eq!(outcome_of(&r, "HOS01"), SourceOutcome::WrongPatient);
    assert!(
        !r.complete,
        "a wrong-patient source leaves the record incomplete"
    );
    let record = r.record.clone().unwrap_or_default();
    assert!(
        record
            .conditions
            .iter()
            .all(|e| e.summary != "Hypertension"),
        "{:?}",
        record.conditions
    );
    assert!(record.conditions.iter().any(|e| e.summary == "Asthma"));
    let patient = record.patient.unwrap_or_default();
    assert_eq!(patient.family_name, "Smith");
    assert!(
        warnings(&r, WarningKind::WrongPatient)
            .iter()
            .any(|w| w.source_ids.iter().any(|s| s == "hospice")),
        "{:?}",
        r.warnings
    );
}

/// A withheld entry's name never leaves in another entry's conflict or in a warning: the GP
/// says "no known problems" and disagrees with the hospital about a sensitive diagnosis's
/// status; the hospital also reports an active HIV diagnosis and an active asthma. An ordinary
/// role sees the contradicted assertion and the conflict warning naming only asthma; a
/// permitted role sees the full disagreement.
#[tokio::test]
async fn a_withheld_entry_is_never_named_in_a_conflict_or_a_warning() {
    let nhs = carerecord_e2e::shared_patient();
    let snomed = |code: &str, display: &str| Coding {
        system: carerecord_e2e::SNOMED.into(),
        code: code.into(),
        display: display.into(),
    };
    let condition = |code: &str, display: &str, status: &str| Entry {
        concept: Some(snomed(code, display)),
        codings: vec![snomed(code, display)],
        summary: display.into(),
        status: status.into(),
        effective: "2020-01-01".into(),
        ..Entry::default()
    };
    let patient = || carerecord_proto::Patient {
        family_name: "Smith".into(),
        birth_date: "1957-03-02".into(),
        ..Default::default()
    };
    let no_known_problems = Entry {
        asserts_absence: true,
        ..condition("160245001", "No current problems or disability", "active")
    };
    let gp = InMemorySource::new("gp", "A81001", "Riverside Medical Practice").with_patient(
        nhs,
        CareRecord {
            patient: Some(patient()),
            conditions: vec![
                no_known_problems,
                condition("35489007", "Depressive disorder", "resolved"),
            ],
            ..CareRecord::default()
        },
    );
    let hospital = InMemorySource::new("hospital", "RXX", "Riverside Hospital").with_patient(
        nhs,
        CareRecord {
            patient: Some(patient()),
            conditions: vec![
                condition("35489007", "Depressive disorder", "active"),
                condition(
                    "86406008",
                    "Human immunodeficiency virus infection",
                    "active",
                ),
                condition("195967001", "Asthma", "active"),
            ],
            ..CareRecord::default()
        },
    );
    let settings = Settings {
        access: AccessConfig {
            sensitive_codes: vec!["35489007".into(), "86406008".into()],
            sensitive_roles: vec!["R8000".into()],
            trust_unverified_assertions: true,
            ..AccessConfig::default()
        },
        ..Settings::default()
    };
    let broker = start_broker(
        vec![
            (Arc::new(gp) as Arc<dyn Source>, SOURCE_TIMEOUT),
            (Arc::new(hospital) as Arc<dyn Source>, SOURCE_TIMEOUT),
        ],
        settings,
    )
    .await;
    let ask = |role: &str, cache: CacheDirective| {
        let mut r = tonic::Request::new(GetCareRecordRequest {
            nhs_number: nhs.as_digits(),
            requester: Some(Requester {
                role_code: role.into(),
                ..clinician()
            }),
            cache: cache as i32,
            ..GetCareRecordRequest::default()
        });
        r.set_timeout(DEADLINE);
        r
    };
    // Every word that leaves the broker about conditions: entries' conflicts and all warnings.
    let said = |r: &GetCareRecordResponse| -> String {
        let mut text: Vec<String> = r.warnings.iter().map(|w| w.message.clone()).collect();
        for e in r.record.as_ref().map(|r| &r.conditions[..]).unwrap_or(&[]) {
            text.push(e.summary.clone());
            for c in &e.conflicts {
                text.extend(c.values.iter().map(|v| v.value.clone()));
                text.push(c.resolution.clone());
            }
        }
        text.join("\n")
    };

    let seen = broker
        .lookup(ask("R8000", CacheDirective::RequireFresh))
        .await;
    let full = said(&seen);
    assert!(full.contains("Depressive"), "{full}");
    assert!(full.contains("Human immunodeficiency"), "{full}");
    assert!(!warnings(&seen, WarningKind::Conflict).is_empty());

    for cache in [CacheDirective::RequireFresh, CacheDirective::AllowCached] {
        let hidden = broker.lookup(ask("R8001", cache)).await;
        assert!(hidden.withheld);
        let text = said(&hidden);
        assert!(!text.contains("Depressive"), "{cache:?}: {text}");
        assert!(
            !text.contains("Human immunodeficiency"),
            "{cache:?}: {text}"
        );
        // The contradicted assertion is still flagged, by what the requester may see.
        let absence = hidden
            .record
            .as_ref()
            .and_then(|r| r.conditions.iter().find(|e| e.asserts_absence))
            .expect("the GP's assertion is shown");
        let assertion = absence
            .conflicts
            .iter()
            .find(|c| c.field == "assertion")
            .expect("still contradicted by the asthma");
        assert!(
            assertion.values.iter().any(|v| v.value.contains("Asthma")),
            "{assertion:?}"
        );
        let conflicts = warnings(&hidden, WarningKind::Conflict);
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert!(conflicts[0].message.contains("Asthma"), "{conflicts:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// H9: a federated region missing

/// A remote broker over a mock region whose organisations all fail: the central broker reports
/// the remote PARTIAL (never a bare OK), keeps its nested ERROR statuses, raises DATA_CUT_SHORT,
/// and the record is not complete.
#[tokio::test]
async fn a_federated_region_whose_sources_all_fail_is_partial_and_the_record_incomplete() {
    let server = start_region(&small_region(SEED, 100)).await;
    let patient = shared_patient(&server);
    let region = region_broker(&server, FhirMode::Search).await;
    server.faults().set_fault_all(Fault::Http500);
    let central = start_broker(
        vec![(remote_broker("north", &region.url), SOURCE_TIMEOUT)],
        Settings {
            broker_id: "central".into(),
            ..Settings::default()
        },
    )
    .await;

    let response = lookup(&central, &patient.nhs_number, DEADLINE).await;

    let north = status_of(&response, "NORTH");
    assert_eq!(
        north.outcome,
        SourceOutcome::Partial as i32,
        "not OK: {north:?}"
    );
    assert_eq!(north.nested.len(), server.organisations().len());
    assert!(
        north
            .nested
            .iter()
            .all(|s| s.outcome == SourceOutcome::Error as i32),
        "{:?}",
        north.nested
    );
    assert!(!response.complete);
    assert!(
        warnings(&response, WarningKind::DataCutShort)
            .iter()
            .any(|w| names(w, "north")),
        "{:?}",
        response.warnings
    );
    for section in Section::ALL {
        assert_ne!(
            section_state(&response, section),
            SectionState::NoneRecorded,
            "{section:?}: not 'none recorded' when nobody in the region answered"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// H13, H10: a valid but wrong NHS number, a stale record

/// A valid NHS number that belongs to someone else passes every check, so the terminal view
/// opens with who the record is about (name, NHS number as people read it, date of birth, sex)
/// for the clinician to check against the person in front of them, and says whether the
/// record is fresh or from the cache and how old.
#[tokio::test]
async fn the_terminal_view_opens_with_who_the_record_is_about_and_how_fresh_it_is() {
    let server = start_region(&small_region(SEED, 100)).await;
    let patient = shared_patient(&server);
    let broker = region_broker(&server, FhirMode::Search).await;
    let digits = patient.nhs_number.as_digits();
    let args = LookupArgs {
        org: patient.gp.clone(),
        ..LookupArgs::for_patient(&digits, &broker.url)
    };

    let fresh = lookup_text(&LookupArgs {
        fresh: true,
        ..args.clone()
    })
    .await
    .expect("the CLI lookup");
    let banner = fresh.lines().next().unwrap_or_default();
    let grouped = format!("{} {} {}", &digits[..3], &digits[3..6], &digits[6..]);
    for want in [
        patient.family.to_uppercase(),
        patient.given.clone(),
        format!("NHS {grouped}"),
        format!("born {}", patient.birth_date),
        patient.gender.to_owned(),
    ] {
        assert!(banner.contains(&want), "{want:?} in the banner: {banner}");
    }
    assert!(fresh.contains("  fresh  complete"), "{fresh}");

    let cached = lookup_text(&args).await.expect("the CLI lookup");
    assert_eq!(cached.lines().next(), Some(banner), "the same banner");
    assert!(cached.contains("from cache, "), "{cached}");
}
