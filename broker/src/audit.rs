//! The audit trail: one event per lookup, allowed or denied, in an append-only JSON Lines file
//! where each line carries the hash of the one before — so a changed, removed or reordered line
//! breaks the chain at a line `carerecord audit verify` can name.
//!
//! The broker fails closed: if an event cannot be written, the record is not disclosed.
//! Audit holds no clinical content: who, which patient, when, why, which sources, and counts.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The hash before the first event.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened, in the shape of an access-log entry a privacy officer (or the patient) reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    /// RFC 3339 UTC.
    pub time: String,
    pub request_id: String,
    /// `access` (allowed), `break_glass` (allowed as emergency access), or `denied`.
    pub kind: String,
    /// The calling system, as identified by its client certificate (or `unverified` when the
    /// broker runs without mutual TLS).
    pub system: String,
    pub user_id: String,
    pub user_name: String,
    pub role: String,
    pub organisation: String,
    /// The patient's NHS number.
    pub patient: String,
    pub purpose: String,
    pub emergency_reason: String,
    /// Why access was allowed (the relationship basis) or denied.
    pub decision: String,
    /// Sources asked, with their outcomes (`id:OUTCOME`).
    pub sources: Vec<String>,
    /// What was returned: `section:count` pairs; never clinical content.
    pub returned: Vec<String>,
    pub withheld: bool,
    pub from_cache: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChainedLine {
    seq: u64,
    prev: String,
    hash: String,
    event: AuditEvent,
}

#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    prev: &'a str,
    event: &'a AuditEvent,
}

fn hash_of(seq: u64, prev: &str, event: &AuditEvent) -> Result<String, serde_json::Error> {
    let bytes = serde_json::to_vec(&Hashed { seq, prev, event })?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    Ok(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// Why the audit trail could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit file {path} is damaged at line {line}: {why} (run `carerecord audit verify`)")]
    Damaged {
        path: PathBuf,
        line: u64,
        why: String,
    },
    #[error("audit event could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

struct Head {
    file: File,
    seq: u64,
    hash: String,
}

/// An open audit trail.
pub struct AuditLog {
    path: PathBuf,
    head: Mutex<Head>,
    /// Also `fsync` every event (durable across power loss, slower).
    sync: bool,
    /// A regular file (whose length can be restored after a failed write).
    regular: bool,
}

impl AuditLog {
    /// Opens (or creates) the trail and continues its chain. A damaged trail refuses to open:
    /// appending to it would hide the damage.
    pub fn open(path: &Path, sync: bool) -> Result<AuditLog, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_owned(),
            source,
        };
        // Only a regular file holds a chain to continue (a device such as /dev/null does not).
        let kind = std::fs::metadata(path).map(|m| m.is_file());
        let regular = !matches!(kind, Ok(false));
        let (seq, hash) = match kind.and_then(|regular| Ok((regular, File::open(path)?))) {
            Ok((false, _)) => (0, GENESIS.to_owned()),
            Ok((true, file)) => match verify_reader(BufReader::new(file)) {
                Verified::Intact { events, last_hash } => (events, last_hash),
                Verified::Broken { line, why } => {
                    return Err(AuditError::Damaged {
                        path: path.to_owned(),
                        line,
                        why,
                    });
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, GENESIS.to_owned()),
            Err(e) => return Err(io(e)),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok(AuditLog {
            path: path.to_owned(),
            head: Mutex::new(Head { file, seq, hash }),
            sync,
            regular,
        })
    }

    /// Appends one event. An error means it was not recorded, and the caller must not disclose.
    pub async fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let mut head = self.head.lock().unwrap_or_else(|e| e.into_inner());
        let seq = head.seq + 1;
        let hash = hash_of(seq, &head.hash, event)?;
        let line = ChainedLine {
            seq,
            prev: head.hash.clone(),
            hash: hash.clone(),
            event: event.clone(),
        };
        let mut bytes = serde_json::to_vec(&line)?;
        bytes.push(b'\n');
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let before = head.file.metadata().map(|m| m.len()).ok();
        if let Err(e) = head.file.write_all(&bytes) {
            // A half-written line would corrupt the next event too: cut it off again. (On a
            // device such as /dev/full there is no length to restore.)
            if let Some(len) = before.filter(|_| self.regular) {
                let _ = head.file.set_len(len);
            }
            return Err(io(e));
        }
        if self.sync {
            head.file.sync_data().map_err(io)?;
        }
        head.seq = seq;
        head.hash = hash;
        Ok(())
    }
}

/// The result of checking a trail.
#[derive(Debug, PartialEq, Eq)]
pub enum Verified {
    /// Every link holds.
    Intact { events: u64, last_hash: String },
    /// The first line (1-based) where the chain breaks, and how.
    Broken { line: u64, why: String },
}

/// Checks a whole trail.
pub fn verify(path: &Path) -> Result<Verified, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(verify_reader(BufReader::new(file)))
}

