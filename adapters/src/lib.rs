//! Sources of care record data for the carerecord broker.
//!
//! - [`Source`]: the trait every adapter implements (see `ADAPTERS.md`).
//! - [`grpc::GrpcSource`]: any organisation's server speaking the source protocol
//!   (`carerecord.source.v1`), in any language.
//! - [`memory::InMemorySource`]: fixed data with configurable delay and failure.
//! - [`http::client_builder`]: an HTTP client for adapters that needs no process-wide rustls
//!   provider (a plain `reqwest::Client::new()` panics without one).
//! - [`NhsNumber`] and [`SectionSet`]: the request vocabulary sources receive.
#![forbid(unsafe_code)]

pub mod calendar;
pub mod federation;
pub mod fhir;
pub mod grpc;
pub mod http;
pub mod locator;
pub mod memory;
mod nhs;
pub mod protocol_server;
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
