//! The admin HTTP API: inspect the region and switch latency and faults at runtime.
//!
//! Ops rehearsing an incident, or a test driving the broker from outside the process, need the
//! same knobs [`FaultControl`] gives code. Bodies are small JSON objects (`{"fault":"hang"}`);
//! a bare spec string (`hang`) is accepted too, for quick `curl` use.
//!
//! - `GET /admin/organisations`, `GET /admin/organisations/{code}`: code, kind, base URL,
//!   latency, fault, data mode, requests.
//! - `PUT /admin/organisations/{code|all}/fault` `{"fault": SPEC}`: `none`,
//!   `error_rate:FRACTION`, `http500`, `hang`, `malformed_json`, `slow_body`, `reset`,
//!   `empty_bundle`, and the clinical-safety faults `wrong_patient` (every answer about the
//!   patient is another person's record), `wrong_patient_refs` (the other person's resources
//!   mixed into the right record), `ignore_include` (drugs only by `GET Medication/{id}`).
//! - `PUT /admin/organisations/{code|all}/latency` `{"latency": SPEC}`.
//! - `PUT /admin/organisations/{code|all}/data` `{"data": "conflicts" | "normal"}`: clinical
//!   conflict mode (see [`DataMode`]).
//! - `GET /admin/conflicts[?limit=N]`: patients with a clinical conflict, what is disputed, and
//!   which organisation to switch; `GET /admin/patients/{nhs}/wrong-patient/{code}`: who
//!   organisation `code` answers about instead under the wrong-patient faults.
//! - `POST /admin/reset` (faults, data modes, startup latency), `GET /admin/stats`,
//!   `POST /admin/stats/reset`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::faults::{DataMode, Fault, FaultControl, LOCATOR};
use crate::latency::LatencyProfile;
use crate::population::Region;
use crate::server::RunningOrganisation;

#[derive(Clone)]
struct AdminState {
    control: FaultControl,
    orgs: std::sync::Arc<Vec<RunningOrganisation>>,
    /// The record locator's FHIR base; it is addressed as the organisation `LOCATOR`.
    locator_url: String,
    /// For the patient look-ups (`/admin/conflicts`, `/admin/patients/...`).
    region: std::sync::Arc<Region>,
}

/// The admin API. The locator is addressed like an organisation with the code `LOCATOR`
/// (`GET`/`PUT .../organisations/LOCATOR[/fault|/latency]`) and appears in `/admin/stats`, but
/// not in the organisation list.
pub(crate) fn router(
    control: FaultControl,
    orgs: Vec<RunningOrganisation>,
    locator_url: String,
    region: std::sync::Arc<Region>,
) -> Router {
    Router::new()
        .route("/admin/organisations", get(list))
        .route("/admin/organisations/{code}", get(one))
        .route("/admin/organisations/{code}/fault", put(set_fault))
        .route("/admin/organisations/{code}/latency", put(set_latency))
        .route("/admin/organisations/{code}/data", put(set_data))
        .route("/admin/conflicts", get(conflicts))
        .route(
            "/admin/patients/{nhs}/wrong-patient/{code}",
            get(wrong_patient),
        )
        .route("/admin/reset", post(reset))
        .route("/admin/stats", get(stats))
        .route("/admin/stats/reset", post(reset_stats))
        .fallback(|| async { AdminError(StatusCode::NOT_FOUND, "no such admin endpoint".into()) })
        .with_state(AdminState {
            control,
            orgs: std::sync::Arc::new(orgs),
            locator_url,
            region,
        })
}

/// An admin API failure: a status and a message, as `{"error": "..."}`.
struct AdminError(StatusCode, String);

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

/// What the admin API shows of an organisation or the locator.
struct Entry {
    code: String,
    name: String,
    kind: &'static str,
    base_url: String,
}

impl From<&RunningOrganisation> for Entry {
    fn from(o: &RunningOrganisation) -> Entry {
        Entry {
            code: o.code.clone(),
            name: o.name.clone(),
            kind: o.kind.as_str(),
            base_url: o.base_url.clone(),
        }
    }
}

fn describe(state: &AdminState, o: &Entry) -> Value {
    json!({
        "code": o.code,
        "name": o.name,
        "kind": o.kind,
        "base_url": o.base_url,
        "latency": state.control.latency(&o.code).map(|l| l.to_string()),
        "fault": state.control.fault(&o.code).map(|f| f.to_string()),
        "data": state.control.data_mode(&o.code).map(|d| d.to_string()),
        "requests": state.control.stats(&o.code).map_or(0, |s| s.requests),
    })
}

/// `all` (or `*`) addresses every organisation, as the `--fault all=...` flag does.
fn is_all(code: &str) -> bool {
    code.eq_ignore_ascii_case("all") || code == "*"
}

fn find(state: &AdminState, code: &str) -> Result<Entry, AdminError> {
    if code.eq_ignore_ascii_case(LOCATOR) {
        return Ok(Entry {
            code: LOCATOR.to_string(),
            name: "Record locator".to_string(),
            kind: "locator",
            base_url: state.locator_url.clone(),
        });
    }
    state
        .orgs
        .iter()
        .find(|o| o.code.eq_ignore_ascii_case(code))
        .map(Entry::from)
        .ok_or_else(|| {
            AdminError(
                StatusCode::NOT_FOUND,
                format!("no organisation with code {code:?}"),
            )
        })
}

async fn list(State(state): State<AdminState>) -> Json<Value> {
    Json(Value::Array(
        state
            .orgs
            .iter()
            .map(|o| describe(&state, &o.into()))
            .collect(),
    ))
}

