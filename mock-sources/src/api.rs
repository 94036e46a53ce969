//! The FHIR REST surface of one organisation: routing, search, paging, `$everything`, batch.
//!
//! Pure request → response logic with no I/O, so the server module can wrap it in latency and
//! faults and the shapes can be tested without sockets. Lenient where real FHIR servers are
//! lenient (unknown search parameters are ignored, `%7C` and `|` both work, `patient=` takes an
//! id or a reference), strict where a client bug should be visible (bad `_count`, missing patient,
//! malformed batch: 400 with an OperationOutcome). Nothing a request sends can panic it.

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::nhs::NhsNumber;

use crate::calendar;
use crate::faults::{DataMode, Fault, FaultControl, RequestKind};
use crate::fhir::{self, FHIR_JSON, NHS_NUMBER_SYSTEM, ResourceType};
use crate::population::{self, Region};
use crate::record;

/// `_count` is capped here, as real servers do.
pub const MAX_PAGE: usize = 100;
const MAX_BATCH_ENTRIES: usize = 200;

/// What one organisation's request handler needs.
pub(crate) struct Ctx<'a> {
    pub region: &'a Region,
    pub org: usize,
    /// `http://host:port/fhir` (or `http://host:port/org/{code}/fhir` on a shared port), used
    /// for `fullUrl` and paging links.
    pub base_url: &'a str,
    /// The path before `/fhir` on this server: empty, or `/org/{code}` on a shared port (so
    /// rooted batch entry URLs resolve).
    pub path_prefix: &'a str,
    /// The `empty_bundle` fault: every search finds nothing.
    pub empty: bool,
    /// The organisation's fault when the request was admitted (only the faults that change the
    /// data matter here: `wrong_patient`, `wrong_patient_refs`, `ignore_include`).
    pub fault: Fault,
    /// The organisation's data mode (clinical conflicts on or off).
    pub data: DataMode,
    /// For counting searches inside batches.
    pub control: Option<&'a FaultControl>,
}

pub(crate) struct ApiResponse {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
}

impl ApiResponse {
    pub(crate) fn json(status: StatusCode, v: &Value) -> ApiResponse {
        ApiResponse {
            status,
            content_type: FHIR_JSON,
            body: Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
        }
    }
}

/// A request failure, reported as an OperationOutcome.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid",
            message: message.into(),
        }
    }
    fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not-found",
            message: message.into(),
        }
    }
    fn method(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "not-supported",
            message: message.into(),
        }
    }
    fn outcome(&self) -> Value {
        fhir::operation_outcome("error", self.code, &self.message)
    }
    fn status_line(&self) -> String {
        format!(
            "{} {}",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or("")
        )
    }
}

/// An OperationOutcome response (also used by the server for injected faults).
pub(crate) fn outcome_response(status: StatusCode, code: &str, message: &str) -> ApiResponse {
    ApiResponse::json(status, &fhir::operation_outcome("error", code, message))
}

/// The parsed route of a request path (below `/fhir`).
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metadata,
    Batch,
    Search(ResourceType),
    Read(ResourceType, String),
    Everything(String),
    Binary(String),
    UnknownType(String),
    NotFound,
}

fn route(path: &str) -> Route {
    let Some(rest) = path.strip_prefix("/fhir") else {
        return Route::NotFound;
    };
    if rest.is_empty() || rest == "/" {
        return Route::Batch;
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Route::NotFound;
    };
    let segments: Vec<String> = rest
        .trim_end_matches('/')
        .split('/')
        .map(|s| percent_decode(s, false))
        .collect();
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    match seg.as_slice() {
        ["metadata"] => Route::Metadata,
        ["Binary", id] => Route::Binary(id.to_string()),
        ["Patient", id, "$everything"] => Route::Everything(id.to_string()),
        [t, rest @ ..] => match (ResourceType::parse(t), rest) {
            (Some(rt), []) => Route::Search(rt),
            (Some(rt), [id]) => Route::Read(rt, id.to_string()),
            (Some(_), _) => Route::NotFound,
            (None, _) => Route::UnknownType(t.to_string()),
        },
        [] => Route::NotFound,
    }
}

