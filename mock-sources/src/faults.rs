//! Faults and latency per organisation, and request counters: the knobs tests and ops turn.
//!
//! One [`FaultControl`] is shared by the organisation servers (which read it on every request),
//! the admin HTTP API and the code that started the region, so a fault switched by any of them
//! takes effect on the next request. Counters exist so tests can assert how many calls actually
//! reached a source (caching, coalescing, breakers).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::fhir::ResourceType;
use crate::latency::LatencyProfile;
use crate::prng::Prng;

/// How an organisation misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Fault {
    /// Answer normally.
    #[default]
    None,
    /// This fraction of requests (0..=1) get a 500 with an OperationOutcome.
    ErrorRate(f64),
    /// Every request gets a 500 with an OperationOutcome.
    Http500,
    /// Accept the request and never answer (the connection is closed after five minutes).
    Hang,
    /// 200 with a truncated JSON body.
    MalformedJson,
    /// Headers at once, then the body a few bytes every 500 ms.
    SlowBody,
    /// Close the TCP connection with a reset (SO_LINGER 0) and no response at all.
    Reset,
    /// Every search finds nothing: a valid empty searchset. Reads are 404.
    EmptyBundle,
    /// A bad patient match: the Patient search by NHS number still finds the right patient,
    /// but every search and `$everything` about them answers with *another* patient's record
    /// (known to the same organisation): every `subject`/`patient` reference names that other
    /// Patient, and `$everything`'s Patient entry is the other person (another NHS number,
    /// name and birth date). See [`crate::Region::wrong_patient_at`].
    WrongPatient,
    /// Mis-filed entries: the patient's own record (right Patient, right references) with the
    /// other patient's clinical resources mixed in, referencing the other Patient.
    WrongPatientRefs,
    /// The server ignores `_include` and never returns referenced resources: every
    /// MedicationRequest names its drug by `medicationReference` to `Medication/{id}` (neither
    /// contained nor included, nor in `$everything`), readable only by `GET Medication/{id}`.
    IgnoreInclude,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::None => f.write_str("none"),
            Fault::ErrorRate(p) => write!(f, "error_rate:{p}"),
            Fault::Http500 => f.write_str("http500"),
            Fault::Hang => f.write_str("hang"),
            Fault::MalformedJson => f.write_str("malformed_json"),
            Fault::SlowBody => f.write_str("slow_body"),
            Fault::Reset => f.write_str("reset"),
            Fault::EmptyBundle => f.write_str("empty_bundle"),
            Fault::WrongPatient => f.write_str("wrong_patient"),
            Fault::WrongPatientRefs => f.write_str("wrong_patient_refs"),
            Fault::IgnoreInclude => f.write_str("ignore_include"),
        }
    }
}

/// Why a fault spec was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid fault {0:?} (expected none, error_rate:FRACTION, http500, hang, malformed_json, slow_body, reset, empty_bundle, wrong_patient, wrong_patient_refs or ignore_include)"
)]
pub struct ParseFaultError(String);

impl FromStr for Fault {
    type Err = ParseFaultError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let err = || ParseFaultError(s.to_string());
        Ok(match t {
            "none" | "" => Fault::None,
            "http500" | "http_500" => Fault::Http500,
            "hang" => Fault::Hang,
            "malformed_json" => Fault::MalformedJson,
            "slow_body" => Fault::SlowBody,
            "reset" => Fault::Reset,
            "empty_bundle" => Fault::EmptyBundle,
            "wrong_patient" => Fault::WrongPatient,
            "wrong_patient_refs" => Fault::WrongPatientRefs,
            "ignore_include" => Fault::IgnoreInclude,
            _ => {
                let rate = t.strip_prefix("error_rate:").ok_or_else(err)?;
                let p: f64 = rate.trim().parse().map_err(|_| err())?;
                if !(0.0..=1.0).contains(&p) {
                    return Err(err());
                }
                Fault::ErrorRate(p)
            }
        })
    }
}

/// The organisation code was not one of the region's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no organisation with code {0:?} in this region")]
pub struct UnknownOrganisation(pub String);

/// Requests that reached one organisation's server, by kind. Faulted requests are counted too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OrgStats {
    pub requests: u64,
    pub metadata: u64,
    pub patient_searches: u64,
    /// Searches for clinical resources (`GET /{Type}?patient=`), all types.
    pub resource_searches: u64,
    pub everything: u64,
    pub batches: u64,
    pub reads: u64,
    pub other: u64,
    /// Requests answered with a fault instead of data (500, hang, reset, malformed, ...).
    pub faulted: u64,
    /// Clinical searches by resource type, including those inside batches (non-zero only).
    pub searches_by_type: BTreeMap<String, u64>,
}

