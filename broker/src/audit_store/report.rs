//! `carerecord audit report`: the usage a region's board asks of a shared care record — how often
//! records were viewed, by which organisations and roles, month by month, how often emergency
//! access was used, and how many patients and staff that touched — from the same store that
//! answers a patient's request.
//!
//! A *view* is a record disclosed (`access` or `break_glass`); *emergency* counts `break_glass`;
//! *documents* counts documents retrieved; *denied* counts refusals. Unique patients are those
//! whose record or documents were disclosed; unique staff are distinct (organisation, user id)
//! pairs that were disclosed something.

use std::fmt::Write;

use serde::Serialize;

use super::{AuditStore, StoreError};

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The period covered: events at or after `from` and before `to` (RFC 3339 or a date; empty
    /// means unbounded).
    pub from: String,
    pub to: String,
    pub total: Figures,
    pub by_organisation: Vec<Row>,
    pub by_role: Vec<Row>,
    /// Month as `YYYY-MM` (UTC).
    pub by_month: Vec<Row>,
}

/// The figures for one group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Figures {
    pub views: u64,
    pub emergency: u64,
    pub documents: u64,
    pub denied: u64,
    pub unique_patients: u64,
    pub unique_staff: u64,
}

/// One line of a breakdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub key: String,
    #[serde(flatten)]
    pub figures: Figures,
}

/// The period a report covers; `None` is unbounded.
#[derive(Debug, Clone, Default)]
pub struct Period {
    pub from: Option<String>,
    pub to: Option<String>,
}

const FIGURES: &str = "\
    count(*) FILTER (WHERE kind IN ('access', 'break_glass')) AS views, \
    count(*) FILTER (WHERE kind = 'break_glass') AS emergency, \
    count(*) FILTER (WHERE kind = 'document') AS documents, \
    count(*) FILTER (WHERE kind = 'denied') AS denied, \
    count(DISTINCT patient) FILTER (WHERE kind IN ('access', 'break_glass', 'document')) \
        AS unique_patients, \
    count(DISTINCT (organisation, user_id)) \
        FILTER (WHERE kind IN ('access', 'break_glass', 'document')) AS unique_staff";

const PERIOD: &str = "at >= CAST(coalesce($1::text, '-infinity') AS timestamptz) \
     AND at < CAST(coalesce($2::text, 'infinity') AS timestamptz)";

/// Builds the report for `period`.
pub async fn report(store: &AuditStore, period: &Period) -> Result<Report, StoreError> {
    let total = group(store, period, None).await?;
    Ok(Report {
        from: period.from.clone().unwrap_or_default(),
        to: period.to.clone().unwrap_or_default(),
        total: total
            .into_iter()
            .next()
            .map(|r| r.figures)
            .unwrap_or_default(),
        by_organisation: group(store, period, Some("organisation")).await?,
        by_role: group(store, period, Some("role")).await?,
        by_month: group(
            store,
            period,
            Some("to_char(at AT TIME ZONE 'UTC', 'YYYY-MM')"),
        )
        .await?,
    })
}

/// The figures per value of `key` (one row for all when `None`).
async fn group(
    store: &AuditStore,
    period: &Period,
    key: Option<&str>,
) -> Result<Vec<Row>, StoreError> {
    let sql = match key {
        Some(key) => format!(
            "SELECT {key} AS key, {FIGURES} FROM carerecord_audit.event WHERE {PERIOD} \
             GROUP BY 1 ORDER BY 1"
        ),
        None => format!("SELECT '' AS key, {FIGURES} FROM carerecord_audit.event WHERE {PERIOD}"),
    };
    let rows = store
        .client()
        .query(&sql, &[&period.from, &period.to])
        .await?;
    rows.iter()
        .map(|r| {
            let n = |c: &str| -> Result<u64, StoreError> {
                let v: i64 = r.try_get(c)?;
                u64::try_from(v).map_err(|_| StoreError::Row(format!("{c} = {v}")))
            };
            Ok(Row {
                key: r.try_get("key")?,
                figures: Figures {
                    views: n("views")?,
                    emergency: n("emergency")?,
                    documents: n("documents")?,
                    denied: n("denied")?,
                    unique_patients: n("unique_patients")?,
                    unique_staff: n("unique_staff")?,
                },
            })
        })
        .collect()
}

impl Report {
    /// The report as plain-text tables.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let period = match (self.from.as_str(), self.to.as_str()) {
            ("", "") => "all time".to_owned(),
            (from, "") => format!("from {from}"),
            ("", to) => format!("before {to}"),
            (from, to) => format!("from {from}, before {to}"),
        };
        let _ = writeln!(out, "Shared care record usage, {period}");
        let total = Row {
            key: "total".into(),
            figures: self.total.clone(),
        };
        section(&mut out, "", std::slice::from_ref(&total));
        section(&mut out, "organisation", &self.by_organisation);
        section(&mut out, "role", &self.by_role);
        section(&mut out, "month", &self.by_month);
        out
    }
}

fn section(out: &mut String, title: &str, rows: &[Row]) {
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{title:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "views", "emergency", "documents", "denied", "patients", "staff"
    );
    for r in rows {
        let f = &r.figures;
        let _ = writeln!(
            out,
            "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            r.key, f.views, f.emergency, f.documents, f.denied, f.unique_patients, f.unique_staff
        );
    }
}
