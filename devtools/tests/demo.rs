//! `carerecord-dev demo`: the README's first command, on an embedded synthetic region.

use std::process::Command;

#[test]
fn the_demo_looks_a_patient_up_across_mock_organisations_over_http() {
    let out = Command::new(env!("CARGO_BIN_EXE_carerecord-dev"))
        .args(["demo", "--patients", "300", "--organisations", "6"])
        .output()
        .expect("run carerecord-dev");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Sources"), "{stdout}");
    // The chosen patient is known to at least three organisations, all of which answered.
    let ok = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("OK "))
        .count();
    assert!(ok >= 3, "{stdout}");
    assert!(stdout.contains(" complete"), "{stdout}");
    // The clinician's web view, launched for the same patient: a URL holding only a code.
    let url = stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("http://") && l.contains("/launch/"))
        .unwrap_or_else(|| panic!("a launch URL in:\n{stdout}"));
    let code = url.rsplit('/').next().unwrap_or("");
    assert!(
        code.len() == 64 && code.bytes().all(|b| b.is_ascii_hexdigit()),
        "{url}"
    );
}

#[test]
fn the_demo_reads_the_region_in_every_fhir_mode_and_refuses_an_unknown_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_carerecord-dev"))
        .args([
            "demo",
            "--patients",
            "200",
            "--organisations",
            "4",
            "--mode",
            "batch",
            "--json",
        ])
        .output()
        .expect("run carerecord-dev");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"sources\""));

    let out = Command::new(env!("CARGO_BIN_EXE_carerecord-dev"))
        .args(["demo", "--mode", "fast"])
        .output()
        .expect("run carerecord-dev");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("expected search, everything, batch or chained")
    );
}
