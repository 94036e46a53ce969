//! Errors on the FHIR face: one `OperationOutcome` with the same stable reasons as gRPC
//! (`ErrorInfo.reason` there, `issue.details.coding.code` here), and the HTTP status a FHIR
//! client expects. The one place the core's errors meet HTTP.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::token::TokenError;
use crate::access::Denial;
use crate::error::LookupError;

/// The code system of our reasons (the gRPC `ErrorInfo.domain`, as a URL).
pub const REASON_SYSTEM: &str = "https://carerecord.nhs.uk/CodeSystem/error-reason";
/// FHIR's JSON media type.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// A refusal on the FHIR face.
#[derive(Debug)]
pub struct FaceError {
    pub status: StatusCode,
    /// FHIR `issue.code` (http://hl7.org/fhir/issue-type).
    pub issue: &'static str,
    /// Our stable reason.
    pub reason: &'static str,
    pub message: String,
    /// The request field at fault, as a FHIRPath-ish expression, when one is.
    pub expression: Option<String>,
    pub retry_after: Option<Duration>,
}

impl FaceError {
    pub fn new(
        status: StatusCode,
        issue: &'static str,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        FaceError {
            status,
            issue,
            reason,
            message: message.into(),
            expression: None,
            retry_after: None,
        }
    }

    /// A malformed request body or parameter.
    pub fn bad_request(reason: &'static str, message: impl Into<String>) -> Self {
        FaceError::new(StatusCode::BAD_REQUEST, "invalid", reason, message)
    }

    pub fn at(mut self, expression: impl Into<String>) -> Self {
        self.expression = Some(expression.into());
        self
    }

    /// The OperationOutcome body.
    pub fn outcome(&self) -> Value {
        let mut issue = json!({
            "severity": "error",
            "code": self.issue,
            "details": {
                "coding": [{"system": REASON_SYSTEM, "code": self.reason, "display": self.reason}],
                "text": self.message,
            },
            "diagnostics": self.message,
        });
        if let Some(expression) = &self.expression {
            issue["expression"] = json!([expression]);
        }
        json!({"resourceType": "OperationOutcome", "issue": [issue]})
    }
}

impl IntoResponse for FaceError {
    fn into_response(self) -> Response {
        let body = self.outcome().to_string();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up: never tell a client to come back before it may.
            let secs = after.as_millis().div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                headers.insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<&LookupError> for FaceError {
    fn from(e: &LookupError) -> Self {
        let (status, issue) = match e {
            LookupError::InvalidNhsNumber(_)
            | LookupError::UnknownSection(_)
            | LookupError::MalformedRequesterField { .. }
            | LookupError::MalformedViaBrokers
            | LookupError::EmergencyWithoutReason
            | LookupError::UnknownPurpose(_)
            | LookupError::UnknownCacheDirective(_) => (StatusCode::BAD_REQUEST, "invalid"),
            LookupError::MissingRequester | LookupError::MissingRequesterField(_) => {
                (StatusCode::UNAUTHORIZED, "login")
            }
            // A relationship that could not be checked is worth retrying.
            LookupError::Denied(Denial::RelationshipUnconfirmed(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "transient")
            }
            LookupError::Denied(_) => (StatusCode::FORBIDDEN, "forbidden"),
            LookupError::Loop(_) => (StatusCode::CONFLICT, "conflict"),
            LookupError::Deadline(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            LookupError::Overloaded { .. } => (StatusCode::TOO_MANY_REQUESTS, "throttled"),
            LookupError::ShuttingDown | LookupError::AuditUnavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "transient")
            }
            LookupError::DocumentNotFound => (StatusCode::NOT_FOUND, "not-found"),
            LookupError::DocumentUnavailable(_) => (StatusCode::BAD_GATEWAY, "transient"),
        };
        FaceError {
            status,
            issue,
            reason: e.reason(),
            message: e.to_string(),
            // The gRPC field names, as the token claims and parameters that carry them.
            expression: e.field().map(|f| match f.as_str() {
                "nhs_number" => "Parameters.parameter.where(name='patientNHSNumber')".to_owned(),
                "requester.user_id" => "token.sub".to_owned(),
                "requester.role_code" => "token.role".to_owned(),
                "requester.organisation_code" => "token.organisation".to_owned(),
                "requester.emergency_reason" => "token.emergency_reason".to_owned(),
                "requester.purpose" => "token.purpose".to_owned(),
                other => other.to_owned(),
            }),
            retry_after: e.retry_after(),
        }
    }
}

impl From<&TokenError> for FaceError {
    fn from(e: &TokenError) -> Self {
        FaceError::new(StatusCode::UNAUTHORIZED, "login", e.reason(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use carerecord_adapters::NhsNumber;

    fn reason_of(v: &Value) -> &str {
        v["issue"][0]["details"]["coding"][0]["code"]
            .as_str()
            .unwrap_or("")
    }

    #[test]
    fn core_errors_keep_their_grpc_reasons_with_http_statuses() {
        let bad = NhsNumber::parse("1234567890").expect_err("bad check digit");
        let cases: Vec<(LookupError, StatusCode, &str)> = vec![
            (bad.into(), StatusCode::BAD_REQUEST, "INVALID_NHS_NUMBER"),
            (
                LookupError::MissingRequesterField("role_code"),
                StatusCode::UNAUTHORIZED,
                "REQUESTER_FIELD_MISSING",
            ),
            (
                LookupError::Denied(Denial::Role("R0001".into())),
                StatusCode::FORBIDDEN,
                "ROLE_NOT_PERMITTED",
            ),
            (
                LookupError::Denied(Denial::UnknownSystem),
                StatusCode::FORBIDDEN,
                "UNKNOWN_CALLING_SYSTEM",
            ),
            (
                LookupError::Overloaded {
                    limit: 48,
                    retry_after: Duration::from_millis(250),
                },
                StatusCode::TOO_MANY_REQUESTS,
                "OVERLOADED",
            ),
            (
                LookupError::AuditUnavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                "AUDIT_UNAVAILABLE",
            ),
            (
                LookupError::ShuttingDown,
                StatusCode::SERVICE_UNAVAILABLE,
                "SHUTTING_DOWN",
            ),
        ];
        for (error, status, reason) in cases {
            let face = FaceError::from(&error);
            assert_eq!(face.status, status, "{reason}");
            let body = face.outcome();
            assert_eq!(body["resourceType"], "OperationOutcome");
            assert_eq!(reason_of(&body), reason);
            assert_eq!(
                body["issue"][0]["details"]["coding"][0]["system"],
                REASON_SYSTEM
            );
        }
    }

    #[test]
    fn overload_says_when_to_come_back_in_whole_seconds() {
        let e = LookupError::Overloaded {
            limit: 48,
            retry_after: Duration::from_millis(250),
        };
        let response = FaceError::from(&e).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(response.headers()[header::CONTENT_TYPE], FHIR_JSON);
    }

    #[test]
    fn token_problems_are_401_with_a_bearer_challenge() {
        let response = FaceError::from(&TokenError::Expired).into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
