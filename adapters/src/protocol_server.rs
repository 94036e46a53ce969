//! Any [`Source`] served over the source protocol (`carerecord.source.v1`): the server half of
//! [`crate::grpc::GrpcSource`].
//!
//! A Rust adapter written against this crate can run beside the organisation's system, in its
//! own process and repository, and join a stock broker by configuration (`[sources.grpc]`)
//! rather than a fork. It is also the reference server the protocol's tests run against.
//!
//! ```no_run
//! use carerecord_adapters::protocol_server::SourceServer;
//! # async fn run(my_source: carerecord_adapters::memory::InMemorySource) -> Result<(), Box<dyn std::error::Error>> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:50061").await?;
//! SourceServer::new(std::sync::Arc::new(my_source)).serve(listener, std::future::pending()).await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use carerecord_proto::source::v1::fetch_response::Answer;
use carerecord_proto::source::v1::source_service_server::{SourceService, SourceServiceServer};
use carerecord_proto::source::v1::{
    DescribeRequest, DescribeResponse, Failure, FailureKind, FetchRequest, FetchResponse, Found,
    NotKnown, PROTOCOL, Shortfall,
};
use carerecord_proto::{Section, SourceOutcome};
use futures::FutureExt;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::{NhsNumber, SectionSet, Source, SourceReply, SourceRequest};

/// The deadline assumed when a request carries none.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);

/// Serves one [`Source`] as a `carerecord.source.v1.SourceService`.
#[derive(Clone)]
pub struct SourceServer {
    source: Arc<dyn Source>,
}

impl SourceServer {
    /// Serves `source`.
    pub fn new(source: Arc<dyn Source>) -> Self {
        SourceServer { source }
    }

    /// The tonic service, to mount on a server of your own (TLS, other services).
    pub fn into_service(self) -> SourceServiceServer<SourceServer> {
        SourceServiceServer::new(self)
    }

    /// Serves plaintext gRPC on `listener` until `shutdown` completes. For TLS, mount
    /// [`SourceServer::into_service`] on a `tonic::transport::Server` configured with it.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let incoming = futures::stream::unfold(listener, |listener| async move {
            let accepted = listener.accept().await.map(|(stream, _)| {
                let _ = stream.set_nodelay(true);
                stream
            });
            Some((accepted, listener))
        });
        tonic::transport::Server::builder()
            .add_service(self.into_service())
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
    }
}

#[tonic::async_trait]
impl SourceService for SourceServer {
    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<FetchResponse>, Status> {
        let request = request.into_inner();
        let nhs_number = NhsNumber::parse(&request.nhs_number)
            .map_err(|_| Status::invalid_argument("nhs_number is not a valid NHS number"))?;
        let sections = request
            .sections
            .iter()
            .filter_map(|v| Section::try_from(*v).ok())
            .filter(|s| *s != Section::Unspecified)
            .fold(SectionSet::NONE, SectionSet::with);
        let wait = match request.deadline_ms {
            0 => DEFAULT_DEADLINE,
            ms => Duration::from_millis(u64::from(ms)),
        };
        let source_request = SourceRequest {
            request_id: request.request_id,
            nhs_number,
            sections: if sections == SectionSet::NONE {
                SectionSet::ALL
            } else {
                sections
            },
            deadline: Instant::now() + wait,
            requester: request.requester.unwrap_or_default(),
            via_brokers: Vec::new(),
        };
        let fetched = AssertUnwindSafe(self.source.fetch(&source_request)).catch_unwind();
        let answer = match tokio::time::timeout(wait, fetched).await {
            Err(_elapsed) => failure(FailureKind::Timeout, "did not answer in time".into()),
            Ok(Err(_panic)) => failure(FailureKind::Internal, "the adapter panicked".into()),
            Ok(Ok(Ok(SourceReply::NotFound))) => Answer::NotKnown(NotKnown {}),
            Ok(Ok(Ok(SourceReply::Found(record)))) => {
                let mut warnings = record.warnings;
                let mut shortfalls: Vec<Shortfall> = record
                    .shortfalls
                    .into_iter()
                    .map(|s| Shortfall {
                        sections: s.sections.to_request(),
                        reason: s.reason,
                    })
                    .collect();
                // The protocol has no place for discarded resources: they are a gap in the
                // answer, said as such.
                for discarded in record.wrong_patient {
                    warnings.push(format!("discarded data about another patient: {discarded}"));
                    shortfalls.push(Shortfall {
                        sections: Vec::new(),
                        reason: "data about another patient was discarded".into(),
                    });
                }
                Answer::Found(Found {
                    record: Some(record.record),
                    warnings,
                    shortfalls,
                })
            }
            Ok(Ok(Err(error))) => {
                let kind = match error.outcome() {
                    SourceOutcome::Timeout => FailureKind::Timeout,
                    SourceOutcome::Unavailable | SourceOutcome::CircuitOpen => {
                        FailureKind::Unavailable
                    }
                    SourceOutcome::Refused => FailureKind::Refused,
                    _ => match error {
                        crate::SourceError::InvalidResponse(_)
                        | crate::SourceError::TooLarge(_)
                        | crate::SourceError::WrongPatient(_) => FailureKind::InvalidData,
                        _ => FailureKind::Internal,
                    },
                };
                failure(kind, error.to_string())
            }
        };
        Ok(Response::new(FetchResponse {
            answer: Some(answer),
            answer_depends_on_requester: self.source.answers_depend_on_requester(),
        }))
    }

    async fn describe(
        &self,
        _request: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        let info = self.source.info();
        Ok(Response::new(DescribeResponse {
            protocol: PROTOCOL.into(),
            organisation_code: info.organisation_code.clone(),
            organisation_name: info.organisation_name.clone(),
            sections: Vec::new(),
            answers_depend_on_requester: self.source.answers_depend_on_requester(),
            software: concat!("carerecord-adapters ", env!("CARGO_PKG_VERSION")).into(),
        }))
    }
}

fn failure(kind: FailureKind, message: String) -> Answer {
    Answer::Failure(Failure {
        kind: kind as i32,
        message,
    })
}
