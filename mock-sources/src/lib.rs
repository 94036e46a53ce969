//! Synthetic NHS organisations serving FHIR R4 (UK Core shapes) over real HTTP on loopback.
//!
//! Why this exists: the broker's hard problems (partial success, deadlines, slow and broken
//! sources, duplicate facts from several organisations, demographics that disagree) only show up
//! against many independent sources speaking real HTTP. This crate stands a whole region up on
//! one machine, deterministically from a seed, with per-organisation latency and faults that can
//! be switched at runtime, for `carerecord demo`, end-to-end tests and ops rehearsal.
//!
//! - [`Region`]: the generated population ([`population`]); records are built lazily (`record`).
//! - [`RegionServer`]: one HTTP server per organisation plus an admin server
//!   ([`RegionServer::start_with`]), or every organisation on one port routed by path
//!   (`/org/{code}/fhir`, [`RegionServer::start_shared`]); either way with the region's record
//!   locator ([`RegionServer::locator_url`]) and the directory and routed broker config a
//!   broker needs at scale ([`RegionServer::write_directory`],
//!   [`RegionServer::broker_config_toml_routed`]).
//! - [`FaultControl`]: latency and faults per organisation, the same as the admin API.
#![forbid(unsafe_code)]

pub mod admin;
mod api;
pub mod broker_config;
mod calendar;
pub mod codes;
pub mod faults;
pub mod fhir;
pub mod latency;
mod locator;
mod names;
pub mod nhs;
pub mod population;
mod prng;
mod record;
pub mod server;

pub use broker_config::DirectoryRow;
pub use broker_config::FhirMode;
pub use faults::{DataMode, Fault, FaultControl, LOCATOR, OrgStats, UnknownOrganisation};
pub use latency::LatencyProfile;
pub use nhs::NhsNumber;
pub use population::{
    ClinicalConflict, ClinicalConflictKind, ConflictField, DemographicConflict, OrgKind,
    Organisation, PatientSummary, Region, RegionSpec,
};
pub use server::{RegionServer, RunningOrganisation, ServerOptions};
