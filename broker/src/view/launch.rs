//! Launching the view from the EHR.
//!
//! 1. The EHR (the calling system, identified by its client certificate) sends
//!    `POST /launch` with `{"nhs_number": "..."}` and `Authorization: Bearer <requester token>`,
//!    the token it signs for the FHIR face (audience: the view's). The NHS number travels only
//!    in this body, system to system. The answer is `{"url": ..., "expires_in": secs}`: a URL
//!    holding nothing but an unguessable code.
//! 2. The EHR opens that URL in the clinician's browser (or a frame). `GET /launch/{code}` works
//!    once and within its time: it starts a session (an `HttpOnly` cookie) and redirects to
//!    the record page. A replayed or expired URL gets a page saying so, and nothing else.
//!
//! Refusals at launch are the FHIR face's (OperationOutcome with the core's reasons); an
//! unrecognised calling system is audited, as on every face. The record itself is disclosed,
//! and audited, only when the page asks the core for it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::View;
use super::html;
use super::session::Binding;
use crate::access::Caller;
use crate::fhir_api::http::{require_media, tagged};
use crate::fhir_api::listen::Peer;
use crate::fhir_api::outcome::FaceError;
use crate::lookup::CallingSystem;
use crate::validate;

/// The session cookie's name.
pub const COOKIE: &str = "carerecord-view";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LaunchBody {
    nhs_number: String,
}

/// `POST /launch`.
pub async fn create(
    State(view): State<Arc<View>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request_id = view.face.request_id(&headers);
    tagged(
        issue(&view, &peer, &headers, &body, &request_id).await,
        &request_id,
    )
}

async fn issue(
    view: &View,
    peer: &Peer,
    headers: &HeaderMap,
    body: &[u8],
    request_id: &str,
) -> Result<Response, FaceError> {
    // JSON only: a cross-site HTML form cannot send it without the browser asking first.
    require_media(
        headers,
        &["application/json"],
        "send the launch as application/json: {\"nhs_number\": \"...\"}",
    )?;
    let asked: Option<LaunchBody> = serde_json::from_slice(body).ok();
    let patient = || asked.as_ref().map(|b| b.nhs_number.clone());
    let (caller, requester) = view.face.who(peer, headers, patient, request_id).await?;
    let asked = asked.ok_or_else(|| {
        FaceError::bad_request(
            "INVALID_PARAMETER",
            "the body must be {\"nhs_number\": \"...\"}",
        )
    })?;
    // Refuse now what every view would refuse: a malformed NHS number or requester.
    let checked = validate::check_face_request(
        asked.nhs_number,
        Some(requester.clone()),
        Vec::new(),
        false,
        request_id,
    )
    .map_err(|e| {
        tracing::info!(request_id, reason = e.reason(), "view launch refused");
        FaceError::from(&e)
    })?;
    // Whether this role may look at all is the policy's, decided before any link exists.
    view.broker
        .check_admission(&checked, CallingSystem::Identified(caller.clone()))
        .await
        .map_err(|e| FaceError::from(&e))?;
    let code = view
        .sessions
        .launch(Binding {
            caller: caller.clone(),
            requester,
            nhs_number: checked.nhs_number,
        })
        .ok_or_else(|| {
            FaceError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "transient",
                "LAUNCH_UNAVAILABLE",
                "no launch could be made; try again",
            )
        })?;
    tracing::info!(request_id, system = %caller.system, "view launch issued");
    let body = serde_json::json!({
        "url": format!("{}launch/{code}", view.settings.base_url),
        "expires_in": view.sessions.launch_ttl().as_secs(),
    });
    let mut response = (StatusCode::CREATED, body.to_string()).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(id) = HeaderValue::from_str(request_id) {
        h.insert("x-request-id", id);
    }
    Ok(response)
}

/// `GET /launch/{code}`: once, then never again.
pub async fn open(State(view): State<Arc<View>>, Path(code): Path<String>) -> Response {
    match view.sessions.open(&code) {
        Ok((id, session)) => {
            tracing::info!(system = %session.binding.caller.system, "view session started");
            let mut response = StatusCode::SEE_OTHER.into_response();
            let h = response.headers_mut();
            if let Ok(location) =
                HeaderValue::from_str(&format!("{}record", view.settings.base_url))
            {
                h.insert(header::LOCATION, location);
            }
            if let Ok(cookie) = HeaderValue::from_str(&view.cookie(&id)) {
                h.insert(header::SET_COOKIE, cookie);
            }
            response
        }
        Err(refused) => {
            tracing::info!(reason = refused.reason(), "view launch refused");
            let main = html::message(
                "This link cannot be opened",
                &format!(
                    "{} Open the record again from your clinical system: each link works once, for a short time.",
                    capitalised(&refused.to_string())
                ),
                refused.reason(),
            );
            let page = html::page(
                &html::Chrome {
                    title: "Link not valid",
                    csrf: None,
                    live: false,
                },
                &main,
            );
            (StatusCode::GONE, Html(page)).into_response()
        }
    }
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => format!("{}{}.", first.to_uppercase(), c.as_str()),
        None => String::new(),
    }
}

impl View {
    /// The session cookie: `HttpOnly`, never sent cross-site by a form (`SameSite=Lax`; a
    /// top-level navigation from the EHR still carries it), `Secure` under TLS. Framed by an
    /// EHR (`ehr_origins`) over TLS, the browser only sends a cookie marked `SameSite=None`
    /// (partitioned to the EHR's site), and every POST still needs the session's CSRF token.
    fn cookie(&self, id: &str) -> String {
        let path = base_path(&self.settings.base_url);
        let max_age = self.sessions.session_ttl().as_secs();
        let same_site = if self.secure_cookies && !self.settings.ehr_origins.is_empty() {
            "SameSite=None; Partitioned"
        } else {
            "SameSite=Lax"
        };
        let secure = if self.secure_cookies { "; Secure" } else { "" };
        format!("{COOKIE}={id}; Path={path}; Max-Age={max_age}; HttpOnly; {same_site}{secure}")
    }

    /// The session a request's cookie names, if it is open.
    pub(crate) fn session_of(&self, headers: &HeaderMap) -> Option<Arc<super::session::Session>> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(name, _)| *name == COOKIE)
            .find_map(|(_, id)| self.sessions.session(id))
    }

    /// The lookup request for a session: its requester, its patient, nothing from the browser.
    pub(crate) fn lookup_request(
        &self,
        binding: &Binding,
        request_id: String,
        fresh: bool,
    ) -> Result<validate::LookupRequest, crate::error::LookupError> {
        validate::check_face_request(
            binding.nhs_number.as_digits(),
            Some(binding.requester.clone()),
            Vec::new(),
            fresh,
            &request_id,
        )
    }

    pub(crate) fn calling(&self, caller: &Caller) -> CallingSystem {
        CallingSystem::Identified(caller.clone())
    }
}

/// The path of the base URL (`/` or a proxy's prefix), for the cookie.
fn base_path(base_url: &str) -> &str {
    let rest = base_url.split_once("://").map_or(base_url, |(_, r)| r);
    rest.find('/').map_or("/", |i| &rest[i..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_path_is_the_base_urls() {
        assert_eq!(base_path("http://127.0.0.1:8443/"), "/");
        assert_eq!(
            base_path("https://proxy.example/carerecord/"),
            "/carerecord/"
        );
    }
}
