//! Configuration of a FHIR source, as the broker's TOML `[sources.fhir]` table spells it.
//!
//! Unknown keys are rejected so a typo (`max_concurent_requests`) fails at start-up instead of
//! silently running with a default. Secrets never live in the file: the bearer token is named by
//! the environment variable that holds it.

use std::path::PathBuf;

use serde::Deserialize;

/// How the adapter asks the source for a patient's record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueryMode {
    /// One search per resource type (`Condition?patient=..`), run concurrently. Works with any
    /// FHIR server that supports the `patient` search parameter.
    #[default]
    Search,
    /// `Patient/{id}/$everything`: one operation, fewest round trips, if the server offers it.
    Everything,
    /// One `batch` Bundle holding every search: one round trip for servers that support batch.
    Batch,
    /// One `batch` Bundle holding the Patient search by NHS number *and* every search chained
    /// on it (`Condition?patient.identifier=https://fhir.nhs.uk/Id/nhs-number|N`): the record in
    /// one round trip, where every other mode needs the Patient search first. Every resource
    /// is still checked against the Patients that search returned. A server that refuses the
    /// chained parameter is read as `batch` (two round trips) from then on.
    Chained,
}

/// Which FHIR resources count as the patient's medicines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MedicationKinds {
    /// `MedicationStatement` only (what the patient takes, as recorded).
    Statement,
    /// `MedicationRequest` only (prescriptions).
    Request,
    /// Both.
    #[default]
    Both,
}

impl MedicationKinds {
    pub(crate) fn statements(self) -> bool {
        matches!(self, MedicationKinds::Statement | MedicationKinds::Both)
    }
    pub(crate) fn requests(self) -> bool {
        matches!(self, MedicationKinds::Request | MedicationKinds::Both)
    }
}

/// A FHIR R4 source's settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FhirConfig {
    /// The FHIR base URL, `http` or `https`, e.g. `https://fhir.example.nhs.uk/R4`.
    pub base_url: String,
    /// How to ask for a record. Default `search`.
    #[serde(default)]
    pub mode: QueryMode,
    /// PEM file of the CA certificate(s) that issue the source's server certificate (private
    /// PKI). When set, only these roots are trusted; when absent, the Mozilla root set is.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// PEM certificate chain for mutual TLS; requires `client_key`.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key for mutual TLS; requires `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Name of the environment variable holding a bearer token, if the source wants one. The
    /// variable must be set (and non-empty) when the source is built.
    #[serde(default)]
    pub bearer_token_env: Option<String>,
    /// Most HTTP requests in flight to this source at once, across all lookups. Default 8.
    #[serde(default = "defaults::max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// Largest response body accepted, in bytes. Default 8 MiB.
    #[serde(default = "defaults::max_response_bytes")]
    pub max_response_bytes: usize,
    /// Most pages followed per search (`link` relation `next`). Default 20.
    #[serde(default = "defaults::page_limit")]
    pub page_limit: usize,
    /// Entries asked for per page (`_count`): large pages mean fewer round trips. Lower it for
    /// servers that refuse large pages. Default 100.
    #[serde(default = "defaults::page_size")]
    pub page_size: usize,
    /// Which resources are read as medicines. Default `both`.
    #[serde(default)]
    pub medications: MedicationKinds,
    /// Remember the server id of each patient found by NHS number, so the next lookup of the
    /// same patient reads the record by id in one round trip instead of searching first. The
    /// Patient at the remembered id is verified on every answer (it must still carry the NHS
    /// number and be active); an answer that fails the check is discarded, the entry evicted,
    /// and the lookup searches again. Only a Patient search that found exactly one Patient
    /// carrying the NHS number fills it. Not used while `chained` mode reads the source in one
    /// round trip anyway. Default `true`.
    #[serde(default = "defaults::patient_id_cache")]
    pub patient_id_cache: bool,
    /// Most NHS numbers remembered by `patient_id_cache` (least recently used go first).
    /// Default 10,000 (well under 1 MiB).
    #[serde(default = "defaults::patient_id_cache_capacity")]
    pub patient_id_cache_capacity: u64,
    /// Seconds an entry of `patient_id_cache` lives after it was written. Verification makes a
    /// stale entry cost one wasted round trip, not a wrong answer; the TTL bounds how long a
    /// patient no longer looked up stays in memory. Default 3,600 (one hour).
    #[serde(default = "defaults::patient_id_cache_ttl_secs")]
    pub patient_id_cache_ttl_secs: u64,
}

