//! The broker's one configuration file (TOML), parsed strictly: an unknown key or a bad value is
//! an error naming the line at fault, because a typo in a timeout must not silently become a
//! default in production.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use carerecord_adapters::federation::BrokerSourceConfig;
use carerecord_adapters::fhir::FhirConfig;
use carerecord_adapters::grpc::GrpcSourceConfig;
use serde::Deserialize;

use crate::access::AccessConfig;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where and how the gRPC server listens.
    pub server: ServerConfig,
    /// Time limits for a lookup.
    #[serde(default)]
    pub budget: BudgetConfig,
    /// The merged-record cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Breakers, bulkheads, shedding and draining.
    #[serde(default)]
    pub resilience: ResilienceConfig,
    /// The ops listener: probes and Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// OpenTelemetry trace export.
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// Which sources to ask per patient (large regions).
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Organisations defined in bulk.
    pub directory: Option<DirectoryConfig>,
    /// Who may look and what they may see.
    #[serde(default)]
    pub access: AccessConfig,
    /// The audit trail.
    #[serde(default)]
    pub audit: AuditConfig,
    /// The FHIR R4 face (HTTP/JSON), on its own listener; absent means none.
    pub fhir: Option<FhirFaceConfig>,
    /// The clinician's web view, on its own listener; absent means none.
    pub view: Option<ViewConfig>,
    /// The organisations asked for every lookup, in priority order (the first source that knows
    /// the patient supplies the demographics shown).
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
}

/// `[resilience]`: how the broker stays up when sources and callers misbehave.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResilienceConfig {
    /// Consecutive failures (errors or timeouts) that open a source's circuit; 0 disables.
    pub breaker_failures: u32,
    /// How long an open circuit stays open before one probe is let through.
    pub breaker_open_ms: u64,
    /// Calls in flight to one source before further lookups are told it is UNAVAILABLE
    /// (a bulkhead; sources may override with `max_in_flight`).
    pub source_max_in_flight: usize,
    /// Lookups in flight before new ones are shed with RESOURCE_EXHAUSTED.
    pub max_lookups_in_flight: usize,
    /// The retry hint sent with a shed lookup (`grpc-retry-pushback-ms`).
    pub shed_retry_after_ms: u64,
    /// On SIGTERM: how long in-flight lookups may take to finish before the broker exits.
    pub drain_ms: u64,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        ResilienceConfig {
            breaker_failures: 5,
            breaker_open_ms: 10_000,
            source_max_in_flight: crate::fanout::DEFAULT_MAX_IN_FLIGHT,
            max_lookups_in_flight: crate::lookup::DEFAULT_MAX_LOOKUPS_IN_FLIGHT,
            shed_retry_after_ms: 1_000,
            drain_ms: 10_000,
        }
    }
}

/// `[routing]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// `all` (ask every source; right for a small region) or `located` (ask `always_ask` plus
    /// the organisations the locators name).
    pub mode: RoutingMode,
    /// Organisation codes asked for every patient in `located` mode (the area's acute trusts,
    /// the ambulance service).
    pub always_ask: Vec<String>,
    /// Time allowed to the locators, within the lookup's budget.
    pub locator_timeout_ms: Option<u64>,
    /// How long a locator's answer is reused for the same patient.
    pub locator_cache_secs: Option<u64>,
    /// The record locators.
    pub locators: Vec<carerecord_adapters::fhir::FhirLocatorConfig>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingMode {
    #[default]
    All,
    Located,
}

/// `[directory]`: organisations in bulk, from a CSV file with the header
/// `organisation_code,organisation_name,kind,base_url` (an empty `base_url` uses the template).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryConfig {
    /// The CSV file (relative paths are relative to the config file).
    pub file: PathBuf,
    /// Base URL for rows without one; `{code}` is replaced by the organisation code.
    pub endpoint_template: Option<String>,
    /// Per-source timeout for directory organisations.
    pub timeout_ms: Option<u64>,
    /// FHIR query mode for directory organisations.
    #[serde(default)]
    pub mode: carerecord_adapters::fhir::QueryMode,
    /// PEM CA certificate trusted for every directory organisation.
    pub ca_cert: Option<PathBuf>,
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where the ops listener serves `GET /livez`, `/readyz` and `/metrics` (Prometheus); unset
    /// means no probes and no metrics.
    pub listen: Option<SocketAddr>,
}

