//! Turns a wire request into a checked [`LookupRequest`]: nothing past this point sees an
//! unchecked NHS number, an anonymous requester or an unknown enum value.

use std::time::Duration;

use carerecord_adapters::{NhsNumber, SectionSet};
use carerecord_proto::{CacheDirective, GetCareRecordRequest, Purpose, Requester};

use crate::error::LookupError;

/// A checked lookup request.
#[derive(Debug, Clone)]
pub struct LookupRequest {
    pub request_id: String,
    pub nhs_number: NhsNumber,
    pub sections: SectionSet,
    pub requester: Requester,
    pub purpose: Purpose,
    pub require_fresh: bool,
    pub via_brokers: Vec<String>,
    /// From the caller's `grpc-timeout`, if it set one.
    pub caller_timeout: Option<Duration>,
}

/// Longest identifier we accept in requester fields: long enough for any real id, short enough
/// that nobody stuffs a document into the audit trail.
const MAX_FIELD: usize = 256;
/// No federation is this deep; a longer chain is a loop or an attack.
const MAX_VIA_BROKERS: usize = 16;

/// A lookup an HTTP face builds from what its caller sent (a FHIR `Parameters`, a launch body, a
/// document id), checked exactly as a gRPC request is. HTTP faces set no caller timeout and
/// never forward a federation chain.
pub fn check_face_request(
    nhs_number: String,
    requester: Option<Requester>,
    sections: Vec<i32>,
    fresh: bool,
    request_id: &str,
) -> Result<LookupRequest, LookupError> {
    let request = GetCareRecordRequest {
        nhs_number,
        requester,
        sections,
        cache: if fresh {
            CacheDirective::RequireFresh
        } else {
            CacheDirective::AllowCached
        } as i32,
        via_brokers: Vec::new(),
    };
    check(request, request_id.to_owned(), None)
}

