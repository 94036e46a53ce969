//! The CapabilityStatement of the FHIR face (filled in by the FHIR face work).
