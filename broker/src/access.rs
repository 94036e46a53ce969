//! Who may look, and what they may see: role-based access, the legitimate relationship,
//! emergency ("break-glass") access, patients' objections, and sensitive data.
//!
//! Decisions run on every request, hit or miss. Admission (role, purpose) is decided before any
//! source is asked; the relationship needs the record (which organisations hold data for the
//! patient), so it is decided after the cache and before anything is disclosed. Filtering is
//! per request, after the cache: a record cached for one requester never reaches another
//! unfiltered.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use carerecord_adapters::NhsNumber;
use carerecord_proto::{CareRecord, Entry, Purpose, Section, SourceOutcome};
use serde::Deserialize;

use crate::merge::MergedRecord;
use crate::validate::LookupRequest;

/// `[access]`: the policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Role codes that may view records at all.
    pub roles: Vec<String>,
    /// Role codes that may see sensitive entries (the RCGP sensitive set, safeguarding, entries
    /// labelled restricted) and restricted patients' address.
    pub sensitive_roles: Vec<String>,
    /// Role codes that may use emergency access.
    pub emergency_roles: Vec<String>,
    /// Extra SNOMED CT codes to treat as sensitive, beyond the built-in examples.
    pub sensitive_codes: Vec<String>,
    /// A file of NHS numbers (one per line, `#` comments) of patients who objected to sharing:
    /// only their own organisation's data is shown to a requester, except in an emergency.
    pub objections_file: Option<PathBuf>,
    /// Whether relationships asserted by callers without an identified system (plaintext
    /// development) are trusted.
    pub trust_unverified_assertions: bool,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            roles: ["R8000", "R8001", "R8003"].map(String::from).to_vec(),
            sensitive_roles: Vec::new(),
            emergency_roles: ["R8000", "R8001", "R8003"].map(String::from).to_vec(),
            sensitive_codes: Vec::new(),
            objections_file: None,
            trust_unverified_assertions: false,
        }
    }
}

/// Examples from the RCGP sensitive set (IVF, sexually transmitted infections, termination of
/// pregnancy, gender reassignment). Sites extend it with `sensitive_codes`.
const BUILT_IN_SENSITIVE_CODES: &[&str] = &[
    "52637005",  // In vitro fertilisation
    "105629000", // Chlamydial infection
    "15628003",  // Gonorrhoea
    "76272004",  // Syphilis
    "33839006",  // Genital herpes simplex
    "86406008",  // HIV infection
    "386639001", // Termination of pregnancy
    "714812005", // Induced termination of pregnancy
    "93461009",  // Gender dysphoria
];

/// Security label codes that mark an entry as not for general sharing: confidentiality R/V and
/// HL7 ActCode sensitivity codes (HIV, STD, sexual and domestic violence, safeguarding-like).
const SENSITIVE_LABELS: &[&str] = &[
    "R",
    "V",
    "HIV",
    "STD",
    "SDV",
    "SEX",
    "TBOO",
    "SOC",
    "SAFEGUARDING",
];

/// Who is calling, as established by the transport.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The calling system's configured id, or `unverified` without mutual TLS.
    pub system: String,
    /// Whether this system may assert relationships.
    pub trusted_assertions: bool,
}

/// Why access is refused. The text is shown to the caller and audited.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("role {0} may not view care records")]
    Role(String),
    #[error("role {0} may not use emergency access")]
    EmergencyRole(String),
    #[error(
        "no legitimate relationship between organisation {0} and this patient; use emergency access only if this is an emergency"
    )]
    NoRelationship(String),
    #[error("calling system not recognised")]
    UnknownSystem,
    #[error(
        "the legitimate relationship could not be confirmed: organisation {0}'s own record source did not answer; retry, or use emergency access if this is an emergency"
    )]
    RelationshipUnconfirmed(String),
}

