//! A source that is another carerecord broker, asked over gRPC: an exchange of exchanges (a
//! central broker linking each area's, or a neighbouring region's).
//!
//! The requester and the remaining deadline are forwarded; the chain of brokers visited travels
//! in `via_brokers` so a lookup can never loop (the broker that sees itself in the chain refuses,
//! and that refusal comes back here as a REFUSED outcome). The remote broker's own per-source
//! statuses are kept, nested under this source's status.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use carerecord_proto::care_record_service_client::CareRecordServiceClient;
use carerecord_proto::{
    CacheDirective, GetCareRecordRequest, GetCareRecordResponse, Section, SectionState,
    SourceOutcome, WarningKind,
};
use serde::Deserialize;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{
    SectionSet, Shortfall, Source, SourceError, SourceInfo, SourceRecord, SourceReply,
    SourceRequest,
};

/// `[sources.broker]`: how to reach the remote broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSourceConfig {
    /// The remote broker's gRPC URL, `https://host:port` (or `http://` for loopback development).
    pub url: String,
    /// PEM CA certificate to trust for the remote broker (private PKI).
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate presented to the remote broker (mutual TLS).
    pub client_cert: Option<PathBuf>,
    /// PEM private key for `client_cert`.
    pub client_key: Option<PathBuf>,
    /// TLS server name to verify, when it differs from the URL's host.
    pub tls_domain: Option<String>,
}

/// A remote broker that cannot be configured.
#[derive(Debug, thiserror::Error)]
pub enum BrokerSourceError {
    #[error("invalid url {0:?}: {1}")]
    Url(String, String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("client_cert and client_key must be set together")]
    HalfIdentity,
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// Another broker as a source.
pub struct BrokerSource {
    info: SourceInfo,
    client: CareRecordServiceClient<Channel>,
}

impl BrokerSource {
    /// Prepares a lazily connected client: nothing is dialled until the first lookup.
    pub fn new(info: SourceInfo, config: &BrokerSourceConfig) -> Result<Self, BrokerSourceError> {
        Ok(BrokerSource {
            info,
            client: CareRecordServiceClient::new(config.endpoint()?.connect_lazy()),
        })
    }
}

impl BrokerSourceConfig {
    /// The gRPC endpoint with TLS as configured (also how `carerecord lookup` reaches a broker).
    pub fn endpoint(&self) -> Result<Endpoint, BrokerSourceError> {
        let config = self;
        let mut endpoint = Endpoint::from_shared(config.url.clone())
            .map_err(|e| BrokerSourceError::Url(config.url.clone(), e.to_string()))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2));
        let wants_tls = config.url.starts_with("https://")
            || config.ca_cert.is_some()
            || config.client_cert.is_some();
        if wants_tls {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &config.ca_cert {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            } else {
                tls = tls.with_webpki_roots();
            }
            match (&config.client_cert, &config.client_key) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
                }
                (None, None) => {}
                _ => return Err(BrokerSourceError::HalfIdentity),
            }
            if let Some(domain) = &config.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| BrokerSourceError::Tls(e.to_string()))?;
        }
        Ok(endpoint)
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, BrokerSourceError> {
    std::fs::read(path).map_err(|source| BrokerSourceError::Read {
        path: path.clone(),
        source,
    })
}

