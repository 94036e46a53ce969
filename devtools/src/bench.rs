//! `carerecord-dev bench`: the load generator of issue 7, and the reference measurements that make
//! its figures mean something.
//!
//! Design, chosen so the figures are honest:
//! - The system under test runs in a **child process** — `carerecord-dev serve --config` for the
//!   mock region (the product's serving path, `carerecord_broker::cli::serve::run`, the same code
//!   as `carerecord serve`), a hidden `carerecord-dev bench --internal memory-broker` for
//!   in-process sources, and the hidden `echo` and `minimal` reference servers — so its CPU
//!   (user+sys from `/proc/<pid>/stat`) and RSS (`/proc/<pid>/status`) are its own. The load
//!   generator, the mock organisations and the client-side references run in this process.
//! - Every gRPC target (broker, echo, minimal program) gets the same request stream over real
//!   gRPC and is measured the same way: a warm-up, then a measured phase.
//! - References in the same run: the slowest source alone (one direct HTTP request to the
//!   patient's GP, the largest record: the physical limit), the FHIR adapter alone against that
//!   source, a sequential fan-out through the adapter (what concurrency buys), a plain tonic echo
//!   of the broker's own responses (the ceiling for cache hits), and the minimal program (one
//!   pooled reqwest request per organisation, serde parsing, a trivial merge, one tonic response):
//!   the CPU floor.
//! - With `--runs N` every figure is the median of N runs (each with fresh child processes).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use carerecord_adapters::fhir::QueryMode;
use carerecord_adapters::{
    NhsNumber, SectionSet, Source, SourceError, SourceInfo, SourceRecord, SourceReply,
    SourceRequest,
};
use carerecord_broker::assemble::{Trail, assemble};
use carerecord_broker::config::Config;
use carerecord_broker::fanout::SourceSet;
use carerecord_broker::registry;
use carerecord_broker::server::{self, Transport};
use carerecord_mock_sources::{
    LOCATOR, LatencyProfile, Region, RegionServer, RegionSpec, ServerOptions,
};
use carerecord_proto::care_record_service_client::CareRecordServiceClient;
use carerecord_proto::care_record_service_server::{CareRecordService, CareRecordServiceServer};
use carerecord_proto::{
    CacheDirective, CareRecord, CareRecordEvent, Coding, Entry, GetCareRecordRequest,
    GetCareRecordResponse, Provenance, Purpose, Requester, Section, SourceOutcome, SourceStatus,
};
use clap::{Args, ValueEnum};
use prost::Message;
use serde::Deserialize;
use tonic::transport::Channel;

/// The NHS number identifier system, as FHIR servers index it.
const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
/// Largest gRPC message either side accepts (a merged record can be large).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// What the broker reads: mock organisations over real HTTP, or in-process sources with a
    /// fixed delay (isolates the broker from HTTP).
    #[arg(long, value_enum, default_value_t = RegionKind::Mock)]
    pub region: RegionKind,
    /// Number of organisations (up to 5,000; above 50 the mock lays the region out like a real
    /// area, each patient known to 3–8 organisations).
    #[arg(long, visible_alias = "organisations", default_value_t = 10)]
    pub orgs: usize,
    /// Mock region, routed: every organisation on one shared port (by path), an organisation
    /// directory file instead of `[[sources]]`, and `[routing] mode = "located"` with the
    /// region's always-ask organisations and its record locator (same latency as the
    /// organisations). The broker asks only the organisations that hold the patient's records.
    #[arg(long)]
    pub routed: bool,
    /// Routed: `[routing] locator_cache_secs` of the broker (how long a locator's answer is
    /// reused). `0` asks the locator on every lookup, so a small `--patients` pool measures a
    /// patient seen before whose locator answer has expired (the organisations it named
    /// recently are asked while it is asked again).
    #[arg(long)]
    pub locator_cache_secs: Option<u64>,
    /// How the broker reads each mock organisation: search, everything, batch or chained.
    #[arg(long, value_parser = crate::parse_query_mode, default_value = "everything")]
    pub mode: QueryMode,
    /// The FHIR adapter's NHS number -> patient id cache (`patient_id_cache` of every mock
    /// source): `false` gives the two-round-trip flow of before issue 12 in every mode but
    /// `chained`. It helps repeat lookups of a patient only: use a small `--patients` pool
    /// and a warm-up that covers it to measure hits.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub patient_id_cache: bool,
    /// Fixed latency of every organisation (mock: per HTTP request; memory: per fetch).
    #[arg(long, default_value_t = 10)]
    pub latency_ms: u64,
    /// The mock servers' default page size (what a server returns when no `_count` is sent).
    #[arg(long, default_value_t = 20)]
    pub page_size: usize,
    /// Synthetic patients in the region (mock) / distinct patients in the pool (memory).
    #[arg(long, default_value_t = 5000)]
    pub patients: usize,
    /// Only look up patients known to at least this many organisations (mock region).
    #[arg(long, default_value_t = 1)]
    pub min_orgs: usize,
    /// Memory region: the chance that an organisation other than the first knows a patient.
    #[arg(long, default_value_t = 0.3)]
    pub known_fraction: f64,
    /// Closed loop: this many lookups in flight.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Open loop: this many lookups per second whatever the latency (overrides --concurrency).
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long each measured phase lasts (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop each measured phase after this many lookups instead.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Warm-up before each measured phase (same load, not counted).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Fraction of lookups that are cache hits (a warmed hot set); the rest ask for fresh data.
    #[arg(long, default_value_t = 0.0)]
    pub hit_ratio: f64,
    /// Patients in the hot (cached) set.
    #[arg(long, default_value_t = 64)]
    pub hot_patients: usize,
    /// The caller's deadline (`grpc-timeout`) on every lookup.
    #[arg(long, default_value_t = 2000)]
    pub deadline_ms: u64,
    /// `[resilience] max_lookups_in_flight` of the broker (shedding threshold).
    #[arg(long)]
    pub max_in_flight: Option<usize>,
    /// `[cache] max_bytes` of the broker.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    pub cache_max_bytes: u64,
    /// Memory region: after warm-up, fill the cache with this many distinct records and report
    /// the broker's RSS per record.
    #[arg(long)]
    pub fill_cache: Option<usize>,
    /// What to measure, in order: broker, slowest, adapter, sequential, echo, minimal.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "broker,slowest,minimal"
    )]
    pub targets: Vec<Target>,
    /// Repeat everything this many times and report medians.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Samples for the client-side references (slowest, adapter, sequential).
    #[arg(long, default_value_t = 100)]
    pub samples: usize,
    /// `RUST_LOG` for the child processes (`serve` logs at info by default, as in production).
    #[arg(long, default_value = "info")]
    pub child_log: String,
    /// Serve Prometheus metrics from the broker (as production would); `--no-metrics` to omit.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub metrics: bool,
    /// Seed of the synthetic population.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// A ~2 second tiny run of every target (CI): checks lookups succeed, asserts no timing.
    #[arg(long)]
    pub smoke: bool,
    #[arg(long, hide = true, value_enum)]
    pub internal: Option<Internal>,
    #[arg(long, hide = true)]
    pub internal_config: Option<PathBuf>,
    #[arg(long, hide = true)]
    pub internal_listen: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RegionKind {
    Mock,
    Memory,
}

/// Something measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
pub enum Target {
    /// The broker, in a child process, over gRPC.
    Broker,
    /// One direct HTTP request (`$everything?_count=100`) to the patient's GP, sequentially.
    Slowest,
    /// The FHIR adapter alone against the patient's GP (the broker's own protocol, no broker).
    Adapter,
    /// The adapter against every organisation one after another.
    Sequential,
    /// A plain tonic server answering with the broker's own responses, pre-built.
    Echo,
    /// The minimal program, in a child process, over gRPC.
    Minimal,
}

/// Hidden child-process roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Internal {
    MemoryBroker,
    Echo,
    Minimal,
}

pub async fn run(mut args: BenchArgs) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(role) = args.internal {
        let config = args
            .internal_config
            .clone()
            .context("--internal needs --internal-config")?;
        return match role {
            Internal::MemoryBroker => serve_memory_broker(&config).await,
            Internal::Echo => serve_echo(&config, args.internal_listen).await,
            Internal::Minimal => serve_minimal(&config, args.internal_listen).await,
        };
    }
    if args.smoke {
        args.orgs = args.orgs.min(3);
        args.patients = args.patients.min(200);
        args.duration = Duration::from_millis(300);
        args.warmup = Duration::from_millis(100);
        args.samples = args.samples.min(3);
        args.runs = 1;
        args.concurrency = args.concurrency.clamp(1, 4);
        args.hot_patients = args.hot_patients.min(8);
        args.fill_cache = args.fill_cache.map(|n| n.min(100));
        if args.region == RegionKind::Mock {
            args.targets = vec![
                Target::Broker,
                Target::Slowest,
                Target::Adapter,
                Target::Sequential,
                Target::Echo,
                Target::Minimal,
            ];
        } else {
            args.targets = vec![Target::Broker, Target::Echo];
        }
    }
    let bench = Bench::start(args).await?;
    let report = bench.measure().await;
    bench.finish().await;
    let report = report?;
    if report.smoke_failed {
        bail!("smoke run: a target answered no lookups successfully (see the table above)");
    }
    Ok(())
}

