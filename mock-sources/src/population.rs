//! The synthetic region: organisations and the people they know, generated from a seed.
//!
//! Only what every request needs is held in memory (demographics, which organisations know each
//! person, long-term conditions as a bit set); clinical records are built on demand from the same
//! seed by the `record` module, so a 10,000-patient region generates in milliseconds and the same
//! request always returns the same bytes. Realism that the broker's behaviour depends on is
//! deliberate: one GP per patient, hospitals knowing most but not all, ~3% of patients whose
//! demographics disagree between organisations, and NHS numbers in the never-issued 999 range.

use std::collections::HashMap;
use std::fmt;

use crate::nhs::NhsNumber;
use serde::Serialize;

use crate::calendar;
use crate::codes::{self, Specialty};
use crate::names;
use crate::prng::Prng;

/// What to generate. Everything else follows from the seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSpec {
    pub seed: u64,
    /// Number of synthetic patients (capped at [`MAX_PATIENTS`]).
    pub patients: usize,
    /// Number of organisations (1..=[`MAX_ORGANISATIONS`]); 10 gives a realistic small region.
    /// Above [`SMALL_REGION_MAX`] the mix is a whole area's (for 3,000: ~1,200 GP practices,
    /// 40 acute trusts, 3 mental health trusts, 1 ambulance service, the rest care homes) and
    /// every patient is known to 3–8 organisations.
    pub organisations: usize,
    /// Default search page size (`_count` overrides it per request; capped at 100).
    pub page_size: usize,
}

impl Default for RegionSpec {
    fn default() -> Self {
        RegionSpec {
            seed: 42,
            patients: 10_000,
            organisations: 10,
            page_size: 20,
        }
    }
}

/// The 999 range holds ~909,000 valid NHS numbers; leave room for [`Region::unknown_nhs_number`].
pub const MAX_PATIENTS: usize = 900_000;
pub const MAX_ORGANISATIONS: usize = 5000;
/// Regions up to this many organisations keep the original small-region mix and patient
/// assignment (so their data is unchanged); larger ones are laid out like a real area.
pub const SMALL_REGION_MAX: usize = 50;
const FIRST_STEM: u32 = 999_000_000;

/// The kind of organisation, which decides what it records and how fast it answers by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OrgKind {
    GpPractice,
    AcuteTrust,
    MentalHealthTrust,
    AmbulanceService,
    CareHome,
}

impl OrgKind {
    /// Stable machine name (`gp_practice`, ...), as used in the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            OrgKind::GpPractice => "gp_practice",
            OrgKind::AcuteTrust => "acute_trust",
            OrgKind::MentalHealthTrust => "mental_health_trust",
            OrgKind::AmbulanceService => "ambulance_service",
            OrgKind::CareHome => "care_home",
        }
    }

    /// What a person would call it.
    pub fn label(self) -> &'static str {
        match self {
            OrgKind::GpPractice => "GP practice",
            OrgKind::AcuteTrust => "Acute trust",
            OrgKind::MentalHealthTrust => "Mental health trust",
            OrgKind::AmbulanceService => "Ambulance service",
            OrgKind::CareHome => "Care home",
        }
    }
}

impl std::fmt::Display for OrgKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// One source organisation of the region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Organisation {
    /// ODS-style code, e.g. `A81001` (GP), `RJ1` (trust), `VM123` (care home).
    pub code: String,
    pub name: String,
    pub kind: OrgKind,
}

/// Which demographic item an organisation holds differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictField {
    FamilyName,
    BirthDate,
}

/// One organisation's disagreeing version of a patient's demographics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DemographicConflict {
    pub organisation: String,
    pub field: ConflictField,
    /// The value that organisation holds (family name, or `YYYY-MM-DD`).
    pub value: String,
}

/// What two organisations disagree on in clinical conflict mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClinicalConflictKind {
    /// An allergy active at the GP is resolved at the other organisation.
    AllergyResolved,
    /// An allergy active at the GP is refuted at the other organisation.
    AllergyRefuted,
    /// The GP asserts "no known allergy" (716186003); the other organisation has an active
    /// allergy (`code`).
    NoKnownAllergy,
    /// A medicine active at the GP is stopped at the other organisation.
    MedicineStopped,
    /// The other organisation records another dose of a medicine.
    Dosage,
}

/// A patient's clinical conflict: served only by organisations in conflict data mode
/// ([`crate::DataMode::Conflicts`]); the GP holds the reference version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClinicalConflict {
    pub kind: ClinicalConflictKind,
    /// The patient's GP practice (its version is the reference one).
    pub gp: String,
    /// The organisation that disagrees, when its conflict mode is on.
    pub organisation: String,
    /// The SNOMED CT / dm+d code of the fact they disagree on (the allergy or medicine).
    pub code: String,
    pub display: String,
    /// What the GP says (a status, a dose, or "no known allergy (716186003)").
    pub gp_says: String,
    /// What the other organisation says.
    pub organisation_says: String,
}

/// A patient as the region's index knows them: the truth, plus where they are known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PatientSummary {
    #[serde(serialize_with = "ser_nhs")]
    pub nhs_number: NhsNumber,
    pub family: String,
    pub given: String,
    /// FHIR administrative gender: `female` or `male`.
    pub gender: &'static str,
    /// `YYYY-MM-DD`.
    pub birth_date: String,
    /// Code of the GP practice the patient is registered with.
    pub gp: String,
    /// Codes of every organisation that knows the patient, GP first.
    pub organisations: Vec<String>,
    pub conflict: Option<DemographicConflict>,
    /// What their GP and another organisation disagree on in clinical conflict mode (about
    /// one patient in ten known to more than their GP).
    pub clinical_conflict: Option<ClinicalConflict>,
}

fn ser_nhs<S: serde::Serializer>(n: &NhsNumber, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&n.as_digits())
}

impl PatientSummary {
    /// `SMITH, Jane`, as clinical systems show names.
    pub fn display_name(&self) -> String {
        format!("{}, {}", self.family.to_uppercase(), self.given)
    }
}

/// How one organisation's copy of the demographics differs from the truth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Conflict {
    Family(String),
    Birth(i64),
}