/// `[audit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The append-only, hash-chained JSON Lines file. `{instance}` in it is replaced by the
    /// instance name, so one configuration gives every broker its own trail.
    pub file: PathBuf,
    /// `fsync` every event: durable across power loss, at some cost per lookup.
    pub fsync: bool,
    /// This broker instance's name, written into every line of its trail: one chain per
    /// instance when trails are gathered (`carerecord audit ship`). Default: the host name (the
    /// pod name in Kubernetes). Letters, digits, `.`, `_` and `-`.
    pub instance: Option<String>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            file: PathBuf::from("carerecord-audit.jsonl"),
            fsync: false,
            instance: None,
        }
    }
}

/// `[server.tls]`: TLS, and with `client_ca` mutual TLS identifying each calling system.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain the broker presents.
    pub cert: PathBuf,
    /// PEM private key for `cert`.
    pub key: PathBuf,
    /// PEM CA whose client certificates are accepted; setting it makes client certificates
    /// required, and each calling system must then be listed in `systems`.
    pub client_ca: Option<PathBuf>,
    /// The EHR systems allowed to call, identified by a DNS name in their certificate.
    #[serde(default)]
    pub systems: Vec<SystemConfig>,
}

/// `[[server.tls.systems]]`: one calling EHR system.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemConfig {
    /// Name recorded in the audit trail.
    pub id: String,
    /// A DNS name its client certificate must be valid for.
    pub dns_name: String,
    /// Whether this system is trusted to assert legitimate relationships.
    #[serde(default)]
    pub trusted_assertions: bool,
    /// PEM public key (P-256 for ES256, or Ed25519 for EdDSA) that verifies the requester tokens
    /// this system signs for the FHIR face. A system without one cannot use the FHIR face.
    pub token_key: Option<PathBuf>,
}

/// `[fhir]`: the FHIR R4 face. It listens on its own address with the same TLS and calling
/// systems as `[server]` (plaintext when `[server] plaintext = true`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FhirFaceConfig {
    /// HTTP listen address, e.g. `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// The face's base URL as callers reach it (behind a proxy, the proxy's), ending in `/`;
    /// default `https://{listen}/` (`http://` when plaintext). Used in the Bundle's fullUrls.
    pub base_url: Option<String>,
    /// The `aud` a requester token must carry; default the base URL without its trailing `/`.
    pub audience: Option<String>,
    /// Longest token lifetime accepted (`exp - iat`), in seconds.
    #[serde(default = "default_token_lifetime")]
    pub max_token_lifetime_secs: u64,
    /// Without client certificates (plaintext, or TLS without `client_ca`) every caller is
    /// `unverified`: this PEM public key verifies their tokens. Development only.
    pub unverified_token_key: Option<PathBuf>,
    /// Largest document streamed through the broker, in bytes.
    #[serde(default = "default_max_document_bytes")]
    pub max_document_bytes: u64,
}

/// `[view]`: the clinician's web view, launched from the EHR. It listens on its own address
/// with the same server certificate and calling systems as `[server]`; client certificates are
/// asked for but optional there, because the clinician's browser has none: only `POST /launch`
/// (the EHR, system to system) needs one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewConfig {
    /// HTTP listen address, e.g. `127.0.0.1:8443`.
    pub listen: SocketAddr,
    /// The view's base URL as browsers reach it (behind a proxy, the proxy's), ending in `/`;
    /// default `https://{listen}/` (`http://` when plaintext). Launch URLs start with it.
    pub base_url: Option<String>,
    /// The `aud` a launch's requester token must carry; default the base URL without its `/`.
    pub audience: Option<String>,
    /// Origins of the EHRs that may show the view in a frame (`frame-ancestors`), e.g.
    /// `https://ehr.example.nhs.uk`; empty: the view may not be framed at all.
    #[serde(default)]
    pub ehr_origins: Vec<String>,
    /// How long a launch URL may wait to be opened, in seconds (it works once).
    #[serde(default = "default_launch_ttl")]
    pub launch_ttl_secs: u64,
    /// How long a view session lasts after its launch, in seconds.
    #[serde(default = "default_session_ttl")]
    pub session_ttl_secs: u64,
    /// Longest requester-token lifetime accepted (`exp - iat`), in seconds.
    #[serde(default = "default_token_lifetime")]
    pub max_token_lifetime_secs: u64,
    /// Without client certificates every launching system is `unverified`: this PEM public key
    /// verifies its tokens. Development only.
    pub unverified_token_key: Option<PathBuf>,
    /// Largest document streamed through the view, in bytes.
    #[serde(default = "default_max_document_bytes")]
    pub max_document_bytes: u64,
}

