//! `carerecord conformance`: the adapter conformance kit run against a live endpoint — a
//! source-protocol server (`--grpc URL`) or a FHIR R4 server (`--fhir URL`) — with a report an
//! organisation onboarding its system can act on: what passed, what failed, why, and how to fix
//! it. A yes/no before go-live; the exit status says which.
//!
//! The endpoint is driven exactly as the broker will drive it (the same adapter), so a pass here
//! means the broker can use it. Point it at a test environment holding synthetic patients.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use carerecord_adapters::fhir::{FhirConfig, FhirSource};
use carerecord_adapters::grpc::{GrpcSource, GrpcSourceConfig};
use carerecord_adapters::testkit::{Check, Conformance, Level, Report, checks};
use carerecord_adapters::{NhsNumber, Source, SourceInfo};
use carerecord_proto::source::v1::PROTOCOL;
use clap::Args;

/// A valid NHS number (Modulus 11) no test environment should hold: the default "unknown".
const UNLIKELY_PATIENT: &str = "9999999999";

#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("endpoint").required(true).args(["grpc", "fhir"])))]
pub struct ConformanceArgs {
    /// A source-protocol (carerecord.source.v1) server, e.g. https://hospice.example:50061.
    #[arg(long)]
    pub grpc: Option<String>,
    /// A FHIR R4 server's base URL, e.g. https://fhir.example.nhs.uk/R4.
    #[arg(long)]
    pub fhir: Option<String>,
    /// NHS number of a (synthetic) patient the endpoint holds, with at least one entry.
    #[arg(long)]
    pub known: String,
    /// NHS number of a patient the endpoint does not hold.
    #[arg(long, default_value = UNLIKELY_PATIENT)]
    pub unknown: String,
    /// ODS code of the organisation, as the broker's configuration will give it; checked against
    /// what a source-protocol server's Describe says.
    #[arg(long)]
    pub organisation_code: Option<String>,
    /// PEM CA certificate to trust for the endpoint (private PKI).
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate to present (mutual TLS).
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key for --client-cert.
    #[arg(long, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// TLS server name to verify, when it differs from the URL's host (--grpc only).
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// Name of an environment variable holding a bearer token for the FHIR server.
    #[arg(long)]
    pub bearer_token_env: Option<String>,
    /// How long one lookup may take before it counts as hung, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub patience_ms: u64,
}

/// The outcome of a run against one endpoint.
#[derive(Debug)]
pub struct LiveReport {
    /// What was tested: "FHIR R4 server" or "source-protocol server".
    pub kind: &'static str,
    /// The endpoint's URL.
    pub endpoint: String,
    /// Checks of the endpoint itself, then the kit's checks of the source built on it.
    pub report: Report,
    fhir: bool,
}

impl LiveReport {
    /// Whether every must-check passed.
    pub fn passed(&self) -> bool {
        self.report.all_passed()
    }
}

/// Runs the checks, prints the report, and fails (non-zero exit) unless every must-check passed.
pub async fn run(args: ConformanceArgs) -> anyhow::Result<()> {
    let live = check(&args).await?;
    print!("{live}");
    if live.passed() {
        Ok(())
    } else {
        anyhow::bail!(
            "{} failed {} conformance check(s)",
            live.endpoint,
            live.report.failures().count()
        )
    }
}

