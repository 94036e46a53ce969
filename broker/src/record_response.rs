//! `GetCareRecord` answered without copying the cached record.
//!
//! The generated server needs an owned `GetCareRecordResponse`, so every cache hit copied the
//! whole merged record (strings and all) only to encode it once and drop it. Here the response
//! holds the record as disclosed — shared with the cache when nothing was held back from this
//! requester — and encodes it in place: the same bytes, field for field, as the generated
//! message. Every other method is the generated server's.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use carerecord_proto::care_record_service_server::CareRecordServiceServer;
use carerecord_proto::{GetCareRecordRequest, GetCareRecordResponse};
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};
use tonic::codegen::Service;
use tonic::server::NamedService;

use crate::lookup::{Disclosed, LookupAnswer};
use crate::service::{CareRecordApi, response_without_record};

/// The gRPC path of `GetCareRecord`.
const GET_CARE_RECORD: &str = "/carerecord.v1.CareRecordService/GetCareRecord";
/// `GetCareRecordResponse.request_id` and `.record`.
const REQUEST_ID_TAG: u32 = 1;
const RECORD_TAG: u32 = 2;

/// A `GetCareRecordResponse` whose record is encoded from where it lies. Only ever encoded:
/// clients decode it as the `GetCareRecordResponse` it is on the wire.
#[derive(Debug, Default)]
pub struct RecordResponse {
    request_id: String,
    record: Disclosed,
    /// Every other field (`request_id` empty and `record` unset: written above).
    rest: GetCareRecordResponse,
}

impl RecordResponse {
    pub fn new(answer: LookupAnswer) -> Self {
        let (mut rest, record) = response_without_record(answer);
        RecordResponse {
            request_id: std::mem::take(&mut rest.request_id),
            record,
            rest,
        }
    }

    /// The generated message with the same content (tests, and callers that need to own it).
    pub fn into_message(self) -> GetCareRecordResponse {
        GetCareRecordResponse {
            request_id: self.request_id,
            record: Some(self.record.into_owned()),
            ..self.rest
        }
    }
}

impl prost::Message for RecordResponse {
    /// In field-number order, as the generated encoder writes them.
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.request_id.is_empty() {
            prost::encoding::string::encode(REQUEST_ID_TAG, &self.request_id, buf);
        }
        prost::encoding::message::encode(RECORD_TAG, &*self.record, buf);
        self.rest.encode_raw(buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Never decoded by the broker; skipping keeps decoding well-defined all the same.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        let id = if self.request_id.is_empty() {
            0
        } else {
            prost::encoding::string::encoded_len(REQUEST_ID_TAG, &self.request_id)
        };
        id + prost::encoding::message::encoded_len(RECORD_TAG, &*self.record)
            + self.rest.encoded_len()
    }

    fn clear(&mut self) {
        *self = RecordResponse::default();
    }
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

/// The `CareRecordService` as the broker serves it: `GetCareRecord` through
/// [`RecordResponse`], everything else through the generated server (same size limits).
#[derive(Clone)]
pub struct CareRecordGrpc {
    api: Arc<CareRecordApi>,
    generated: CareRecordServiceServer<CareRecordApi>,
    max_request: usize,
    max_response: usize,
}

impl CareRecordGrpc {
    pub fn new(api: CareRecordApi, max_request: usize, max_response: usize) -> Self {
        let api = Arc::new(api);
        let generated = CareRecordServiceServer::from_arc(api.clone())
            .max_decoding_message_size(max_request)
            .max_encoding_message_size(max_response);
        CareRecordGrpc {
            api,
            generated,
            max_request,
            max_response,
        }
    }
}

impl NamedService for CareRecordGrpc {
    const NAME: &'static str = <CareRecordServiceServer<CareRecordApi> as NamedService>::NAME;
}

impl Service<http::Request<tonic::body::Body>> for CareRecordGrpc {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != GET_CARE_RECORD {
            return Service::call(&mut self.generated, request);
        }
        let method = GetCareRecord(self.api.clone());
        let (max_request, max_response) = (self.max_request, self.max_response);
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<RecordResponse, GetCareRecordRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_max_message_size_config(Some(max_request), Some(max_response));
            Ok(grpc.unary(method, request).await)
        })
    }
}

struct GetCareRecord(Arc<CareRecordApi>);

impl tonic::server::UnaryService<GetCareRecordRequest> for GetCareRecord {
    type Response = RecordResponse;
    type Future = BoxFuture<tonic::Response<RecordResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<GetCareRecordRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move {
            api.lookup(request)
                .await
                .map(|answer| tonic::Response::new(RecordResponse::new(answer)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carerecord_proto::{CareRecord, Entry, SourceStatus, Warning};
    use prost::Message;
    use std::time::{Duration, SystemTime};

    fn answer(record: Disclosed) -> LookupAnswer {
        LookupAnswer {
            request_id: "req-1".into(),
            record,
            sources: vec![SourceStatus {
                source_id: "gp".into(),
                entries: 3,
                ..SourceStatus::default()
            }],
            complete: true,
            cache_age: Some(Duration::from_millis(1500)),
            warnings: vec![Warning {
                message: "w".into(),
                ..Warning::default()
            }],
            emergency_access: false,
            withheld: false,
            assembled_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            locators: Vec::new(),
            section_statuses: Vec::new(),
        }
    }

    fn record() -> CareRecord {
        CareRecord {
            conditions: vec![Entry {
                summary: "Asthma".into(),
                ..Entry::default()
            }],
            ..CareRecord::default()
        }
    }

    #[test]
    fn encodes_the_same_bytes_as_the_generated_message() {
        let a = answer(record().into());
        let generated = crate::service::response(a.clone()).encode_to_vec();
        let ours = RecordResponse::new(a);
        assert_eq!(ours.encoded_len(), generated.len());
        assert_eq!(ours.encode_to_vec(), generated);
        let decoded = GetCareRecordResponse::decode(generated.as_slice()).expect("decodes");
        assert_eq!(decoded.request_id, "req-1");
        assert_eq!(
            decoded.record.expect("record").conditions[0].summary,
            "Asthma"
        );
        assert_eq!(decoded.cache_age_ms, 1500);
    }

    #[test]
    fn an_empty_request_id_and_an_empty_record_encode_as_the_generated_message_does() {
        let mut a = answer(CareRecord::default().into());
        a.request_id.clear();
        let generated = crate::service::response(a.clone()).encode_to_vec();
        assert_eq!(RecordResponse::new(a).encode_to_vec(), generated);
    }

    #[test]
    fn into_message_round_trips() {
        let a = answer(record().into());
        let generated = crate::service::response(a.clone());
        assert_eq!(RecordResponse::new(a).into_message(), generated);
    }
}
