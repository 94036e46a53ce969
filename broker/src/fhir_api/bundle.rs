//! A lookup answer as a FHIR R4 `collection` Bundle (stub until the mapping lands).

use crate::lookup::LookupAnswer;

/// What the caller asked for, from the GP Connect-style Parameters.
#[derive(Debug, Clone, Default)]
pub struct BundleOptions {
    pub base_url: String,
    pub include_resolved_allergies: bool,
    pub medications_from: Option<String>,
    pub sections: Vec<carerecord_proto::Section>,
}

pub fn structured_record(answer: &LookupAnswer, _options: &BundleOptions) -> serde_json::Value {
    serde_json::json!({"resourceType": "Bundle", "type": "collection", "id": answer.request_id})
}
