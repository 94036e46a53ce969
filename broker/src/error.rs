//! Whole-request failures and their gRPC status codes.
//!
//! Partial failure is not here: a source that fails is an outcome in the response. These are the
//! errors that stop a lookup before any source is asked, and each maps to one stable code.

use carerecord_adapters::{NhsNumberError, UnknownSection};
use tonic::{Code, Status};

use crate::budget::BudgetError;

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
    #[error("emergency access requires requester.emergency_reason")]
    EmergencyWithoutReason,
    #[error("unknown purpose {0}")]
    UnknownPurpose(i32),
    #[error("unknown cache directive {0}")]
    UnknownCacheDirective(i32),
    #[error("lookup loop: this broker ({0}) has already handled this lookup")]
    Loop(String),
    #[error(transparent)]
    Deadline(#[from] BudgetError),
    #[error("the broker is shutting down")]
    ShuttingDown,
}

impl LookupError {
    pub fn code(&self) -> Code {
        match self {
            LookupError::InvalidNhsNumber(_)
            | LookupError::UnknownSection(_)
            | LookupError::MalformedRequesterField { .. }
            | LookupError::EmergencyWithoutReason
            | LookupError::UnknownPurpose(_)
            | LookupError::UnknownCacheDirective(_) => Code::InvalidArgument,
            LookupError::MissingRequester | LookupError::MissingRequesterField(_) => {
                Code::Unauthenticated
            }
            LookupError::Loop(_) => Code::FailedPrecondition,
            LookupError::Deadline(_) => Code::DeadlineExceeded,
            LookupError::ShuttingDown => Code::Unavailable,
        }
    }
}

impl From<LookupError> for Status {
    fn from(e: LookupError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}
