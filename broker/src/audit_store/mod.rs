//! The region's audit store: every broker instance's trail gathered in PostgreSQL, one hash
//! chain per instance, so a patient can be told everyone who looked at their record region-wide
//! and a board can be given the figures a shared care record is judged by.
//!
//! The broker never writes here: it appends to its own file ([`crate::audit`]) and fails closed
//! on that alone. `carerecord audit ship` ([`ship`]) carries each trail into the store,
//! verifying every link on the way in; [`verify`], [`AuditStore::patient`] and [`report`] read
//! it back. Only the command-line tools use this module.

pub mod report;
pub mod schema;
pub mod ship;
pub mod verify;

use std::net::IpAddr;

use serde::Serialize;
use tokio_postgres::config::Host;

use crate::audit::AuditEvent;

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("audit database: {}", describe(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("audit database address: {0}")]
    Address(String),
    #[error(
        "audit database at {host} is not on this machine, and the connection would carry NHS numbers and staff names unencrypted: connect through a loopback address or a Unix socket (a TLS proxy sidecar such as pgbouncer or cloud-sql-proxy listens there), or pass --allow-plaintext-on-network on an isolated network"
    )]
    PlaintextOnNetwork { host: String },
    #[error("audit database row: {0}")]
    Row(String),
}

/// A connection to the store.
pub struct AuditStore {
    client: tokio_postgres::Client,
    /// Drives the connection; ends when the client is dropped.
    _connection: tokio::task::JoinHandle<()>,
}

/// One stored event with where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredEvent {
    /// The broker instance whose trail holds it.
    pub instance: String,
    /// Its place in that instance's chain.
    pub seq: u64,
    #[serde(flatten)]
    pub event: AuditEvent,
}

impl AuditStore {
    /// Connects to `url` (a `postgresql://` URL or `key=value` string; it may carry a password,
    /// so it is never logged or echoed). Without TLS the server must be on this machine
    /// (loopback or a Unix socket) unless `allow_plaintext_on_network`.
    pub async fn connect(url: &str, allow_plaintext_on_network: bool) -> Result<Self, StoreError> {
        let config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
            StoreError::Address(format!("not a PostgreSQL connection string: {e}"))
        })?;
        if !allow_plaintext_on_network && let Some(host) = off_machine(&config) {
            return Err(StoreError::PlaintextOnNetwork { host });
        }
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "audit database connection ended");
            }
        });
        Ok(AuditStore {
            client,
            _connection: connection,
        })
    }

    /// Whether the connection has gone (a follower reconnects).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Every event about one patient across all instances, oldest first.
    pub async fn patient(&self, nhs_digits: &str) -> Result<Vec<StoredEvent>, StoreError> {
        let sql = format!(
            "SELECT {} FROM carerecord_audit.event WHERE patient = $1 ORDER BY at, instance, seq",
            schema::EVENT_COLUMNS
        );
        let rows = self.client.query(&sql, &[&nhs_digits]).await?;
        rows.iter().map(schema::stored_event).collect()
    }

    pub(crate) fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }

    pub(crate) fn client_mut(&mut self) -> &mut tokio_postgres::Client {
        &mut self.client
    }
}

/// The server's own message (tokio-postgres says only "db error" and keeps it in the source).
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// The first host `config` names that is not this machine, if any.
fn off_machine(config: &tokio_postgres::Config) -> Option<String> {
    let local = |name: &str| {
        name.eq_ignore_ascii_case("localhost")
            || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    };
    if let Some(addr) = config.get_hostaddrs().iter().find(|a| !a.is_loopback()) {
        return Some(addr.to_string());
    }
    config.get_hosts().iter().find_map(|h| match h {
        Host::Tcp(name) if !local(name) && config.get_hostaddrs().is_empty() => Some(name.clone()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn off(url: &str) -> Option<String> {
        off_machine(&url.parse().expect("parses"))
    }

    #[test]
    fn only_this_machine_is_reached_without_tls() {
        assert_eq!(off("postgresql://audit@127.0.0.1:5432/audit"), None);
        assert_eq!(off("postgresql://audit@localhost/audit"), None);
        assert_eq!(off("host=/var/run/postgresql user=audit"), None);
        assert_eq!(off("host=::1 user=audit"), None);
        assert_eq!(
            off("postgresql://audit:secret@db.example.nhs.uk/audit").as_deref(),
            Some("db.example.nhs.uk")
        );
        assert_eq!(off("host=10.0.0.5 user=audit").as_deref(), Some("10.0.0.5"));
    }
}