fn default_launch_ttl() -> u64 {
    60
}

fn default_session_ttl() -> u64 {
    15 * 60
}

fn default_token_lifetime() -> u64 {
    300
}

fn default_max_document_bytes() -> u64 {
    20 * 1024 * 1024
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address, e.g. `127.0.0.1:50051`.
    pub listen: SocketAddr,
    /// Serve gRPC without TLS. Only for local development; the broker warns loudly at start,
    /// and refuses it on a non-loopback address unless `allow_plaintext_on_network` is set.
    #[serde(default)]
    pub plaintext: bool,
    /// Allow `plaintext = true` on a non-loopback `listen` address (patient data would cross the
    /// network unencrypted). Off by default; only for an isolated test network.
    #[serde(default)]
    pub allow_plaintext_on_network: bool,
    /// This broker's identifier in federation chains (loop detection).
    #[serde(default = "default_broker_id")]
    pub broker_id: String,
    /// TLS; required unless `plaintext = true`.
    pub tls: Option<TlsConfig>,
}

fn default_broker_id() -> String {
    "carerecord".to_owned()
}

/// `[budget]`: how long a lookup may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Upper bound on a lookup whatever deadline the caller sets (or when it sets none).
    pub max_lookup_ms: u64,
    /// Time kept back from the caller's deadline to merge and send the answer.
    pub merge_headroom_ms: u64,
    /// Per-source timeout for sources that do not set `timeout_ms`.
    pub default_source_timeout_ms: u64,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            max_lookup_ms: 5_000,
            merge_headroom_ms: 20,
            default_source_timeout_ms: 3_000,
        }
    }
}

/// `[cache]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// How long a complete merged record is served from cache.
    pub ttl_secs: u64,
    /// How long a partial record (some source did not answer) is served: shorter, so the missing
    /// organisation is asked again soon.
    pub partial_ttl_secs: u64,
    /// Upper bound on the memory the cache holds, estimated as 4× the records' encoded size.
    pub max_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            ttl_secs: 60,
            partial_ttl_secs: 10,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

impl CacheConfig {
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs)
    }
    pub fn partial_ttl(&self) -> Duration {
        Duration::from_secs(self.partial_ttl_secs)
    }
}

/// One `[[sources]]` entry; its kind (`[sources.fhir]`, `[sources.broker]` or `[sources.grpc]`)
/// says how to reach it.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "SourceTable")]
pub struct SourceConfig {
    /// Unique id within this configuration (appears in responses, metrics and audit).
    pub id: String,
    /// ODS code of the organisation.
    pub organisation_code: String,
    /// Name of the organisation.
    pub organisation_name: String,
    /// Time budget for this source; defaults to `budget.default_source_timeout_ms`.
    pub timeout_ms: Option<u64>,
    /// Calls in flight to this source; defaults to `resilience.source_max_in_flight`.
    pub max_in_flight: Option<usize>,
    /// What the source is and how to reach it.
    pub kind: SourceKind,
}

/// The kinds of source the broker can ask.
#[derive(Debug, Clone)]
pub enum SourceKind {
    /// A FHIR R4 server (`[sources.fhir]`).
    Fhir(FhirConfig),
    /// Another carerecord broker, for federation (`[sources.broker]`).
    Broker(BrokerSourceConfig),
    /// A server speaking the source protocol, `carerecord.source.v1` (`[sources.grpc]`).
    Grpc(GrpcSourceConfig),
}

impl SourceKind {
    /// The table that configures it, as the TOML spells it.
    pub fn table(&self) -> &'static str {
        match self {
            SourceKind::Fhir(_) => "sources.fhir",
            SourceKind::Broker(_) => "sources.broker",
            SourceKind::Grpc(_) => "sources.grpc",
        }
    }
}

