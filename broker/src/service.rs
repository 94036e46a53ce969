//! The gRPC face of the broker: `carerecord.v1.CareRecordService`.
//!
//! Per request, and nothing more: identify the calling system from its client certificate, read
//! `grpc-timeout` and `x-request-id`, check the request, call the core ([`Broker::lookup`] or
//! [`Broker::stream`]), and translate what comes back — answers into messages, a
//! [`LookupError`] into a status with the standard rich error model (see [`status_of`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use carerecord_proto::care_record_event::Event;
use carerecord_proto::care_record_service_server::CareRecordService;
use carerecord_proto::{
    CareRecordEvent, DocumentChunk, GetCareRecordRequest, GetCareRecordResponse,
    GetDocumentRequest, SourceEvent,
};
use futures::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tracing::Instrument;

use crate::access::{Caller, Denial, UNVERIFIED};
use crate::budget::parse_grpc_timeout;
use crate::config::SystemConfig;
use crate::error::{ERROR_DOMAIN, LookupError};
use crate::lookup::{Broker, CallingSystem, Disclosed, LookupAnswer, StreamEvent};
use crate::validate::{self, LookupRequest};

/// Implements the service over a shared [`Broker`].
#[derive(Clone)]
pub struct CareRecordApi {
    broker: Arc<Broker>,
    /// Calling systems allowed under mutual TLS; `None` when client certificates are not
    /// required (every caller is then `unverified`).
    systems: Option<Arc<Vec<SystemConfig>>>,
}

impl CareRecordApi {
    pub fn new(broker: Arc<Broker>, systems: Option<Vec<SystemConfig>>) -> Self {
        CareRecordApi {
            broker,
            systems: systems.map(Arc::new),
        }
    }

    /// The calling system, from its client certificate.
    fn identify<T>(&self, request: &Request<T>) -> CallingSystem {
        let Some(systems) = &self.systems else {
            return CallingSystem::Identified(Caller {
                system: UNVERIFIED.to_owned(),
                trusted_assertions: false,
            });
        };
        let Some(certs) = request.peer_certs() else {
            return CallingSystem::Unrecognised;
        };
        let Some(leaf) = certs.first() else {
            return CallingSystem::Unrecognised;
        };
        system_for_certificate(systems, leaf).map_or(CallingSystem::Unrecognised, |s| {
            CallingSystem::Identified(Caller {
                system: s.id.clone(),
                trusted_assertions: s.trusted_assertions,
            })
        })
    }

    /// Who is calling, the caller's `grpc-timeout`, and the request id (the caller's
    /// `x-request-id` when it is plain, else a new one).
    fn context<T>(&self, request: &Request<T>) -> (CallingSystem, Option<Duration>, String) {
        let caller_timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let request_id = request
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|id| acceptable_request_id(id))
            .map(str::to_owned)
            .unwrap_or_else(|| self.broker.new_request_id());
        (self.identify(request), caller_timeout, request_id)
    }

    /// The checked request and who is calling, or the status refusing it.
    fn accept(
        &self,
        request: Request<GetCareRecordRequest>,
    ) -> Result<(LookupRequest, CallingSystem), Status> {
        let (caller, caller_timeout, request_id) = self.context(&request);
        let checked = validate::check(request.into_inner(), request_id.clone(), caller_timeout)
            .map_err(|e| {
                tracing::info!(request_id = %request_id, reason = e.reason(), error = %e, "lookup refused");
                metrics::counter!(crate::metrics::LOOKUPS, "outcome" => e.metric_outcome())
                    .increment(1);
                status_of(&e, &request_id)
            })?;
        Ok((checked, caller))
    }
}

/// The configured calling system a (verified) client certificate is valid for: the same rule
/// on every face.
pub fn system_for_certificate<'a>(
    systems: &'a [SystemConfig],
    leaf: &rustls_pki_types::CertificateDer<'_>,
) -> Option<&'a SystemConfig> {
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    systems.iter().find(|s| {
        rustls_pki_types::ServerName::try_from(s.dns_name.as_str())
            .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    })
}

