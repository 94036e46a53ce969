//! The gRPC face of the broker: `carerecord.v1.CareRecordService`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use carerecord_proto::care_record_event::Event;
use carerecord_proto::care_record_service_server::CareRecordService;
use carerecord_proto::{CareRecordEvent, GetCareRecordRequest, GetCareRecordResponse, SourceEvent};
use futures::Stream;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::budget::parse_grpc_timeout;
use crate::flight::Flight;
use crate::lookup::{Broker, Lookup};
use crate::validate::{self, LookupRequest};

/// Implements the service over a shared [`Broker`].
#[derive(Clone)]
pub struct CareRecordApi {
    broker: Arc<Broker>,
}

impl CareRecordApi {
    pub fn new(broker: Arc<Broker>) -> Self {
        CareRecordApi { broker }
    }

    fn checked(&self, request: Request<GetCareRecordRequest>) -> Result<LookupRequest, Status> {
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
        validate::check(request.into_inner(), request_id.clone(), caller_timeout).map_err(|e| {
            tracing::info!(request_id = %request_id, code = ?e.code(), error = %e, "lookup refused");
            Status::from(e)
        })
    }
}

/// A caller-supplied request id is used only when it is short and plain, so it is safe in logs.
fn acceptable_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<CareRecordEvent, Status>> + Send>>;

#[tonic::async_trait]
impl CareRecordService for CareRecordApi {
    async fn get_care_record(
        &self,
        request: Request<GetCareRecordRequest>,
    ) -> Result<Response<GetCareRecordResponse>, Status> {
        let request = self.checked(request)?;
        let span = tracing::info_span!("lookup", request_id = %request.request_id);
        let broker = self.broker.clone();
        async move {
            let response = match broker.begin(&request).await? {
                Lookup::Cached { record, age } => broker.respond(&request, &record, true, age),
                Lookup::Live { flight, deadline } => {
                    let merged = flight.wait(deadline).await;
                    broker.respond(&request, &merged, false, Duration::ZERO)
                }
            };
            tracing::info!(
                complete = response.complete,
                from_cache = response.from_cache,
                sources = response.sources.len(),
                "lookup answered"
            );
            Ok(Response::new(response))
        }
        .instrument(span)
        .await
    }

    type StreamCareRecordStream = EventStream;

    async fn stream_care_record(
        &self,
        request: Request<GetCareRecordRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let request = self.checked(request)?;
        let broker = self.broker.clone();
        let stream: EventStream = match broker.begin(&request).await? {
            Lookup::Cached { record, age } => {
                let mut events: Vec<Result<CareRecordEvent, Status>> = broker
                    .replayed_source_events(&request, &record)
                    .into_iter()
                    .map(|e| Ok(event(Event::Source(e))))
                    .collect();
                events.push(Ok(event(Event::Complete(
                    broker.respond(&request, &record, true, age),
                ))));
                Box::pin(futures::stream::iter(events))
            }
            Lookup::Live { flight, deadline } => {
                Box::pin(live_events(broker, request, flight, deadline))
            }
        };
        Ok(Response::new(stream))
    }
}

fn event(e: Event) -> CareRecordEvent {
    CareRecordEvent { event: Some(e) }
}

/// Source events as the flight's answers land, then the final merged record at completion or
/// at our deadline, whichever is first. Every source gets exactly one event: those that had not
/// answered by our deadline get one with their TIMEOUT status just before the final event.
fn live_events(
    broker: Arc<Broker>,
    request: LookupRequest,
    flight: Arc<Flight>,
    deadline: Instant,
) -> impl Stream<Item = Result<CareRecordEvent, Status>> + Send {
    struct State {
        broker: Arc<Broker>,
        request: LookupRequest,
        flight: Arc<Flight>,
        rx: tokio::sync::watch::Receiver<crate::flight::Progress>,
        deadline: Instant,
        sent: usize,
        pending: VecDeque<CareRecordEvent>,
        expired: bool,
        finished: bool,
    }
    let state = State {
        rx: flight.subscribe(),
        broker,
        request,
        flight,
        deadline,
        sent: 0,
        pending: VecDeque::new(),
        expired: false,
        finished: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(e) = s.pending.pop_front() {
                return Some((Ok(e), s));
            }
            if s.finished {
                return None;
            }
            {
                let progress = s.rx.borrow_and_update();
                for answer in progress.answers.iter().skip(s.sent) {
                    let e = s.broker.source_event(&s.request, answer);
                    s.pending.push_back(event(Event::Source(e)));
                }
                s.sent = progress.answers.len();
                if progress.merged.is_some() || s.expired {
                    let merged = s.flight.merge_so_far(&progress);
                    let answered: Vec<usize> = progress.answers.iter().map(|a| a.index).collect();
                    for (index, status) in merged.sources.iter().enumerate() {
                        if !answered.contains(&index) {
                            s.pending.push_back(event(Event::Source(SourceEvent {
                                status: Some(status.clone()),
                                contribution: None,
                            })));
                        }
                    }
                    let response = s.broker.respond(&s.request, &merged, false, Duration::ZERO);
                    s.pending.push_back(event(Event::Complete(response)));
                    s.finished = true;
                    continue;
                }
            }
            if !s.pending.is_empty() {
                continue;
            }
            match tokio::time::timeout_at(s.deadline, s.rx.changed()).await {
                Ok(Ok(())) => {}
                // Our deadline, or the flight is gone: finish with what arrived.
                Ok(Err(_)) | Err(_) => s.expired = true,
            }
        }
    })
}