/// What a request is, before it is served (so faulted requests are counted too).
pub(crate) fn classify(method: &Method, path: &str) -> RequestKind {
    match (method, route(path)) {
        (&Method::GET, Route::Metadata) => RequestKind::Metadata,
        (&Method::GET, Route::Search(ResourceType::Medication)) => RequestKind::Other,
        (&Method::GET, Route::Search(ResourceType::Patient)) => RequestKind::PatientSearch,
        (&Method::GET, Route::Search(rt)) => RequestKind::ResourceSearch(rt),
        (&Method::GET, Route::Everything(_)) => RequestKind::Everything,
        (&Method::GET, Route::Read(..) | Route::Binary(_)) => RequestKind::Read,
        (&Method::POST, Route::Batch) => RequestKind::Batch,
        _ => RequestKind::Other,
    }
}

/// Serves one request.
pub(crate) fn handle(
    ctx: &Ctx<'_>,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> ApiResponse {
    let result = match (method, route(path)) {
        (&Method::POST, Route::Batch) => {
            batch(ctx, body).map(|v| ApiResponse::json(StatusCode::OK, &v))
        }
        (&Method::GET, Route::Binary(id)) => binary(ctx, &id),
        (&Method::GET, r) => get(ctx, r, query).map(|v| ApiResponse::json(StatusCode::OK, &v)),
        (_, Route::NotFound) => Err(ApiError::not_found(format!("no such endpoint: {path}"))),
        (_, Route::UnknownType(t)) => Err(ApiError::not_found(format!(
            "resource type {t:?} is not supported"
        ))),
        (m, _) => Err(ApiError::method(format!("{m} is not supported here"))),
    };
    result.unwrap_or_else(|e| ApiResponse::json(e.status, &e.outcome()))
}

fn get(ctx: &Ctx<'_>, r: Route, query: Option<&str>) -> Result<Value, ApiError> {
    let params = parse_query(query.unwrap_or(""));
    match r {
        Route::Metadata => {
            let o = &ctx.region.organisations()[ctx.org];
            Ok(fhir::capability_statement(
                o,
                ctx.base_url,
                &ctx.region.reference_date(),
            ))
        }
        Route::Search(ResourceType::Patient) => patient_search(ctx, &params, query.unwrap_or("")),
        Route::Search(ResourceType::Medication) => Err(ApiError::not_found(
            "Medication is not searchable here: read Medication/{id}, or _include it with MedicationRequest",
        )),
        Route::Search(rt) => resource_search(ctx, rt, &params, query.unwrap_or("")),
        Route::Everything(id) => everything(ctx, &id, &params, query.unwrap_or("")),
        Route::Read(rt, id) => read(ctx, rt, &id),
        Route::Batch => Err(ApiError::method(
            "GET on the base is not supported; POST a batch Bundle",
        )),
        Route::Binary(_) => Err(ApiError::bad_request(
            "Binary is not available inside a batch",
        )),
        Route::UnknownType(t) => Err(ApiError::not_found(format!(
            "resource type {t:?} is not supported"
        ))),
        Route::NotFound => Err(ApiError::not_found("no such endpoint")),
    }
}

// ---- query parsing --------------------------------------------------------------------------

pub(crate) fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' if plus_is_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

pub(crate) fn param<'a>(params: &'a [(String, String)], names: &[&str]) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| names.contains(&k.as_str()))
        .map(|(_, v)| v.as_str())
}

/// `(count, offset)` from `_count` / `_offset`, with the region's default page size.
fn paging(ctx: &Ctx<'_>, params: &[(String, String)]) -> Result<(usize, usize), ApiError> {
    let count = match param(params, &["_count"]) {
        None => ctx.region.spec().page_size,
        Some(v) => v.trim().parse::<usize>().map_err(|_| {
            ApiError::bad_request(format!("_count must be a non-negative integer, not {v:?}"))
        })?,
    };
    let offset = match param(params, &["_offset"]) {
        None => 0,
        Some(v) => v.trim().parse::<usize>().map_err(|_| {
            ApiError::bad_request(format!("_offset must be a non-negative integer, not {v:?}"))
        })?,
    };
    Ok((count.min(MAX_PAGE), offset))
}