/// A person in the region (internal; [`PatientSummary`] is the public view).
#[derive(Debug, Clone)]
pub(crate) struct Person {
    pub nhs: NhsNumber,
    pub family: &'static str,
    pub given: &'static str,
    pub female: bool,
    pub birth: i64,
    pub house: u16,
    pub street: &'static str,
    pub town: &'static str,
    pub postcode: String,
    /// Indices into the organisation list, GP first, no duplicates.
    pub orgs: Vec<u16>,
    pub conflict: Option<(u16, Conflict)>,
    /// Long-term conditions: bit `i` set means `codes::CONDITIONS[i]`.
    pub conditions: u32,
}

impl Person {
    pub fn has_condition(&self, i: usize) -> bool {
        self.conditions & (1 << i) != 0
    }

    /// The family name and birth date as organisation `org` holds them.
    pub fn demographics_at(&self, org: usize) -> (String, i64) {
        match &self.conflict {
            Some((o, Conflict::Family(f))) if usize::from(*o) == org => (f.clone(), self.birth),
            Some((o, Conflict::Birth(b))) if usize::from(*o) == org => {
                (self.family.to_string(), *b)
            }
            _ => (self.family.to_string(), self.birth),
        }
    }
}

/// The generated population: immutable after [`Region::generate`], shared behind an `Arc`.
#[derive(Debug)]
pub struct Region {
    spec: RegionSpec,
    /// "Today" for the region, derived from the seed, so output never depends on the wall clock.
    reference_day: i64,
    organisations: Vec<Organisation>,
    by_code: HashMap<String, usize>,
    people: Vec<Person>,
    /// The first valid NHS number after the population's: nobody in the region has it.
    unknown: NhsNumber,
}

// Purpose tags for derived generators.
const TAG_ORGS: u64 = 1;
const TAG_PERSON: u64 = 2;
const TAG_LOCATOR: u64 = 0x10C;

impl Region {
    /// Generates the region for `spec`. Deterministic: the same spec gives the same region.
    pub fn generate(spec: &RegionSpec) -> Region {
        let mut spec = spec.clone();
        spec.patients = spec.patients.min(MAX_PATIENTS);
        spec.organisations = spec.organisations.clamp(1, MAX_ORGANISATIONS);
        spec.page_size = spec.page_size.clamp(1, 100);
        let seed = spec.seed;
        // 2026-01-05 plus up to eight weeks, so different seeds see different "todays".
        let reference_day = calendar::days_from_civil(2026, 1, 5) + (seed % 56) as i64;
        let organisations = generate_organisations(seed, spec.organisations);
        let by_code = organisations
            .iter()
            .enumerate()
            .map(|(i, o)| (o.code.to_ascii_uppercase(), i))
            .collect();
        let layout = Layout::of(&organisations);

        let mut people = Vec::with_capacity(spec.patients);
        let mut stem = FIRST_STEM;
        while people.len() < spec.patients {
            if let Some(nhs) = NhsNumber::from_stem(stem) {
                let index = people.len() as u64;
                people.push(generate_person(seed, index, nhs, reference_day, &layout));
            }
            stem += 1;
        }
        let unknown = (stem..=999_999_999)
            .find_map(NhsNumber::from_stem)
            .expect("MAX_PATIENTS leaves valid numbers free at the top of the 999 range");
        Region {
            spec,
            reference_day,
            organisations,
            by_code,
            people,
            unknown,
        }
    }

    /// The spec actually used (after capping).
    pub fn spec(&self) -> &RegionSpec {
        &self.spec
    }

    /// The region's "today" (`YYYY-MM-DD`): clinical dates are before it, appointments after it.
    pub fn reference_date(&self) -> String {
        calendar::date(self.reference_day)
    }

    pub fn organisations(&self) -> &[Organisation] {
        &self.organisations
    }

    /// Looks an organisation up by code, ignoring case.
    pub fn organisation(&self, code: &str) -> Option<&Organisation> {
        self.org_index(code).map(|i| &self.organisations[i])
    }

    pub fn patient_count(&self) -> usize {
        self.people.len()
    }