/// Runs the checks against the endpoint `args` names. Errors only when the run cannot start
/// (bad arguments, unreadable certificate); everything the endpoint does is a check.
pub async fn check(args: &ConformanceArgs) -> anyhow::Result<LiveReport> {
    // reqwest (the FHIR adapter, the metadata probe) needs a process-wide rustls provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let known = NhsNumber::parse(&args.known).context("--known is not a valid NHS number")?;
    let unknown = NhsNumber::parse(&args.unknown).context("--unknown is not a valid NHS number")?;
    anyhow::ensure!(known != unknown, "--known and --unknown must differ");
    let info = SourceInfo {
        id: "under-test".into(),
        organisation_code: args
            .organisation_code
            .clone()
            .unwrap_or_else(|| "UNDER-TEST".into()),
        organisation_name: "Organisation under test".into(),
    };
    let patience = Duration::from_millis(args.patience_ms.max(1));
    let (kind, endpoint, first, source): (_, _, _, Box<dyn Source>) = match (&args.grpc, &args.fhir)
    {
        (Some(url), None) => {
            let mut config = GrpcSourceConfig::new(url.clone());
            config.ca_cert.clone_from(&args.ca_cert);
            config.client_cert.clone_from(&args.client_cert);
            config.client_key.clone_from(&args.client_key);
            config.tls_domain.clone_from(&args.tls_domain);
            let source = GrpcSource::new(info, &config)
                .with_context(|| format!("cannot set up a client for {url}"))?;
            let first = describe(&source, args.organisation_code.as_deref(), patience).await;
            (
                "source-protocol server",
                url.clone(),
                first,
                Box::new(source),
            )
        }
        (None, Some(url)) => {
            let mut config = FhirConfig::new(url.clone());
            config.ca_cert.clone_from(&args.ca_cert);
            config.client_cert.clone_from(&args.client_cert);
            config.client_key.clone_from(&args.client_key);
            config.bearer_token_env.clone_from(&args.bearer_token_env);
            let first = metadata(url, &config, patience).await;
            let source = FhirSource::new(info, &config)
                .with_context(|| format!("cannot set up a client for {url}"))?;
            ("FHIR R4 server", url.clone(), first, Box::new(source))
        }
        _ => anyhow::bail!("give exactly one of --grpc URL or --fhir URL"),
    };
    let mut report = Conformance::new(source.as_ref(), known, unknown)
        .with_patience(patience)
        .run()
        .await;
    report.checks.insert(0, first);
    Ok(LiveReport {
        kind,
        endpoint,
        report,
        fhir: args.fhir.is_some(),
    })
}

/// The check of the endpoint itself for the source protocol.
pub const DESCRIBES_ITSELF: &str = "the server describes itself (Describe)";
/// The check of the endpoint itself for FHIR.
pub const CAPABILITY_STATEMENT: &str = "the server is FHIR R4 (CapabilityStatement at /metadata)";

async fn describe(
    source: &GrpcSource,
    organisation_code: Option<&str>,
    patience: Duration,
) -> Check {
    let check = |level, passed, detail: String| Check {
        name: DESCRIBES_ITSELF,
        level,
        passed,
        detail,
    };
    match source.describe(patience).await {
        Err(e) => check(Level::Must, false, format!("Describe failed: {e}")),
        Ok(None) => check(
            Level::Should,
            false,
            "Describe is not implemented (optional; the broker assumes the defaults)".into(),
        ),
        Ok(Some(d)) if d.protocol != PROTOCOL => check(
            Level::Must,
            false,
            format!(
                "the server says it speaks {:?}, not {PROTOCOL:?}",
                d.protocol
            ),
        ),
        Ok(Some(d)) if d.answers_depend_on_requester => check(
            Level::Should,
            false,
            "the server's answers depend on who asks: configure the source with \
             answers_depend_on_requester = true (the broker then caches per requester)"
                .into(),
        ),
        Ok(Some(d))
            if organisation_code.is_some_and(|code| {
                !d.organisation_code.is_empty() && !d.organisation_code.eq_ignore_ascii_case(code)
            }) =>
        {
            check(
                Level::Should,
                false,
                format!(
                    "the server serves {} but --organisation-code is {}",
                    d.organisation_code,
                    organisation_code.unwrap_or_default()
                ),
            )
        }
        Ok(Some(d)) => check(
            Level::Must,
            true,
            format!(
                "{PROTOCOL}, {} ({})",
                nonempty(&d.organisation_name),
                nonempty(&d.software)
            ),
        ),
    }
}

fn nonempty(text: &str) -> &str {
    if text.is_empty() { "not said" } else { text }
}