// ---- the orchestration ------------------------------------------------------------------------

/// A patient as the load generator asks for them.
#[derive(Clone, Debug)]
struct Patient {
    nhs: NhsNumber,
    /// The requesting organisation: one that holds records for the patient (their GP).
    org: String,
}

/// The product's NHS number for one of the mock region's (mock-sources has its own type).
fn product_nhs(n: &carerecord_mock_sources::NhsNumber) -> NhsNumber {
    NhsNumber::parse(&n.as_digits()).expect("the mock region's NHS numbers are valid")
}

struct Bench {
    args: BenchArgs,
    workdir: PathBuf,
    region: Arc<Region>,
    mock: RegionServer,
    /// The broker configuration for the mock region (without the listen address filled).
    mock_config: String,
    /// Patients fetched fresh (cache misses), in order.
    pool: Vec<Patient>,
    /// Patients served from cache.
    hot: Vec<Patient>,
    /// Memory region: template records per organisation, for the child broker.
    templates: Option<serde_json::Value>,
    clk_tck: f64,
}

impl Bench {
    async fn start(args: BenchArgs) -> anyhow::Result<Bench> {
        let workdir = std::env::temp_dir().join(format!("carerecord-bench-{}", std::process::id()));
        std::fs::create_dir_all(&workdir)?;
        let spec = RegionSpec {
            seed: args.seed,
            patients: if args.region == RegionKind::Mock {
                args.patients
            } else {
                2000
            },
            organisations: args.orgs,
            page_size: args.page_size,
        };
        let region = Arc::new(Region::generate(&spec));
        let latency = match args.region {
            RegionKind::Mock => LatencyProfile::Fixed {
                ms: args.latency_ms,
            },
            RegionKind::Memory => LatencyProfile::ZERO,
        };
        if args.routed && args.region != RegionKind::Mock {
            bail!("--routed applies to the mock region only");
        }
        let options = ServerOptions {
            latency: Some(latency),
            ..ServerOptions::default()
        };
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mock = if args.routed {
            RegionServer::start_shared(region.clone(), ip, options).await
        } else {
            RegionServer::start_with(region.clone(), ip, options).await
        }
        .context("cannot start the mock organisations")?;
        let mode = crate::mock_mode(args.mode);
        let mock_config = if args.routed {
            let directory = workdir.join("directory.csv");
            mock.write_directory(&directory)
                .context("cannot write the organisation directory")?;
            let config = mock.broker_config_toml_routed_with("@LISTEN@", &directory, mode);
            match args.locator_cache_secs {
                Some(secs) => config.replace(
                    "[[routing.locators]]\n",
                    &format!("locator_cache_secs = {secs}\n[[routing.locators]]\n"),
                ),
                None => config,
            }
        } else {
            mock.broker_config_toml_with("@LISTEN@", |_| mode)
        };
        let mock_config = if args.patient_id_cache {
            mock_config
        } else if args.routed {
            bail!("--patient-id-cache false applies to the unrouted mock region only");
        } else {
            mock_config.replace(
                "[sources.fhir]\n",
                "[sources.fhir]\npatient_id_cache = false\n",
            )
        };

        let (pool, hot, templates) = match args.region {
            RegionKind::Mock => {
                let mut eligible: Vec<Patient> = region
                    .patients_known_to_at_least(args.min_orgs.max(1))
                    .map(|p| Patient {
                        nhs: product_nhs(&p.nhs_number),
                        org: p.gp,
                    })
                    .collect();
                if eligible.is_empty() {
                    bail!(
                        "no patient is known to {} organisations in this region",
                        args.min_orgs
                    );
                }
                shuffle(&mut eligible, args.seed);
                let hot_n = args.hot_patients.min(eligible.len() / 2).max(1);
                let hot = eligible.split_off(eligible.len() - hot_n);
                (eligible, hot, None)
            }
            RegionKind::Memory => {
                let templates = fetch_templates(&region, &mock_config, args.orgs).await?;
                let first_org = region.organisations()[0].code.clone();
                let wanted = args.patients.max(args.fill_cache.unwrap_or(0)) + args.hot_patients;
                let mut all: Vec<Patient> = (900_000_000u32..)
                    .filter_map(NhsNumber::from_stem)
                    .take(wanted)
                    .map(|nhs| Patient {
                        nhs,
                        org: first_org.clone(),
                    })
                    .collect();
                let hot = all.split_off(all.len() - args.hot_patients.max(1));
                (all, hot, Some(templates))
            }
        };
        let clk_tck = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .unwrap_or(100.0);
        Ok(Bench {
            args,
            workdir,
            region,
            mock,
            mock_config,
            pool,
            hot,
            templates,
            clk_tck,
        })
    }

