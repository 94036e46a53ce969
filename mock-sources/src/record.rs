//! One organisation's record of one patient, built on demand from the seed.
//!
//! A patient has one clinical "truth" (conditions, allergies, medicines, derived from the seed
//! and the patient alone); each organisation records the part of it that it would plausibly hold,
//! in its own shape: the GP the whole problem list and prescriptions, the acute trust admissions
//! with results and discharge summaries, the ambulance service emergency encounters with vital
//! signs, and so on. Because the truth is shared, the same allergy or medicine carries the same
//! code at the GP and at the hospital (what the broker's merge collapses), while resource ids
//! differ per organisation. Nothing here reads the clock: dates are relative to the region's
//! reference day.

use serde_json::{Value, json};

use crate::calendar;
use crate::codes::{self, Concept, DMD, LOINC, SNOMED, Specialty, UCUM};
use crate::fhir::{self, ResourceType};
use crate::population::{
    self, ClinicalConflict, ClinicalConflictKind, OrgKind, Organisation, Person, Region,
};
use crate::prng::Prng;

const TAG_TRUTH: u64 = 3;
const TAG_RECORD: u64 = 4;
const TAG_NAMING: u64 = 5;

/// Everything one organisation holds about one patient.
#[derive(Debug, Clone)]
pub(crate) struct OrgRecord {
    pub patient: Value,
    /// Clinical resources, grouped in [`ResourceType::CLINICAL`] order.
    pub resources: Vec<(ResourceType, Value)>,
    /// Medication resources its MedicationRequests reference as `Medication/{id}` (not
    /// contained): readable by id, `_include`d on request, carried by `$everything`.
    pub medications: Vec<Value>,
}

/// How a record is shaped beyond the region's data: the organisation's data mode and the
/// faults that change the shape of what it holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct View {
    /// Clinical conflict mode: serve this organisation's disagreeing version of a shared fact,
    /// for the patients who have one here.
    pub conflicts: bool,
    /// `ignore_include`: every MedicationRequest names its drug by `Medication/{id}`.
    pub references_only: bool,
}

/// How an organisation's system names the drug on a MedicationRequest. Real systems differ, so
/// the region does too, by organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrugNaming {
    /// `medicationCodeableConcept`.
    Inline,
    /// `medicationReference` to a `contained` Medication (`#med`).
    Contained,
    /// `medicationReference` to `Medication/{id}`.
    Referenced,
}

impl OrgRecord {
    pub fn of_type(&self, rt: ResourceType) -> impl Iterator<Item = &Value> {
        self.resources
            .iter()
            .filter(move |(t, _)| *t == rt)
            .map(|(_, v)| v)
    }

    /// Patient first, then every clinical resource: the `$everything` order.
    pub fn everything(&self) -> impl Iterator<Item = &Value> {
        std::iter::once(&self.patient).chain(self.resources.iter().map(|(_, v)| v))
    }

    pub fn find(&self, rt: ResourceType, id: &str) -> Option<&Value> {
        if rt == ResourceType::Patient {
            return (self.patient["id"] == id).then_some(&self.patient);
        }
        if rt == ResourceType::Medication {
            return self.medications.iter().find(|v| v["id"] == id);
        }
        self.of_type(rt).find(|v| v["id"] == id)
    }
}

/// Builds organisation `org`'s record of person `person`. `base_url` is the organisation's FHIR
/// base, used for document attachment URLs.
pub(crate) fn build(region: &Region, person: usize, org: usize, base_url: &str) -> OrgRecord {
    build_view(region, person, org, base_url, View::default())
}

/// As [`build`], in a data mode / shape other than the default.
pub(crate) fn build_view(
    region: &Region,
    person: usize,
    org: usize,
    base_url: &str,
    view: View,
) -> OrgRecord {
    let mut b = Builder::new(region, person, org, base_url);
    b.view = view;
    let truth = Truth::of(region, person);
    b.variety = Variety::of(region, person, &truth);
    match b.org.kind {
        OrgKind::GpPractice => b.gp(&truth),
        OrgKind::AcuteTrust => b.acute(&truth),
        OrgKind::MentalHealthTrust => b.mental_health(&truth),
        OrgKind::AmbulanceService => b.ambulance(&truth),
        OrgKind::CareHome => b.care_home(&truth),
    }
    if b.org.kind == OrgKind::GpPractice {
        b.gp_variety(&truth);
    }
    if view.conflicts
        && let Some(plan) = plan_conflict(region, person, &truth)
        && plan.org == org
    {
        b.apply_conflict(&plan, &truth);
    }
    let patient = b.patient();
    let mut resources = b.out;
    // Stable sort keeps creation order within a type.
    resources.sort_by_key(|(t, _)| ResourceType::CLINICAL.iter().position(|c| c == t));
    OrgRecord {
        patient,
        resources,
        medications: b.medications,
    }
}

/// Only the Patient resource (the common, cheap case: identifier search).
pub(crate) fn patient_only(region: &Region, person: usize, org: usize, base_url: &str) -> Value {
    Builder::new(region, person, org, base_url).patient()
}

/// The person index encoded in a clinical resource id of organisation `org`, e.g.
/// `rj1-cond-100042-3` → 42.
pub(crate) fn person_of_resource_id(
    org: &Organisation,
    rt: ResourceType,
    id: &str,
) -> Option<usize> {
    if rt == ResourceType::Patient {
        return population::parse_patient_id(org, id);
    }
    let prefix = format!("{}-{}-", org.code.to_ascii_lowercase(), rt.abbreviation());
    let rest = id.strip_prefix(prefix.as_str())?;
    let (person, n) = rest.split_once('-')?;
    if person.len() > 9 || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    person.parse::<usize>().ok()?.checked_sub(100_000)
}

/// The patient's clinical facts, shared by every organisation.
struct Truth {
    /// `(index into CONDITIONS, onset day)`.
    conditions: Vec<(usize, i64)>,
    /// `(index into ALLERGIES, first recorded day)`.
    allergies: Vec<(usize, i64)>,
    /// `(index into MEDICINES, start day, still taken)`.
    medicines: Vec<(usize, i64, bool)>,
}

impl Truth {
    fn of(region: &Region, person: usize) -> Truth {
        let p = region.person(person);
        let today = region.reference_day();
        let mut rng = Prng::keyed(&[region.spec().seed, TAG_TRUTH, person as u64]);
        let lived = (today - p.birth).max(2);
        let past = |rng: &mut Prng, max_back: i64| {
            let back = rng.range(30, max_back.min(lived - 1).max(30));
            (today - back).max(p.birth + 1)
        };
        let conditions: Vec<(usize, i64)> = (0..codes::CONDITIONS.len())
            .filter(|&i| p.has_condition(i))
            .map(|i| (i, past(&mut rng, 20 * 365)))
            .collect();
        let mut allergies = Vec::new();
        for (i, a) in codes::ALLERGIES.iter().enumerate() {
            if rng.chance(a.prevalence) {
                allergies.push((i, past(&mut rng, 30 * 365)));
            }
        }
        let mut medicines: Vec<(usize, i64, bool)> = Vec::new();
        for &(c, onset) in &conditions {
            if let Some(m) = codes::CONDITIONS[c].medicine
                && !medicines.iter().any(|(x, _, _)| *x == m)
            {
                medicines.push((m, (onset + rng.range(0, 60)).min(today - 1), true));
            }
        }
        if medicines.is_empty() && rng.chance(0.25) {
            medicines.push((codes::AMOXICILLIN, past(&mut rng, 700), false));
        }
        Truth {
            conditions,
            allergies,
            medicines,
        }
    }

    fn has_specialty(&self, s: Specialty) -> bool {
        self.conditions
            .iter()
            .any(|(c, _)| codes::CONDITIONS[*c].specialty == s)
    }

    fn has(&self, code: &str) -> bool {
        self.conditions
            .iter()
            .any(|(c, _)| codes::CONDITIONS[*c].concept.code == code)
    }
}

/// A verification status (FHIR `condition-ver-status` / `allergyintolerance-verification`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verification {
    Confirmed,
    Unconfirmed,
    Provisional,
    Differential,
    Refuted,
    EnteredInError,
}

