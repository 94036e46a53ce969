//! The audit trail: one event per lookup, allowed or denied, in an append-only JSON Lines file
//! where each line carries the hash of the one before — so a changed, removed or reordered line
//! breaks the chain at a line `carerecord audit verify` can name.
//!
//! The broker fails closed: if an event cannot be written, the record is not disclosed.
//! Audit holds no clinical content: who, which patient, when, why, which sources, and counts.
//!
//! Each broker instance writes its own trail, and each line names the instance (inside the
//! hash), so a region's trails can be gathered in one store as one chain per instance
//! (`carerecord audit ship`, [`crate::audit_store`]) without two chains ever being mixed.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

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
    /// `access` (allowed), `break_glass` (allowed as emergency access), `document` (a document
    /// retrieved through the broker), or `denied`.
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

/// One line of a trail: an event, its place in the chain and the instance that wrote it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainedLine {
    /// 1 for the trail's first event, then one more per event.
    pub seq: u64,
    /// The previous event's hash ([`GENESIS`] before the first).
    pub prev: String,
    /// SHA-256 over `seq`, `prev`, `instance` and `event` (see [`link_hash`]).
    pub hash: String,
    /// The broker instance whose trail this is. Absent in trails written before trails were
    /// named (and by [`AuditLog::open`]); absent fields are left out of the hash, so such
    /// trails still verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub event: AuditEvent,
}

/// A [`ChainedLine`] as written, borrowing its parts (same fields, same order).
#[derive(Serialize)]
struct LineOut<'a> {
    seq: u64,
    prev: &'a str,
    hash: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<&'a str>,
    event: &'a AuditEvent,
}

#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    prev: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<&'a str>,
    event: &'a AuditEvent,
}

/// The hash before a trail's first event.
pub const GENESIS_HASH: &str = GENESIS;

/// The hash that links event `seq` of `instance`'s trail to `prev`: what a line's `hash` must
/// be, whether it is read from the file or rebuilt from a database row.
pub fn link_hash(
    seq: u64,
    prev: &str,
    instance: Option<&str>,
    event: &AuditEvent,
) -> Result<String, serde_json::Error> {
    hash_of(seq, prev, instance, event)
}

fn hash_of(
    seq: u64,
    prev: &str,
    instance: Option<&str>,
    event: &AuditEvent,
) -> Result<String, serde_json::Error> {
    let bytes = serde_json::to_vec(&Hashed {
        seq,
        prev,
        instance,
        event,
    })?;
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
    #[error(
        "audit file {path} is locked by another carerecord broker instance: two brokers appending to one trail would interleave their hash chains. Run one trail per instance: give each instance its own [audit] file (e.g. named by instance, file = \"/var/lib/carerecord/audit-{{instance}}.jsonl\"), or stop the other instance first"
    )]
    Locked { path: PathBuf },
    #[error(
        "audit file {path} holds the trail of {found}, and this broker is {ours}: one trail holds one instance's chain. Give each instance its own [audit] file (e.g. file = \"/var/lib/carerecord/audit-{{instance}}.jsonl\"), or set [audit] instance to the trail's instance if this broker replaces it"
    )]
    OtherInstance {
        path: PathBuf,
        found: String,
        ours: String,
    },
    #[error("audit writer for {path} has stopped; the event was not recorded")]
    WriterStopped { path: PathBuf },
}

/// One event waiting for the writer, and whoever waits for it to be on disk.
struct Job {
    event: AuditEvent,
    ack: tokio::sync::oneshot::Sender<Result<(), AuditError>>,
}

/// Most events written (and fsynced) together.
const MAX_BATCH: usize = 1024;

/// An open audit trail, written by its own thread.
///
/// Callers hand events to the writer over a channel and wait for its acknowledgement, so the
/// write (and optional fsync) never runs on an async worker. The writer takes whatever is queued
/// when it wakes as one batch: one `write`, at most one `fsync`, then every event in it is
/// acknowledged (group commit). The file is exclusively locked while the trail is open, so a
/// second broker pointed at the same file refuses to start instead of interleaving two chains.
pub struct AuditLog {
    path: PathBuf,
    /// Taken on drop, which stops the writer.
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    /// Joined on drop, so the file (and its lock) is closed when the log is gone.
    writer: Option<std::thread::JoinHandle<()>>,
    /// When the last write failed, cleared by the next one that succeeds: the readiness probe
    /// turns traffic away from a broker that cannot record who looked.
    failed_at: Arc<Mutex<Option<Instant>>>,
}