/// A caller-supplied request id is used only when it is short and plain, so it is safe in logs.
pub fn acceptable_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The server span of one call, joined to the caller's trace by its `traceparent`.
fn traced_call<T>(method: &'static str, request: &Request<T>) -> tracing::Span {
    let span = tracing::info_span!(
        "grpc",
        rpc.method = method,
        request_id = tracing::field::Empty
    );
    let traceparent = request
        .metadata()
        .get(carerecord_adapters::trace::HEADER)
        .and_then(|v| v.to_str().ok());
    crate::telemetry::join_callers_trace(&span, traceparent);
    span
}

type EventStream = Pin<Box<dyn Stream<Item = Result<CareRecordEvent, Status>> + Send>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<DocumentChunk, Status>> + Send>>;

#[tonic::async_trait]
impl CareRecordService for CareRecordApi {
    async fn get_care_record(
        &self,
        request: Request<GetCareRecordRequest>,
    ) -> Result<Response<GetCareRecordResponse>, Status> {
        self.lookup(request)
            .await
            .map(|answer| Response::new(response(answer)))
    }

    type GetDocumentStream = ChunkStream;

    async fn get_document(
        &self,
        request: Request<GetDocumentRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        self.document(request).await.map(Response::new)
    }

    type StreamCareRecordStream = EventStream;

    async fn stream_care_record(
        &self,
        request: Request<GetCareRecordRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let span = traced_call("StreamCareRecord", &request);
        let (request, caller) = self.accept(request)?;
        let request_id = request.request_id.clone();
        span.record("request_id", request_id.as_str());
        let events = self
            .broker
            .stream(request, caller)
            .instrument(span)
            .await
            .map_err(|e| status_of(&e, &request_id))?;
        let stream: EventStream = Box::pin(events.map(move |item| match item {
            Ok(StreamEvent::Source(update)) => Ok(event(Event::Source(SourceEvent {
                status: Some(update.status),
                contribution: update.contribution,
            }))),
            Ok(StreamEvent::Complete(answer)) => Ok(event(Event::Complete(response(answer)))),
            Err(e) => Err(status_of(&e, &request_id)),
        }));
        Ok(Response::new(stream))
    }
}

impl CareRecordApi {
    /// `GetCareRecord` up to the answer: the served path encodes it without copying the record
    /// ([`crate::record_response`]).
    pub async fn lookup(
        &self,
        request: Request<GetCareRecordRequest>,
    ) -> Result<LookupAnswer, Status> {
        let span = traced_call("GetCareRecord", &request);
        let (request, caller) = self.accept(request)?;
        let request_id = request.request_id.clone();
        span.record("request_id", request_id.as_str());
        self.broker
            .lookup(request, caller)
            .instrument(span)
            .await
            .map_err(|e| status_of(&e, &request_id))
    }

    /// `GetDocument`: the document's patient is looked up for this requester (the same access
    /// decision and audit as `GetCareRecord`), then the content is streamed through.
    async fn document(&self, request: Request<GetDocumentRequest>) -> Result<ChunkStream, Status> {
        let (caller, caller_timeout, request_id) = self.context(&request);
        let inner = request.into_inner();
        let refuse = |e: LookupError| {
            tracing::info!(request_id = %request_id, reason = e.reason(), error = %e, "document refused");
            status_of(&e, &request_id)
        };
        let doc = self
            .broker
            .open_document(&inner.document_id)
            .ok_or_else(|| refuse(LookupError::DocumentNotFound))?;
        let lookup = GetCareRecordRequest {
            nhs_number: doc.nhs_number.as_digits(),
            requester: inner.requester,
            sections: Vec::new(),
            cache: carerecord_proto::CacheDirective::AllowCached as i32,
            via_brokers: Vec::new(),
        };
        let checked =
            validate::check(lookup, request_id.clone(), caller_timeout).map_err(&refuse)?;
        let answer = self
            .broker
            .document(
                checked,
                &inner.document_id,
                caller,
                crate::documents::DEFAULT_MAX_DOCUMENT_BYTES,
            )
            .await
            .map_err(&refuse)?;
        let doc = answer.document;
        let mut first = Some((doc.content_type, doc.length.unwrap_or(0)));
        let chunks = doc.body.map(move |chunk| match chunk {
            Ok(data) => {
                let (content_type, length) = first.take().unwrap_or_default();
                Ok(DocumentChunk {
                    content_type,
                    length,
                    data: data.to_vec(),
                })
            }
            Err(e) => Err(Status::unavailable(format!(
                "the document was cut short by its organisation: {e}"
            ))),
        });
        Ok(Box::pin(chunks))
    }
}

