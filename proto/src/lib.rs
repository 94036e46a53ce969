//! The `carerecord.v1` contract: generated message types, client and server.
//!
//! The `.proto` file beside this crate is the API reference for EHR integrators; this crate only
//! adds a few conveniences that every other crate needs.
#![forbid(unsafe_code)]

/// Generated code for package `carerecord.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("carerecord.v1");
    include!(concat!(env!("OUT_DIR"), "/carerecord.v1.serde.rs"));

    /// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/carerecord_descriptor.bin"));
}

/// Generated code for package `carerecord.source.v1`: the source protocol an organisation's
/// server implements in any language (`proto/carerecord/source/v1/source.proto`), and the client
/// the broker's `[sources.grpc]` adapter uses.
pub mod source {
    /// `carerecord.source.v1`.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("carerecord.source.v1");
        include!(concat!(env!("OUT_DIR"), "/carerecord.source.v1.serde.rs"));

        /// The protocol name a server reports in `DescribeResponse.protocol`.
        pub const PROTOCOL: &str = "carerecord.source.v1";
    }
}

pub use v1::*;

impl Section {
    /// Every real section, in the order the record lists them.
    pub const ALL: [Section; 8] = [
        Section::Conditions,
        Section::Medications,
        Section::Allergies,
        Section::TestResults,
        Section::CarePlans,
        Section::Documents,
        Section::Encounters,
        Section::Appointments,
    ];

    /// A short lower-case name, used in config, logs, audit and the CLI.
    pub fn short_name(self) -> &'static str {
        match self {
            Section::Unspecified => "unspecified",
            Section::Conditions => "conditions",
            Section::Medications => "medications",
            Section::Allergies => "allergies",
            Section::TestResults => "test_results",
            Section::CarePlans => "care_plans",
            Section::Documents => "documents",
            Section::Encounters => "encounters",
            Section::Appointments => "appointments",
        }
    }

    /// The section's title as a clinician reads it ("Test results").
    pub fn title(self) -> &'static str {
        match self {
            Section::Unspecified => "Other",
            Section::Conditions => "Conditions",
            Section::Medications => "Medications",
            Section::Allergies => "Allergies",
            Section::TestResults => "Test results",
            Section::CarePlans => "Care plans",
            Section::Documents => "Documents",
            Section::Encounters => "Encounters",
            Section::Appointments => "Appointments",
        }
    }

    /// Parses [`Section::short_name`] (also accepts hyphens).
    pub fn from_short_name(name: &str) -> Option<Section> {
        let name = name.trim().to_ascii_lowercase().replace('-', "_");
        Section::ALL.into_iter().find(|s| s.short_name() == name)
    }
}

impl SourceOutcome {
    /// The outcome as the contract names it, without the enum prefix (`OK`, `NOT_FOUND`,
    /// `WRONG_PATIENT`, ...), and lower-cased for metric labels. One table, so the terminal
    /// view, the audit trail and the metrics can never spell an outcome differently.
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            SourceOutcome::Unspecified => ("UNKNOWN", "unknown"),
            SourceOutcome::Ok => ("OK", "ok"),
            SourceOutcome::NotFound => ("NOT_FOUND", "not_found"),
            SourceOutcome::Timeout => ("TIMEOUT", "timeout"),
            SourceOutcome::Error => ("ERROR", "error"),
            SourceOutcome::Unavailable => ("UNAVAILABLE", "unavailable"),
            SourceOutcome::CircuitOpen => ("CIRCUIT_OPEN", "circuit_open"),
            SourceOutcome::Refused => ("REFUSED", "refused"),
            SourceOutcome::Partial => ("PARTIAL", "partial"),
            SourceOutcome::WrongPatient => ("WRONG_PATIENT", "wrong_patient"),
        }
    }

    /// The upper-case label of a wire value; `UNKNOWN` for unset or unknown values.
    pub fn label_of(outcome: i32) -> &'static str {
        SourceOutcome::try_from(outcome)
            .unwrap_or(SourceOutcome::Unspecified)
            .labels()
            .0
    }
}

impl CareRecord {
    /// The entries of one section.
    pub fn section(&self, section: Section) -> &[Entry] {
        match section {
            Section::Unspecified => &[],
            Section::Conditions => &self.conditions,
            Section::Medications => &self.medications,
            Section::Allergies => &self.allergies,
            Section::TestResults => &self.test_results,
            Section::CarePlans => &self.care_plans,
            Section::Documents => &self.documents,
            Section::Encounters => &self.encounters,
            Section::Appointments => &self.appointments,
        }
    }

    /// The entries of one section, mutably. `Unspecified` has no entries and yields `None`.
    pub fn section_mut(&mut self, section: Section) -> Option<&mut Vec<Entry>> {
        Some(match section {
            Section::Unspecified => return None,
            Section::Conditions => &mut self.conditions,
            Section::Medications => &mut self.medications,
            Section::Allergies => &mut self.allergies,
            Section::TestResults => &mut self.test_results,
            Section::CarePlans => &mut self.care_plans,
            Section::Documents => &mut self.documents,
            Section::Encounters => &mut self.encounters,
            Section::Appointments => &mut self.appointments,
        })
    }

    /// Number of entries across all sections.
    pub fn entry_count(&self) -> usize {
        Section::ALL.iter().map(|s| self.section(*s).len()).sum()
    }
}