impl Denial {
    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Denial::Role(_) => "role",
            Denial::EmergencyRole(_) => "emergency_role",
            Denial::NoRelationship(_) => "no_relationship",
            Denial::UnknownSystem => "unknown_system",
            Denial::RelationshipUnconfirmed(_) => "relationship_unconfirmed",
        }
    }
}

/// Why access was granted, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Basis {
    Emergency,
    Asserted(String),
    HoldsRecords,
    RegisteredGp,
}

impl std::fmt::Display for Basis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Basis::Emergency => f.write_str("emergency access"),
            Basis::Asserted(r) => write!(f, "relationship asserted by calling system: {r}"),
            Basis::HoldsRecords => {
                f.write_str("requesting organisation holds records for the patient")
            }
            Basis::RegisteredGp => {
                f.write_str("requesting organisation is the registered GP practice")
            }
        }
    }
}

/// What this requester sees of a record.
pub struct View {
    pub record: CareRecord,
    pub withheld: bool,
}

/// The policy, built once from config.
pub struct Policy {
    roles: HashSet<String>,
    sensitive_roles: HashSet<String>,
    emergency_roles: HashSet<String>,
    /// Bare codes, matching in any code system.
    sensitive_codes: HashSet<String>,
    /// `system|code` entries, by system: looked up without building the string per coding.
    sensitive_by_system: HashMap<String, HashSet<String>>,
    objections: HashSet<NhsNumber>,
    trust_unverified: bool,
}

/// The policy could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read objections file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("objections file {path}, line {line}: {why}")]
    BadLine {
        path: PathBuf,
        line: usize,
        why: String,
    },
}

impl Policy {
    pub fn new(config: &AccessConfig) -> Result<Policy, PolicyError> {
        let objections = match &config.objections_file {
            Some(path) => read_objections(path)?,
            None => HashSet::new(),
        };
        let set = |v: &[String]| v.iter().map(|s| s.trim().to_owned()).collect();
        let mut sensitive_codes = HashSet::new();
        let mut sensitive_by_system: HashMap<String, HashSet<String>> = HashMap::new();
        let configured = config.sensitive_codes.iter().map(|c| normalise_code(c));
        for code in BUILT_IN_SENSITIVE_CODES
            .iter()
            .map(|c| (*c).to_owned())
            .chain(configured)
        {
            match code.split_once('|') {
                Some((system, code)) => {
                    sensitive_by_system
                        .entry(system.to_owned())
                        .or_default()
                        .insert(code.to_owned());
                }
                None => {
                    sensitive_codes.insert(code);
                }
            }
        }
        Ok(Policy {
            roles: set(&config.roles),
            sensitive_roles: set(&config.sensitive_roles),
            emergency_roles: set(&config.emergency_roles),
            sensitive_codes,
            sensitive_by_system,
            objections,
            trust_unverified: config.trust_unverified_assertions,
        })
    }

    /// Whether the requester may ask at all: decided before any source is asked.
    pub fn admit(&self, request: &LookupRequest) -> Result<(), Denial> {
        let role = request.requester.role_code.trim();
        if !self.roles.contains(role) {
            return Err(Denial::Role(role.to_owned()));
        }
        if request.purpose == Purpose::EmergencyAccess && !self.emergency_roles.contains(role) {
            return Err(Denial::EmergencyRole(role.to_owned()));
        }
        Ok(())
    }