    async fn finish(self) {
        self.mock.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.workdir);
    }

    async fn measure(&self) -> anyhow::Result<Report> {
        let a = &self.args;
        println!(
            "carerecord-dev bench: {} region, {} organisations, mode {:?}, patient id cache {}, latency {} ms, page size {}, \
             {}, hit ratio {}, deadline {} ms, {} run(s); machine: {} × {}",
            match a.region {
                RegionKind::Mock if a.routed => "mock (HTTP, routed)",
                RegionKind::Mock => "mock (HTTP)",
                RegionKind::Memory => "memory (in-process)",
            },
            a.orgs,
            a.mode,
            a.patient_id_cache,
            a.latency_ms,
            a.page_size,
            match a.rate {
                Some(r) => format!("open loop {r}/s"),
                None => format!("concurrency {}", a.concurrency),
            },
            a.hit_ratio,
            a.deadline_ms,
            a.runs,
            num_cpus(),
            cpu_model(),
        );
        if a.routed {
            let always = self.mock.always_ask();
            let asked: Vec<f64> = self
                .pool
                .iter()
                .map(|p| {
                    let mut orgs = self.mock.located_organisations(&p.nhs);
                    orgs.extend(always.iter().cloned());
                    orgs.sort();
                    orgs.dedup();
                    orgs.len() as f64
                })
                .collect();
            let mean = asked.iter().sum::<f64>() / asked.len().max(1) as f64;
            println!(
                "routed: one shared port, directory of {} organisations, locator at {}; always ask \
                 {:?}; organisations a lookup asks (always-ask ∪ located), mean over the pool: {:.1}",
                self.mock.organisations().len(),
                self.mock.locator_url(),
                always,
                mean,
            );
        }
        let mut all: BTreeMap<Target, Vec<Measured>> = BTreeMap::new();
        let mut fills: Vec<Fill> = Vec::new();
        for run in 1..=a.runs.max(1) {
            let mut echo_responses: Vec<GetCareRecordResponse> = Vec::new();
            for &target in &a.targets {
                let measured = match target {
                    Target::Broker => {
                        let (m, responses, fill) = self.measure_broker(run).await?;
                        echo_responses = responses;
                        if let Some(f) = fill {
                            fills.push(f);
                        }
                        Some(m)
                    }
                    Target::Echo => {
                        if echo_responses.is_empty() {
                            eprintln!("echo needs the broker target earlier in the list; skipped");
                            None
                        } else {
                            Some(self.measure_echo(run, &echo_responses).await?)
                        }
                    }
                    Target::Minimal | Target::Sequential if a.routed => {
                        eprintln!(
                            "{target:?} asks every organisation: not measured with --routed; skipped"
                        );
                        None
                    }
                    Target::Minimal if a.region == RegionKind::Mock => {
                        Some(self.measure_minimal(run).await?)
                    }
                    Target::Slowest | Target::Adapter | Target::Sequential
                        if a.region == RegionKind::Mock =>
                    {
                        Some(self.measure_reference(target).await?)
                    }
                    _ => {
                        eprintln!("{target:?} applies to the mock region only; skipped");
                        None
                    }
                };
                if let Some(m) = measured {
                    eprintln!("run {run}: {}", m.row());
                    all.entry(target).or_default().push(m);
                }
            }
        }
        let report = Report::new(all, fills, a);
        report.print(a);
        Ok(report)
    }

    fn config_for(&self, listen: SocketAddr, tag: &str) -> String {
        let mut text = self.mock_config.replace("@LISTEN@", &listen.to_string());
        if self.args.region == RegionKind::Memory {
            // The memory broker builds its own sources.
            text = text
                .split("\n[[sources]]")
                .next()
                .unwrap_or_default()
                .to_owned();
        }
        with_extra_tables(&text, &self.extra_config(tag))
    }

    fn extra_config(&self, tag: &str) -> String {
        let a = &self.args;
        let mut s = String::new();
        s.push_str(&format!(
            "\n[budget]\nmax_lookup_ms = {}\n\n[cache]\nmax_bytes = {}\n",
            a.deadline_ms.max(5000),
            a.cache_max_bytes
        ));
        if let Some(max) = a.max_in_flight {
            s.push_str(&format!("\n[resilience]\nmax_lookups_in_flight = {max}\n"));
        }
        let audit = self.workdir.join(format!("audit-{tag}.jsonl"));
        s.push_str(&format!(
            "\n[audit]\nfile = {}\n",
            toml_str(&audit.to_string_lossy())
        ));
        if a.metrics {
            s.push_str(&format!(
                "\n[metrics]\nlisten = \"127.0.0.1:{}\"\n",
                free_port().unwrap_or(0)
            ));
        }
        s
    }

    async fn measure_broker(
        &self,
        run: usize,
    ) -> anyhow::Result<(Measured, Vec<GetCareRecordResponse>, Option<Fill>)> {
        let a = &self.args;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let tag = format!("broker-{run}");
        let config_text = self.config_for(addr, &tag);
        let child = match a.region {
            RegionKind::Mock => {
                let path = self.workdir.join(format!("{tag}.toml"));
                std::fs::write(&path, &config_text)?;
                let args: Vec<OsString> =
                    vec!["serve".into(), "--config".into(), path.into_os_string()];
                ChildServer::spawn(args, addr, &self.workdir, &tag, &a.child_log).await?
            }
            RegionKind::Memory => {
                let path = self.workdir.join(format!("{tag}.json"));
                let config = serde_json::json!({
                    "config_toml": config_text,
                    "latency_ms": a.latency_ms,
                    "known_fraction": a.known_fraction,
                    "templates": self.templates,
                });
                std::fs::write(&path, serde_json::to_vec(&config)?)?;
                let args: Vec<OsString> = vec![
                    "bench".into(),
                    "--internal".into(),
                    "memory-broker".into(),
                    "--internal-config".into(),
                    path.into_os_string(),
                ];
                ChildServer::spawn(args, addr, &self.workdir, &tag, &a.child_log).await?
            }
        };
        let clients = connect_clients(addr, 8).await?;
        // Warm the hot set (and keep the responses: the echo serves exactly these).
        let mut responses = Vec::new();
        for p in &self.hot {
            if let Ok(r) = clients[0]
                .clone()
                .get_care_record(lookup_request(p, false, a.deadline_ms))
                .await
            {
                responses.push(r.into_inner());
            }
        }
        if a.hit_ratio < 1.0 && self.hot.len() < 32 {
            for p in self.pool.iter().take(32) {
                if let Ok(r) = clients[0]
                    .clone()
                    .get_care_record(lookup_request(p, false, a.deadline_ms))
                    .await
                {
                    responses.push(r.into_inner());
                }
            }
        }
        let workload = Arc::new(Workload::new(
            self.pool.clone(),
            self.hot.clone(),
            a.hit_ratio,
            a.deadline_ms,
            true,
        ));
        let mut m = self
            .drive(Target::Broker, &clients, &workload, Some(&child))
            .await;
        m.startup_ms = Some(child.startup.as_secs_f64() * 1000.0);
        let fill = match a.fill_cache {
            Some(n) => Some(self.fill(&clients, &child, n).await),
            None => None,
        };
        child.stop();
        Ok((m, responses, fill))
    }

    /// Fills the cache with `n` distinct records, then reads RSS and the cache gauges.
    async fn fill(&self, clients: &[Client], child: &ChildServer, n: usize) -> Fill {
        let base_rss = rss_kib(child.pid).unwrap_or(0);
        let fill_patients: Vec<Patient> = self.pool.iter().take(n).cloned().collect();
        let workload = Arc::new(Workload::new(
            fill_patients,
            Vec::new(),
            0.0,
            self.args.deadline_ms,
            false,
        ));
        let started = Instant::now();
        let stats = run_closed(
            clients,
            &workload,
            self.args.concurrency.max(16),
            Instant::now() + Duration::from_secs(3600),
            Some(n as u64),
        )
        .await;
        let took = started.elapsed();
        // moka applies inserts and evictions lazily: let it settle before reading memory.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // One more miss updates the cache gauges.
        if let Some(p) = self.pool.get(n) {
            let _ = clients[0]
                .clone()
                .get_care_record(lookup_request(p, true, self.args.deadline_ms))
                .await;
        }
        let gauges = child.cache_gauges().await;
        Fill {
            records: n,
            ok: stats.ok,
            seconds: took.as_secs_f64(),
            base_rss_kib: base_rss,
            rss_kib: rss_kib(child.pid).unwrap_or(0),
            hwm_kib: hwm_kib(child.pid).unwrap_or(0),
            cache_entries: gauges.0,
            cache_bytes: gauges.1,
        }
    }

    async fn measure_echo(
        &self,
        run: usize,
        responses: &[GetCareRecordResponse],
    ) -> anyhow::Result<Measured> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let tag = format!("echo-{run}");
        let path = self.workdir.join(format!("{tag}.bin"));
        let mut buf = Vec::new();
        for r in responses {
            r.encode_length_delimited(&mut buf)?;
        }
        std::fs::write(&path, &buf)?;
        self.drive_child_reference("echo", Target::Echo, &path, addr, &tag)
            .await
    }

    async fn measure_minimal(&self, run: usize) -> anyhow::Result<Measured> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let tag = format!("minimal-{run}");
        let orgs: Vec<serde_json::Value> = self
            .mock
            .organisations()
            .iter()
            .map(|o| serde_json::json!({"code": o.code, "name": o.name, "base_url": o.base_url}))
            .collect();
        let mut patients = serde_json::Map::new();
        for p in self.pool.iter().chain(&self.hot) {
            let ids: Vec<Option<String>> = self
                .mock
                .organisations()
                .iter()
                .map(|o| self.region.patient_id_at(&p.nhs, &o.code))
                .collect();
            patients.insert(p.nhs.as_digits(), serde_json::json!(ids));
        }
        let path = self.workdir.join(format!("{tag}.json"));
        std::fs::write(
            &path,
            serde_json::to_vec(&serde_json::json!({"orgs": orgs, "patients": patients}))?,
        )?;
        self.drive_child_reference("minimal", Target::Minimal, &path, addr, &tag)
            .await
    }

    /// Runs one reference server (`echo`, `minimal`) as a child process on `addr` and drives
    /// the same workload at it as at the broker.
    async fn drive_child_reference(
        &self,
        kind: &str,
        target: Target,
        input: &std::path::Path,
        addr: SocketAddr,
        tag: &str,
    ) -> anyhow::Result<Measured> {
        let a = &self.args;
        let child = self.spawn_internal(kind, input, addr, tag).await?;
        let clients = connect_clients(addr, 8).await?;
        let workload = Arc::new(Workload::new(
            self.pool.clone(),
            self.hot.clone(),
            a.hit_ratio,
            a.deadline_ms,
            true,
        ));
        let mut m = self.drive(target, &clients, &workload, Some(&child)).await;
        m.startup_ms = Some(child.startup.as_secs_f64() * 1000.0);
        child.stop();
        Ok(m)
    }

    async fn spawn_internal(
        &self,
        role: &str,
        config: &Path,
        addr: SocketAddr,
        tag: &str,
    ) -> anyhow::Result<ChildServer> {
        let args: Vec<OsString> = vec![
            "bench".into(),
            "--internal".into(),
            role.into(),
            "--internal-config".into(),
            config.as_os_str().to_owned(),
            "--internal-listen".into(),
            addr.to_string().into(),
        ];
        ChildServer::spawn(args, addr, &self.workdir, tag, &self.args.child_log).await
    }

    /// Client-side references, measured sequentially in this process (no child, no CPU figure).
    async fn measure_reference(&self, target: Target) -> anyhow::Result<Measured> {
        let a = &self.args;
        let config_text = self.mock_config.replace("@LISTEN@", "127.0.0.1:1");
        let config = Config::parse(&config_text, Path::new("<bench>"))?;
        let sources = registry::build(&config, 1)?;
        let http = reqwest::Client::builder()
            .build()
            .context("cannot build the HTTP client")?;
        let orgs = self.mock.organisations();
        let mut stats = Stats::default();
        let http_before = self.http_requests();
        let samples = match target {
            Target::Sequential => (a.samples / 10).max(2),
            _ => a.samples.max(2),
        };
        // One unmeasured pass warms connections.
        for (i, p) in self.pool.iter().cycle().take(samples + 2).enumerate() {
            let gp_index = orgs
                .iter()
                .position(|o| o.code.eq_ignore_ascii_case(&p.org));
            let started = Instant::now();
            let ok = match target {
                Target::Slowest => {
                    let gp = gp_index.map(|g| &orgs[g]);
                    let id = gp.and_then(|o| self.region.patient_id_at(&p.nhs, &o.code));
                    match (gp, id) {
                        (Some(o), Some(id)) => {
                            let url = format!("{}/Patient/{id}/$everything?_count=100", o.base_url);
                            fetch_all_pages(&http, &url).await.is_ok()
                        }
                        _ => false,
                    }
                }
                Target::Adapter => match gp_index {
                    Some(g) => {
                        let request = source_request(p, a.deadline_ms);
                        matches!(
                            sources.sources[g].source.fetch(&request).await,
                            Ok(SourceReply::Found(_))
                        )
                    }
                    None => false,
                },
                _ => {
                    let request = source_request(p, a.deadline_ms);
                    let mut ok = true;
                    for s in &sources.sources {
                        ok &= s.source.fetch(&request).await.is_ok();
                    }
                    ok
                }
            };
            let took = started.elapsed();
            if i < 2 {
                continue;
            }
            if ok {
                stats.ok += 1;
                stats.lat_us.push(took.as_micros() as u64);
            } else {
                *stats.errors.entry("FAILED".into()).or_default() += 1;
            }
            stats.elapsed += took;
        }
        let mut m = Measured::from_stats(target, &stats, None, None);
        m.http_per_lookup =
            Some((self.http_requests() - http_before) as f64 / (samples + 2) as f64);
        Ok(m)
    }

    /// Warm-up, then the measured phase, against one gRPC target.
    async fn drive(
        &self,
        target: Target,
        clients: &[Client],
        workload: &Arc<Workload>,
        child: Option<&ChildServer>,
    ) -> Measured {
        let a = &self.args;
        let load = |until: Instant, requests: Option<u64>| async move {
            match a.rate {
                Some(rate) => run_open(clients, workload, rate, until, requests).await,
                None => run_closed(clients, workload, a.concurrency.max(1), until, requests).await,
            }
        };
        if !a.warmup.is_zero() {
            load(Instant::now() + a.warmup, None).await;
        }
        let cpu_before = child.and_then(|c| cpu_ticks(c.pid));
        let self_before = cpu_ticks(std::process::id());
        let http_before = self.http_requests();
        let until = Instant::now() + a.duration;
        let stats = load(until, a.requests).await;
        let cpu_after = child.and_then(|c| cpu_ticks(c.pid));
        let self_after = cpu_ticks(std::process::id());
        let lookups = (stats.ok + stats.errors.values().sum::<u64>()).max(1) as f64;
        let cpu = match (cpu_before, cpu_after) {
            (Some(b), Some(e)) => Some((e - b) as f64 / self.clk_tck * 1000.0 / lookups),
            _ => None,
        };
        let mut m = Measured::from_stats(target, &stats, cpu, child.and_then(|c| rss_kib(c.pid)));
        if let (Some(b), Some(e)) = (self_before, self_after) {
            m.generator_cpu_ms = Some((e - b) as f64 / self.clk_tck * 1000.0 / lookups);
        }
        if a.region == RegionKind::Mock {
            m.http_per_lookup = Some((self.http_requests() - http_before) as f64 / lookups);
        }
        m
    }

    /// HTTP requests the mock organisations (and the record locator) have answered so far.
    fn http_requests(&self) -> u64 {
        self.mock
            .organisations()
            .iter()
            .filter_map(|o| self.mock.stats(&o.code))
            .chain(self.mock.stats(LOCATOR))
            .map(|s| s.requests)
            .sum()
    }
}