mod defaults {
    pub(super) fn max_concurrent_requests() -> usize {
        8
    }
    pub(super) fn max_response_bytes() -> usize {
        8 * 1024 * 1024
    }
    pub(super) fn page_limit() -> usize {
        20
    }
    pub(super) fn page_size() -> usize {
        100
    }
    pub(super) fn patient_id_cache() -> bool {
        true
    }
    pub(super) fn patient_id_cache_capacity() -> u64 {
        10_000
    }
    pub(super) fn patient_id_cache_ttl_secs() -> u64 {
        3_600
    }
}

impl FhirConfig {
    /// The settings for `base_url` with every default.
    pub fn new(base_url: impl Into<String>) -> Self {
        FhirConfig {
            base_url: base_url.into(),
            mode: QueryMode::default(),
            ca_cert: None,
            client_cert: None,
            client_key: None,
            bearer_token_env: None,
            max_concurrent_requests: defaults::max_concurrent_requests(),
            max_response_bytes: defaults::max_response_bytes(),
            page_limit: defaults::page_limit(),
            page_size: defaults::page_size(),
            medications: MedicationKinds::default(),
            patient_id_cache: defaults::patient_id_cache(),
            patient_id_cache_capacity: defaults::patient_id_cache_capacity(),
            patient_id_cache_ttl_secs: defaults::patient_id_cache_ttl_secs(),
        }
    }
}

/// Why a FHIR source could not be built from its configuration. Messages name the setting or
/// file at fault; they never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum FhirConfigError {
    #[error("base_url {url:?} is not a valid URL: {reason}")]
    InvalidBaseUrl { url: String, reason: String },
    #[error("base_url {url:?} must use http or https")]
    UnsupportedScheme { url: String },
    #[error("cannot read {what} from {}: {reason}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} file {} holds no usable certificate", path.display())]
    NoCertificates { what: &'static str, path: PathBuf },
    #[error("client_cert and client_key must be set together (mutual TLS needs both)")]
    IncompleteClientIdentity,
    #[error("client certificate {} and key {} cannot be used: {reason}", cert.display(), key.display())]
    ClientIdentity {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("bearer_token_env names {var}, which is not set")]
    TokenEnvMissing { var: String },
    #[error("bearer_token_env names {var}, which is empty or not usable in an HTTP header")]
    TokenEnvInvalid { var: String },
    #[error("the bearer token is empty or not usable in an HTTP header")]
    InvalidToken,
    #[error("{field} must be at least 1")]
    ZeroLimit { field: &'static str },
    #[error("HTTP client setup failed: {0}")]
    Client(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Sources {
        fhir: FhirConfig,
    }

    fn parse(toml_text: &str) -> Result<FhirConfig, String> {
        toml::from_str::<Sources>(toml_text)
            .map(|s| s.fhir)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn only_base_url_is_required_and_defaults_apply() {
        let config = parse("[fhir]\nbase_url = \"https://fhir.example/R4\"\n").expect("valid");
        assert_eq!(config, FhirConfig::new("https://fhir.example/R4"));
        assert_eq!(config.mode, QueryMode::Search);
        assert_eq!(config.max_concurrent_requests, 8);
        assert_eq!(config.max_response_bytes, 8 * 1024 * 1024);
        assert_eq!(config.page_limit, 20);
        assert_eq!(config.medications, MedicationKinds::Both);
        assert!(config.patient_id_cache);
        assert_eq!(config.patient_id_cache_capacity, 10_000);
        assert_eq!(config.patient_id_cache_ttl_secs, 3_600);
    }

    #[test]
    fn the_patient_id_cache_can_be_sized_or_switched_off() {
        let config = parse(
            "[fhir]\nbase_url = \"http://x\"\npatient_id_cache = false\npatient_id_cache_capacity = 5\npatient_id_cache_ttl_secs = 60\n",
        )
        .expect("valid");
        assert!(!config.patient_id_cache);
        assert_eq!(config.patient_id_cache_capacity, 5);
        assert_eq!(config.patient_id_cache_ttl_secs, 60);
    }

    #[test]
    fn modes_and_kinds_are_lower_case_words() {
        let config = parse(
            "[fhir]\nbase_url = \"http://x\"\nmode = \"batch\"\nmedications = \"statement\"\npage_limit = 3\n",
        )
        .expect("valid");
        assert_eq!(config.mode, QueryMode::Batch);
        assert_eq!(config.medications, MedicationKinds::Statement);
        assert_eq!(config.page_limit, 3);
        assert!(parse("[fhir]\nbase_url = \"http://x\"\nmode = \"Everything\"\n").is_err());
        let config = parse("[fhir]\nbase_url = \"http://x\"\nmode = \"chained\"\n").expect("valid");
        assert_eq!(config.mode, QueryMode::Chained);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = parse("[fhir]\nbase_url = \"http://x\"\nmax_concurent_requests = 4\n")
            .expect_err("typo must fail");
        assert!(err.contains("max_concurent_requests"), "{err}");
    }
}