impl SourceConfig {
    /// The FHIR settings, when the source is a FHIR server.
    pub fn fhir_mut(&mut self) -> Option<&mut FhirConfig> {
        match &mut self.kind {
            SourceKind::Fhir(fhir) => Some(fhir),
            SourceKind::Broker(_) | SourceKind::Grpc(_) => None,
        }
    }
}

/// A `[[sources]]` table as written: one optional sub-table per kind, of which exactly one must
/// be present (the TOML layout predates [`SourceKind`] and stays as operators know it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceTable {
    id: String,
    organisation_code: String,
    organisation_name: String,
    timeout_ms: Option<u64>,
    max_in_flight: Option<usize>,
    fhir: Option<FhirConfig>,
    broker: Option<BrokerSourceConfig>,
    grpc: Option<GrpcSourceConfig>,
}

impl TryFrom<SourceTable> for SourceConfig {
    type Error = String;

    fn try_from(t: SourceTable) -> Result<Self, Self::Error> {
        let kind = match (t.fhir, t.broker, t.grpc) {
            (Some(fhir), None, None) => SourceKind::Fhir(fhir),
            (None, Some(broker), None) => SourceKind::Broker(broker),
            (None, None, Some(grpc)) => SourceKind::Grpc(grpc),
            _ => {
                return Err(format!(
                    "source {:?}: exactly one of [sources.fhir], [sources.broker] or [sources.grpc] must say how to reach it",
                    t.id
                ));
            }
        };
        Ok(SourceConfig {
            id: t.id,
            organisation_code: t.organisation_code,
            organisation_name: t.organisation_name,
            timeout_ms: t.timeout_ms,
            max_in_flight: t.max_in_flight,
            kind,
        })
    }
}