fn verify_reader(reader: impl BufRead) -> Verified {
    let mut prev = GENESIS.to_owned();
    let mut events = 0u64;
    for (i, line) in reader.split(b'\n').enumerate() {
        let n = i as u64 + 1;
        let broken = |why: String| Verified::Broken { line: n, why };
        let line = match line {
            Ok(l) => l,
            Err(e) => return broken(format!("unreadable: {e}")),
        };
        let parsed: ChainedLine = match serde_json::from_slice(&line) {
            Ok(p) => p,
            Err(e) => return broken(format!("not a complete audit record ({e})")),
        };
        if parsed.seq != events + 1 {
            return broken(format!(
                "sequence {} where {} was expected: a record is missing or out of order",
                parsed.seq,
                events + 1
            ));
        }
        if parsed.prev != prev {
            return broken("does not link to the record before it".into());
        }
        match hash_of(parsed.seq, &parsed.prev, &parsed.event) {
            Ok(h) if h == parsed.hash => {}
            _ => return broken("contents do not match their hash: the record was altered".into()),
        }
        prev = parsed.hash;
        events += 1;
    }
    Verified::Intact {
        events,
        last_hash: prev,
    }
}

/// Every event about one patient, oldest first: who looked at their record.
pub fn events_for_patient(path: &Path, nhs_digits: &str) -> Result<Vec<AuditEvent>, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let damaged = |why: String| AuditError::Damaged {
            path: path.to_owned(),
            line: i as u64 + 1,
            why,
        };
        let line = line.map_err(|e| damaged(e.to_string()))?;
        let parsed: ChainedLine =
            serde_json::from_slice(&line).map_err(|e| damaged(e.to_string()))?;
        if parsed.event.patient == nhs_digits {
            out.push(parsed.event);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u32) -> AuditEvent {
        AuditEvent {
            time: format!("2026-11-25T12:00:{n:02}.000Z"),
            request_id: format!("r{n}"),
            kind: "access".into(),
            system: "epr".into(),
            user_id: "u".into(),
            user_name: String::new(),
            role: "R8000".into(),
            organisation: "RJ1".into(),
            patient: if n.is_multiple_of(2) {
                "9434765919"
            } else {
                "9990000018"
            }
            .into(),
            purpose: "direct_care".into(),
            emergency_reason: String::new(),
            decision: "holds records".into(),
            sources: vec!["gp:OK".into()],
            returned: vec!["allergies:1".into()],
            withheld: false,
            from_cache: false,
        }
    }

    fn trail(dir: &Path, n: u32) -> PathBuf {
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open(&path, false).expect("open");
        for i in 1..=n {
            futures::executor::block_on(log.record(&event(i))).expect("record");
        }
        path
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("carerecord-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn an_intact_trail_verifies_and_reopening_continues_the_chain() {
        let dir = temp_dir("intact");
        let path = trail(&dir, 3);
        let log = AuditLog::open(&path, true).expect("reopen");
        futures::executor::block_on(log.record(&event(4))).expect("record");
        match verify(&path).expect("read") {
            Verified::Intact { events, .. } => assert_eq!(events, 4),
            broken => panic!("{broken:?}"),
        }
        let mine = events_for_patient(&path, "9434765919").expect("read");
        assert_eq!(
            mine.iter()
                .map(|e| e.request_id.as_str())
                .collect::<Vec<_>>(),
            ["r2", "r4"]
        );
    }

    #[test]
    fn tampering_is_found_at_the_right_line() {
        let dir = temp_dir("tamper");
        let path = trail(&dir, 5);
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();

        let mut altered = lines.clone();
        let changed = lines[2].replace("\"user_id\":\"u\"", "\"user_id\":\"someone-else\"");
        altered[2] = &changed;
        std::fs::write(&path, altered.join("\n") + "\n").expect("write");
        assert!(matches!(
            verify(&path).expect("read"),
            Verified::Broken { line: 3, .. }
        ));

        let mut removed = lines.clone();
        removed.remove(1);
        std::fs::write(&path, removed.join("\n") + "\n").expect("write");
        assert!(matches!(
            verify(&path).expect("read"),
            Verified::Broken { line: 2, .. }
        ));

        let truncated = &text[..text.len() - 40];
        std::fs::write(&path, truncated).expect("write");
        assert!(matches!(
            verify(&path).expect("read"),
            Verified::Broken { line: 5, .. }
        ));
        // A damaged trail is not appended to.
        assert!(matches!(
            AuditLog::open(&path, false),
            Err(AuditError::Damaged { line: 5, .. })
        ));
    }
}