// ---- the load --------------------------------------------------------------------------------

type Client = CareRecordServiceClient<Channel>;

async fn connect_clients(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Client>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        out.push(
            CareRecordServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        );
    }
    Ok(out)
}

/// Which patient each lookup asks for.
struct Workload {
    pool: Vec<Patient>,
    hot: Vec<Patient>,
    hit_ratio: f64,
    deadline_ms: u64,
    /// Misses ask for fresh data (`REQUIRE_FRESH`), so they miss even if a patient repeats.
    fresh: bool,
    next_miss: AtomicU64,
    next_any: AtomicU64,
}

impl Workload {
    fn new(
        pool: Vec<Patient>,
        hot: Vec<Patient>,
        hit_ratio: f64,
        deadline_ms: u64,
        fresh: bool,
    ) -> Self {
        Workload {
            pool,
            hot,
            hit_ratio,
            deadline_ms,
            fresh,
            next_miss: AtomicU64::new(0),
            next_any: AtomicU64::new(0),
        }
    }

    fn request(&self) -> tonic::Request<GetCareRecordRequest> {
        let n = self.next_any.fetch_add(1, Ordering::Relaxed);
        let hit =
            !self.hot.is_empty() && (self.pool.is_empty() || unit(n ^ 0x5EED) < self.hit_ratio);
        if hit {
            let p = &self.hot[(mix(n) % self.hot.len() as u64) as usize];
            lookup_request(p, false, self.deadline_ms)
        } else {
            let i = self.next_miss.fetch_add(1, Ordering::Relaxed) as usize % self.pool.len();
            lookup_request(&self.pool[i], self.fresh, self.deadline_ms)
        }
    }
}

fn lookup_request(
    p: &Patient,
    fresh: bool,
    deadline_ms: u64,
) -> tonic::Request<GetCareRecordRequest> {
    let mut r = tonic::Request::new(GetCareRecordRequest {
        nhs_number: p.nhs.as_digits(),
        requester: Some(Requester {
            user_id: "bench-user".into(),
            user_name: "Load Generator".into(),
            role_code: "R8000".into(),
            organisation_code: p.org.clone(),
            purpose: Purpose::DirectCare as i32,
            ..Requester::default()
        }),
        sections: Vec::new(),
        cache: if fresh {
            CacheDirective::RequireFresh
        } else {
            CacheDirective::AllowCached
        } as i32,
        via_brokers: Vec::new(),
    });
    r.set_timeout(Duration::from_millis(deadline_ms));
    r
}

fn source_request(p: &Patient, deadline_ms: u64) -> SourceRequest {
    SourceRequest {
        request_id: "bench".into(),
        nhs_number: p.nhs,
        sections: SectionSet::ALL,
        deadline: tokio::time::Instant::now() + Duration::from_millis(deadline_ms),
        requester: Requester {
            user_id: "bench-user".into(),
            role_code: "R8000".into(),
            organisation_code: p.org.clone(),
            ..Requester::default()
        },
        via_brokers: Vec::new(),
    }
}

/// What one measured phase saw.
#[derive(Default)]
struct Stats {
    /// Latency of every successful lookup, in microseconds.
    lat_us: Vec<u64>,
    ok: u64,
    /// Successful but `complete = false`.
    partial: u64,
    from_cache: u64,
    /// Failed lookups by gRPC code.
    errors: BTreeMap<String, u64>,
    /// Latency of failed lookups (how fast shedding is).
    err_lat_us: Vec<u64>,
    /// Encoded size of a sample of responses.
    bytes: u64,
    sized: u64,
    elapsed: Duration,
}

impl Stats {
    fn absorb(&mut self, other: Stats) {
        self.lat_us.extend(other.lat_us);
        self.ok += other.ok;
        self.partial += other.partial;
        self.from_cache += other.from_cache;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.err_lat_us.extend(other.err_lat_us);
        self.bytes += other.bytes;
        self.sized += other.sized;
    }

    fn record(&mut self, result: Result<GetCareRecordResponse, tonic::Status>, took: Duration) {
        let us = took.as_micros() as u64;
        match result {
            Ok(r) => {
                self.ok += 1;
                self.lat_us.push(us);
                if !r.complete {
                    self.partial += 1;
                }
                if r.from_cache {
                    self.from_cache += 1;
                }
                if self.ok % 16 == 1 {
                    self.bytes += r.encoded_len() as u64;
                    self.sized += 1;
                }
            }
            Err(status) => {
                *self
                    .errors
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1;
                self.err_lat_us.push(us);
            }
        }
    }
}

async fn one(client: &mut Client, workload: &Workload, stats: &mut Stats) {
    let request = workload.request();
    let started = Instant::now();
    let result = client
        .get_care_record(request)
        .await
        .map(|r| r.into_inner());
    stats.record(result, started.elapsed());
}

