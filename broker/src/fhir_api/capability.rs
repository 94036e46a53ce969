//! The CapabilityStatement of the FHIR face (stub until the mapping lands).

pub fn capability_statement(base_url: &str, software_version: &str) -> serde_json::Value {
    serde_json::json!({"resourceType": "CapabilityStatement", "implementation": {"url": base_url}, "software": {"version": software_version}})
}
