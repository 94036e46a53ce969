//! A source that speaks the source protocol (`carerecord.source.v1`, `[sources.grpc]`): an
//! organisation's own server, in any language, joining the broker without a fork.
//!
//! The server's answer is held to the same rules as a built-in adapter's: typed failures become
//! outcomes, "not known here" is NOT_FOUND, and an answer that does not keep the protocol's rules
//! (no answer at all, a malformed entry, requester-shaped data the broker was not told about) is
//! refused whole as an ERROR rather than shown half-understood. Everything the broker does to
//! every source (breaker, bulkhead, deadline, panic guard, identity check, merge) happens around
//! this adapter, not in it.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use carerecord_proto::source::v1::fetch_response::Answer;
use carerecord_proto::source::v1::source_service_client::SourceServiceClient;
use carerecord_proto::source::v1::{
    DescribeRequest, DescribeResponse, FailureKind, FetchRequest, FetchResponse,
};
use carerecord_proto::{CareRecord, Entry, Section};
use serde::Deserialize;
use tonic::Code;
use tonic::transport::Channel;

use crate::federation::{BrokerSourceConfig, BrokerSourceError};
use crate::testkit::is_iso8601;
use crate::{
    NhsNumber, SectionSet, Shortfall, Source, SourceError, SourceInfo, SourceRecord, SourceReply,
    SourceRequest,
};

/// The largest answer accepted by default: far above any one patient's record, far below what
/// would hurt the broker.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// The longest failure message kept.
const MAX_FAILURE_CHARS: usize = 200;
/// The longest warning or shortfall reason kept.
const MAX_WARNING_CHARS: usize = 500;

/// `[sources.grpc]`: how to reach a source-protocol server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcSourceConfig {
    /// The server's gRPC URL, `https://host:port` (or `http://` for loopback development).
    pub url: String,
    /// PEM CA certificate to trust for the server (private PKI); the Mozilla roots otherwise.
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate the broker presents (mutual TLS).
    pub client_cert: Option<PathBuf>,
    /// PEM private key for `client_cert`.
    pub client_key: Option<PathBuf>,
    /// TLS server name to verify, when it differs from the URL's host.
    pub tls_domain: Option<String>,
    /// The server's answers depend on who asks (it filters by requester, as its `Describe` says):
    /// the broker then shares fetches and cached records only between identical requesters.
    /// Default false; an answer that says otherwise is refused.
    #[serde(default)]
    pub answers_depend_on_requester: bool,
    /// The largest answer accepted, in bytes (default 16 MiB); larger is an ERROR.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
}

fn default_max_response_bytes() -> usize {
    DEFAULT_MAX_RESPONSE_BYTES
}