    /// The legitimate relationship, decided on the record before anything is disclosed.
    pub fn relationship(
        &self,
        request: &LookupRequest,
        caller: &Caller,
        merged: &MergedRecord,
    ) -> Result<Basis, Denial> {
        let org = request.requester.organisation_code.trim();
        if request.purpose == Purpose::EmergencyAccess {
            return Ok(Basis::Emergency);
        }
        if self.trusted_assertion(request, caller) {
            return Ok(Basis::Asserted(
                request.requester.asserted_relationship.trim().to_owned(),
            ));
        }
        if holds_records(org, merged) {
            return Ok(Basis::HoldsRecords);
        }
        if merged
            .record
            .patient
            .as_ref()
            .is_some_and(|p| p.registered_gp_code.eq_ignore_ascii_case(org))
        {
            return Ok(Basis::RegisteredGp);
        }
        let own_source_silent = merged.sources.iter().any(|s| {
            s.organisation_code.eq_ignore_ascii_case(org) && !crate::merge::answered(s.outcome)
        });
        // A locator that did not answer may be why the requester's own organisation was not
        // asked: that is "could not confirm", not "no relationship".
        let locator_silent = merged
            .locators
            .iter()
            .any(|l| l.outcome != SourceOutcome::Ok as i32);
        if own_source_silent || locator_silent {
            return Err(Denial::RelationshipUnconfirmed(org.to_owned()));
        }
        Err(Denial::NoRelationship(org.to_owned()))
    }

    /// Whether the request carries a relationship assertion this caller is trusted to make.
    pub fn trusted_assertion(&self, request: &LookupRequest, caller: &Caller) -> bool {
        !request.requester.asserted_relationship.trim().is_empty()
            && (caller.trusted_assertions || (caller.system == UNVERIFIED && self.trust_unverified))
    }

    /// Whether the relationship is already established by this one source answer (streaming
    /// uses it to release events before the whole record is in). Only the requester's own
    /// organisation answering OK counts: it implies the final decision ("holds records"), so a
    /// released stream is never denied at the end.
    pub fn relationship_from_answer(
        &self,
        request: &LookupRequest,
        status_org: &str,
        outcome: i32,
    ) -> bool {
        (outcome == SourceOutcome::Ok as i32 || outcome == SourceOutcome::Partial as i32)
            && status_org.eq_ignore_ascii_case(request.requester.organisation_code.trim())
    }

    /// Whether the patient objected to sharing and this request is not an emergency: only the
    /// requester's own organisation's data (and sources) may be shown.
    pub fn objection_applies(&self, request: &LookupRequest) -> bool {
        request.purpose != Purpose::EmergencyAccess && self.objections.contains(&request.nhs_number)
    }

    /// Whether this requester may see sensitive entries.
    pub fn sees_sensitive(&self, request: &LookupRequest) -> bool {
        self.sensitive_roles
            .contains(request.requester.role_code.trim())
    }

    /// Whether [`Policy::view`] would hold anything of `record` back from this requester: the
    /// same judgement, without copying the record.
    pub fn withholds(&self, request: &LookupRequest, record: &CareRecord) -> bool {
        !self.sees_sensitive(request) && self.holds_back_anything(record)
    }

    /// Whether `record` has anything a requester without a sensitive role may not see.
    pub fn holds_back_anything(&self, record: &CareRecord) -> bool {
        let restricted = record.patient.as_ref().is_some_and(|p| {
            p.restricted && (!p.address.is_empty() || !p.registered_gp_code.is_empty())
        });
        restricted
            || Section::ALL
                .into_iter()
                .any(|section| record.section(section).iter().any(|e| self.is_sensitive(e)))
    }

    /// What this requester may see of `record`: sensitive entries and a restricted patient's
    /// address withheld unless the role permits. (A patient's objection is applied by the
    /// broker, which rebuilds the record from the requester's own organisation's answers.)
    pub fn view(&self, request: &LookupRequest, record: &CareRecord) -> View {
        let mut out = record.clone();
        let mut withheld = false;
        let sees_sensitive = self.sees_sensitive(request);

        for section in Section::ALL {
            let Some(entries) = out.section_mut(section) else {
                continue;
            };
            let before = entries.len();
            if !sees_sensitive {
                entries.retain(|e| !self.is_sensitive(e));
            }
            withheld |= entries.len() != before;
        }
        if let Some(patient) = out.patient.as_mut()
            && patient.restricted
            && !sees_sensitive
        {
            withheld |= !patient.address.is_empty() || !patient.registered_gp_code.is_empty();
            patient.address.clear();
            patient.registered_gp_code.clear();
        }
        View {
            record: out,
            withheld,
        }
    }

