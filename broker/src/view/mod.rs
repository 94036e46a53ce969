//! The clinician's web view: a server-rendered page an EHR opens for one patient, showing the
//! record as organisations answer.
//!
//! Code map: `launch` (the EHR asks for a launch, system to system; the browser opens it once),
//! `session` (launches and sessions: single use, short-lived, bound to requester and patient),
//! `page` (the record page, its server-sent events, the no-script page, refresh, documents),
//! `html` (every piece of markup, every value escaped), `headers` (CSP, no-store, framing),
//! `assets/` (the stylesheet and script, served from our own origin).
//!
//! The view is another face on the core: it calls [`Broker::stream`], [`Broker::lookup`] and
//! [`Broker::document`] exactly as gRPC and FHIR do, so access policy, cache, single flight and
//! audit are the core's. Who is asking is established once, at launch, by the FHIR face's own
//! checks (client certificate, signed requester token); the browser never names a patient.

pub mod headers;
pub mod html;
pub mod launch;
pub mod page;
pub mod session;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use crate::config::Config;
use crate::fhir_api::listen::{self, ClientCertificates, FaceListener, Peer};
use crate::fhir_api::{CallersError, Face, FaceOptions, FaceSettings, settings_for};
use crate::lookup::Broker;
use session::Sessions;

/// A launch request or a form is small; anything big is abuse.
const MAX_BODY_BYTES: usize = 16 * 1024;

/// How the view is reached and what it allows.
#[derive(Clone)]
pub struct ViewSettings {
    /// Base URL as browsers reach the view, ending in `/`.
    pub base_url: String,
    /// Who may launch, and how their tokens are checked (the FHIR face's rules, with the view's
    /// audience).
    pub launching: FaceSettings,
    /// Origins allowed to frame the view (`frame-ancestors`).
    pub ehr_origins: Vec<String>,
    pub launch_ttl: Duration,
    pub session_ttl: Duration,
    pub max_document_bytes: u64,
}

/// The view: settings, sessions, and the core.
pub struct View {
    pub broker: Arc<Broker>,
    pub settings: ViewSettings,
    /// Identifies launching systems and verifies their tokens, as on the FHIR face.
    face: Face,
    sessions: Sessions,
    /// The `Content-Security-Policy` every page carries.
    csp: String,
    /// Cookies marked `Secure` (the view is served over TLS, or behind an https base URL).
    secure_cookies: bool,
}

impl View {
    pub fn new(broker: Arc<Broker>, settings: ViewSettings) -> View {
        let face = Face {
            broker: broker.clone(),
            settings: settings.launching.clone(),
        };
        View {
            sessions: Sessions::new(settings.launch_ttl, settings.session_ttl),
            csp: headers::content_security_policy(&settings.ehr_origins),
            secure_cookies: settings.base_url.starts_with("https://"),
            face,
            broker,
            settings,
        }
    }
}

/// Why the `[view]` section cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ViewConfigError {
    #[error("[view] {0}")]
    Callers(#[from] CallersError),
    #[error("[view] TLS: {0}")]
    Tls(#[from] listen::ListenError),
}

/// The view as configured: settings and, under TLS, the rustls configuration (client
/// certificates asked for, not required).
pub struct ViewParts {
    pub settings: ViewSettings,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// `None` when no `[view]` section is configured. Who may launch is configured as for the FHIR
/// face (the same calling systems and token keys), with the view's own address and audience.
pub fn from_config(config: &Config) -> Result<Option<ViewParts>, ViewConfigError> {
    let Some(view) = &config.view else {
        return Ok(None);
    };
    let (launching, tls) = settings_for(
        config,
        &FaceOptions {
            listen: view.listen,
            base_url: view.base_url.as_deref(),
            audience: view.audience.as_deref(),
            max_token_lifetime_secs: view.max_token_lifetime_secs,
            unverified_token_key: view.unverified_token_key.as_deref(),
            max_document_bytes: view.max_document_bytes,
        },
    )?;
    let rustls = tls
        .map(|t| listen::tls_config_with(t, ClientCertificates::Optional))
        .transpose()?;
    Ok(Some(ViewParts {
        settings: ViewSettings {
            base_url: launching.base_url.clone(),
            launching,
            ehr_origins: view.ehr_origins.clone(),
            launch_ttl: Duration::from_secs(view.launch_ttl_secs),
            session_ttl: Duration::from_secs(view.session_ttl_secs),
            max_document_bytes: view.max_document_bytes,
        },
        tls: rustls,
    }))
}

/// Whether `s` is a web origin: `scheme://host[:port]`, http(s), nothing after.
pub fn is_origin(s: &str) -> bool {
    let Some(rest) = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
    else {
        return false;
    };
    !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// The routes, for a listener of the caller's choosing.
pub fn router(view: Arc<View>) -> Router {
    Router::new()
        .route("/launch", post(launch::create))
        .route("/launch/{code}", get(launch::open))
        .route("/record", get(page::record))
        .route("/record-events", get(page::events))
        .route("/record-complete", get(page::complete))
        .route("/refresh", post(page::refresh))
        .route("/document/{id}", get(page::document))
        .route("/assets/view.css", get(page::stylesheet))
        .route("/assets/view.js", get(page::script))
        .fallback(page::not_found)
        .layer(axum::middleware::from_fn(headers::same_site_or_navigation))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response_with_state(
            view.clone(),
            headers::secure,
        ))
        .with_state(view)
}

/// Serves until `shutdown` resolves; in-flight requests then finish.
pub async fn serve(
    listener: FaceListener,
    view: Arc<View>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(view).into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = r#"
[server]
listen = "127.0.0.1:50051"
plaintext = true
"#;

    fn parse(view: &str) -> Result<Config, String> {
        Config::parse(
            &format!("{SERVER}\n[view]\n{view}"),
            std::path::Path::new("t.toml"),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn the_view_section_is_checked_before_anything_is_served() {
        let config = parse("listen = \"127.0.0.1:8443\"\n").expect("valid");
        let parts = from_config(&config).expect("builds").expect("configured");
        assert_eq!(parts.settings.base_url, "http://127.0.0.1:8443/");
        assert_eq!(parts.settings.launching.audience, "http://127.0.0.1:8443");
        assert_eq!(parts.settings.launch_ttl, Duration::from_secs(60));
        assert_eq!(parts.settings.session_ttl, Duration::from_secs(900));
        assert!(parts.tls.is_none());

        let network = parse("listen = \"0.0.0.0:8443\"\n").expect_err("plaintext off loopback");
        assert!(network.contains("non-loopback"), "{network}");
        let origin = parse(
            "listen = \"127.0.0.1:8443\"\nehr_origins = [\"https://ehr.example; script-src *\"]\n",
        )
        .expect_err("not an origin");
        assert!(origin.contains("ehr_origins"), "{origin}");
        let zero = parse("listen = \"127.0.0.1:8443\"\nlaunch_ttl_secs = 0\n").expect_err("zero");
        assert!(zero.contains("greater than 0"), "{zero}");
        let unknown = parse("listen = \"127.0.0.1:8443\"\nlaunch_ttl = 5\n").expect_err("typo");
        assert!(unknown.contains("launch_ttl"), "{unknown}");
    }

    #[test]
    fn origins_are_scheme_host_and_port_only() {
        assert!(is_origin("https://ehr.example.nhs.uk"));
        assert!(is_origin("http://127.0.0.1:9000"));
        assert!(!is_origin("https://ehr.example/path"));
        assert!(!is_origin("ehr.example"));
        assert!(!is_origin("https://ehr.example; script-src *"));
        assert!(!is_origin("https://"));
    }
}