/// Closed loop: `concurrency` workers, each with one lookup in flight.
async fn run_closed(
    clients: &[Client],
    workload: &Arc<Workload>,
    concurrency: usize,
    until: Instant,
    requests: Option<u64>,
) -> Stats {
    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::with_capacity(concurrency);
    for w in 0..concurrency {
        let mut client = clients[w % clients.len()].clone();
        let workload = workload.clone();
        let issued = issued.clone();
        workers.push(tokio::spawn(async move {
            let mut stats = Stats::default();
            loop {
                if Instant::now() >= until {
                    break;
                }
                if let Some(max) = requests
                    && issued.fetch_add(1, Ordering::Relaxed) >= max
                {
                    break;
                }
                one(&mut client, &workload, &mut stats).await;
            }
            stats
        }));
    }
    let mut total = Stats::default();
    for w in workers {
        if let Ok(s) = w.await {
            total.absorb(s);
        }
    }
    total.elapsed = started.elapsed();
    total
}

/// Open loop: a lookup every 1/rate seconds, whatever is outstanding (up to a safety cap).
async fn run_open(
    clients: &[Client],
    workload: &Arc<Workload>,
    rate: f64,
    until: Instant,
    requests: Option<u64>,
) -> Stats {
    const MAX_OUTSTANDING: usize = 20_000;
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Stats>();
    let outstanding = Arc::new(AtomicU64::new(0));
    let mut total = Stats::default();
    let mut sent = 0u64;
    let mut next = tokio::time::Instant::now();
    loop {
        let now = Instant::now();
        if now >= until || requests.is_some_and(|max| sent >= max) {
            break;
        }
        // Catch up on every lookup that is due (timers tick in whole milliseconds).
        while tokio::time::Instant::now() >= next {
            next += interval;
            sent += 1;
            if outstanding.load(Ordering::Relaxed) as usize >= MAX_OUTSTANDING {
                *total
                    .errors
                    .entry("NotSent(generator cap)".into())
                    .or_default() += 1;
                continue;
            }
            outstanding.fetch_add(1, Ordering::Relaxed);
            let mut client = clients[(sent as usize) % clients.len()].clone();
            let workload = workload.clone();
            let tx = tx.clone();
            let outstanding = outstanding.clone();
            tokio::spawn(async move {
                let mut stats = Stats::default();
                one(&mut client, &workload, &mut stats).await;
                outstanding.fetch_sub(1, Ordering::Relaxed);
                let _ = tx.send(stats);
            });
        }
        tokio::time::sleep_until(next).await;
    }
    drop(tx);
    while let Some(s) = rx.recv().await {
        total.absorb(s);
    }
    total.elapsed = started.elapsed();
    total
}

// ---- figures ---------------------------------------------------------------------------------

/// One target's figures from one run.
#[derive(Clone, Debug, Default)]
struct Measured {
    target: Option<Target>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    partial: u64,
    from_cache: u64,
    per_s: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    /// p99 of failed lookups (e.g. how fast shedding answers).
    err_p99: Option<f64>,
    cpu_ms: Option<f64>,
    generator_cpu_ms: Option<f64>,
    /// HTTP requests the organisations answered per lookup.
    http_per_lookup: Option<f64>,
    rss_mib: Option<f64>,
    startup_ms: Option<f64>,
    resp_kib: Option<f64>,
}

impl Measured {
    fn from_stats(target: Target, s: &Stats, cpu_ms: Option<f64>, rss: Option<u64>) -> Measured {
        let mut lat = s.lat_us.clone();
        lat.sort_unstable();
        let mut err = s.err_lat_us.clone();
        err.sort_unstable();
        let secs = s.elapsed.as_secs_f64().max(1e-9);
        Measured {
            target: Some(target),
            ok: s.ok,
            errors: s.errors.clone(),
            partial: s.partial,
            from_cache: s.from_cache,
            per_s: s.ok as f64 / secs,
            p50: pct(&lat, 0.50),
            p90: pct(&lat, 0.90),
            p99: pct(&lat, 0.99),
            max: lat.last().map_or(0.0, |&v| v as f64 / 1000.0),
            err_p99: (!err.is_empty()).then(|| pct(&err, 0.99)),
            cpu_ms,
            generator_cpu_ms: None,
            http_per_lookup: None,
            rss_mib: rss.map(|k| k as f64 / 1024.0),
            startup_ms: None,
            resp_kib: (s.sized > 0).then(|| s.bytes as f64 / s.sized as f64 / 1024.0),
        }
    }

    fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "0".into();
        }
        self.errors
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn row(&self) -> String {
        let opt = |v: Option<f64>, digits: usize| match v {
            Some(v) => format!("{v:.digits$}"),
            None => "–".into(),
        };
        format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} |",
            label(self.target),
            self.ok,
            self.per_s,
            self.p50,
            self.p90,
            self.p99,
            self.max,
            self.errors_text(),
            self.partial,
            opt(self.cpu_ms, 3),
            opt(self.generator_cpu_ms, 3),
            opt(self.http_per_lookup, 1),
            opt(self.rss_mib, 1),
            opt(self.startup_ms, 0),
            opt(self.resp_kib, 1),
        )
    }

    /// The median of each figure across runs.
    fn median(runs: &[Measured]) -> Measured {
        let med = |f: &dyn Fn(&Measured) -> f64| median(runs.iter().map(f).collect());
        let med_opt = |f: &dyn Fn(&Measured) -> Option<f64>| {
            let v: Vec<f64> = runs.iter().filter_map(f).collect();
            (!v.is_empty()).then(|| median(v))
        };
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        for r in runs {
            for (k, v) in &r.errors {
                *errors.entry(k.clone()).or_default() += v;
            }
        }
        // Error counts: the median run's share.
        let n = runs.len().max(1) as u64;
        for v in errors.values_mut() {
            *v = (*v).div_ceil(n);
        }
        Measured {
            target: runs.first().and_then(|r| r.target),
            ok: med(&|r| r.ok as f64) as u64,
            errors,
            partial: med(&|r| r.partial as f64) as u64,
            from_cache: med(&|r| r.from_cache as f64) as u64,
            per_s: med(&|r| r.per_s),
            p50: med(&|r| r.p50),
            p90: med(&|r| r.p90),
            p99: med(&|r| r.p99),
            max: med(&|r| r.max),
            err_p99: med_opt(&|r| r.err_p99),
            cpu_ms: med_opt(&|r| r.cpu_ms),
            generator_cpu_ms: med_opt(&|r| r.generator_cpu_ms),
            http_per_lookup: med_opt(&|r| r.http_per_lookup),
            rss_mib: med_opt(&|r| r.rss_mib),
            startup_ms: med_opt(&|r| r.startup_ms),
            resp_kib: med_opt(&|r| r.resp_kib),
        }
    }
}

fn label(t: Option<Target>) -> &'static str {
    match t {
        Some(Target::Broker) => "broker",
        Some(Target::Slowest) => "slowest source alone (1 HTTP request)",
        Some(Target::Adapter) => "adapter alone, slowest source",
        Some(Target::Sequential) => "sequential fan-out (adapter)",
        Some(Target::Echo) => "tonic echo (same responses)",
        Some(Target::Minimal) => "minimal program",
        None => "?",
    }
}

/// Cache fill figures (memory).
#[derive(Clone, Debug)]
struct Fill {
    records: usize,
    ok: u64,
    seconds: f64,
    base_rss_kib: u64,
    rss_kib: u64,
    hwm_kib: u64,
    cache_entries: Option<f64>,
    cache_bytes: Option<f64>,
}

struct Report {
    smoke_failed: bool,
    medians: BTreeMap<Target, Measured>,
    fills: Vec<Fill>,
}

impl Report {
    fn new(all: BTreeMap<Target, Vec<Measured>>, fills: Vec<Fill>, args: &BenchArgs) -> Report {
        let medians: BTreeMap<Target, Measured> = all
            .iter()
            .map(|(t, runs)| (*t, Measured::median(runs)))
            .collect();
        let smoke_failed = args.smoke && medians.values().any(|m| m.ok == 0);
        Report {
            smoke_failed,
            medians,
            fills,
        }
    }