pub fn check(
    request: GetCareRecordRequest,
    request_id: String,
    caller_timeout: Option<Duration>,
) -> Result<LookupRequest, LookupError> {
    let requester = request.requester.ok_or(LookupError::MissingRequester)?;
    let required = [
        ("user_id", &requester.user_id),
        ("role_code", &requester.role_code),
        ("organisation_code", &requester.organisation_code),
    ];
    for (field, value) in required {
        if value.trim().is_empty() {
            return Err(LookupError::MissingRequesterField(field));
        }
    }
    for (field, value) in [
        ("user_id", &requester.user_id),
        ("user_name", &requester.user_name),
        ("role_code", &requester.role_code),
        ("organisation_code", &requester.organisation_code),
        ("emergency_reason", &requester.emergency_reason),
        ("asserted_relationship", &requester.asserted_relationship),
    ] {
        if value.len() > MAX_FIELD {
            return Err(LookupError::MalformedRequesterField {
                field,
                why: "longer than 256 bytes",
            });
        }
        if value.chars().any(char::is_control) {
            return Err(LookupError::MalformedRequesterField {
                field,
                why: "contains control characters",
            });
        }
    }
    let purpose = match Purpose::try_from(requester.purpose) {
        Ok(Purpose::Unspecified) => Purpose::DirectCare,
        Ok(p) => p,
        Err(_) => return Err(LookupError::UnknownPurpose(requester.purpose)),
    };
    if purpose == Purpose::EmergencyAccess && requester.emergency_reason.trim().is_empty() {
        return Err(LookupError::EmergencyWithoutReason);
    }
    let require_fresh = match CacheDirective::try_from(request.cache) {
        Ok(CacheDirective::RequireFresh) => true,
        Ok(_) => false,
        Err(_) => return Err(LookupError::UnknownCacheDirective(request.cache)),
    };
    if request.via_brokers.len() > MAX_VIA_BROKERS
        || request
            .via_brokers
            .iter()
            .any(|b| b.len() > MAX_FIELD || b.chars().any(char::is_control))
    {
        return Err(LookupError::MalformedViaBrokers);
    }
    let nhs_number = NhsNumber::parse(&request.nhs_number)?;
    let sections = SectionSet::from_request(&request.sections)?;
    Ok(LookupRequest {
        request_id,
        nhs_number,
        sections,
        requester,
        purpose,
        require_fresh,
        via_brokers: request.via_brokers,
        caller_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> GetCareRecordRequest {
        GetCareRecordRequest {
            nhs_number: "943 476 5919".into(),
            requester: Some(Requester {
                user_id: "u1".into(),
                role_code: "R8000".into(),
                organisation_code: "RJ1".into(),
                ..Requester::default()
            }),
            ..GetCareRecordRequest::default()
        }
    }

    /// The reason and the field at fault, or `OK`.
    fn refusal_of(r: GetCareRecordRequest) -> (&'static str, Option<String>) {
        match check(r, "id".into(), None) {
            Ok(_) => ("OK", None),
            Err(e) => (e.reason(), e.field()),
        }
    }

    #[test]
    fn a_complete_request_passes_and_defaults_to_direct_care_and_all_sections() {
        let ok = check(valid(), "id".into(), None).expect("valid");
        assert_eq!(ok.nhs_number.as_digits(), "9434765919");
        assert_eq!(ok.purpose, Purpose::DirectCare);
        assert_eq!(ok.sections, SectionSet::ALL);
        assert!(!ok.require_fresh);
    }

    #[test]
    fn each_bad_request_gets_its_reason_and_field() {
        type Case = (
            &'static str,
            GetCareRecordRequest,
            &'static str,
            &'static str,
        );
        let mut cases: Vec<Case> = Vec::new();
        let mut r = valid();
        r.nhs_number = "9434765918".into();
        cases.push(("bad check digit", r, "INVALID_NHS_NUMBER", "nhs_number"));
        let mut r = valid();
        r.nhs_number = "".into();
        cases.push(("empty nhs", r, "INVALID_NHS_NUMBER", "nhs_number"));
        let mut r = valid();
        r.requester = None;
        cases.push(("no requester", r, "REQUESTER_MISSING", "requester"));
        for field in ["user_id", "role_code", "organisation_code"] {
            let mut r = valid();
            if let Some(q) = r.requester.as_mut() {
                match field {
                    "user_id" => q.user_id = " ".into(),
                    "role_code" => q.role_code.clear(),
                    _ => q.organisation_code.clear(),
                }
            }
            let want = match field {
                "user_id" => "requester.user_id",
                "role_code" => "requester.role_code",
                _ => "requester.organisation_code",
            };
            cases.push((
                "missing requester field",
                r,
                "REQUESTER_FIELD_MISSING",
                want,
            ));
        }
        let mut r = valid();
        if let Some(q) = r.requester.as_mut() {
            q.purpose = Purpose::EmergencyAccess as i32;
        }
        cases.push((
            "emergency without reason",
            r,
            "EMERGENCY_REASON_MISSING",
            "requester.emergency_reason",
        ));
        let mut r = valid();
        if let Some(q) = r.requester.as_mut() {
            q.purpose = 42;
        }
        cases.push(("unknown purpose", r, "UNKNOWN_PURPOSE", "requester.purpose"));
        let mut r = valid();
        r.sections = vec![1, 77];
        cases.push(("unknown section", r, "UNKNOWN_SECTION", "sections"));
        let mut r = valid();
        r.cache = 9;
        cases.push((
            "unknown cache directive",
            r,
            "UNKNOWN_CACHE_DIRECTIVE",
            "cache",
        ));
        let mut r = valid();
        if let Some(q) = r.requester.as_mut() {
            q.user_id = "x".repeat(300);
        }
        cases.push((
            "oversized field",
            r,
            "REQUESTER_FIELD_MALFORMED",
            "requester.user_id",
        ));
        let mut r = valid();
        if let Some(q) = r.requester.as_mut() {
            q.role_code = "R80\n00".into();
        }
        cases.push((
            "control character",
            r,
            "REQUESTER_FIELD_MALFORMED",
            "requester.role_code",
        ));
        let mut r = valid();
        r.via_brokers = vec!["b".into(); 17];
        cases.push((
            "federation too deep",
            r,
            "VIA_BROKERS_MALFORMED",
            "via_brokers",
        ));
        for (name, request, reason, field) in cases {
            assert_eq!(
                refusal_of(request),
                (reason, Some(field.to_owned())),
                "{name}"
            );
        }
    }
}