/// Reads `[base]/metadata` and checks it is an R4 (4.0.x) CapabilityStatement.
async fn metadata(base: &str, config: &FhirConfig, patience: Duration) -> Check {
    let (passed, detail) = match probe_metadata(base, config, patience).await {
        Ok(version) if version.starts_with("4.0") => (true, format!("fhirVersion {version}")),
        Ok(version) => (
            false,
            format!(
                "fhirVersion is {version:?}: the broker reads FHIR R4 (4.0.x); point --fhir at \
                 the server's R4 base URL"
            ),
        ),
        Err(why) => (false, why),
    };
    Check {
        name: CAPABILITY_STATEMENT,
        level: Level::Must,
        passed,
        detail,
    }
}

async fn probe_metadata(
    base: &str,
    config: &FhirConfig,
    patience: Duration,
) -> Result<String, String> {
    let mut client = reqwest::Client::builder().timeout(patience);
    if let Some(ca) = &config.ca_cert {
        let pem = std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| format!("{} is not a PEM certificate: {e}", ca.display()))?;
        client = client.tls_certs_only([cert]);
    }
    if let (Some(cert), Some(key)) = (&config.client_cert, &config.client_key) {
        let mut pem =
            std::fs::read(cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
        pem.extend(std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?);
        let identity = reqwest::Identity::from_pem(&pem)
            .map_err(|e| format!("the client certificate and key do not load: {e}"))?;
        client = client.identity(identity);
    }
    let client = client
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let url = format!("{}/metadata", base.trim_end_matches('/'));
    let mut request = client.get(&url).header("accept", "application/fhir+json");
    if let Some(var) = &config.bearer_token_env
        && let Ok(token) = std::env::var(var)
    {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| {
        format!(
            "could not reach {url}: {}; check the URL, that the server is up, and TLS \
             (--ca-cert for a private CA)",
            reqwest_cause(&e)
        )
    })?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!(
            "GET {url} answered HTTP {status}: a FHIR server must serve its CapabilityStatement there"
        ));
    }
    let body: serde_json::Value = response.json().await.map_err(|_| {
        format!("GET {url} did not answer with JSON (send Accept: application/fhir+json)")
    })?;
    if body["resourceType"] != "CapabilityStatement" {
        return Err(format!(
            "GET {url} answered a {} resource, not a CapabilityStatement",
            body["resourceType"].as_str().unwrap_or("non-FHIR")
        ));
    }
    Ok(body["fhirVersion"].as_str().unwrap_or("").to_owned())
}

/// The innermost cause, which says what actually went wrong (refused, certificate, DNS).
fn reqwest_cause(e: &reqwest::Error) -> String {
    let mut source: &dyn std::error::Error = e;
    while let Some(inner) = source.source() {
        source = inner;
    }
    source.to_string()
}