#[async_trait]
impl Source for BrokerSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    /// The remote broker applies its own access policy (relationship, objections, sensitive
    /// data) for the forwarded requester.
    fn answers_depend_on_requester(&self) -> bool {
        true
    }

    async fn fetch(&self, request: &SourceRequest) -> Result<SourceReply, SourceError> {
        let remaining = request.remaining();
        if remaining.is_zero() {
            return Err(SourceError::Timeout);
        }
        let mut call = tonic::Request::new(GetCareRecordRequest {
            nhs_number: request.nhs_number.as_digits(),
            requester: Some(request.requester.clone()),
            sections: request.sections.to_request(),
            cache: CacheDirective::AllowCached as i32,
            via_brokers: request.via_brokers.clone(),
        });
        // Leave time for the answer to travel back and be decoded before our own deadline:
        // data that arrives a moment late is data thrown away.
        let margin = (remaining / 10).max(std::time::Duration::from_millis(50));
        let remote_budget = remaining.saturating_sub(margin);
        if remote_budget.is_zero() {
            return Err(SourceError::Timeout);
        }
        call.set_timeout(remote_budget);
        if let Some(tp) = crate::trace::traceparent().and_then(|tp| tp.parse().ok()) {
            call.metadata_mut().insert(crate::trace::HEADER, tp);
        }
        if let Ok(id) = request.request_id.parse() {
            call.metadata_mut().insert("x-request-id", id);
        }
        let mut client = self.client.clone();
        let response = match client.get_care_record(call).await {
            Ok(r) => r.into_inner(),
            Err(status) => return Err(status_error(&status)),
        };
        Ok(reply_from(&self.info, response, request.sections))
    }

    /// A document the remote broker listed (`Binary/{its id}`): fetched with its `GetDocument`,
    /// so the remote makes its own access decision and audits it too.
    async fn fetch_document(
        &self,
        request: &crate::DocumentRequest,
    ) -> Result<crate::Document, SourceError> {
        use futures::StreamExt;
        let remaining = request
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            return Err(SourceError::Timeout);
        }
        let id = request.url.strip_prefix("Binary/").unwrap_or(&request.url);
        let mut call = tonic::Request::new(carerecord_proto::GetDocumentRequest {
            document_id: id.to_owned(),
            requester: Some(request.requester.clone()),
        });
        call.set_timeout(remaining);
        if let Some(tp) = crate::trace::traceparent().and_then(|tp| tp.parse().ok()) {
            call.metadata_mut().insert(crate::trace::HEADER, tp);
        }
        if let Ok(rid) = request.request_id.parse() {
            call.metadata_mut().insert("x-request-id", rid);
        }
        let mut client = self.client.clone();
        let mut chunks = client
            .get_document(call)
            .await
            .map_err(|status| status_error(&status))?
            .into_inner();
        let first = chunks
            .message()
            .await
            .map_err(|status| status_error(&status))?;
        let (content_type, length, head) = match first {
            Some(c) => (c.content_type, (c.length > 0).then_some(c.length), c.data),
            None => (String::new(), Some(0), Vec::new()),
        };
        let max = request.max_bytes;
        let cap = usize::try_from(max).unwrap_or(usize::MAX);
        if length.is_some_and(|n| n > max) || head.len() as u64 > max {
            return Err(SourceError::TooLarge(cap));
        }
        let mut sent = head.len() as u64;
        let rest = chunks.map(move |chunk| {
            let chunk = chunk.map_err(|status| status_error(&status))?;
            sent += chunk.data.len() as u64;
            if sent > max {
                return Err(SourceError::TooLarge(cap));
            }
            Ok(bytes::Bytes::from(chunk.data))
        });
        let body = futures::stream::once(async move { Ok(bytes::Bytes::from(head)) }).chain(rest);
        Ok(crate::Document {
            content_type: if content_type.is_empty() {
                "application/octet-stream".to_owned()
            } else {
                content_type
            },
            length,
            body: Box::pin(body),
        })
    }
}

