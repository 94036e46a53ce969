//! A GP out-of-hours service's JSON API as a carerecord [`Source`], in a crate of its own.
//!
//! The API (a test double of it lives in `tests/`):
//!
//! `GET {base}/patients/{nhs_number}/contacts` answers 200 with
//!
//! ```json
//! {"patient": {"nhs_number": "9990000018", "family": "BAKER", "given": "Hannah",
//!              "birth_date": "1978-12-18"},
//!  "contacts": [{"id": "OOH-77", "date": "2026-11-02T22:10:00Z", "reason_code": "21522001",
//!                "reason": "Abdominal pain", "outcome": "Advised to see own GP",
//!                "updated": "2026-11-02T23:01:00Z"}]}
//! ```
//!
//! or 404 when the service has no record of the patient. Contacts become encounters.
//!
//! What it shows: the HTTP client from [`carerecord_adapters::http::client_builder`] (no rustls
//! provider trap), a size cap on the body, typed parsing with nothing of the body echoed in
//! errors, 404 as `NotFound`, and the deadline respected.

use std::time::Duration;

use carerecord_adapters::http::{client_builder, reqwest};
use carerecord_adapters::proto::{CareRecord, Coding, Entry, Patient, Provenance, Section};
use carerecord_adapters::{
    Source, SourceError, SourceInfo, SourceRecord, SourceReply, SourceRequest, async_trait,
};
use serde::Deserialize;

/// The largest answer read: one patient's contacts are kilobytes.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The out-of-hours service as a source.
pub struct OutOfHoursSource {
    info: SourceInfo,
    base: String,
    http: reqwest::Client,
}

impl OutOfHoursSource {
    /// A source reading the API at `base` (`http://host:port`, no trailing slash needed).
    pub fn new(info: SourceInfo, base: &str) -> Result<Self, SourceError> {
        let http = client_builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| SourceError::Other(format!("cannot build the HTTP client: {e}")))?;
        Ok(OutOfHoursSource {
            info,
            base: base.trim_end_matches('/').to_owned(),
            http,
        })
    }
}

#[derive(Deserialize)]
struct Answer {
    patient: ApiPatient,
    #[serde(default)]
    contacts: Vec<Contact>,
}

#[derive(Deserialize)]
struct ApiPatient {
    nhs_number: String,
    #[serde(default)]
    family: String,
    #[serde(default)]
    given: String,
    #[serde(default)]
    birth_date: String,
}

#[derive(Deserialize)]
struct Contact {
    id: String,
    date: String,
    #[serde(default)]
    reason_code: String,
    reason: String,
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    updated: String,
}

#[async_trait]
impl Source for OutOfHoursSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    async fn fetch(&self, request: &SourceRequest) -> Result<SourceReply, SourceError> {
        let remaining = request.remaining();
        if remaining.is_zero() {
            return Err(SourceError::Timeout);
        }
        let url = format!(
            "{}/patients/{}/contacts",
            self.base,
            request.nhs_number.as_digits()
        );
        let call = async {
            let mut response = self
                .http
                .get(&url)
                .header("x-request-id", &request.request_id)
                .send()
                .await
                .map_err(|e| SourceError::Connect(cause(&e)))?;
            match response.status().as_u16() {
                404 => return Ok(None),
                200 => {}
                other => return Err(SourceError::Status(other)),
            }
            let mut body = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| SourceError::Connect(cause(&e)))?
            {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(SourceError::TooLarge(MAX_BODY_BYTES));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Some(body))
        };
        let body = match tokio::time::timeout(remaining, call).await {
            Err(_elapsed) => return Err(SourceError::Timeout),
            Ok(result) => result?,
        };
        let Some(body) = body else {
            return Ok(SourceReply::NotFound);
        };
        // The serde error names a line and column, never the content.
        let answer: Answer = serde_json::from_slice(&body).map_err(|e| {
            SourceError::InvalidResponse(format!(
                "not an out-of-hours contacts answer ({:?} at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        Ok(SourceReply::Found(record_from(answer, request)))
    }
}

fn record_from(answer: Answer, request: &SourceRequest) -> SourceRecord {
    let mut record = CareRecord {
        patient: Some(Patient {
            nhs_number: answer.patient.nhs_number,
            family_name: answer.patient.family,
            given_names: answer
                .patient
                .given
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            birth_date: answer.patient.birth_date,
            ..Patient::default()
        }),
        ..CareRecord::default()
    };
    let mut warnings = Vec::new();
    if request.sections.contains(Section::Encounters) {
        for contact in answer.contacts {
            if !carerecord_adapters::testkit::is_iso8601(&contact.date) {
                warnings
                    .push("an out-of-hours contact with an unreadable date was left out".into());
                continue;
            }
            record.encounters.push(Entry {
                concept: Some(Coding {
                    system: "http://snomed.info/sct".into(),
                    code: contact.reason_code,
                    display: contact.reason.clone(),
                }),
                summary: if contact.outcome.is_empty() {
                    format!("Out-of-hours contact: {}", contact.reason)
                } else {
                    format!(
                        "Out-of-hours contact: {} — {}",
                        contact.reason, contact.outcome
                    )
                },
                status: "finished".into(),
                effective: contact.date,
                provenance: vec![Provenance {
                    source_entry_id: contact.id,
                    last_updated: contact.updated,
                    ..Provenance::default()
                }],
                ..Entry::default()
            });
        }
    }
    SourceRecord {
        record,
        warnings,
        ..SourceRecord::default()
    }
}

/// The innermost cause (refused, reset, certificate), which is what an operator needs.
fn cause(e: &reqwest::Error) -> String {
    let mut source: &dyn std::error::Error = e;
    while let Some(inner) = source.source() {
        source = inner;
    }
    source.to_string()
}
