//! The region's record locator: where a patient's records are, never what they say.
//!
//! A broker for a whole area cannot ask thousands of organisations about every patient; real
//! exchanges first ask the demographics service (PDS: the registered GP, in
//! `Patient.generalPractitioner`) and the National Record Locator (one `DocumentReference`
//! pointer per organisation holding records, with the organisation as `custodian` and the
//! patient's record there — `{endpoint}/Patient/{its own id}` — as the attachment URL). This
//! module plays both for the synthetic region, as FHIR R4 below `{server}/locator/fhir`, with no
//! clinical content. Like `api` it is pure request → response; the server wraps it in the
//! locator's latency and faults (pseudo-code `LOCATOR`).

use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::nhs::NhsNumber;

use crate::api::{ApiResponse, outcome_response, param, parse_query, percent_decode};
use crate::calendar;
use crate::faults::RequestKind;
use crate::fhir::{self, NHS_NUMBER_SYSTEM, ODS_SYSTEM, ResourceType};
use crate::population::Region;
use crate::prng::Prng;
use crate::record;

/// SNOMED CT, for the pointer type.
const SNOMED: &str = "http://snomed.info/sct";
/// Every pointer's `type`: 419891008 |Record artifact (record artifact)|.
pub const POINTER_TYPE_CODE: &str = "419891008";
pub const POINTER_TYPE_DISPLAY: &str = "Record artifact";
/// The search parameters naming the patient on a `DocumentReference` search.
const SUBJECT_PARAMS: &[&str] = &[
    "subject:identifier",
    "patient:identifier",
    "subject.identifier",
];

/// What the locator's request handler needs.
pub(crate) struct LocatorCtx<'a> {
    pub region: &'a Region,
    /// `http://host:port/locator/fhir`.
    pub base_url: &'a str,
    /// Every organisation's FHIR base URL, in region order (the pointers' attachment URLs start
    /// with it).
    pub org_base_urls: &'a [String],
    /// The fraction of pointers the locator does not hold (0 = it knows every organisation).
    pub missing_fraction: f64,
    /// The `empty_bundle` fault: every search finds nothing.
    pub empty: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metadata,
    PatientSearch,
    PatientRead(String),
    PointerSearch,
    NotFound,
}

/// `path` is below `/locator`: `/fhir/Patient`, ...
fn route(path: &str) -> Route {
    let Some(rest) = path.strip_prefix("/fhir/") else {
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
        ["Patient"] => Route::PatientSearch,
        ["Patient", id] => Route::PatientRead(id.to_string()),
        ["DocumentReference"] => Route::PointerSearch,
        _ => Route::NotFound,
    }
}

/// What a locator request is, for the `LOCATOR` counters.
pub(crate) fn classify(method: &Method, path: &str) -> RequestKind {
    match (method, route(path)) {
        (&Method::GET, Route::Metadata) => RequestKind::Metadata,
        (&Method::GET, Route::PatientSearch) => RequestKind::PatientSearch,
        (&Method::GET, Route::PatientRead(_)) => RequestKind::Read,
        (&Method::GET, Route::PointerSearch) => {
            RequestKind::ResourceSearch(ResourceType::DocumentReference)
        }
        _ => RequestKind::Other,
    }
}

/// Serves one locator request (`path` below `/locator`).
pub(crate) fn handle(
    ctx: &LocatorCtx<'_>,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> ApiResponse {
    let r = route(path);
    if r == Route::NotFound {
        return outcome_response(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!(
                "no such locator endpoint: {path} (try /fhir/Patient?identifier= or \
                 /fhir/DocumentReference?subject:identifier=)"
            ),
        );
    }
    if method != Method::GET {
        return outcome_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
            &format!("{method} is not supported by the locator"),
        );
    }
    let raw = query.unwrap_or("");
    let params = parse_query(raw);
    let ok = |v: Value| ApiResponse::json(StatusCode::OK, &v);
    match r {
        Route::Metadata => ok(capability_statement(ctx)),
        Route::PatientSearch => match param(&params, &["identifier"]) {
            None => outcome_response(
                StatusCode::BAD_REQUEST,
                "invalid",
                &format!("Patient search needs identifier={NHS_NUMBER_SYSTEM}|{{NHS number}}"),
            ),
            Some(identifier) => {
                let person = person_for(ctx, identifier);
                let entries = person
                    .map(|p| fhir::entry(ctx.base_url, patient(ctx, p)))
                    .into_iter()
                    .collect();
                ok(searchset(ctx, "Patient", raw, entries))
            }
        },
        Route::PatientRead(id) => match person_for(ctx, &id) {
            Some(p) => ok(patient(ctx, p)),
            None => outcome_response(
                StatusCode::NOT_FOUND,
                "not-found",
                &format!("Patient/{id} is not known to the locator"),
            ),
        },
        Route::PointerSearch => match param(&params, SUBJECT_PARAMS) {
            None => outcome_response(
                StatusCode::BAD_REQUEST,
                "invalid",
                &format!(
                    "DocumentReference search needs subject:identifier={NHS_NUMBER_SYSTEM}|{{NHS number}}"
                ),
            ),
            Some(identifier) => {
                let entries = person_for(ctx, identifier)
                    .map(|p| {
                        ctx.region
                            .pointers(p, ctx.missing_fraction)
                            .map(|o| fhir::entry(ctx.base_url, pointer(ctx, p, o)))
                            .collect()
                    })
                    .unwrap_or_default();
                ok(searchset(ctx, "DocumentReference", raw, entries))
            }
        },
        Route::NotFound => unreachable!("handled above"),
    }
}

