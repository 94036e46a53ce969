//! The headers every view response carries: a strict Content-Security-Policy (scripts and
//! styles only from our own origin, no inline script, framing only by the configured EHRs),
//! `Cache-Control: no-store` (patient data is never kept by a browser or an intermediary), no
//! MIME sniffing, and no referrer (a URL of ours never travels to another site).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::Response;

use super::View;

/// The policy: nothing by default; our own scripts, styles, fetches (server-sent events) and
/// forms; framed only by `ehr_origins` (none: not framed at all).
pub fn content_security_policy(ehr_origins: &[String]) -> String {
    let ancestors = if ehr_origins.is_empty() {
        "'none'".to_owned()
    } else {
        // Checked as origins when the configuration was read: no spaces or semicolons.
        ehr_origins.join(" ")
    };
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors {ancestors}"
    )
}

/// Adds the headers to every response; one a handler set itself (a document's sandbox policy)
/// is kept.
pub async fn secure(State(view): State<Arc<View>>, mut response: Response) -> Response {
    let h = response.headers_mut();
    if !h.contains_key(header::CONTENT_SECURITY_POLICY)
        && let Ok(v) = HeaderValue::from_str(&view.csp)
    {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    response
}
