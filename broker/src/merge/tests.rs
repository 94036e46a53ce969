//! Table-driven merge tests, grouped by the hazard each control addresses.

use super::*;
use carerecord_adapters::{Shortfall, SourceRecord};
use carerecord_proto::{AllergyDetail, Coding, MedicationDetail};
use proptest::prelude::*;

const SNOMED: &str = "http://snomed.info/sct";

fn info(i: usize) -> SourceInfo {
    SourceInfo {
        id: format!("s{i}"),
        organisation_code: format!("ORG{i}"),
        organisation_name: format!("Org {i}"),
    }
}

fn asked_n(n: usize) -> Vec<Asked> {
    (0..n)
        .map(|i| Asked {
            info: info(i),
            selected_by: "all".into(),
        })
        .collect()
}

fn status(i: usize, outcome: SourceOutcome) -> SourceStatus {
    let info = info(i);
    SourceStatus {
        source_id: info.id,
        organisation_code: info.organisation_code,
        organisation_name: info.organisation_name,
        outcome: outcome as i32,
        ..SourceStatus::default()
    }
}

/// Source `i` answered OK with `record` (provenance stamped as fan-out does).
fn answer_with(i: usize, mut record: SourceRecord) -> Arc<Answer> {
    record.stamp_provenance(&info(i));
    Arc::new(Answer {
        index: i,
        status: status(i, SourceOutcome::Ok),
        cut_short: false,
        record: Some(record),
    })
}

fn answer(i: usize, record: CareRecord) -> Arc<Answer> {
    answer_with(
        i,
        SourceRecord {
            record,
            ..SourceRecord::default()
        },
    )
}

fn failed(i: usize, outcome: SourceOutcome) -> Arc<Answer> {
    Arc::new(Answer {
        index: i,
        status: status(i, outcome),
        cut_short: false,
        record: None,
    })
}

fn nhs() -> NhsNumber {
    NhsNumber::parse("9434765919").expect("valid")
}

/// 2026-12-01T00:00:00Z: "today" for current medicines.
fn today() -> SystemTime {
    let days = carerecord_adapters::calendar::days_from_civil(2026, 12, 1);
    SystemTime::UNIX_EPOCH + Duration::from_secs(days as u64 * 86_400)
}

fn run(n: usize, answers: &[Arc<Answer>]) -> MergedRecord {
    let asked = asked_n(n);
    merge(MergeInput::new(
        nhs(),
        &asked,
        answers,
        today(),
        Instant::now(),
    ))
}

fn coded(code: &str) -> Option<Coding> {
    (!code.is_empty()).then(|| Coding {
        system: SNOMED.into(),
        code: code.into(),
        display: format!("concept {code}"),
    })
}

fn entry(code: &str, effective: &str, source: &str) -> Entry {
    Entry {
        concept: coded(code),
        summary: format!("{code} at {effective}"),
        effective: effective.into(),
        provenance: vec![Provenance {
            source_id: source.into(),
            source_entry_id: format!("{source}-{code}-{effective}"),
            ..Provenance::default()
        }],
        ..Entry::default()
    }
}

/// A penicillin allergy as one organisation states it.
fn allergy(status: &str, verification: VerificationStatus, recorded: &str) -> Entry {
    Entry {
        concept: Some(Coding {
            system: SNOMED.into(),
            code: "91936005".into(),
            display: "Penicillin allergy".into(),
        }),
        summary: "Allergy to penicillin".into(),
        status: status.into(),
        verification_status: verification as i32,
        recorded: recorded.into(),
        detail: Some(Detail::Allergy(AllergyDetail {
            criticality: "high".into(),
            ..AllergyDetail::default()
        })),
        ..Entry::default()
    }
}

fn no_known_allergy() -> Entry {
    Entry {
        concept: Some(Coding {
            system: SNOMED.into(),
            code: "716186003".into(),
            display: "No known allergy".into(),
        }),
        summary: "No known allergy".into(),
        asserts_absence: true,
        ..Entry::default()
    }
}

fn allergies(entries: Vec<Entry>) -> CareRecord {
    CareRecord {
        allergies: entries,
        ..CareRecord::default()
    }
}

fn medicine(kind: &str, intent: &str, status: &str, date: &str, dose: &str) -> Entry {
    Entry {
        concept: Some(Coding {
            system: "https://dmd.nhs.uk".into(),
            code: "325242007".into(),
            display: "Metformin 500mg tablets".into(),
        }),
        summary: "Metformin 500mg tablets".into(),
        status: status.into(),
        effective: date.into(),
        detail: Some(Detail::Medication(MedicationDetail {
            dosage: dose.into(),
            kind: kind.into(),
            intent: intent.into(),
            ..MedicationDetail::default()
        })),
        provenance: vec![Provenance {
            source_entry_id: format!("{kind}-{date}"),
            ..Provenance::default()
        }],
        ..Entry::default()
    }
}

fn medications(entries: Vec<Entry>) -> CareRecord {
    CareRecord {
        medications: entries,
        ..CareRecord::default()
    }
}

fn patient(family: &str, birth: &str, gp: &str, nhs_number: &str) -> Patient {
    Patient {
        nhs_number: nhs_number.into(),
        family_name: family.into(),
        given_names: vec!["Sam".into()],
        birth_date: birth.into(),
        gender: "female".into(),
        registered_gp_code: gp.into(),
        ..Patient::default()
    }
}

fn kinds(m: &MergedRecord) -> Vec<i32> {
    m.warnings.iter().map(|w| w.kind).collect()
}

fn has(m: &MergedRecord, kind: WarningKind) -> bool {
    kinds(m).contains(&(kind as i32))
}

fn section_status(m: &MergedRecord, section: Section) -> &SectionStatus {
    m.section_statuses
        .iter()
        .find(|s| s.section == section as i32)
        .expect("every section has a status")
}

// ---- dropped or duplicated entries (dedup) -------------------------------------------------