impl Verification {
    fn code(self) -> &'static str {
        match self {
            Verification::Confirmed => "confirmed",
            Verification::Unconfirmed => "unconfirmed",
            Verification::Provisional => "provisional",
            Verification::Differential => "differential",
            Verification::Refuted => "refuted",
            Verification::EnteredInError => "entered-in-error",
        }
    }

    fn display(self) -> &'static str {
        match self {
            Verification::Confirmed => "Confirmed",
            Verification::Unconfirmed => "Unconfirmed",
            Verification::Provisional => "Provisional",
            Verification::Differential => "Differential",
            Verification::Refuted => "Refuted",
            Verification::EnteredInError => "Entered in Error",
        }
    }
}

/// What real records carry beyond the bare facts, per patient and so the same at every
/// organisation (a provisional diagnosis is provisional everywhere; disagreement is conflict
/// mode's job). Drawn from a generator of its own so [`Truth`] is what it was without it.
#[derive(Debug, Clone, Default)]
struct Variety {
    /// `(CONDITIONS index, status)` for the patient's conditions: mostly confirmed.
    conditions: Vec<(usize, Verification)>,
    /// `(ALLERGIES index, status, reaction severity)`: mostly confirmed, some unconfirmed.
    allergies: Vec<(usize, Verification, &'static str)>,
    /// GP only: an allergy considered and refuted (de-labelled), `(ALLERGIES index, day)`.
    refuted_allergy: Option<(usize, i64)>,
    /// GP only: a diagnosis considered and ruled out, `(CONDITIONS index, day)`.
    refuted_condition: Option<(usize, i64)>,
    /// GP only, rare: a diagnosis entered in error, `(CONDITIONS index, day)`.
    entered_in_error: Option<(usize, i64)>,
    /// GP only: a past sexually transmitted infection (sensitive; security-labelled).
    sexual_health: Option<i64>,
    /// A patient with no allergies whose GP (if it records them) asserts "no known allergy".
    nka: bool,
}

const TAG_VARIETY: u64 = 6;
const TAG_NKA: u64 = 7;
const TAG_CONFLICT: u64 = 8;

impl Variety {
    fn of(region: &Region, person: usize, truth: &Truth) -> Variety {
        let p = region.person(person);
        let today = region.reference_day();
        let mut rng = Prng::keyed(&[region.spec().seed, TAG_VARIETY, person as u64]);
        let conditions = truth
            .conditions
            .iter()
            .map(|&(c, _)| {
                let u = rng.unit();
                let status = if u < 0.04 {
                    Verification::Provisional
                } else if u < 0.07 {
                    Verification::Unconfirmed
                } else if u < 0.09 {
                    Verification::Differential
                } else {
                    Verification::Confirmed
                };
                (c, status)
            })
            .collect();
        let allergies = truth
            .allergies
            .iter()
            .map(|&(a, _)| {
                let status = if rng.chance(0.1) {
                    Verification::Unconfirmed
                } else {
                    Verification::Confirmed
                };
                let severity = if codes::ALLERGIES[a].reaction.code == "39579001" {
                    "severe"
                } else if rng.chance(0.4) {
                    "mild"
                } else {
                    "moderate"
                };
                (a, status, severity)
            })
            .collect();
        let lived = (today - p.birth).max(2);
        let day =
            |rng: &mut Prng| (today - rng.range(30, (lived - 1).clamp(30, 3650))).max(p.birth + 1);
        let pick_absent = |rng: &mut Prng, n: usize, present: &dyn Fn(usize) -> bool| {
            let i = rng.below(n as u64) as usize;
            (!present(i)).then_some(i)
        };
        let refuted_allergy = if rng.chance(0.03) {
            let had = |i| truth.allergies.iter().any(|(a, _)| *a == i);
            pick_absent(&mut rng, codes::ALLERGIES.len(), &had).map(|a| (a, day(&mut rng)))
        } else {
            None
        };
        let refuted_condition = if rng.chance(0.02) {
            pick_absent(&mut rng, codes::CONDITIONS.len(), &|i| p.has_condition(i))
                .map(|c| (c, day(&mut rng)))
        } else {
            None
        };
        let entered_in_error = if rng.chance(0.015) {
            pick_absent(&mut rng, codes::CONDITIONS.len(), &|i| p.has_condition(i))
                .map(|c| (c, day(&mut rng)))
        } else {
            None
        };
        let age = calendar::years_between(p.birth, today);
        let sexual_health =
            ((16..=45).contains(&age) && rng.chance(0.03)).then(|| today - rng.range(60, 1500));
        let nka = rng.chance(0.5);
        Variety {
            conditions,
            allergies,
            refuted_allergy,
            refuted_condition,
            entered_in_error,
            sexual_health,
            nka,
        }
    }

    fn condition_status(&self, def: usize) -> Verification {
        self.conditions
            .iter()
            .find(|(c, _)| *c == def)
            .map_or(Verification::Confirmed, |(_, s)| *s)
    }

    fn allergy(&self, def: usize) -> (Verification, &'static str) {
        self.allergies
            .iter()
            .find(|(a, _, _)| *a == def)
            .map_or((Verification::Confirmed, "moderate"), |(_, s, sev)| {
                (*s, sev)
            })
    }
}

/// Does this GP practice record "no known allergy" (about 60% of practices do)?
fn gp_records_nka(region: &Region, org: usize) -> bool {
    Prng::keyed(&[region.spec().seed, TAG_NKA, org as u64]).chance(0.6)
}

/// One patient's clinical conflict, by index.
#[derive(Debug, Clone, Copy)]
struct Planned {
    kind: ClinicalConflictKind,
    /// The organisation holding the disagreeing version.
    org: usize,
    /// Index into ALLERGIES or MEDICINES, by kind.
    item: usize,
}

/// About one in ten patients known to their GP and another organisation has a shared fact the
/// two disagree on (in conflict mode): the other organisation is their first acute trust, else
/// the next organisation that knows them.
fn plan_conflict(region: &Region, person: usize, truth: &Truth) -> Option<Planned> {
    let p = region.person(person);
    let orgs = region.organisations();
    let others = p.orgs.get(1..)?;
    let org = others
        .iter()
        .find(|&&o| orgs[usize::from(o)].kind == OrgKind::AcuteTrust)
        .or(others.first())
        .map(|&o| usize::from(o))?;
    let mut rng = Prng::keyed(&[region.spec().seed, TAG_CONFLICT, person as u64]);
    if !rng.chance(0.1) {
        return None;
    }
    let variety = Variety::of(region, person, truth);
    let gp = usize::from(p.orgs[0]);
    let mut options = Vec::new();
    if let Some(&(a, _)) = truth.allergies.first() {
        options.push((ClinicalConflictKind::AllergyResolved, a));
        options.push((ClinicalConflictKind::AllergyRefuted, a));
    }
    if truth.allergies.is_empty() && variety.nka && gp_records_nka(region, gp) {
        // The hospital has a penicillin allergy the GP does not know of.
        options.push((ClinicalConflictKind::NoKnownAllergy, 0));
    }
    if let Some(&(m, _, _)) = truth.medicines.iter().find(|(_, _, active)| *active) {
        options.push((ClinicalConflictKind::MedicineStopped, m));
        options.push((ClinicalConflictKind::Dosage, m));
    }
    let &(kind, item) = rng.pick(&options)?;
    Some(Planned { kind, org, item })
}

/// The clinical conflict the patient has in conflict mode, described for people and tests.
pub(crate) fn clinical_conflict(region: &Region, person: usize) -> Option<ClinicalConflict> {
    let truth = Truth::of(region, person);
    let plan = plan_conflict(region, person, &truth)?;
    let (concept, gp_says, organisation_says) = match plan.kind {
        ClinicalConflictKind::AllergyResolved => (
            codes::ALLERGIES[plan.item].concept,
            "active".to_string(),
            "resolved".to_string(),
        ),
        ClinicalConflictKind::AllergyRefuted => (
            codes::ALLERGIES[plan.item].concept,
            "active".to_string(),
            "refuted".to_string(),
        ),
        ClinicalConflictKind::NoKnownAllergy => (
            codes::ALLERGIES[plan.item].concept,
            format!("no known allergy ({})", codes::NO_KNOWN_ALLERGY.code),
            "active".to_string(),
        ),
        ClinicalConflictKind::MedicineStopped => (
            codes::MEDICINES[plan.item].concept,
            "active".to_string(),
            "stopped".to_string(),
        ),
        ClinicalConflictKind::Dosage => (
            codes::MEDICINES[plan.item].concept,
            codes::MEDICINES[plan.item].dosage.to_string(),
            codes::other_dosage(plan.item),
        ),
    };
    let p = region.person(person);
    let orgs = region.organisations();
    Some(ClinicalConflict {
        kind: plan.kind,
        gp: orgs[usize::from(p.orgs[0])].code.clone(),
        organisation: orgs[plan.org].code.clone(),
        code: concept.code.to_string(),
        display: concept.display.to_string(),
        gp_says,
        organisation_says,
    })
}

struct Builder<'a> {
    region: &'a Region,
    person: &'a Person,
    person_index: usize,
    org: &'a Organisation,
    org_index: usize,
    base_url: &'a str,
    patient_id: String,
    id_prefix: String,
    today: i64,
    rng: Prng,
    out: Vec<(ResourceType, Value)>,
    next_number: u32,
    view: View,
    medications: Vec<Value>,
    /// The patient's verification statuses, severities and extras.
    variety: Variety,
}

