//! An in-memory source with fixed data and a configurable delay and failure: for tests, demos and
//! chaos. It implements the same [`Source`] trait as every real adapter.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use carerecord_proto::CareRecord;

use crate::{
    Document, DocumentRequest, NhsNumber, SectionSet, Shortfall, Source, SourceError, SourceInfo,
    SourceRecord, SourceReply, SourceRequest,
};

/// How an [`InMemorySource`] misbehaves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Behaviour {
    /// Answer from its data after the delay.
    #[default]
    Normal,
    /// Fail with this error after the delay.
    Fail(SourceError),
    /// Never answer (until the caller gives up).
    Hang,
}

/// A source that answers from a map of patients.
#[derive(Debug)]
pub struct InMemorySource {
    info: SourceInfo,
    patients: HashMap<NhsNumber, CareRecord>,
    delay: Duration,
    behaviour: std::sync::RwLock<Behaviour>,
    calls: Arc<AtomicU64>,
    completed: Arc<AtomicU64>,
    /// Shortfalls every answer reports (a source cut short), for tests and demos of PARTIAL.
    shortfalls: Vec<Shortfall>,
    /// Wrong-patient rejects every answer reports, for tests and demos of WRONG_PATIENT.
    wrong_patient: Vec<String>,
    /// Documents by URL: (content type, content).
    documents: HashMap<String, (String, bytes::Bytes)>,
}

impl InMemorySource {
    /// An empty source that knows nobody.
    pub fn new(id: &str, organisation_code: &str, organisation_name: &str) -> Self {
        InMemorySource {
            info: SourceInfo {
                id: id.to_owned(),
                organisation_code: organisation_code.to_owned(),
                organisation_name: organisation_name.to_owned(),
            },
            patients: HashMap::new(),
            delay: Duration::ZERO,
            behaviour: std::sync::RwLock::new(Behaviour::Normal),
            calls: Arc::default(),
            completed: Arc::default(),
            shortfalls: Vec::new(),
            wrong_patient: Vec::new(),
            documents: HashMap::new(),
        }
    }

    /// Serves `content` at `url` (the URL its records' document entries carry).
    pub fn with_document(
        mut self,
        url: &str,
        content_type: &str,
        content: impl Into<bytes::Bytes>,
    ) -> Self {
        self.documents
            .insert(url.to_owned(), (content_type.to_owned(), content.into()));
        self
    }

    /// Adds a patient's record (demographics and entries).
    pub fn with_patient(mut self, nhs_number: NhsNumber, record: CareRecord) -> Self {
        self.patients.insert(nhs_number, record);
        self
    }

    /// Every answer says its data for `sections` was cut short, for `reason`.
    pub fn with_shortfall(mut self, sections: SectionSet, reason: &str) -> Self {
        self.shortfalls.push(Shortfall {
            sections,
            reason: reason.to_owned(),
        });
        self
    }

    /// Every answer reports a resource about another patient, discarded (`description` says
    /// which, as an adapter would: type and why, no content).
    pub fn with_wrong_patient(mut self, description: &str) -> Self {
        self.wrong_patient.push(description.to_owned());
        self
    }

    /// Delays every answer.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Sets how the source behaves.
    pub fn with_behaviour(self, behaviour: Behaviour) -> Self {
        self.set_behaviour(behaviour);
        self
    }

    /// Changes how the source behaves from now on.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        // A poisoned lock only means a panic elsewhere mid-write of a plain enum: keep going.
        *self.behaviour.write().unwrap_or_else(|e| e.into_inner()) = behaviour;
    }

    /// How many times `fetch` has been called.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// How many `fetch` calls ran to completion (were not cancelled).
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Source for InMemorySource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    async fn fetch_document(&self, request: &DocumentRequest) -> Result<Document, SourceError> {
        let Some((content_type, content)) = self.documents.get(&request.url) else {
            return Err(SourceError::Status(404));
        };
        if content.len() as u64 > request.max_bytes {
            return Err(SourceError::TooLarge(
                usize::try_from(request.max_bytes).unwrap_or(usize::MAX),
            ));
        }
        // In two chunks, so a consumer that reads one chunk only is caught.
        let half = content.len() / 2;
        let chunks = vec![Ok(content.slice(..half)), Ok(content.slice(half..))];
        Ok(Document {
            content_type: content_type.clone(),
            length: Some(content.len() as u64),
            body: Box::pin(futures::stream::iter(chunks)),
        })
    }

    async fn fetch(&self, request: &SourceRequest) -> Result<SourceReply, SourceError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let behaviour = self
            .behaviour
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if behaviour == Behaviour::Hang {
            std::future::pending::<()>().await;
        }
        if !self.delay.is_zero()
            && tokio::time::timeout_at(request.deadline, tokio::time::sleep(self.delay))
                .await
                .is_err()
        {
            return Err(SourceError::Timeout);
        }
        self.completed.fetch_add(1, Ordering::SeqCst);
        if let Behaviour::Fail(error) = behaviour {
            return Err(error);
        }
        let Some(full) = self.patients.get(&request.nhs_number) else {
            return Ok(SourceReply::NotFound);
        };
        let mut record = CareRecord {
            patient: full.patient.clone(),
            ..CareRecord::default()
        };
        for section in request.sections.iter() {
            if let Some(entries) = record.section_mut(section) {
                entries.extend_from_slice(full.section(section));
            }
        }
        let mut record = SourceRecord {
            record,
            shortfalls: self.shortfalls.clone(),
            wrong_patient: self.wrong_patient.clone(),
            ..SourceRecord::default()
        };
        record.stamp_provenance(&self.info);
        Ok(SourceReply::Found(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carerecord_proto::{Requester, Section};

    #[tokio::test]
    async fn shortfalls_and_wrong_patient_rejects_reach_the_answer() {
        let nhs = NhsNumber::parse("9434765919").expect("valid");
        let source = InMemorySource::new("s", "ORG", "Org")
            .with_patient(nhs, CareRecord::default())
            .with_shortfall(
                SectionSet::NONE.with(Section::TestResults),
                "cut at 20 pages",
            )
            .with_wrong_patient("Observation: subject is Patient/other");
        let request = SourceRequest {
            request_id: "r".into(),
            nhs_number: nhs,
            sections: SectionSet::ALL,
            deadline: tokio::time::Instant::now() + Duration::from_secs(1),
            requester: Requester::default(),
            via_brokers: Vec::new(),
        };
        let Ok(SourceReply::Found(record)) = source.fetch(&request).await else {
            panic!("found");
        };
        assert_eq!(record.shortfalls.len(), 1);
        assert_eq!(record.wrong_patient.len(), 1);
    }
}