/// A configuration that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::read(path).map(|(config, _)| config)
    }

    /// As [`Config::load`], with the file's text (what `serve` compares a SIGHUP's edits with).
    pub fn read(path: &Path) -> Result<(Config, String), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text, path)?;
        // A relative directory file is relative to the config file, not the working directory.
        if let (Some(dir), Some(base)) = (config.directory.as_mut(), path.parent())
            && dir.file.is_relative()
        {
            dir.file = base.join(&dir.file);
        }
        Ok((config, text))
    }

    /// Parses and validates configuration text; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: describe_toml_error(text, &e),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        crate::audit_instance::resolve(&mut config.audit).map_err(|message| {
            ConfigError::Invalid {
                path: path.to_owned(),
                message,
            }
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.budget.max_lookup_ms == 0 {
            return Err("budget.max_lookup_ms must be greater than 0".into());
        }
        if self.budget.merge_headroom_ms >= self.budget.max_lookup_ms {
            return Err("budget.merge_headroom_ms must be less than budget.max_lookup_ms".into());
        }
        match (&self.server.tls, self.server.plaintext) {
            (None, false) => {
                return Err(
                    "server: set [server.tls] (cert, key, and client_ca for mutual TLS), or plaintext = true for local development".into(),
                );
            }
            (Some(_), true) => {
                return Err("server: plaintext = true and [server.tls] cannot both be set".into());
            }
            (None, true)
                if !self.server.listen.ip().is_loopback()
                    && !self.server.allow_plaintext_on_network =>
            {
                return Err(format!(
                    "server: plaintext = true on {}, a non-loopback address, would send patient data across the network unencrypted: configure [server.tls], listen on a loopback address (127.0.0.1) for local development, or set allow_plaintext_on_network = true for an isolated test network",
                    self.server.listen
                ));
            }
            (Some(tls), false) if tls.client_ca.is_some() && tls.systems.is_empty() => {
                return Err(
                    "server.tls: client_ca is set but no [[server.tls.systems]] may call".into(),
                );
            }
            _ => {}
        }
        if let Some(fhir) = &self.fhir
            && self.server.plaintext
            && !fhir.listen.ip().is_loopback()
            && !self.server.allow_plaintext_on_network
        {
            return Err(format!(
                "fhir: the FHIR face would serve plaintext on {}, a non-loopback address (bearer tokens and records unencrypted): configure [server.tls], listen on a loopback address, or set server.allow_plaintext_on_network = true for an isolated test network",
                fhir.listen
            ));
        }
        if self
            .fhir
            .as_ref()
            .is_some_and(|f| f.max_token_lifetime_secs == 0 || f.max_document_bytes == 0)
        {
            return Err(
                "fhir: max_token_lifetime_secs and max_document_bytes must be greater than 0"
                    .into(),
            );
        }
        if let Some(view) = &self.view {
            if self.server.plaintext
                && !view.listen.ip().is_loopback()
                && !self.server.allow_plaintext_on_network
            {
                return Err(format!(
                    "view: the web view would serve plaintext on {}, a non-loopback address (records unencrypted): configure [server.tls], listen on a loopback address, or set server.allow_plaintext_on_network = true for an isolated test network",
                    view.listen
                ));
            }
            if view.launch_ttl_secs == 0
                || view.session_ttl_secs == 0
                || view.max_token_lifetime_secs == 0
                || view.max_document_bytes == 0
            {
                return Err("view: launch_ttl_secs, session_ttl_secs, max_token_lifetime_secs and max_document_bytes must be greater than 0".into());
            }
            if let Some(bad) = view.ehr_origins.iter().find(|o| !crate::view::is_origin(o)) {
                return Err(format!(
                    "view: ehr_origins entry {bad:?} is not an origin (scheme://host[:port], no path)"
                ));
            }
        }
        if self.routing.mode == RoutingMode::Located
            && self.routing.locators.is_empty()
            && self.routing.always_ask.is_empty()
        {
            return Err(
                "routing: mode = \"located\" needs [[routing.locators]] or always_ask".into(),
            );
        }
        if self.resilience.max_lookups_in_flight == 0 || self.resilience.source_max_in_flight == 0 {
            return Err("resilience: in-flight limits must be greater than 0".into());
        }
        if self.server.broker_id.trim().is_empty() {
            return Err("server.broker_id must not be empty".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            let at = format!("sources[{i}] (id {:?})", s.id);
            if s.id.trim().is_empty() {
                return Err(format!("sources[{i}]: id must not be empty"));
            }
            if !seen.insert(s.id.as_str()) {
                return Err(format!("{at}: duplicate source id"));
            }
            if s.organisation_code.trim().is_empty() {
                return Err(format!("{at}: organisation_code must not be empty"));
            }
            if s.timeout_ms == Some(0) {
                return Err(format!("{at}: timeout_ms must be greater than 0"));
            }
        }
        Ok(())
    }

    /// The timeout for one source.
    pub fn source_timeout(&self, source: &SourceConfig) -> Duration {
        Duration::from_millis(
            source
                .timeout_ms
                .unwrap_or(self.budget.default_source_timeout_ms),
        )
    }
}

/// Renders a TOML error with its line number and the offending line, so ops can find it.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message();
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let source_line = text.lines().nth(line - 1).unwrap_or("").trim();
            format!("line {line}: {message}\n  | {source_line}")
        }
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:50051"
plaintext = true

