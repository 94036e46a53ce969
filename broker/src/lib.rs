//! The carerecord broker: answers an EHR's gRPC request for a patient's care record by asking
//! every source organisation concurrently, within the caller's deadline, and merging what
//! comes back. See `ARCHITECTURE.md` for the code map and invariants.
#![forbid(unsafe_code)]

pub mod access;
pub mod affinity;
pub mod assemble;
pub mod audit;
pub mod budget;
pub mod cache;
pub mod cli;
pub mod config;
pub mod directory;
pub mod documents;
pub mod error;
pub mod fanout;
pub mod fhir_api;
pub mod flight;
pub mod lookup;
pub mod merge;
pub mod metrics;
pub mod ops;
pub mod record_response;
pub mod registry;
pub mod reload;
pub mod resilience;
pub mod routing;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod validate;
pub mod view;

/// The circuit breaker, where it has always been found.
pub use resilience::breaker;

pub use error::LookupError;
pub use lookup::{Broker, CallingSystem, LookupAnswer, LookupStream, StreamEvent};
pub mod audit_instance;
pub mod audit_store;
pub mod render;
