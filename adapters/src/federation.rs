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
use carerecord_proto::{CacheDirective, GetCareRecordRequest, Section, SourceOutcome};
use serde::Deserialize;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{Source, SourceError, SourceInfo, SourceRecord, SourceReply, SourceRequest};

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
    #[error("invalid broker url {0:?}: {1}")]
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
        Ok(BrokerSource {
            info,
            client: CareRecordServiceClient::new(endpoint.connect_lazy()),
        })
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
        if let Ok(id) = request.request_id.parse() {
            call.metadata_mut().insert("x-request-id", id);
        }
        let mut client = self.client.clone();
        let response = match client.get_care_record(call).await {
            Ok(r) => r.into_inner(),
            Err(status) => return Err(status_error(&status)),
        };
        let mut record = response.record.unwrap_or_default();
        // Remote source ids are only unique at the remote broker: qualify them with ours.
        let qualify = |p: &mut carerecord_proto::Provenance| {
            p.source_id = format!("{}/{}", self.info.id, p.source_id);
        };
        if let Some(patient) = record.patient.as_mut() {
            patient.provenance.iter_mut().for_each(qualify);
        }
        for section in Section::ALL {
            if let Some(entries) = record.section_mut(section) {
                for e in entries {
                    e.provenance.iter_mut().for_each(qualify);
                }
            }
        }
        let nobody_knows = record.patient.is_none()
            && record.entry_count() == 0
            && response
                .sources
                .iter()
                .all(|s| s.outcome == SourceOutcome::NotFound as i32);
        if nobody_knows {
            return Ok(SourceReply::NotFound);
        }
        let warnings = response
            .warnings
            .iter()
            .filter(|w| w.kind != carerecord_proto::WarningKind::Incomplete as i32)
            .map(|w| w.message.clone())
            .collect();
        Ok(SourceReply::Found(SourceRecord {
            record,
            warnings,
            nested: response.sources,
            ..SourceRecord::default()
        }))
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
