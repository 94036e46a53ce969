//! `carerecord-dev`: the development tools that ship beside the product, not in it — the demo
//! (a synthetic region of mock organisations and a broker) and the load generator. The product
//! binary, `carerecord`, depends on neither the mock region nor this crate.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The same allocator as `carerecord`: the bench runs the broker as `carerecord-dev serve`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod demo;

#[derive(Parser)]
#[command(
    name = "carerecord-dev",
    version,
    about = "carerecord development tools: the demo and the load generator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a synthetic region (mock organisations over real HTTP) and a broker, look up a
    /// patient known to several organisations, and print the record.
    Demo(demo::DemoArgs),
    /// Load-generate against a broker (and reference programs) and print a Markdown table.
    Bench(Box<bench::BenchArgs>),
    /// `carerecord serve`, for the load generator's child process: the product's own serving
    /// path, so a benchmark never measures a stale `carerecord` binary.
    #[command(hide = true)]
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve { .. } => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Bench(args) => bench::run(*args).await,
            Command::Serve { config } => carerecord_broker::cli::serve::run(&config).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A FHIR query mode from the command line (`search`, `everything`, `batch`, `chained`): the adapter's own
/// enum, spelled as the broker's TOML spells it.
fn parse_query_mode(s: &str) -> Result<carerecord_adapters::fhir::QueryMode, String> {
    use serde::Deserialize;
    use serde::de::IntoDeserializer;
    let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> = s.into_deserializer();
    carerecord_adapters::fhir::QueryMode::deserialize(de)
        .map_err(|_| format!("{s:?}: expected search, everything, batch or chained"))
}

/// The mock region's spelling of a query mode (it writes the broker configuration).
fn mock_mode(mode: carerecord_adapters::fhir::QueryMode) -> carerecord_mock_sources::FhirMode {
    use carerecord_adapters::fhir::QueryMode;
    use carerecord_mock_sources::FhirMode;
    match mode {
        QueryMode::Search => FhirMode::Search,
        QueryMode::Everything => FhirMode::Everything,
        QueryMode::Batch => FhirMode::Batch,
        QueryMode::Chained => FhirMode::Chained,
    }
}
