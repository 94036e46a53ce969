//! The HTTP side of a FHIR source: one pooled client, TLS as configured, a per-source request
//! limit, capped body reads, and errors that say what went wrong without saying to whom.
//!
//! URLs carry NHS numbers in their query strings, so no error or log line here includes a URL or
//! a reqwest error's own message (which does); only the innermost cause (an I/O or TLS error).

use std::error::Error as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Response, Url};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::Semaphore;

use super::config::{FhirConfig, FhirConfigError};
use super::model::{Resource, parse_resource};
use crate::SourceError;

pub(crate) const FHIR_JSON: &str = "application/fhir+json";

/// How long an idle pooled connection is kept: long enough to span a clinician's clicks through
/// a record, short enough not to hold sockets a server has forgotten.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A pooled HTTP client for FHIR sources with the same TLS settings (CA, client identity), to
/// be shared: a region's directory organisations, often thousands behind one host, then share
/// connections and TLS sessions instead of each holding its own pool. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SharedClient(Client);

impl SharedClient {
    /// The client for `config`'s TLS settings; its base URL and token do not matter here.
    pub fn new(config: &FhirConfig) -> Result<Self, FhirConfigError> {
        let tls = tls_config(config)?;
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(FHIR_JSON));
        let client = Client::builder()
            .tls_backend_preconfigured(tls)
            .default_headers(headers)
            .user_agent(concat!("carerecord/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .tcp_nodelay(true)
            // A FHIR API has no business redirecting; following one could send the token and
            // the NHS number elsewhere. A 3xx is reported as a status.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| FhirConfigError::Client(root_cause(&e)))?;
        Ok(SharedClient(client))
    }
}

/// The HTTP client of one FHIR source, shared by all its lookups.
#[derive(Debug)]
pub(crate) struct FhirHttp {
    /// A pooled client: connections (and TLS sessions) are reused across lookups, and across
    /// sources when it is a [`SharedClient`].
    client: Client,
    /// The base URL, always ending in `/` so resource paths join under it.
    base: Url,
    /// `Authorization` value when the source wants a bearer token (marked sensitive).
    authorization: Option<HeaderValue>,
    /// Caps requests in flight to this source across all lookups, so one busy patient (or a burst
    /// of lookups) cannot open unbounded connections to one organisation.
    limiter: Semaphore,
    /// Largest body read.
    max_response_bytes: usize,
}

impl FhirHttp {
    pub(crate) fn new(config: &FhirConfig) -> Result<Self, FhirConfigError> {
        Self::with_client(config, SharedClient::new(config)?)
    }

    /// As [`FhirHttp::new`], on a client shared with other sources (see [`SharedClient`]).
    pub(crate) fn with_client(
        config: &FhirConfig,
        client: SharedClient,
    ) -> Result<Self, FhirConfigError> {
        let base = parse_base_url(&config.base_url)?;
        if config.max_concurrent_requests == 0 {
            return Err(FhirConfigError::ZeroLimit {
                field: "max_concurrent_requests",
            });
        }
        if config.max_response_bytes == 0 {
            return Err(FhirConfigError::ZeroLimit {
                field: "max_response_bytes",
            });
        }
        let client = client.0;
        let authorization = match &config.bearer_token_env {
            Some(var) => {
                let token = std::env::var(var)
                    .map_err(|_| FhirConfigError::TokenEnvMissing { var: var.clone() })?;
                Some(
                    bearer(&token)
                        .ok_or_else(|| FhirConfigError::TokenEnvInvalid { var: var.clone() })?,
                )
            }
            None => None,
        };
        Ok(FhirHttp {
            client,
            base,
            authorization,
            limiter: Semaphore::new(config.max_concurrent_requests),
            max_response_bytes: config.max_response_bytes,
        })
    }

    pub(crate) fn set_bearer_token(&mut self, token: &str) -> Result<(), FhirConfigError> {
        self.authorization = Some(bearer(token).ok_or(FhirConfigError::InvalidToken)?);
        Ok(())
    }

