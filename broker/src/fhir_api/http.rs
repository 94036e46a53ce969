//! The FHIR face's routes. Per request, and nothing more: identify the calling system from its
//! client certificate, the person from the token it signed, read the `Parameters`, call the core
//! ([`Broker::lookup`]) and translate the answer into a Bundle, or the failure into an
//! OperationOutcome. Access policy, cache, single flight and audit are the core's, as for gRPC.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use carerecord_proto::{Requester, Section, SourceOutcome};
use serde_json::Value;
use tracing::Instrument;

use super::bundle::{self, BundleOptions};
use super::capability;
use super::listen::{FaceListener, Peer};
use super::outcome::{FHIR_JSON, FaceError};
use super::token::{self, Expectations, TokenKey};
use crate::access::{Caller, UNVERIFIED};
use crate::config::SystemConfig;
use crate::lookup::{Broker, CallingSystem, LookupAnswer};
use crate::service::{acceptable_request_id, system_for_certificate};
use crate::validate;

/// A `Parameters` body is small; anything big is abuse.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// How the face checks who is asking.
#[derive(Clone)]
pub struct FaceSettings {
    /// Base URL as callers reach the face, ending in `/`.
    pub base_url: String,
    /// The `aud` every token must carry.
    pub audience: String,
    pub max_token_lifetime: Duration,
    /// Calling systems under mutual TLS; `None` when no client certificate is asked for (every
    /// caller is then `unverified`).
    pub systems: Option<Vec<SystemConfig>>,
    /// Token keys by calling-system id.
    pub keys: HashMap<String, TokenKey>,
    /// Verifies `unverified` callers' tokens (development without client certificates).
    pub unverified_key: Option<TokenKey>,
    pub max_document_bytes: u64,
}

/// The face: settings and the core.
pub struct Face {
    pub broker: Arc<Broker>,
    pub settings: FaceSettings,
}

/// The routes, for a listener of the caller's choosing.
pub fn router(face: Arc<Face>) -> Router {
    Router::new()
        .route("/metadata", get(metadata))
        .route("/Patient/$getstructuredrecord", post(structured_record))
        .route("/Binary/{id}", get(binary))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(face)
}