    fn print(&self, args: &BenchArgs) {
        let cmd: Vec<String> = std::env::args().collect();
        println!("\nCommand: `{}`", cmd.join(" "));
        println!(
            "Medians of {} run(s). Latency in ms over successful lookups; CPU in ms per lookup \
             (user+sys of the serving process / lookups answered); generator CPU is this \
             process (load generator + mock organisations).\n",
            args.runs.max(1)
        );
        println!(
            "| target | lookups | lookups/s | p50 | p90 | p99 | max | errors | partial | CPU ms/lookup | generator CPU ms/lookup | HTTP req/lookup | RSS MiB | startup ms | response KiB |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        let order = [
            Target::Broker,
            Target::Slowest,
            Target::Adapter,
            Target::Sequential,
            Target::Echo,
            Target::Minimal,
        ];
        for t in order {
            if let Some(m) = self.medians.get(&t) {
                println!("{}", m.row());
            }
        }
        let get = |t| self.medians.get(&t);
        println!();
        if let Some(b) = get(Target::Broker) {
            if let Some(e) = b.err_p99 {
                println!("- broker: failed lookups answered with p99 {e:.2} ms");
            }
            if args.region == RegionKind::Memory {
                println!(
                    "- broker overhead over the configured source delay ({} ms): p50 {:.2} ms, p99 {:.2} ms",
                    args.latency_ms,
                    b.p50 - args.latency_ms as f64,
                    b.p99 - args.latency_ms as f64
                );
            }
            if let Some(s) = get(Target::Slowest) {
                println!(
                    "- broker overhead over the slowest source alone: p50 {:.2} ms, p99 {:.2} ms",
                    b.p50 - s.p50,
                    b.p99 - s.p99
                );
            }
            if let Some(s) = get(Target::Adapter) {
                println!(
                    "- broker overhead over the adapter alone on the slowest source: p50 {:.2} ms, p99 {:.2} ms",
                    b.p50 - s.p50,
                    b.p99 - s.p99
                );
            }
            if let Some(s) = get(Target::Sequential) {
                println!(
                    "- sequential fan-out p50 / broker p50: {:.1}×",
                    s.p50 / b.p50.max(1e-9)
                );
            }
            if let Some(m) = get(Target::Minimal) {
                if let (Some(bc), Some(mc)) = (b.cpu_ms, m.cpu_ms) {
                    println!(
                        "- CPU per lookup, broker / minimal program: {:.3} / {:.3} ms = {:.2}×",
                        bc,
                        mc,
                        bc / mc.max(1e-9)
                    );
                }
                println!(
                    "- throughput, broker / minimal program: {:.0} / {:.0} lookups/s = {:.0}%",
                    b.per_s,
                    m.per_s,
                    100.0 * b.per_s / m.per_s.max(1e-9)
                );
            }
            if let Some(e) = get(Target::Echo) {
                println!(
                    "- throughput, broker / tonic echo: {:.0} / {:.0} lookups/s = {:.0}%",
                    b.per_s,
                    e.per_s,
                    100.0 * b.per_s / e.per_s.max(1e-9)
                );
            }
        }
        for f in &self.fills {
            let per = (f.rss_kib.saturating_sub(f.base_rss_kib)) as f64 * 1024.0
                / f.records.max(1) as f64;
            println!(
                "- cache fill: {} records ({} ok) in {:.1} s; RSS {:.1} → {:.1} MiB (peak {:.1}); \
                 {:.0} bytes of RSS per record; cache gauges: {} entries, {} weight bytes ({} per entry)",
                f.records,
                f.ok,
                f.seconds,
                f.base_rss_kib as f64 / 1024.0,
                f.rss_kib as f64 / 1024.0,
                f.hwm_kib as f64 / 1024.0,
                per,
                f.cache_entries.map_or("?".into(), |v| format!("{v:.0}")),
                f.cache_bytes.map_or("?".into(), |v| format!("{v:.0}")),
                match (f.cache_entries, f.cache_bytes) {
                    (Some(e), Some(b)) if e > 0.0 => format!("{:.0}", b / e),
                    _ => "?".into(),
                }
            );
        }
    }
}

fn pct(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    sorted_us[rank - 1] as f64 / 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

// ---- processes -------------------------------------------------------------------------------

/// A server under test, in its own process.
struct ChildServer {
    child: std::sync::Mutex<std::process::Child>,
    pid: u32,
    startup: Duration,
    metrics: Option<SocketAddr>,
    /// Run under a profiler: stopped gently so it can write its data.
    wrapped: bool,
}

impl ChildServer {
    async fn spawn(
        args: Vec<OsString>,
        addr: SocketAddr,
        workdir: &Path,
        tag: &str,
        log: &str,
    ) -> anyhow::Result<ChildServer> {
        let exe = std::env::current_exe().context("cannot find the carerecord-dev executable")?;
        let log_path = workdir.join(format!("{tag}.log"));
        let log_file = std::fs::File::create(&log_path)?;
        // Find the metrics address in the config, if any, for the cache gauges.
        let metrics = args
            .iter()
            .skip_while(|a| *a != "--config" && *a != "--internal-config")
            .nth(1)
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|text| metrics_listen(&text));
        // A profiler can wrap the broker: CARERECORD_BENCH_BROKER_WRAPPER="perf record -o f --".
        let wrapper: Vec<String> = if tag.starts_with("broker") {
            std::env::var("CARERECORD_BENCH_BROKER_WRAPPER")
                .map(|w| w.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = std::process::Command::new(program);
                c.args(rest).arg(exe);
                c
            }
            None => std::process::Command::new(exe),
        };
        command
            .args(&args)
            .env("RUST_LOG", log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log_file);
        let started = Instant::now();
        let mut child = command.spawn().context("cannot start the child process")?;
        let pid = child.id();
        let url = format!("http://{addr}");
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("{tag} exited at start ({status}):\n{log}");
            }
            if serving(&url).await {
                break;
            }
            if started.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                bail!("{tag} did not report SERVING within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let startup = started.elapsed();
        Ok(ChildServer {
            child: std::sync::Mutex::new(child),
            pid,
            startup,
            metrics,
            wrapped: !wrapper.is_empty(),
        })
    }

    fn stop(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if self.wrapped {
            // A profiler must see its workload end normally to write its data: SIGTERM the
            // wrapper's own children (the broker under `perf`) and the wrapper itself (valgrind
            // runs the broker in its own process), then wait.
            let pid = self.pid.to_string();
            let _ = std::process::Command::new("pkill")
                .args(["-TERM", "-P", &pid])
                .status();
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status();
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The cache gauges from the broker's Prometheus endpoint.
    async fn cache_gauges(&self) -> (Option<f64>, Option<f64>) {
        let Some(addr) = self.metrics else {
            return (None, None);
        };
        let Ok(text) = reqwest::get(format!("http://{addr}/metrics")).await else {
            return (None, None);
        };
        let Ok(text) = text.text().await else {
            return (None, None);
        };
        let gauge = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.parse::<f64>().ok())
        };
        (
            gauge(carerecord_broker::metrics::CACHE_ENTRIES),
            gauge(carerecord_broker::metrics::CACHE_BYTES),
        )
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `config` with `extra` (top-level tables) added where TOML keeps them top-level: before the
/// first array of tables (`[[sources]]`, `[[routing.locators]]`), else at the end.
fn with_extra_tables(config: &str, extra: &str) -> String {
    let at = if config.starts_with("[[") {
        Some(0)
    } else {
        config.find("\n[[").map(|i| i + 1)
    };
    match at {
        Some(i) => {
            let mut out = String::with_capacity(config.len() + extra.len() + 1);
            out.push_str(&config[..i]);
            out.push_str(extra.trim_start_matches('\n'));
            out.push('\n');
            out.push_str(&config[i..]);
            out
        }
        None => format!("{config}{extra}"),
    }
}

fn metrics_listen(text: &str) -> Option<SocketAddr> {
    // A TOML file, or the memory broker's JSON wrapping one.
    let toml_text = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v["config_toml"].as_str().map(str::to_owned))
        .unwrap_or_else(|| text.to_owned());
    let after = toml_text.split("[metrics]").nth(1)?;
    let line = after
        .lines()
        .find(|l| l.trim_start().starts_with("listen"))?;
    line.split('"').nth(1)?.parse().ok()
}

async fn serving(url: &str) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let Ok(endpoint) = Channel::from_shared(url.to_owned()) else {
        return false;
    };
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    let mut client = HealthClient::new(channel);
    matches!(
        client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await,
        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32
    )
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

fn hwm_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = number.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// A deterministic mix of bits (splitmix64).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A deterministic number in [0, 1).
fn unit(x: u64) -> f64 {
    (mix(x) >> 11) as f64 / (1u64 << 53) as f64
}

fn shuffle<T>(v: &mut [T], seed: u64) {
    for i in (1..v.len()).rev() {
        let j = (mix(seed ^ i as u64) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// GETs `url` and every `next` page, returning the bodies' total size.
async fn fetch_all_pages(http: &reqwest::Client, url: &str) -> anyhow::Result<usize> {
    let mut url = url.to_owned();
    let mut total = 0;
    for _ in 0..50 {
        let body = http
            .get(&url)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        total += body.len();
        let bundle: MinBundle = serde_json::from_slice(&body)?;
        match bundle.next() {
            Some(next) => url = next,
            None => return Ok(total),
        }
    }
    Ok(total)
}

// ---- the memory region -----------------------------------------------------------------------

/// Reads a few patients' records from every mock organisation through the real FHIR adapter:
/// realistic records for in-process sources.
async fn fetch_templates(
    region: &Region,
    mock_config: &str,
    orgs: usize,
) -> anyhow::Result<serde_json::Value> {
    const PER_ORG: usize = 16;
    let config = Config::parse(
        &mock_config.replace("@LISTEN@", "127.0.0.1:1"),
        Path::new("<bench>"),
    )?;
    let sources = registry::build(&config, 1)?;
    let mut out: Vec<serde_json::Value> = Vec::with_capacity(orgs);
    for (i, org) in region.organisations().iter().enumerate() {
        let mut records = Vec::new();
        for p in region
            .patients()
            .filter(|p| p.organisations.contains(&org.code))
        {
            if records.len() >= PER_ORG {
                break;
            }
            let patient = Patient {
                nhs: product_nhs(&p.nhs_number),
                org: p.gp.clone(),
            };
            if let Ok(SourceReply::Found(r)) = sources.sources[i]
                .source
                .fetch(&source_request(&patient, 5000))
                .await
            {
                records.push(serde_json::to_value(&r.record)?);
            }
        }
        if records.is_empty() {
            // Nobody in the sample is known here: borrow the first organisation's records.
            match out.first() {
                Some(first) => records = first["records"].as_array().cloned().unwrap_or_default(),
                None => bail!("organisation {} gave no template records", org.code),
            }
        }
        out.push(serde_json::json!({
            "id": org.code.to_ascii_lowercase(),
            "code": org.code,
            "name": org.name,
            "records": records,
        }));
    }
    Ok(serde_json::Value::Array(out))
}

/// An in-process source answering every patient from realistic template records after a fixed
/// delay. Unlike `InMemorySource` it holds no per-patient data, so a broker using it can be
/// filled with 100,000 distinct records without the sources inflating its RSS.
struct TemplateSource {
    info: SourceInfo,
    index: u64,
    records: Vec<CareRecord>,
    delay: Duration,
    /// The chance this source knows a patient (the first source knows everyone).
    known_fraction: f64,
}

impl Source for TemplateSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn fetch<'a, 'b, 'f>(
        &'a self,
        request: &'b SourceRequest,
    ) -> Pin<Box<dyn Future<Output = Result<SourceReply, SourceError>> + Send + 'f>>
    where
        'a: 'f,
        'b: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            let key = request
                .nhs_number
                .as_digits()
                .parse::<u64>()
                .unwrap_or_default();
            if self.index > 0 && unit(key ^ (self.index << 40)) >= self.known_fraction {
                return Ok(SourceReply::NotFound);
            }
            let template = &self.records[(mix(key) % self.records.len() as u64) as usize];
            let mut record = CareRecord {
                patient: template.patient.clone(),
                ..CareRecord::default()
            };
            for section in request.sections.iter() {
                if let Some(entries) = record.section_mut(section) {
                    entries.extend_from_slice(template.section(section));
                }
            }
            if let Some(p) = record.patient.as_mut() {
                p.nhs_number = request.nhs_number.as_digits();
            }
            Ok(SourceReply::Found(SourceRecord {
                record,
                ..SourceRecord::default()
            }))
        })
    }
}