impl<'a> Builder<'a> {
    fn new(region: &'a Region, person: usize, org: usize, base_url: &'a str) -> Self {
        let o = &region.organisations()[org];
        Builder {
            region,
            person: region.person(person),
            person_index: person,
            org: o,
            org_index: org,
            base_url,
            patient_id: population::patient_id(o, person),
            id_prefix: o.code.to_ascii_lowercase(),
            today: region.reference_day(),
            rng: Prng::keyed(&[region.spec().seed, TAG_RECORD, person as u64, org as u64]),
            out: Vec::new(),
            next_number: 1,
            view: View::default(),
            medications: Vec::new(),
            variety: Variety::default(),
        }
    }

    fn id(&mut self, rt: ResourceType) -> String {
        let n = self.next_number;
        self.next_number += 1;
        format!(
            "{}-{}-{}-{n}",
            self.id_prefix,
            rt.abbreviation(),
            100_000 + self.person_index
        )
    }

    fn subject(&self) -> Value {
        fhir::reference(ResourceType::Patient, &self.patient_id)
    }

    /// A day in the last `max_back` days, never before the patient was born.
    fn past_day(&mut self, max_back: i64) -> i64 {
        let back = self.rng.range(1, max_back.max(1));
        (self.today - back)
            .max(self.person.birth + 1)
            .min(self.today)
    }

    fn minute(&mut self) -> u32 {
        self.rng.range(8 * 60, 18 * 60) as u32
    }

    fn last_updated(&mut self, day: i64) -> String {
        let day = (day + self.rng.range(0, 2)).min(self.today);
        let minute = self.minute();
        calendar::instant(day, minute)
    }

    fn push(&mut self, rt: ResourceType, v: Value) {
        self.out.push((rt, v));
    }

    fn age(&self) -> i64 {
        calendar::years_between(self.person.birth, self.today)
    }

    // ---- the Patient ----------------------------------------------------------------------

    fn patient(&self) -> Value {
        let p = self.person;
        let (family, birth) = p.demographics_at(self.org_index);
        let gp = &self.region.organisations()[usize::from(p.orgs[0])];
        let age = calendar::years_between(birth, self.today);
        let prefix = match (p.female, age) {
            (_, a) if a < 16 => None,
            (true, _) => Some("Ms"),
            (false, _) => Some("Mr"),
        };
        let mut name = json!({ "use": "official", "family": family, "given": [p.given] });
        if let Some(prefix) = prefix {
            name["prefix"] = json!([prefix]);
        }
        let mut rng = Prng::keyed(&[
            self.region.spec().seed,
            TAG_RECORD,
            self.person_index as u64,
            self.org_index as u64,
            u64::MAX,
        ]);
        let updated = self.today - rng.range(1, 400);
        json!({
            "resourceType": "Patient",
            "id": self.patient_id,
            "meta": fhir::meta(ResourceType::Patient, &calendar::instant(updated.max(birth), 9 * 60)),
            "identifier": [{
                "extension": [{
                    "url": "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-NHSNumberVerificationStatus",
                    "valueCodeableConcept": {
                        "coding": [{
                            "system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatusEngland",
                            "code": "01",
                            "display": "Number present and verified",
                        }]
                    },
                }],
                "system": fhir::NHS_NUMBER_SYSTEM,
                "value": p.nhs.as_digits(),
            }],
            "name": [name],
            "gender": if p.female { "female" } else { "male" },
            "birthDate": calendar::date(birth),
            "address": [{
                "use": "home",
                "line": [format!("{} {}", p.house, p.street)],
                "city": p.town,
                "postalCode": p.postcode,
                "country": "GB",
            }],
            "generalPractitioner": [fhir::org_reference(gp)],
            "managingOrganization": fhir::org_reference(self.org),
        })
    }

    // ---- resource builders ----------------------------------------------------------------

    fn condition(&mut self, def: usize, onset: i64, recorded: i64) -> String {
        let status = self.variety.condition_status(def);
        self.condition_as(def, onset, recorded, status)
    }

    /// A Condition with a given verification status. Refuted ones are inactive; entered in
    /// error ones carry no clinical status (FHIR con-5).
    fn condition_as(
        &mut self,
        def: usize,
        onset: i64,
        recorded: i64,
        status: Verification,
    ) -> String {
        let id = self.id(ResourceType::Condition);
        let c = codes::CONDITIONS[def].concept;
        let recorded = recorded.clamp(onset, self.today);
        let updated = self.last_updated(recorded);
        let mut v = json!({
            "resourceType": "Condition",
            "id": id,
            "meta": fhir::meta(ResourceType::Condition, &updated),
            "clinicalStatus": fhir::hl7("condition-clinical", "active", "Active"),
            "verificationStatus": fhir::hl7("condition-ver-status", status.code(), status.display()),
            "category": [fhir::hl7("condition-category", "problem-list-item", "Problem List Item")],
            "code": self.condition_code(c),
            "subject": self.subject(),
            "onsetDateTime": calendar::date(onset),
            "recordedDate": calendar::date(recorded),
        });
        match status {
            Verification::Refuted => {
                v["clinicalStatus"] = fhir::hl7("condition-clinical", "inactive", "Inactive");
            }
            Verification::EnteredInError => {
                if let Some(o) = v.as_object_mut() {
                    o.remove("clinicalStatus");
                }
            }
            _ => {}
        }
        if self.org.kind == OrgKind::MentalHealthTrust
            && codes::CONDITIONS[def].specialty == Specialty::MentalHealth
        {
            v["meta"]["security"] = json!([{
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                "code": "PSY",
                "display": "psychiatry information sensitivity",
            }]);
        }
        self.push(ResourceType::Condition, v);
        id
    }

    /// A condition's code as this organisation's system writes it: SNOMED CT, with a Read v2
    /// code beside it at GP practices (first, at a third of them) and ICD-10 at hospitals.
    fn condition_code(&self, c: Concept) -> Value {
        let (read, icd) = codes::condition_alternatives(c.code);
        let snomed = fhir::coding(SNOMED, c);
        let codings = match (self.org.kind, read, icd) {
            (OrgKind::GpPractice, Some(r), _) => {
                let read = fhir::coding(codes::READ_V2, r);
                let seed = self.region.spec().seed;
                if Prng::keyed(&[seed, TAG_NAMING, self.org_index as u64, 1]).chance(0.34) {
                    vec![read, snomed]
                } else {
                    vec![snomed, read]
                }
            }
            (OrgKind::AcuteTrust | OrgKind::MentalHealthTrust, _, Some(i)) => {
                vec![snomed, fhir::coding(codes::ICD10, i)]
            }
            _ => vec![snomed],
        };
        json!({ "coding": codings, "text": c.display })
    }

    fn allergy(&mut self, def: usize, recorded: i64) {
        let (status, severity) = self.variety.allergy(def);
        self.allergy_as(def, recorded, status, severity);
    }