/// Serves until `shutdown` resolves; in-flight requests then finish.
pub async fn serve(
    listener: FaceListener,
    face: Arc<Face>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(face).into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

fn fhir_json(status: StatusCode, body: &Value, request_id: Option<&str>) -> Response {
    let mut response = (status, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    // Patient data: never kept by a browser or an intermediary.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(id) = request_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        headers.insert("x-request-id", id);
    }
    response
}

async fn metadata(State(face): State<Arc<Face>>) -> Response {
    let statement =
        capability::capability_statement(&face.settings.base_url, env!("CARGO_PKG_VERSION"));
    fhir_json(StatusCode::OK, &statement, None)
}

async fn not_found() -> FaceError {
    FaceError::new(
        StatusCode::NOT_FOUND,
        "not-supported",
        "NOT_SUPPORTED",
        "this FHIR endpoint serves GET metadata, POST Patient/$getstructuredrecord and GET Binary/{id}",
    )
}

impl Face {
    /// The calling system (from its client certificate) and the key its tokens verify with.
    fn identify(&self, peer: &Peer) -> Result<(Caller, &TokenKey), FaceError> {
        let Some(systems) = &self.settings.systems else {
            let key = self
                .settings
                .unverified_key
                .as_ref()
                .ok_or_else(|| FaceError::from(&token::TokenError::NoKey))?;
            return Ok((
                Caller {
                    system: UNVERIFIED.to_owned(),
                    trusted_assertions: false,
                },
                key,
            ));
        };
        let system = peer
            .certificates
            .as_ref()
            .and_then(|chain| chain.first())
            .and_then(|leaf| system_for_certificate(systems, leaf))
            .ok_or_else(|| {
                tracing::warn!(peer = %peer.addr, "calling system not recognised (FHIR face or web view launch)");
                FaceError::from(&crate::error::LookupError::Denied(
                    crate::access::Denial::UnknownSystem,
                ))
            })?;
        let key = self
            .settings
            .keys
            .get(&system.id)
            .ok_or_else(|| FaceError::from(&token::TokenError::NoKey))?;
        Ok((
            Caller {
                system: system.id.clone(),
                trusted_assertions: system.trusted_assertions,
            },
            key,
        ))
    }

    /// Who is asking: the calling system (its client certificate) and the person (the token it
    /// signed). An unrecognised system is refused and, as on gRPC, the refusal audited for the
    /// patient `patient` names (read only then).
    pub(crate) async fn who(
        &self,
        peer: &Peer,
        headers: &HeaderMap,
        patient: impl FnOnce() -> Option<String>,
        request_id: &str,
    ) -> Result<(Caller, Requester), FaceError> {
        let (caller, key) = match self.identify(peer) {
            Ok(found) => found,
            Err(e) => {
                if e.reason == "UNKNOWN_CALLING_SYSTEM"
                    && let Some(nhs_number) = patient()
                {
                    self.audit_unknown_system(headers, nhs_number, request_id)
                        .await;
                }
                return Err(e);
            }
        };
        let requester = self.requester(headers, &caller, key)?;
        Ok((caller, requester))
    }

    /// Records the refusal of a client certificate no configured system matches, as gRPC does:
    /// the core audits it under the requester the (unverifiable) token names, for `nhs_number`.
    async fn audit_unknown_system(
        &self,
        headers: &HeaderMap,
        nhs_number: String,
        request_id: &str,
    ) {
        let requester = bearer(headers).and_then(token::unverified_requester);
        if let Ok(checked) =
            validate::check_face_request(nhs_number, requester, Vec::new(), false, request_id)
        {
            let _ = self
                .broker
                .lookup(checked, CallingSystem::Unrecognised)
                .await;
        }
    }

    /// The requester the bearer token speaks for.
    fn requester(
        &self,
        headers: &HeaderMap,
        caller: &Caller,
        key: &TokenKey,
    ) -> Result<Requester, FaceError> {
        let token = bearer(headers).ok_or_else(|| FaceError::from(&token::TokenError::Missing))?;
        token::verify(
            token,
            key,
            &Expectations {
                audience: &self.settings.audience,
                issuer: &caller.system,
                max_lifetime: self.settings.max_token_lifetime,
                now: SystemTime::now(),
            },
        )
        .map_err(|e| {
            tracing::info!(system = %caller.system, reason = e.reason(), error = %e, "requester token refused (FHIR face or web view launch)");
            FaceError::from(&e)
        })
    }

    pub(crate) fn request_id(&self, headers: &HeaderMap) -> String {
        headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|id| acceptable_request_id(id))
            .map(str::to_owned)
            .unwrap_or_else(|| self.broker.new_request_id())
    }
}

/// The bearer token of a request, if it carries one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// What `$getstructuredrecord`'s Parameters ask for.
#[derive(Debug, Default, PartialEq)]
pub struct Asked {
    pub nhs_number: String,
    pub sections: Vec<Section>,
    pub include_resolved_allergies: bool,
    pub medications_from: Option<String>,
}