    pub(crate) fn base(&self) -> &Url {
        &self.base
    }

    /// Resolves a link from the server (absolute or relative) and checks it stays on the
    /// source's origin: a `next` link elsewhere would be sent our token and requester headers.
    pub(crate) fn resolve_link(&self, link: &str) -> Result<Url, SourceError> {
        let url = self
            .base
            .join(link)
            .map_err(|_| SourceError::InvalidResponse("a paging link is not a valid URL".into()))?;
        if url.origin() != self.base.origin() {
            return Err(SourceError::InvalidResponse(
                "a paging link points outside the source".into(),
            ));
        }
        Ok(url)
    }

    /// GETs a document's content from the source's own origin, as a stream capped at
    /// `max_bytes` (checked against the declared length first, then as it arrives).
    pub(crate) async fn get_document(
        &self,
        link: &str,
        headers: &HeaderMap,
        max_bytes: u64,
    ) -> Result<crate::Document, SourceError> {
        use futures::StreamExt;
        let url = self.base.join(link).map_err(|_| {
            SourceError::InvalidResponse("a document URL is not a valid URL".into())
        })?;
        if url.origin() != self.base.origin() {
            // Never fetch elsewhere: the URL came from the source's data, and our token and the
            // requester's headers would go with it.
            return Err(SourceError::Refused(
                "the document URL points outside the source".into(),
            ));
        }
        let mut request = self
            .client
            .get(url)
            .headers(headers.clone())
            .header(ACCEPT, "*/*");
        if let Some(auth) = &self.authorization {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        if let Some(traceparent) = crate::trace::traceparent() {
            request = request.header(crate::trace::HEADER, traceparent);
        }
        let response = request.send().await.map_err(transport_error)?;
        let status = response.status();
        if !status.is_success() {
            return Err(SourceError::Status(status.as_u16()));
        }
        let cap = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        let length = response.content_length();
        if length.is_some_and(|n| n > max_bytes) {
            return Err(SourceError::TooLarge(cap));
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_owned();
        let mut sent: u64 = 0;
        let body = response.bytes_stream().map(move |chunk| {
            let chunk = chunk.map_err(transport_error)?;
            sent += chunk.len() as u64;
            if sent > max_bytes {
                return Err(SourceError::TooLarge(cap));
            }
            Ok(chunk)
        });
        Ok(crate::Document {
            content_type,
            length,
            body: Box::pin(body),
        })
    }

    /// GETs `url` and parses the body as one FHIR resource.
    pub(crate) async fn get(&self, url: Url, headers: &HeaderMap) -> Result<Resource, SourceError> {
        let request = self.client.get(url).headers(headers.clone());
        self.send(request).await
    }

    /// POSTs a FHIR JSON body to the base URL (a batch) and parses the answer.
    pub(crate) async fn post_base(
        &self,
        body: Vec<u8>,
        headers: &HeaderMap,
    ) -> Result<Resource, SourceError> {
        // The batch endpoint is the base itself, conventionally without the trailing slash.
        let mut url = self.base.clone();
        let path = url.path().trim_end_matches('/').to_owned();
        url.set_path(&path);
        let request = self
            .client
            .post(url)
            .headers(headers.clone())
            .header(CONTENT_TYPE, FHIR_JSON)
            .body(body);
        self.send(request).await
    }

    async fn send(&self, mut request: reqwest::RequestBuilder) -> Result<Resource, SourceError> {
        if let Some(auth) = &self.authorization {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        if let Some(traceparent) = crate::trace::traceparent() {
            request = request.header(crate::trace::HEADER, traceparent);
        }
        let _permit = self
            .limiter
            .acquire()
            .await
            .map_err(|_| SourceError::Other("request limiter closed".into()))?;
        let response = request.send().await.map_err(transport_error)?;
        let status = response.status();
        if !status.is_success() {
            return Err(SourceError::Status(status.as_u16()));
        }
        let body = read_capped(response, self.max_response_bytes).await?;
        parse_resource(&body).map_err(|reason| SourceError::InvalidResponse(reason.into()))
    }
}

/// Reads a body up to `max` bytes, stopping as soon as it is known to be larger.
async fn read_capped(mut response: Response, max: usize) -> Result<Vec<u8>, SourceError> {
    let declared = response.content_length();
    if declared.is_some_and(|n| n > max as u64) {
        return Err(SourceError::TooLarge(max));
    }
    let capacity = declared.map_or(16 * 1024, |n| n as usize).min(max);
    let mut body = Vec::with_capacity(capacity);
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if body.len() + chunk.len() > max {
            return Err(SourceError::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A transport failure as a redacted [`SourceError`].
fn transport_error(error: reqwest::Error) -> SourceError {
    if error.is_timeout() {
        return SourceError::Timeout;
    }
    let what = if error.is_connect() {
        "connection failed"
    } else if error.is_body() || error.is_decode() {
        "response interrupted"
    } else {
        "request failed"
    };
    let cause = root_cause(&error);
    if cause.is_empty() {
        SourceError::Connect(what.to_owned())
    } else {
        SourceError::Connect(format!("{what}: {cause}"))
    }
}

/// The innermost cause's message (an I/O, TLS or protocol error), shortened. reqwest's own
/// top-level message is skipped: it names the URL.
fn root_cause(error: &reqwest::Error) -> String {
    let mut cause: Option<&dyn std::error::Error> = error.source();
    let mut deepest = None;
    while let Some(c) = cause {
        deepest = Some(c);
        cause = c.source();
    }
    let Some(deepest) = deepest else {
        return String::new();
    };
    let text = deepest.to_string();
    if text.contains("://") {
        // Belt and braces: never let a URL through.
        return String::new();
    }
    match text.char_indices().nth(160) {
        Some((cut, _)) => text[..cut].to_owned(),
        None => text,
    }
}

fn bearer(token: &str) -> Option<HeaderValue> {
    let token = token.trim();
    if token.is_empty() {
        return None;
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// A header value from text the source did not choose (requester details): kept as is when it
/// is a valid header value, otherwise percent-encoded byte by byte so it still arrives.
pub(crate) fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| {
        let mut encoded = String::with_capacity(text.len() * 3);
        for b in text.bytes() {
            if (0x21..0x7f).contains(&b) && b != b'%' || b == b' ' {
                encoded.push(char::from(b));
            } else {
                encoded.push_str(&format!("%{b:02X}"));
            }
        }
        HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static(""))
    })
}

/// Adds a header, skipping empty values (an absent header is clearer than an empty one).
pub(crate) fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if !value.is_empty() {
        headers.insert(HeaderName::from_static(name), header_value(value));
    }
}

fn parse_base_url(text: &str) -> Result<Url, FhirConfigError> {
    let mut url = Url::parse(text).map_err(|e| FhirConfigError::InvalidBaseUrl {
        url: text.to_owned(),
        reason: e.to_string(),
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(FhirConfigError::UnsupportedScheme {
            url: text.to_owned(),
        });
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(FhirConfigError::InvalidBaseUrl {
            url: text.to_owned(),
            reason: "a FHIR base URL has no query or fragment".into(),
        });
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// The rustls client configuration: ring as the crypto provider (so nothing depends on a
/// process-wide default being installed), the configured CA or the Mozilla roots, an optional
/// client identity, and ALPN for HTTP/2 with HTTP/1.1 fallback (reqwest does not add ALPN to a
/// preconfigured TLS config).
fn tls_config(config: &FhirConfig) -> Result<rustls::ClientConfig, FhirConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_cert {
        Some(path) => {
            for cert in read_certs("ca_cert", path)? {
                roots.add(cert).map_err(|e| FhirConfigError::Pem {
                    what: "ca_cert",
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| FhirConfigError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let mut tls = match (&config.client_cert, &config.client_key) {
        (Some(cert_path), Some(key_path)) => {
            let chain = read_certs("client_cert", cert_path)?;
            let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| FhirConfigError::Pem {
                what: "client_key",
                path: key_path.clone(),
                reason: pem_reason(&e),
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                FhirConfigError::ClientIdentity {
                    cert: cert_path.clone(),
                    key: key_path.clone(),
                    reason: e.to_string(),
                }
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(FhirConfigError::IncompleteClientIdentity),
    };
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, FhirConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| FhirConfigError::Pem {
            what,
            path: path.to_owned(),
            reason: pem_reason(&e),
        })?;
    if certs.is_empty() {
        return Err(FhirConfigError::NoCertificates {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn pem_reason(error: &rustls::pki_types::pem::Error) -> String {
    match error {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind".into(),
        other => format!("not valid PEM ({other:?})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_gets_a_trailing_slash_and_must_be_http() {
        assert_eq!(
            parse_base_url("https://fhir.example/R4")
                .map(|u| u.to_string())
                .ok(),
            Some("https://fhir.example/R4/".to_owned())
        );
        assert!(matches!(
            parse_base_url("ftp://fhir.example/"),
            Err(FhirConfigError::UnsupportedScheme { .. })
        ));
        assert!(matches!(
            parse_base_url("not a url"),
            Err(FhirConfigError::InvalidBaseUrl { .. })
        ));
        assert!(matches!(
            parse_base_url("https://fhir.example/R4?x=1"),
            Err(FhirConfigError::InvalidBaseUrl { .. })
        ));
    }

    #[test]
    fn odd_requester_text_is_encoded_not_dropped() {
        assert_eq!(header_value("R8000"), HeaderValue::from_static("R8000"));
        assert_eq!(
            header_value("Zoë\n"),
            HeaderValue::from_static("Zo%C3%AB%0A")
        );
    }

    #[test]
    fn paging_links_must_stay_on_the_source() {
        let http = FhirHttp::new(&FhirConfig::new("https://fhir.example/R4")).expect("valid");
        assert_eq!(
            http.resolve_link("Condition?page=2").map(|u| u.to_string()),
            Ok("https://fhir.example/R4/Condition?page=2".to_owned())
        );
        assert!(
            http.resolve_link("https://fhir.example/R4/Condition?page=3")
                .is_ok()
        );
        assert!(matches!(
            http.resolve_link("https://elsewhere.example/steal?page=2"),
            Err(SourceError::InvalidResponse(_))
        ));
    }

    #[test]
    fn certificate_errors_name_the_file() {
        let mut config = FhirConfig::new("https://fhir.example/");
        config.ca_cert = Some("/nonexistent/ca.pem".into());
        let err = FhirHttp::new(&config).expect_err("missing file");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let mut config = FhirConfig::new("https://fhir.example/");
        config.client_cert = Some("/tmp/cert.pem".into());
        assert!(matches!(
            FhirHttp::new(&config),
            Err(FhirConfigError::IncompleteClientIdentity)
        ));
    }

    #[test]
    fn missing_token_variable_is_a_config_error() {
        let mut config = FhirConfig::new("https://fhir.example/");
        config.bearer_token_env = Some("CARERECORD_TEST_NO_SUCH_VARIABLE_7f3a".into());
        let err = FhirHttp::new(&config).expect_err("unset variable");
        assert!(
            matches!(err, FhirConfigError::TokenEnvMissing { .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("CARERECORD_TEST_NO_SUCH_VARIABLE_7f3a")
        );
    }

    #[test]
    fn limits_of_zero_are_rejected() {
        let mut config = FhirConfig::new("https://fhir.example/");
        config.max_concurrent_requests = 0;
        assert!(matches!(
            FhirHttp::new(&config),
            Err(FhirConfigError::ZeroLimit { .. })
        ));
    }
}
