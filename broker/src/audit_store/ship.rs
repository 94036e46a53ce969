//! `carerecord audit ship`: carries a broker's trail into the store, incrementally and exactly
//! once.
//!
//! Per instance the store keeps a head — the last shipped event's sequence number and hash, and
//! how far into the trail file that was. A pass first reads the trail from the head to its last
//! complete line, checking every link (and that the line at the head is the one stored: a trail
//! that was rewritten or forked since is refused); only then does it insert the new events and
//! move the head, in one transaction. So a crash at any point leaves either the old head and
//! none of the pass's events, or the new head and all of them; a tampered trail stores nothing;
//! and `(instance, seq)` is a key, so no event can be stored twice.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use futures::future::try_join_all;
use tokio_postgres::Transaction;

use super::{AuditStore, StoreError};
use crate::audit::{ChainedLine, GENESIS_HASH, link_hash};

/// Events inserted per round trip batch (pipelined on one connection).
const INSERT_BATCH: usize = 500;

/// What one pass shipped from one trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shipped {
    /// The instance whose trail it is (`None`: the trail has no events yet).
    pub instance: Option<String>,
    /// Events stored by this pass.
    pub events: u64,
    /// The stored chain's last sequence number after the pass.
    pub head: u64,
}

/// Why a trail was not shipped. Nothing of it was stored.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("audit trail {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "audit trail {path} is unnamed (written before trails were named by instance): it cannot be told apart from other brokers' trails in the store. Check it with `carerecord audit verify {path}` and keep it as it is"
    )]
    Unnamed { path: PathBuf },
    #[error(
        "audit trail {path} is damaged at line {line}: {why}. Nothing was shipped from it; keep the file as evidence and run `carerecord audit verify {path}`"
    )]
    Tampered {
        path: PathBuf,
        line: u64,
        why: String,
    },
    #[error(
        "audit trail {path} changed while it was being shipped ({why}): an audit trail is only ever appended to. Nothing was shipped from it"
    )]
    Changed { path: PathBuf, why: String },
    #[error(
        "audit trail {path} has forked from the store: its event {seq} of instance {instance:?} is not the one already shipped (the file was rewritten or replaced). Nothing was shipped from it"
    )]
    Forked {
        path: PathBuf,
        instance: String,
        seq: u64,
    },
    #[error(
        "audit trail {path} ends at event {events} of instance {instance:?}, but the store already holds events up to {stored}: this file is older than what was shipped (restored from a backup, or another instance's file under the same name). Nothing was shipped from it"
    )]
    Behind {
        path: PathBuf,
        instance: String,
        events: u64,
        stored: u64,
    },
}

impl From<tokio_postgres::Error> for ShipError {
    fn from(e: tokio_postgres::Error) -> Self {
        ShipError::Store(StoreError::Database(e))
    }
}

/// A point in a chain: the last event's sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    seq: u64,
    hash: String,
}

impl Link {
    fn genesis() -> Link {
        Link {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        }
    }
}