    /// Every patient, in NHS number order.
    pub fn patients(&self) -> impl Iterator<Item = PatientSummary> + '_ {
        (0..self.people.len()).map(move |i| self.summary(i))
    }

    /// The patient with this NHS number. Takes anything that displays as the ten digits: this
    /// crate's [`NhsNumber`], the broker's own NHS number type, or the digits as text.
    pub fn patient(&self, nhs_number: &(impl fmt::Display + ?Sized)) -> Option<PatientSummary> {
        self.index_of(nhs_number).map(|i| self.summary(i))
    }

    /// Patients known to at least `n` organisations (GP included).
    pub fn patients_known_to_at_least(
        &self,
        n: usize,
    ) -> impl Iterator<Item = PatientSummary> + '_ {
        (0..self.people.len())
            .filter(move |&i| self.people[i].orgs.len() >= n)
            .map(move |i| self.summary(i))
    }

    /// Patients known only to their GP practice.
    pub fn patients_known_only_to_one(&self) -> impl Iterator<Item = PatientSummary> + '_ {
        self.patients_known_to_at_least(1)
            .filter(|p| p.organisations.len() == 1)
    }

    /// Patients with a clinical conflict (see [`ClinicalConflict`]): what their GP and another
    /// organisation disagree on once that organisation is in conflict data mode.
    pub fn patients_with_clinical_conflicts(&self) -> impl Iterator<Item = PatientSummary> + '_ {
        (0..self.people.len())
            .filter(move |&i| self.people[i].orgs.len() > 1)
            .map(move |i| self.summary(i))
            .filter(|p| p.clinical_conflict.is_some())
    }

    /// Patients whose family name or birth date differs at one organisation.
    pub fn patients_with_conflicting_demographics(
        &self,
    ) -> impl Iterator<Item = PatientSummary> + '_ {
        (0..self.people.len())
            .filter(move |&i| self.people[i].conflict.is_some())
            .map(move |i| self.summary(i))
    }

    /// A valid NHS number in the 999 range that no organisation in the region knows.
    pub fn unknown_nhs_number(&self) -> NhsNumber {
        self.unknown
    }

    /// The `Patient.id` organisation `org_code` uses for this patient, if it knows them.
    /// (`nhs_number` as for [`Region::patient`].)
    pub fn patient_id_at(
        &self,
        nhs_number: &(impl fmt::Display + ?Sized),
        org_code: &str,
    ) -> Option<String> {
        let p = self.index_of(nhs_number)?;
        let o = self.org_index(org_code)?;
        self.knows(o, p)
            .then(|| patient_id(&self.organisations[o], p))
    }

    /// The organisations a routed broker should ask for every patient: the area's main acute
    /// trusts (the at most two acute trusts that know the most patients, ties in region order)
    /// and the ambulance service(s). Region order.
    pub fn always_ask(&self) -> Vec<String> {
        let mut known = vec![0usize; self.organisations.len()];
        for p in &self.people {
            for &o in &p.orgs {
                known[usize::from(o)] += 1;
            }
        }
        let mut acutes: Vec<usize> = (0..self.organisations.len())
            .filter(|&i| self.organisations[i].kind == OrgKind::AcuteTrust)
            .collect();
        acutes.sort_by_key(|&i| (std::cmp::Reverse(known[i]), i));
        acutes.truncate(2);
        let mut chosen: Vec<usize> = acutes
            .into_iter()
            .chain(
                (0..self.organisations.len())
                    .filter(|&i| self.organisations[i].kind == OrgKind::AmbulanceService),
            )
            .collect();
        chosen.sort_unstable();
        chosen
            .into_iter()
            .map(|i| self.organisations[i].code.clone())
            .collect()
    }

    /// The organisations the region's record locator points to for this patient: everyone who
    /// knows them (GP first), less the pointers a locator missing `missing_fraction` of them
    /// (0..=1, drawn reproducibly per patient and organisation) does not hold. Empty for an
    /// unknown patient. The GP stays findable through `Patient.generalPractitioner` regardless.
    pub fn located_organisations(
        &self,
        nhs_number: &(impl fmt::Display + ?Sized),
        missing_fraction: f64,
    ) -> Vec<String> {
        self.index_of(nhs_number)
            .map(|p| {
                self.pointers(p, missing_fraction)
                    .map(|o| self.organisations[o].code.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Indices of the organisations the locator holds pointers to for person `person`.
    pub(crate) fn pointers(
        &self,
        person: usize,
        missing_fraction: f64,
    ) -> impl Iterator<Item = usize> + '_ {
        let seed = self.spec.seed;
        self.people[person]
            .orgs
            .iter()
            .map(|&o| usize::from(o))
            .filter(move |&o| {
                missing_fraction <= 0.0
                    || Prng::keyed(&[seed, TAG_LOCATOR, person as u64, o as u64]).unit()
                        >= missing_fraction
            })
    }

    /// Who organisation `org_code` answers about instead of this patient under the
    /// `wrong_patient` and `wrong_patient_refs` faults: the next person in the region (NHS
    /// number order, wrapping) that the organisation also knows, else simply the next person.
    /// `None` if the patient or organisation is unknown, or the region has one person.
    pub fn wrong_patient_at(
        &self,
        nhs_number: &(impl fmt::Display + ?Sized),
        org_code: &str,
    ) -> Option<PatientSummary> {
        let p = self.index_of(nhs_number)?;
        let o = self.org_index(org_code)?;
        let other = self.other_person(o, p);
        (other != p).then(|| self.summary(other))
    }

    /// See [`Region::wrong_patient_at`].
    pub(crate) fn other_person(&self, org: usize, person: usize) -> usize {
        let n = self.people.len();
        if n < 2 {
            return person;
        }
        (1..n)
            .map(|k| (person + k) % n)
            .find(|&q| self.knows(org, q))
            .unwrap_or((person + 1) % n)
    }

    pub(crate) fn org_index(&self, code: &str) -> Option<usize> {
        self.by_code.get(&code.to_ascii_uppercase()).copied()
    }

    /// The person whose NHS number displays as `nhs` (ten digits; spaces allowed).
    fn index_of(&self, nhs: &(impl fmt::Display + ?Sized)) -> Option<usize> {
        NhsNumber::parse(&nhs.to_string())
            .ok()
            .and_then(|n| self.person_index(&n))
    }

    pub(crate) fn person_index(&self, nhs: &NhsNumber) -> Option<usize> {
        self.people.binary_search_by(|p| p.nhs.cmp(nhs)).ok()
    }

    pub(crate) fn person(&self, i: usize) -> &Person {
        &self.people[i]
    }

    pub(crate) fn reference_day(&self) -> i64 {
        self.reference_day
    }

    /// Does organisation `org` know person `person`?
    pub(crate) fn knows(&self, org: usize, person: usize) -> bool {
        self.people
            .get(person)
            .is_some_and(|p| p.orgs.iter().any(|&o| usize::from(o) == org))
    }

    fn summary(&self, i: usize) -> PatientSummary {
        let p = &self.people[i];
        let code = |o: u16| self.organisations[usize::from(o)].code.clone();
        PatientSummary {
            nhs_number: p.nhs,
            family: p.family.to_string(),
            given: p.given.to_string(),
            gender: if p.female { "female" } else { "male" },
            birth_date: calendar::date(p.birth),
            gp: code(p.orgs[0]),
            organisations: p.orgs.iter().map(|&o| code(o)).collect(),
            conflict: p.conflict.as_ref().map(|(o, c)| DemographicConflict {
                organisation: code(*o),
                field: match c {
                    Conflict::Family(_) => ConflictField::FamilyName,
                    Conflict::Birth(_) => ConflictField::BirthDate,
                },
                value: match c {
                    Conflict::Family(f) => f.clone(),
                    Conflict::Birth(b) => calendar::date(*b),
                },
            }),
            clinical_conflict: crate::record::clinical_conflict(self, i),
        }
    }
}

/// `Patient.id` at an organisation: organisations use different ids for the same person.
pub(crate) fn patient_id(org: &Organisation, person: usize) -> String {
    format!("{}-{}", org.code.to_ascii_lowercase(), 100_000 + person)
}

/// The person index encoded in a `Patient.id` of organisation `org`.
pub(crate) fn parse_patient_id(org: &Organisation, id: &str) -> Option<usize> {
    let prefix = org.code.to_ascii_lowercase();
    let rest = id.strip_prefix(prefix.as_str())?.strip_prefix('-')?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) || rest.len() > 9 {
        return None;
    }
    rest.parse::<usize>().ok()?.checked_sub(100_000)
}

/// Where each kind of organisation sits in the list, for assigning patients.
struct Layout {
    gps: Vec<usize>,
    acutes: Vec<usize>,
    mental_health: Option<usize>,
    mental_health_all: Vec<usize>,
    ambulance: Option<usize>,
    care_homes: Vec<usize>,
    /// A whole area rather than a small region: see [`scaled_organisations`].
    scaled: bool,
}

impl Layout {
    fn of(orgs: &[Organisation]) -> Layout {
        let of_kind = |k: OrgKind| -> Vec<usize> {
            orgs.iter()
                .enumerate()
                .filter(|(_, o)| o.kind == k)
                .map(|(i, _)| i)
                .collect()
        };
        Layout {
            gps: of_kind(OrgKind::GpPractice),
            acutes: of_kind(OrgKind::AcuteTrust),
            mental_health: of_kind(OrgKind::MentalHealthTrust).first().copied(),
            mental_health_all: of_kind(OrgKind::MentalHealthTrust),
            ambulance: of_kind(OrgKind::AmbulanceService).first().copied(),
            care_homes: of_kind(OrgKind::CareHome),
            scaled: orgs.len() > SMALL_REGION_MAX,
        }
    }
}

/// How many of each kind for `n` organisations. Small regions (up to [`SMALL_REGION_MAX`]):
/// about half GP practices, at least two acute trusts where room allows, one mental health trust
/// and one ambulance service from four up, and care homes with what remains. A whole area (more):
/// 40% GP practices, one acute trust per 75 organisations, one mental health trust per 1,000
/// (1 to 8), one ambulance service, and the rest care homes — London's proportions.
fn kind_counts(n: usize) -> [(OrgKind, usize); 5] {
    let (gp, acute, mh, amb, care) = if n > SMALL_REGION_MAX {
        let acute = (n / 75).max(2);
        let mh = (n / 1000).clamp(1, MENTAL_HEALTH_CODES.len());
        let gp = n * 2 / 5;
        (gp, acute, mh, 1, n - gp - acute - mh - 1)
    } else if n < 4 {
        (1, n - 1, 0, 0, 0)
    } else {
        let rest = n - 2;
        let acute = if rest >= 4 {
            (n / 5).max(2)
        } else if rest == 3 {
            2
        } else {
            1
        };
        let gp = (n / 2).max(1).min(rest - acute);
        (gp, acute, 1, 1, rest - acute - gp)
    };
    [
        (OrgKind::GpPractice, gp),
        (OrgKind::AcuteTrust, acute),
        (OrgKind::MentalHealthTrust, mh),
        (OrgKind::AmbulanceService, amb),
        (OrgKind::CareHome, care),
    ]
}

/// Acute trust codes in order of use (real ODS trust codes, for shape; the trusts are fictional).
/// Past the list, unused `R` + two characters codes are generated.
const ACUTE_CODES: &[&str] = &[
    "RJ1", "R1F", "RK9", "RA2", "RBD", "RDU", "RN3", "RTH", "RAL", "RAP", "RAS", "RAX", "RF4",
    "RJ6", "RJ7", "RJZ", "RKE", "RQM", "RQX", "R1H", "R1K", "RVR", "RYJ", "RAJ", "RDE", "RGT",
    "RGN", "RM1", "RQW", "RCX", "RWG", "RWH", "RC9", "RD8", "RGP", "RNA", "RL4", "RXW", "RBK",
    "RXK", "RR1", "RRK", "RJE", "RWE", "RTG", "RK5", "RNS", "RXF", "RCD", "RFR", "RHQ", "RR8",
    "RWA", "RTD", "RTE", "RTF", "RTR", "RVJ", "RWF", "RWP", "RWY", "RXC", "RXL", "RXN", "RXP",
    "RXQ", "RXR", "RA7", "RA9", "RBN", "RBT",
];
/// Prefixes making a whole area's places from the region's towns (`""` is the town itself).
const PLACE_PREFIXES: &[&str] = &[
    "", "North", "South", "East", "West", "Upper", "Lower", "Old", "New", "Great", "Little",
    "Central",
];
const CARE_HOME_SUFFIXES: &[&str] = &["Care Home", "Nursing Home", "Residential Home"];
/// Mental health trust codes in order of use; the first is the small region's.
const MENTAL_HEALTH_CODES: &[&str] = &["RV5", "RQY", "RRP", "RAT", "RKL", "RV3", "RWK", "RXT"];
const AMBULANCE_CODE: &str = "RYA";

/// The `i`th care home code: `VM123`..`VM999`, then `VN000`.. — always five characters.
fn care_home_code(i: usize) -> String {
    const SECOND: &[u8] = b"MNPQRSTWXY";
    let k = 123 + i;
    match SECOND.get(k / 1000) {
        Some(&c) => format!("V{}{:03}", c as char, k % 1000),
        None => format!("V{}", k),
    }
}

/// The next unused trust-shaped code (`R` + letter + digit/letter) once the list runs out.
fn synthetic_trust_code(taken: impl Fn(&str) -> bool) -> String {
    const SECOND: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ";
    const THIRD: &[u8] = b"0123456789ABCDEFGHJKLMNPQRSTUVWXYZ";
    SECOND
        .iter()
        .flat_map(|&a| {
            THIRD
                .iter()
                .map(move |&b| format!("R{}{}", a as char, b as char))
        })
        .find(|c| !taken(c))
        .unwrap_or_else(|| "R00".to_string())
}
const GP_WORDS: &[&str] = &[
    "Riverside",
    "Parkside",
    "Oakwood",
    "Castle",
    "Elm Tree",
    "Meadowbank",
    "Market Square",
    "Abbey",
    "Church View",
    "Greenway",
    "Hillcrest",
    "Bridge Street",
    "Orchard",
    "Station",
];

fn generate_organisations(seed: u64, n: usize) -> Vec<Organisation> {
    let mut rng = Prng::keyed(&[seed, TAG_ORGS]);
    let region = rng
        .pick(names::REGION_NAMES)
        .copied()
        .unwrap_or("Wessex Vale");
    let gp_letter = *rng.pick(b"ABCFGHJKLM").unwrap_or(&b'A') as char;
    let town_offset = rng.below(names::TOWNS.len() as u64) as usize;
    let town = |i: usize| names::TOWNS[(town_offset + i) % names::TOWNS.len()].0;
    // A whole area has more places than towns: "North Riverside", "Upper Kingsmead", ...
    let scaled = n > SMALL_REGION_MAX;
    let place = |k: usize| {
        let t = names::TOWNS.len();
        match PLACE_PREFIXES[(k / t) % PLACE_PREFIXES.len()] {
            "" => town(k % t).to_string(),
            prefix => format!("{prefix} {}", town(k % t)),
        }
    };
    let word_offset = rng.below(GP_WORDS.len() as u64) as usize;

    let mut orgs = Vec::with_capacity(n);
    // Codes the later trusts will take, so acute trusts never take them first.
    let reserved: std::collections::HashSet<&str> = MENTAL_HEALTH_CODES
        .iter()
        .take(kind_counts(n)[2].1)
        .chain([&AMBULANCE_CODE])
        .copied()
        .collect();
    let mut used: std::collections::HashSet<String> = std::collections::HashSet::with_capacity(n);
    let mut names_seen = std::collections::HashSet::with_capacity(n);
    for (kind, count) in kind_counts(n) {
        for i in 0..count {
            let (code, name) = match kind {
                OrgKind::GpPractice if scaled => {
                    let (w, p) = (GP_WORDS.len(), names::GP_PATTERNS.len());
                    let word = GP_WORDS[(word_offset + i) % w];
                    let pattern = names::GP_PATTERNS[(i / w) % p];
                    let base = match i / (w * p) {
                        0 => word.to_string(),
                        k => format!("{word} {}", place(k - 1)),
                    };
                    (
                        format!("{gp_letter}{}", 81001 + i),
                        pattern.replace("{}", &base),
                    )
                }
                OrgKind::AcuteTrust if scaled => {
                    let code = ACUTE_CODES
                        .get(i)
                        .map(|c| c.to_string())
                        .filter(|c| !used.contains(c) && !reserved.contains(c.as_str()))
                        .unwrap_or_else(|| {
                            synthetic_trust_code(|c| used.contains(c) || reserved.contains(c))
                        });
                    let name = match i % 3 {
                        0 => format!("{} University Hospitals NHS Foundation Trust", place(i)),
                        1 => format!("{} Hospitals NHS Trust", place(i)),
                        _ => format!("{} General Hospital NHS Trust", place(i)),
                    };
                    (code, name)
                }
                OrgKind::CareHome if scaled => {
                    let c = names::CARE_HOME_NAMES.len();
                    let base = names::CARE_HOME_NAMES[i % c];
                    let suffix = CARE_HOME_SUFFIXES[(i / c) % CARE_HOME_SUFFIXES.len()];
                    let name = format!(
                        "{base} {suffix}, {}",
                        place(i / (c * CARE_HOME_SUFFIXES.len()))
                    );
                    (care_home_code(i), name)
                }
                OrgKind::GpPractice => {
                    let word = GP_WORDS[(word_offset + i) % GP_WORDS.len()];
                    let pattern =
                        names::GP_PATTERNS[(i + i / GP_WORDS.len()) % names::GP_PATTERNS.len()];
                    let round = i / GP_WORDS.len();
                    let base = if round == 0 {
                        word.to_string()
                    } else {
                        format!("{word} {}", town(round))
                    };
                    (
                        format!("{gp_letter}{}", 81001 + i),
                        pattern.replace("{}", &base),
                    )
                }
                OrgKind::AcuteTrust => {
                    let code = ACUTE_CODES
                        .get(i)
                        .map(|c| c.to_string())
                        .filter(|c| !used.contains(c) && !reserved.contains(c.as_str()))
                        .unwrap_or_else(|| {
                            synthetic_trust_code(|c| used.contains(c) || reserved.contains(c))
                        });
                    let name = match i % 3 {
                        0 => format!("{} University Hospitals NHS Foundation Trust", town(i)),
                        1 => format!("{} Hospitals NHS Trust", town(i)),
                        _ => format!("{} General Hospital NHS Trust", town(i)),
                    };
                    let name = if i >= names::TOWNS.len() {
                        format!("{name} ({})", i + 1)
                    } else {
                        name
                    };
                    (code, name)
                }
                OrgKind::MentalHealthTrust => (
                    MENTAL_HEALTH_CODES
                        .get(i)
                        .map(|c| c.to_string())
                        .filter(|c| !used.contains(c))
                        .unwrap_or_else(|| synthetic_trust_code(|c| used.contains(c))),
                    if i == 0 {
                        format!("{region} Mental Health NHS Foundation Trust")
                    } else {
                        format!("{} and {region} Partnership NHS Trust", place(i))
                    },
                ),
                OrgKind::AmbulanceService => (
                    if used.contains(AMBULANCE_CODE) {
                        synthetic_trust_code(|c| used.contains(c))
                    } else {
                        AMBULANCE_CODE.to_string()
                    },
                    format!("{region} Ambulance Service NHS Trust"),
                ),
                OrgKind::CareHome => {
                    let base = names::CARE_HOME_NAMES[i % names::CARE_HOME_NAMES.len()];
                    let suffix = if i % 2 == 0 {
                        "Care Home"
                    } else {
                        "Nursing Home"
                    };
                    let round = i / names::CARE_HOME_NAMES.len();
                    let name = if round == 0 {
                        format!("{base} {suffix}")
                    } else {
                        format!("{base} {suffix}, {}", town(round))
                    };
                    (care_home_code(i), name)
                }
            };
            used.insert(code.clone());
            // Big regions run out of name combinations: number the repeats, as real directories do.
            let name = if names_seen.insert(name.clone()) {
                name
            } else {
                (2..)
                    .map(|k| format!("{name} ({k})"))
                    .find(|n| names_seen.insert(n.clone()))
                    .unwrap_or(name)
            };
            orgs.push(Organisation { code, name, kind });
        }
    }
    orgs
}

const POSTCODE_LETTERS: &[u8] = b"ABDEFGHJLNPQRSTUWXYZ";

fn generate_person(seed: u64, index: u64, nhs: NhsNumber, today: i64, layout: &Layout) -> Person {
    let mut rng = Prng::keyed(&[seed, TAG_PERSON, index]);
    let female = rng.chance(0.51);
    let given = if female {
        rng.pick(names::FEMALE_GIVEN).copied().unwrap_or("Jane")
    } else {
        rng.pick(names::MALE_GIVEN).copied().unwrap_or("John")
    };
    let family = rng.pick(names::FAMILY_NAMES).copied().unwrap_or("Smith");
    let band = rng.unit();
    let age = match band {
        b if b < 0.20 => rng.range(0, 17),
        b if b < 0.76 => rng.range(18, 64),
        b if b < 0.92 => rng.range(65, 79),
        _ => rng.range(80, 101),
    };
    let birth = today - age * 365 - age / 4 - rng.range(1, 364);
    let age = calendar::years_between(birth, today);

    let house = rng.range(1, 240) as u16;
    let street = rng.pick(names::STREETS).copied().unwrap_or("High Street");
    let (town, area) = rng
        .pick(names::TOWNS)
        .copied()
        .unwrap_or(("Riverside", "RV"));
    let letter = |rng: &mut Prng| {
        char::from(POSTCODE_LETTERS[rng.below(POSTCODE_LETTERS.len() as u64) as usize])
    };
    let postcode = format!(
        "{area}{} {}{}{}",
        rng.range(1, 19),
        rng.range(0, 9),
        letter(&mut rng),
        letter(&mut rng)
    );

    let mut conditions = 0u32;
    for (i, def) in codes::CONDITIONS.iter().enumerate() {
        let mut p = def
            .prevalence
            .iter()
            .rev()
            .find(|(min_age, _)| age >= *min_age)
            .map(|(_, p)| *p)
            .unwrap_or(0.0);
        if def.concept.code == "40930008" && female {
            p *= 2.0; // hypothyroidism is commoner in women
        }
        if rng.chance(p) {
            conditions |= 1 << i;
        }
    }
    let has = |spec: Specialty| {
        codes::CONDITIONS
            .iter()
            .enumerate()
            .any(|(i, d)| d.specialty == spec && conditions & (1 << i) != 0)
    };
    let n_conditions = conditions.count_ones();

    // Registration and who else knows the patient.
    let gp = layout.gps[rng.below(layout.gps.len() as u64) as usize];
    let (orgs, local_acute) = if layout.scaled {
        let dementia = codes::CONDITIONS
            .iter()
            .position(|d| d.concept.code == "52448006")
            .is_some_and(|i| conditions & (1 << i) != 0);
        let mental = has(Specialty::MentalHealth);
        scaled_organisations(&mut rng, layout, gp, age, n_conditions, mental, dementia)
    } else {
        let mut orgs = vec![gp as u16];
        let local_acute =
            (!layout.acutes.is_empty()).then(|| layout.acutes[gp % layout.acutes.len()]);
        if let Some(a) = local_acute {
            let mut p: f64 = 0.5;
            if age >= 65 {
                p += 0.25;
            }
            if n_conditions >= 2 {
                p += 0.1;
            }
            if rng.chance(p.min(0.9)) {
                orgs.push(a as u16);
            }
            if layout.acutes.len() > 1 && rng.chance(0.08) {
                let other = layout.acutes[rng.below(layout.acutes.len() as u64) as usize];
                if other != a {
                    orgs.push(other as u16);
                }
            }
        }
        if let Some(mh) = layout.mental_health {
            let p = if has(Specialty::MentalHealth) {
                0.45
            } else {
                0.01
            };
            if rng.chance(p) {
                orgs.push(mh as u16);
            }
        }
        if let Some(amb) = layout.ambulance {
            let p = 0.06 + if age >= 65 { 0.05 } else { 0.0 } + if age >= 75 { 0.15 } else { 0.0 };
            if rng.chance(p) {
                orgs.push(amb as u16);
            }
        }
        if age >= 75 && !layout.care_homes.is_empty() {
            let dementia = codes::CONDITIONS
                .iter()
                .position(|d| d.concept.code == "52448006");
            let p = if dementia.is_some_and(|i| conditions & (1 << i) != 0) {
                0.6
            } else {
                0.2
            };
            if rng.chance(p) {
                let home = layout.care_homes[rng.below(layout.care_homes.len() as u64) as usize];
                orgs.push(home as u16);
            }
        }

        (orgs, local_acute)
    };
    let mut orgs = orgs;
    debug_assert!(!layout.scaled || (3..=8).contains(&orgs.len()));

    // ~3% of patients: one organisation holds a misspelt family name or a wrong birth date.
    let mut conflict = None;
    if rng.chance(0.03) {
        if orgs.len() == 1 {
            // A conflict needs a second organisation: the local hospital is where it usually happens.
            if let Some(other) = local_acute
                .or(layout.ambulance)
                .or_else(|| layout.gps.iter().copied().find(|&g| g != gp))
            {
                orgs.push(other as u16);
            }
        }
        if orgs.len() > 1 {
            let at = orgs[1 + rng.below(orgs.len() as u64 - 1) as usize];
            let c = if rng.chance(0.5) {
                Conflict::Family(names::misspelling(family))
            } else {
                Conflict::Birth(conflicting_birth(birth, &mut rng))
            };
            conflict = Some((at, c));
        }
    }

    Person {
        nhs,
        family,
        given,
        female,
        birth,
        house,
        street,
        town,
        postcode,
        orgs,
        conflict,
        conditions,
    }
}

/// Who knows a patient in a whole area (more than [`SMALL_REGION_MAX`] organisations): the GP,
/// the local acute trust of the GP's catchment, often one of the area's main (teaching) trusts
/// as well, sometimes a third trust, the catchment's mental health trust, the ambulance service
/// and a care home; never fewer than three organisations nor more than eight (seven at most).
fn scaled_organisations(
    rng: &mut Prng,
    layout: &Layout,
    gp: usize,
    age: i64,
    n_conditions: u32,
    mental: bool,
    dementia: bool,
) -> (Vec<u16>, Option<usize>) {
    let rank = layout.gps.iter().position(|&g| g == gp).unwrap_or(0);
    let catchment = |of: &[usize]| of[rank * of.len() / layout.gps.len().max(1)];
    let mut orgs = vec![gp as u16];
    let push = |orgs: &mut Vec<u16>, o: usize| {
        if !orgs.contains(&(o as u16)) {
            orgs.push(o as u16);
        }
    };
    // The scaled mix always has at least two acute trusts.
    let local = catchment(&layout.acutes);
    push(&mut orgs, local);
    let main = &layout.acutes[..layout.acutes.len().min(2)];
    let mut p = 0.45 + if age >= 65 { 0.15 } else { 0.0 };
    if n_conditions >= 2 {
        p += 0.15;
    }
    if rng.chance(p) {
        let centre = if rng.chance(0.7) {
            main[rng.below(main.len() as u64) as usize]
        } else {
            layout.acutes[rng.below(layout.acutes.len() as u64) as usize]
        };
        push(&mut orgs, centre);
    }
    if rng.chance(0.18) {
        let other = layout.acutes[rng.below(layout.acutes.len() as u64) as usize];
        push(&mut orgs, other);
    }
    if !layout.mental_health_all.is_empty() && rng.chance(if mental { 0.5 } else { 0.04 }) {
        push(&mut orgs, catchment(&layout.mental_health_all));
    }
    if let Some(amb) = layout.ambulance {
        let p = 0.15 + if age >= 65 { 0.1 } else { 0.0 } + if age >= 75 { 0.15 } else { 0.0 };
        if rng.chance(p) {
            push(&mut orgs, amb);
        }
    }
    if age >= 75 && !layout.care_homes.is_empty() && rng.chance(if dementia { 0.6 } else { 0.2 }) {
        let home = layout.care_homes[rng.below(layout.care_homes.len() as u64) as usize];
        push(&mut orgs, home);
    }
    if orgs.len() < 3 {
        // An outpatient referral to one of the area's main trusts.
        let centre = main.iter().copied().find(|&a| a != local).unwrap_or(local);
        push(&mut orgs, centre);
        if orgs.len() < 3
            && let Some(amb) = layout.ambulance
        {
            push(&mut orgs, amb);
        }
    }
    (orgs, Some(local))
}

/// A birth date as another system might have mistyped it: day and month swapped, or a year out.
fn conflicting_birth(birth: i64, rng: &mut Prng) -> i64 {
    let (y, m, d) = calendar::civil_from_days(birth);
    if d <= 12 && d != m && rng.chance(0.6) {
        return calendar::days_from_civil(y, d, m);
    }
    if rng.chance(0.5) {
        birth + 1
    } else {
        let y2 = y - 1;
        let d2 = if m == 2 && d == 29 { 28 } else { d };
        calendar::days_from_civil(y2, m, d2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Region {
        Region::generate(&RegionSpec {
            patients: 2_000,
            ..RegionSpec::default()
        })
    }

    #[test]
    fn same_seed_generates_the_same_region() {
        let a = small();
        let b = small();
        assert_eq!(a.organisations(), b.organisations());
        assert!(a.patients().eq(b.patients()));
        let c = Region::generate(&RegionSpec {
            seed: 7,
            patients: 2_000,
            ..RegionSpec::default()
        });
        assert!(!a.patients().eq(c.patients()));
    }

    #[test]
    fn nhs_numbers_are_valid_unique_and_in_the_999_range() {
        let r = small();
        let mut last = None;
        for p in r.patients() {
            let digits = p.nhs_number.as_digits();
            assert!(digits.starts_with("999"), "{digits}");
            assert_eq!(NhsNumber::parse(&digits), Ok(p.nhs_number));
            assert!(last < Some(p.nhs_number), "sorted and unique");
            last = Some(p.nhs_number);
        }
        assert_eq!(
            r.patients().next().map(|p| p.nhs_number.as_digits()),
            Some("9990000018".into())
        );
        let unknown = r.unknown_nhs_number();
        assert!(unknown.as_digits().starts_with("999"));
        assert!(r.patient(&unknown).is_none());
    }

    #[test]
    fn every_patient_is_registered_with_exactly_one_gp_and_known_to_at_most_nine() {
        let r = small();
        for p in r.patients() {
            let gps = p
                .organisations
                .iter()
                .filter(|c| r.organisation(c).map(|o| o.kind) == Some(OrgKind::GpPractice))
                .count();
            assert_eq!(gps, 1, "{p:?}");
            assert_eq!(p.organisations[0], p.gp);
            assert!((1..=9).contains(&p.organisations.len()));
            let mut dedup = p.organisations.clone();
            dedup.sort();
            dedup.dedup();
            assert_eq!(dedup.len(), p.organisations.len());
        }
        assert!(r.patients_known_only_to_one().next().is_some());
        assert!(r.patients_known_to_at_least(3).count() > 100);
    }

    #[test]
    fn organisation_mix_is_realistic_for_ten() {
        let r = small();
        let count = |k| r.organisations().iter().filter(|o| o.kind == k).count();
        assert_eq!(r.organisations().len(), 10);
        assert_eq!(count(OrgKind::GpPractice), 5);
        assert!(count(OrgKind::AcuteTrust) >= 2);
        assert_eq!(count(OrgKind::MentalHealthTrust), 1);
        assert_eq!(count(OrgKind::AmbulanceService), 1);
        assert!(count(OrgKind::CareHome) >= 1);
        let mut codes: Vec<_> = r.organisations().iter().map(|o| &o.code).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), 10, "codes are unique");
    }

    #[test]
    fn any_organisation_count_gets_unique_codes_and_names() {
        for n in [1, 2, 3, 4, 5, 7, 9, 25, 120] {
            let orgs = generate_organisations(3, n);
            assert_eq!(orgs.len(), n);
            assert_eq!(
                orgs.iter()
                    .filter(|o| o.kind == OrgKind::GpPractice)
                    .count()
                    .min(1),
                1
            );
            let mut codes: Vec<_> = orgs.iter().map(|o| &o.code).collect();
            codes.sort();
            codes.dedup();
            assert_eq!(codes.len(), n, "n={n}");
            let mut names: Vec<_> = orgs.iter().map(|o| &o.name).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), n, "n={n}");
            if n >= 4 {
                assert!(orgs.iter().any(|o| o.kind == OrgKind::AmbulanceService));
            }
        }
    }

    #[test]
    fn about_three_percent_have_conflicting_demographics() {
        let r = Region::generate(&RegionSpec::default());
        let n = r.patients_with_conflicting_demographics().count();
        let share = n as f64 / r.patient_count() as f64;
        assert!((0.02..0.04).contains(&share), "{share}");
        for p in r.patients_with_conflicting_demographics().take(50) {
            let c = p.conflict.as_ref().unwrap();
            assert_ne!(c.organisation, p.gp, "the GP holds the true record");
            assert!(p.organisations.contains(&c.organisation));
            match c.field {
                ConflictField::FamilyName => assert_ne!(c.value, p.family),
                ConflictField::BirthDate => assert_ne!(c.value, p.birth_date),
            }
        }
    }

    #[test]
    fn clinical_conflicts_are_deterministic_and_between_the_gp_and_an_organisation_that_knows_the_patient()
     {
        let r = small();
        let a: Vec<PatientSummary> = r.patients_with_clinical_conflicts().collect();
        let b: Vec<PatientSummary> = small().patients_with_clinical_conflicts().collect();
        assert_eq!(a, b);
        let share = a.len() as f64 / r.patients_known_to_at_least(2).count() as f64;
        assert!((0.03..0.12).contains(&share), "{share}");
        for p in &a {
            let c = p.clinical_conflict.as_ref().unwrap();
            assert_eq!(c.gp, p.gp);
            assert_ne!(c.organisation, p.gp);
            assert!(p.organisations.contains(&c.organisation));
            assert_ne!(c.gp_says, c.organisation_says);
        }
        assert!(
            r.patients_known_only_to_one()
                .all(|p| p.clinical_conflict.is_none())
        );
    }

    #[test]
    fn the_wrong_patient_is_someone_else_the_organisation_knows() {
        let r = small();
        for p in r.patients().take(100) {
            let other = r.wrong_patient_at(&p.nhs_number, &p.gp).unwrap();
            assert_ne!(other.nhs_number, p.nhs_number);
            assert!(other.organisations.contains(&p.gp));
        }
        assert!(
            r.wrong_patient_at(&r.unknown_nhs_number(), "H81001")
                .is_none()
        );
    }

    #[test]
    fn patient_ids_differ_per_organisation_and_round_trip() {
        let r = small();
        let p = r.patients_known_to_at_least(2).next().unwrap();
        let a = r.patient_id_at(&p.nhs_number, &p.organisations[0]).unwrap();
        let b = r.patient_id_at(&p.nhs_number, &p.organisations[1]).unwrap();
        assert_ne!(a, b);
        let org = r.organisation(&p.organisations[1]).unwrap();
        assert_eq!(parse_patient_id(org, &b), r.person_index(&p.nhs_number));
        assert_eq!(parse_patient_id(org, "nonsense"), None);
        assert_eq!(
            parse_patient_id(org, &format!("{}-99", org.code.to_lowercase())),
            None
        );
        assert_eq!(
            r.patient_id_at(&r.unknown_nhs_number(), &p.organisations[0]),
            None
        );
    }

    #[test]
    fn ten_thousand_patients_generate_quickly() {
        let start = std::time::Instant::now();
        let r = Region::generate(&RegionSpec::default());
        assert_eq!(r.patient_count(), 10_000);
        // Generous for a debug build; release is a few milliseconds.
        assert!(
            start.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    fn ods_shaped(o: &Organisation) -> bool {
        let c = o.code.as_bytes();
        let alnum = |b: &[u8]| {
            b.iter()
                .all(|x| x.is_ascii_digit() || x.is_ascii_uppercase())
        };
        match o.kind {
            OrgKind::GpPractice => {
                c.len() == 6 && c[0].is_ascii_uppercase() && c[1..].iter().all(u8::is_ascii_digit)
            }
            OrgKind::CareHome => c.len() == 5 && c[0] == b'V' && alnum(c),
            _ => c.len() == 3 && c[0] == b'R' && alnum(c),
        }
    }

    #[test]
    fn a_whole_area_has_realistic_proportions_and_unique_ods_shaped_codes() {
        for (n, want) in [
            (3000, [1200, 40, 3, 1, 1756]),
            (5000, [2000, 66, 5, 1, 2928]),
            (51, [20, 2, 1, 1, 27]),
        ] {
            let orgs = generate_organisations(42, n);
            let count = |k| orgs.iter().filter(|o| o.kind == k).count();
            let got = [
                OrgKind::GpPractice,
                OrgKind::AcuteTrust,
                OrgKind::MentalHealthTrust,
                OrgKind::AmbulanceService,
                OrgKind::CareHome,
            ]
            .map(count);
            assert_eq!(got, want, "n={n}");
            let codes: std::collections::HashSet<_> = orgs.iter().map(|o| &o.code).collect();
            assert_eq!(codes.len(), n, "codes are unique, n={n}");
            let names: std::collections::HashSet<_> = orgs.iter().map(|o| &o.name).collect();
            assert_eq!(names.len(), n, "names are unique, n={n}");
            for o in &orgs {
                assert!(ods_shaped(o), "{o:?}");
            }
        }
        let capped = Region::generate(&RegionSpec {
            patients: 10,
            organisations: 9_999,
            ..RegionSpec::default()
        });
        assert_eq!(capped.organisations().len(), MAX_ORGANISATIONS);
    }

    #[test]
    fn in_a_whole_area_every_patient_is_known_to_three_to_eight() {
        let start = std::time::Instant::now();
        let r = Region::generate(&RegionSpec {
            organisations: 3000,
            ..RegionSpec::default()
        });
        println!(
            "generated 10,000 patients x 3,000 organisations in {:?} (this build)",
            start.elapsed()
        );
        let mut sizes = [0usize; 10];
        for p in r.patients() {
            let n = p.organisations.len();
            assert!((3..=8).contains(&n), "{p:?}");
            sizes[n] += 1;
            assert_eq!(r.organisation(&p.gp).unwrap().kind, OrgKind::GpPractice);
            assert_eq!(
                p.organisations
                    .iter()
                    .filter(|c| r.organisation(c).unwrap().kind == OrgKind::GpPractice)
                    .count(),
                1
            );
            assert!(
                p.organisations
                    .iter()
                    .any(|c| r.organisation(c).unwrap().kind == OrgKind::AcuteTrust)
            );
        }
        println!("patients by number of organisations knowing them: {sizes:?}");
        assert!(sizes[3] > 0 && sizes[5] > 0, "{sizes:?}");
        let share = r.patients_with_conflicting_demographics().count() as f64 / 10_000.0;
        assert!((0.02..0.04).contains(&share), "{share}");
        let always = r.always_ask();
        assert_eq!(always.len(), 3, "{always:?}");
        let kinds: Vec<OrgKind> = always
            .iter()
            .map(|c| r.organisation(c).unwrap().kind)
            .collect();
        assert_eq!(
            kinds,
            [
                OrgKind::AcuteTrust,
                OrgKind::AcuteTrust,
                OrgKind::AmbulanceService
            ]
        );
        assert_eq!(always, ["RJ1", "R1F", "RYA"], "the two main trusts");
    }

    #[test]
    fn a_small_region_always_asks_its_busiest_acute_trusts_and_the_ambulance_service() {
        let r = small();
        assert_eq!(r.always_ask(), ["RJ1", "R1F", "RYA"]);
        let tiny = Region::generate(&RegionSpec {
            patients: 50,
            organisations: 2,
            ..RegionSpec::default()
        });
        assert_eq!(
            tiny.always_ask(),
            ["RJ1"],
            "no ambulance service in a region of two"
        );
    }

    #[test]
    fn zero_patients_and_zero_organisations_do_not_panic() {
        let r = Region::generate(&RegionSpec {
            patients: 0,
            organisations: 0,
            ..RegionSpec::default()
        });
        assert_eq!(r.organisations().len(), 1);
        assert_eq!(r.patients().count(), 0);
        assert!(r.unknown_nhs_number().as_digits().starts_with("999"));
    }
}