#[derive(Deserialize)]
struct MemoryBrokerConfig {
    config_toml: String,
    latency_ms: u64,
    known_fraction: f64,
    templates: Vec<TemplateOrg>,
}

#[derive(Deserialize)]
struct TemplateOrg {
    id: String,
    code: String,
    name: String,
    records: Vec<CareRecord>,
}

async fn serve_memory_broker(path: &Path) -> anyhow::Result<()> {
    let c: MemoryBrokerConfig = serde_json::from_slice(&std::fs::read(path)?)?;
    let config = Config::parse(&c.config_toml, path)?;
    let timeout = Duration::from_millis(config.budget.default_source_timeout_ms);
    let sources = c
        .templates
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let source = TemplateSource {
                info: SourceInfo {
                    id: t.id,
                    organisation_code: t.code,
                    organisation_name: t.name,
                },
                index: i as u64,
                records: t.records,
                delay: Duration::from_millis(c.latency_ms),
                known_fraction: c.known_fraction,
            };
            registry::configured(&config, Arc::new(source), timeout, None)
        })
        .collect();
    // Built as `serve` builds a broker (policy, audit trail, limits), then given the in-process
    // sources in place of the configuration's (it has none).
    let broker = assemble(&config, Trail::Open)?
        .broker
        .context("the memory broker was not built")?;
    broker.replace_sources(SourceSet::new(sources, 1));
    let broker = Arc::new(broker);
    if let Some(listen) = config.metrics.listen {
        carerecord_broker::cli::serve::start_ops(listen)
            .await?
            .serving(broker.clone());
    }
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    server::run(
        listener,
        broker,
        Transport::plaintext(),
        std::future::pending::<()>(),
    )
    .await?;
    Ok(())
}

// ---- the echo reference ----------------------------------------------------------------------

/// Answers every lookup with a pre-built response (the broker's own response for that patient):
/// what tonic alone costs to serve that payload.
struct Echo {
    responses: HashMap<String, GetCareRecordResponse>,
    fallback: GetCareRecordResponse,
}

type EventStream =
    Pin<Box<dyn futures::Stream<Item = Result<CareRecordEvent, tonic::Status>> + Send>>;
type ChunkStream = Pin<
    Box<dyn futures::Stream<Item = Result<carerecord_proto::DocumentChunk, tonic::Status>> + Send>,
>;

/// The references serve lookups only.
fn no_documents() -> tonic::Status {
    tonic::Status::unimplemented("the bench references serve no documents")
}

#[tonic::async_trait]
impl CareRecordService for Echo {
    async fn get_care_record(
        &self,
        request: tonic::Request<GetCareRecordRequest>,
    ) -> Result<tonic::Response<GetCareRecordResponse>, tonic::Status> {
        let nhs = &request.get_ref().nhs_number;
        let response = self.responses.get(nhs).unwrap_or(&self.fallback).clone();
        Ok(tonic::Response::new(response))
    }

    type GetDocumentStream = ChunkStream;

    async fn get_document(
        &self,
        _request: tonic::Request<carerecord_proto::GetDocumentRequest>,
    ) -> Result<tonic::Response<ChunkStream>, tonic::Status> {
        Err(no_documents())
    }

    type StreamCareRecordStream = EventStream;

    async fn stream_care_record(
        &self,
        _request: tonic::Request<GetCareRecordRequest>,
    ) -> Result<tonic::Response<EventStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the echo reference is unary only",
        ))
    }
}

async fn serve_grpc<S>(
    service: CareRecordServiceServer<S>,
    listen: Option<SocketAddr>,
) -> anyhow::Result<()>
where
    S: CareRecordService,
{
    let listen = listen.context("internal roles need --internal-listen")?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(
            service
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        // `Server::tcp_nodelay` does not apply to a listener we pass in: set it on the incoming
        // sockets, or every response waits out the client's delayed ACK (Nagle).
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        )
        .await?;
    Ok(())
}

async fn serve_echo(path: &Path, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let bytes = std::fs::read(path)?;
    let mut buf = &bytes[..];
    let mut responses = HashMap::new();
    let mut fallback = None;
    while !buf.is_empty() {
        let r = GetCareRecordResponse::decode_length_delimited(&mut buf)?;
        let nhs = r
            .record
            .as_ref()
            .and_then(|c| c.patient.as_ref())
            .map(|p| p.nhs_number.clone())
            .unwrap_or_default();
        fallback.get_or_insert_with(|| r.clone());
        responses.insert(nhs, r);
    }
    let echo = Echo {
        responses,
        fallback: fallback.unwrap_or_default(),
    };
    serve_grpc(CareRecordServiceServer::new(echo), listen).await
}

// ---- the minimal program ---------------------------------------------------------------------

/// The CPU floor: one pooled reqwest request per organisation (`$everything?_count=100` where the
/// patient is known, told the server's patient id; a patient search where not), serde parsing of
/// the bodies, a trivial merge (dedup by code, provenance union, most recent first) and one
/// tonic response.
struct Minimal {
    http: reqwest::Client,
    orgs: Vec<MinimalOrg>,
    /// NHS number → the patient's id at each organisation (in `orgs` order), if known there.
    patients: HashMap<String, Vec<Option<String>>>,
}

#[derive(Deserialize)]
struct MinimalOrg {
    code: String,
    name: String,
    base_url: String,
}

