//! Documents through the broker: the same access decision as a lookup of the patient, the
//! document must be in the record this requester may see, an audit event for the retrieval,
//! then the content streamed from the organisation that holds it, through its resilience layers.

use std::time::SystemTime;

use carerecord_adapters::{Document, DocumentRequest};
use carerecord_proto::entry::Detail;
use tokio::time::Instant;

use super::{Broker, CallingSystem};
use crate::access::Caller;
use crate::documents::{DocumentRef, PREFIX};
use crate::error::LookupError;
use crate::validate::LookupRequest;

/// A document on its way.
#[derive(Debug)]
pub struct DocumentAnswer {
    pub request_id: String,
    /// Which organisation holds it.
    pub source_id: String,
    pub document: Document,
}

impl Broker {
    /// What a document id stands for (the patient it belongs to, for the face to check the
    /// request against); `None` for an id this broker did not issue.
    pub fn open_document(&self, id: &str) -> Option<DocumentRef> {
        self.documents.open(id.strip_prefix(PREFIX).unwrap_or(id))
    }

    /// Retrieves one document for `request` (a lookup of the document's patient, by the
    /// requester asking). `max_bytes` caps the content.
    pub async fn document(
        &self,
        request: LookupRequest,
        document_id: &str,
        caller: CallingSystem,
        max_bytes: u64,
    ) -> Result<DocumentAnswer, LookupError> {
        let span = tracing::info_span!("document", request_id = %request.request_id);
        let id = document_id.strip_prefix(PREFIX).unwrap_or(document_id);
        let Some(doc) = self.documents.open(id) else {
            return Err(LookupError::DocumentNotFound);
        };
        if doc.nhs_number != request.nhs_number {
            return Err(LookupError::DocumentNotFound);
        }
        let who = match &caller {
            CallingSystem::Identified(c) => c.clone(),
            CallingSystem::Unrecognised => Caller {
                system: "unknown".to_owned(),
                trusted_assertions: false,
            },
        };
        // The lookup decides access (role, relationship, objection, sensitive entries) and
        // audits it, exactly as for the record itself; usually a cache hit.
        let answer =
            tracing::Instrument::instrument(self.lookup(request.clone(), caller), span.clone())
                .await?;
        let reference = format!("{PREFIX}{id}");
        let listed = answer
            .record
            .documents
            .iter()
            .any(|e| matches!(&e.detail, Some(Detail::Document(d)) if d.url == reference));
        let decision = if listed {
            format!("document retrieved from {}", doc.source_id)
        } else {
            "document not in the record this requester may see".to_owned()
        };
        let kind = if listed { "document" } else { "denied" };
        let mut event = self.audit_event(&request, &who, kind, decision, None, None, false);
        event.returned = if listed {
            vec!["document:1".to_owned()]
        } else {
            Vec::new()
        };
        event.sources = vec![doc.source_id.clone()];
        event.time = carerecord_adapters::calendar::rfc3339(SystemTime::now());
        if let Err(e) = self.audit.record(&event).await {
            tracing::error!(request_id = %request.request_id, error = %e, "audit trail unavailable: not retrieving");
            return Err(LookupError::AuditUnavailable);
        }
        if !listed {
            return Err(LookupError::DocumentNotFound);
        }
        let sources = self.sources();
        let configured = sources
            .sources
            .iter()
            .find(|s| s.source.info().id == doc.source_id)
            .ok_or_else(|| {
                LookupError::DocumentUnavailable("that organisation is no longer configured".into())
            })?;
        let deadline = Instant::now() + configured.timeout.min(self.deadlines.max_lookup);
        let fetch = DocumentRequest {
            request_id: request.request_id.clone(),
            url: doc.url,
            deadline,
            max_bytes,
            requester: request.requester.clone(),
        };
        let document = configured
            .guards
            .call(deadline, false, configured.source.fetch_document(&fetch))
            .await
            .map_err(|f| {
                let e = f.into_source_error("document");
                tracing::warn!(parent: &span, source = %doc.source_id, error = %e, "document not served");
                LookupError::DocumentUnavailable(e.to_string())
            })?;
        tracing::info!(parent: &span, source = %doc.source_id, content_type = %document.content_type, "document retrieved");
        Ok(DocumentAnswer {
            request_id: request.request_id,
            source_id: doc.source_id,
            document,
        })
    }
}
