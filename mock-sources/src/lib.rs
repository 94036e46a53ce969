//! Synthetic FHIR R4 organisations (placeholder until built).