fn event(e: Event) -> CareRecordEvent {
    CareRecordEvent { event: Some(e) }
}

/// The wire response for a core answer.
pub fn response(answer: LookupAnswer) -> GetCareRecordResponse {
    let (mut message, record) = response_without_record(answer);
    message.record = Some(record.into_owned());
    message
}

/// [`response`] with the record left out, and the record as disclosed.
pub fn response_without_record(answer: LookupAnswer) -> (GetCareRecordResponse, Disclosed) {
    let message = GetCareRecordResponse {
        from_cache: answer.from_cache(),
        cache_age_ms: answer
            .cache_age
            .map_or(0, |age| age.as_millis().try_into().unwrap_or(u64::MAX)),
        request_id: answer.request_id,
        record: None,
        sources: answer.sources,
        complete: answer.complete,
        warnings: answer.warnings,
        emergency_access: answer.emergency_access,
        withheld: answer.withheld,
        assembled_at: carerecord_adapters::calendar::rfc3339(answer.assembled_at),
        locators: answer.locators,
        section_statuses: answer.section_statuses,
    };
    (message, answer.record)
}

/// The gRPC code for each failure: the one place the core's errors meet gRPC.
fn code_of(e: &LookupError) -> Code {
    match e {
        LookupError::InvalidNhsNumber(_)
        | LookupError::UnknownSection(_)
        | LookupError::MalformedRequesterField { .. }
        | LookupError::MalformedViaBrokers
        | LookupError::EmergencyWithoutReason
        | LookupError::UnknownPurpose(_)
        | LookupError::UnknownCacheDirective(_) => Code::InvalidArgument,
        LookupError::MissingRequester | LookupError::MissingRequesterField(_) => {
            Code::Unauthenticated
        }
        // A relationship that could not be checked is worth retrying.
        LookupError::Denied(Denial::RelationshipUnconfirmed(_)) => Code::Unavailable,
        LookupError::Denied(_) => Code::PermissionDenied,
        LookupError::Loop(_) => Code::FailedPrecondition,
        LookupError::Deadline(_) => Code::DeadlineExceeded,
        LookupError::Overloaded { .. } => Code::ResourceExhausted,
        LookupError::ShuttingDown
        | LookupError::AuditUnavailable
        | LookupError::DocumentUnavailable(_) => Code::Unavailable,
        LookupError::DocumentNotFound => Code::NotFound,
    }
}

/// The status for a failure, with `google.rpc` details a client reads without parsing text:
/// always `ErrorInfo` (stable reason, [`ERROR_DOMAIN`], the `request_id`); `BadRequest` naming
/// the field at fault where there is one; `RetryInfo` (and the `grpc-retry-pushback-ms` header
/// gRPC clients honour) when the remedy is to wait.
pub fn status_of(e: &LookupError, request_id: &str) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(
        e.reason(),
        ERROR_DOMAIN,
        [("request_id".to_owned(), request_id.to_owned())],
    );
    if let Some(field) = e.field() {
        details.add_bad_request_violation(field, e.to_string());
    }
    let retry_after = e.retry_after();
    if let Some(delay) = retry_after {
        details.set_retry_info(Some(delay));
    }
    let mut status = Status::with_error_details(code_of(e), e.to_string(), details);
    if let Some(delay) = retry_after
        && let Ok(v) = pushback_ms(delay).parse()
    {
        status.metadata_mut().insert("grpc-retry-pushback-ms", v);
    }
    status
}

