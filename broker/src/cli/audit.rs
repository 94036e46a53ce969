//! `carerecord audit`: check the trail's chain, and list who looked at a patient's record (the
//! patient's right to know).

use std::path::PathBuf;

use crate::audit::{self, Verified};
use anyhow::Context;
use carerecord_adapters::NhsNumber;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify the hash chain; report the first broken or missing link.
    Verify {
        /// The audit trail (JSON Lines).
        file: PathBuf,
    },
    /// List every access to one patient's record, oldest first.
    Patient {
        /// The patient's NHS number.
        nhs_number: String,
        /// The audit trail (JSON Lines).
        #[arg(long, default_value = "carerecord-audit.jsonl")]
        file: PathBuf,
        /// Print JSON Lines instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify { file } => match audit::verify(&file)? {
            Verified::Intact { events, .. } => {
                println!("{}: intact, {events} events", file.display());
                Ok(())
            }
            Verified::Broken { line, why } => {
                anyhow::bail!("{}: broken at line {line}: {why}", file.display())
            }
        },
        AuditCommand::Patient {
            nhs_number,
            file,
            json,
        } => {
            let nhs = NhsNumber::parse(&nhs_number).context("nhs_number")?;
            let events = audit::events_for_patient(&file, &nhs.as_digits())?;
            for e in &events {
                if json {
                    println!("{}", serde_json::to_string(e)?);
                } else {
                    let why = if e.emergency_reason.is_empty() {
                        e.decision.clone()
                    } else {
                        format!("{} — \"{}\"", e.decision, e.emergency_reason)
                    };
                    println!(
                        "{}  {:<11} {} ({}) role {} at {} via {}: {}",
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
                    );
                }
            }
            if !json {
                println!("{} access events for {}", events.len(), nhs.grouped());
            }
            Ok(())
        }
    }
}
