//! Broker ↔ FHIR adapter ↔ mock-sources over real HTTP (placeholder).
