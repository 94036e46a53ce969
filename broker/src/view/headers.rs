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

/// Refuses a cross-site request that is not a navigation (an image, a script, a fetch from
/// another site's page), before any session is used or any lookup made: with the session cookie
/// sent cross-site when an EHR frames the view, another site could otherwise make the broker look
/// a record up (and audit it) in the clinician's name. Opening the view — the EHR navigating the
/// browser or a frame to it — stays allowed. Browsers without Fetch Metadata send none of these
/// headers and are judged by the cookie's SameSite rules alone.
pub async fn same_site_or_navigation(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let h = request.headers();
    let value = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    let cross_site = value("sec-fetch-site") == "cross-site";
    let navigation = value("sec-fetch-mode") == "navigate"
        && matches!(
            value("sec-fetch-dest"),
            "document" | "iframe" | "frame" | ""
        );
    if cross_site && !navigation {
        tracing::info!(
            mode = value("sec-fetch-mode"),
            dest = value("sec-fetch-dest"),
            "web view: cross-site request refused (not a navigation)"
        );
        return axum::response::IntoResponse::into_response((
            axum::http::StatusCode::FORBIDDEN,
            "cross-site requests may only open the view\n",
        ));
    }
    next.run(request).await
}