/// The remote broker's answer as this source's reply: provenance qualified with our id, and —
/// when the remote says its record is not complete (its own sources did not all answer) — a
/// shortfall for every section asked, naming the remote sources and carrying the remote's
/// section statuses, so the outcome is PARTIAL rather than a bare OK.
pub fn reply_from(
    info: &SourceInfo,
    response: GetCareRecordResponse,
    sections: SectionSet,
) -> SourceReply {
    let mut record = response.record.unwrap_or_default();
    // Remote source ids are only unique at the remote broker: qualify them with ours.
    let qualify = |p: &mut carerecord_proto::Provenance| {
        p.source_id = format!("{}/{}", info.id, p.source_id);
    };
    if let Some(patient) = record.patient.as_mut() {
        patient.provenance.iter_mut().for_each(qualify);
    }
    for section in Section::ALL {
        if let Some(entries) = record.section_mut(section) {
            for e in entries {
                e.provenance.iter_mut().for_each(qualify);
                for c in &mut e.conflicts {
                    for v in &mut c.values {
                        v.source_id = format!("{}/{}", info.id, v.source_id);
                    }
                }
            }
        }
    }
    let nobody_knows = record.patient.is_none()
        && record.entry_count() == 0
        && response
            .sources
            .iter()
            .all(|s| s.outcome == SourceOutcome::NotFound as i32);
    if nobody_knows && response.complete {
        return SourceReply::NotFound;
    }
    // The remote discarded data about another patient: that stays a WRONG_PATIENT of ours
    // (typed), never a generic "invalid data" line.
    let wrong_patient: Vec<String> = response
        .warnings
        .iter()
        .filter(|w| w.kind == WarningKind::WrongPatient as i32)
        .map(|w| format!("at the remote broker: {}", w.message))
        .collect();
    let warnings = response
        .warnings
        .iter()
        // Incompleteness becomes a shortfall below; conflicts are recomputed by our own merge
        // from the per-organisation assertions the remote's provenance carries.
        .filter(|w| {
            w.kind != WarningKind::Incomplete as i32
                && w.kind != WarningKind::Conflict as i32
                && w.kind != WarningKind::WrongPatient as i32
        })
        .map(|w| match WarningKind::try_from(w.kind) {
            // Keep what kind of problem it was in the text: the warning list is untyped here.
            Ok(kind)
                if kind != WarningKind::SourceDataInvalid && kind != WarningKind::Unspecified =>
            {
                format!("{}: {}", remote_kind(kind), w.message)
            }
            _ => w.message.clone(),
        })
        .collect();
    // A remote source that refused because the lookup came round in a loop (it is us, or one
    // we ask ourselves) is not missing data.
    let loop_refusal = |s: &carerecord_proto::SourceStatus| {
        s.outcome == SourceOutcome::Refused as i32 && s.message.contains("loop")
    };
    let not_answered = |s: &&carerecord_proto::SourceStatus| {
        s.outcome != SourceOutcome::Ok as i32
            && s.outcome != SourceOutcome::NotFound as i32
            && !loop_refusal(s)
    };
    let other_gap = response.warnings.iter().any(|w| {
        [
            WarningKind::WrongPatient,
            WarningKind::DataCutShort,
            WarningKind::RegisteredGpNotFound,
            WarningKind::LocatorUnavailable,
        ]
        .iter()
        .any(|k| w.kind == *k as i32)
    });
    let only_loops = response.sources.iter().any(loop_refusal)
        && !response.sources.iter().any(|s| not_answered(&s))
        && !other_gap;
    let mut shortfalls = Vec::new();
    if !response.complete && !only_loops {
        let missing: Vec<String> = response
            .sources
            .iter()
            .filter(not_answered)
            .map(|s| {
                let outcome = SourceOutcome::try_from(s.outcome)
                    .map(|o| {
                        o.as_str_name()
                            .trim_start_matches("SOURCE_OUTCOME_")
                            .to_lowercase()
                    })
                    .unwrap_or_else(|_| "unknown".into());
                format!("{} ({outcome})", s.organisation_code)
            })
            .collect();
        let reason = if missing.is_empty() {
            "the remote broker's record is not complete".to_owned()
        } else {
            format!(
                "the remote broker's own sources did not all answer: {}",
                missing.join(", ")
            )
        };
        shortfalls.push(Shortfall { sections, reason });
        for status in &response.section_statuses {
            let Ok(section) = Section::try_from(status.section) else {
                continue;
            };
            let gap = status.state == SectionState::Partial as i32
                || status.state == SectionState::Unknown as i32;
            if gap && sections.contains(section) {
                shortfalls.push(Shortfall {
                    sections: SectionSet::NONE.with(section),
                    reason: format!("remote {}", status.summary),
                });
            }
        }
    }
    SourceReply::Found(SourceRecord {
        record,
        warnings,
        nested: response.sources,
        shortfalls,
        wrong_patient,
    })
}

fn remote_kind(kind: WarningKind) -> &'static str {
    match kind {
        WarningKind::DemographicsMismatch => "demographics mismatch",
        WarningKind::LocatorUnavailable => "record locator unavailable",
        WarningKind::UnknownOrganisation => "unknown organisation",
        WarningKind::WrongPatient => "wrong patient",
        WarningKind::Conflict => "conflict",
        WarningKind::DataCutShort => "data cut short",
        WarningKind::RegisteredGpNotFound => "registered GP does not know the patient",
        _ => "warning",
    }
}

