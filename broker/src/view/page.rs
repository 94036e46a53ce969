//! The record page and what it loads.
//!
//! - `GET /record`: the page at once, with a place for every section and organisation; its
//!   script opens `GET /record-events`, which streams the core's lookup as server-sent events:
//!   `source` (an organisation's answer, rendered: its line and its entries per section),
//!   then `complete` (the merged record, rendered whole) or `refused` (why not).
//! - `GET /record-complete`: without scripts (a `<noscript>` refresh on `/record`), the same
//!   record rendered whole once the lookup is answered.
//! - `POST /refresh`: "ask every organisation again" (CSRF token required).
//! - `GET /document/{id}`: a document of the record, through the core (access, audit).
//!
//! Every route needs the session cookie; the session says who is asking and about whom.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Form;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;

use super::View;
use super::html;
use crate::error::LookupError;
use crate::fhir_api::outcome::FaceError;
use crate::lookup::StreamEvent;

const STYLESHEET: &str = include_str!("assets/view.css");
const SCRIPT: &str = include_str!("assets/view.js");

fn page(status: StatusCode, title: &str, csrf: Option<&str>, live: bool, main: &str) -> Response {
    let body = html::page(&html::Chrome { title, csrf, live }, main);
    (status, Html(body)).into_response()
}

/// No session: the cookie is missing, or its session ended.
fn no_session() -> Response {
    page(
        StatusCode::UNAUTHORIZED,
        "No open record",
        None,
        false,
        &html::message(
            "No record is open",
            "This view has ended or was not opened from your clinical system. Open the patient's record again from your clinical system.",
            "SESSION_MISSING",
        ),
    )
}

/// Why a lookup was refused, for a person.
fn refusal(e: &LookupError) -> (StatusCode, String) {
    let face = FaceError::from(e);
    let heading = match e {
        LookupError::Denied(_) => "You cannot view this record",
        LookupError::Overloaded { .. } | LookupError::ShuttingDown => "The record service is busy",
        LookupError::AuditUnavailable => "The record cannot be shown just now",
        _ => "The record cannot be shown",
    };
    (
        face.status,
        html::message(heading, &e.to_string(), e.reason()),
    )
}

/// `GET /record`: the page, at once.
pub async fn record(State(view): State<Arc<View>>, headers: HeaderMap) -> Response {
    let Some(session) = view.session_of(&headers) else {
        return no_session();
    };
    page(
        StatusCode::OK,
        "Care record",
        Some(&session.csrf),
        true,
        &html::waiting(),
    )
}

/// `GET /record-complete`: the record once answered, for browsers without scripts.
pub async fn complete(State(view): State<Arc<View>>, headers: HeaderMap) -> Response {
    let Some(session) = view.session_of(&headers) else {
        return no_session();
    };
    let request_id = view.broker.new_request_id();
    let result = match view.lookup_request(&session.binding, request_id, session.take_fresh()) {
        Ok(request) => {
            view.broker
                .lookup(request, view.calling(&session.binding.caller))
                .await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(answer) => page(
            StatusCode::OK,
            "Care record",
            Some(&session.csrf),
            false,
            &html::record(&answer, SystemTime::now()),
        ),
        Err(e) => {
            let (status, main) = refusal(&e);
            page(status, "Care record", Some(&session.csrf), false, &main)
        }
    }
}

/// `GET /record-events`: the lookup as it happens.
pub async fn events(State(view): State<Arc<View>>, headers: HeaderMap) -> Response {
    let Some(session) = view.session_of(&headers) else {
        return no_session();
    };
    let request_id = view.broker.new_request_id();
    let refused = |e: &LookupError| {
        let (_, main) = refusal(e);
        sse_event("refused", &serde_json::json!({ "html": main }))
    };
    let started = match view.lookup_request(&session.binding, request_id, session.take_fresh()) {
        Ok(request) => {
            view.broker
                .stream(request, view.calling(&session.binding.caller))
                .await
        }
        Err(e) => Err(e),
    };
    let events = match started {
        Ok(stream) => stream
            .map(move |item| {
                Ok::<Event, Infallible>(match item {
                    Ok(StreamEvent::Source(update)) => {
                        let arrival = html::arrival(&update);
                        let sections: serde_json::Map<String, serde_json::Value> = arrival
                            .sections
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
                            .collect();
                        sse_event(
                            "source",
                            &serde_json::json!({
                                "organisation": arrival.organisation,
                                "sections": sections,
                            }),
                        )
                    }
                    Ok(StreamEvent::Complete(answer)) => sse_event(
                        "complete",
                        &serde_json::json!({ "html": html::record(&answer, SystemTime::now()) }),
                    ),
                    Err(e) => refused(&e),
                })
            })
            .boxed(),
        Err(e) => futures::stream::once(std::future::ready(Ok(refused(&e)))).boxed(),
    };
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn sse_event(name: &str, data: &serde_json::Value) -> Event {
    // One line of JSON: HTML fragments carry their newlines escaped.
    Event::default().event(name).data(data.to_string())
}

#[derive(Deserialize)]
pub struct RefreshForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /refresh`: the next view asks every organisation again.
pub async fn refresh(
    State(view): State<Arc<View>>,
    headers: HeaderMap,
    Form(form): Form<RefreshForm>,
) -> Response {
    let Some(session) = view.session_of(&headers) else {
        return no_session();
    };
    let origin_ok = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|origin| view.settings.base_url.starts_with(&format!("{origin}/")));
    if !origin_ok || !session.csrf_matches(&form.csrf) {
        tracing::warn!("view: a form without this session's CSRF token was refused");
        return page(
            StatusCode::FORBIDDEN,
            "Refused",
            None,
            false,
            &html::message(
                "This request was refused",
                "The form did not come from this view. Open the record again from your clinical system.",
                "CSRF_TOKEN_INVALID",
            ),
        );
    }
    session.want_fresh();
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("{}record", view.settings.base_url)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// `GET /document/{id}`: through the core, which decides and audits as for the record.
pub async fn document(
    State(view): State<Arc<View>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(session) = view.session_of(&headers) else {
        return no_session();
    };
    let request_id = view.broker.new_request_id();
    let answer = match view.lookup_request(&session.binding, request_id, false) {
        Ok(request) => {
            view.broker
                .document(
                    request,
                    &id,
                    view.calling(&session.binding.caller),
                    view.settings.max_document_bytes,
                )
                .await
        }
        Err(e) => Err(e),
    };
    match answer {
        Ok(answer) => crate::fhir_api::http::attachment(answer.document),
        Err(e) => {
            let (status, main) = refusal(&e);
            page(status, "Document", Some(&session.csrf), false, &main)
        }
    }
}

pub async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLESHEET,
    )
        .into_response()
}

pub async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
        .into_response()
}

pub async fn not_found() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "Not found",
        None,
        false,
        &html::message(
            "Page not found",
            "Open the patient's record from your clinical system.",
            "NOT_FOUND",
        ),
    )
}
