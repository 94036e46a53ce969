//! `mock-sources`: stand a synthetic region up on this machine, or list its patients.
//!
//! The binary is a thin shell over the library so that ops and tests get the same region for the
//! same seed: `serve` prints where each organisation listens (and can write the broker config
//! pointing at them); `patients` prints NHS numbers to try, marking the awkward cases.
//!
//! Clinical-safety modes, switched at start (`--fault ORG=wrong_patient`, `--data
//! all=conflicts`) or at runtime through the admin API (`PUT /admin/organisations/{code|all}/
//! fault` with `{"fault":"wrong_patient"}`, `wrong_patient_refs` or `ignore_include`; `PUT
//! .../data` with `{"data":"conflicts"}`). `patients --clinical-conflicts` (or `GET
//! /admin/conflicts`) lists the patients whose GP and another organisation then disagree.
//!
//! A whole area: `serve --shared-port --organisations 3000 --write-directory orgs.csv
//! --write-broker-config broker.toml` serves every organisation from one port
//! (`/org/{code}/fhir`) beside the record locator (`/locator/fhir`), and writes the directory
//! and the routed broker config that reads it.

use std::io::{IsTerminal, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context;
use carerecord_mock_sources::{
    ConflictField, DataMode, Fault, FhirMode, LatencyProfile, Region, RegionServer, RegionSpec,
    ServerOptions,
};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "mock-sources",
    version,
    about = "Synthetic NHS organisations serving FHIR R4 on loopback, with latency and faults",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Start the region's FHIR servers, its record locator and the admin server (the default).
    Serve(ServeArgs),
    /// List the region's patients: NHS number, name, date of birth, organisations.
    Patients(PatientsArgs),
}

#[derive(Args, Clone)]
struct RegionArgs {
    /// Seed for the synthetic population: the same seed gives the same region.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Number of patients.
    #[arg(long, default_value_t = 10_000)]
    patients: usize,
    /// Number of organisations (up to 5000; about half GP practices in a small region, 40% in
    /// one of more than 50, with acute trusts, mental health trusts, an ambulance service and
    /// care homes).
    #[arg(long, default_value_t = 10)]
    organisations: usize,
    /// Default search page size.
    #[arg(long, default_value_t = 20)]
    page_size: usize,
}

impl RegionArgs {
    fn spec(&self) -> RegionSpec {
        RegionSpec {
            seed: self.seed,
            patients: self.patients,
            organisations: self.organisations,
            page_size: self.page_size,
        }
    }
}

#[derive(Args, Clone)]
struct ServeArgs {
    #[command(flatten)]
    region: RegionArgs,
    /// Address to bind every server to (each gets its own port unless --shared-port).
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Serve every organisation from one port, routed by path: /org/{code}/fhir. Cheap for
    /// thousands of organisations.
    #[arg(long)]
    shared_port: bool,
    /// Write the organisation directory (CSV: organisation_code,organisation_name,kind,base_url)
    /// to FILE; the broker config written then is the routed one that reads it.
    #[arg(long, value_name = "FILE")]
    write_directory: Option<PathBuf>,
    /// Write a broker config for this region to FILE (routed, reading the directory, when
    /// --write-directory is given; otherwise one [[sources]] table per organisation).
    #[arg(long, value_name = "FILE")]
    write_broker_config: Option<PathBuf>,
    /// The fraction (0..=1) of record pointers the locator does not hold.
    #[arg(long, value_name = "FRACTION", default_value_t = 0.0)]
    locator_missing: f64,
    /// The broker listen address to put in that config.
    #[arg(long, default_value = "127.0.0.1:50051")]
    broker_listen: String,
    /// How the broker config tells the broker to read every source (default: everything,
    /// which with the adapter's patient id cache is one round trip for a patient looked up
    /// before and the cheapest in CPU; see BENCHMARKS.md section 7).
    #[arg(long, value_enum)]
    broker_mode: Option<Mode>,
    /// Latency for an organisation (`all` for every one, `LOCATOR` for the locator):
    /// fixed:MS, tail:MEDIAN_MS:P99_MS or none.
    #[arg(long = "latency", value_name = "ORG=SPEC", value_parser = org_setting::<LatencyProfile>)]
    latency: Vec<(String, LatencyProfile)>,
    /// Fault for an organisation (`all` for every one, `LOCATOR` for the locator): none,
    /// error_rate:0.3, http500, hang, malformed_json, slow_body, reset, empty_bundle; and for
    /// clinical safety: wrong_patient (every answer about the patient is another person's
    /// record), wrong_patient_refs (another person's resources mixed in), ignore_include
    /// (drugs only by GET Medication/{id}).
    #[arg(long = "fault", value_name = "ORG=KIND", value_parser = org_setting::<Fault>)]
    fault: Vec<(String, Fault)>,
    /// Data mode for an organisation (`all` for every one): normal, or conflicts (it serves
    /// its disagreeing version of a fact shared with the GP, for the patients
    /// `patients --clinical-conflicts` lists).
    #[arg(long = "data", value_name = "ORG=MODE", value_parser = org_setting::<DataMode>)]
    data: Vec<(String, DataMode)>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Search,
    Everything,
    Batch,
    Chained,
}