/// Reads a GP Connect-style `Parameters` resource: `patientNHSNumber` (valueIdentifier),
/// `includeAllergies` (part `includeResolvedAllergies`), `includeMedication` (part
/// `medicationSearchFromDate`), `includeProblems`, `includeInvestigations`,
/// `includeConsultations`, and carerecord's repeatable `includeSection` (valueCode: a section's
/// short name). No include parameter at all means every section.
pub fn read_parameters(body: &[u8]) -> Result<Asked, FaceError> {
    let bad = |why: &str| {
        FaceError::bad_request("INVALID_PARAMETER", format!("Parameters: {why}")).at("Parameters")
    };
    let value: Value =
        serde_json::from_slice(body).map_err(|_| bad("the body is not a JSON resource"))?;
    if value["resourceType"] != "Parameters" {
        return Err(bad("the body must be a Parameters resource"));
    }
    let parameters = value["parameter"]
        .as_array()
        .ok_or_else(|| bad("no parameter array"))?;
    // Without includeAllergies every section comes whole; with it, GP Connect's
    // includeResolvedAllergies decides (absent: current allergies only).
    let mut asked = Asked {
        include_resolved_allergies: true,
        ..Asked::default()
    };
    let mut nhs = None;
    let add = |s: Section, asked: &mut Asked| {
        if !asked.sections.contains(&s) {
            asked.sections.push(s);
        }
    };
    for p in parameters {
        let part = |name: &str| {
            p["part"]
                .as_array()
                .and_then(|parts| parts.iter().find(|q| q["name"] == name))
        };
        match p["name"].as_str() {
            Some("patientNHSNumber") => {
                let identifier = &p["valueIdentifier"];
                let system = identifier["system"].as_str().unwrap_or("");
                if !system.is_empty() && system != "https://fhir.nhs.uk/Id/nhs-number" {
                    return Err(bad(
                        "patientNHSNumber must use system https://fhir.nhs.uk/Id/nhs-number",
                    ));
                }
                let value = identifier["value"]
                    .as_str()
                    .ok_or_else(|| bad("patientNHSNumber has no valueIdentifier.value"))?;
                if nhs.replace(value.to_owned()).is_some() {
                    return Err(bad("patientNHSNumber given more than once"));
                }
            }
            Some("includeAllergies") => {
                add(Section::Allergies, &mut asked);
                asked.include_resolved_allergies = false;
                if let Some(q) = part("includeResolvedAllergies") {
                    asked.include_resolved_allergies = q["valueBoolean"]
                        .as_bool()
                        .ok_or_else(|| bad("includeResolvedAllergies needs valueBoolean"))?;
                }
            }
            Some("includeMedication") => {
                add(Section::Medications, &mut asked);
                if let Some(q) = part("medicationSearchFromDate") {
                    let date = q["valueDate"]
                        .as_str()
                        .filter(|d| is_date(d))
                        .ok_or_else(|| {
                            bad("medicationSearchFromDate needs valueDate (YYYY-MM-DD)")
                        })?;
                    asked.medications_from = Some(date.to_owned());
                }
            }
            Some("includeProblems") => add(Section::Conditions, &mut asked),
            Some("includeInvestigations") => add(Section::TestResults, &mut asked),
            Some("includeConsultations") => add(Section::Encounters, &mut asked),
            Some("includeSection") => {
                let code = p["valueCode"]
                    .as_str()
                    .ok_or_else(|| bad("includeSection needs valueCode"))?;
                let section = Section::from_short_name(code).ok_or_else(|| {
                    FaceError::bad_request(
                        "UNKNOWN_SECTION",
                        format!(
                            "includeSection: unknown section {code:?}; known: {}",
                            Section::ALL.map(Section::short_name).join(", ")
                        ),
                    )
                    .at("Parameters.parameter.where(name='includeSection')")
                })?;
                add(section, &mut asked);
            }
            Some(other) => {
                return Err(bad(&format!("unknown parameter {other:?}")));
            }
            None => return Err(bad("a parameter has no name")),
        }
    }
    asked.nhs_number = nhs.ok_or_else(|| {
        FaceError::bad_request(
            "INVALID_NHS_NUMBER",
            "Parameters: patientNHSNumber is required",
        )
        .at("Parameters.parameter.where(name='patientNHSNumber')")
    })?;
    Ok(asked)
}

fn is_date(d: &str) -> bool {
    let b = d.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

async fn structured_record(
    State(face): State<Arc<Face>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request_id = face.request_id(&headers);
    let span =
        tracing::info_span!("fhir", operation = "$getstructuredrecord", request_id = %request_id);
    crate::telemetry::join_callers_trace(
        &span,
        headers
            .get(carerecord_adapters::trace::HEADER)
            .and_then(|v| v.to_str().ok()),
    );
    tagged(
        lookup(&face, &peer, &headers, &body, &request_id)
            .instrument(span)
            .await,
        &request_id,
    )
}

/// Refuses a body whose media type is none of `accepted`, saying what to send.
pub(crate) fn require_media(
    headers: &HeaderMap,
    accepted: &[&str],
    hint: &'static str,
) -> Result<(), FaceError> {
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accepted.iter().any(|m| media.starts_with(m)) {
        return Ok(());
    }
    Err(FaceError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "not-supported",
        "UNSUPPORTED_MEDIA_TYPE",
        hint,
    ))
}