async fn one(
    State(state): State<AdminState>,
    Path(code): Path<String>,
) -> Result<Json<Value>, AdminError> {
    Ok(Json(describe(&state, &find(&state, &code)?)))
}

#[derive(Deserialize)]
struct FaultBody {
    fault: String,
}

#[derive(Deserialize)]
struct LatencyBody {
    latency: String,
}

#[derive(Deserialize)]
struct DataBody {
    data: String,
}

/// The spec from `{"field": "..."}` or a bare text body.
fn spec_from<T: for<'de> Deserialize<'de>>(
    body: &Bytes,
    get: impl Fn(T) -> String,
) -> Result<String, AdminError> {
    if let Ok(v) = serde_json::from_slice::<T>(body) {
        return Ok(get(v));
    }
    match std::str::from_utf8(body) {
        Ok(s) if !s.trim().is_empty() && !s.trim_start().starts_with('{') => {
            Ok(s.trim().trim_matches('"').to_string())
        }
        _ => Err(AdminError(
            StatusCode::BAD_REQUEST,
            "body must be JSON like {\"fault\":\"hang\"} or {\"latency\":\"tail:20:400\"}".into(),
        )),
    }
}

async fn set_fault(
    State(state): State<AdminState>,
    Path(code): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, AdminError> {
    let fault = spec_from::<FaultBody>(&body, |b| b.fault)?
        .parse::<Fault>()
        .map_err(|e| AdminError(StatusCode::BAD_REQUEST, e.to_string()))?;
    if is_all(&code) {
        state.control.set_fault_all(fault);
        tracing::info!(fault = %fault, "fault set on every organisation");
        return Ok(list(State(state)).await);
    }
    let org = find(&state, &code)?;
    let _ = state.control.set_fault(&org.code, fault);
    tracing::info!(organisation = %org.code, fault = %fault, "fault set");
    Ok(Json(describe(&state, &org)))
}

async fn set_latency(
    State(state): State<AdminState>,
    Path(code): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, AdminError> {
    let latency = spec_from::<LatencyBody>(&body, |b| b.latency)?
        .parse::<LatencyProfile>()
        .map_err(|e| AdminError(StatusCode::BAD_REQUEST, e.to_string()))?;
    if is_all(&code) {
        state.control.set_latency_all(latency);
        tracing::info!(latency = %latency, "latency set on every organisation");
        return Ok(list(State(state)).await);
    }
    let org = find(&state, &code)?;
    let _ = state.control.set_latency(&org.code, latency);
    tracing::info!(organisation = %org.code, latency = %latency, "latency set");
    Ok(Json(describe(&state, &org)))
}

async fn set_data(
    State(state): State<AdminState>,
    Path(code): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, AdminError> {
    let data = spec_from::<DataBody>(&body, |b| b.data)?
        .parse::<DataMode>()
        .map_err(|e| AdminError(StatusCode::BAD_REQUEST, e.to_string()))?;
    if is_all(&code) {
        state.control.set_data_mode_all(data);
        tracing::info!(data = %data, "data mode set on every organisation");
        return Ok(list(State(state)).await);
    }
    let org = find(&state, &code)?;
    state
        .control
        .set_data_mode(&org.code, data)
        .map_err(|e| AdminError(StatusCode::NOT_FOUND, e.to_string()))?;
    tracing::info!(organisation = %org.code, data = %data, "data mode set");
    Ok(Json(describe(&state, &org)))
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

/// Patients with a clinical conflict (first `limit`, default 20), each with what is disputed
/// and the organisation whose data mode shows it.
async fn conflicts(
    State(state): State<AdminState>,
    axum::extract::Query(q): axum::extract::Query<Limit>,
) -> Json<Value> {
    let rows = state
        .region
        .patients_with_clinical_conflicts()
        .take(q.limit.unwrap_or(20))
        .map(|p| {
            json!({
                "nhs_number": p.nhs_number.as_digits(),
                "name": p.display_name(),
                "birth_date": p.birth_date,
                "organisations": p.organisations,
                "conflict": p.clinical_conflict,
            })
        })
        .collect();
    Json(Value::Array(rows))
}

/// Who organisation `code` answers about instead of patient `nhs` under `wrong_patient`.
async fn wrong_patient(
    State(state): State<AdminState>,
    Path((nhs, code)): Path<(String, String)>,
) -> Result<Json<Value>, AdminError> {
    let p = state
        .region
        .wrong_patient_at(nhs.as_str(), &code)
        .ok_or_else(|| {
            AdminError(
                StatusCode::NOT_FOUND,
                "unknown patient or organisation".into(),
            )
        })?;
    Ok(Json(json!({
        "nhs_number": p.nhs_number.as_digits(),
        "name": p.display_name(),
        "birth_date": p.birth_date,
        "patient_id": state.region.patient_id_at(&p.nhs_number, &code),
    })))
}

async fn reset(State(state): State<AdminState>) -> Json<Value> {
    state.control.reset();
    tracing::info!("faults cleared, latency back to startup settings");
    Json(Value::Array(
        state
            .orgs
            .iter()
            .map(|o| describe(&state, &o.into()))
            .collect(),
    ))
}

async fn stats(State(state): State<AdminState>) -> Json<Value> {
    let map = state
        .orgs
        .iter()
        .map(|o| o.code.as_str())
        .chain([LOCATOR])
        .map(|c| (c.to_string(), json!(state.control.stats(c))))
        .collect::<serde_json::Map<_, _>>();
    Json(Value::Object(map))
}

async fn reset_stats(State(state): State<AdminState>) -> StatusCode {
    state.control.reset_stats();
    StatusCode::NO_CONTENT
}