    /// Whether an entry is sensitive: judged on its concept and on every coding the sources gave
    /// for it (never only the one chosen for display), and on every security label. A configured
    /// code written `system|code` matches only that code system; a bare code matches any system.
    pub fn is_sensitive(&self, entry: &Entry) -> bool {
        entry
            .concept
            .iter()
            .chain(&entry.codings)
            .any(|c| self.sensitive_coding(c))
            || entry.security_labels.iter().any(|l| {
                let code = l.code.trim();
                SENSITIVE_LABELS
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(code))
            })
    }

    fn sensitive_coding(&self, coding: &carerecord_proto::Coding) -> bool {
        let code = coding.code.trim();
        if code.is_empty() {
            return false;
        }
        let system = coding.system.trim().trim_end_matches('/');
        self.sensitive_codes.contains(code)
            || (!system.is_empty()
                && self
                    .sensitive_by_system
                    .get(system)
                    .is_some_and(|codes| codes.contains(code)))
    }
}

/// A configured sensitive code: `code`, or `system|code` (system without a trailing slash).
fn normalise_code(raw: &str) -> String {
    match raw.split_once('|') {
        Some((system, code)) => format!("{}|{}", system.trim().trim_end_matches('/'), code.trim()),
        None => raw.trim().to_owned(),
    }
}

/// The system name recorded when the broker runs without mutual TLS.
pub const UNVERIFIED: &str = "unverified";

/// The requester's organisation answered with data (in full, or cut short: PARTIAL still
/// means it holds records for the patient).
fn holds_records(org: &str, merged: &MergedRecord) -> bool {
    merged.sources.iter().any(|s| {
        (s.outcome == SourceOutcome::Ok as i32 || s.outcome == SourceOutcome::Partial as i32)
            && s.organisation_code.eq_ignore_ascii_case(org)
    })
}