/// The response, or the refusal carrying the request id as answers do.
pub(crate) fn tagged(result: Result<Response, FaceError>, request_id: &str) -> Response {
    result.unwrap_or_else(|e| {
        let mut response = e.into_response();
        if let Ok(id) = HeaderValue::from_str(request_id) {
            response.headers_mut().insert("x-request-id", id);
        }
        response
    })
}

async fn lookup(
    face: &Face,
    peer: &Peer,
    headers: &HeaderMap,
    body: &[u8],
    request_id: &str,
) -> Result<Response, FaceError> {
    require_media(
        headers,
        &["application/fhir+json", "application/json"],
        "send the Parameters as application/fhir+json",
    )?;
    let patient = || read_parameters(body).ok().map(|asked| asked.nhs_number);
    let (caller, requester) = face.who(peer, headers, patient, request_id).await?;
    let asked = read_parameters(body)?;
    let no_cache = headers
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("no-cache"));
    let checked = validate::check_face_request(
        asked.nhs_number.clone(),
        Some(requester),
        asked.sections.iter().map(|s| *s as i32).collect(),
        no_cache,
        request_id,
    )
    .map_err(|e| {
        tracing::info!(request_id, reason = e.reason(), error = %e, "FHIR lookup refused");
        metrics::counter!(crate::metrics::LOOKUPS, "outcome" => e.metric_outcome()).increment(1);
        FaceError::from(&e)
    })?;
    let answer = face
        .broker
        .lookup(checked, CallingSystem::Identified(caller))
        .await
        .map_err(|e| FaceError::from(&e))?;
    if nobody_knows(&answer) {
        return Err(FaceError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "PATIENT_NOT_FOUND",
            "no organisation asked holds a record for this NHS number",
        ));
    }
    let options = BundleOptions {
        base_url: face.settings.base_url.clone(),
        include_resolved_allergies: asked.include_resolved_allergies,
        medications_from: asked.medications_from,
        sections: asked.sections,
    };
    let bundle = bundle::structured_record(&answer, &options);
    Ok(fhir_json(StatusCode::OK, &bundle, Some(request_id)))
}

/// `GET Binary/{id}`: a document of the record, streamed from the organisation that holds it
/// through the broker, after the same access decision as the record (and audited). Raw content
/// with its own media type; a FHIR `Binary` resource (base64) when the client accepts only
/// `application/fhir+json`.
async fn binary(
    State(face): State<Arc<Face>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let request_id = face.request_id(&headers);
    tagged(
        document(&face, &peer, &headers, &id, &request_id).await,
        &request_id,
    )
}