#[derive(Deserialize)]
struct MinimalConfig {
    orgs: Vec<MinimalOrg>,
    patients: HashMap<String, Vec<Option<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MinBundle {
    entry: Vec<MinEntry>,
    link: Vec<MinLink>,
}

impl MinBundle {
    fn next(&self) -> Option<String> {
        self.link
            .iter()
            .find(|l| l.relation == "next")
            .map(|l| l.url.clone())
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MinLink {
    relation: String,
    url: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MinEntry {
    resource: MinResource,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct MinResource {
    resource_type: String,
    id: String,
    meta: MinMeta,
    status: String,
    code: Option<MinConcept>,
    medication_codeable_concept: Option<MinConcept>,
    effective_date_time: String,
    onset_date_time: String,
    recorded_date: String,
    authored_on: String,
    date: String,
    start: String,
    issued: String,
    description: String,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct MinMeta {
    last_updated: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MinConcept {
    coding: Vec<MinCoding>,
    text: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MinCoding {
    system: String,
    code: String,
    display: String,
}

fn min_section(resource_type: &str) -> Option<Section> {
    Some(match resource_type {
        "Condition" => Section::Conditions,
        "MedicationStatement" | "MedicationRequest" => Section::Medications,
        "AllergyIntolerance" => Section::Allergies,
        "Observation" | "DiagnosticReport" => Section::TestResults,
        "CarePlan" => Section::CarePlans,
        "DocumentReference" => Section::Documents,
        "Encounter" => Section::Encounters,
        "Appointment" => Section::Appointments,
        _ => return None,
    })
}

impl Minimal {
    async fn fetch_org(&self, i: usize, nhs: &str, id: Option<&str>) -> (Vec<MinEntry>, bool) {
        let org = &self.orgs[i];
        let mut url = match id {
            Some(id) => format!("{}/Patient/{id}/$everything?_count=100", org.base_url),
            None => format!(
                "{}/Patient?identifier={NHS_NUMBER_SYSTEM}%7C{nhs}&_count=100",
                org.base_url
            ),
        };
        let mut entries = Vec::new();
        for _ in 0..50 {
            let body = match self.http.get(&url).send().await {
                Ok(r) => match r.bytes().await {
                    Ok(b) => b,
                    Err(_) => return (entries, false),
                },
                Err(_) => return (entries, false),
            };
            let Ok(mut bundle) = serde_json::from_slice::<MinBundle>(&body) else {
                return (entries, false);
            };
            let next = bundle.next();
            entries.append(&mut bundle.entry);
            match next {
                Some(n) => url = n,
                None => break,
            }
        }
        (entries, true)
    }
}

#[tonic::async_trait]
impl CareRecordService for Minimal {
    async fn get_care_record(
        &self,
        request: tonic::Request<GetCareRecordRequest>,
    ) -> Result<tonic::Response<GetCareRecordResponse>, tonic::Status> {
        let nhs = request.into_inner().nhs_number;
        let ids = self.patients.get(&nhs);
        let answers = futures::future::join_all((0..self.orgs.len()).map(|i| {
            let id = ids.and_then(|ids| ids.get(i)).and_then(|id| id.as_deref());
            self.fetch_org(i, &nhs, id)
        }))
        .await;
        let mut record = CareRecord::default();
        let mut index: HashMap<(i32, String), usize> = HashMap::new();
        let mut sources = Vec::with_capacity(self.orgs.len());
        let mut complete = true;
        for (i, (entries, ok)) in answers.into_iter().enumerate() {
            let org = &self.orgs[i];
            complete &= ok;
            let mut count = 0u32;
            for e in entries {
                let r = e.resource;
                if r.resource_type == "Patient" && record.patient.is_none() {
                    record.patient = Some(carerecord_proto::Patient {
                        nhs_number: nhs.clone(),
                        ..Default::default()
                    });
                }
                let Some(section) = min_section(&r.resource_type) else {
                    continue;
                };
                count += 1;
                let concept = r.code.or(r.medication_codeable_concept).unwrap_or_default();
                let coding = concept.coding.into_iter().next().unwrap_or_default();
                let provenance = Provenance {
                    source_id: org.code.to_ascii_lowercase(),
                    organisation_code: org.code.clone(),
                    organisation_name: org.name.clone(),
                    source_entry_id: r.id.clone(),
                    last_updated: r.meta.last_updated,
                    ..Provenance::default()
                };
                let key = (
                    section as i32,
                    if coding.code.is_empty() {
                        r.id.clone()
                    } else {
                        coding.code.clone()
                    },
                );
                let Some(slot) = record.section_mut(section) else {
                    continue;
                };
                if let Some(&at) = index.get(&key) {
                    slot[at].provenance.push(provenance);
                    continue;
                }
                let effective = [
                    r.effective_date_time,
                    r.onset_date_time,
                    r.start,
                    r.date,
                    r.authored_on,
                    r.issued,
                ]
                .into_iter()
                .find(|s| !s.is_empty())
                .unwrap_or_default();
                let summary = if !coding.display.is_empty() {
                    coding.display.clone()
                } else if !concept.text.is_empty() {
                    concept.text
                } else {
                    r.description
                };
                index.insert(key, slot.len());
                slot.push(Entry {
                    concept: Some(Coding {
                        system: coding.system,
                        code: coding.code,
                        display: coding.display,
                    }),
                    summary,
                    status: r.status,
                    effective,
                    recorded: r.recorded_date,
                    provenance: vec![provenance],
                    ..Entry::default()
                });
            }
            sources.push(SourceStatus {
                source_id: org.code.to_ascii_lowercase(),
                organisation_code: org.code.clone(),
                organisation_name: org.name.clone(),
                outcome: if !ok {
                    SourceOutcome::Error
                } else if count > 0 {
                    SourceOutcome::Ok
                } else {
                    SourceOutcome::NotFound
                } as i32,
                entries: count,
                ..SourceStatus::default()
            });
        }
        for section in Section::ALL {
            if let Some(slot) = record.section_mut(section) {
                slot.sort_by(|a, b| b.effective.cmp(&a.effective));
            }
        }
        Ok(tonic::Response::new(GetCareRecordResponse {
            request_id: String::new(),
            record: Some(record),
            sources,
            complete,
            ..GetCareRecordResponse::default()
        }))
    }

    type GetDocumentStream = ChunkStream;

    async fn get_document(
        &self,
        _request: tonic::Request<carerecord_proto::GetDocumentRequest>,
    ) -> Result<tonic::Response<ChunkStream>, tonic::Status> {
        Err(no_documents())
    }

    type StreamCareRecordStream = EventStream;

    async fn stream_care_record(
        &self,
        _request: tonic::Request<GetCareRecordRequest>,
    ) -> Result<tonic::Response<EventStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the minimal program is unary only",
        ))
    }
}

async fn serve_minimal(path: &Path, listen: Option<SocketAddr>) -> anyhow::Result<()> {
    let c: MinimalConfig = serde_json::from_slice(&std::fs::read(path)?)?;
    let http = reqwest::Client::builder()
        .build()
        .context("cannot build the HTTP client")?;
    let minimal = Minimal {
        http,
        orgs: c.orgs,
        patients: c.patients,
    };
    serve_grpc(CareRecordServiceServer::new(minimal), listen).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("3h").is_err());
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(pct(&v, 0.5), 50.0);
        assert_eq!(pct(&v, 0.99), 99.0);
        assert_eq!(pct(&v, 1.0), 100.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }

    #[tokio::test]
    async fn extra_tables_stay_top_level_in_a_routed_config() {
        let region = Arc::new(Region::generate(&RegionSpec {
            patients: 50,
            organisations: 5,
            ..RegionSpec::default()
        }));
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mock = RegionServer::start_shared(region, ip, ServerOptions::default())
            .await
            .unwrap();
        let dir = std::env::temp_dir().join(format!("bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let directory = dir.join("directory.csv");
        mock.write_directory(&directory).unwrap();
        let extra = "\n[budget]\nmax_lookup_ms = 5000\n\n[metrics]\nlisten = \"127.0.0.1:9100\"\n";
        for base in [
            mock.broker_config_toml_routed("127.0.0.1:1", &directory),
            mock.broker_config_toml("127.0.0.1:1"),
        ] {
            let text = with_extra_tables(&base, extra);
            let config = Config::parse(&text, Path::new("<test>")).unwrap();
            assert_eq!(config.budget.max_lookup_ms, 5000, "{text}");
            assert_eq!(
                metrics_listen(&text),
                Some("127.0.0.1:9100".parse().unwrap())
            );
            let sources = registry::build(&config, 1).unwrap();
            assert_eq!(sources.sources.len(), 5);
        }
        mock.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_metrics_address_is_found_in_a_config() {
        let text = "[server]\nlisten = \"127.0.0.1:1\"\n\n[metrics]\nlisten = \"127.0.0.1:9100\"\n";
        assert_eq!(
            metrics_listen(text),
            Some("127.0.0.1:9100".parse().unwrap())
        );
    }
}
