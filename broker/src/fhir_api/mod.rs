//! The FHIR R4 face: UK Core-shaped resources over HTTP/JSON, on the same core as gRPC.
//!
//! Code map: `bundle` (a lookup answer as a GP Connect-style `collection` Bundle),
//! `capability` (the CapabilityStatement describing exactly this face).

pub mod bundle;
pub mod capability;
pub mod token;