/// Ships whatever `path` holds beyond the store's head for its instance.
pub async fn ship(store: &mut AuditStore, path: &Path) -> Result<Shipped, ShipError> {
    let Some(instance) = trail_instance(path)? else {
        return Ok(Shipped {
            instance: None,
            events: 0,
            head: 0,
        });
    };
    let file_name = path.display().to_string();
    let tx = store.client_mut().transaction().await?;
    tx.execute(
        "INSERT INTO carerecord_audit.trail (instance, last_seq, last_hash, file, file_offset) \
         VALUES ($1, 0, $2, $3, 0) ON CONFLICT (instance) DO NOTHING",
        &[&instance, &GENESIS_HASH, &file_name],
    )
    .await?;
    // The row lock makes two shippers of one instance take turns.
    let row = tx
        .query_one(
            "SELECT last_seq, last_hash, file, file_offset FROM carerecord_audit.trail \
             WHERE instance = $1 FOR UPDATE",
            &[&instance],
        )
        .await?;
    let stored = Link {
        seq: from_db(row.try_get::<_, i64>("last_seq")?)?,
        hash: row.try_get("last_hash")?,
    };
    let same_file = row.try_get::<_, String>("file")? == file_name;
    let offset = from_db(row.try_get::<_, i64>("file_offset")?)?;

    let survey = survey(path, &instance, &stored, same_file.then_some(offset))?;
    let end = ship_segment(&tx, path, &instance, &stored, &survey).await?;
    tx.execute(
        "UPDATE carerecord_audit.trail SET last_seq = $2, last_hash = $3, file = $4, \
         file_offset = $5, shipped_at = now() WHERE instance = $1",
        &[
            &instance,
            &to_db(end.seq)?,
            &end.hash,
            &file_name,
            &to_db(survey.end)?,
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(Shipped {
        instance: Some(instance),
        events: end.seq - stored.seq,
        head: end.seq,
    })
}

/// The instance named by the trail's first line; `None` for an empty trail.
fn trail_instance(path: &Path) -> Result<Option<String>, ShipError> {
    let mut lines = Lines::open(path, 0)?;
    let Some((bytes, _)) = lines.next()? else {
        return Ok(None);
    };
    let first: ChainedLine = serde_json::from_slice(&bytes).map_err(|e| ShipError::Tampered {
        path: path.to_owned(),
        line: 1,
        why: format!("not a complete audit record ({e})"),
    })?;
    match first.instance {
        Some(instance) => Ok(Some(instance)),
        None => Err(ShipError::Unnamed {
            path: path.to_owned(),
        }),
    }
}

/// What a pass will ship, found by reading (not storing) the trail.
#[derive(Debug)]
struct Survey {
    /// Offset of the first event after the stored head.
    ship_from: u64,
    /// Offset after the last complete line.
    end: u64,
    /// The chain's end there.
    end_link: Link,
}

/// Checks the trail from the stored head to its end: first from the stored offset (when this
/// file was shipped last), and if that does not continue the stored chain, from the start.
fn survey(
    path: &Path,
    instance: &str,
    stored: &Link,
    offset: Option<u64>,
) -> Result<Survey, ShipError> {
    let len = std::fs::metadata(path).map_err(|e| io(path, e))?.len();
    if let Some(offset) = offset.filter(|o| *o <= len)
        && let Ok(found) = walk(path, offset, stored.clone(), instance, stored)
    {
        return Ok(found);
    }
    walk(path, 0, Link::genesis(), instance, stored)
}

/// Reads complete lines from `start` (where the chain stands at `from`), checking each link,
/// and that the event at the stored head is the stored one.
fn walk(
    path: &Path,
    start: u64,
    from: Link,
    instance: &str,
    stored: &Link,
) -> Result<Survey, ShipError> {
    let mut lines = Lines::open(path, start)?;
    let mut link = from;
    let mut ship_from = (link.seq == stored.seq).then_some(start);
    let mut line = 0u64;
    while let Some((bytes, end)) = lines.next()? {
        line += 1;
        let parsed = check_line(&bytes, &link, instance).map_err(|why| ShipError::Tampered {
            path: path.to_owned(),
            line,
            why,
        })?;
        if parsed.seq == stored.seq {
            if parsed.hash != stored.hash {
                return Err(ShipError::Forked {
                    path: path.to_owned(),
                    instance: instance.to_owned(),
                    seq: parsed.seq,
                });
            }
            ship_from = Some(end);
        }
        link = Link {
            seq: parsed.seq,
            hash: parsed.hash,
        };
    }
    match ship_from {
        Some(ship_from) => Ok(Survey {
            ship_from,
            end: lines.offset,
            end_link: link,
        }),
        None => Err(ShipError::Behind {
            path: path.to_owned(),
            instance: instance.to_owned(),
            events: link.seq,
            stored: stored.seq,
        }),
    }
}

/// Inserts the surveyed events after `stored`, checking each link again (the file is read a
/// second time), and returns where the chain ends.
async fn ship_segment(
    tx: &Transaction<'_>,
    path: &Path,
    instance: &str,
    stored: &Link,
    survey: &Survey,
) -> Result<Link, ShipError> {
    let insert = tx
        .prepare(
            "INSERT INTO carerecord_audit.event (instance, seq, prev, hash, at, time, request_id, \
             kind, system, user_id, user_name, role, organisation, patient, purpose, \
             emergency_reason, decision, sources, returned, withheld, from_cache) VALUES \
             ($1, $2, $3, $4, CAST($5::text AS timestamptz), $5, $6, $7, $8, $9, $10, $11, $12, \
             $13, $14, $15, $16, $17, $18, $19, $20)",
        )
        .await?;
    let changed = |why: String| ShipError::Changed {
        path: path.to_owned(),
        why,
    };
    let mut lines = Lines::open(path, survey.ship_from)?;
    let mut link = stored.clone();
    let mut batch = Vec::with_capacity(INSERT_BATCH);
    while lines.offset < survey.end {
        let Some((bytes, _)) = lines.next()? else {
            break;
        };
        let parsed = check_line(&bytes, &link, instance).map_err(changed)?;
        link = Link {
            seq: parsed.seq,
            hash: parsed.hash.clone(),
        };
        batch.push(parsed);
        if batch.len() == INSERT_BATCH {
            insert_batch(tx, &insert, instance, &batch).await?;
            batch.clear();
        }
    }
    insert_batch(tx, &insert, instance, &batch).await?;
    if link != survey.end_link {
        return Err(changed(format!(
            "it ended at event {} on the second reading",
            link.seq
        )));
    }
    Ok(link)
}

async fn insert_batch(
    tx: &Transaction<'_>,
    insert: &tokio_postgres::Statement,
    instance: &str,
    batch: &[ChainedLine],
) -> Result<(), ShipError> {
    try_join_all(batch.iter().map(|line| async move {
        let e = &line.event;
        let seq = to_db(line.seq)?;
        tx.execute(
            insert,
            &[
                &instance,
                &seq,
                &line.prev,
                &line.hash,
                &e.time,
                &e.request_id,
                &e.kind,
                &e.system,
                &e.user_id,
                &e.user_name,
                &e.role,
                &e.organisation,
                &e.patient,
                &e.purpose,
                &e.emergency_reason,
                &e.decision,
                &e.sources,
                &e.returned,
                &e.withheld,
                &e.from_cache,
            ],
        )
        .await
        .map_err(ShipError::from)
    }))
    .await?;
    Ok(())
}

/// The line's event if it is the next link after `link` in `instance`'s chain.
fn check_line(bytes: &[u8], link: &Link, instance: &str) -> Result<ChainedLine, String> {
    let parsed: ChainedLine =
        serde_json::from_slice(bytes).map_err(|e| format!("not a complete audit record ({e})"))?;
    if parsed.seq != link.seq + 1 {
        return Err(format!(
            "sequence {} where {} was expected: a record is missing or out of order",
            parsed.seq,
            link.seq + 1
        ));
    }
    if parsed.prev != link.hash {
        return Err("does not link to the record before it".into());
    }
    if parsed.instance.as_deref() != Some(instance) {
        return Err(format!(
            "written by instance {:?} in the trail of {instance:?}",
            parsed.instance
        ));
    }
    match link_hash(parsed.seq, &parsed.prev, Some(instance), &parsed.event) {
        Ok(h) if h == parsed.hash => Ok(parsed),
        _ => Err("contents do not match their hash: the record was altered".into()),
    }
}

/// The complete lines of a trail from an offset. A last line without its newline is being
/// written (or was cut off by a crash, which the broker itself refuses on restart): it is left
/// for a later pass.
struct Lines {
    path: PathBuf,
    reader: BufReader<File>,
    /// Offset after the last complete line returned.
    offset: u64,
}

impl Lines {
    fn open(path: &Path, offset: u64) -> Result<Lines, ShipError> {
        let mut file = File::open(path).map_err(|e| io(path, e))?;
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| io(path, e))?;
        Ok(Lines {
            path: path.to_owned(),
            reader: BufReader::new(file),
            offset,
        })
    }

    /// The next complete line (without its newline) and the offset after it.
    fn next(&mut self) -> Result<Option<(Vec<u8>, u64)>, ShipError> {
        let mut bytes = Vec::with_capacity(512);
        let n = self
            .reader
            .read_until(b'\n', &mut bytes)
            .map_err(|e| io(&self.path, e))?;
        if n == 0 || bytes.last() != Some(&b'\n') {
            return Ok(None);
        }
        bytes.pop();
        self.offset += n as u64;
        Ok(Some((bytes, self.offset)))
    }
}

fn io(path: &Path, source: std::io::Error) -> ShipError {
    ShipError::Io {
        path: path.to_owned(),
        source,
    }
}

fn to_db(n: u64) -> Result<i64, ShipError> {
    i64::try_from(n).map_err(|_| ShipError::Store(StoreError::Row(format!("{n} is too large"))))
}

fn from_db(n: i64) -> Result<u64, ShipError> {
    u64::try_from(n).map_err(|_| ShipError::Store(StoreError::Row(format!("{n} is negative"))))
}