    /// An AllergyIntolerance with a given verification status and reaction severity. Refuted
    /// ones are inactive; entered in error ones carry no clinical status (FHIR ait-2).
    fn allergy_as(
        &mut self,
        def: usize,
        recorded: i64,
        status: Verification,
        severity: &str,
    ) -> String {
        let id = self.id(ResourceType::AllergyIntolerance);
        let a = codes::ALLERGIES[def];
        let updated = self.last_updated(recorded);
        let mut v = json!({
            "resourceType": "AllergyIntolerance",
            "id": id,
            "meta": fhir::meta(ResourceType::AllergyIntolerance, &updated),
            "clinicalStatus": fhir::hl7("allergyintolerance-clinical", "active", "Active"),
            "verificationStatus": fhir::hl7("allergyintolerance-verification", status.code(), status.display()),
            "type": "allergy",
            "category": [a.category],
            "criticality": if severity == "severe" { "high" } else { "low" },
            "code": fhir::concept(SNOMED, a.concept),
            "patient": self.subject(),
            "recordedDate": calendar::date(recorded),
            "reaction": [{
                "manifestation": [fhir::concept(SNOMED, a.reaction)],
                "severity": severity,
            }],
        });
        if status == Verification::Refuted {
            v["clinicalStatus"] = fhir::hl7("allergyintolerance-clinical", "inactive", "Inactive");
        }
        self.push(ResourceType::AllergyIntolerance, v);
        id
    }

    /// "No known allergy" (SNOMED CT 716186003): an assertion, recorded as GP systems do, as
    /// an active, confirmed AllergyIntolerance with no substance, category or reaction.
    fn no_known_allergy(&mut self, recorded: i64) {
        let id = self.id(ResourceType::AllergyIntolerance);
        let updated = self.last_updated(recorded);
        let v = json!({
            "resourceType": "AllergyIntolerance",
            "id": id,
            "meta": fhir::meta(ResourceType::AllergyIntolerance, &updated),
            "clinicalStatus": fhir::hl7("allergyintolerance-clinical", "active", "Active"),
            "verificationStatus": fhir::hl7("allergyintolerance-verification", "confirmed", "Confirmed"),
            "code": fhir::concept(SNOMED, codes::NO_KNOWN_ALLERGY),
            "patient": self.subject(),
            "recordedDate": calendar::date(recorded),
        });
        self.push(ResourceType::AllergyIntolerance, v);
    }

    /// The GP-only extras: "no known allergy", a refuted allergy or diagnosis, one entered in
    /// error, a past sexually transmitted infection carrying a security label and a second
    /// coding. Drawn from their own generator, after everything else, so the rest of the
    /// record is what it was without them.
    fn gp_variety(&mut self, truth: &Truth) {
        let v = self.variety.clone();
        if truth.allergies.is_empty() && v.nka && gp_records_nka(self.region, self.org_index) {
            let day = self.past_day(1500);
            self.no_known_allergy(day);
        }
        if let Some((a, day)) = v.refuted_allergy {
            self.allergy_as(a, day, Verification::Refuted, "moderate");
        }
        if let Some((c, day)) = v.refuted_condition {
            self.condition_as(c, day, day, Verification::Refuted);
        }
        if let Some((c, day)) = v.entered_in_error {
            self.condition_as(c, day, day, Verification::EnteredInError);
        }
        if let Some(day) = v.sexual_health {
            let id = self.id(ResourceType::Condition);
            let updated = self.last_updated(day);
            let c = json!({
                "resourceType": "Condition",
                "id": id,
                "meta": {
                    "lastUpdated": updated,
                    "profile": fhir::meta(ResourceType::Condition, "")["profile"].clone(),
                    "security": [{
                        "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                        "code": "R",
                        "display": "restricted",
                    }],
                },
                "clinicalStatus": fhir::hl7("condition-clinical", "resolved", "Resolved"),
                "verificationStatus": fhir::hl7("condition-ver-status", "confirmed", "Confirmed"),
                "category": [fhir::hl7("condition-category", "encounter-diagnosis", "Encounter Diagnosis")],
                "code": {
                    "coding": [
                        fhir::coding(SNOMED, codes::CHLAMYDIA),
                        fhir::coding(codes::ICD10, codes::CHLAMYDIA_ICD10),
                    ],
                    "text": codes::CHLAMYDIA.display,
                },
                "subject": self.subject(),
                "onsetDateTime": calendar::date(day),
                "abatementDateTime": calendar::date((day + 14).min(self.today)),
                "recordedDate": calendar::date(day),
            });
            self.push(ResourceType::Condition, c);
        }
    }

    /// Conflict mode: this organisation's disagreeing version of the patient's shared fact.
    fn apply_conflict(&mut self, plan: &Planned, truth: &Truth) {
        match plan.kind {
            ClinicalConflictKind::AllergyResolved | ClinicalConflictKind::AllergyRefuted => {
                let code = codes::ALLERGIES[plan.item].concept.code;
                if self
                    .position(ResourceType::AllergyIntolerance, "code", code)
                    .is_none()
                {
                    let recorded = truth
                        .allergies
                        .iter()
                        .find(|(a, _)| *a == plan.item)
                        .map_or(self.today - 30, |(_, d)| *d);
                    self.allergy(plan.item, recorded);
                }
                let Some(i) = self.position(ResourceType::AllergyIntolerance, "code", code) else {
                    return;
                };
                let v = &mut self.out[i].1;
                if plan.kind == ClinicalConflictKind::AllergyResolved {
                    v["clinicalStatus"] =
                        fhir::hl7("allergyintolerance-clinical", "resolved", "Resolved");
                    v["lastReactionOccurrence"] = json!(calendar::date(self.today - 400));
                } else {
                    v["clinicalStatus"] =
                        fhir::hl7("allergyintolerance-clinical", "inactive", "Inactive");
                    v["verificationStatus"] =
                        fhir::hl7("allergyintolerance-verification", "refuted", "Refuted");
                }
            }
            ClinicalConflictKind::NoKnownAllergy => {
                let day = self.past_day(400);
                self.allergy_as(plan.item, day, Verification::Confirmed, "moderate");
            }
            ClinicalConflictKind::MedicineStopped | ClinicalConflictKind::Dosage => {
                let code = codes::MEDICINES[plan.item].concept.code;
                let field = "medicationCodeableConcept";
                if self
                    .position(ResourceType::MedicationStatement, field, code)
                    .is_none()
                {
                    let start = truth
                        .medicines
                        .iter()
                        .find(|(m, _, _)| *m == plan.item)
                        .map_or(self.today - 30, |(_, d, _)| *d);
                    self.medication_statement(plan.item, start, true);
                }
                let Some(i) = self.position(ResourceType::MedicationStatement, field, code) else {
                    return;
                };
                let today = self.today;
                let v = &mut self.out[i].1;
                if plan.kind == ClinicalConflictKind::MedicineStopped {
                    v["status"] = json!("stopped");
                    v["effectivePeriod"]["end"] = json!(calendar::date(today - 10));
                    v["statusReason"] = json!([{ "text": "Stopped during admission" }]);
                } else {
                    v["dosage"] = json!([{ "text": codes::other_dosage(plan.item) }]);
                }
            }
        }
    }