impl GrpcSourceConfig {
    /// Plaintext to `url`, defaults otherwise (tests and loopback development).
    pub fn new(url: impl Into<String>) -> Self {
        GrpcSourceConfig {
            url: url.into(),
            ca_cert: None,
            client_cert: None,
            client_key: None,
            tls_domain: None,
            answers_depend_on_requester: false,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

/// A source-protocol server that cannot be configured.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct GrpcSourceError(#[from] BrokerSourceError);

/// A source-protocol server as a source.
pub struct GrpcSource {
    info: SourceInfo,
    client: SourceServiceClient<Channel>,
    /// From configuration: cache keys are fixed before anyone is asked, so the server's own
    /// declaration can only be checked against it, not followed.
    depends_on_requester: bool,
}

impl GrpcSource {
    /// Prepares a lazily connected client: nothing is dialled until the first lookup.
    pub fn new(info: SourceInfo, config: &GrpcSourceConfig) -> Result<Self, GrpcSourceError> {
        // The federation client's TLS rules, so both gRPC clients follow one set.
        let endpoint = BrokerSourceConfig {
            url: config.url.clone(),
            ca_cert: config.ca_cert.clone(),
            client_cert: config.client_cert.clone(),
            client_key: config.client_key.clone(),
            tls_domain: config.tls_domain.clone(),
        }
        .endpoint()?;
        let client = SourceServiceClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(config.max_response_bytes);
        Ok(GrpcSource {
            info,
            client,
            depends_on_requester: config.answers_depend_on_requester,
        })
    }

    /// Asks the server what it is (`Describe`). `Ok(None)` when it does not implement the call.
    pub async fn describe(
        &self,
        timeout: Duration,
    ) -> Result<Option<DescribeResponse>, SourceError> {
        let mut call = tonic::Request::new(DescribeRequest {});
        call.set_timeout(timeout);
        let mut client = self.client.clone();
        match tokio::time::timeout(timeout, client.describe(call)).await {
            Err(_elapsed) => Err(SourceError::Timeout),
            Ok(Ok(r)) => Ok(Some(r.into_inner())),
            Ok(Err(status)) if status.code() == Code::Unimplemented => Ok(None),
            Ok(Err(status)) => Err(status_error(&status)),
        }
    }
}

#[async_trait]
impl Source for GrpcSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    fn answers_depend_on_requester(&self) -> bool {
        self.depends_on_requester
    }

    async fn fetch(&self, request: &SourceRequest) -> Result<SourceReply, SourceError> {
        let remaining = request.remaining();
        // Leave time for the answer to travel back and be decoded before our own deadline.
        let margin = (remaining / 10).max(Duration::from_millis(20));
        let budget = remaining.saturating_sub(margin);
        if budget.is_zero() {
            return Err(SourceError::Timeout);
        }
        let mut call = tonic::Request::new(FetchRequest {
            request_id: request.request_id.clone(),
            nhs_number: request.nhs_number.as_digits(),
            sections: request.sections.to_request(),
            deadline_ms: budget.as_millis().try_into().unwrap_or(u32::MAX),
            requester: Some(request.requester.clone()),
        });
        call.set_timeout(budget);
        // Joins the server's spans to the broker's trace, as for FHIR sources and brokers.
        if let Some(tp) = crate::trace::traceparent().and_then(|tp| tp.parse().ok()) {
            call.metadata_mut().insert(crate::trace::HEADER, tp);
        }
        if let Ok(id) = request.request_id.parse() {
            call.metadata_mut().insert("x-request-id", id);
        }
        let mut client = self.client.clone();
        // The grpc-timeout asks the server to stop; this makes sure we stop waiting even if the
        // server ignores it.
        let response = match tokio::time::timeout(budget, client.fetch(call)).await {
            Err(_elapsed) => return Err(SourceError::Timeout),
            Ok(Err(status)) => return Err(status_error(&status)),
            Ok(Ok(r)) => r.into_inner(),
        };
        reply_from(response, request, self.depends_on_requester)
    }
}

/// The server's answer as this source's reply, or why it cannot be used.
pub fn reply_from(
    response: FetchResponse,
    request: &SourceRequest,
    configured_as_requester_dependent: bool,
) -> Result<SourceReply, SourceError> {
    let patient = request.nhs_number;
    if response.answer_depends_on_requester && !configured_as_requester_dependent {
        return Err(SourceError::InvalidResponse(
            "the server says its answer depends on who asks, but the source is not configured \
             with answers_depend_on_requester = true: not used, as the broker shares answers \
             between requesters"
                .into(),
        ));
    }
    let found = match response.answer {
        None => {
            return Err(SourceError::InvalidResponse(
                "the answer is neither found, not_known nor failure".into(),
            ));
        }
        Some(Answer::NotKnown(_)) => return Ok(SourceReply::NotFound),
        Some(Answer::Failure(failure)) => {
            let message = clean(&failure.message, MAX_FAILURE_CHARS, patient);
            return Err(match FailureKind::try_from(failure.kind) {
                Ok(FailureKind::Timeout) => SourceError::Timeout,
                Ok(FailureKind::Unavailable) => SourceError::Unavailable(message),
                Ok(FailureKind::Refused) => SourceError::Refused(message),
                Ok(FailureKind::InvalidData) => {
                    SourceError::InvalidResponse(format!("its system's data: {message}"))
                }
                _ => SourceError::Other(message),
            });
        }
        Some(Answer::Found(found)) => found,
    };
    let mut record = found.record.unwrap_or_default();
    check_record(&mut record)?;
    let warnings = found
        .warnings
        .iter()
        .map(|w| clean(w, MAX_WARNING_CHARS, patient))
        .collect();
    let shortfalls = found
        .shortfalls
        .iter()
        .map(|s| {
            let named = s
                .sections
                .iter()
                .filter_map(|v| Section::try_from(*v).ok())
                .filter(|s| *s != Section::Unspecified)
                .fold(SectionSet::NONE, SectionSet::with);
            Shortfall {
                sections: if named == SectionSet::NONE {
                    request.sections
                } else {
                    named
                },
                reason: clean(&s.reason, MAX_WARNING_CHARS, patient),
            }
        })
        .collect();
    Ok(SourceReply::Found(SourceRecord {
        record,
        warnings,
        nested: Vec::new(),
        shortfalls,
        wrong_patient: Vec::new(),
    }))
}

/// Holds a served record to the protocol's rules: every entry says what it is (a summary or a
/// coded concept) and every date is ISO 8601. The fields the broker computes itself are cleared.
/// The first violation refuses the whole answer, described without its content.
fn check_record(record: &mut CareRecord) -> Result<(), SourceError> {
    if let Some(p) = &record.patient
        && !p.birth_date.is_empty()
        && !is_iso8601(&p.birth_date)
    {
        return Err(SourceError::InvalidResponse(
            "the patient's birth_date is not ISO 8601".into(),
        ));
    }
    for section in Section::ALL {
        let Some(entries) = record.section_mut(section) else {
            continue;
        };
        for (at, entry) in entries.iter_mut().enumerate() {
            if let Some(problem) = entry_problem(entry) {
                return Err(SourceError::InvalidResponse(format!(
                    "{} entry {}: {problem}",
                    section.short_name(),
                    at + 1
                )));
            }
            entry.conflicts.clear();
            entry.identity_disputed = false;
        }
    }
    Ok(())
}

fn entry_problem(entry: &Entry) -> Option<&'static str> {
    let coded = entry
        .concept
        .as_ref()
        .is_some_and(|c| !c.code.is_empty() || !c.display.is_empty());
    if entry.summary.trim().is_empty() && !coded {
        return Some("neither a summary nor a coded concept");
    }
    [
        ("effective is not ISO 8601", &entry.effective),
        ("ended is not ISO 8601", &entry.ended),
        ("recorded is not ISO 8601", &entry.recorded),
    ]
    .into_iter()
    .find(|(_, value)| !value.is_empty() && !is_iso8601(value))
    .map(|(problem, _)| problem)
}

/// Server-written text, made safe to show: control characters dropped, the patient's NHS number
/// masked (servers are told not to include it; this holds them to it), and cut to `max` chars.
fn clean(text: &str, max: usize, patient: NhsNumber) -> String {
    let text = text
        .replace(&patient.as_digits(), "[NHS number]")
        .replace(&patient.grouped(), "[NHS number]");
    let mut out: String = text.chars().filter(|c| !c.is_control()).take(max).collect();
    if out.trim().is_empty() {
        out = "(no message)".into();
    }
    out
}

/// Maps a gRPC status to an outcome. The message is the server's, cut short: a status is not
/// where a server should explain itself (that is `Failure`).
fn status_error(status: &tonic::Status) -> SourceError {
    let message: String = status
        .message()
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_FAILURE_CHARS)
        .collect();
    match status.code() {
        Code::DeadlineExceeded | Code::Cancelled => SourceError::Timeout,
        Code::PermissionDenied | Code::Unauthenticated => {
            SourceError::Refused(format!("the server denied access: {message}"))
        }
        Code::Unavailable => SourceError::Connect(message),
        Code::ResourceExhausted if message.contains("message length too large") => {
            SourceError::InvalidResponse(format!("the answer is too large: {message}"))
        }
        Code::ResourceExhausted => SourceError::Unavailable(message),
        Code::Unimplemented => {
            SourceError::Other("the server does not implement carerecord.source.v1 Fetch".into())
        }
        Code::Internal if message.contains("decode") => SourceError::InvalidResponse(format!(
            "the answer is not a carerecord.source.v1 FetchResponse: {message}"
        )),
        other => SourceError::Other(format!("the server answered {other:?}: {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carerecord_proto::source::v1::{Failure, Found, NotKnown};
    use carerecord_proto::{Coding, Patient};
    use tokio::time::Instant;

    fn request() -> SourceRequest {
        let nhs = NhsNumber::parse("9434765919").expect("valid");
        crate::testkit::request(
            nhs,
            SectionSet::ALL,
            Instant::now() + Duration::from_secs(1),
        )
    }

    fn found(entry: Entry) -> FetchResponse {
        FetchResponse {
            answer: Some(Answer::Found(Found {
                record: Some(CareRecord {
                    conditions: vec![entry],
                    ..CareRecord::default()
                }),
                ..Found::default()
            })),
            answer_depends_on_requester: false,
        }
    }

    fn entry() -> Entry {
        Entry {
            concept: Some(Coding {
                system: "http://snomed.info/sct".into(),
                code: "73211009".into(),
                display: "Diabetes mellitus".into(),
            }),
            effective: "2019-03".into(),
            ..Entry::default()
        }
    }

    #[test]
    fn no_answer_at_all_is_invalid() {
        let r = reply_from(FetchResponse::default(), &request(), false);
        assert!(matches!(r, Err(SourceError::InvalidResponse(_))), "{r:?}");
    }

    #[test]
    fn not_known_is_not_found() {
        let response = FetchResponse {
            answer: Some(Answer::NotKnown(NotKnown {})),
            answer_depends_on_requester: false,
        };
        assert!(matches!(
            reply_from(response, &request(), false),
            Ok(SourceReply::NotFound)
        ));
    }

    #[test]
    fn failure_kinds_become_outcomes_and_lose_the_nhs_number() {
        let failure = |kind: FailureKind| FetchResponse {
            answer: Some(Answer::Failure(Failure {
                kind: kind as i32,
                message: "lookup of 9434765919 failed\n".into(),
            })),
            answer_depends_on_requester: false,
        };
        use carerecord_proto::SourceOutcome as O;
        for (kind, outcome) in [
            (FailureKind::Timeout, O::Timeout),
            (FailureKind::Unavailable, O::Unavailable),
            (FailureKind::Refused, O::Refused),
            (FailureKind::InvalidData, O::Error),
            (FailureKind::Internal, O::Error),
            (FailureKind::Unspecified, O::Error),
        ] {
            let error = reply_from(failure(kind), &request(), false).expect_err("failure");
            assert_eq!(error.outcome(), outcome, "{kind:?}");
            assert!(!error.to_string().contains("9434765919"), "{error}");
        }
    }

    #[test]
    fn a_malformed_entry_refuses_the_whole_answer() {
        let undated = Entry {
            effective: "14/03/2019".into(),
            ..entry()
        };
        let error = reply_from(found(undated), &request(), false).expect_err("invalid");
        assert_eq!(
            error.to_string(),
            "invalid response: conditions entry 1: effective is not ISO 8601"
        );
        let blank = Entry {
            concept: None,
            ..entry()
        };
        assert!(matches!(
            reply_from(found(blank), &request(), false),
            Err(SourceError::InvalidResponse(_))
        ));
        let mut bad_birth = found(entry());
        if let Some(Answer::Found(f)) = bad_birth.answer.as_mut() {
            f.record.get_or_insert_default().patient = Some(Patient {
                birth_date: "yesterday".into(),
                ..Patient::default()
            });
        }
        assert!(matches!(
            reply_from(bad_birth, &request(), false),
            Err(SourceError::InvalidResponse(_))
        ));
    }

    #[test]
    fn a_requester_shaped_answer_is_used_only_when_configured_so() {
        let mut response = found(entry());
        response.answer_depends_on_requester = true;
        let error = reply_from(response.clone(), &request(), false).expect_err("refused");
        assert!(
            error.to_string().contains("answers_depend_on_requester"),
            "{error}"
        );
        assert!(matches!(
            reply_from(response, &request(), true),
            Ok(SourceReply::Found(_))
        ));
    }

    #[test]
    fn grpc_statuses_map_to_the_outcomes_the_protocol_documents() {
        use carerecord_proto::SourceOutcome as O;
        for (status, outcome) in [
            (tonic::Status::deadline_exceeded("late"), O::Timeout),
            (tonic::Status::cancelled("gone"), O::Timeout),
            (tonic::Status::unavailable("down"), O::Error),
            (tonic::Status::resource_exhausted("busy"), O::Unavailable),
            (tonic::Status::permission_denied("no"), O::Refused),
            (tonic::Status::unauthenticated("who"), O::Refused),
            (tonic::Status::unimplemented("what"), O::Error),
            (
                tonic::Status::internal("failed to decode Protobuf message"),
                O::Error,
            ),
            (tonic::Status::unknown("?"), O::Error),
        ] {
            let code = status.code();
            assert_eq!(status_error(&status).outcome(), outcome, "{code:?}");
        }
    }

    #[test]
    fn a_shortfall_naming_no_section_covers_every_section_asked() {
        let mut response = found(entry());
        if let Some(Answer::Found(f)) = response.answer.as_mut() {
            f.shortfalls.push(carerecord_proto::source::v1::Shortfall {
                sections: Vec::new(),
                reason: "archive not searched".into(),
            });
        }
        let Ok(SourceReply::Found(record)) = reply_from(response, &request(), false) else {
            panic!("found");
        };
        assert_eq!(record.shortfalls[0].sections, SectionSet::ALL);
        assert_eq!(record.shortfalls[0].reason, "archive not searched");
    }
}