#[derive(Args)]
struct PatientsArgs {
    #[command(flatten)]
    region: RegionArgs,
    /// Print at most N patients.
    #[arg(long)]
    limit: Option<usize>,
    /// Only patients known to at least N organisations.
    #[arg(long, value_name = "N")]
    known_to_at_least: Option<usize>,
    /// Only patients whose demographics conflict between organisations.
    #[arg(long)]
    conflicts: bool,
    /// Only patients whose GP and another organisation disagree on a clinical fact in
    /// conflict data mode (`--data ORG=conflicts`).
    #[arg(long)]
    clinical_conflicts: bool,
    /// Print one valid NHS number that no organisation knows, and stop.
    #[arg(long)]
    unknown: bool,
}

fn org_setting<T: FromStr>(s: &str) -> Result<(String, T), String>
where
    T::Err: std::fmt::Display,
{
    let (org, spec) = s
        .split_once('=')
        .ok_or_else(|| format!("expected ORG=SPEC, got {s:?}"))?;
    let value = spec.parse::<T>().map_err(|e| e.to_string())?;
    Ok((org.trim().to_string(), value))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Patients(args)) => patients(args),
        Some(Command::Serve(args)) => serve(args),
        None => serve(cli.serve),
    }
}

fn patients(args: PatientsArgs) -> anyhow::Result<()> {
    let region = Region::generate(&args.region.spec());
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.unknown {
        writeln!(out, "{}", region.unknown_nhs_number().as_digits())?;
        return Ok(());
    }
    let min = args.known_to_at_least.unwrap_or(0);
    let selected = region
        .patients()
        .filter(|p| p.organisations.len() >= min)
        .filter(|p| !args.conflicts || p.conflict.is_some())
        .filter(|p| !args.clinical_conflicts || p.clinical_conflict.is_some())
        .take(args.limit.unwrap_or(usize::MAX));
    for p in selected {
        let mut line = format!(
            "{}  {:<26}  {}  {}",
            p.nhs_number.as_digits(),
            p.display_name(),
            p.birth_date,
            p.organisations.join(",")
        );
        if let Some(c) = &p.conflict {
            let what = match c.field {
                ConflictField::FamilyName => format!("family name {}", c.value.to_uppercase()),
                ConflictField::BirthDate => format!("date of birth {}", c.value),
            };
            line.push_str(&format!(
                "  ! conflicting demographics: {} holds {what}",
                c.organisation
            ));
        }
        if let Some(c) = &p.clinical_conflict {
            line.push_str(&format!(
                "  ! clinical conflict (with {} in conflicts mode): {} {}: {} says {}, {} says {}",
                c.organisation,
                c.code,
                c.display,
                c.gp,
                c.gp_says,
                c.organisation,
                c.organisation_says
            ));
        }
        // Stop quietly when the reader goes away (`| head`).
        if writeln!(out, "{line}").is_err() {
            break;
        }
    }
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let region = Arc::new(Region::generate(&args.region.spec()));
    let is_all = |org: &str| org.eq_ignore_ascii_case("all") || org == "*";
    let mut options = ServerOptions {
        locator_missing_pointers: args.locator_missing,
        ..ServerOptions::default()
    };
    for (org, latency) in &args.latency {
        if is_all(org) {
            options.latency = Some(*latency);
        } else {
            options.latency_overrides.push((org.clone(), *latency));
        }
    }
    for (org, fault) in &args.fault {
        if is_all(org) {
            let every = region
                .organisations()
                .iter()
                .map(|o| (o.code.clone(), *fault));
            options.faults.extend(every);
        } else {
            options.faults.push((org.clone(), *fault));
        }
    }
    let started = std::time::Instant::now();
    let server = if args.shared_port {
        RegionServer::start_shared(region.clone(), args.bind, options).await
    } else {
        RegionServer::start_with(region.clone(), args.bind, options).await
    }
    .context("starting the region's servers")?;
    let startup = started.elapsed();
    for (org, data) in &args.data {
        if is_all(org) {
            server.faults().set_data_mode_all(*data);
        } else {
            server
                .faults()
                .set_data_mode(org, *data)
                .context("--data names an organisation")?;
        }
    }

    let mut out = std::io::stdout().lock();
    let orgs = server.organisations();
    if orgs.len() > SUMMARY_ABOVE {
        writeln!(
            out,
            "{} organisations in {:.1?}: {}",
            orgs.len(),
            startup,
            kind_summary(&orgs)
        )?;
        match server.endpoint_template() {
            Some(t) => writeln!(out, "{:<7} {t}", "orgs")?,
            None => writeln!(
                out,
                "{:<7} one port each, {} .. {} (see the directory or /admin/organisations)",
                "orgs",
                orgs.first().map_or("", |o| o.base_url.as_str()),
                orgs.last().map_or("", |o| o.base_url.as_str())
            )?,
        }
        for o in orgs.iter().take(3) {
            writeln!(out, "{:<7} {}  {}", o.code, o.name, o.base_url)?;
        }
        writeln!(
            out,
            "{:<7} always ask {}",
            "",
            server.always_ask().join(", ")
        )?;
    } else {
        let width = orgs
            .iter()
            .map(|o| o.name.chars().count())
            .max()
            .unwrap_or(0);
        for o in &orgs {
            writeln!(
                out,
                "{:<7} {:<width$}  {:<20} {}",
                o.code,
                o.name,
                o.kind.label(),
                o.base_url
            )?;
        }
    }
    writeln!(out, "{:<7} {}", "locator", server.locator_url())?;
    writeln!(out, "{:<7} {}", "admin", server.admin_url())?;
    out.flush()?;
    drop(out);

    if let Some(path) = &args.write_directory {
        server
            .write_directory(path)
            .with_context(|| format!("writing the directory to {}", path.display()))?;
        tracing::info!(path = %path.display(), rows = orgs.len(), "directory written");
    }
    if let Some(path) = &args.write_broker_config {
        let mode = |m: Mode| match m {
            Mode::Search => FhirMode::Search,
            Mode::Everything => FhirMode::Everything,
            Mode::Batch => FhirMode::Batch,
            Mode::Chained => FhirMode::Chained,
        };
        let config = match &args.write_directory {
            Some(dir) => server.broker_config_toml_routed_with(
                &args.broker_listen,
                dir,
                args.broker_mode.map_or(FhirMode::Everything, mode),
            ),
            None => {
                let m = args.broker_mode.map_or(FhirMode::Everything, mode);
                server.broker_config_toml_with(&args.broker_listen, |_| m)
            }
        };
        std::fs::write(path, config)
            .with_context(|| format!("writing the broker config to {}", path.display()))?;
        tracing::info!(
            path = %path.display(),
            routed = args.write_directory.is_some(),
            "broker config written"
        );
    }
    tracing::info!(
        patients = region.patient_count(),
        seed = region.spec().seed,
        reference_date = %region.reference_date(),
        "serving; Ctrl-C to stop"
    );

    shutdown_signal().await;
    tracing::info!("stopping");
    server.shutdown().await;
    Ok(())
}

/// Above this many organisations `serve` prints a summary rather than a line each.
const SUMMARY_ABOVE: usize = 50;

/// `1200 GP practices, 40 acute trusts, ...`.
fn kind_summary(orgs: &[carerecord_mock_sources::RunningOrganisation]) -> String {
    use carerecord_mock_sources::OrgKind;
    [
        (OrgKind::GpPractice, "GP practice"),
        (OrgKind::AcuteTrust, "acute trust"),
        (OrgKind::MentalHealthTrust, "mental health trust"),
        (OrgKind::AmbulanceService, "ambulance service"),
        (OrgKind::CareHome, "care home"),
    ]
    .iter()
    .map(|(k, label)| {
        let n = orgs.iter().filter(|o| o.kind == *k).count();
        format!("{n} {label}{}", if n == 1 { "" } else { "s" })
    })
    .collect::<Vec<_>>()
    .join(", ")
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
