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
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;

/// Why the `[fhir]` section cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum FaceConfigError {
    #[error("[fhir] token key: {0}")]
    Key(#[from] token::KeyError),
    #[error("[fhir] TLS: {0}")]
    Tls(#[from] listen::ListenError),
    #[error("[fhir] base_url {0:?} must be an http(s) URL ending in '/'")]
    BaseUrl(String),
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
    let tls = if config.server.plaintext {
        None
    } else {
        config.server.tls.as_ref()
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let base_url = face
        .base_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}://{}/", face.listen));
    if !(base_url.starts_with("http://") || base_url.starts_with("https://"))
        || !base_url.ends_with('/')
    {
        return Err(FaceConfigError::BaseUrl(base_url));
    }
    let audience = face
        .audience
        .clone()
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
    let unverified_key = face
        .unverified_token_key
        .as_deref()
        .map(token::TokenKey::from_pem_file)
        .transpose()?;
    let rustls = tls.map(listen::tls_config).transpose()?;
    Ok(Some(FaceParts {
        settings: FaceSettings {
            base_url,
            audience,
            max_token_lifetime: Duration::from_secs(face.max_token_lifetime_secs),
            systems,
            keys,
            unverified_key,
            max_document_bytes: face.max_document_bytes,
        },
        tls: rustls,
    }))
}
