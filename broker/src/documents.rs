//! Documents through the broker: the record carries broker-relative references
//! (`Binary/{id}`), never a source's internal URL, so retrieving a document goes through the
//! broker's access decision and audit like any lookup (in the manner of IHE XCA Retrieve).
//!
//! The id is a keyed hash (HMAC-SHA-256 under a key made at startup) of the source, the patient
//! and the source's URL: unforgeable, and nothing can be read out of it. It is 40 hex digits, a
//! valid FHIR id. The broker remembers what each id stands for while it is in use (an hour since
//! last use, up to 200,000 documents) — far longer than a record is cached, so a record's ids stay
//! valid; after a restart (or a long pause) the client fetches the record again. The same
//! document always gets the same id. A region of several brokers routes a patient to one broker
//! (see OPERATIONS.md).

use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::NhsNumber;
use carerecord_proto::CareRecord;
use carerecord_proto::entry::Detail;
use ring::hmac;
use ring::rand::SystemRandom;

/// The largest document streamed through the broker unless configured otherwise.
pub const DEFAULT_MAX_DOCUMENT_BYTES: u64 = 20 * 1024 * 1024;

/// The prefix of a broker-relative document reference.
pub const PREFIX: &str = "Binary/";

/// How long an id is remembered since it was last used, and how many are.
const REMEMBERED_FOR: Duration = Duration::from_secs(3600);
const REMEMBERED: u64 = 200_000;

/// Issues and resolves document ids.
pub struct DocumentIds {
    key: hmac::Key,
    issued: moka::sync::Cache<String, Arc<DocumentRef>>,
}

/// What a document id stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentRef {
    pub source_id: String,
    pub nhs_number: NhsNumber,
    /// The source's own URL for the content.
    pub url: String,
}

impl DocumentIds {
    /// A fresh key from the system's random source.
    pub fn new() -> DocumentIds {
        let rng = SystemRandom::new();
        // The system RNG failing is not something to carry on from.
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .unwrap_or_else(|_| panic!("the system random number generator failed"));
        DocumentIds {
            key,
            issued: moka::sync::Cache::builder()
                .max_capacity(REMEMBERED)
                .time_to_idle(REMEMBERED_FOR)
                .build(),
        }
    }

    /// The id for a document, remembered from now on.
    pub fn seal(&self, source_id: &str, nhs_number: NhsNumber, url: &str) -> String {
        let plain = format!("{source_id}\n{}\n{url}", nhs_number.as_digits());
        let tag = hmac::sign(&self.key, plain.as_bytes());
        let id: String = tag.as_ref()[..20]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.issued.insert(
            id.clone(),
            Arc::new(DocumentRef {
                source_id: source_id.to_owned(),
                nhs_number,
                url: url.to_owned(),
            }),
        );
        id
    }

    /// What an id stands for; `None` for anything this broker did not issue (or has forgotten).
    pub fn open(&self, id: &str) -> Option<DocumentRef> {
        if id.len() != 40 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        self.issued.get(id).map(|r| (*r).clone())
    }

    /// Replaces every document URL in one source's record by its broker-relative reference.
    pub fn rewrite(&self, record: &mut CareRecord, source_id: &str, nhs_number: NhsNumber) {
        for entry in &mut record.documents {
            if let Some(Detail::Document(d)) = entry.detail.as_mut()
                && !d.url.is_empty()
            {
                d.url = format!("{PREFIX}{}", self.seal(source_id, nhs_number, &d.url));
            }
        }
    }
}

impl Default for DocumentIds {
    fn default() -> Self {
        DocumentIds::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nhs() -> NhsNumber {
        NhsNumber::parse("9434765919").expect("valid")
    }

    #[test]
    fn an_id_opens_to_what_was_sealed_and_nothing_readable_is_in_it() {
        let ids = DocumentIds::new();
        let url = "https://trust.example/fhir/Binary/letter-1";
        let id = ids.seal("hospital", nhs(), url);
        assert!(!id.contains("9434765919") && !id.contains("trust.example"));
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(
            ids.open(&id),
            Some(DocumentRef {
                source_id: "hospital".into(),
                nhs_number: nhs(),
                url: url.into()
            })
        );
        assert_eq!(
            ids.seal("hospital", nhs(), url),
            id,
            "the same document, the same id"
        );
        assert_ne!(ids.seal("gp", nhs(), url), id);
    }

    #[test]
    fn forged_altered_or_foreign_ids_open_to_nothing() {
        let ids = DocumentIds::new();
        let id = ids.seal("hospital", nhs(), "Binary/1");
        let mut altered = id.clone().into_bytes();
        let last = altered.len() - 1;
        altered[last] = if altered[last] == b'a' { b'b' } else { b'a' };
        assert_eq!(ids.open(&String::from_utf8(altered).expect("ascii")), None);
        assert_eq!(DocumentIds::new().open(&id), None, "another broker's key");
        assert_eq!(ids.open("letter-1"), None);
        assert_eq!(ids.open(""), None);
        assert_eq!(ids.open("!!!"), None);
    }
}