/// The person an NHS number token (`system|value`, or a bare value) names, if the region knows
/// them. Another identifier system, or a value that is not a valid NHS number, finds nobody.
fn person_for(ctx: &LocatorCtx<'_>, token: &str) -> Option<usize> {
    if ctx.empty {
        return None;
    }
    let (system, value) = token.split_once('|').unwrap_or(("", token));
    if !system.is_empty() && system != NHS_NUMBER_SYSTEM {
        return None;
    }
    let nhs = NhsNumber::parse(value.trim()).ok()?;
    ctx.region.person_index(&nhs)
}

fn searchset(ctx: &LocatorCtx<'_>, path: &str, raw_query: &str, entries: Vec<Value>) -> Value {
    let self_url = if raw_query.is_empty() {
        format!("{}/{path}", ctx.base_url)
    } else {
        format!("{}/{path}?{raw_query}", ctx.base_url)
    };
    fhir::searchset(
        &fhir::bundle_id(&format!("locator|{self_url}")),
        &calendar::instant(ctx.region.reference_day(), 23 * 60 + 59),
        entries.len(),
        &self_url,
        None,
        entries,
    )
}

/// The patient as the demographics service holds them: the GP's (true) demographics, the NHS
/// number as id, and the registered GP by ODS code only.
fn patient(ctx: &LocatorCtx<'_>, person: usize) -> Value {
    let p = ctx.region.person(person);
    let gp = usize::from(p.orgs[0]);
    let gp_base = ctx.org_base_urls.get(gp).map_or("", String::as_str);
    let mut v = record::patient_only(ctx.region, person, gp, gp_base);
    let gp_code = &ctx.region.organisations()[gp].code;
    if let Some(o) = v.as_object_mut() {
        o.insert("id".into(), json!(p.nhs.as_digits()));
        o.insert(
            "generalPractitioner".into(),
            json!([{ "identifier": { "system": ODS_SYSTEM, "value": gp_code } }]),
        );
        o.remove("managingOrganization");
    }
    v
}

/// One record pointer: organisation `org` holds records for person `person`.
fn pointer(ctx: &LocatorCtx<'_>, person: usize, org: usize) -> Value {
    let o = &ctx.region.organisations()[org];
    let nhs = ctx.region.person(person).nhs.as_digits();
    let mut rng = Prng::keyed(&[ctx.region.spec().seed, 0x10C8, person as u64, org as u64]);
    let day = ctx.region.reference_day() - rng.range(1, 700);
    let minute = rng.range(8 * 60, 18 * 60) as u32;
    json!({
        "resourceType": "DocumentReference",
        "id": format!("{}-ptr-{}", o.code.to_ascii_lowercase(), 100_000 + person),
        "meta": { "lastUpdated": calendar::instant(day, minute) },
        "status": "current",
        "type": {
            "coding": [{ "system": SNOMED, "code": POINTER_TYPE_CODE, "display": POINTER_TYPE_DISPLAY }],
            "text": format!("{} record", o.kind.label()),
        },
        "subject": { "identifier": { "system": NHS_NUMBER_SYSTEM, "value": nhs } },
        "date": calendar::instant(day, minute),
        "custodian": {
            "identifier": { "system": ODS_SYSTEM, "value": o.code },
            "display": o.name,
        },
        "description": format!("{} holds records for this patient", o.name),
        "content": [{
            "attachment": {
                "contentType": fhir::FHIR_JSON,
                "url": format!(
                    "{}/Patient/{}",
                    ctx.org_base_urls.get(org).map_or("", String::as_str),
                    crate::population::patient_id(o, person)
                ),
                "title": format!("{}: this patient's record", o.name),
            }
        }],
    })
}