fn read_objections(path: &Path) -> Result<HashSet<NhsNumber>, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut out = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let n = NhsNumber::parse(line).map_err(|e| PolicyError::BadLine {
            path: path.to_owned(),
            line: i + 1,
            why: e.to_string(),
        })?;
        out.insert(n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use carerecord_adapters::SectionSet;
    use carerecord_proto::{Coding, Requester};

    fn request(role: &str) -> LookupRequest {
        LookupRequest {
            request_id: "r".into(),
            nhs_number: NhsNumber::parse("9434765919").expect("valid"),
            sections: SectionSet::ALL,
            requester: Requester {
                role_code: role.into(),
                organisation_code: "RJ1".into(),
                ..Requester::default()
            },
            purpose: Purpose::DirectCare,
            require_fresh: false,
            via_brokers: Vec::new(),
            caller_timeout: None,
        }
    }

    fn coding(system: &str, code: &str) -> Coding {
        Coding {
            system: system.into(),
            code: code.into(),
            display: String::new(),
        }
    }

    const SNOMED: &str = "http://snomed.info/sct";

    #[test]
    fn sensitivity_is_judged_on_every_coding_and_every_label() {
        let policy = Policy::new(&AccessConfig {
            sensitive_codes: vec!["http://hl7.org/fhir/sid/icd-10|A56".into(), "123".into()],
            ..AccessConfig::default()
        })
        .expect("policy");
        let plain = |codings: Vec<Coding>, labels: Vec<Coding>| Entry {
            concept: Some(coding(SNOMED, "44054006")),
            codings,
            security_labels: labels,
            ..Entry::default()
        };
        // (entry, sensitive?)
        let cases = vec![
            (plain(vec![], vec![]), false),
            // The display coding is harmless; the second coding is chlamydia.
            (
                plain(
                    vec![coding(SNOMED, "44054006"), coding(SNOMED, "105629000")],
                    vec![],
                ),
                true,
            ),
            // A third coding in another system, configured system-aware.
            (
                plain(
                    vec![
                        coding(SNOMED, "44054006"),
                        coding("http://read.info/ctv3", "X"),
                        coding("http://hl7.org/fhir/sid/icd-10", "A56"),
                    ],
                    vec![],
                ),
                true,
            ),
            // The same code in another system is not that system-aware code.
            (
                plain(vec![coding("http://example.org/local", "A56")], vec![]),
                false,
            ),
            // A bare configured code matches whatever the system.
            (
                plain(vec![coding("http://example.org/local", "123")], vec![]),
                true,
            ),
            // Any security label, not only the first; case-insensitive.
            (
                plain(
                    vec![],
                    vec![
                        coding(
                            "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                            "N",
                        ),
                        coding("http://terminology.hl7.org/CodeSystem/v3-ActCode", "hiv"),
                    ],
                ),
                true,
            ),
        ];
        for (entry, want) in cases {
            assert_eq!(policy.is_sensitive(&entry), want, "{entry:?}");
        }
    }

    #[test]
    fn a_sensitive_second_coding_is_withheld_from_roles_without_access() {
        let policy = Policy::new(&AccessConfig {
            sensitive_roles: vec!["R0001".into()],
            roles: vec!["R8000".into(), "R0001".into()],
            ..AccessConfig::default()
        })
        .expect("policy");
        let record = CareRecord {
            conditions: vec![Entry {
                concept: Some(coding(SNOMED, "44054006")),
                codings: vec![coding(SNOMED, "44054006"), coding(SNOMED, "86406008")],
                ..Entry::default()
            }],
            ..CareRecord::default()
        };
        let view = policy.view(&request("R8000"), &record);
        assert!(view.record.conditions.is_empty());
        assert!(view.withheld);
        let view = policy.view(&request("R0001"), &record);
        assert_eq!(view.record.conditions.len(), 1);
        assert!(!view.withheld);
    }

    #[test]
    fn withholds_agrees_with_the_view_for_every_role_and_record() {
        let policy = Policy::new(&AccessConfig {
            sensitive_roles: vec!["R0001".into()],
            roles: vec!["R8000".into(), "R0001".into()],
            ..AccessConfig::default()
        })
        .expect("policy");
        let sensitive = Entry {
            concept: Some(coding(SNOMED, "44054006")),
            codings: vec![coding(SNOMED, "86406008")],
            ..Entry::default()
        };
        let plain = Entry {
            concept: Some(coding(SNOMED, "44054006")),
            ..Entry::default()
        };
        let patient = |restricted: bool, address: &str| carerecord_proto::Patient {
            restricted,
            address: address.into(),
            ..Default::default()
        };
        let records = [
            CareRecord::default(),
            CareRecord {
                conditions: vec![plain.clone()],
                ..CareRecord::default()
            },
            // Sensitive in a section other than the first.
            CareRecord {
                conditions: vec![plain.clone()],
                documents: vec![sensitive.clone()],
                ..CareRecord::default()
            },
            CareRecord {
                patient: Some(patient(true, "1 High Street")),
                ..CareRecord::default()
            },
            CareRecord {
                patient: Some(patient(true, "")),
                ..CareRecord::default()
            },
            CareRecord {
                patient: Some(patient(false, "1 High Street")),
                ..CareRecord::default()
            },
        ];
        let mut withheld_some = 0;
        for record in &records {
            for role in ["R8000", "R0001"] {
                let r = request(role);
                let view = policy.view(&r, record);
                assert_eq!(
                    policy.withholds(&r, record),
                    view.withheld,
                    "{role}: {record:?}"
                );
                withheld_some += usize::from(view.withheld);
            }
        }
        assert_eq!(
            withheld_some, 2,
            "the sensitive document and the restricted address"
        );
    }
}