async fn document(
    face: &Face,
    peer: &Peer,
    headers: &HeaderMap,
    id: &str,
    request_id: &str,
) -> Result<Response, FaceError> {
    use futures::StreamExt;
    let patient = || {
        face.broker
            .open_document(id)
            .map(|d| d.nhs_number.as_digits())
    };
    let (caller, requester) = face.who(peer, headers, patient, request_id).await?;
    let not_found = || FaceError::from(&crate::error::LookupError::DocumentNotFound);
    let doc = face.broker.open_document(id).ok_or_else(not_found)?;
    let checked = validate::check_face_request(
        doc.nhs_number.as_digits(),
        Some(requester),
        Vec::new(),
        false,
        request_id,
    )
    .map_err(|e| FaceError::from(&e))?;
    let max = face.settings.max_document_bytes;
    let answer = face
        .broker
        .document(checked, id, CallingSystem::Identified(caller), max)
        .await
        .map_err(|e| FaceError::from(&e))?;
    let doc = answer.document;
    let wants_fhir = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/fhir+json") && !a.contains("*/*"));
    if wants_fhir {
        let mut content = Vec::new();
        let mut body = doc.body;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                FaceError::from(&crate::error::LookupError::DocumentUnavailable(
                    e.to_string(),
                ))
            })?;
            content.extend_from_slice(&chunk);
        }
        let binary = serde_json::json!({
            "resourceType": "Binary",
            "id": id,
            "contentType": doc.content_type,
            "data": token::base64_standard(&content),
        });
        return Ok(fhir_json(StatusCode::OK, &binary, Some(request_id)));
    }
    let mut response = attachment(doc);
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert("x-request-id", v);
    }
    Ok(response)
}

/// A document's content as it streams from its organisation: its own media type, as an
/// attachment in a CSP sandbox (a source's HTML or SVG must not run as the broker's origin),
/// never stored or sniffed. The FHIR face and the web view both answer with it.
pub(crate) fn attachment(doc: carerecord_adapters::Document) -> Response {
    use futures::StreamExt;
    let body = axum::body::Body::from_stream(
        doc.body
            .map(|chunk| chunk.map_err(|e| std::io::Error::other(e.to_string()))),
    );
    let mut response = (StatusCode::OK, body).into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&doc.content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Some(length) = doc.length
        && let Ok(v) = HeaderValue::from_str(&length.to_string())
    {
        h.insert(header::CONTENT_LENGTH, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'"),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment"),
    );
    response
}

/// Every organisation asked answered "not known here", and none is missing: a 404, as GP
/// Connect answers an unknown patient. One that did not answer keeps it a (partial) 200.
fn nobody_knows(answer: &LookupAnswer) -> bool {
    answer.record.patient.is_none()
        && answer.complete
        // Under a patient's objection only the requester's own organisation is in view.
        && !answer.withheld
        && !answer.sources.is_empty()
        && answer
            .sources
            .iter()
            .all(|s| s.outcome == SourceOutcome::NotFound as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: Value) -> Result<Asked, FaceError> {
        read_parameters(v.to_string().as_bytes())
    }

    fn nhs(value: &str) -> Value {
        serde_json::json!({"name": "patientNHSNumber", "valueIdentifier": {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": value}})
    }

    #[test]
    fn gp_connect_parameters_choose_sections_and_filters() {
        let asked = params(serde_json::json!({"resourceType": "Parameters", "parameter": [
            nhs("9434765919"),
            {"name": "includeAllergies", "part": [{"name": "includeResolvedAllergies", "valueBoolean": true}]},
            {"name": "includeMedication", "part": [{"name": "medicationSearchFromDate", "valueDate": "2024-01-01"}]},
            {"name": "includeSection", "valueCode": "test_results"},
        ]}))
        .expect("valid");
        assert_eq!(asked.nhs_number, "9434765919");
        assert_eq!(
            asked.sections,
            [
                Section::Allergies,
                Section::Medications,
                Section::TestResults
            ]
        );
        assert!(asked.include_resolved_allergies);
        assert_eq!(asked.medications_from.as_deref(), Some("2024-01-01"));

        let all = params(
            serde_json::json!({"resourceType": "Parameters", "parameter": [nhs("9434765919")]}),
        )
        .expect("valid");
        assert!(
            all.sections.is_empty(),
            "no include parameter: every section"
        );
        assert!(all.include_resolved_allergies, "and every allergy");
    }

    #[test]
    fn malformed_parameters_are_400_with_a_reason() {
        let reason = |v: Value| params(v).expect_err("refused").reason;
        assert_eq!(
            reason(serde_json::json!({"resourceType": "Patient"})),
            "INVALID_PARAMETER"
        );
        assert_eq!(
            reason(serde_json::json!({"resourceType": "Parameters", "parameter": []})),
            "INVALID_NHS_NUMBER"
        );
        assert_eq!(
            reason(
                serde_json::json!({"resourceType": "Parameters", "parameter": [nhs("9434765919"), {"name": "includeSection", "valueCode": "horoscope"}]})
            ),
            "UNKNOWN_SECTION"
        );
        assert_eq!(
            reason(
                serde_json::json!({"resourceType": "Parameters", "parameter": [nhs("9434765919"), {"name": "includeMedication", "part": [{"name": "medicationSearchFromDate", "valueDate": "last week"}]}]})
            ),
            "INVALID_PARAMETER"
        );
        assert_eq!(
            reason(
                serde_json::json!({"resourceType": "Parameters", "parameter": [nhs("9434765919"), {"name": "surprise"}]})
            ),
            "INVALID_PARAMETER"
        );
        assert!(read_parameters(b"not json").is_err());
    }
}