#[test]
fn dedup_rules_per_section() {
    // (section, entries from s0, entries from s1, expected merged count)
    type Case = (
        Section,
        Vec<(&'static str, &'static str)>,
        Vec<(&'static str, &'static str)>,
        usize,
    );
    let cases: Vec<Case> = vec![
        // Standing facts: same code is the same entry whatever the date.
        (
            Section::Conditions,
            vec![("44054006", "2015")],
            vec![("44054006", "2019-03-01")],
            1,
        ),
        // Events: same code on another day is another result.
        (
            Section::TestResults,
            vec![("4548-4", "2024-01-01")],
            vec![("4548-4", "2024-06-01")],
            2,
        ),
        // Events: same code same day (times differ) is the same result.
        (
            Section::TestResults,
            vec![("4548-4", "2024-01-01T09:00:00Z")],
            vec![("4548-4", "2024-01-01")],
            1,
        ),
        // Uncoded entries are never merged.
        (
            Section::Documents,
            vec![("", "2024-01-01")],
            vec![("", "2024-01-01")],
            2,
        ),
    ];
    for (section, a, b, want) in cases {
        let mut r0 = CareRecord::default();
        let mut r1 = CareRecord::default();
        if let Some(s) = r0.section_mut(section) {
            s.extend(a.iter().map(|(c, d)| entry(c, d, "s0")));
        }
        if let Some(s) = r1.section_mut(section) {
            s.extend(b.iter().map(|(c, d)| entry(c, d, "s1")));
        }
        let merged = run(2, &[answer(0, r0), answer(1, r1)]);
        assert_eq!(
            merged.record.section(section).len(),
            want,
            "{section:?} {a:?} {b:?}"
        );
    }
}

#[test]
fn two_organisations_different_values_for_one_test_on_one_day_are_both_shown() {
    let result = |source: &str, value: &str| Entry {
        detail: Some(Detail::Result(carerecord_proto::ResultDetail {
            value: value.into(),
            unit: "mmol/L".into(),
            ..Default::default()
        })),
        ..entry("6298-4", "2024-01-01", source)
    };
    let both = |a: &str, b: &str| {
        let merged = run(
            2,
            &[
                answer(
                    0,
                    CareRecord {
                        test_results: vec![result("s0", a)],
                        ..CareRecord::default()
                    },
                ),
                answer(
                    1,
                    CareRecord {
                        test_results: vec![result("s1", b)],
                        ..CareRecord::default()
                    },
                ),
            ],
        );
        let mut values: Vec<String> = merged
            .record
            .test_results
            .iter()
            .filter_map(|e| match &e.detail {
                Some(Detail::Result(r)) => Some(r.value.clone()),
                _ => None,
            })
            .collect();
        values.sort();
        values
    };
    assert_eq!(
        both("4.1", "6.8"),
        ["4.1", "6.8"],
        "a potassium of 6.8 is never hidden"
    );
    assert_eq!(
        both("4.1", "4.1"),
        ["4.1"],
        "the same result reported twice is one entry"
    );
}

#[test]
fn every_organisations_allergy_reactions_are_kept() {
    let with = |reactions: &[&str]| {
        let mut a = allergy("active", VerificationStatus::Confirmed, "2024-01-01");
        if let Some(Detail::Allergy(d)) = a.detail.as_mut() {
            d.reactions = reactions.iter().map(|r| (*r).to_owned()).collect();
        }
        a
    };
    let merged = run(
        2,
        &[
            answer(0, allergies(vec![with(&["Rash"])])),
            answer(1, allergies(vec![with(&["Anaphylaxis", "rash"])])),
        ],
    );
    assert_eq!(merged.record.allergies.len(), 1);
    let Some(Detail::Allergy(d)) = &merged.record.allergies[0].detail else {
        panic!("an allergy detail");
    };
    let mut reactions = d.reactions.clone();
    reactions.sort();
    assert_eq!(reactions, ["Anaphylaxis", "Rash"]);
}

#[test]
fn the_same_source_reporting_a_code_twice_keeps_both_entries() {
    let r0 = CareRecord {
        test_results: vec![
            entry("2823-3", "2024-05-01T08:00:00Z", "s0"),
            entry("2823-3", "2024-05-01T20:00:00Z", "s0"),
        ],
        ..CareRecord::default()
    };
    let r1 = CareRecord {
        test_results: vec![entry("2823-3", "2024-05-01", "s1")],
        ..CareRecord::default()
    };
    let merged = run(2, &[answer(0, r0), answer(1, r1)]);
    let results = &merged.record.test_results;
    assert_eq!(
        results.len(),
        2,
        "two potassium results from one lab stay two"
    );
    let provenance: usize = results.iter().map(|e| e.provenance.len()).sum();
    assert_eq!(
        provenance, 3,
        "the other organisation's copy joins one of them"
    );
}

/// Changed on purpose (issue 10): the kept values are no longer the first-configured source's
/// but the most recent assertion's, and differing onset dates are a conflict.
#[test]
fn the_result_does_not_depend_on_completion_order() {
    let r0 = CareRecord {
        conditions: vec![entry("1", "2020", "s0"), entry("2", "2021-05", "s0")],
        ..CareRecord::default()
    };
    let r1 = CareRecord {
        conditions: vec![
            entry("2", "2022", "s1"),
            entry("3", "", "s1"),
            entry("4", "2021-05-02", "s1"),
        ],
        ..CareRecord::default()
    };
    let forward = run(2, &[answer(0, r0.clone()), answer(1, r1.clone())]);
    let backward = run(2, &[answer(1, r1), answer(0, r0)]);
    assert_eq!(forward.record, backward.record);
    let order: Vec<&str> = forward.record.conditions.iter().map(code_of).collect();
    // Most recent first (partial dates compare sensibly), undated last.
    assert_eq!(order, ["2", "4", "1", "3"]);
    let two = &forward.record.conditions[0];
    assert_eq!(two.effective, "2022", "the most recent assertion");
    assert_eq!(two.provenance.len(), 2);
    assert_eq!(two.conflicts.len(), 1);
    assert_eq!(two.conflicts[0].field, "effective");
}

#[test]
fn missing_sources_are_timeouts_and_make_the_record_incomplete() {
    let merged = run(3, &[answer(1, CareRecord::default())]);
    let outcomes: Vec<i32> = merged.sources.iter().map(|s| s.outcome).collect();
    assert_eq!(
        outcomes,
        [
            SourceOutcome::Timeout as i32,
            SourceOutcome::Ok as i32,
            SourceOutcome::Timeout as i32
        ]
    );
    assert!(!merged.complete);
    let incomplete = merged
        .warnings
        .iter()
        .find(|w| w.kind == WarningKind::Incomplete as i32)
        .expect("incomplete warning");
    assert_eq!(incomplete.source_ids, ["s0", "s2"]);
}

