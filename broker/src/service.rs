//! The gRPC face of the broker: `carerecord.v1.CareRecordService`.
//!
//! Per request: identify the calling system (mutual TLS), check the request, admit the
//! requester (role, purpose), look up (cache or shared fan-out), then disclose — relationship
//! check, this requester's view, audit — in that order, on cache hits and misses alike.

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

use crate::access::{Caller, Denial, UNVERIFIED};
use crate::budget::parse_grpc_timeout;
use crate::config::SystemConfig;
use crate::flight::Flight;
use crate::lookup::{Broker, InFlight, Lookup};
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
    fn identify<T>(&self, request: &Request<T>) -> Result<Caller, Denial> {
        let Some(systems) = &self.systems else {
            return Ok(Caller {
                system: UNVERIFIED.to_owned(),
                trusted_assertions: false,
            });
        };
        let certs = request.peer_certs().ok_or(Denial::UnknownSystem)?;
        let leaf = certs.first().ok_or(Denial::UnknownSystem)?;
        let cert = webpki::EndEntityCert::try_from(leaf).map_err(|_| Denial::UnknownSystem)?;
        systems
            .iter()
            .find(|s| {
                rustls_pki_types::ServerName::try_from(s.dns_name.as_str())
                    .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
            })
            .map(|s| Caller {
                system: s.id.clone(),
                trusted_assertions: s.trusted_assertions,
            })
            .ok_or(Denial::UnknownSystem)
    }

    /// Identifies, checks and admits a request; every refusal past validation is audited.
    fn accept(
        &self,
        request: Request<GetCareRecordRequest>,
    ) -> Result<(LookupRequest, Caller), Status> {
        let caller = self.identify(&request);
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
        let checked = validate::check(request.into_inner(), request_id.clone(), caller_timeout)
            .map_err(|e| {
                tracing::info!(request_id = %request_id, code = ?e.code(), error = %e, "lookup refused");
                Status::from(e)
            })?;
        let caller = match caller {
            Ok(c) => c,
            Err(denial) => {
                let unknown = Caller {
                    system: "unknown".to_owned(),
                    trusted_assertions: false,
                };
                return Err(self.broker.deny(&checked, &unknown, &denial, None));
            }
        };
        self.broker.admit(&checked, &caller)?;
        Ok((checked, caller))
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
        let _load = self.broker.admit_load()?;
        let started = Instant::now();
        let (request, caller) = self.accept(request).inspect_err(record_refusal)?;
        let span = tracing::info_span!("lookup", request_id = %request.request_id);
        let broker = self.broker.clone();
        async move {
            let lookup = broker.begin(&request).await.inspect_err(|_| {
                metrics::counter!(crate::metrics::LOOKUPS, "outcome" => "invalid").increment(1);
            })?;
            let cache = if matches!(lookup, Lookup::Cached { .. }) {
                "hit"
            } else {
                "miss"
            };
            let response = match lookup {
                Lookup::Cached { record, age } => broker
                    .disclose(&request, &caller, &record, true, age)
                    .inspect_err(record_refusal)?,
                Lookup::Live { flight, deadline } => {
                    let merged = flight.wait(deadline).await;
                    broker
                        .disclose(&request, &caller, &merged, false, Duration::ZERO)
                        .inspect_err(record_refusal)?
                }
            };
            let outcome = if response.complete {
                "complete"
            } else {
                "partial"
            };
            metrics::counter!(crate::metrics::LOOKUPS, "outcome" => outcome).increment(1);
            metrics::histogram!(crate::metrics::LOOKUP_DURATION, "cache" => cache)
                .record(started.elapsed().as_secs_f64());
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
        let load = self.broker.admit_load()?;
        let (request, caller) = self.accept(request).inspect_err(record_refusal)?;
        let broker = self.broker.clone();
        let stream: EventStream = match broker.begin(&request).await? {
            Lookup::Cached { record, age } => {
                // The whole record is here: decide before sending anything.
                let response = broker.disclose(&request, &caller, &record, true, age)?;
                let mut events: Vec<Result<CareRecordEvent, Status>> = broker
                    .replayed_source_events(&request, &record)
                    .into_iter()
                    .map(|e| Ok(event(Event::Source(e))))
                    .collect();
                events.push(Ok(event(Event::Complete(response))));
                Box::pin(futures::stream::iter(events))
            }
            Lookup::Live { flight, deadline } => {
                Box::pin(live_events(broker, request, caller, flight, deadline, load))
            }
        };
        Ok(Response::new(stream))
    }
}