/// The raw query without `_count`/`_offset`, to rebuild paging links exactly as the client sent
/// the rest.
fn query_without_paging(raw: &str) -> String {
    raw.split('&')
        .filter(|p| {
            !p.is_empty()
                && !p.starts_with("_count=")
                && !p.starts_with("_offset=")
                && *p != "_count"
                && *p != "_offset"
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// A page of `items` as a searchset Bundle with `self` and (when more remain) `next` links.
fn page(
    ctx: &Ctx<'_>,
    path: &str,
    raw_query: &str,
    params: &[(String, String)],
    items: Vec<&Value>,
) -> Result<Value, ApiError> {
    page_with(ctx, path, raw_query, params, items, &[])
}

/// As [`page`], adding after each page's matches the `medications` its MedicationRequests
/// reference (`search.mode` include), once each: what `_include=MedicationRequest:medication`
/// gives, and how `$everything` carries referenced resources. Includes never count towards
/// `_count` or `total`, so a reference and its target are always on the same page.
fn page_with(
    ctx: &Ctx<'_>,
    path: &str,
    raw_query: &str,
    params: &[(String, String)],
    items: Vec<&Value>,
    medications: &[Value],
) -> Result<Value, ApiError> {
    let (count, offset) = paging(ctx, params)?;
    let total = items.len();
    let rest = query_without_paging(raw_query);
    let link = |off: usize| {
        let sep = if rest.is_empty() { "" } else { "&" };
        format!(
            "{}/{path}?{rest}{sep}_count={count}&_offset={off}",
            ctx.base_url
        )
    };
    let next = (count > 0 && offset.saturating_add(count) < total).then(|| link(offset + count));
    let matches: Vec<&Value> = items.into_iter().skip(offset).take(count).collect();
    let mut included: Vec<&Value> = Vec::new();
    for v in &matches {
        let Some(target) = v["medicationReference"]["reference"].as_str() else {
            continue;
        };
        let Some(id) = target.strip_prefix("Medication/") else {
            continue;
        };
        if let Some(m) = medications.iter().find(|m| m["id"] == id)
            && !included.iter().any(|i| i["id"] == id)
        {
            included.push(m);
        }
    }
    let entries = matches
        .into_iter()
        .map(|v| fhir::entry(ctx.base_url, v.clone()))
        .chain(
            included
                .into_iter()
                .map(|v| fhir::include_entry(ctx.base_url, v.clone())),
        )
        .collect();
    let self_url = link(offset);
    Ok(fhir::searchset(
        &fhir::bundle_id(&format!("{}|{self_url}", ctx.org)),
        &calendar::instant(ctx.region.reference_day(), 23 * 60 + 59),
        total,
        &self_url,
        next.as_deref(),
        entries,
    ))
}

// ---- handlers -------------------------------------------------------------------------------

/// The person a `Patient.id` (or `Patient/{id}`, or an absolute reference) names at this org.
fn person_for(ctx: &Ctx<'_>, reference: &str) -> Option<usize> {
    let id = reference
        .rsplit_once("Patient/")
        .map_or(reference, |(_, id)| id)
        .trim();
    let org = &ctx.region.organisations()[ctx.org];
    let person = population::parse_patient_id(org, id)?;
    (ctx.region.knows(ctx.org, person) && !ctx.empty).then_some(person)
}

/// The chained search parameters that name the patient by identifier instead of by id
/// (`Condition?patient.identifier=https://fhir.nhs.uk/Id/nhs-number|{NHS number}`): what lets a
/// client ask for a record in the same round trip as the Patient search. FHIR R4 gives every
/// clinical type a `patient` parameter; `subject` is accepted as leniently as it is unchained.
const CHAINED_IDENTIFIER: &[&str] = &[
    "patient.identifier",
    "subject.identifier",
    "patient:Patient.identifier",
    "subject:Patient.identifier",
];

/// The person an NHS number identifier token (`system|value`, or a bare value) names at this
/// organisation: the same match the Patient search makes, so a chained search finds exactly
/// the records the Patient search would have led to.
fn person_by_identifier(ctx: &Ctx<'_>, identifier: &str) -> Option<usize> {
    let (system, value) = identifier.split_once('|').unwrap_or(("", identifier));
    if !system.is_empty() && system != NHS_NUMBER_SYSTEM {
        return None;
    }
    NhsNumber::parse(value)
        .ok()
        .and_then(|n| ctx.region.person_index(&n))
        .filter(|&p| ctx.region.knows(ctx.org, p) && !ctx.empty)
}

fn patient_search(
    ctx: &Ctx<'_>,
    params: &[(String, String)],
    raw: &str,
) -> Result<Value, ApiError> {
    let person = if let Some(identifier) = param(params, &["identifier"]) {
        person_by_identifier(ctx, identifier)
    } else if let Some(id) = param(params, &["_id"]) {
        person_for(ctx, id)
    } else {
        return Err(ApiError::bad_request(format!(
            "Patient search needs identifier={NHS_NUMBER_SYSTEM}|{{NHS number}} (or _id)"
        )));
    };
    let patient = person.map(|p| record::patient_only(ctx.region, p, ctx.org, ctx.base_url));
    page(ctx, "Patient", raw, params, patient.iter().collect())
}

fn resource_search(
    ctx: &Ctx<'_>,
    rt: ResourceType,
    params: &[(String, String)],
    raw: &str,
) -> Result<Value, ApiError> {
    let person = if let Some(reference) = param(
        params,
        &["patient", "subject", "patient:Patient", "subject:Patient"],
    ) {
        person_for(ctx, reference)
    } else if let Some(identifier) = param(params, CHAINED_IDENTIFIER) {
        person_by_identifier(ctx, identifier)
    } else {
        return Err(ApiError::bad_request(format!(
            "{} search needs patient={{id}}, subject=Patient/{{id}} or \
             patient.identifier={NHS_NUMBER_SYSTEM}|{{NHS number}}",
            rt.as_str()
        )));
    };
    let filters = date_filters(rt, params)?;
    paging(ctx, params)?;
    let rec = person.map(|p| answer_record(ctx, p));
    let items: Vec<&Value> = rec
        .iter()
        .flat_map(|r| r.of_type(rt))
        .filter(|v| filters.iter().all(|f| f.matches(v)))
        .collect();
    let include = params.iter().any(|(k, v)| {
        k == "_include"
            && matches!(
                v.as_str(),
                "MedicationRequest:medication" | "MedicationRequest:*" | "*"
            )
    });
    let medications = match &rec {
        Some(r) if include && ctx.fault != Fault::IgnoreInclude => r.medications.as_slice(),
        _ => &[],
    };
    page_with(ctx, rt.as_str(), raw, params, items, medications)
}

/// What a request about the patient `person` is answered with: their record at this
/// organisation, in the organisation's data mode; under `wrong_patient` another person's record
/// instead, under `wrong_patient_refs` theirs with the other person's clinical resources mixed
/// in (see [`Region::wrong_patient_at`]).
fn answer_record(ctx: &Ctx<'_>, person: usize) -> record::OrgRecord {
    let view = record::View {
        conflicts: ctx.data == DataMode::Conflicts,
        references_only: ctx.fault == Fault::IgnoreInclude,
    };
    let build = |p| record::build_view(ctx.region, p, ctx.org, ctx.base_url, view);
    match ctx.fault {
        Fault::WrongPatient => build(ctx.region.other_person(ctx.org, person)),
        Fault::WrongPatientRefs => {
            let mut rec = build(person);
            let other = build(ctx.region.other_person(ctx.org, person));
            rec.resources.extend(other.resources);
            rec.medications.extend(other.medications);
            rec.resources
                .sort_by_key(|(t, _)| ResourceType::CLINICAL.iter().position(|c| c == t));
            rec
        }
        _ => build(person),
    }
}

fn everything(
    ctx: &Ctx<'_>,
    id: &str,
    params: &[(String, String)],
    raw: &str,
) -> Result<Value, ApiError> {
    let org = &ctx.region.organisations()[ctx.org];
    let known = population::parse_patient_id(org, id).is_some_and(|p| ctx.region.knows(ctx.org, p));
    if !known {
        return Err(ApiError::not_found(format!(
            "Patient/{id} is not known here"
        )));
    }
    paging(ctx, params)?;
    let rec = person_for(ctx, id).map(|p| answer_record(ctx, p));
    let items: Vec<&Value> = rec.iter().flat_map(|r| r.everything()).collect();
    // Referenced Medications ride with the page that references them; a server that ignores
    // `_include` does not send them at all.
    let medications = match &rec {
        Some(r) if ctx.fault != Fault::IgnoreInclude => r.medications.as_slice(),
        _ => &[],
    };
    page_with(
        ctx,
        &format!("Patient/{id}/$everything"),
        raw,
        params,
        items,
        medications,
    )
}

fn read(ctx: &Ctx<'_>, rt: ResourceType, id: &str) -> Result<Value, ApiError> {
    let org = &ctx.region.organisations()[ctx.org];
    let missing = || ApiError::not_found(format!("{}/{id} is not known here", rt.as_str()));
    let person = record::person_of_resource_id(org, rt, id)
        .filter(|&p| ctx.region.knows(ctx.org, p) && !ctx.empty)
        .ok_or_else(missing)?;
    let view = |references_only| record::View {
        conflicts: ctx.data == DataMode::Conflicts,
        references_only,
    };
    let rec = record::build_view(ctx.region, person, ctx.org, ctx.base_url, view(false));
    if let Some(found) = rec.find(rt, id) {
        return Ok(found.clone());
    }
    // A Medication a server that ignores `_include` referenced stays readable after the
    // fault is switched off (and the other way round): ids do not depend on the view.
    if rt == ResourceType::Medication {
        let rec = record::build_view(ctx.region, person, ctx.org, ctx.base_url, view(true));
        return rec.find(rt, id).cloned().ok_or_else(missing);
    }
    Err(missing())
}

fn binary(ctx: &Ctx<'_>, id: &str) -> Result<ApiResponse, ApiError> {
    let org = &ctx.region.organisations()[ctx.org];
    let missing = || ApiError::not_found(format!("Binary/{id} is not known here"));
    let person = record::person_of_resource_id(org, ResourceType::DocumentReference, id)
        .filter(|&p| ctx.region.knows(ctx.org, p) && !ctx.empty)
        .ok_or_else(missing)?;
    let rec = record::build(ctx.region, person, ctx.org, ctx.base_url);
    let doc = rec
        .find(ResourceType::DocumentReference, id)
        .ok_or_else(missing)?;
    Ok(ApiResponse {
        status: StatusCode::OK,
        content_type: "text/plain; charset=utf-8",
        body: Bytes::from(record::document_text(ctx.region, ctx.org, &rec, doc)),
    })
}

/// `date=ge2026-01-01` style filters on Appointment.start.
struct DateFilter {
    op: &'static str,
    day: i64,
}

impl DateFilter {
    fn matches(&self, v: &Value) -> bool {
        let Some(day) = v["start"].as_str().and_then(calendar::parse_date) else {
            return false;
        };
        match self.op {
            "ge" => day >= self.day,
            "gt" => day > self.day,
            "le" => day <= self.day,
            "lt" => day < self.day,
            "ne" => day != self.day,
            _ => day == self.day,
        }
    }
}

fn date_filters(
    rt: ResourceType,
    params: &[(String, String)],
) -> Result<Vec<DateFilter>, ApiError> {
    if rt != ResourceType::Appointment {
        return Ok(Vec::new());
    }
    params
        .iter()
        .filter(|(k, _)| k == "date")
        .map(|(_, v)| {
            let (op, rest) = ["ge", "gt", "le", "lt", "eq", "ne"]
                .iter()
                .find_map(|op| v.strip_prefix(op).map(|r| (*op, r)))
                .unwrap_or(("eq", v.as_str()));
            let day = calendar::parse_date(rest).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "date must be [ge|gt|le|lt|eq|ne]YYYY-MM-DD, not {v:?}"
                ))
            })?;
            Ok(DateFilter { op, day })
        })
        .collect()
}

