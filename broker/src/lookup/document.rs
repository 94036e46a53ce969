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

/// A source that sends nothing for this long ends the document (cut short).
const IDLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);
/// No document streams for longer than this, however it trickles.
const STREAM_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

type Body =
    futures::stream::BoxStream<'static, Result<bytes::Bytes, carerecord_adapters::SourceError>>;

/// The content, cut short (with a timeout error) when a chunk takes longer than `IDLE_LIMIT`
/// or the whole passes `until`: a slow source or a stalled transfer never holds a connection
/// for ever.
fn bounded(body: Body, until: Instant) -> Body {
    use futures::StreamExt;
    Box::pin(futures::stream::unfold(
        Some(body),
        move |state| async move {
            let mut body = state?;
            let limit = (Instant::now() + IDLE_LIMIT).min(until);
            match tokio::time::timeout_at(limit, body.next()).await {
                Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(body))),
                Ok(Some(Err(e))) => Some((Err(e), None)),
                Ok(None) => None,
                Err(_) => Some((Err(carerecord_adapters::SourceError::Timeout), None)),
            }
        },
    ))
}

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
        let document = Document {
            body: bounded(document.body, Instant::now() + STREAM_LIMIT),
            ..document
        };
        Ok(DocumentAnswer {
            request_id: request.request_id,
            source_id: doc.source_id,
            document,
        })
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_document_that_stops_arriving_is_cut_short_not_waited_on_for_ever() {
        let stalled: Body = Box::pin(
            futures::stream::iter([Ok(bytes::Bytes::from_static(b"first part"))])
                .chain(futures::stream::pending()),
        );
        let mut body = bounded(stalled, Instant::now() + STREAM_LIMIT);
        assert_eq!(
            body.next().await.and_then(Result::ok),
            Some(bytes::Bytes::from_static(b"first part"))
        );
        assert!(matches!(
            body.next().await,
            Some(Err(carerecord_adapters::SourceError::Timeout))
        ));
        assert!(body.next().await.is_none(), "and it ends there");
    }
}