/// How to fix a failed check, for the kind of endpoint tested.
fn how_to_fix(name: &str, fhir: bool) -> &'static str {
    match (name, fhir) {
        (DESCRIBES_ITSELF, _) => {
            "implement carerecord.source.v1 (proto/carerecord/source/v1/source.proto) at this \
             address; plaintext needs an http:// URL, TLS an https:// one"
        }
        (CAPABILITY_STATEMENT, _) => {
            "serve GET [base]/metadata with an R4 CapabilityStatement (fhirVersion 4.0.1)"
        }
        (checks::FINDS_KNOWN_PATIENT, true) => {
            "the server must find Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|<known> \
             and that patient's resources (e.g. AllergyIntolerance?patient=<id>); check that \
             --known is a patient the server holds, with at least one entry"
        }
        (checks::FINDS_KNOWN_PATIENT, false) => {
            "Fetch for --known must answer `found` with at least one entry; check that --known is \
             a patient the server holds"
        }
        (checks::RIGHT_PATIENT, true) => {
            "the Patient returned must carry the NHS number asked about \
             (identifier system https://fhir.nhs.uk/Id/nhs-number), and every resource's \
             subject/patient must reference that Patient: the broker refuses anything else"
        }
        (checks::RIGHT_PATIENT, false) => {
            "Found.record.patient.nhs_number must be the NHS number asked about (or empty): the \
             broker refuses an answer about anyone else (WRONG_PATIENT)"
        }
        (checks::NOT_FOUND_IS_NOT_AN_ERROR, true) => {
            "a Patient search for an NHS number the server does not hold must answer 200 with an \
             empty searchset Bundle, not an error status"
        }
        (checks::NOT_FOUND_IS_NOT_AN_ERROR, false) => {
            "answer `not_known` (not a Failure, not a gRPC error status) for a patient you do not \
             hold"
        }
        (checks::PROVENANCE, true) => "give every resource an `id`",
        (checks::PROVENANCE, false) => {
            "give every entry one Provenance with source_entry_id (your id for the entry)"
        }
        (checks::LAST_UPDATED, true) => "set meta.lastUpdated on every resource",
        (checks::LAST_UPDATED, false) => "set Provenance.last_updated (RFC 3339) on every entry",
        (checks::CODED, true) => {
            "code resources (SNOMED CT, dm+d, LOINC): the broker merges entries by code"
        }
        (checks::CODED, false) => "set Entry.concept (system and code) on every entry",
        (checks::DATES, _) => "send dates as ISO 8601 (2019, 2019-03, 2019-03-14 or a date-time)",
        (checks::ONLY_REQUESTED_SECTIONS | checks::SECTION_ALONE, true) => {
            "honour the resource type and category of each search: the broker asks per section"
        }
        (checks::ONLY_REQUESTED_SECTIONS | checks::SECTION_ALONE, false) => {
            "answer the sections FetchRequest.sections names, the same way as when asked for all"
        }
        (checks::DETERMINISTIC, _) => {
            "two lookups of an unchanged record must give the same entries (stable ids, stable \
             order of paging)"
        }
        (checks::SAME_FOR_EVERY_REQUESTER, _) => {
            "do not filter by who asks: the broker applies access policy itself (or declare \
             answers_depend_on_requester)"
        }
        (checks::CONCURRENT, _) => {
            "the server must answer concurrent lookups (the broker asks for several patients at \
             once): check connection limits and rate limiting"
        }
        (checks::DEADLINE, true) => {
            "answer well within the broker's source timeout (typically 1-2 s); a slow search \
             needs an index or a smaller page size"
        }
        (checks::CANCELLATION_SAFE, _) => {
            "keep answering after lookups are abandoned mid-way (the broker drops them at its \
             deadline): no locks or per-connection state left behind by a closed request"
        }
        (checks::DEADLINE, false) => {
            "stop work at the gRPC deadline (grpc-timeout, FetchRequest.deadline_ms) and answer \
             with what you have"
        }
        (checks::REDACTED, _) => {
            "error and warning texts must not contain NHS numbers or names: describe the problem"
        }
        _ => "see ADAPTERS.md for what this check asks",
    }
}

impl fmt::Display for LiveReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "carerecord conformance: {} at {}",
            self.kind, self.endpoint
        )?;
        writeln!(f)?;
        for check in &self.report.checks {
            let mark = match (check.passed, check.level) {
                (true, _) => "PASS",
                (false, Level::Should) => "WARN",
                (false, Level::Must) => "FAIL",
            };
            writeln!(f, "{mark}  {}", check.name)?;
            if !check.detail.is_empty() {
                let label = if check.passed {
                    "      "
                } else {
                    "      why: "
                };
                writeln!(f, "{label}{}", check.detail)?;
            }
            // A check that could not run needs the earlier failure fixed, not advice of its own.
            if !check.passed && !check.detail.starts_with("not checked") {
                writeln!(f, "      how to fix: {}", how_to_fix(check.name, self.fhir))?;
            }
        }
        let failed = self.report.failures().count();
        let warned = self.report.warnings().count();
        let passed = self.report.checks.len() - failed - warned;
        writeln!(f)?;
        writeln!(
            f,
            "{passed} passed, {warned} warning(s), {failed} failed: {}",
            if failed == 0 {
                "READY — the broker can use this endpoint"
            } else {
                "NOT READY — fix the failures above and run again"
            }
        )
    }
}