fn capability_statement(ctx: &LocatorCtx<'_>) -> Value {
    json!({
        "resourceType": "CapabilityStatement",
        "id": "locator-capabilities",
        "status": "active",
        "date": ctx.region.reference_date(),
        "publisher": "carerecord mock-sources",
        "kind": "instance",
        "software": { "name": "carerecord mock-sources locator", "version": env!("CARGO_PKG_VERSION") },
        "implementation": {
            "description": "Record locator for a synthetic region (registered GP and record pointers; no clinical content)",
            "url": ctx.base_url,
        },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "resource": [
                {
                    "type": "Patient",
                    "interaction": [{ "code": "read" }, { "code": "search-type" }],
                    "searchParam": [{ "name": "identifier", "type": "token" }],
                },
                {
                    "type": "DocumentReference",
                    "interaction": [{ "code": "search-type" }],
                    "searchParam": [
                        { "name": "subject:identifier", "type": "token" },
                        { "name": "patient:identifier", "type": "token" },
                    ],
                },
            ],
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::population::RegionSpec;

    fn call(r: &Region, missing: f64, path_and_query: &str) -> (StatusCode, Value) {
        let urls: Vec<String> = r
            .organisations()
            .iter()
            .map(|o| format!("http://h:1/org/{}/fhir", o.code))
            .collect();
        let ctx = LocatorCtx {
            region: r,
            base_url: "http://h:1/locator/fhir",
            org_base_urls: &urls,
            missing_fraction: missing,
            empty: false,
        };
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let resp = handle(&ctx, &Method::GET, path, query);
        (resp.status, serde_json::from_slice(&resp.body).unwrap())
    }

    #[test]
    fn pointers_name_every_organisation_that_knows_the_patient() {
        let r = Region::generate(&RegionSpec {
            patients: 300,
            ..RegionSpec::default()
        });
        for p in r.patients().take(60) {
            let nhs = p.nhs_number.as_digits();
            for q in [
                format!("subject:identifier={NHS_NUMBER_SYSTEM}%7C{nhs}"),
                format!("patient:identifier={NHS_NUMBER_SYSTEM}|{nhs}"),
            ] {
                let (s, b) = call(&r, 0.0, &format!("/fhir/DocumentReference?{q}"));
                assert_eq!(s, StatusCode::OK);
                let custodians: Vec<&str> = b["entry"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| {
                        e["resource"]["custodian"]["identifier"]["value"]
                            .as_str()
                            .unwrap()
                    })
                    .collect();
                assert_eq!(custodians, p.organisations, "{q}");
                assert_eq!(b["total"], p.organisations.len());
            }
            let (_, b) = call(
                &r,
                0.0,
                &format!("/fhir/Patient?identifier={NHS_NUMBER_SYSTEM}|{nhs}"),
            );
            let gp = &b["entry"][0]["resource"]["generalPractitioner"];
            assert_eq!(
                gp,
                &json!([{ "identifier": { "system": ODS_SYSTEM, "value": p.gp } }])
            );
        }
    }

    #[test]
    fn missing_pointers_drop_about_that_fraction_reproducibly() {
        let r = Region::generate(&RegionSpec {
            patients: 2_000,
            ..RegionSpec::default()
        });
        let all: usize = r.patients().map(|p| p.organisations.len()).sum();
        let kept: usize = r
            .patients()
            .map(|p| r.located_organisations(&p.nhs_number, 0.25).len())
            .sum();
        let share = 1.0 - kept as f64 / all as f64;
        assert!((0.2..0.3).contains(&share), "{share}");
        let p = r.patients().next().unwrap();
        assert_eq!(
            r.located_organisations(&p.nhs_number, 0.25),
            r.located_organisations(&p.nhs_number, 0.25)
        );
        assert_eq!(r.located_organisations(&p.nhs_number, 0.0), p.organisations);
        assert!(r.located_organisations(&p.nhs_number, 1.0).is_empty());
    }

    #[test]
    fn bad_locator_requests_are_operation_outcomes() {
        let r = Region::generate(&RegionSpec {
            patients: 10,
            ..RegionSpec::default()
        });
        for (path, status) in [
            ("/fhir/Patient", StatusCode::BAD_REQUEST),
            ("/fhir/DocumentReference", StatusCode::BAD_REQUEST),
            ("/fhir/Condition?patient=1", StatusCode::NOT_FOUND),
            ("/nope", StatusCode::NOT_FOUND),
            ("/fhir/Patient/9990000018/x", StatusCode::NOT_FOUND),
        ] {
            let (s, v) = call(&r, 0.0, path);
            assert_eq!(s, status, "{path}");
            assert_eq!(v["resourceType"], "OperationOutcome");
        }
        let (s, v) = call(
            &r,
            0.0,
            "/fhir/DocumentReference?subject:identifier=https://other|1",
        );
        assert_eq!((s, &v["total"]), (StatusCode::OK, &json!(0)));
        let (s, v) = call(&r, 0.0, "/fhir/metadata");
        assert_eq!(
            (s, v["resourceType"].as_str()),
            (StatusCode::OK, Some("CapabilityStatement"))
        );
    }
}
