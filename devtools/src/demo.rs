//! `carerecord-dev demo`: the main job on an embedded default. Starts a synthetic region (mock
//! organisations serving FHIR R4 over real HTTP on loopback), a broker configured for it, and
//! looks up a patient known to several organisations over real gRPC.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use carerecord_adapters::fhir::QueryMode;
use carerecord_broker::assemble::{Trail, assemble};
use carerecord_broker::cli::lookup::{LookupArgs, lookup_text};
use carerecord_broker::cli::serve::shutdown_signal;
use carerecord_broker::config::Config;
use carerecord_broker::server::{self, Transport};
use carerecord_mock_sources::{Region, RegionServer, RegionSpec};
use clap::Args;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the region and the broker running after the lookup, for `carerecord lookup`.
    #[arg(long)]
    pub keep_running: bool,
    /// Broker listen address when kept running (otherwise a free loopback port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Seed of the synthetic population.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Number of synthetic patients.
    #[arg(long, default_value_t = 10_000)]
    pub patients: usize,
    /// Number of organisations.
    #[arg(long, default_value_t = 10)]
    pub organisations: usize,
    /// How the broker reads each organisation: search, everything (the default: with the
    /// patient id cache one round trip for a patient looked up before, and the least CPU; see
    /// BENCHMARKS.md section 7), batch or chained.
    #[arg(long, value_parser = crate::parse_query_mode, default_value = "everything")]
    pub mode: QueryMode,
    /// Look up this patient instead of one known to several organisations.
    #[arg(long)]
    pub nhs_number: Option<String>,
    /// Print the lookup as JSON.
    #[arg(long)]
    pub json: bool,
    /// Stream the lookup: organisations as they answer.
    #[arg(long)]
    pub stream: bool,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let spec = RegionSpec {
        seed: args.seed,
        patients: args.patients,
        organisations: args.organisations,
        ..RegionSpec::default()
    };
    let region = Arc::new(Region::generate(&spec));
    let mock = RegionServer::start(region.clone(), IpAddr::V4(Ipv4Addr::LOCALHOST))
        .await
        .context("cannot start the mock organisations")?;

    let bind = if args.keep_running {
        args.listen
    } else {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    };
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("cannot listen on {bind}"))?;
    let addr = listener.local_addr()?;
    let mode = crate::mock_mode(args.mode);
    let text = mock.broker_config_toml_with(&addr.to_string(), |_| mode);
    let mut config = Config::parse(&text, Path::new("<mock-sources region>"))?;
    config.audit.file = std::env::temp_dir().join(format!(
        "carerecord-demo-audit-{}.jsonl",
        std::process::id()
    ));
    let broker = Arc::new(
        assemble(&config, Trail::Open)?
            .broker
            .context("the demo broker was not built")?,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server::run(
        listener,
        broker,
        Transport::plaintext(),
        async {
            let _ = stopped.await;
        },
    ));

    let patient = match &args.nhs_number {
        Some(n) => {
            let nhs = carerecord_adapters::NhsNumber::parse(n)?;
            region
                .patient(&nhs)
                .with_context(|| format!("{} is not in the synthetic population", nhs.grouped()))?
        }
        None => region
            .patients_known_to_at_least(3)
            .next()
            .context("the synthetic region has no patient known to three organisations")?,
    };

    let url = format!("http://{addr}");
    if !args.json {
        println!(
            "Synthetic region: {} organisations serving FHIR R4 on loopback, {} patients (seed {}).",
            mock.organisations().len(),
            region.patient_count(),
            args.seed
        );
        for org in mock.organisations() {
            println!("  {:<8} {:<45} {}", org.code, org.name, org.base_url);
        }
        println!(
            "Broker on {url}. Looking up {} as a clinician (R8000) at the registered GP practice {}:\n",
            patient.nhs_number.grouped(),
            patient.gp
        );
    }
    let mut lookup = LookupArgs::for_patient(&patient.nhs_number.as_digits(), &url);
    lookup.org = patient.gp.clone();
    lookup.json = args.json;
    lookup.stream = args.stream;
    print!("{}", lookup_text(&lookup).await?);

    if args.keep_running {
        println!(
            "\nRunning until Ctrl-C. Try:\n  cargo run --bin carerecord -- lookup {} --broker {url} --org {}\n  cargo run --bin mock-sources -- patients --limit 10   # more NHS numbers\nAdmin (faults, latency): {}",
            patient.nhs_number.grouped(),
            patient.gp,
            mock.admin_url()
        );
        shutdown_signal().await;
    }
    let _ = stop.send(());
    let _ = serving.await;
    mock.shutdown().await;
    Ok(())
}
