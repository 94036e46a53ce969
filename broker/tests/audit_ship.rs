//! `carerecord audit ship`, `verify --database`, `patient --database` and `report` as an
//! operator runs them, against a real PostgreSQL started for the test (Debian's server binaries,
//! a private port and directory, stopped on drop): the sidecar mode included.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use carerecord_broker::audit::{AuditEvent, AuditLog};

#[path = "../../tests/src/postgres.rs"]
mod postgres;

fn carerecord(args: &[&str], database: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_carerecord"))
        .args(args)
        .env("CARERECORD_AUDIT_DATABASE", database)
        .output()
        .expect("run carerecord")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("carerecord-ship-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

fn event(n: u32, kind: &str) -> AuditEvent {
    AuditEvent {
        time: format!("2026-11-25T12:00:{n:02}.000Z"),
        request_id: format!("r{n}"),
        kind: kind.into(),
        system: "epr".into(),
        user_id: format!("u{}", n % 3),
        user_name: String::new(),
        role: "R8000".into(),
        organisation: "RJ1".into(),
        patient: "9434765919".into(),
        purpose: "direct_care".into(),
        emergency_reason: String::new(),
        decision: "holds records".into(),
        sources: vec!["gp:OK".into()],
        returned: vec!["allergies:1".into()],
        withheld: false,
        from_cache: false,
    }
}

fn write(path: &Path, instance: &str, events: impl IntoIterator<Item = AuditEvent>) {
    let log = AuditLog::open_named(path, false, instance).expect("open");
    for e in events {
        futures::executor::block_on(log.record(&e)).expect("record");
    }
}

/// Kills the follower if the test fails before stopping it.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_operator_ships_two_trails_then_asks_the_store_and_a_sidecar_follows_a_growing_trail() {
    let Some(pg) = postgres::Postgres::start("cli") else {
        return;
    };
    let db = pg.url.as_str();
    let dir = temp("trails");
    std::fs::create_dir_all(&dir).expect("dir");
    let a = dir.join("audit-broker-a.jsonl");
    let b = dir.join("audit-broker-b.jsonl");
    write(&a, "broker-a", (1..=3).map(|n| event(n, "access")));
    write(
        &b,
        "broker-b",
        [event(4, "break_glass"), event(5, "denied")],
    );

    // A directory ships every trail in it.
    let out = carerecord(
        &["audit", "ship", "--trail", dir.to_str().expect("utf8")],
        db,
    );
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("instance broker-a, 3 new events shipped"),
        "{said}"
    );
    assert!(
        said.contains("instance broker-b, 2 new events shipped"),
        "{said}"
    );
    let again = carerecord(
        &["audit", "ship", "--trail", dir.to_str().expect("utf8")],
        db,
    );
    assert!(text(&again).contains("instance broker-a, 0 new events shipped"));

    let out = carerecord(&["audit", "verify"], db);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("2 instances, every chain intact"),
        "{}",
        text(&out)
    );

    let out = carerecord(&["audit", "patient", "943 476 5919", "--json"], db);
    assert!(out.status.success(), "{}", text(&out));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let instances: Vec<&str> = events
        .iter()
        .map(|e| e["instance"].as_str().expect("instance"))
        .collect();
    assert_eq!(
        instances,
        ["broker-a", "broker-a", "broker-a", "broker-b", "broker-b"]
    );
    let out = carerecord(&["audit", "patient", "9434765919"], db);
    assert!(
        text(&out).contains("on broker-b") && text(&out).contains("5 access events"),
        "{}",
        text(&out)
    );

    let out = carerecord(&["audit", "report", "--format", "json"], db);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["total"]["views"], 4);
    assert_eq!(report["total"]["emergency"], 1);
    assert_eq!(report["total"]["denied"], 1);
    let out = carerecord(&["audit", "report"], db);
    assert!(text(&out).contains("2026-11"), "{}", text(&out));

    // A tampered trail: refused, the command fails, the others still ship.
    let c = dir.join("audit-broker-c.jsonl");
    write(&c, "broker-c", (1..=2).map(|n| event(n, "access")));
    let tampered = std::fs::read_to_string(&c)
        .expect("read")
        .replacen("RJ1", "RXX", 1);
    std::fs::write(&c, tampered).expect("write");
    let out = carerecord(
        &["audit", "ship", "--trail", dir.to_str().expect("utf8")],
        db,
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("damaged at line 1")
            && text(&out).contains("1 of 3 trails not shipped"),
        "{}",
        text(&out)
    );
    std::fs::remove_file(&c).expect("remove");

    // The sidecar: ships what the broker appends, and a last pass on SIGTERM.
    let mut follower = Child(
        Command::new(env!("CARGO_BIN_EXE_carerecord"))
            .args([
                "audit",
                "ship",
                "--follow",
                "--interval-secs",
                "1",
                "--trail",
            ])
            .arg(&a)
            .env("CARERECORD_AUDIT_DATABASE", db)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the follower"),
    );
    write(&a, "broker-a", (6..=7).map(|n| event(n, "access")));
    let shipped = |want: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = carerecord(&["audit", "patient", "9434765919", "--json"], db);
            let n = String::from_utf8_lossy(&out.stdout).lines().count();
            if n >= want || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(shipped(7), 7, "the follower shipped the appended events");
    write(&a, "broker-a", [event(8, "access")]);
    let pid = follower.0.id().to_string();
    let term = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(term.success());
    let status = follower.0.wait().expect("wait");
    assert!(
        status.success(),
        "the follower exits cleanly on SIGTERM: {status}"
    );
    assert_eq!(shipped(8), 8, "its last pass shipped the final event");
    let out = carerecord(&["audit", "verify"], db);
    assert!(
        text(&out).contains("instance broker-a: intact, 6 events"),
        "{}",
        text(&out)
    );
}
