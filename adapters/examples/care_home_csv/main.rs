//! A worked example of a carerecord source for an organisation without a FHIR API: a care home
//! whose medication record system exports CSV (see `adapter.rs`), run through the conformance
//! kit. Exits non-zero if a required check fails.
//!
//! ```text
//! cargo run -p carerecord-adapters --example care_home_csv
//! ```

mod adapter;

use std::process::ExitCode;

use adapter::{CareHomeCsvSource, SAMPLE_EXPORT};
use carerecord_adapters::testkit::{Conformance, Garbage, Report, survives_garbage};
use carerecord_adapters::{NhsNumber, SourceInfo};

#[tokio::main]
async fn main() -> ExitCode {
    let path = std::env::temp_dir().join(format!("care-home-export-{}.csv", std::process::id()));
    if let Err(e) = std::fs::write(&path, SAMPLE_EXPORT) {
        eprintln!("cannot write the sample export to {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    let source = CareHomeCsvSource::new(
        SourceInfo {
            id: "rosewood-care-home".into(),
            organisation_code: "VM4Q1".into(),
            organisation_name: "Rosewood Care Home".into(),
        },
        &path,
    );
    let known = NhsNumber::parse("9990000018").expect("valid synthetic NHS number");
    let unknown = NhsNumber::parse("9990000026").expect("valid synthetic NHS number");

    let report = Conformance::new(&source, known, unknown).run().await;
    print!("{report}");

    // Garbage is adapter-specific: this adapter reads a file, so write each body into it.
    let mut garbage = Report {
        source_id: report.source_id.clone(),
        checks: Vec::new(),
    };
    for kind in Garbage::ALL {
        if let Err(e) = std::fs::write(&path, kind.body()) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        garbage
            .checks
            .push(survives_garbage(&source, known, kind).await);
    }
    print!("\n{garbage}");
    let _ = std::fs::remove_file(&path);

    if report.all_passed() && garbage.all_passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