// ---- disagreement between organisations ----------------------------------------------------

#[test]
fn disagreement_is_shown_with_the_most_recent_assertion_whatever_the_configuration_order() {
    // (s0's assertion, s1's assertion, field in conflict, headline value shown)
    type Case = (Entry, Entry, &'static str, &'static str);
    let cases: Vec<Case> = vec![
        // The hospital resolved it last month; the GP's "active" is years old.
        (
            allergy("active", VerificationStatus::Confirmed, "2019-01-01"),
            allergy("resolved", VerificationStatus::Confirmed, "2026-11-02"),
            "status",
            "resolved",
        ),
        // The other way round: the more recent report is active.
        (
            allergy("resolved", VerificationStatus::Confirmed, "2019-01-01"),
            allergy("active", VerificationStatus::Confirmed, "2026-11-02"),
            "status",
            "active",
        ),
        // Same day: the more cautious (active beats resolved).
        (
            allergy("resolved", VerificationStatus::Confirmed, "2026-11-02"),
            allergy(
                "active",
                VerificationStatus::Confirmed,
                "2026-11-02T15:00:00Z",
            ),
            "status",
            "active",
        ),
        // Same day: an active allergy beats a refuted one.
        (
            allergy("active", VerificationStatus::Refuted, "2026-11-02"),
            allergy("active", VerificationStatus::Confirmed, "2026-11-02"),
            "verification_status",
            "confirmed",
        ),
        // Undated: higher criticality beats lower.
        (
            {
                let mut e = allergy("active", VerificationStatus::Confirmed, "");
                if let Some(Detail::Allergy(a)) = e.detail.as_mut() {
                    a.criticality = "low".into();
                }
                e
            },
            allergy("active", VerificationStatus::Confirmed, ""),
            "criticality",
            "high",
        ),
    ];
    for (a, b, field, shown) in cases {
        for swap in [false, true] {
            // Swapping which configured source says what must not change what is shown.
            let (x, y) = if swap {
                (b.clone(), a.clone())
            } else {
                (a.clone(), b.clone())
            };
            let merged = run(
                2,
                &[answer(0, allergies(vec![x])), answer(1, allergies(vec![y]))],
            );
            let e = &merged.record.allergies[0];
            assert_eq!(merged.record.allergies.len(), 1);
            let conflict = e
                .conflicts
                .iter()
                .find(|c| c.field == field)
                .unwrap_or_else(|| panic!("{field} conflict in {e:?}"));
            assert_eq!(conflict.values.len(), 2, "one value per organisation");
            assert!(conflict.resolution.starts_with(shown), "{conflict:?}");
            // The stated reason is the one that decided it: recency when the dates differ.
            let dated_apart = a.recorded.get(..10) != b.recorded.get(..10)
                && !a.recorded.is_empty()
                && !b.recorded.is_empty();
            let reason = if dated_apart {
                "most recent assertion"
            } else {
                "more cautious"
            };
            assert!(conflict.resolution.contains(reason), "{conflict:?}");
            let headline = match field {
                "status" => e.status.clone(),
                "verification_status" => verification_word(e.verification_status).to_owned(),
                "criticality" => match &e.detail {
                    Some(Detail::Allergy(a)) => a.criticality.clone(),
                    _ => String::new(),
                },
                _ => unreachable!(),
            };
            assert_eq!(headline, shown, "{field} swap={swap}");
            // Each organisation's own assertion is kept.
            assert_eq!(e.provenance.len(), 2);
            let conflict_warnings = merged
                .warnings
                .iter()
                .filter(|w| w.kind == WarningKind::Conflict as i32)
                .count();
            assert_eq!(conflict_warnings, 1, "one CONFLICT warning per entry");
        }
    }
}

#[test]
fn agreeing_organisations_raise_no_conflict() {
    let a = allergy("active", VerificationStatus::Confirmed, "2019-01-01");
    let b = allergy("active", VerificationStatus::Confirmed, "2026-11-02");
    let merged = run(
        2,
        &[answer(0, allergies(vec![a])), answer(1, allergies(vec![b]))],
    );
    let e = &merged.record.allergies[0];
    assert!(e.conflicts.is_empty(), "{:?}", e.conflicts);
    assert!(!has(&merged, WarningKind::Conflict));
    let statuses: Vec<&str> = e.provenance.iter().map(|p| p.status.as_str()).collect();
    assert_eq!(statuses, ["active", "active"]);
    let recorded: Vec<&str> = e.provenance.iter().map(|p| p.recorded.as_str()).collect();
    assert_eq!(recorded, ["2019-01-01", "2026-11-02"]);
}

#[test]
fn conflict_warning_names_the_entry_and_the_organisations() {
    let merged = run(
        2,
        &[
            answer(
                0,
                allergies(vec![allergy(
                    "active",
                    VerificationStatus::Confirmed,
                    "2026-10-01",
                )]),
            ),
            answer(
                1,
                allergies(vec![allergy(
                    "resolved",
                    VerificationStatus::Confirmed,
                    "2020-10-01",
                )]),
            ),
        ],
    );
    let w = merged
        .warnings
        .iter()
        .find(|w| w.kind == WarningKind::Conflict as i32)
        .expect("conflict warning");
    assert!(w.message.contains("Penicillin allergy"), "{}", w.message);
    assert!(w.message.contains("ORG0 active"), "{}", w.message);
    assert!(w.message.contains("ORG1 resolved"), "{}", w.message);
    assert_eq!(w.source_ids, ["s0", "s1"]);
}