// ---- batch ----------------------------------------------------------------------------------

fn batch(ctx: &Ctx<'_>, body: &[u8]) -> Result<Value, ApiError> {
    let bundle: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("batch body is not JSON: {e}")))?;
    if bundle["resourceType"] != "Bundle" {
        return Err(ApiError::bad_request("batch body must be a Bundle"));
    }
    if bundle["type"] != "batch" {
        return Err(ApiError::bad_request(
            "only Bundle.type = batch is supported",
        ));
    }
    let entries = match bundle.get("entry") {
        None => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(ApiError::bad_request("Bundle.entry must be an array")),
    };
    if entries.len() > MAX_BATCH_ENTRIES {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_BATCH_ENTRIES} batch entries"
        )));
    }
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let method = e["request"]["method"].as_str();
        let url = e["request"]["url"].as_str();
        let (Some(method), Some(url)) = (method, url) else {
            return Err(ApiError::bad_request(format!(
                "entry {i} needs request.method and request.url"
            )));
        };
        let result = if method != "GET" {
            Err(ApiError::method(format!(
                "entry {i}: only GET is supported in a batch"
            )))
        } else {
            batch_get(ctx, url)
        };
        out.push(match result {
            Ok(resource) => json!({ "resource": resource, "response": { "status": "200 OK" } }),
            Err(e) => json!({ "response": { "status": e.status_line(), "outcome": e.outcome() } }),
        });
    }
    Ok(json!({
        "resourceType": "Bundle",
        "id": fhir::bundle_id(&format!("{}|batch|{}", ctx.org, String::from_utf8_lossy(body))),
        "type": "batch-response",
        "entry": out,
    }))
}