/// What a request was, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestKind {
    Metadata,
    PatientSearch,
    ResourceSearch(ResourceType),
    Everything,
    Batch,
    Read,
    Other,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    metadata: AtomicU64,
    patient_searches: AtomicU64,
    resource_searches: AtomicU64,
    everything: AtomicU64,
    batches: AtomicU64,
    reads: AtomicU64,
    other: AtomicU64,
    faulted: AtomicU64,
    by_type: [AtomicU64; 10],
}

/// What an organisation's data says, as opposed to how it is served ([`Fault`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataMode {
    /// The region's data as generated.
    #[default]
    Normal,
    /// Clinical conflict mode: for the patients [`crate::Region::patients_with_clinical_conflicts`]
    /// names, this organisation serves its disagreeing version of a shared fact (an allergy
    /// resolved or refuted, a medicine stopped, another dose, an allergy where the GP records
    /// "no known allergy"). The GP holds the reference version, so switching the GP has no
    /// effect; switch the disagreeing organisation or `all`.
    Conflicts,
}

impl fmt::Display for DataMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataMode::Normal => "normal",
            DataMode::Conflicts => "conflicts",
        })
    }
}

/// Why a data mode spec was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid data mode {0:?} (expected normal or conflicts)")]
pub struct ParseDataModeError(String);

impl FromStr for DataMode {
    type Err = ParseDataModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "normal" | "none" | "" => Ok(DataMode::Normal),
            "conflicts" | "conflict" => Ok(DataMode::Conflicts),
            _ => Err(ParseDataModeError(s.to_string())),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    latency: LatencyProfile,
    fault: Fault,
    data: DataMode,
}

#[derive(Debug)]
struct OrgControl {
    code: String,
    /// What `reset` returns latency to: the profile the region was started with.
    startup_latency: LatencyProfile,
    settings: Mutex<Settings>,
    counters: Counters,
}

/// The pseudo-organisation code of the region's record locator in [`FaultControl`] and the admin
/// API: `set_fault(LOCATOR, ..)`, `stats(LOCATOR)`, `PUT /admin/organisations/LOCATOR/fault`.
pub const LOCATOR: &str = "LOCATOR";

#[derive(Debug)]
struct Controls {
    seed: u64,
    /// Organisations first (region order), then the locator if there is one.
    orgs: Vec<OrgControl>,
    /// How many of `orgs` are organisations (the rest is the locator).
    organisations: usize,
    by_code: HashMap<String, usize>,
}

/// Handle to the region's latency and fault settings and request counters. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FaultControl {
    inner: Arc<Controls>,
}