impl AuditLog {
    /// Opens (or creates) an unnamed trail: its lines name no instance. For embedders and tests;
    /// `carerecord serve` opens a named trail ([`AuditLog::open_named`]).
    pub fn open(path: &Path, sync: bool) -> Result<AuditLog, AuditError> {
        AuditLog::open_as(path, sync, None)
    }

    /// Opens (or creates) `instance`'s trail, locks it and continues its chain; every line
    /// written names `instance`. A damaged trail refuses to open: appending to it would hide
    /// the damage. A trail another process holds refuses to open with [`AuditError::Locked`],
    /// and one written by another instance (or unnamed) with [`AuditError::OtherInstance`].
    pub fn open_named(path: &Path, sync: bool, instance: &str) -> Result<AuditLog, AuditError> {
        AuditLog::open_as(path, sync, Some(instance))
    }

    fn open_as(path: &Path, sync: bool, instance: Option<&str>) -> Result<AuditLog, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_owned(),
            source,
        };
        // Only a regular file holds a chain to continue (a device such as /dev/null does not).
        let kind = std::fs::metadata(path).map(|m| m.is_file());
        let regular = !matches!(kind, Ok(false));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        if regular {
            // Lock before reading the chain, so nobody appends between the check and our first
            // event. The lock belongs to this open file and ends when the writer closes it.
            file.try_lock().map_err(|e| match e {
                std::fs::TryLockError::WouldBlock => AuditError::Locked {
                    path: path.to_owned(),
                },
                std::fs::TryLockError::Error(source) => io(source),
            })?;
        }
        let (seq, hash) = if regular {
            let reader = File::open(path).map_err(io)?;
            match verify_reader(BufReader::new(reader)) {
                Verified::Intact {
                    events,
                    last_hash,
                    instance: found,
                } => {
                    same_instance(path, events, found.as_deref(), instance)?;
                    (events, last_hash)
                }
                Verified::Broken { line, why } => {
                    return Err(AuditError::Damaged {
                        path: path.to_owned(),
                        line,
                        why,
                    });
                }
            }
        } else {
            (0, GENESIS.to_owned())
        };
        let failed_at = Arc::new(Mutex::new(None));
        let head = Head {
            path: path.to_owned(),
            failed_at: failed_at.clone(),
            instance: instance.map(str::to_owned),
            file,
            seq,
            hash,
            sync,
            regular,
        };
        let (jobs, queue) = std::sync::mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("carerecord-audit".into())
            .spawn(move || head.run(queue))
            .map_err(io)?;
        Ok(AuditLog {
            path: path.to_owned(),
            jobs: Some(jobs),
            writer: Some(writer),
            failed_at,
        })
    }

    /// Appends one event and waits until the writer has written it (and fsynced it, with
    /// `fsync` on). An error means it was not recorded, and the caller must not disclose.
    pub async fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let stopped = || AuditError::WriterStopped {
            path: self.path.clone(),
        };
        let (ack, acked) = tokio::sync::oneshot::channel();
        let job = Job {
            event: event.clone(),
            ack,
        };
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(job)
            .map_err(|_| stopped())?;
        acked.await.map_err(|_| stopped())?
    }

    /// The trail's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// When the last write failed, if the trail has not been written since.
    pub fn failing_since(&self) -> Option<Instant> {
        *self.failed_at.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued and exit; joining it means
        // the file is closed and unlocked by the time the log is gone (a restart in the same
        // process can open it again).
        drop(self.jobs.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The writer thread's state: the end of the chain and the file it extends.
struct Head {
    path: PathBuf,
    failed_at: Arc<Mutex<Option<Instant>>>,
    /// Written into every line (and its hash).
    instance: Option<String>,
    file: File,
    seq: u64,
    hash: String,
    /// Also `fsync` every batch (durable across power loss, slower).
    sync: bool,
    /// A regular file (whose length can be restored after a failed write).
    regular: bool,
}

impl Head {
    /// Writes batches until every sender is gone.
    fn run(mut self, queue: std::sync::mpsc::Receiver<Job>) {
        while let Ok(first) = queue.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    /// Chains, writes and (optionally) fsyncs one batch, then acknowledges every event in it.
    fn commit(&mut self, batch: Vec<Job>) {
        let mut bytes = Vec::with_capacity(batch.len() * 512);
        let (mut seq, mut hash) = (self.seq, self.hash.clone());
        let mut written = Vec::with_capacity(batch.len());
        for job in batch {
            match chained_line(seq + 1, &hash, self.instance.as_deref(), &job.event) {
                Ok((line, next)) => {
                    bytes.extend_from_slice(&line);
                    seq += 1;
                    hash = next;
                    written.push(job.ack);
                }
                // An event that cannot be encoded is refused alone; the chain skips it.
                Err(e) => {
                    let _ = job.ack.send(Err(e));
                }
            }
        }
        if written.is_empty() {
            return;
        }
        let result = self.append(&bytes);
        *self.failed_at.lock().unwrap_or_else(|e| e.into_inner()) =
            result.is_err().then(Instant::now);
        match result {
            Ok(()) => {
                self.seq = seq;
                self.hash = hash;
                for ack in written {
                    let _ = ack.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, events = written.len(), "audit write failed");
                for ack in written {
                    let _ = ack.send(Err(AuditError::Io {
                        path: self.path.clone(),
                        source: std::io::Error::new(e.kind(), e.to_string()),
                    }));
                }
            }
        }
    }

    /// Appends whole lines, or nothing: a half-written (or unsynced) batch is cut off again, so
    /// the next batch still links to the last acknowledged event.
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let before = self.file.metadata().map(|m| m.len()).ok();
        let result = self.file.write_all(bytes).and_then(|()| {
            if self.sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if result.is_err() {
            // On a device such as /dev/full there is no length to restore.
            if let Some(len) = before.filter(|_| self.regular) {
                let _ = self.file.set_len(len);
            }
        }
        result
    }
}

/// One JSON line (with its newline) for event number `seq` after `prev`, and its hash.
fn chained_line(
    seq: u64,
    prev: &str,
    instance: Option<&str>,
    event: &AuditEvent,
) -> Result<(Vec<u8>, String), AuditError> {
    let hash = hash_of(seq, prev, instance, event)?;
    let mut bytes = serde_json::to_vec(&LineOut {
        seq,
        prev,
        hash: &hash,
        instance,
        event,
    })?;
    bytes.push(b'\n');
    Ok((bytes, hash))
}

/// A trail with events continues only under the instance that wrote them.
fn same_instance(
    path: &Path,
    events: u64,
    found: Option<&str>,
    ours: Option<&str>,
) -> Result<(), AuditError> {
    if events == 0 || found == ours {
        return Ok(());
    }
    let name = |i: Option<&str>| match i {
        Some(i) => format!("instance {i:?}"),
        None => "no named instance (an unnamed trail)".to_owned(),
    };
    Err(AuditError::OtherInstance {
        path: path.to_owned(),
        found: name(found),
        ours: name(ours),
    })
}

/// What `carerecord check-config` checks of the trail, the way `serve` would find it, without
/// holding it: an existing trail must be intact, written by `instance` and open for appending,
/// a new one must be creatable. The lock is deliberately not taken, so checking a running
/// broker's configuration does not fail because that broker holds its trail.
pub fn check_usable(path: &Path, instance: Option<&str>) -> Result<(), AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => {
            OpenOptions::new().append(true).open(path).map_err(io)?;
        }
        Ok(_) => {
            OpenOptions::new().append(true).open(path).map_err(io)?;
            match verify(path)? {
                Verified::Broken { line, why } => {
                    return Err(AuditError::Damaged {
                        path: path.to_owned(),
                        line,
                        why,
                    });
                }
                Verified::Intact {
                    events,
                    instance: found,
                    ..
                } => same_instance(path, events, found.as_deref(), instance)?,
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Create it as serve would, then remove it again: check-config leaves nothing behind.
            OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(path)
                .map_err(io)?;
            std::fs::remove_file(path).map_err(io)?;
        }
        Err(e) => return Err(io(e)),
    }
    Ok(())
}

/// The result of checking a trail.
#[derive(Debug, PartialEq, Eq)]
pub enum Verified {
    /// Every link holds, and every line names the same instance (`None`: an unnamed trail).
    Intact {
        events: u64,
        last_hash: String,
        instance: Option<String>,
    },
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
    let mut instance = None;
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
        if events > 0 && parsed.instance != instance {
            return broken(format!(
                "written by instance {:?} in a trail of instance {:?}: two instances' chains are mixed",
                parsed.instance, instance
            ));
        }
        match hash_of(
            parsed.seq,
            &parsed.prev,
            parsed.instance.as_deref(),
            &parsed.event,
        ) {
            Ok(h) if h == parsed.hash => {}
            _ => return broken("contents do not match their hash: the record was altered".into()),
        }
        prev = parsed.hash;
        instance = parsed.instance;
        events += 1;
    }
    Verified::Intact {
        events,
        last_hash: prev,
        instance,
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
    use futures::executor::block_on;

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
            block_on(log.record(&event(i))).expect("record");
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
        block_on(log.record(&event(4))).expect("record");
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
    #[test]
    fn a_second_open_of_the_same_trail_is_refused_with_what_to_do() {
        let dir = temp_dir("lock");
        let path = dir.join("audit.jsonl");
        let first = AuditLog::open(&path, false).expect("open");
        let err = match AuditLog::open(&path, false) {
            Err(e) => e,
            Ok(_) => panic!("two open trails on one file"),
        };
        assert!(matches!(err, AuditError::Locked { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("another carerecord broker instance"), "{msg}");
        assert!(msg.contains("one trail per instance"), "{msg}");
        // Once the first is gone, the trail opens again and continues its chain.
        block_on(first.record(&event(1))).expect("record");
        drop(first);
        let again = AuditLog::open(&path, false).expect("reopen after the holder closed");
        block_on(again.record(&event(2))).expect("record");
        assert!(matches!(
            verify(&path).expect("read"),
            Verified::Intact { events: 2, .. }
        ));
    }

    #[test]
    fn check_usable_neither_takes_the_lock_nor_leaves_a_file() {
        let dir = temp_dir("check");
        let fresh = dir.join("new.jsonl");
        check_usable(&fresh, None).expect("creatable");
        assert!(!fresh.exists(), "check-config leaves nothing behind");

        let held = dir.join("held.jsonl");
        let log = AuditLog::open(&held, false).expect("open");
        check_usable(&held, None).expect("a running broker's trail checks");
        block_on(log.record(&event(1))).expect("the holder still writes");

        let blocked = dir.join("not-a-dir").join("audit.jsonl");
        std::fs::write(dir.join("not-a-dir"), "a file").expect("write");
        let serve = AuditLog::open(&blocked, false).err().map(|e| e.to_string());
        let check = check_usable(&blocked, None).err().map(|e| e.to_string());
        assert!(serve.is_some(), "serve refuses a trail it cannot create");
        assert_eq!(serve, check, "check-config says what serve says");
    }

    #[test]
    fn a_named_trail_names_its_instance_in_every_line_and_continues_only_under_it() {
        let dir = temp_dir("named");
        let path = dir.join("audit-a.jsonl");
        let log = AuditLog::open_named(&path, false, "broker-a").expect("open");
        block_on(log.record(&event(1))).expect("record");
        block_on(log.record(&event(2))).expect("record");
        drop(log);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.matches("\"instance\":\"broker-a\"").count(), 2);
        assert!(matches!(
            verify(&path).expect("read"),
            Verified::Intact { events: 2, instance: Some(ref i), .. } if i == "broker-a"
        ));

        for other in [Some("broker-b"), None] {
            let refused = match other {
                Some(b) => AuditLog::open_named(&path, false, b).err(),
                None => AuditLog::open(&path, false).err(),
            };
            assert!(
                matches!(refused, Some(AuditError::OtherInstance { .. })),
                "{other:?} continued broker-a's chain"
            );
            assert!(matches!(
                check_usable(&path, other),
                Err(AuditError::OtherInstance { .. })
            ));
        }
        let again = AuditLog::open_named(&path, false, "broker-a").expect("the same instance");
        block_on(again.record(&event(3))).expect("record");
        check_usable(&path, Some("broker-a")).expect("usable by its own instance");
    }

    #[test]
    fn a_line_from_another_instance_breaks_the_trail_and_renaming_breaks_the_hash() {
        let dir = temp_dir("mixed");
        let a = dir.join("a.jsonl");
        let b = dir.join("b.jsonl");
        for (path, name) in [(&a, "broker-a"), (&b, "broker-b")] {
            let log = AuditLog::open_named(path, false, name).expect("open");
            block_on(log.record(&event(1))).expect("record");
            block_on(log.record(&event(2))).expect("record");
        }
        let text = std::fs::read_to_string(&a).expect("read");
        let renamed = text.replacen("broker-a", "broker-b", 1);
        std::fs::write(&a, renamed).expect("write");
        assert!(matches!(
            verify(&a).expect("read"),
            Verified::Broken { line: 1, .. }
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_records_all_land_in_one_chain() {
        let dir = temp_dir("concurrent");
        let path = dir.join("audit.jsonl");
        let log = std::sync::Arc::new(AuditLog::open(&path, true).expect("open"));
        let tasks: Vec<_> = (0..200u32)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.record(&event(i % 60)).await })
            })
            .collect();
        for t in tasks {
            t.await.expect("task").expect("recorded");
        }
        match verify(&path).expect("read") {
            Verified::Intact { events, .. } => assert_eq!(events, 200),
            broken => panic!("{broken:?}"),
        }
    }

    #[test]
    fn a_failed_write_is_an_error_and_the_chain_survives_it() {
        let full = Path::new("/dev/full");
        if !full.exists() {
            return;
        }
        let log = AuditLog::open(full, false).expect("open a device");
        assert!(matches!(
            block_on(log.record(&event(1))),
            Err(AuditError::Io { .. })
        ));
    }
}
