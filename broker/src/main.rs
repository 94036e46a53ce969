//! `carerecord`: run the broker, check its configuration, look a patient up, or read the audit
//! trail. The demo and the load generator are development tools: `carerecord-dev`.

use std::path::PathBuf;
use std::process::ExitCode;

use carerecord_broker::cli;
use carerecord_broker::config::Config;
use carerecord_broker::telemetry::Telemetry;
use clap::{Parser, Subcommand, ValueEnum};

/// mimalloc, not glibc's malloc: a lookup allocates and frees many small strings, and glibc spent
/// a fifth of a cache hit's CPU in malloc/free; measured in BENCHMARKS.md §11.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "carerecord", version, about = "Federated care record broker")]
struct Cli {
    /// Log format for the broker's own logs.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CARERECORD_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker with a configuration file.
    Serve {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and report the first problem with its line.
    CheckConfig {
        /// The TOML configuration file.
        file: PathBuf,
    },
    /// Look a patient up through a running broker and print the record.
    Lookup(cli::lookup::LookupArgs),
    /// Read the audit trail: verify it, list who looked at a patient's record; ship trails to
    /// the region's store and report usage from it.
    #[command(subcommand)]
    Audit(cli::audit::AuditCommand),
    /// Make a token key and sign requester tokens for the FHIR face (setup and testing).
    #[command(subcommand)]
    Token(cli::token::TokenCommand),
    /// Check a live source before go-live: a source-protocol server (--grpc) or a FHIR R4
    /// server (--fhir), through the adapter conformance kit. Exits non-zero on any failure.
    Conformance(cli::conformance::ConformanceArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve { .. } => "info",
        _ => "warn",
    };
    // One process-wide rustls provider (ring), before anything builds a client (the trace
    // exporter, any source): an adapter that builds an HTTP client without
    // `carerecord_adapters::http::client_builder` would panic without it.
    carerecord_adapters::http::install_default_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `serve` reads its configuration here, once: traces are exported only when it asks, and the
    // exporter must be in the subscriber before anything logs.
    let loaded = match &cli.command {
        Command::Serve { config } => match Config::read(config) {
            Ok(loaded) => Some(loaded),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let telemetry = loaded
        .as_ref()
        .map(|(config, _)| Telemetry::start(&config.telemetry, runtime.handle().clone()))
        .transpose();
    let (telemetry, tracer) = match telemetry {
        Ok(Some(Some((telemetry, tracer)))) => (Some(telemetry), Some(tracer)),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
        Ok(_) => (None, None),
    };
    init_logging(cli.log_format, default_level, tracer);
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => match loaded {
                Some((loaded, text)) => cli::serve::run_loaded(&config, loaded, text).await,
                None => cli::serve::run(&config).await,
            },
            Command::CheckConfig { file } => cli::serve::check(&file),
            Command::Lookup(args) => cli::lookup::run(args).await,
            Command::Audit(command) => cli::audit::run(command).await,
            Command::Token(command) => cli::token::run(command),
            Command::Conformance(args) => cli::conformance::run(args).await,
        }
    });
    if let Some(telemetry) = telemetry {
        // The batch exporter calls back into the runtime: flush before it is dropped.
        let _ = runtime
            .block_on(async { tokio::task::spawn_blocking(move || telemetry.shutdown()).await });
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(
    format: LogFormat,
    default_level: &str,
    tracer: Option<opentelemetry_sdk::trace::Tracer>,
) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    type Filtered = tracing_subscriber::layer::Layered<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let mut layers: Vec<Box<dyn tracing_subscriber::Layer<Filtered> + Send + Sync>> =
        vec![match format {
            LogFormat::Text => fmt.boxed(),
            LogFormat::Json => fmt.json().boxed(),
        }];
    if let Some(tracer) = tracer {
        layers.push(tracing_opentelemetry::layer().with_tracer(tracer).boxed());
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .init();
}
