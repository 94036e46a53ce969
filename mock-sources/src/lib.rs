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
//! - [`FaultControl`]: latency, faults and data modes per organisation, the same as the admin
//!   API (`admin` module docs list its endpoints).
//!
//! Clinical safety (what a merged record must not get wrong) has its own modes, switchable at
//! runtime per organisation or for `all`:
//! - faults [`Fault::WrongPatient`] (every answer about the patient is another person's
//!   record, `$everything`'s Patient included; [`Region::wrong_patient_at`] says whose),
//!   [`Fault::WrongPatientRefs`] (another person's resources mixed into the right record) and
//!   [`Fault::IgnoreInclude`] (no `_include`, drugs only by `GET Medication/{id}`);
//! - data mode [`DataMode::Conflicts`]: the GP and another organisation disagree on a shared
//!   fact for the patients [`Region::patients_with_clinical_conflicts`] lists
//!   ([`PatientSummary::clinical_conflict`] says what and where).
//!
//! The data itself has the variety real servers send, deterministically: verification
//! statuses (provisional, unconfirmed, differential, refuted, rarely entered in error), "no
//! known allergy" (SNOMED CT 716186003) at some GP practices, Read v2 or ICD-10 codings beside
//! SNOMED CT, `meta.security` labels on sensitive entries, reaction severities, repeat
//! medicines as an authorisation (`intent` plan) with dated issues (`order`), and drugs named
//! inline, by a contained Medication or by `Medication/{id}` (`_include`d on request, carried
//! by `$everything` on the page that references it).
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