[[sources]]
id = "gp"
organisation_code = "A81001"
organisation_name = "Riverside GP"
timeout_ms = 1500
[sources.fhir]
base_url = "http://127.0.0.1:8080/fhir"
"#;

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = Config::parse(MINIMAL, Path::new("t.toml")).expect("valid");
        assert_eq!(c.sources.len(), 1);
        assert_eq!(c.cache.ttl_secs, 60);
        assert_eq!(c.budget.max_lookup_ms, 5_000);
        assert_eq!(c.source_timeout(&c.sources[0]), Duration::from_millis(1500));
    }

    #[test]
    fn unknown_key_is_reported_with_its_line() {
        let text = MINIMAL.replace("timeout_ms = 1500", "timeout_msec = 1500");
        let err = Config::parse(&text, Path::new("t.toml")).expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains("line 10"), "{msg}");
        assert!(msg.contains("timeout_msec"), "{msg}");
    }

    #[test]
    fn wrong_type_is_reported_with_its_line() {
        let text = MINIMAL.replace("timeout_ms = 1500", "timeout_ms = \"fast\"");
        let msg = Config::parse(&text, Path::new("t.toml"))
            .expect_err("bad type")
            .to_string();
        assert!(msg.contains("line 10"), "{msg}");
    }

    #[test]
    fn duplicate_source_ids_are_refused() {
        let text = format!(
            "{MINIMAL}\n{}",
            &MINIMAL[MINIMAL.find("[[sources]]").unwrap_or(0)..]
        );
        let msg = Config::parse(&text, Path::new("t.toml"))
            .expect_err("duplicate")
            .to_string();
        assert!(msg.contains("duplicate source id"), "{msg}");
    }

    #[test]
    fn plaintext_on_the_network_needs_its_own_setting() {
        let open = MINIMAL.replace("127.0.0.1:50051", "0.0.0.0:50051");
        let msg = Config::parse(&open, Path::new("t.toml"))
            .expect_err("plaintext on every interface")
            .to_string();
        assert!(
            msg.contains("non-loopback") && msg.contains("allow_plaintext_on_network"),
            "{msg}"
        );
        let allowed = open.replace(
            "plaintext = true",
            "plaintext = true\nallow_plaintext_on_network = true",
        );
        Config::parse(&allowed, Path::new("t.toml")).expect("explicitly allowed");
        let v6 = MINIMAL.replace("127.0.0.1:50051", "[::1]:50051");
        Config::parse(&v6, Path::new("t.toml")).expect("loopback");
        // The FHIR face is held to the same rule.
        let face = format!("{MINIMAL}\n[fhir]\nlisten = \"0.0.0.0:8080\"\n");
        let msg = Config::parse(&face, Path::new("t.toml"))
            .expect_err("a plaintext FHIR face on every interface")
            .to_string();
        assert!(
            msg.contains("FHIR face") && msg.contains("non-loopback"),
            "{msg}"
        );
        let local = format!("{MINIMAL}\n[fhir]\nlisten = \"127.0.0.1:8080\"\n");
        Config::parse(&local, Path::new("t.toml")).expect("a loopback FHIR face");
    }

    #[test]
    fn source_kinds_parse_into_one_enum() {
        let c = Config::parse(MINIMAL, Path::new("t.toml")).expect("valid");
        assert!(matches!(c.sources[0].kind, SourceKind::Fhir(_)));
        let text = MINIMAL.replace(
            "[sources.fhir]\nbase_url = \"http://127.0.0.1:8080/fhir\"",
            "[sources.broker]\nurl = \"http://127.0.0.1:50052\"",
        );
        let c = Config::parse(&text, Path::new("t.toml")).expect("valid");
        assert!(matches!(c.sources[0].kind, SourceKind::Broker(_)));
        let both = format!("{MINIMAL}[sources.broker]\nurl = \"http://127.0.0.1:50052\"\n");
        let msg = Config::parse(&both, Path::new("t.toml"))
            .expect_err("two kinds")
            .to_string();
        assert!(
            msg.contains("exactly one of") && msg.contains("line 6"),
            "{msg}"
        );
    }

    #[test]
    fn a_source_protocol_server_is_a_kind_of_its_own() {
        let text = MINIMAL.replace(
            "[sources.fhir]\nbase_url = \"http://127.0.0.1:8080/fhir\"",
            "[sources.grpc]\nurl = \"http://127.0.0.1:50061\"\nanswers_depend_on_requester = true",
        );
        let c = Config::parse(&text, Path::new("t.toml")).expect("valid");
        let SourceKind::Grpc(grpc) = &c.sources[0].kind else {
            panic!("a grpc source: {:?}", c.sources[0].kind);
        };
        assert_eq!(grpc.url, "http://127.0.0.1:50061");
        assert!(grpc.answers_depend_on_requester);
        assert_eq!(c.sources[0].kind.table(), "sources.grpc");
        let typo = text.replace(
            "answers_depend_on_requester",
            "answers_depends_on_requester",
        );
        let msg = Config::parse(&typo, Path::new("t.toml"))
            .expect_err("unknown key")
            .to_string();
        assert!(msg.contains("answers_depends_on_requester"), "{msg}");
    }

    #[test]
    fn a_source_needs_exactly_one_kind() {
        let text = &MINIMAL[..MINIMAL.find("[sources.fhir]").unwrap_or(MINIMAL.len())];
        let msg = Config::parse(text, Path::new("t.toml"))
            .expect_err("no kind")
            .to_string();
        assert!(msg.contains("exactly one of"), "{msg}");
    }
}