/// Maps the remote broker's refusal to an outcome; the text is the remote's own, which a
/// carerecord broker already keeps free of patient data.
fn status_error(status: &tonic::Status) -> SourceError {
    let message: String = status.message().chars().take(200).collect();
    match status.code() {
        Code::DeadlineExceeded | Code::Cancelled => SourceError::Timeout,
        Code::FailedPrecondition => SourceError::Refused(message),
        Code::PermissionDenied | Code::Unauthenticated => {
            SourceError::Refused(format!("remote broker denied access: {message}"))
        }
        Code::Unavailable => SourceError::Connect(message),
        Code::ResourceExhausted => SourceError::Unavailable(message),
        other => SourceError::Other(format!("remote broker answered {other:?}: {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carerecord_proto::{SectionStatus, SourceStatus, Warning};

    fn info() -> SourceInfo {
        SourceInfo {
            id: "north".into(),
            organisation_code: "NORTH".into(),
            organisation_name: "North region".into(),
        }
    }

    fn remote(outcome: SourceOutcome) -> SourceStatus {
        SourceStatus {
            source_id: "gp".into(),
            organisation_code: "H81005".into(),
            outcome: outcome as i32,
            ..SourceStatus::default()
        }
    }

    #[test]
    fn a_remote_region_whose_sources_all_failed_is_partial_not_ok() {
        let response = GetCareRecordResponse {
            sources: vec![remote(SourceOutcome::Error), remote(SourceOutcome::Timeout)],
            complete: false,
            section_statuses: vec![SectionStatus {
                section: Section::Allergies as i32,
                state: SectionState::Unknown as i32,
                summary: "Allergies: unknown from H81005 — error".into(),
                ..SectionStatus::default()
            }],
            ..GetCareRecordResponse::default()
        };
        let sections = SectionSet::NONE
            .with(Section::Allergies)
            .with(Section::Conditions);
        let SourceReply::Found(record) = reply_from(&info(), response, sections) else {
            panic!("an unanswered region is not 'patient not known'");
        };
        assert_eq!(record.shortfalls.len(), 2);
        assert_eq!(record.shortfalls[0].sections, sections);
        assert!(
            record.shortfalls[0].reason.contains("H81005 (error)"),
            "{:?}",
            record.shortfalls[0]
        );
        assert!(record.shortfalls[0].reason.contains("H81005 (timeout)"));
        assert_eq!(
            record.shortfalls[1].sections,
            SectionSet::NONE.with(Section::Allergies)
        );
        assert!(record.shortfalls[1].reason.contains("unknown from H81005"));
        assert_eq!(record.nested.len(), 2);
    }

    #[test]
    fn a_remote_source_refusing_a_loop_is_not_missing_data() {
        let mut refused = remote(SourceOutcome::Refused);
        refused.message =
            "refused: lookup loop: this broker (a) has already handled this lookup".into();
        let response = GetCareRecordResponse {
            sources: vec![remote(SourceOutcome::Ok), refused],
            complete: false,
            record: Some(carerecord_proto::CareRecord::default()),
            ..GetCareRecordResponse::default()
        };
        let SourceReply::Found(record) = reply_from(&info(), response, SectionSet::ALL) else {
            panic!("found");
        };
        assert!(record.shortfalls.is_empty(), "{:?}", record.shortfalls);
    }

    #[test]
    fn a_remote_wrong_patient_warning_stays_wrong_patient() {
        let response = GetCareRecordResponse {
            sources: vec![remote(SourceOutcome::WrongPatient)],
            complete: false,
            record: Some(carerecord_proto::CareRecord::default()),
            warnings: vec![Warning {
                kind: WarningKind::WrongPatient as i32,
                message: "Riverside Hospital answered about another patient".into(),
                source_ids: vec!["gp".into()],
            }],
            ..GetCareRecordResponse::default()
        };
        let SourceReply::Found(record) = reply_from(&info(), response, SectionSet::ALL) else {
            panic!("found");
        };
        assert_eq!(
            record.wrong_patient,
            ["at the remote broker: Riverside Hospital answered about another patient"]
        );
        assert!(record.warnings.is_empty(), "{:?}", record.warnings);
        assert!(
            !record.shortfalls.is_empty(),
            "and the remote record is short"
        );
    }

    #[test]
    fn a_complete_remote_answer_has_no_shortfall_and_nobody_knowing_is_not_found() {
        let known = GetCareRecordResponse {
            sources: vec![remote(SourceOutcome::Ok)],
            complete: true,
            record: Some(carerecord_proto::CareRecord::default()),
            warnings: vec![Warning {
                kind: WarningKind::DemographicsMismatch as i32,
                message: "Date of birth differs".into(),
                source_ids: Vec::new(),
            }],
            ..GetCareRecordResponse::default()
        };
        let SourceReply::Found(record) = reply_from(&info(), known, SectionSet::ALL) else {
            panic!("found");
        };
        assert!(record.shortfalls.is_empty());
        assert_eq!(
            record.warnings,
            ["demographics mismatch: Date of birth differs"],
            "the remote warning keeps its kind in its text"
        );
        let nobody = GetCareRecordResponse {
            sources: vec![remote(SourceOutcome::NotFound)],
            complete: true,
            ..GetCareRecordResponse::default()
        };
        assert!(matches!(
            reply_from(&info(), nobody, SectionSet::ALL),
            SourceReply::NotFound
        ));
    }
}
