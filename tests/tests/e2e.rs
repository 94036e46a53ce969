//! End-to-end tests: one binary (linking is the slow part of a test build), one module per
//! capability.

mod e2e {
    pub mod access;
    pub mod audit_store;
    pub mod errors;
    pub mod federation;
    pub mod fhir;
    pub mod foundation;
    pub mod overload;
    pub mod pipeline;
    pub mod region;
    pub mod region_scale;
    pub mod resilience;
    pub mod routing;
    pub mod safety;
    pub mod source_protocol;
    pub mod view;
    pub mod view_browser;
}
