//! The store's tables, created by the shipper (`CREATE ... IF NOT EXISTS`), and the mapping of
//! an event to a row and back. A row keeps every field of the event exactly as the trail held
//! it (the time as written, too), so the hash chain can be checked again in the database.

use tokio_postgres::Row;

use super::{AuditStore, StoreError, StoredEvent};
use crate::audit::AuditEvent;

/// The schema, as run by [`create`] and shown in OPERATIONS.md. `trail` holds one row per
/// instance: how far its chain has been shipped, moved in the same transaction as the events,
/// so a crashed shipper resumes exactly where the last commit left it. `event` is keyed by
/// `(instance, seq)`: an event cannot be stored twice. Updates, deletes and truncation of
/// events are refused by a trigger (an owner who disables it is still caught by
/// `carerecord audit verify --database`).
pub const SCHEMA: &str = r#"
CREATE SCHEMA IF NOT EXISTS carerecord_audit;

CREATE TABLE IF NOT EXISTS carerecord_audit.trail (
    instance    text PRIMARY KEY,
    last_seq    bigint NOT NULL CHECK (last_seq >= 0),
    last_hash   text NOT NULL,
    file        text NOT NULL,
    file_offset bigint NOT NULL CHECK (file_offset >= 0),
    shipped_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS carerecord_audit.event (
    instance         text NOT NULL REFERENCES carerecord_audit.trail (instance),
    seq              bigint NOT NULL CHECK (seq >= 1),
    prev             text NOT NULL,
    hash             text NOT NULL,
    at               timestamptz NOT NULL,
    time             text NOT NULL,
    request_id       text NOT NULL,
    kind             text NOT NULL,
    system           text NOT NULL,
    user_id          text NOT NULL,
    user_name        text NOT NULL,
    role             text NOT NULL,
    organisation     text NOT NULL,
    patient          text NOT NULL,
    purpose          text NOT NULL,
    emergency_reason text NOT NULL,
    decision         text NOT NULL,
    sources          text[] NOT NULL,
    returned         text[] NOT NULL,
    withheld         boolean NOT NULL,
    from_cache       boolean NOT NULL,
    PRIMARY KEY (instance, seq)
);

CREATE INDEX IF NOT EXISTS event_patient ON carerecord_audit.event (patient, at);
CREATE INDEX IF NOT EXISTS event_at ON carerecord_audit.event (at);

CREATE OR REPLACE FUNCTION carerecord_audit.append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'carerecord audit events are append-only';
END
$$;

CREATE OR REPLACE TRIGGER event_append_only
    BEFORE UPDATE OR DELETE ON carerecord_audit.event
    FOR EACH ROW EXECUTE FUNCTION carerecord_audit.append_only();

CREATE OR REPLACE TRIGGER event_no_truncate
    BEFORE TRUNCATE ON carerecord_audit.event
    FOR EACH STATEMENT EXECUTE FUNCTION carerecord_audit.append_only();
"#;

/// The columns [`stored_event`] reads, in its order.
pub(super) const EVENT_COLUMNS: &str = "instance, seq, prev, hash, time, request_id, kind, system, \
     user_id, user_name, role, organisation, patient, purpose, emergency_reason, decision, \
     sources, returned, withheld, from_cache";

/// Creates the schema when it is missing. A schema already there (perhaps created ahead by a
/// DBA from `carerecord audit schema`) is left alone, so the shipper's role needs no more than
/// `INSERT` and `SELECT` on `event` and `SELECT, INSERT, UPDATE` on `trail`. Shippers starting
/// together take turns (an advisory lock), since concurrent `CREATE ... IF NOT EXISTS` can
/// still collide in PostgreSQL's catalogue.
pub async fn create(store: &mut AuditStore) -> Result<(), StoreError> {
    let present: bool = store
        .client()
        .query_one(
            "SELECT to_regclass('carerecord_audit.trail') IS NOT NULL \
             AND to_regclass('carerecord_audit.event') IS NOT NULL",
            &[],
        )
        .await?
        .try_get(0)?;
    if present {
        return Ok(());
    }
    let tx = store.client_mut().transaction().await?;
    tx.batch_execute("SELECT pg_advisory_xact_lock(hashtext('carerecord_audit.schema'))")
        .await?;
    tx.batch_execute(SCHEMA).await?;
    tx.commit().await?;
    Ok(())
}

/// A row of [`EVENT_COLUMNS`] as the event it stores.
pub(super) fn stored_event(row: &Row) -> Result<StoredEvent, StoreError> {
    Ok(stored_link(row)?.0)
}

/// A row of [`EVENT_COLUMNS`]: the event, and its `prev` and `hash`.
pub(super) fn stored_link(row: &Row) -> Result<(StoredEvent, String, String), StoreError> {
    let seq: i64 = row.try_get("seq")?;
    let stored = StoredEvent {
        instance: row.try_get("instance")?,
        seq: u64::try_from(seq).map_err(|_| StoreError::Row(format!("sequence {seq}")))?,
        event: AuditEvent {
            time: row.try_get("time")?,
            request_id: row.try_get("request_id")?,
            kind: row.try_get("kind")?,
            system: row.try_get("system")?,
            user_id: row.try_get("user_id")?,
            user_name: row.try_get("user_name")?,
            role: row.try_get("role")?,
            organisation: row.try_get("organisation")?,
            patient: row.try_get("patient")?,
            purpose: row.try_get("purpose")?,
            emergency_reason: row.try_get("emergency_reason")?,
            decision: row.try_get("decision")?,
            sources: row.try_get("sources")?,
            returned: row.try_get("returned")?,
            withheld: row.try_get("withheld")?,
            from_cache: row.try_get("from_cache")?,
        },
    };
    Ok((stored, row.try_get("prev")?, row.try_get("hash")?))
}
