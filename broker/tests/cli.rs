//! The `carerecord` binary as ops meet it: config checking, the audit commands and the demo.

use std::path::PathBuf;
use std::process::{Command, Output};

use carerecord_broker::audit::{AuditEvent, AuditLog};

fn carerecord(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_carerecord"))
        .args(args)
        .output()
        .expect("run carerecord")
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("carerecord-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:50051"
plaintext = true

[[sources]]
id = "gp"
organisation_code = "A81001"
organisation_name = "Riverside GP"
timeout_ms = 1500
[sources.fhir]
base_url = "http://127.0.0.1:8080/fhir"
"#;

#[test]
fn check_config_accepts_a_good_file_and_names_the_line_of_a_bad_one() {
    let good = temp("good.toml");
    std::fs::write(&good, CONFIG).expect("write");
    let out = carerecord(&["check-config", good.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK (1 sources"));

    let bad = temp("bad.toml");
    std::fs::write(&bad, CONFIG.replace("timeout_ms", "timeout_millis")).expect("write");
    let out = carerecord(&["check-config", bad.to_str().expect("utf8")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 10") && err.contains("timeout_millis"),
        "{err}"
    );
}

#[test]
fn audit_verify_reports_the_first_broken_line_and_patient_lists_accesses() {
    let path = temp("trail.jsonl");
    let _ = std::fs::remove_file(&path);
    let log = AuditLog::open(&path, false).expect("open");
    for i in 0..3 {
        futures::executor::block_on(log.record(&AuditEvent {
            time: format!("2026-11-25T10:00:0{i}.000Z"),
            request_id: format!("req-{i}"),
            kind: "access".into(),
            system: "epr".into(),
            user_id: format!("user-{i}"),
            user_name: String::new(),
            role: "R8000".into(),
            organisation: "RJ1".into(),
            patient: "9434765919".into(),
            purpose: "direct_care".into(),
            emergency_reason: String::new(),
            decision: "holds records".into(),
            sources: vec![],
            returned: vec![],
            withheld: false,
            from_cache: false,
        }))
        .expect("record");
    }
    let file = path.to_str().expect("utf8");
    let out = carerecord(&["audit", "verify", file]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("intact, 3 events"));

    let out = carerecord(&["audit", "patient", "943 476 5919", "--file", file]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("user-0") && listed.contains("user-2"),
        "{listed}"
    );
    assert!(listed.contains("3 access events"));

    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, text.replacen("user-1", "user-X", 1)).expect("tamper");
    let out = carerecord(&["audit", "verify", file]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken at line 2"), "{err}");
}

#[test]
fn the_demo_looks_a_patient_up_across_mock_organisations_over_http() {
    let out = carerecord(&["demo", "--patients", "300", "--organisations", "6"]);
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
}
