//! A lookup answer as a FHIR R4 `collection` Bundle (filled in by the FHIR face work).