/// A small generated record for the order-independence property.
fn arb_entry() -> impl Strategy<Value = (usize, Entry)> {
    let statuses = prop::sample::select(vec!["active", "resolved", "inactive", ""]);
    let days = prop::sample::select(vec!["", "2020-01-01", "2024-06-30", "2026-11-02"]);
    let codes = prop::sample::select(vec!["1", "2", "3"]);
    let verification = prop::sample::select(vec![
        VerificationStatus::Unspecified,
        VerificationStatus::Confirmed,
        VerificationStatus::Refuted,
        VerificationStatus::EnteredInError,
        VerificationStatus::Unconfirmed,
    ]);
    let crit = prop::sample::select(vec!["", "low", "high"]);
    (
        0usize..3,
        codes,
        statuses,
        days.clone(),
        days,
        verification,
        crit,
        0u8..3,
    )
        .prop_map(|(src, code, st, rec, eff, ver, crit, n)| {
            let mut e = allergy(st, ver, rec);
            e.concept = coded(code);
            e.effective = eff.into();
            if let Some(Detail::Allergy(a)) = e.detail.as_mut() {
                a.criticality = crit.into();
            }
            e.provenance = vec![Provenance {
                source_entry_id: format!("e{code}{}", "x".repeat(usize::from(n))),
                ..Provenance::default()
            }];
            (src, e)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// The record (entries, provenance, conflicts, headline values) and the conflict warnings
    /// do not depend on the order answers arrive in nor on configuration order.
    #[test]
    fn merge_is_independent_of_answer_and_configuration_order(
        entries in prop::collection::vec(arb_entry(), 0..9),
        order in Just(vec![0usize, 1, 2]).prop_shuffle(),
        arrival in Just(vec![0usize, 1, 2]).prop_shuffle(),
        people in prop::collection::vec(0usize..4, 3),
    ) {
        let mut records = [CareRecord::default(), CareRecord::default(), CareRecord::default()];
        // Each source's demographics: none, or one of three people (two of them compatible),
        // so evenly split and outvoted sources both occur.
        for (record, person) in records.iter_mut().zip(&people) {
            record.patient = match person {
                1 => Some(patient("SMITH", "1950-01-01", "", "")),
                2 => Some(patient("SMITH", "1960-01-01", "", "")),
                3 => Some(patient("", "1950-01-01", "", "")),
                _ => None,
            };
        }
        for (src, e) in entries {
            records[src].conditions.push(e.clone());
            // The same assertion as a medicine row: statement, authorisation or issue.
            let (kind, intent) = [("statement", ""), ("request", "plan"), ("request", "order")]
                [e.provenance[0].source_entry_id.len() % 3];
            let mut m = medicine(kind, intent, &e.status, &e.effective, &e.recorded);
            m.concept = e.concept.clone();
            m.provenance = e.provenance.clone();
            records[src].medications.push(m);
            records[src].allergies.push(e);
        }
        // Reference: configuration order s0, s1, s2, answers in that order.
        let answers: Vec<Arc<Answer>> = (0..3).map(|i| answer(i, records[i].clone())).collect();
        let reference = run(3, &answers);

        // Permuted: configuration position p holds source order[p]; answers arrive shuffled.
        let asked: Vec<Asked> = order.iter().map(|&s| Asked { info: info(s), selected_by: "all".into() }).collect();
        let permuted: Vec<Arc<Answer>> = arrival
            .iter()
            .map(|&p| {
                let s = order[p];
                let mut a = (*answer(s, records[s].clone())).clone_for_test();
                a.index = p;
                Arc::new(a)
            })
            .collect();
        let other = merge(MergeInput::new(nhs(), &asked, &permuted, today(), Instant::now()));
        prop_assert_eq!(&reference.record, &other.record);
        let conflicts = |m: &MergedRecord| -> Vec<String> {
            let mut v: Vec<String> = m
                .warnings
                .iter()
                .filter(|w| w.kind == WarningKind::Conflict as i32)
                .map(|w| w.message.clone())
                .collect();
            v.sort();
            v
        };
        prop_assert_eq!(conflicts(&reference), conflicts(&other));
        let mismatches = |m: &MergedRecord| -> Vec<Warning> {
            let mut v: Vec<Warning> = m
                .warnings
                .iter()
                .filter(|w| w.kind == WarningKind::DemographicsMismatch as i32)
                .cloned()
                .collect();
            v.sort_by(|a, b| a.message.cmp(&b.message));
            v
        };
        prop_assert_eq!(mismatches(&reference), mismatches(&other));
    }
}

trait CloneForTest {
    fn clone_for_test(&self) -> Answer;
}

impl CloneForTest for Answer {
    fn clone_for_test(&self) -> Answer {
        Answer {
            index: self.index,
            status: self.status.clone(),
            cut_short: self.cut_short,
            record: self.record.clone(),
        }
    }
}

// ---- verification status ---------------------------------------------------------------------

#[test]
fn verification_status_rules() {
    // (assertions by organisation, expected entries, expected status, expected verification,
    //  expected verification conflict)
    type Case = (Vec<Entry>, usize, &'static str, VerificationStatus, bool);
    let cases: Vec<Case> = vec![
        // Refuted alone: still visible, never current.
        (
            vec![allergy("active", VerificationStatus::Refuted, "2026-01-01")],
            1,
            "refuted",
            VerificationStatus::Refuted,
            false,
        ),
        // Entered in error alone: removed.
        (
            vec![allergy(
                "active",
                VerificationStatus::EnteredInError,
                "2026-01-01",
            )],
            0,
            "",
            VerificationStatus::Unspecified,
            false,
        ),
        // Entered in error at one organisation, current at another: kept, with a conflict
        // naming the entered-in-error assertion, even though it is the more recent.
        (
            vec![
                allergy("active", VerificationStatus::EnteredInError, "2026-11-01"),
                allergy("active", VerificationStatus::Confirmed, "2020-01-01"),
            ],
            1,
            "active",
            VerificationStatus::Confirmed,
            true,
        ),
        // Unconfirmed is kept as such.
        (
            vec![allergy(
                "active",
                VerificationStatus::Unconfirmed,
                "2026-01-01",
            )],
            1,
            "active",
            VerificationStatus::Unconfirmed,
            false,
        ),
        // Provisional (a condition-style status on an allergy entry: the rule is the same).
        (
            vec![allergy(
                "active",
                VerificationStatus::Provisional,
                "2026-01-01",
            )],
            1,
            "active",
            VerificationStatus::Provisional,
            false,
        ),
    ];
    for (said, want_len, want_status, want_ver, want_conflict) in cases {
        let answers: Vec<Arc<Answer>> = said
            .iter()
            .enumerate()
            .map(|(i, e)| answer(i, allergies(vec![e.clone()])))
            .collect();
        let merged = run(said.len(), &answers);
        assert_eq!(merged.record.allergies.len(), want_len, "{said:?}");
        let Some(e) = merged.record.allergies.first() else {
            continue;
        };
        assert_eq!(e.status, want_status);
        assert_eq!(e.verification_status, want_ver as i32);
        let conflict = e
            .conflicts
            .iter()
            .find(|c| c.field == "verification_status");
        assert_eq!(conflict.is_some(), want_conflict, "{:?}", e.conflicts);
        if let Some(c) = conflict {
            assert!(
                c.values.iter().any(|v| v.value == "entered-in-error"),
                "{c:?}"
            );
        }
    }
}

#[test]
fn refuted_entries_sort_after_current_ones() {
    let mut refuted = allergy("active", VerificationStatus::Refuted, "2026-11-01");
    refuted.effective = "2026-11-01".into();
    let mut other = entry("300916003", "2001-01-01", "s0");
    other.status = "active".into();
    let merged = run(1, &[answer(0, allergies(vec![refuted, other]))]);
    let order: Vec<&str> = merged.record.allergies.iter().map(code_of).collect();
    assert_eq!(order, ["300916003", "91936005"]);
}

#[test]
fn an_entered_in_error_only_section_is_none_recorded() {
    let merged = run(
        1,
        &[answer(
            0,
            allergies(vec![allergy(
                "active",
                VerificationStatus::EnteredInError,
                "",
            )]),
        )],
    );
    let s = section_status(&merged, Section::Allergies);
    assert_eq!(s.state, SectionState::NoneRecorded as i32);
}

// ---- "no known allergy" --------------------------------------------------------------------

#[test]
fn no_known_allergy_contradicted_by_an_active_allergy_is_flagged() {
    for order in [[0, 1], [1, 0]] {
        let merged = run(
            2,
            &[
                answer(order[0], allergies(vec![no_known_allergy()])),
                answer(
                    order[1],
                    allergies(vec![allergy(
                        "active",
                        VerificationStatus::Confirmed,
                        "2026-01-01",
                    )]),
                ),
            ],
        );
        assert_eq!(merged.record.allergies.len(), 2, "never merged together");
        let nka = merged
            .record
            .allergies
            .iter()
            .find(|e| e.asserts_absence)
            .expect("the assertion is kept");
        let c = &nka.conflicts[0];
        assert_eq!(c.field, "assertion");
        assert_eq!(c.values.len(), 2);
        let w = merged
            .warnings
            .iter()
            .find(|w| w.kind == WarningKind::Conflict as i32)
            .expect("conflict warning");
        let nka_org = format!("ORG{}", order[0]);
        let allergy_org = format!("ORG{}", order[1]);
        assert!(
            w.message
                .contains(&format!("{nka_org} says no known allergy")),
            "{}",
            w.message
        );
        assert!(
            w.message.contains(&format!(
                "{allergy_org} reports active allergy to Penicillin allergy"
            )),
            "{}",
            w.message
        );
    }
}

#[test]
fn no_known_allergy_is_not_contradicted_by_a_resolved_or_refuted_allergy() {
    for other in [
        allergy("resolved", VerificationStatus::Confirmed, "2026-01-01"),
        allergy("active", VerificationStatus::Refuted, "2026-01-01"),
    ] {
        let merged = run(
            2,
            &[
                answer(0, allergies(vec![no_known_allergy()])),
                answer(1, allergies(vec![other])),
            ],
        );
        assert!(!has(&merged, WarningKind::Conflict));
        assert!(
            merged
                .record
                .allergies
                .iter()
                .all(|e| e.conflicts.is_empty())
        );
    }
}

#[test]
fn a_no_known_allergy_assertion_never_merges_with_an_allergy_of_the_same_code() {
    let mut odd = no_known_allergy();
    odd.asserts_absence = false;
    let merged = run(
        2,
        &[
            answer(0, allergies(vec![no_known_allergy()])),
            answer(1, allergies(vec![odd])),
        ],
    );
    assert_eq!(merged.record.allergies.len(), 2);
}

// ---- empty vs unknown, data cut short ------------------------------------------------------

#[test]
fn section_statuses_tell_none_recorded_from_unknown() {
    let merged = run(
        4,
        &[
            answer(
                0,
                allergies(vec![allergy("active", VerificationStatus::Confirmed, "")]),
            ),
            answer(1, CareRecord::default()),
            failed(2, SourceOutcome::Timeout),
            Arc::new(Answer {
                index: 3,
                status: status(3, SourceOutcome::NotFound),
                cut_short: false,
                record: None,
            }),
        ],
    );
    assert_eq!(merged.section_statuses.len(), Section::ALL.len());
    let order: Vec<i32> = merged.section_statuses.iter().map(|s| s.section).collect();
    let want: Vec<i32> = Section::ALL.iter().map(|s| *s as i32).collect();
    assert_eq!(order, want, "every section, in Section order");
    let a = section_status(&merged, Section::Allergies);
    assert_eq!(a.state, SectionState::Partial as i32);
    let states: Vec<i32> = a.sources.iter().map(|s| s.state).collect();
    assert_eq!(
        states,
        [
            SourceSectionState::Entries as i32,
            SourceSectionState::NoneRecorded as i32,
            SourceSectionState::Unknown as i32,
            SourceSectionState::NoneRecorded as i32,
        ]
    );
    assert_eq!(
        a.summary,
        "Allergies: recorded by ORG0 (1); none recorded by ORG1; patient not known to ORG3; unknown from ORG2 — timed out"
    );
    let c = section_status(&merged, Section::Conditions);
    assert!(
        c.summary
            .starts_with("Conditions: none recorded by ORG0, ORG1")
    );
    assert_eq!(c.state, SectionState::Partial as i32);

    // Everyone answered, nobody recorded anything: NONE_RECORDED, not UNKNOWN.
    let all_answered = run(
        2,
        &[
            answer(0, CareRecord::default()),
            answer(1, CareRecord::default()),
        ],
    );
    let a = section_status(&all_answered, Section::Allergies);
    assert_eq!(a.state, SectionState::NoneRecorded as i32);
    assert_eq!(a.summary, "Allergies: none recorded by ORG0, ORG1");
    assert!(all_answered.complete);

    // Nobody answered: UNKNOWN.
    let nobody = run(1, &[failed(0, SourceOutcome::Error)]);
    let a = section_status(&nobody, Section::Allergies);
    assert_eq!(a.state, SectionState::Unknown as i32);
    assert_eq!(a.summary, "Allergies: unknown from ORG0 — error");
}

#[test]
fn sections_not_requested_say_so() {
    let asked = asked_n(1);
    let answers = [answer(0, CareRecord::default())];
    let mut input = MergeInput::new(nhs(), &asked, &answers, today(), Instant::now());
    input.sections = SectionSet::NONE.with(Section::Allergies);
    let merged = merge(input);
    assert_eq!(merged.section_statuses.len(), Section::ALL.len());
    let c = section_status(&merged, Section::Conditions);
    assert_eq!(c.state, SectionState::Unspecified as i32);
    assert_eq!(c.summary, "Conditions: not requested");
}

#[test]
fn not_asked_organisations_are_listed() {
    let asked = asked_n(1);
    let answers = [answer(0, CareRecord::default())];
    let not_asked = [info(7)];
    let mut input = MergeInput::new(nhs(), &asked, &answers, today(), Instant::now());
    input.not_asked = &not_asked;
    let merged = merge(input);
    let a = section_status(&merged, Section::Allergies);
    assert_eq!(a.state, SectionState::NoneRecorded as i32);
    assert_eq!(
        a.summary,
        "Allergies: none recorded by ORG0; not asked: ORG7"
    );
}

#[test]
fn data_cut_short_makes_the_source_partial_and_the_record_incomplete() {
    // (shortfalls, entry marked incomplete)
    let cases: Vec<(Vec<Shortfall>, bool)> = vec![
        (
            vec![Shortfall {
                sections: SectionSet::NONE.with(Section::Medications),
                reason: "medications cut at the 20-page limit".into(),
            }],
            false,
        ),
        (Vec::new(), true),
    ];
    for (shortfalls, incomplete_entry) in cases {
        let mut med = medicine("issue", "order", "active", "2026-11-01", "1 bd");
        if incomplete_entry {
            med.incomplete = true;
            med.incomplete_reason = "medication reference not resolved".into();
        }
        let merged = run(
            1,
            &[answer_with(
                0,
                SourceRecord {
                    record: medications(vec![med]),
                    shortfalls,
                    ..SourceRecord::default()
                },
            )],
        );
        assert_eq!(merged.sources[0].outcome, SourceOutcome::Partial as i32);
        assert!(!merged.sources[0].message.is_empty());
        assert!(!merged.complete);
        assert!(has(&merged, WarningKind::DataCutShort));
        let m = section_status(&merged, Section::Medications);
        assert_eq!(m.state, SectionState::Partial as i32);
        assert_eq!(m.sources[0].state, SourceSectionState::Incomplete as i32);
        assert!(m.summary.contains("incomplete from ORG0"), "{}", m.summary);
        // Other sections of that source are still known.
        let a = section_status(&merged, Section::Allergies);
        assert_eq!(a.state, SectionState::NoneRecorded as i32);
        // What did arrive is shown.
        assert_eq!(merged.record.medications.len(), 1);
    }
}

#[test]
fn a_failed_record_locator_never_gives_a_complete_record() {
    let asked = asked_n(1);
    let answers = [answer(0, CareRecord::default())];
    let mut input = MergeInput::new(nhs(), &asked, &answers, today(), Instant::now());
    input.degraded = true;
    let merged = merge(input);
    assert!(!merged.complete);
    let a = section_status(&merged, Section::Allergies);
    assert_eq!(a.state, SectionState::Partial as i32);
    assert!(a.summary.contains("record locator"), "{}", a.summary);
}

#[test]
fn registered_gp_not_found_makes_the_record_incomplete() {
    let hospital = CareRecord {
        patient: Some(patient("Smith", "1970-01-01", "ORG1", "9434765919")),
        ..CareRecord::default()
    };
    let merged = run(
        2,
        &[
            answer(0, hospital),
            Arc::new(Answer {
                index: 1,
                status: status(1, SourceOutcome::NotFound),
                cut_short: false,
                record: None,
            }),
        ],
    );
    assert!(!merged.complete);
    let w = merged
        .warnings
        .iter()
        .find(|w| w.kind == WarningKind::RegisteredGpNotFound as i32)
        .expect("warning");
    assert_eq!(w.source_ids, ["s1"]);
    let a = section_status(&merged, Section::Allergies);
    assert_eq!(a.sources[1].state, SourceSectionState::Unknown as i32);
    assert_eq!(a.state, SectionState::Partial as i32);

    // A source that is not the registered GP answering NOT_FOUND is normal.
    let hospital = CareRecord {
        patient: Some(patient("Smith", "1970-01-01", "H81005", "")),
        ..CareRecord::default()
    };
    let merged = run(
        2,
        &[
            answer(0, hospital),
            Arc::new(Answer {
                index: 1,
                status: status(1, SourceOutcome::NotFound),
                cut_short: false,
                record: None,
            }),
        ],
    );
    assert!(merged.complete);
}

// ---- wrong patient ---------------------------------------------------------------------------

#[test]
fn wrong_patient_rejects_raise_a_warning_and_make_the_record_incomplete() {
    let merged = run(
        2,
        &[
            answer_with(
                0,
                SourceRecord {
                    record: allergies(vec![allergy("active", VerificationStatus::Confirmed, "")]),
                    wrong_patient: vec!["AllergyIntolerance: subject is Patient/other".into()],
                    ..SourceRecord::default()
                },
            ),
            answer(1, CareRecord::default()),
        ],
    );
    assert!(!merged.complete);
    let w = merged
        .warnings
        .iter()
        .find(|w| w.kind == WarningKind::WrongPatient as i32)
        .expect("wrong patient warning");
    assert_eq!(w.source_ids, ["s0"]);
    assert!(w.message.contains("Org 0"), "{}", w.message);
    assert!(merged.sources[0].message.contains("another patient"));
}

#[test]
fn a_wrong_patient_outcome_is_unknown_and_never_complete() {
    let merged = run(
        2,
        &[
            failed(0, SourceOutcome::WrongPatient),
            answer(1, CareRecord::default()),
        ],
    );
    assert!(!merged.complete);
    assert!(has(&merged, WarningKind::WrongPatient));
    let a = section_status(&merged, Section::Allergies);
    assert_eq!(a.sources[0].state, SourceSectionState::Unknown as i32);
    assert_eq!(a.sources[0].reason, "answered about another patient");
}

#[test]
fn demographics_with_another_nhs_number_are_ignored_and_its_entries_disputed() {
    let mut r0 = allergies(vec![allergy("active", VerificationStatus::Confirmed, "")]);
    r0.patient = Some(patient("Other", "1950-05-05", "ORG9", "9990000018"));
    let r1 = CareRecord {
        patient: Some(patient("Smith", "1970-01-01", "ORG1", "943 476 5919")),
        ..CareRecord::default()
    };
    let merged = run(2, &[answer(0, r0), answer(1, r1)]);
    let p = merged.record.patient.as_ref().expect("patient");
    assert_eq!(p.family_name, "Smith");
    assert_eq!(p.registered_gp_code, "ORG1");
    assert!(has(&merged, WarningKind::WrongPatient));
    assert!(!merged.complete);
    assert!(merged.record.allergies[0].identity_disputed);
    assert!(merged.record.allergies[0].provenance[0].identity_disputed);
}

// ---- demographics ----------------------------------------------------------------------------

/// Source `s` answers `records[s]`; configuration position `p` holds source `order[p]`.
fn merged_in_order(records: &[CareRecord], order: &[usize]) -> MergedRecord {
    let answers: Vec<Arc<Answer>> = order
        .iter()
        .enumerate()
        .map(|(p, &s)| {
            let mut a = answer(s, records[s].clone()).clone_for_test();
            a.index = p;
            Arc::new(a)
        })
        .collect();
    let asked: Vec<Asked> = order
        .iter()
        .map(|&s| Asked {
            info: info(s),
            selected_by: "all".into(),
        })
        .collect();
    merge(MergeInput::new(
        nhs(),
        &asked,
        &answers,
        today(),
        Instant::now(),
    ))
}

#[test]
fn demographics_are_never_borrowed_from_a_disagreeing_source() {
    // s0 and s2 agree; s1 is someone else (other date of birth) and names another GP.
    let mut r0 = allergies(vec![allergy("active", VerificationStatus::Confirmed, "")]);
    r0.patient = Some(patient("Smith", "1970-01-01", "", ""));
    let mut r1 = CareRecord {
        conditions: vec![entry("44054006", "2019", "s1")],
        allergies: vec![allergy("active", VerificationStatus::Confirmed, "")],
        ..CareRecord::default()
    };
    let mut other = patient("Smith", "1980-02-02", "X99999", "");
    other.address = "1 Elsewhere Road".into();
    r1.patient = Some(other);
    let r2 = CareRecord {
        patient: Some(patient("Smith", "1970-01-01", "", "")),
        ..CareRecord::default()
    };
    for order in [[0, 1, 2], [1, 0, 2]] {
        let merged = merged_in_order(&[r0.clone(), r1.clone(), r2.clone()], &order);
        let p = merged.record.patient.as_ref().expect("patient");
        assert_eq!(p.birth_date, "1970-01-01", "the better-supported identity");
        assert!(p.registered_gp_code.is_empty(), "not borrowed: {p:?}");
        assert!(p.address.is_empty(), "not borrowed: {p:?}");
        assert!(has(&merged, WarningKind::DemographicsMismatch));
        // Reported only by the disputed source: marked.
        assert!(merged.record.conditions[0].identity_disputed);
        assert!(merged.record.conditions[0].provenance[0].identity_disputed);
        // Also reported by an undisputed source: not marked as a whole, but its provenance is.
        let a = &merged.record.allergies[0];
        assert!(!a.identity_disputed);
        let disputed: Vec<bool> = a.provenance.iter().map(|p| p.identity_disputed).collect();
        assert_eq!(disputed, [false, true]);
    }
}

#[test]
fn an_even_split_over_who_the_patient_is_marks_nobody_whatever_the_order() {
    // s0 and s1 each report one condition and disagree on the date of birth: one against one.
    let record = |birth: &str, code: &str, source: &str| CareRecord {
        patient: Some(patient("Smith", birth, "", "")),
        conditions: vec![entry(code, "2019", source)],
        ..CareRecord::default()
    };
    let records = [
        record("1970-01-01", "44054006", "s0"),
        record("1980-02-02", "195967001", "s1"),
    ];
    let mut births = Vec::new();
    for order in [[0, 1], [1, 0]] {
        let merged = merged_in_order(&records, &order);
        assert!(
            merged
                .record
                .conditions
                .iter()
                .all(|e| !e.identity_disputed),
            "{order:?}: {:?}",
            merged.record.conditions
        );
        let w = merged
            .warnings
            .iter()
            .find(|w| w.kind == WarningKind::DemographicsMismatch as i32)
            .expect("the split is still flagged");
        assert!(w.message.contains("evenly split"), "{}", w.message);
        births.push(merged.record.patient.expect("patient").birth_date);
    }
    assert_eq!(
        births[0], births[1],
        "the banner does not depend on configuration order"
    );
}

// ---- medicines -------------------------------------------------------------------------------

#[test]
fn medicines_are_grouped_into_one_entry_with_current_and_latest_issue() {
    let gp = medications(vec![
        medicine(
            "request",
            "plan",
            "active",
            "2025-01-10",
            "1 tablet twice a day",
        ),
        medicine(
            "request",
            "order",
            "completed",
            "2026-10-01",
            "1 tablet twice a day",
        ),
        medicine(
            "request",
            "order",
            "completed",
            "2026-11-15",
            "1 tablet twice a day",
        ),
    ]);
    let hospital = medications(vec![medicine(
        "statement",
        "",
        "active",
        "2026-09-01",
        "1 tablet twice a day",
    )]);
    let merged = run(2, &[answer(0, gp), answer(1, hospital)]);
    assert_eq!(merged.record.medications.len(), 1, "one row per medicine");
    let m = &merged.record.medications[0];
    let Some(Detail::Medication(d)) = &m.detail else {
        panic!("medication detail")
    };
    assert!(d.current);
    assert_eq!(d.latest_issue, "2026-11-15");
    assert_eq!(d.rows, 4);
    let kinds: Vec<&str> = m.provenance.iter().map(|p| p.kind.as_str()).collect();
    assert_eq!(kinds, ["authorisation", "issue", "issue", "statement"]);
    assert!(m.conflicts.is_empty(), "{:?}", m.conflicts);
}

#[test]
fn medicine_current_or_past() {
    // (rows by organisation, current?, status conflict?)
    type Case = (&'static str, Vec<Vec<Entry>>, bool, bool);
    let cases: Vec<Case> = vec![
        (
            "an issue last month alone is current",
            vec![vec![medicine(
                "request",
                "order",
                "completed",
                "2026-11-01",
                "",
            )]],
            true,
            false,
        ),
        (
            "an issue a year ago alone is past",
            vec![vec![medicine(
                "request",
                "order",
                "completed",
                "2025-11-01",
                "",
            )]],
            false,
            false,
        ),
        (
            "the hospital stopped it after the GP's last issue: past, and a conflict",
            vec![
                vec![
                    medicine("request", "plan", "active", "2024-01-01", ""),
                    medicine("request", "order", "completed", "2026-10-01", ""),
                ],
                vec![medicine("statement", "", "stopped", "2026-11-20", "")],
            ],
            false,
            true,
        ),
        (
            "issued again after the stop: current",
            vec![
                vec![medicine("request", "order", "completed", "2026-11-25", "")],
                vec![medicine("statement", "", "stopped", "2026-11-20", "")],
            ],
            true,
            false,
        ),
    ];
    for (name, by_org, current, conflict) in cases {
        let answers: Vec<Arc<Answer>> = by_org
            .iter()
            .enumerate()
            .map(|(i, rows)| answer(i, medications(rows.clone())))
            .collect();
        let merged = run(by_org.len(), &answers);
        assert_eq!(merged.record.medications.len(), 1, "{name}");
        let m = &merged.record.medications[0];
        let Some(Detail::Medication(d)) = &m.detail else {
            panic!("{name}")
        };
        assert_eq!(d.current, current, "{name}");
        assert_eq!(
            m.conflicts.iter().any(|c| c.field == "status"),
            conflict,
            "{name}: {:?}",
            m.conflicts
        );
    }
}

#[test]
fn medicine_dose_disagreement_is_a_conflict() {
    let merged = run(
        2,
        &[
            answer(
                0,
                medications(vec![medicine(
                    "statement",
                    "",
                    "active",
                    "2026-01-01",
                    "500mg bd",
                )]),
            ),
            answer(
                1,
                medications(vec![medicine(
                    "statement",
                    "",
                    "active",
                    "2026-06-01",
                    "1g bd",
                )]),
            ),
        ],
    );
    let m = &merged.record.medications[0];
    let c = m
        .conflicts
        .iter()
        .find(|c| c.field == "dosage")
        .expect("dosage conflict");
    assert!(c.resolution.starts_with("1g bd"), "{c:?}");
    assert!(has(&merged, WarningKind::Conflict));
}

// ---- a federated region missing --------------------------------------------------------------

#[test]
fn a_federated_region_whose_sources_did_not_answer_makes_the_record_incomplete() {
    use carerecord_adapters::SourceReply;
    use carerecord_adapters::federation::reply_from;
    let remote = carerecord_proto::GetCareRecordResponse {
        sources: vec![SourceStatus {
            source_id: "gp".into(),
            organisation_code: "H81005".into(),
            outcome: SourceOutcome::Error as i32,
            ..SourceStatus::default()
        }],
        complete: false,
        ..carerecord_proto::GetCareRecordResponse::default()
    };
    let SourceReply::Found(record) = reply_from(&info(1), remote, SectionSet::ALL) else {
        panic!("found");
    };
    let merged = run(
        2,
        &[answer(0, CareRecord::default()), answer_with(1, record)],
    );
    assert!(!merged.complete);
    assert_eq!(merged.sources[1].outcome, SourceOutcome::Partial as i32);
    assert!(merged.sources[1].message.contains("H81005 (error)"));
    assert!(has(&merged, WarningKind::DataCutShort));
    let a = section_status(&merged, Section::Allergies);
    assert_eq!(a.state, SectionState::Partial as i32);
    assert_eq!(a.sources[1].state, SourceSectionState::Incomplete as i32);
}

#[test]
fn medicine_rows_sharing_a_coding_are_one_medicine_in_any_order() {
    let vmp = Coding {
        system: "https://dmd.nhs.uk".into(),
        code: "325242007".into(),
        display: "Metformin 500mg tablets".into(),
    };
    let amp = Coding {
        system: "https://dmd.nhs.uk".into(),
        code: "3361911000001103".into(),
        display: "Glucophage 500mg tablets".into(),
    };
    // The GP names the generic; the hospital names the brand and gives the generic too.
    let gp = medicine("statement", "", "active", "2026-01-01", "");
    let mut hospital = medicine("request", "order", "completed", "2026-11-01", "");
    hospital.concept = Some(amp.clone());
    hospital.codings = vec![amp, vmp];
    // An unrelated medicine stays apart.
    let mut other = medicine("statement", "", "active", "2026-01-01", "");
    other.concept = coded("999");
    for order in [[0, 1], [1, 0]] {
        let records = [
            medications(vec![gp.clone(), other.clone()]),
            medications(vec![hospital.clone()]),
        ];
        let answers: Vec<Arc<Answer>> = order
            .iter()
            .map(|&i| answer(i, records[i].clone()))
            .collect();
        let merged = run(2, &answers);
        assert_eq!(merged.record.medications.len(), 2, "{order:?}");
        let metformin = merged
            .record
            .medications
            .iter()
            .find(|m| m.provenance.len() == 2)
            .expect("grouped");
        let Some(Detail::Medication(d)) = &metformin.detail else {
            panic!("detail")
        };
        assert_eq!(d.latest_issue, "2026-11-01");
        assert!(d.current);
    }
}

#[test]
fn section_statuses_restricted_to_one_organisation_say_nothing_of_the_others() {
    let merged = run(
        2,
        &[
            answer(
                0,
                allergies(vec![allergy("active", VerificationStatus::Confirmed, "")]),
            ),
            failed(1, SourceOutcome::Timeout),
        ],
    );
    let own =
        restrict_section_statuses(&merged.section_statuses, |s| s.organisation_code == "ORG0");
    assert_eq!(own.len(), Section::ALL.len());
    let a = own
        .iter()
        .find(|s| s.section == Section::Allergies as i32)
        .expect("allergies");
    assert_eq!(a.state, SectionState::Recorded as i32);
    assert_eq!(a.summary, "Allergies: recorded by ORG0 (1)");
    assert!(own.iter().all(|s| !s.summary.contains("ORG1")));
}
