//! Whole-request failures: the one error type a lookup can end with.
//!
//! Partial failure is not here: a source that fails is an outcome in the answer. These are the
//! failures that stop a whole lookup — bad input, an unidentified or refused requester, an
//! overloaded or draining broker, an audit trail that cannot be written, a federation loop, a
//! deadline too short to ask anyone. Each carries a stable, machine-readable [`reason`]
//! (SCREAMING_SNAKE, documented in the service comment of `carerecord.proto`): callers branch on
//! the reason, never on the message, so messages may be reworded and reasons may not.
//!
//! The core knows no transport: faces map this type to their own status model once (the gRPC
//! face in `service.rs`, with `google.rpc.ErrorInfo`, `BadRequest` and `RetryInfo`).
//!
//! [`reason`]: LookupError::reason

use std::time::Duration;

use carerecord_adapters::{NhsNumberError, UnknownSection};

use crate::access::Denial;
use crate::budget::BudgetError;

/// The `ErrorInfo.domain` of every reason below: reasons are unique within it.
pub const ERROR_DOMAIN: &str = "carerecord.nhs.uk";

/// Why a whole lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("nhs_number: {0}")]
    InvalidNhsNumber(#[from] NhsNumberError),
    #[error("sections: {0}")]
    UnknownSection(#[from] UnknownSection),
    #[error(
        "requester is missing: every request must say who is asking (user_id, role_code, organisation_code)"
    )]
    MissingRequester,
    #[error("requester.{0} is missing")]
    MissingRequesterField(&'static str),
    #[error("requester.{field} is malformed: {why}")]
    MalformedRequesterField {
        field: &'static str,
        why: &'static str,
    },
    #[error("via_brokers is malformed: too many brokers, or a malformed broker id")]
    MalformedViaBrokers,
    #[error("emergency access requires requester.emergency_reason")]
    EmergencyWithoutReason,
    #[error("unknown purpose {0}")]
    UnknownPurpose(i32),
    #[error("unknown cache directive {0}")]
    UnknownCacheDirective(i32),
    /// The requester or the calling system is refused (audited where it happens).
    #[error(transparent)]
    Denied(#[from] Denial),
    #[error("lookup loop: this broker ({0}) has already handled this lookup")]
    Loop(String),
    #[error(transparent)]
    Deadline(#[from] BudgetError),
    /// Shed at the door instead of queued: the broker is at capacity.
    #[error("the broker is at capacity ({limit} lookups in flight); retry after {} ms", retry_after.as_millis())]
    Overloaded { limit: usize, retry_after: Duration },
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// Fail closed: nothing is disclosed unless the access was written to the audit trail.
    #[error("the audit trail cannot be written, so the record is not disclosed; try again shortly")]
    AuditUnavailable,
    /// Not an id this broker issued, or not in the record this requester may see.
    #[error("no such document in the record you may see")]
    DocumentNotFound,
    /// The organisation holding the document did not serve it.
    #[error("the organisation holding the document did not serve it: {0}")]
    DocumentUnavailable(String),
}

impl LookupError {
    /// The stable reason: what a caller branches on.
    pub fn reason(&self) -> &'static str {
        match self {
            LookupError::InvalidNhsNumber(_) => "INVALID_NHS_NUMBER",
            LookupError::UnknownSection(_) => "UNKNOWN_SECTION",
            LookupError::MissingRequester => "REQUESTER_MISSING",
            LookupError::MissingRequesterField(_) => "REQUESTER_FIELD_MISSING",
            LookupError::MalformedRequesterField { .. } => "REQUESTER_FIELD_MALFORMED",
            LookupError::MalformedViaBrokers => "VIA_BROKERS_MALFORMED",
            LookupError::EmergencyWithoutReason => "EMERGENCY_REASON_MISSING",
            LookupError::UnknownPurpose(_) => "UNKNOWN_PURPOSE",
            LookupError::UnknownCacheDirective(_) => "UNKNOWN_CACHE_DIRECTIVE",
            LookupError::Denied(denial) => match denial {
                Denial::Role(_) => "ROLE_NOT_PERMITTED",
                Denial::EmergencyRole(_) => "EMERGENCY_ROLE_NOT_PERMITTED",
                Denial::NoRelationship(_) => "NO_LEGITIMATE_RELATIONSHIP",
                Denial::UnknownSystem => "UNKNOWN_CALLING_SYSTEM",
                Denial::RelationshipUnconfirmed(_) => "RELATIONSHIP_UNCONFIRMED",
            },
            LookupError::Loop(_) => "FEDERATION_LOOP",
            LookupError::Deadline(_) => "DEADLINE_TOO_SHORT",
            LookupError::Overloaded { .. } => "OVERLOADED",
            LookupError::ShuttingDown => "SHUTTING_DOWN",
            LookupError::AuditUnavailable => "AUDIT_UNAVAILABLE",
            LookupError::DocumentNotFound => "DOCUMENT_NOT_FOUND",
            LookupError::DocumentUnavailable(_) => "DOCUMENT_UNAVAILABLE",
        }
    }

    /// The request field at fault, as a dotted path into `GetCareRecordRequest`, when one is.
    pub fn field(&self) -> Option<String> {
        Some(match self {
            LookupError::InvalidNhsNumber(_) => "nhs_number".to_owned(),
            LookupError::UnknownSection(_) => "sections".to_owned(),
            LookupError::MissingRequester => "requester".to_owned(),
            LookupError::MissingRequesterField(field)
            | LookupError::MalformedRequesterField { field, .. } => format!("requester.{field}"),
            LookupError::MalformedViaBrokers => "via_brokers".to_owned(),
            LookupError::EmergencyWithoutReason => "requester.emergency_reason".to_owned(),
            LookupError::UnknownPurpose(_) => "requester.purpose".to_owned(),
            LookupError::UnknownCacheDirective(_) => "cache".to_owned(),
            LookupError::Denied(Denial::Role(_) | Denial::EmergencyRole(_)) => {
                "requester.role_code".to_owned()
            }
            _ => return None,
        })
    }

    /// How long the caller should wait before trying again, when waiting is the remedy.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LookupError::Overloaded { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Label for the `carerecord_lookups_total{outcome}` metric.
    pub fn metric_outcome(&self) -> &'static str {
        match self {
            LookupError::Denied(Denial::RelationshipUnconfirmed(_))
            | LookupError::AuditUnavailable
            | LookupError::ShuttingDown => "unavailable",
            LookupError::Denied(_) | LookupError::DocumentNotFound => "denied",
            LookupError::DocumentUnavailable(_) => "unavailable",
            LookupError::Overloaded { .. } => "shed",
            _ => "invalid",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_unique_screaming_snake() {
        let all = [
            LookupError::InvalidNhsNumber(NhsNumberError::Empty),
            LookupError::MissingRequester,
            LookupError::MissingRequesterField("user_id"),
            LookupError::MalformedRequesterField {
                field: "role_code",
                why: "x",
            },
            LookupError::MalformedViaBrokers,
            LookupError::EmergencyWithoutReason,
            LookupError::UnknownPurpose(9),
            LookupError::UnknownCacheDirective(9),
            LookupError::Denied(Denial::Role("x".into())),
            LookupError::Denied(Denial::EmergencyRole("x".into())),
            LookupError::Denied(Denial::NoRelationship("x".into())),
            LookupError::Denied(Denial::UnknownSystem),
            LookupError::Denied(Denial::RelationshipUnconfirmed("x".into())),
            LookupError::Loop("b".into()),
            LookupError::Deadline(BudgetError::TooShort(Duration::ZERO)),
            LookupError::Overloaded {
                limit: 1,
                retry_after: Duration::from_secs(1),
            },
            LookupError::ShuttingDown,
            LookupError::AuditUnavailable,
            LookupError::DocumentNotFound,
            LookupError::DocumentUnavailable("x".into()),
        ];
        let mut seen = std::collections::HashSet::new();
        for e in &all {
            let r = e.reason();
            assert!(
                r.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') && r.len() <= 63,
                "{r}"
            );
            assert!(seen.insert(r), "duplicate reason {r}");
        }
    }
}
