//! The `Locator` trait: where are a patient's records? A region has thousands of organisations;
//! a record locator (the National Record Locator's pointers, the registered GP from the
//! demographics service) names the few that hold records for this patient, so the broker asks
//! only those.
//!
//! Same habits as [`Source`](crate::Source): async, object-safe, deadline-aware,
//! cancellation-safe, typed errors. A locator holds no clinical content.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use carerecord_proto::Requester;
use tokio::time::Instant;

use crate::{NhsNumber, SourceError};

/// One question to a locator.
#[derive(Debug, Clone)]
pub struct LocateRequest {
    pub request_id: String,
    pub nhs_number: NhsNumber,
    /// When the broker stops waiting and asks only its always-ask sources.
    pub deadline: Instant,
    /// Forwarded for the locator's own audit.
    pub requester: Requester,
}

/// Where records are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Located {
    /// ODS codes of organisations holding records for the patient, without duplicates.
    pub organisations: Vec<String>,
    /// (ODS code, that organisation's own id for the patient) where the locator said it (a
    /// record pointer to the patient's record there). A hint the organisation's source may use
    /// to read the record in one request; never trusted: every answer is still verified
    /// against the NHS number.
    pub patient_ids: Vec<(String, String)>,
}

impl Located {
    /// Adds an organisation unless already named.
    pub fn add(&mut self, code: &str) {
        let code = code.trim();
        if !code.is_empty()
            && !self
                .organisations
                .iter()
                .any(|c| c.eq_ignore_ascii_case(code))
        {
            self.organisations.push(code.to_owned());
        }
    }

    /// Adds an organisation and its id for the patient (the first id named wins).
    pub fn add_with_patient_id(&mut self, code: &str, patient_id: &str) {
        self.add(code);
        let code = code.trim();
        if !code.is_empty()
            && !self
                .patient_ids
                .iter()
                .any(|(c, _)| c.eq_ignore_ascii_case(code))
        {
            self.patient_ids
                .push((code.to_owned(), patient_id.to_owned()));
        }
    }
}

/// A record locator.
#[async_trait]
pub trait Locator: Send + Sync {
    /// The broker's name for this locator (in responses and metrics).
    fn id(&self) -> &str;

    /// The organisations holding records for the patient. An unknown patient is `Ok` with no
    /// organisations, not an error.
    async fn locate(&self, request: &LocateRequest) -> Result<Located, SourceError>;
}

/// A locator with a fixed answer per patient, optional delay and failure: for tests and demos.
#[derive(Debug, Default)]
pub struct StaticLocator {
    id: String,
    answers: HashMap<NhsNumber, Vec<String>>,
    delay: Duration,
    failure: Option<SourceError>,
    calls: std::sync::atomic::AtomicU64,
}

impl StaticLocator {
    pub fn new(id: &str) -> Self {
        StaticLocator {
            id: id.to_owned(),
            ..StaticLocator::default()
        }
    }

    pub fn with(mut self, nhs_number: NhsNumber, organisations: &[&str]) -> Self {
        self.answers.insert(
            nhs_number,
            organisations.iter().map(|s| (*s).to_owned()).collect(),
        );
        self
    }

    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn failing(mut self, error: SourceError) -> Self {
        self.failure = Some(error);
        self
    }

    /// How many times it was asked.
    pub fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait]
impl Locator for StaticLocator {
    fn id(&self) -> &str {
        &self.id
    }

    async fn locate(&self, request: &LocateRequest) -> Result<Located, SourceError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if let Some(e) = &self.failure {
            return Err(e.clone());
        }
        let mut located = Located::default();
        for code in self.answers.get(&request.nhs_number).into_iter().flatten() {
            located.add(code);
        }
        Ok(located)
    }
}
