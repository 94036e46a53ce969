//! The adapter conformance kit (placeholder).