fn batch_get(ctx: &Ctx<'_>, url: &str) -> Result<Value, ApiError> {
    // Relative (`Condition?patient=1`), rooted (`/fhir/Condition?...`) or absolute on this base.
    let url = url.strip_prefix(ctx.base_url).unwrap_or(url);
    let url = match url.strip_prefix(ctx.path_prefix) {
        Some(rest) if !ctx.path_prefix.is_empty() && rest.starts_with("/fhir") => rest,
        _ => url,
    };
    let url = url.strip_prefix("/fhir").unwrap_or(url);
    let url = url.trim_start_matches('/');
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (url, None),
    };
    let r = route(&format!("/fhir/{path}"));
    if let (Route::Search(rt), Some(control)) = (&r, ctx.control)
        && *rt != ResourceType::Patient
    {
        control.count_search(ctx.org, *rt);
    }
    get(ctx, r, query)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::population::RegionSpec;

    fn region() -> Region {
        Region::generate(&RegionSpec {
            patients: 500,
            page_size: 5,
            ..RegionSpec::default()
        })
    }

    fn call(
        r: &Region,
        org: usize,
        method: Method,
        path_and_query: &str,
        body: &[u8],
    ) -> (StatusCode, Value) {
        let ctx = Ctx {
            region: r,
            org,
            base_url: "http://h:1/fhir",
            path_prefix: "",
            empty: false,
            fault: Fault::None,
            data: DataMode::Normal,
            control: None,
        };
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let resp = handle(&ctx, &method, path, query, body);
        (
            resp.status,
            serde_json::from_slice(&resp.body).unwrap_or(Value::Null),
        )
    }

    #[test]
    fn routes_percent_encoded_everything_and_rejects_unknown_types() {
        assert_eq!(
            route("/fhir/Patient/x/%24everything"),
            Route::Everything("x".into())
        );
        assert_eq!(
            route("/fhir/Patient/x/$everything"),
            Route::Everything("x".into())
        );
        assert_eq!(route("/fhir/"), Route::Batch);
        assert_eq!(
            route("/fhir/Immunization"),
            Route::UnknownType("Immunization".into())
        );
        assert_eq!(
            route("/fhir/Medication/m-1"),
            Route::Read(ResourceType::Medication, "m-1".into())
        );
        assert_eq!(route("/other"), Route::NotFound);
        assert_eq!(route("/fhirx"), Route::NotFound);
    }

    #[test]
    fn percent_decoding_never_panics_on_odd_input() {
        for s in ["%", "%7", "%7C", "%zz", "a%7cb", "%%%", "é%C3", "%E2%82"] {
            let _ = percent_decode(s, true);
        }
        assert_eq!(percent_decode("a%7Cb", false), "a|b");
        assert_eq!(percent_decode("100%", false), "100%");
    }

    #[test]
    fn bad_requests_get_operation_outcomes() {
        let r = region();
        for (path, status) in [
            ("/fhir/Condition", StatusCode::BAD_REQUEST),
            (
                "/fhir/Condition?patient=x&_count=-1",
                StatusCode::BAD_REQUEST,
            ),
            (
                "/fhir/Appointment?patient=x&date=ge2026-99-01",
                StatusCode::BAD_REQUEST,
            ),
            ("/fhir/Patient", StatusCode::BAD_REQUEST),
            ("/fhir/Medication?patient=x", StatusCode::NOT_FOUND),
            ("/fhir/Patient/nope/$everything", StatusCode::NOT_FOUND),
            ("/fhir/Condition/nope", StatusCode::NOT_FOUND),
            ("/nothing", StatusCode::NOT_FOUND),
        ] {
            let (s, v) = call(&r, 0, Method::GET, path, b"");
            assert_eq!(s, status, "{path}");
            assert_eq!(v["resourceType"], "OperationOutcome", "{path}");
        }
        let (s, v) = call(&r, 0, Method::DELETE, "/fhir/Condition", b"");
        assert_eq!(
            (s, v["resourceType"].as_str()),
            (StatusCode::METHOD_NOT_ALLOWED, Some("OperationOutcome"))
        );
    }

    #[test]
    fn malformed_batches_are_400_and_entry_errors_are_per_entry() {
        let r = region();
        for body in [
            &b"not json"[..],
            br#"{"resourceType":"Patient"}"#,
            br#"{"resourceType":"Bundle","type":"transaction"}"#,
            br#"{"resourceType":"Bundle","type":"batch","entry":[{}]}"#,
            br#"{"resourceType":"Bundle","type":"batch","entry":{}}"#,
        ] {
            let (s, v) = call(&r, 0, Method::POST, "/fhir", body);
            assert_eq!(s, StatusCode::BAD_REQUEST);
            assert_eq!(v["resourceType"], "OperationOutcome");
        }
        let body = br#"{"resourceType":"Bundle","type":"batch","entry":[
            {"request":{"method":"GET","url":"Medication?patient=1"}},
            {"request":{"method":"DELETE","url":"Condition?patient=1"}},
            {"request":{"method":"GET","url":"Condition?patient=zz"}}]}"#;
        let (s, v) = call(&r, 0, Method::POST, "/fhir/", body);
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["type"], "batch-response");
        assert_eq!(v["entry"][0]["response"]["status"], "404 Not Found");
        assert_eq!(
            v["entry"][1]["response"]["status"],
            "405 Method Not Allowed"
        );
        assert_eq!(v["entry"][2]["response"]["status"], "200 OK");
        assert_eq!(v["entry"][2]["resource"]["total"], 0);
    }

    #[test]
    fn appointment_date_filters_select_by_start_date() {
        let r = region();
        let (org, id, n) = (0..r.organisations().len())
            .flat_map(|o| r.patients().map(move |p| (o, p)))
            .find_map(|(o, p)| {
                let id = r.patient_id_at(&p.nhs_number, &r.organisations()[o].code)?;
                let (_, v) = call(
                    &r,
                    o,
                    Method::GET,
                    &format!("/fhir/Appointment?patient={id}"),
                    b"",
                );
                let n = v["total"].as_u64()?;
                (n > 0).then_some((o, id, n))
            })
            .expect("someone has an appointment");
        let today = r.reference_date();
        for (query, want) in [
            (format!("date=ge{today}"), n),
            (format!("date=lt{today}"), 0),
            ("date=ge2099-01-01".to_string(), 0),
            (format!("date=gt{today}&date=le2099-01-01"), n),
        ] {
            let (s, v) = call(
                &r,
                org,
                Method::GET,
                &format!("/fhir/Appointment?patient={id}&{query}"),
                b"",
            );
            assert_eq!(s, StatusCode::OK);
            assert_eq!(v["total"].as_u64(), Some(want), "{query}");
        }
    }

    #[test]
    fn paging_links_walk_every_result_once() {
        let r = region();
        let p = r
            .patients_known_to_at_least(1)
            .find(|p| {
                let id = r.patient_id_at(&p.nhs_number, &p.gp).unwrap();
                let (_, v) = call(
                    &r,
                    r.org_index(&p.gp).unwrap(),
                    Method::GET,
                    &format!("/fhir/Patient/{id}/$everything?_count=1000"),
                    b"",
                );
                v["total"].as_u64().unwrap_or(0) > 12
            })
            .unwrap();
        let org = r.org_index(&p.gp).unwrap();
        let id = r.patient_id_at(&p.nhs_number, &p.gp).unwrap();
        let mut url = format!("/fhir/Patient/{id}/$everything");
        let mut seen = Vec::new();
        let total = loop {
            let (s, v) = call(&r, org, Method::GET, &url, b"");
            assert_eq!(s, StatusCode::OK);
            let total = v["total"].as_u64().unwrap();
            for e in v["entry"].as_array().unwrap() {
                // Referenced Medications ride along as includes; `total` counts matches.
                if e["search"]["mode"] == "match" {
                    seen.push(e["fullUrl"].as_str().unwrap().to_string());
                }
            }
            let next = v["link"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["relation"] == "next");
            match next {
                Some(l) => {
                    url = l["url"]
                        .as_str()
                        .unwrap()
                        .strip_prefix("http://h:1")
                        .unwrap()
                        .to_string()
                }
                None => break total,
            }
        };
        assert_eq!(seen.len() as u64, total);
        let mut dedup = seen.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), seen.len());
        assert!(seen[0].contains("/Patient/"), "Patient comes first");
    }
}
