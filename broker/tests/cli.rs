//! The `carerecord` binary as ops meet it: config checking (the same checks `serve` runs), the
//! audit commands, and one trail per instance.

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

/// Kills a broker process if a test fails before it exits by itself.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A config serving plaintext on loopback `port` with its audit trail at `audit`.
fn config_with(port: u16, audit: &std::path::Path, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nplaintext = true\n{extra}\n[audit]\nfile = {audit:?}\n\n[[sources]]\nid = \"gp\"\norganisation_code = \"A81001\"\norganisation_name = \"Riverside GP\"\n[sources.fhir]\nbase_url = \"http://127.0.0.1:9/fhir\"\n"
    )
}

/// `carerecord serve` on a config it must refuse: its exit status and its error, or a failure
/// if it starts serving instead.
fn serve_refuses(config: &std::path::Path) -> String {
    let mut child = Running(
        Command::new(env!("CARGO_BIN_EXE_carerecord"))
            .args(["serve", "--config", config.to_str().expect("utf8")])
            .env("RUST_LOG", "off")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start carerecord serve"),
    );
    for _ in 0..600 {
        if let Some(status) = child.0.try_wait().expect("wait") {
            assert!(!status.success(), "serve accepted {}", config.display());
            let mut err = String::new();
            std::io::Read::read_to_string(child.0.stderr.as_mut().expect("stderr piped"), &mut err)
                .expect("read stderr");
            return err;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("serve kept running on {}", config.display());
}

/// The `error: ...` part of a command's stderr.
fn error_of(stderr: &str) -> String {
    stderr
        .find("error:")
        .map(|i| stderr[i..].trim().to_owned())
        .unwrap_or_else(|| stderr.trim().to_owned())
}

#[test]
fn check_config_refuses_what_serve_refuses_with_the_same_message() {
    let dir = temp("parity");
    std::fs::create_dir_all(&dir).expect("dir");
    let file = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let blocker = file("not-a-dir", "a file where a directory should be");
    let objections = file("objections.txt", "9434765919\n12345\n");
    let garbage = file("garbage.pem", "not a certificate\n");
    let audit = dir.join("audit.jsonl");
    let port = free_port();
    let tls = |cert: &std::path::Path| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[server.tls]\ncert = {cert:?}\nkey = {cert:?}\n\n[audit]\nfile = {audit:?}\n"
        )
    };
    let cases = [
        (
            "unwritable audit directory",
            config_with(port, &blocker.join("audit.jsonl"), ""),
            "Not a directory",
        ),
        (
            "missing TLS file",
            tls(&dir.join("missing.pem")),
            "missing.pem",
        ),
        ("unparsable TLS material", tls(&garbage), "garbage.pem"),
        (
            "bad objections file",
            config_with(
                port,
                &audit,
                &format!("[access]\nobjections_file = {objections:?}\n"),
            ),
            "line 2",
        ),
        (
            "plaintext on every interface",
            config_with(port, &audit, "").replace("127.0.0.1", "0.0.0.0"),
            "allow_plaintext_on_network",
        ),
    ];
    for (name, text, why) in cases {
        let path = file("case.toml", &text);
        let check = carerecord(&["check-config", path.to_str().expect("utf8")]);
        assert!(!check.status.success(), "{name}: check-config accepted it");
        let check = error_of(&String::from_utf8_lossy(&check.stderr));
        let serve = error_of(&serve_refuses(&path));
        assert!(check.contains(why), "{name}: {check}");
        assert_eq!(check, serve, "{name}: check-config and serve disagree");
    }
    assert!(!audit.exists(), "neither left an audit trail behind");
}

#[test]
fn a_second_broker_on_the_same_audit_trail_refuses_to_start_and_says_why() {
    let dir = temp("lock");
    std::fs::create_dir_all(&dir).expect("dir");
    let audit = dir.join("shared-audit.jsonl");
    let first_port = free_port();
    let first_config = dir.join("first.toml");
    std::fs::write(&first_config, config_with(first_port, &audit, "")).expect("write");
    let mut first = Running(
        Command::new(env!("CARGO_BIN_EXE_carerecord"))
            .args(["serve", "--config", first_config.to_str().expect("utf8")])
            .env("RUST_LOG", "off")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the first broker"),
    );
    let mut listening = false;
    for _ in 0..600 {
        assert!(
            first.0.try_wait().expect("wait").is_none(),
            "the first broker exited"
        );
        if std::net::TcpStream::connect(("127.0.0.1", first_port)).is_ok() {
            listening = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(listening, "the first broker never listened");

    // Checking the running broker's own configuration still passes: the check does not lock.
    let check = carerecord(&["check-config", first_config.to_str().expect("utf8")]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let second_config = dir.join("second.toml");
    std::fs::write(&second_config, config_with(free_port(), &audit, "")).expect("write");
    let err = serve_refuses(&second_config);
    assert!(
        err.contains("locked by another carerecord broker instance")
            && err.contains("one trail per instance")
            && err.contains("[audit] file"),
        "{err}"
    );
    assert!(
        first.0.try_wait().expect("wait").is_none(),
        "the first broker keeps serving"
    );
}

#[test]
fn check_config_accepts_real_tls_material_on_a_network_address() {
    let dir = temp("tls-ok");
    std::fs::create_dir_all(&dir).expect("dir");
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let cert = dir.join("broker.pem");
    let key = dir.join("broker.key");
    std::fs::write(&cert, made.cert.pem()).expect("write");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("write");
    let config = dir.join("tls.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"0.0.0.0:50051\"\n[server.tls]\ncert = {cert:?}\nkey = {key:?}\n\n[audit]\nfile = {:?}\n",
            dir.join("audit.jsonl")
        ),
    )
    .expect("write");
    let out = carerecord(&["check-config", config.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("OK (0 sources, listening on 0.0.0.0:50051)")
    );
}
