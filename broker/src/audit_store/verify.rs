//! `carerecord audit verify --database`: every instance's chain checked again in the store, from
//! its first event to the head the shipper recorded — so a row changed, removed or added in the
//! database (by anyone who got past the append-only trigger) is found, as in a trail file.

use futures::{StreamExt, pin_mut};

use super::schema::{EVENT_COLUMNS, stored_link};
use super::{AuditStore, StoreError};
use crate::audit::{GENESIS_HASH, link_hash};

/// One instance's chain in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceCheck {
    pub instance: String,
    /// Events stored for it.
    pub events: u64,
    /// `None` when every link holds; else the first bad sequence number and why.
    pub broken: Option<(u64, String)>,
}

/// Checks every instance's chain, in instance order.
pub async fn verify(store: &AuditStore) -> Result<Vec<InstanceCheck>, StoreError> {
    let heads = store
        .client()
        .query(
            "SELECT instance, last_seq, last_hash FROM carerecord_audit.trail ORDER BY instance",
            &[],
        )
        .await?;
    let mut checks = Vec::with_capacity(heads.len());
    for head in heads {
        let instance: String = head.try_get("instance")?;
        let last_seq: i64 = head.try_get("last_seq")?;
        let last_hash: String = head.try_get("last_hash")?;
        checks.push(verify_instance(store, instance, last_seq, &last_hash).await?);
    }
    Ok(checks)
}

async fn verify_instance(
    store: &AuditStore,
    instance: String,
    last_seq: i64,
    last_hash: &str,
) -> Result<InstanceCheck, StoreError> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM carerecord_audit.event WHERE instance = $1 ORDER BY seq"
    );
    let rows = store.client().query_raw(&sql, [&instance]).await?;
    pin_mut!(rows);
    let mut prev = GENESIS_HASH.to_owned();
    let mut seq = 0u64;
    let mut broken = None;
    while let Some(row) = rows.next().await {
        let (stored, row_prev, row_hash) = stored_link(&row?)?;
        if broken.is_some() {
            continue;
        }
        let why = if stored.seq != seq + 1 {
            Some(format!(
                "sequence {} where {} was expected: an event is missing",
                stored.seq,
                seq + 1
            ))
        } else if row_prev != prev {
            Some("does not link to the event before it".to_owned())
        } else {
            match link_hash(stored.seq, &row_prev, Some(&instance), &stored.event) {
                Ok(h) if h == row_hash => None,
                _ => Some("contents do not match their hash: the event was altered".to_owned()),
            }
        };
        match why {
            Some(why) => broken = Some((stored.seq, why)),
            None => {
                seq = stored.seq;
                prev = row_hash;
            }
        }
    }
    if broken.is_none() && (i64::try_from(seq).ok() != Some(last_seq) || prev != last_hash) {
        broken = Some((
            seq + 1,
            format!(
                "the chain ends at event {seq}, but the shipper recorded its head at {last_seq}: events were removed"
            ),
        ));
    }
    Ok(InstanceCheck {
        instance,
        events: seq,
        broken,
    })
}
