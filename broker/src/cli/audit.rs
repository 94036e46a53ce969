//! `carerecord audit`: check a trail's chain, list who looked at a patient's record (the
//! patient's right to know), and — for a region of many brokers — ship every instance's trail
//! into PostgreSQL and ask the same questions of all of them there, plus the board's usage report.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::audit::{self, AuditEvent, Verified};
use crate::audit_store::report::{self, Period};
use crate::audit_store::{AuditStore, schema, ship, verify};
use crate::config::Config;
use anyhow::Context;
use carerecord_adapters::NhsNumber;
use clap::{Args, Subcommand, ValueEnum};

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify the hash chain of a trail file, or of every instance in the store (--database);
    /// report the first broken or missing link.
    Verify {
        /// The audit trail (JSON Lines); omit with --database.
        file: Option<PathBuf>,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// List every access to one patient's record, oldest first: from a trail file, or from the
    /// store across every broker instance (--database).
    Patient {
        /// The patient's NHS number.
        nhs_number: String,
        /// The audit trail (JSON Lines); ignored with --database.
        #[arg(long, default_value = "carerecord-audit.jsonl")]
        file: PathBuf,
        #[command(flatten)]
        database: DatabaseArgs,
        /// Print JSON Lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Load broker trails into the store: incrementally, each instance's chain verified on the
    /// way in, exactly once. With --follow, keep shipping (a sidecar beside each broker).
    Ship(ShipArgs),
    /// Usage for a region's board: views per organisation, role and month, emergency accesses,
    /// unique patients and staff, from the store.
    Report {
        #[command(flatten)]
        database: DatabaseArgs,
        /// Events at or after this time (a date such as 2026-11-01, or RFC 3339).
        #[arg(long)]
        from: Option<String>,
        /// Events before this time (a date such as 2026-12-01, or RFC 3339).
        #[arg(long)]
        to: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Print the store's schema (what `ship` creates when missing), for a DBA to create it
    /// ahead and grant the shipper only what it needs.
    Schema,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Where the region's audit store is.
#[derive(Args, Debug)]
pub struct DatabaseArgs {
    /// The audit store: a PostgreSQL URL (postgresql://user:password@127.0.0.1:5432/audit) or
    /// key=value string. Never printed.
    #[arg(
        long = "database",
        env = "CARERECORD_AUDIT_DATABASE",
        hide_env_values = true
    )]
    url: Option<String>,
    /// Allow a database that is not on this machine without TLS (an isolated network only: the
    /// store holds NHS numbers and staff names).
    #[arg(long)]
    allow_plaintext_on_network: bool,
}

impl DatabaseArgs {
    async fn connect(&self) -> anyhow::Result<AuditStore> {
        let url = self
            .url
            .as_deref()
            .context("no audit store: pass --database or set CARERECORD_AUDIT_DATABASE")?;
        Ok(AuditStore::connect(url, self.allow_plaintext_on_network).await?)
    }
}

#[derive(Args, Debug)]
pub struct ShipArgs {
    /// A trail file, or a directory whose `*.jsonl` files are trails (repeatable).
    #[arg(long = "trail", value_name = "PATH")]
    trails: Vec<PathBuf>,
    /// A broker configuration: ship the trail its [audit] section names (`{instance}` filled in
    /// as `serve` does, so a sidecar given the broker's config ships that broker's trail).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(flatten)]
    database: DatabaseArgs,
    /// Keep shipping, a pass every --interval-secs, until SIGTERM or Ctrl-C (then one last pass).
    #[arg(long)]
    follow: bool,
    /// Seconds between passes with --follow.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    interval_secs: u64,
}

pub async fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify { file, database } => match (file, database.url.is_some()) {
            (Some(file), _) => verify_file(&file),
            (None, true) => verify_store(&database).await,
            (None, false) => {
                anyhow::bail!("name a trail file, or the store with --database")
            }
        },
        AuditCommand::Patient {
            nhs_number,
            file,
            database,
            json,
        } => {
            let nhs = NhsNumber::parse(&nhs_number).context("nhs_number")?;
            let events = if database.url.is_some() {
                let store = database.connect().await?;
                store
                    .patient(&nhs.as_digits())
                    .await?
                    .into_iter()
                    .map(|s| (Some(s.instance), s.seq, s.event))
                    .collect()
            } else {
                audit::events_for_patient(&file, &nhs.as_digits())?
                    .into_iter()
                    .map(|e| (None, 0, e))
                    .collect::<Vec<_>>()
            };
            for (instance, seq, e) in &events {
                if json {
                    match instance {
                        Some(instance) => println!(
                            "{}",
                            serde_json::to_string(&crate::audit_store::StoredEvent {
                                instance: instance.clone(),
                                seq: *seq,
                                event: e.clone(),
                            })?
                        ),
                        None => println!("{}", serde_json::to_string(e)?),
                    }
                } else {
                    println!("{}", access_line(e, instance.as_deref()));
                }
            }
            if !json {
                println!("{} access events for {}", events.len(), nhs.grouped());
            }
            Ok(())
        }
        AuditCommand::Ship(args) => ship_trails(args).await,
        AuditCommand::Schema => {
            print!("{}", schema::SCHEMA.trim_start());
            Ok(())
        }
        AuditCommand::Report {
            database,
            from,
            to,
            format,
        } => {
            let store = database.connect().await?;
            let report = report::report(&store, &Period { from, to }).await?;
            match format {
                Format::Table => print!("{}", report.table()),
                Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(())
        }
    }
}

