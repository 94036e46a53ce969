//! Sources of care record data for the carerecord broker.
//!
//! - [`Source`]: the trait every adapter implements (see `ADAPTERS.md`).
//! - [`memory::InMemorySource`]: fixed data with configurable delay and failure.
//! - [`NhsNumber`] and [`SectionSet`]: the request vocabulary sources receive.
#![forbid(unsafe_code)]

pub mod calendar;
pub mod federation;
pub mod fhir;
pub mod locator;
pub mod memory;
mod nhs;
mod sections;
mod source;
pub mod testkit;
pub mod trace;

pub use nhs::{NhsNumber, NhsNumberError};
pub use sections::{SectionSet, UnknownSection};
pub use source::{
    Document, DocumentRequest, Shortfall, Source, SourceError, SourceInfo, SourceRecord,
    SourceReply, SourceRequest,
};

/// Re-exported so adapter authors implement [`Source`] without another dependency.
pub use async_trait::async_trait;

/// The generated contract types, re-exported so adapter authors need one dependency.
pub use carerecord_proto as proto;