    /// Index in `out` of the first resource of type `rt` whose `field` is coded `code`.
    fn position(&self, rt: ResourceType, field: &str, code: &str) -> Option<usize> {
        self.out.iter().position(|(t, v)| {
            *t == rt
                && v[field]["coding"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["code"] == code))
        })
    }

    fn medication_statement(&mut self, med: usize, start: i64, active: bool) {
        let id = self.id(ResourceType::MedicationStatement);
        let m = codes::MEDICINES[med];
        let asserted = self.past_day(180).max(start);
        let updated = self.last_updated(asserted);
        let mut period = json!({ "start": calendar::date(start) });
        if !active {
            period["end"] = json!(calendar::date((start + 5).min(self.today)));
        }
        let v = json!({
            "resourceType": "MedicationStatement",
            "id": id,
            "meta": fhir::meta(ResourceType::MedicationStatement, &updated),
            "status": if active { "active" } else { "completed" },
            "medicationCodeableConcept": fhir::concept(DMD, m.concept),
            "subject": self.subject(),
            "effectivePeriod": period,
            "dateAsserted": calendar::date(asserted),
            "dosage": [{ "text": m.dosage }],
        });
        self.push(ResourceType::MedicationStatement, v);
    }

    fn medication_request(&mut self, med: usize, authored: i64, active: bool) -> String {
        let status = if active { "active" } else { "completed" };
        self.prescription(med, authored, status, "order", active, None)
    }

    /// How this organisation names drugs (see [`DrugNaming`]).
    fn drug_naming(&self) -> DrugNaming {
        if self.view.references_only {
            return DrugNaming::Referenced;
        }
        match self.org.kind {
            OrgKind::AcuteTrust => DrugNaming::Contained,
            OrgKind::MentalHealthTrust => DrugNaming::Referenced,
            OrgKind::GpPractice => {
                let seed = self.region.spec().seed;
                match Prng::keyed(&[seed, TAG_NAMING, self.org_index as u64]).below(3) {
                    0 => DrugNaming::Referenced,
                    1 => DrugNaming::Contained,
                    _ => DrugNaming::Inline,
                }
            }
            _ => DrugNaming::Inline,
        }
    }

    /// A MedicationRequest: an authorisation (`intent` plan) or an issue (`order`, optionally
    /// `basedOn` its plan). Returns its id.
    fn prescription(
        &mut self,
        med: usize,
        authored: i64,
        status: &str,
        intent: &str,
        repeat: bool,
        based_on: Option<&str>,
    ) -> String {
        let id = self.id(ResourceType::MedicationRequest);
        let m = codes::MEDICINES[med];
        let minute = self.minute();
        let updated = self.last_updated(authored);
        let course = if repeat {
            fhir::hl7(
                "medicationrequest-course-of-therapy",
                "continuous",
                "Continuous long term therapy",
            )
        } else {
            fhir::hl7(
                "medicationrequest-course-of-therapy",
                "acute",
                "Short course (acute) therapy",
            )
        };
        let mut v = json!({
            "resourceType": "MedicationRequest",
            "id": id,
            "meta": fhir::meta(ResourceType::MedicationRequest, &updated),
            "status": status,
            "intent": intent,
            "subject": self.subject(),
            "authoredOn": calendar::instant(authored, minute),
            "requester": fhir::org_reference(self.org),
            "courseOfTherapyType": course,
            "dosageInstruction": [{ "text": m.dosage }],
        });
        match self.drug_naming() {
            DrugNaming::Inline => {
                v["medicationCodeableConcept"] = fhir::concept(DMD, m.concept);
            }
            DrugNaming::Contained => {
                v["contained"] = json!([{
                    "resourceType": "Medication",
                    "id": "med",
                    "code": fhir::concept(DMD, m.concept),
                }]);
                v["medicationReference"] = json!({ "reference": "#med" });
            }
            DrugNaming::Referenced => {
                // One Medication per drug per patient at this organisation; the id does not
                // depend on the view, so it stays readable whichever shape was served.
                let med_id = format!(
                    "{}-{}-{}-{}",
                    self.id_prefix,
                    ResourceType::Medication.abbreviation(),
                    100_000 + self.person_index,
                    med + 1
                );
                if !self.medications.iter().any(|x| x["id"] == med_id.as_str()) {
                    self.medications.push(json!({
                        "resourceType": "Medication",
                        "id": med_id,
                        "meta": fhir::meta(ResourceType::Medication, &updated),
                        "code": fhir::concept(DMD, m.concept),
                    }));
                }
                v["medicationReference"] = fhir::reference(ResourceType::Medication, &med_id);
            }
        }
        if let Some(plan) = based_on {
            v["basedOn"] = json!([fhir::reference(ResourceType::MedicationRequest, plan)]);
            v["dispenseRequest"] = json!({
                "validityPeriod": {
                    "start": calendar::date(authored),
                    "end": calendar::date(authored + 28),
                },
                "expectedSupplyDuration": {
                    "value": 28, "unit": "days", "system": UCUM, "code": "d",
                },
            });
        }
        self.push(ResourceType::MedicationRequest, v);
        id
    }

    /// A measured value for this patient, shifted by their conditions.
    fn test_value(&mut self, test: usize) -> f64 {
        let t = codes::TESTS[test];
        let p = self.person;
        let has = |code: &str| {
            codes::CONDITIONS
                .iter()
                .enumerate()
                .any(|(i, d)| d.concept.code == code && p.has_condition(i))
        };
        let shift = match test {
            codes::HBA1C if has("44054006") => 2.3,
            codes::GLUCOSE if has("44054006") => 55.0,
            codes::CREATININE if has("709044004") => 0.8,
            codes::CHOLESTEROL if has("55822004") => 45.0,
            codes::TSH if has("40930008") => 2.8,
            codes::SYSTOLIC if has("38341003") => 18.0,
            codes::DIASTOLIC if has("38341003") => 8.0,
            codes::HEART_RATE if has("49436004") => 18.0,
            codes::SPO2 if has("13645005") => -4.0,
            codes::HAEMOGLOBIN if !p.female => 1.2,
            _ => 0.0,
        };
        let raw = (t.mean + shift + t.sd * self.rng.normal()).max(0.0);
        let raw = if test == codes::SPO2 {
            raw.min(100.0)
        } else {
            raw
        };
        let scale = 10f64.powi(t.decimals as i32);
        (raw * scale).round() / scale
    }

    fn observation(
        &mut self,
        test: usize,
        day: i64,
        minute: u32,
        encounter: Option<&str>,
    ) -> String {
        let id = self.id(ResourceType::Observation);
        let t = codes::TESTS[test];
        let value = self.test_value(test);
        let quantity =
            |v: f64| json!({ "value": v, "unit": t.unit, "system": UCUM, "code": t.unit });
        let (category, category_display) = if t.vital_sign {
            ("vital-signs", "Vital Signs")
        } else {
            ("laboratory", "Laboratory")
        };
        let issued_minute = if t.vital_sign {
            minute
        } else {
            (minute + 180).min(23 * 60)
        };
        let mut v = json!({
            "resourceType": "Observation",
            "id": id,
            "meta": fhir::meta(ResourceType::Observation, &calendar::instant(day, issued_minute)),
            "status": "final",
            "category": [fhir::hl7("observation-category", category, category_display)],
            "code": fhir::concept(LOINC, t.concept),
            "subject": self.subject(),
            "effectiveDateTime": calendar::instant(day, minute),
            "issued": calendar::instant(day, issued_minute),
            "performer": [fhir::org_reference(self.org)],
            "valueQuantity": quantity(value),
        });
        if t.low.is_some() || t.high.is_some() {
            let (code, display) = match (t.low, t.high) {
                (Some(lo), _) if value < lo => ("L", "Low"),
                (_, Some(hi)) if value > hi => ("H", "High"),
                _ => ("N", "Normal"),
            };
            v["interpretation"] = json!([fhir::hl7("v3-ObservationInterpretation", code, display)]);
            let mut range = json!({});
            if let Some(lo) = t.low {
                range["low"] = quantity(lo);
            }
            if let Some(hi) = t.high {
                range["high"] = quantity(hi);
            }
            v["referenceRange"] = json!([range]);
        }
        if let Some(enc) = encounter {
            v["encounter"] = fhir::reference(ResourceType::Encounter, enc);
        }
        self.push(ResourceType::Observation, v);
        id
    }

    /// A lab panel: its observations and the DiagnosticReport that groups them.
    fn lab_report(&mut self, panel: usize, day: i64, encounter: Option<&str>) {
        let p = codes::PANELS[panel];
        let minute = self.minute().min(14 * 60);
        let results: Vec<Value> = p
            .tests
            .iter()
            .map(|&t| {
                let id = self.observation(t, day, minute, encounter);
                fhir::reference(ResourceType::Observation, &id)
            })
            .collect();
        let id = self.id(ResourceType::DiagnosticReport);
        let issued = calendar::instant(day, minute + 240);
        let mut v = json!({
            "resourceType": "DiagnosticReport",
            "id": id,
            "meta": fhir::meta(ResourceType::DiagnosticReport, &issued),
            "status": "final",
            "category": [fhir::hl7("v2-0074", p.section.0, p.section.1)],
            "code": fhir::concept(LOINC, p.concept),
            "subject": self.subject(),
            "effectiveDateTime": calendar::instant(day, minute),
            "issued": issued,
            "performer": [fhir::org_reference(self.org)],
            "result": results,
        });
        if let Some(enc) = encounter {
            v["encounter"] = fhir::reference(ResourceType::Encounter, enc);
        }
        self.push(ResourceType::DiagnosticReport, v);
    }

    fn chest_xray(&mut self, day: i64, encounter: Option<&str>) {
        let id = self.id(ResourceType::DiagnosticReport);
        let minute = self.minute();
        let conclusion = *self
            .rng
            .pick(&[
                "No acute cardiopulmonary abnormality.",
                "Mild cardiomegaly. Lungs clear.",
                "Right lower zone consolidation, in keeping with infection.",
                "Hyperexpanded lungs consistent with COPD. No focal consolidation.",
            ])
            .unwrap_or(&"No acute cardiopulmonary abnormality.");
        let issued = calendar::instant(day, (minute + 120).min(23 * 60));
        let mut v = json!({
            "resourceType": "DiagnosticReport",
            "id": id,
            "meta": fhir::meta(ResourceType::DiagnosticReport, &issued),
            "status": "final",
            "category": [fhir::hl7("v2-0074", "RAD", "Radiology")],
            "code": fhir::concept(LOINC, codes::CHEST_XRAY),
            "subject": self.subject(),
            "effectiveDateTime": calendar::instant(day, minute),
            "issued": issued,
            "performer": [fhir::org_reference(self.org)],
            "conclusion": conclusion,
        });
        if let Some(enc) = encounter {
            v["encounter"] = fhir::reference(ResourceType::Encounter, enc);
        }
        self.push(ResourceType::DiagnosticReport, v);
        self.document(
            codes::IMAGING_REPORT,
            "Radiology report: chest X-ray",
            day,
            encounter,
        );
    }

    fn document(&mut self, kind: Concept, title: &str, day: i64, encounter: Option<&str>) {
        let id = self.id(ResourceType::DocumentReference);
        let minute = self.minute();
        let when = calendar::instant(day, minute);
        let mut v = json!({
            "resourceType": "DocumentReference",
            "id": id,
            "meta": fhir::meta(ResourceType::DocumentReference, &when),
            "status": "current",
            "docStatus": "final",
            "type": fhir::concept(SNOMED, kind),
            "subject": self.subject(),
            "date": when,
            "author": [fhir::org_reference(self.org)],
            "custodian": fhir::org_reference(self.org),
            "description": title,
            "content": [{
                "attachment": {
                    "contentType": "text/plain",
                    "url": format!("{}/Binary/{id}", self.base_url),
                    "title": title,
                    "creation": when,
                }
            }],
        });
        if let Some(enc) = encounter {
            v["context"] = json!({ "encounter": [fhir::reference(ResourceType::Encounter, enc)] });
        }
        self.push(ResourceType::DocumentReference, v);
    }

    fn encounter(
        &mut self,
        class: (&str, &str),
        kind: Concept,
        day: i64,
        minutes: i64,
        reason: Option<Concept>,
    ) -> String {
        let id = self.id(ResourceType::Encounter);
        let start_minute = i64::from(self.minute());
        let end_total = start_minute + minutes;
        let end_day = (day + end_total / (24 * 60)).min(self.today);
        let end = calendar::instant(end_day, (end_total % (24 * 60)) as u32);
        let end = if end_day == day && end_total >= 24 * 60 {
            calendar::instant(day, 24 * 60 - 1)
        } else {
            end
        };
        let mut v = json!({
            "resourceType": "Encounter",
            "id": id,
            "meta": fhir::meta(ResourceType::Encounter, &end),
            "status": "finished",
            "class": {
                "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                "code": class.0,
                "display": class.1,
            },
            "type": [fhir::concept(SNOMED, kind)],
            "subject": self.subject(),
            "period": { "start": calendar::instant(day, start_minute as u32), "end": end },
            "serviceProvider": fhir::org_reference(self.org),
        });
        if let Some(r) = reason {
            v["reasonCode"] = json!([fhir::concept(SNOMED, r)]);
        }
        self.push(ResourceType::Encounter, v);
        id
    }

    fn appointment(&mut self, service: &str, kind: (&str, &str), location: &str) {
        let id = self.id(ResourceType::Appointment);
        let day = self.today + self.rng.range(1, 120);
        let minute = 9 * 60 + 15 * self.rng.range(0, 28) as u32;
        let duration = *self.rng.pick(&[10u32, 15, 20, 30]).unwrap_or(&15);
        let created = self.past_day(60);
        let v = json!({
            "resourceType": "Appointment",
            "id": id,
            "meta": fhir::meta(ResourceType::Appointment, &calendar::instant(created, 10 * 60)),
            "status": "booked",
            "serviceType": [{ "text": service }],
            "appointmentType": fhir::hl7("v2-0276", kind.0, kind.1),
            "description": format!("{service} at {}", self.org.name),
            "start": calendar::instant(day, minute),
            "end": calendar::instant(day, minute + duration),
            "minutesDuration": duration,
            "created": calendar::date(created),
            "participant": [
                {
                    "actor": { "reference": format!("Patient/{}", self.patient_id), "display": format!("{} {}", self.person.given, self.person.family) },
                    "required": "required",
                    "status": "accepted",
                },
                {
                    "actor": { "display": location },
                    "required": "required",
                    "status": "accepted",
                },
            ],
        });
        self.push(ResourceType::Appointment, v);
    }

    fn care_plan(
        &mut self,
        category: Concept,
        title: &str,
        description: &str,
        start: i64,
        addresses: &[String],
    ) {
        let id = self.id(ResourceType::CarePlan);
        let day = self.today - self.rng.range(1, 90);
        let updated = self.last_updated(day);
        let mut v = json!({
            "resourceType": "CarePlan",
            "id": id,
            "meta": fhir::meta(ResourceType::CarePlan, &updated),
            "status": "active",
            "intent": "plan",
            "category": [fhir::concept(SNOMED, category)],
            "title": title,
            "description": description,
            "subject": self.subject(),
            "period": { "start": calendar::date(start) },
            "created": calendar::date(start),
            "author": fhir::org_reference(self.org),
        });
        if !addresses.is_empty() {
            v["addresses"] = Value::Array(
                addresses
                    .iter()
                    .map(|c| fhir::reference(ResourceType::Condition, c))
                    .collect(),
            );
        }
        self.push(ResourceType::CarePlan, v);
    }

    fn vital_signs(&mut self, day: i64, encounter: Option<&str>, set: &[usize]) {
        let minute = self.minute();
        for &t in set {
            self.observation(t, day, minute, encounter);
        }
    }

    // ---- what each kind of organisation holds ---------------------------------------------

    fn gp(&mut self, truth: &Truth) {
        let mut ltc = Vec::new();
        for &(c, onset) in &truth.conditions {
            let recorded = onset + self.rng.range(0, 14);
            let id = self.condition(c, onset, recorded);
            if matches!(
                codes::CONDITIONS[c].concept.code,
                "44054006" | "13645005" | "195967001" | "84114007"
            ) {
                ltc.push(id);
            }
        }
        for &(a, recorded) in &truth.allergies {
            self.allergy(a, recorded);
        }
        for &(m, start, active) in &truth.medicines {
            self.medication_statement(m, start, active);
            let authored = if active {
                self.past_day(56).max(start)
            } else {
                start
            };
            if active {
                // A repeat: the authorisation (plan), then its issues every 28 days, latest
                // last, each based on the authorisation.
                let plan = self.prescription(m, start, "active", "plan", true, None);
                for back in [2, 1] {
                    let day = authored - 28 * back;
                    if day > start {
                        self.prescription(m, day, "completed", "order", true, Some(&plan));
                    }
                }
                self.prescription(m, authored, "active", "order", true, Some(&plan));
            } else {
                self.medication_request(m, authored, active);
            }
        }
        let adult = self.age() >= 18;
        for _ in 0..self.rng.range(1, 3) {
            let day = self.past_day(730);
            self.vital_signs(
                day,
                None,
                &[codes::SYSTOLIC, codes::DIASTOLIC, codes::WEIGHT],
            );
        }
        if adult && self.rng.chance(0.7) {
            let day = self.past_day(400);
            self.lab_report(0, day, None);
            self.lab_report(1, day, None);
        }
        if truth.has("44054006") {
            for _ in 0..2 {
                let day = self.past_day(365);
                self.lab_report(2, day, None);
            }
        }
        if truth.has_specialty(Specialty::Cardiac) {
            let day = self.past_day(365);
            self.lab_report(3, day, None);
        }
        if truth.has("40930008") {
            let day = self.past_day(365);
            self.lab_report(4, day, None);
        }
        for _ in 0..self.rng.range(1, 4) {
            let day = self.past_day(540);
            let kind = if self.rng.chance(0.3) {
                codes::TELEPHONE_ENCOUNTER
            } else {
                codes::CONSULTATION
            };
            let minutes = self.rng.range(10, 20);
            self.encounter(("AMB", "ambulatory"), kind, day, minutes, None);
        }
        if !ltc.is_empty() {
            let start = self.past_day(365);
            self.care_plan(
                codes::CARE_PLAN_DOC,
                "Long-term condition management plan",
                "Annual review, self-management advice and medication review.",
                start,
                &ltc,
            );
        }
        let knows_hospital = self
            .person
            .orgs
            .iter()
            .any(|&o| self.region.organisations()[usize::from(o)].kind == OrgKind::AcuteTrust);
        if knows_hospital && self.rng.chance(0.6) {
            let day = self.past_day(365);
            self.document(
                codes::ENCOUNTER_REPORT,
                "Outpatient clinic letter",
                day,
                None,
            );
        }
        if self.rng.chance(0.15) {
            let day = self.past_day(365);
            self.document(codes::ENCOUNTER_REPORT, "Referral letter", day, None);
        }
        if self.rng.chance(if ltc.is_empty() { 0.2 } else { 0.6 }) {
            let service = if ltc.is_empty() {
                "General practice appointment"
            } else {
                "Long-term condition review"
            };
            self.appointment(
                service,
                ("ROUTINE", "Routine appointment - default if not valued"),
                "Practice nurse clinic",
            );
        }
    }

    fn acute(&mut self, truth: &Truth) {
        let mut recorded_any = false;
        for &(c, onset) in &truth.conditions {
            let p = match codes::CONDITIONS[c].specialty {
                Specialty::MentalHealth => 0.3,
                _ => 0.65,
            };
            if self.rng.chance(p) {
                let recorded = self.past_day(700);
                self.condition(c, onset, recorded);
                recorded_any = true;
            }
        }
        // A hospital that knows the patient has coded at least one of their problems.
        if !recorded_any && let Some(&(c, onset)) = truth.conditions.first() {
            let recorded = self.past_day(700);
            self.condition(c, onset, recorded);
        }
        for &(a, recorded) in &truth.allergies {
            if self.rng.chance(0.9) {
                let at = recorded.max(self.past_day(700));
                self.allergy(a, at);
            }
        }
        for &(m, start, active) in &truth.medicines {
            if active && self.rng.chance(0.8) {
                self.medication_statement(m, start, true);
            }
        }
        let visits = self.rng.range(1, 3);
        for _ in 0..visits {
            let day = self.past_day(720);
            let roll = self.rng.unit();
            if roll < 0.35 {
                let stay = self.rng.range(2, 9) * 24 * 60;
                let enc = self.encounter(
                    ("IMP", "inpatient encounter"),
                    codes::EMERGENCY_ADMISSION,
                    day,
                    stay,
                    None,
                );
                self.lab_report(0, day, Some(&enc));
                self.lab_report(1, day, Some(&enc));
                if self.rng.chance(0.4) {
                    self.chest_xray(day, Some(&enc));
                }
                self.medication_request(8, day, false);
                let discharge = (day + 3).min(self.today);
                self.document(
                    codes::DISCHARGE_SUMMARY,
                    "Discharge summary",
                    discharge,
                    Some(&enc),
                );
            } else if roll < 0.65 {
                let minutes = self.rng.range(120, 360);
                let enc =
                    self.encounter(("EMER", "emergency"), codes::ED_VISIT, day, minutes, None);
                self.vital_signs(
                    day,
                    Some(&enc),
                    &[
                        codes::SYSTOLIC,
                        codes::DIASTOLIC,
                        codes::HEART_RATE,
                        codes::SPO2,
                    ],
                );
                if self.rng.chance(0.5) {
                    self.lab_report(0, day, Some(&enc));
                }
                if self.rng.chance(0.2) {
                    self.chest_xray(day, Some(&enc));
                }
            } else {
                let enc = self.encounter(
                    ("AMB", "ambulatory"),
                    codes::PROBLEM_ENCOUNTER,
                    day,
                    30,
                    None,
                );
                self.document(
                    codes::ENCOUNTER_REPORT,
                    "Outpatient clinic letter",
                    day,
                    Some(&enc),
                );
            }
        }
        if self.rng.chance(0.35) {
            let service = if truth.has_specialty(Specialty::Cardiac) {
                "Cardiology outpatient clinic"
            } else if truth.has_specialty(Specialty::Respiratory) {
                "Respiratory outpatient clinic"
            } else {
                "General medicine outpatient clinic"
            };
            self.appointment(
                service,
                ("FOLLOWUP", "A follow up visit from a previous appointment"),
                "Outpatients department",
            );
        }
        if self.rng.chance(0.05) {
            let start = self.past_day(200);
            self.care_plan(
                codes::CARE_PLAN_DOC,
                "Discharge plan",
                "Community follow-up after discharge.",
                start,
                &[],
            );
        }
    }

    fn mental_health(&mut self, truth: &Truth) {
        let mut addressed = Vec::new();
        for &(c, onset) in &truth.conditions {
            if codes::CONDITIONS[c].specialty == Specialty::MentalHealth {
                let recorded = self.past_day(900);
                addressed.push(self.condition(c, onset, recorded));
            }
        }
        for &(a, recorded) in &truth.allergies {
            if self.rng.chance(0.7) {
                self.allergy(a, recorded);
            }
        }
        for &(m, start, active) in &truth.medicines {
            if !active {
                continue;
            }
            let ours = m == 4; // sertraline: the trust initiated it
            if ours {
                let authored = self.past_day(90).max(start);
                self.medication_request(m, authored, true);
            }
            if ours || self.rng.chance(0.5) {
                self.medication_statement(m, start, true);
            }
        }
        for _ in 0..self.rng.range(1, 4) {
            let day = self.past_day(540);
            let enc = self.encounter(("AMB", "ambulatory"), codes::CONSULTATION, day, 50, None);
            if self.rng.chance(0.4) {
                self.document(
                    codes::ENCOUNTER_REPORT,
                    "Community mental health team letter",
                    day,
                    Some(&enc),
                );
            }
        }
        if self.rng.chance(0.3) {
            let day = self.past_day(365);
            self.vital_signs(
                day,
                None,
                &[codes::WEIGHT, codes::SYSTOLIC, codes::DIASTOLIC],
            );
        }
        let start = self.past_day(365);
        self.care_plan(
            codes::CARE_PLAN_DOC,
            "Care Programme Approach care plan",
            "Care coordinator contact every four weeks; crisis line details given.",
            start,
            &addressed,
        );
        if self.rng.chance(0.5) {
            self.appointment(
                "Community mental health team review",
                ("FOLLOWUP", "A follow up visit from a previous appointment"),
                "Community mental health team base",
            );
        }
    }

    fn ambulance(&mut self, truth: &Truth) {
        for &(a, recorded) in &truth.allergies {
            if self.rng.chance(0.6) {
                self.allergy(a, recorded);
            }
        }
        for &(m, start, active) in &truth.medicines {
            if active && self.rng.chance(0.4) {
                self.medication_statement(m, start, true);
            }
        }
        for &(c, onset) in &truth.conditions {
            if codes::CONDITIONS[c].specialty != Specialty::MentalHealth && self.rng.chance(0.3) {
                let recorded = self.past_day(700);
                self.condition(c, onset, recorded);
            }
        }
        for _ in 0..self.rng.range(1, 2) {
            let day = self.past_day(720);
            let reason = if truth.has_specialty(Specialty::Cardiac) && self.rng.chance(0.5) {
                codes::AMBULANCE_REASONS[0]
            } else {
                *self
                    .rng
                    .pick(codes::AMBULANCE_REASONS)
                    .unwrap_or(&codes::AMBULANCE_REASONS[0])
            };
            let minutes = self.rng.range(40, 120);
            let enc = self.encounter(
                ("EMER", "emergency"),
                codes::AMBULANCE_CARE,
                day,
                minutes,
                Some(reason),
            );
            self.vital_signs(
                day,
                Some(&enc),
                &[
                    codes::HEART_RATE,
                    codes::RESP_RATE,
                    codes::SPO2,
                    codes::SYSTOLIC,
                    codes::DIASTOLIC,
                    codes::TEMPERATURE,
                ],
            );
            self.document(
                codes::ENCOUNTER_REPORT,
                "Ambulance patient care report",
                day,
                Some(&enc),
            );
        }
    }

    fn care_home(&mut self, truth: &Truth) {
        let mut addressed = Vec::new();
        for &(c, onset) in &truth.conditions {
            let recorded = self.past_day(700);
            addressed.push(self.condition(c, onset, recorded));
        }
        for &(a, recorded) in &truth.allergies {
            self.allergy(a, recorded);
        }
        for &(m, start, active) in &truth.medicines {
            if active {
                self.medication_statement(m, start, true);
            }
        }
        for _ in 0..3 {
            let day = self.past_day(100);
            self.vital_signs(day, None, &[codes::WEIGHT]);
        }
        let start = self.past_day(500);
        self.care_plan(
            codes::CARE_PLAN_DOC,
            "Residential care plan",
            "Personal care, mobility, nutrition and falls prevention.",
            start,
            &addressed,
        );
        if self.rng.chance(0.7) {
            let day = self.past_day(400);
            self.care_plan(
                codes::ADVANCE_CARE_PLAN,
                "Advance care plan",
                "Preferred place of care: this home. Treatment escalation plan agreed with family.",
                day,
                &[],
            );
            self.document(codes::ADVANCE_CARE_PLAN, "Advance care plan", day, None);
        }
        if self.rng.chance(0.3) {
            self.appointment(
                "GP ward round",
                ("CHECKUP", "A routine check-up, such as an annual physical"),
                self.org.name.clone().as_str(),
            );
        }
    }
}