fn lock(m: &Mutex<Settings>) -> MutexGuard<'_, Settings> {
    // Settings are plain values, so a panic elsewhere cannot leave them half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FaultControl {
    /// `orgs`: `(code, startup latency, startup fault)` in organisation order.
    #[cfg(test)]
    pub(crate) fn new(seed: u64, orgs: Vec<(String, LatencyProfile, Fault)>) -> FaultControl {
        Self::build(seed, orgs, None)
    }

    /// As [`FaultControl::new`], plus the region's record locator under the code [`LOCATOR`];
    /// its index is `orgs.len()`.
    pub(crate) fn with_locator(
        seed: u64,
        orgs: Vec<(String, LatencyProfile, Fault)>,
        locator: (LatencyProfile, Fault),
    ) -> FaultControl {
        Self::build(seed, orgs, Some(locator))
    }

    fn build(
        seed: u64,
        mut orgs: Vec<(String, LatencyProfile, Fault)>,
        locator: Option<(LatencyProfile, Fault)>,
    ) -> FaultControl {
        let organisations = orgs.len();
        if let Some((latency, fault)) = locator {
            orgs.push((LOCATOR.to_string(), latency, fault));
        }
        let by_code = orgs
            .iter()
            .enumerate()
            .map(|(i, (c, _, _))| (c.to_ascii_uppercase(), i))
            .collect();
        let orgs = orgs
            .into_iter()
            .map(|(code, latency, fault)| OrgControl {
                code,
                startup_latency: latency,
                settings: Mutex::new(Settings {
                    latency,
                    fault,
                    data: DataMode::Normal,
                }),
                counters: Counters::default(),
            })
            .collect();
        FaultControl {
            inner: Arc::new(Controls {
                seed,
                orgs,
                organisations,
                by_code,
            }),
        }
    }

    fn org(&self, code: &str) -> Result<&OrgControl, UnknownOrganisation> {
        self.inner
            .by_code
            .get(&code.to_ascii_uppercase())
            .map(|&i| &self.inner.orgs[i])
            .ok_or_else(|| UnknownOrganisation(code.to_string()))
    }

    /// Organisation codes, in region order (not [`LOCATOR`]).
    pub fn codes(&self) -> Vec<String> {
        self.organisations()
            .iter()
            .map(|o| o.code.clone())
            .collect()
    }

    fn organisations(&self) -> &[OrgControl] {
        &self.inner.orgs[..self.inner.organisations]
    }

    /// The locator's index for [`FaultControl::begin`], if the region has one.
    pub(crate) fn locator_index(&self) -> Option<usize> {
        (self.inner.orgs.len() > self.inner.organisations).then_some(self.inner.organisations)
    }

    pub fn set_fault(&self, code: &str, fault: Fault) -> Result<(), UnknownOrganisation> {
        lock(&self.org(code)?.settings).fault = fault;
        Ok(())
    }

    pub fn set_latency(
        &self,
        code: &str,
        latency: LatencyProfile,
    ) -> Result<(), UnknownOrganisation> {
        lock(&self.org(code)?.settings).latency = latency;
        Ok(())
    }

    /// Sets every organisation's fault; the locator (if any) keeps its own — set it with
    /// `set_fault(LOCATOR, ..)`.
    pub fn set_fault_all(&self, fault: Fault) {
        for o in self.organisations() {
            lock(&o.settings).fault = fault;
        }
    }

    /// Sets every organisation's latency; the locator (if any) keeps its own.
    pub fn set_latency_all(&self, latency: LatencyProfile) {
        for o in self.organisations() {
            lock(&o.settings).latency = latency;
        }
    }

    /// Sets one organisation's data mode.
    pub fn set_data_mode(&self, code: &str, data: DataMode) -> Result<(), UnknownOrganisation> {
        lock(&self.org(code)?.settings).data = data;
        Ok(())
    }

    /// Sets every organisation's data mode.
    pub fn set_data_mode_all(&self, data: DataMode) {
        for o in self.organisations() {
            lock(&o.settings).data = data;
        }
    }

    pub fn data_mode(&self, code: &str) -> Option<DataMode> {
        self.org(code).ok().map(|o| lock(&o.settings).data)
    }

    pub fn fault(&self, code: &str) -> Option<Fault> {
        self.org(code).ok().map(|o| lock(&o.settings).fault)
    }

    pub fn latency(&self, code: &str) -> Option<LatencyProfile> {
        self.org(code).ok().map(|o| lock(&o.settings).latency)
    }

    /// Clears every fault and data mode, the locator's included; latency is left as it is.
    pub fn clear_faults(&self) {
        for o in &self.inner.orgs {
            let mut s = lock(&o.settings);
            s.fault = Fault::None;
            s.data = DataMode::Normal;
        }
    }

    /// Clears every fault and data mode and returns latency to what the region was started
    /// with (the locator's included).
    pub fn reset(&self) {
        for o in &self.inner.orgs {
            *lock(&o.settings) = Settings {
                latency: o.startup_latency,
                fault: Fault::None,
                data: DataMode::Normal,
            };
        }
    }

    pub fn stats(&self, code: &str) -> Option<OrgStats> {
        let c = &self.org(code).ok()?.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Some(OrgStats {
            requests: get(&c.requests),
            metadata: get(&c.metadata),
            patient_searches: get(&c.patient_searches),
            resource_searches: get(&c.resource_searches),
            everything: get(&c.everything),
            batches: get(&c.batches),
            reads: get(&c.reads),
            other: get(&c.other),
            faulted: get(&c.faulted),
            searches_by_type: ResourceType::CLINICAL
                .iter()
                .zip(&c.by_type)
                .filter(|(_, n)| get(n) > 0)
                .map(|(t, n)| (t.as_str().to_string(), get(n)))
                .collect(),
        })
    }

    /// Zeroes every counter, the locator's included (between test phases).
    pub fn reset_stats(&self) {
        for o in &self.inner.orgs {
            let c = &o.counters;
            for a in [
                &c.requests,
                &c.metadata,
                &c.patient_searches,
                &c.resource_searches,
                &c.everything,
                &c.batches,
                &c.reads,
                &c.other,
                &c.faulted,
            ]
            .into_iter()
            .chain(c.by_type.iter())
            {
                a.store(0, Ordering::Relaxed);
            }
        }
    }

    // ---- used by the organisation servers -------------------------------------------------

    /// Counts a request and returns `(request number, fault, latency, data mode)` for it.
    pub(crate) fn begin(
        &self,
        org: usize,
        kind: RequestKind,
    ) -> (u64, Fault, LatencyProfile, DataMode) {
        let Some(o) = self.inner.orgs.get(org) else {
            return (0, Fault::None, LatencyProfile::ZERO, DataMode::Normal);
        };
        let c = &o.counters;
        let n = c.requests.fetch_add(1, Ordering::Relaxed);
        let counter = match kind {
            RequestKind::Metadata => &c.metadata,
            RequestKind::PatientSearch => &c.patient_searches,
            RequestKind::ResourceSearch(rt) => {
                self.count_search(org, rt);
                &c.resource_searches
            }
            RequestKind::Everything => &c.everything,
            RequestKind::Batch => &c.batches,
            RequestKind::Read => &c.reads,
            RequestKind::Other => &c.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let s = *lock(&o.settings);
        (n, s.fault, s.latency, s.data)
    }

    /// Counts a clinical search by type (also called for each search inside a batch).
    pub(crate) fn count_search(&self, org: usize, rt: ResourceType) {
        if let Some(o) = self.inner.orgs.get(org)
            && let Some(i) = ResourceType::CLINICAL.iter().position(|t| *t == rt)
        {
            o.counters.by_type[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn count_fault(&self, org: usize) {
        if let Some(o) = self.inner.orgs.get(org) {
            o.counters.faulted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A reproducible uniform draw in `[0, 1)` for request `n` of organisation `org`.
    pub(crate) fn draw(&self, org: usize, n: u64, purpose: u64) -> f64 {
        Prng::keyed(&[self.inner.seed, 0xFA17, org as u64, n, purpose]).unit()
    }

    pub(crate) fn seed(&self) -> u64 {
        self.inner.seed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_display_round_trip() {
        for s in [
            "none",
            "error_rate:0.3",
            "http500",
            "hang",
            "malformed_json",
            "slow_body",
            "reset",
            "empty_bundle",
            "wrong_patient",
            "wrong_patient_refs",
            "ignore_include",
        ] {
            assert_eq!(s.parse::<Fault>().unwrap().to_string(), s);
        }
        for bad in ["error_rate:2", "error_rate:x", "explode", "error_rate"] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
    }

    #[test]
    fn data_modes_parse_display_and_are_cleared_by_reset() {
        for s in ["normal", "conflicts"] {
            assert_eq!(s.parse::<DataMode>().unwrap().to_string(), s);
        }
        assert!("chaos".parse::<DataMode>().is_err());
        let c = FaultControl::new(1, vec![("A1".into(), LatencyProfile::ZERO, Fault::None)]);
        assert_eq!(c.data_mode("A1"), Some(DataMode::Normal));
        c.set_data_mode("a1", DataMode::Conflicts).unwrap();
        assert_eq!(c.begin(0, RequestKind::Other).3, DataMode::Conflicts);
        c.reset();
        assert_eq!(c.data_mode("A1"), Some(DataMode::Normal));
        c.set_data_mode_all(DataMode::Conflicts);
        c.clear_faults();
        assert_eq!(c.data_mode("A1"), Some(DataMode::Normal));
        assert!(c.set_data_mode("ZZ", DataMode::Conflicts).is_err());
    }

    #[test]
    fn reset_restores_startup_latency_and_clears_faults() {
        let c = FaultControl::new(
            1,
            vec![("A1".into(), LatencyProfile::Fixed { ms: 7 }, Fault::Hang)],
        );
        assert_eq!(
            c.fault("a1"),
            Some(Fault::Hang),
            "codes are case-insensitive"
        );
        c.set_latency("A1", LatencyProfile::ZERO).unwrap();
        c.clear_faults();
        assert_eq!(c.fault("A1"), Some(Fault::None));
        assert_eq!(c.latency("A1"), Some(LatencyProfile::ZERO));
        c.set_fault("A1", Fault::Reset).unwrap();
        c.reset();
        assert_eq!(c.fault("A1"), Some(Fault::None));
        assert_eq!(c.latency("A1"), Some(LatencyProfile::Fixed { ms: 7 }));
        assert_eq!(
            c.set_fault("ZZ", Fault::Hang),
            Err(UnknownOrganisation("ZZ".into()))
        );
    }

    #[test]
    fn counters_count_by_kind_and_reset() {
        let c = FaultControl::new(1, vec![("A1".into(), LatencyProfile::ZERO, Fault::None)]);
        c.begin(0, RequestKind::PatientSearch);
        c.begin(0, RequestKind::ResourceSearch(ResourceType::Condition));
        c.begin(0, RequestKind::ResourceSearch(ResourceType::Condition));
        c.count_fault(0);
        let s = c.stats("A1").unwrap();
        assert_eq!(
            (
                s.requests,
                s.patient_searches,
                s.resource_searches,
                s.faulted
            ),
            (3, 1, 2, 1)
        );
        assert_eq!(s.searches_by_type.get("Condition"), Some(&2));
        c.reset_stats();
        assert_eq!(c.stats("A1").unwrap(), OrgStats::default());
        assert_eq!(
            c.begin(9, RequestKind::Other).1,
            Fault::None,
            "unknown index is harmless"
        );
    }
}