fn verify_file(file: &Path) -> anyhow::Result<()> {
    match audit::verify(file)? {
        Verified::Intact {
            events, instance, ..
        } => {
            let of = instance
                .map(|i| format!(" of instance {i}"))
                .unwrap_or_default();
            println!("{}: intact, {events} events{of}", file.display());
            Ok(())
        }
        Verified::Broken { line, why } => {
            anyhow::bail!("{}: broken at line {line}: {why}", file.display())
        }
    }
}

async fn verify_store(database: &DatabaseArgs) -> anyhow::Result<()> {
    let store = database.connect().await?;
    let checks = verify::verify(&store).await?;
    let mut broken = 0;
    for c in &checks {
        match &c.broken {
            None => println!("instance {}: intact, {} events", c.instance, c.events),
            Some((seq, why)) => {
                broken += 1;
                println!("instance {}: broken at event {seq}: {why}", c.instance);
            }
        }
    }
    if broken > 0 {
        anyhow::bail!(
            "{broken} of {} instances' chains in the store are broken",
            checks.len()
        );
    }
    println!("{} instances, every chain intact", checks.len());
    Ok(())
}

/// One access as a privacy officer (or the patient) reads it.
fn access_line(e: &AuditEvent, instance: Option<&str>) -> String {
    let why = if e.emergency_reason.is_empty() {
        e.decision.clone()
    } else {
        format!("{} — \"{}\"", e.decision, e.emergency_reason)
    };
    let on = instance.map(|i| format!(" on {i}")).unwrap_or_default();
    format!(
        "{}  {:<11} {} ({}) role {} at {} via {}{on}: {}",
        e.time,
        e.kind,
        if e.user_name.is_empty() {
            &e.user_id
        } else {
            &e.user_name
        },
        e.user_id,
        e.role,
        e.organisation,
        e.system,
        why
    )
}

/// The trail files named by `--trail` (directories expanded) and `--config`.
fn trail_files(args: &ShipArgs) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in &args.trails {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "jsonl") && p.is_file())
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    if let Some(config) = &args.config {
        files.push(Config::load(config)?.audit.file);
    }
    if files.is_empty() && !args.follow {
        anyhow::bail!("nothing to ship: name trails with --trail, or a broker's --config");
    }
    Ok(files)
}

/// One pass, or (with --follow) a pass every interval until told to stop.
async fn ship_trails(args: ShipArgs) -> anyhow::Result<()> {
    let mut store: Option<AuditStore> = None;
    let mut stop = std::pin::pin!(shutdown()?);
    let mut last_pass = false;
    loop {
        let result = ship_pass(&args, &mut store).await;
        if !args.follow {
            return result;
        }
        if let Err(e) = result {
            // A sidecar keeps trying: the broker's trail is safe on disk meanwhile.
            eprintln!("audit ship: {e:#}");
            tracing::error!(error = %format!("{e:#}"), "audit ship pass failed");
        }
        if last_pass {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(args.interval_secs)) => {}
            () = &mut stop => last_pass = true,
        }
    }
}

/// Ships every trail once; a trail refused does not stop the others.
async fn ship_pass(args: &ShipArgs, store: &mut Option<AuditStore>) -> anyhow::Result<()> {
    if store.as_ref().is_none_or(AuditStore::is_closed) {
        let mut fresh = args.database.connect().await?;
        schema::create(&mut fresh)
            .await
            .context("creating the audit store's tables")?;
        *store = Some(fresh);
    }
    let Some(store) = store.as_mut() else {
        anyhow::bail!("no audit store connection");
    };
    let mut refused = 0usize;
    let files = trail_files(args)?;
    for file in &files {
        if args.follow && !file.exists() {
            continue; // the broker has not written its first event yet
        }
        match ship::ship(store, file).await {
            Ok(shipped) => {
                if shipped.events > 0 || !args.follow {
                    println!(
                        "{}: instance {}, {} new events shipped, store head at event {}",
                        file.display(),
                        shipped.instance.as_deref().unwrap_or("(none yet)"),
                        shipped.events,
                        shipped.head
                    );
                }
            }
            Err(e) => {
                refused += 1;
                eprintln!("error: {e}");
            }
        }
    }
    if refused > 0 {
        anyhow::bail!("{refused} of {} trails not shipped", files.len());
    }
    Ok(())
}

/// Resolves on SIGTERM (the kubelet stopping the pod) or Ctrl-C. The handlers are installed
/// before the first pass, so a signal during it ends the follower after that pass instead of
/// killing it.
#[cfg(unix)]
fn shutdown() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn shutdown() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