/// Plain-text content for a document's attachment (`Binary/{id}`).
pub(crate) fn document_text(
    region: &Region,
    org: usize,
    record: &OrgRecord,
    doc: &Value,
) -> String {
    let o = &region.organisations()[org];
    let name = record.patient["name"][0]["family"].as_str().unwrap_or("");
    let given = record.patient["name"][0]["given"][0].as_str().unwrap_or("");
    let nhs = record.patient["identifier"][0]["value"]
        .as_str()
        .unwrap_or("");
    format!(
        "{}\n{}\n\nPatient: {} {}  NHS number: {}\nDate: {}\n\nSynthetic document generated by carerecord mock-sources. Not a real patient.\n",
        o.name,
        doc["description"].as_str().unwrap_or("Document"),
        given,
        name.to_uppercase(),
        nhs,
        doc["date"].as_str().unwrap_or(""),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::population::RegionSpec;

    fn region() -> Region {
        Region::generate(&RegionSpec {
            patients: 3_000,
            ..RegionSpec::default()
        })
    }

    fn records_of(region: &Region, person: usize) -> Vec<(usize, OrgRecord)> {
        region
            .person(person)
            .orgs
            .iter()
            .map(|&o| {
                (
                    usize::from(o),
                    build(region, person, usize::from(o), "http://x/fhir"),
                )
            })
            .collect()
    }

    #[test]
    fn records_are_deterministic() {
        let r = region();
        for p in 0..50 {
            let org = usize::from(r.person(p).orgs[0]);
            let json = |rec: OrgRecord| {
                serde_json::to_string(&rec.everything().collect::<Vec<_>>()).unwrap()
            };
            let a = json(build(&r, p, org, "http://x/fhir"));
            let b = json(build(&r, p, org, "http://x/fhir"));
            assert_eq!(a, b);
        }
    }

    #[test]
    fn gp_and_hospital_share_codes_for_the_same_allergy_and_medicine() {
        let r = region();
        let codes_of = |rec: &OrgRecord, rt: ResourceType, field: &str| -> Vec<String> {
            rec.of_type(rt)
                .filter_map(|v| v[field]["coding"][0]["code"].as_str().map(String::from))
                .collect()
        };
        let mut shared_allergy = 0;
        let mut shared_medicine = 0;
        for p in 0..r.patient_count() {
            let recs = records_of(&r, p);
            let Some((_, gp)) = recs.first() else {
                continue;
            };
            for (o, rec) in &recs[1..] {
                if r.organisations()[*o].kind != OrgKind::AcuteTrust {
                    continue;
                }
                let a = codes_of(gp, ResourceType::AllergyIntolerance, "code");
                shared_allergy += codes_of(rec, ResourceType::AllergyIntolerance, "code")
                    .iter()
                    .filter(|c| a.contains(c))
                    .count();
                let m = codes_of(
                    gp,
                    ResourceType::MedicationStatement,
                    "medicationCodeableConcept",
                );
                shared_medicine += codes_of(
                    rec,
                    ResourceType::MedicationStatement,
                    "medicationCodeableConcept",
                )
                .iter()
                .filter(|c| m.contains(c))
                .count();
                // Same fact, different resource ids.
                let gp_ids: Vec<_> = gp.everything().map(|v| v["id"].clone()).collect();
                assert!(rec.everything().all(|v| !gp_ids.contains(&v["id"])));
            }
        }
        assert!(shared_allergy > 20, "{shared_allergy}");
        assert!(shared_medicine > 50, "{shared_medicine}");
    }

    #[test]
    fn every_resource_has_id_meta_and_patient_reference() {
        let r = region();
        for p in 0..300 {
            for (_, rec) in records_of(&r, p) {
                let pid = rec.patient["id"].as_str().unwrap().to_string();
                for (rt, v) in &rec.resources {
                    assert_eq!(v["resourceType"], rt.as_str());
                    assert!(
                        v["id"]
                            .as_str()
                            .is_some_and(|s| !s.is_empty() && s.len() <= 64)
                    );
                    assert!(
                        v["meta"]["lastUpdated"]
                            .as_str()
                            .is_some_and(|s| s.ends_with('Z'))
                    );
                    assert!(
                        v["meta"]["profile"][0]
                            .as_str()
                            .unwrap()
                            .contains("UKCore-")
                    );
                    let reference = match rt {
                        ResourceType::AllergyIntolerance => v["patient"]["reference"].clone(),
                        ResourceType::Appointment => {
                            v["participant"][0]["actor"]["reference"].clone()
                        }
                        _ => v["subject"]["reference"].clone(),
                    };
                    assert_eq!(reference, format!("Patient/{pid}"), "{v}");
                    let id = v["id"].as_str().unwrap();
                    assert_eq!(
                        person_of_resource_id(&r.organisations()[0], *rt, id).is_some(),
                        id.starts_with(&r.organisations()[0].code.to_lowercase())
                    );
                }
            }
        }
    }

    #[test]
    fn ambulance_encounters_are_emergency_class_and_appointments_are_in_the_future() {
        let r = region();
        let today = r.reference_date();
        let mut ambulance = 0;
        let mut appointments = 0;
        for p in 0..r.patient_count() {
            for (o, rec) in records_of(&r, p) {
                for e in rec.of_type(ResourceType::Encounter) {
                    if r.organisations()[o].kind == OrgKind::AmbulanceService {
                        assert_eq!(e["class"]["code"], "EMER");
                        assert_eq!(e["type"][0]["coding"][0]["code"], "11424001");
                        ambulance += 1;
                    }
                    assert!(e["period"]["start"].as_str() <= e["period"]["end"].as_str());
                }
                for a in rec.of_type(ResourceType::Appointment) {
                    assert!(a["start"].as_str().unwrap() > today.as_str());
                    appointments += 1;
                }
            }
        }
        assert!(
            ambulance > 50 && appointments > 50,
            "{ambulance} {appointments}"
        );
    }

    #[test]
    fn conflicting_demographics_appear_only_at_the_conflicting_organisation() {
        let r = region();
        let s = r.patients_with_conflicting_demographics().next().unwrap();
        let p = r.person_index(&s.nhs_number).unwrap();
        let c = s.conflict.unwrap();
        for (o, rec) in records_of(&r, p) {
            let family = rec.patient["name"][0]["family"]
                .as_str()
                .unwrap()
                .to_string();
            let birth = rec.patient["birthDate"].as_str().unwrap().to_string();
            let differs = family != s.family || birth != s.birth_date;
            assert_eq!(differs, r.organisations()[o].code == c.organisation);
        }
    }
}