fn pushback_ms(delay: Duration) -> String {
    delay.as_millis().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::BudgetError;

    /// Every reason, with its code and whether it names a field or carries a retry hint; the
    /// details are read back as a client would.
    #[test]
    fn every_failure_maps_to_its_code_and_rich_details() {
        let cases: Vec<(LookupError, Code, Option<&str>, bool)> = vec![
            (
                LookupError::InvalidNhsNumber(carerecord_adapters::NhsNumberError::Empty),
                Code::InvalidArgument,
                Some("nhs_number"),
                false,
            ),
            (
                LookupError::UnknownSection(carerecord_adapters::UnknownSection(77)),
                Code::InvalidArgument,
                Some("sections"),
                false,
            ),
            (
                LookupError::MissingRequester,
                Code::Unauthenticated,
                Some("requester"),
                false,
            ),
            (
                LookupError::MissingRequesterField("role_code"),
                Code::Unauthenticated,
                Some("requester.role_code"),
                false,
            ),
            (
                LookupError::MalformedRequesterField {
                    field: "user_id",
                    why: "longer than 256 bytes",
                },
                Code::InvalidArgument,
                Some("requester.user_id"),
                false,
            ),
            (
                LookupError::MalformedViaBrokers,
                Code::InvalidArgument,
                Some("via_brokers"),
                false,
            ),
            (
                LookupError::EmergencyWithoutReason,
                Code::InvalidArgument,
                Some("requester.emergency_reason"),
                false,
            ),
            (
                LookupError::UnknownPurpose(42),
                Code::InvalidArgument,
                Some("requester.purpose"),
                false,
            ),
            (
                LookupError::UnknownCacheDirective(9),
                Code::InvalidArgument,
                Some("cache"),
                false,
            ),
            (
                LookupError::Denied(Denial::Role("R0001".into())),
                Code::PermissionDenied,
                Some("requester.role_code"),
                false,
            ),
            (
                LookupError::Denied(Denial::EmergencyRole("R0001".into())),
                Code::PermissionDenied,
                Some("requester.role_code"),
                false,
            ),
            (
                LookupError::Denied(Denial::NoRelationship("X1".into())),
                Code::PermissionDenied,
                None,
                false,
            ),
            (
                LookupError::Denied(Denial::UnknownSystem),
                Code::PermissionDenied,
                None,
                false,
            ),
            (
                LookupError::Denied(Denial::RelationshipUnconfirmed("X1".into())),
                Code::Unavailable,
                None,
                false,
            ),
            (
                LookupError::Loop("b1".into()),
                Code::FailedPrecondition,
                None,
                false,
            ),
            (
                LookupError::Deadline(BudgetError::TooShort(Duration::from_millis(5))),
                Code::DeadlineExceeded,
                None,
                false,
            ),
            (
                LookupError::Overloaded {
                    limit: 48,
                    retry_after: Duration::from_millis(250),
                },
                Code::ResourceExhausted,
                None,
                true,
            ),
            (LookupError::ShuttingDown, Code::Unavailable, None, false),
            (
                LookupError::AuditUnavailable,
                Code::Unavailable,
                None,
                false,
            ),
        ];
        for (error, code, field, retry) in cases {
            let reason = error.reason();
            let status = status_of(&error, "req-1");
            assert_eq!(status.code(), code, "{reason}");
            let info = status.get_details_error_info().expect("ErrorInfo");
            assert_eq!(info.reason, reason);
            assert_eq!(info.domain, ERROR_DOMAIN);
            assert_eq!(
                info.metadata.get("request_id").map(String::as_str),
                Some("req-1")
            );
            let fields: Vec<String> = status
                .get_details_bad_request()
                .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
                .unwrap_or_default();
            assert_eq!(
                fields,
                field.map(str::to_owned).into_iter().collect::<Vec<_>>(),
                "{reason}"
            );
            let delay = status.get_details_retry_info().and_then(|r| r.retry_delay);
            let pushback = status
                .metadata()
                .get("grpc-retry-pushback-ms")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if retry {
                assert_eq!(delay, Some(Duration::from_millis(250)), "{reason}");
                assert_eq!(pushback.as_deref(), Some("250"), "{reason}");
            } else {
                assert_eq!((delay, pushback), (None, None), "{reason}");
            }
        }
    }
}
