//! The FHIR R4 face: UK Core-shaped resources over HTTP/JSON, on the same core as gRPC.
//!
//! Code map: `http` (routes: identify, verify the token, read the Parameters, call the core,
//! answer), `token` (requester JWTs), `outcome` (errors as OperationOutcome with the gRPC
//! reasons), `listen` (plaintext or TLS/mTLS listener carrying the client certificate),
//! `bundle` (a lookup answer as a GP Connect-style `collection` Bundle), `capability` (the
//! CapabilityStatement describing exactly this face).

pub mod bundle;
pub mod capability;
pub mod http;
pub mod listen;
pub mod outcome;
pub mod token;

pub use http::{Face, FaceSettings, serve};
pub use listen::FaceListener;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, TlsConfig};

/// Why the `[fhir]` section cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum FaceConfigError {
    #[error("[fhir] {0}")]
    Callers(#[from] CallersError),
    #[error("[fhir] TLS: {0}")]
    Tls(#[from] listen::ListenError),
}

/// The FHIR face as configured: its settings and, under TLS, the rustls configuration. Keys
/// and certificates are read here, so `check-config` finds a bad file before a port is bound.
pub struct FaceParts {
    pub settings: FaceSettings,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// `None` when no `[fhir]` section is configured.
pub fn from_config(config: &Config) -> Result<Option<FaceParts>, FaceConfigError> {
    let Some(face) = &config.fhir else {
        return Ok(None);
    };
    let (settings, tls) = settings_for(
        config,
        &FaceOptions {
            listen: face.listen,
            base_url: face.base_url.as_deref(),
            audience: face.audience.as_deref(),
            max_token_lifetime_secs: face.max_token_lifetime_secs,
            unverified_token_key: face.unverified_token_key.as_deref(),
            max_document_bytes: face.max_document_bytes,
        },
    )?;
    let rustls = tls.map(listen::tls_config).transpose()?;
    Ok(Some(FaceParts {
        settings,
        tls: rustls,
    }))
}

/// What an HTTP face that identifies its callers as this one does (the FHIR face, the web
/// view's launch) is configured with.
pub struct FaceOptions<'a> {
    pub listen: SocketAddr,
    pub base_url: Option<&'a str>,
    pub audience: Option<&'a str>,
    pub max_token_lifetime_secs: u64,
    pub unverified_token_key: Option<&'a Path>,
    pub max_document_bytes: u64,
}

/// Why a face's callers cannot be identified as configured.
#[derive(Debug, thiserror::Error)]
pub enum CallersError {
    #[error("token key: {0}")]
    Key(#[from] token::KeyError),
    #[error("base_url {0:?} must be an http(s) URL ending in '/'")]
    BaseUrl(String),
}

/// The settings of a face configured with `options` — base URL (default `http(s)://{listen}/`),
/// audience (default the base URL without its `/`), calling systems and their token keys under
/// mutual TLS, the unverified key otherwise — and the `[server.tls]` it serves under (`None`:
/// plaintext).
pub fn settings_for<'c>(
    config: &'c Config,
    options: &FaceOptions<'_>,
) -> Result<(FaceSettings, Option<&'c TlsConfig>), CallersError> {
    let tls = if config.server.plaintext {
        None
    } else {
        config.server.tls.as_ref()
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let base_url = options
        .base_url
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{scheme}://{}/", options.listen));
    if !(base_url.starts_with("http://") || base_url.starts_with("https://"))
        || !base_url.ends_with('/')
    {
        return Err(CallersError::BaseUrl(base_url));
    }
    let audience = options
        .audience
        .map(str::to_owned)
        .unwrap_or_else(|| base_url.trim_end_matches('/').to_owned());
    let systems = tls
        .filter(|t| t.client_ca.is_some())
        .map(|t| t.systems.clone());
    let mut keys = HashMap::new();
    for system in systems.iter().flatten() {
        if let Some(path) = &system.token_key {
            keys.insert(system.id.clone(), token::TokenKey::from_pem_file(path)?);
        }
    }
    let unverified_key = options
        .unverified_token_key
        .map(token::TokenKey::from_pem_file)
        .transpose()?;
    Ok((
        FaceSettings {
            base_url,
            audience,
            max_token_lifetime: Duration::from_secs(options.max_token_lifetime_secs),
            systems,
            keys,
            unverified_key,
            max_document_bytes: options.max_document_bytes,
        },
        tls,
    ))
}