/// Counts a lookup refused before any source was asked.
fn record_refusal(status: &Status) {
    let outcome = match status.code() {
        tonic::Code::PermissionDenied => "denied",
        tonic::Code::Unavailable => "unavailable",
        _ => "invalid",
    };
    metrics::counter!(crate::metrics::LOOKUPS, "outcome" => outcome).increment(1);
}

fn event(e: Event) -> CareRecordEvent {
    CareRecordEvent { event: Some(e) }
}

/// Source events as the flight's answers land, then the final merged record at completion or
/// at our deadline, whichever is first. Every source gets exactly one event: those that had not
/// answered by our deadline get one with their TIMEOUT status just before the final event.
///
/// Events are held back until the legitimate relationship is established (emergency access, a
/// trusted assertion, or an answer from the requester's own organisation); if it never is, the
/// stream ends with PERMISSION_DENIED and nothing was disclosed.
fn live_events(
    broker: Arc<Broker>,
    request: LookupRequest,
    caller: Caller,
    flight: Arc<Flight>,
    deadline: Instant,
    load: InFlight,
) -> impl Stream<Item = Result<CareRecordEvent, Status>> + Send {
    struct State {
        /// Keeps this stream counted among lookups in flight until it ends.
        _load: InFlight,
        broker: Arc<Broker>,
        request: LookupRequest,
        caller: Caller,
        flight: Arc<Flight>,
        rx: tokio::sync::watch::Receiver<crate::flight::Progress>,
        deadline: Instant,
        seen: usize,
        /// The relationship is established: events may flow (once the release is audited).
        released: bool,
        /// The release was written to the audit trail.
        audited: bool,
        held: Vec<Arc<crate::fanout::Answer>>,
        pending: VecDeque<Result<CareRecordEvent, Status>>,
        expired: bool,
        finished: bool,
    }
    let released = broker.released_by(&request, &caller, None);
    let state = State {
        _load: load,
        rx: flight.subscribe(),
        broker,
        request,
        caller,
        flight,
        deadline,
        seen: 0,
        released,
        audited: false,
        held: Vec::new(),
        pending: VecDeque::new(),
        expired: false,
        finished: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(e) = s.pending.pop_front() {
                return Some((e, s));
            }
            if s.finished {
                return None;
            }
            {
                let progress = s.rx.borrow_and_update();
                for answer in progress.answers.iter().skip(s.seen) {
                    s.held.push(answer.clone());
                    if !s.released && s.broker.released_by(&s.request, &s.caller, Some(answer)) {
                        s.released = true;
                    }
                }
                s.seen = progress.answers.len();
                if s.released && !s.audited && !s.held.is_empty() {
                    // Nothing leaves before the audit trail says who is looking.
                    if let Err(status) = s.broker.audit_release(&s.request, &s.caller) {
                        s.pending.push_back(Err(status));
                        s.finished = true;
                        continue;
                    }
                    s.audited = true;
                }
                if s.audited {
                    for answer in s.held.drain(..) {
                        if let Some(e) = s.broker.source_event(&s.request, &answer) {
                            s.pending.push_back(Ok(event(Event::Source(e))));
                        }
                    }
                }
                if progress.merged.is_some() || s.expired {
                    let merged = s.flight.merge_so_far(&progress);
                    s.finished = true;
                    match s
                        .broker
                        .disclose(&s.request, &s.caller, &merged, false, Duration::ZERO)
                    {
                        Ok(response) => {
                            for answer in s.held.drain(..) {
                                if let Some(e) = s.broker.source_event(&s.request, &answer) {
                                    s.pending.push_back(Ok(event(Event::Source(e))));
                                }
                            }
                            // Sources that never answered get their TIMEOUT event, as far as
                            // this requester may see them (the final statuses are filtered).
                            let answered: Vec<&str> = progress
                                .answers
                                .iter()
                                .map(|a| a.status.source_id.as_str())
                                .collect();
                            for status in &response.sources {
                                if !answered.contains(&status.source_id.as_str()) {
                                    s.pending.push_back(Ok(event(Event::Source(SourceEvent {
                                        status: Some(status.clone()),
                                        contribution: None,
                                    }))));
                                }
                            }
                            s.pending.push_back(Ok(event(Event::Complete(response))));
                        }
                        Err(status) => s.pending.push_back(Err(status)),
                    }
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
