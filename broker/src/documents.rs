//! Documents through the broker: the record carries broker-relative references
//! (`Binary/{id}`), never a source's internal URL, so retrieving a document goes through the
//! broker's access decision and audit like any lookup (in the manner of IHE XCA Retrieve).
//!
//! The id is the source, the patient and the source's URL, sealed (ChaCha20-Poly1305, `ring`)
//! under a key the broker holds: nobody can forge one, read the URL or the NHS number out of
//! it, or point it at another patient's record. The nonce is derived from the content (HMAC),
//! so the same document always gets the same id and a cached record's ids stay valid. The key
//! is made at startup: ids last as long as the process (a region of several brokers behind a
//! load balancer routes a patient to one broker; see OPERATIONS.md).

use carerecord_adapters::NhsNumber;
use carerecord_proto::CareRecord;
use carerecord_proto::entry::Detail;
use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::fhir_api::token::base64url_encode;

/// The largest document streamed through the broker unless configured otherwise.
pub const DEFAULT_MAX_DOCUMENT_BYTES: u64 = 20 * 1024 * 1024;

/// The prefix of a broker-relative document reference.
pub const PREFIX: &str = "Binary/";

/// Seals and opens document ids.
pub struct DocumentIds {
    key: LessSafeKey,
    nonces: hmac::Key,
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
    /// Fresh keys from the system's random source.
    pub fn new() -> DocumentIds {
        let rng = SystemRandom::new();
        let mut key = [0u8; 32];
        let mut mac = [0u8; 32];
        // The system RNG failing is not something to carry on from.
        if rng.fill(&mut key).is_err() || rng.fill(&mut mac).is_err() {
            panic!("the system random number generator failed");
        }
        DocumentIds::from_keys(key, mac)
    }

    fn from_keys(key: [u8; 32], mac: [u8; 32]) -> DocumentIds {
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key);
        DocumentIds {
            key: LessSafeKey::new(unbound.unwrap_or_else(|_| unreachable!("32-byte key"))),
            nonces: hmac::Key::new(hmac::HMAC_SHA256, &mac),
        }
    }

    /// The id for a document.
    pub fn seal(&self, source_id: &str, nhs_number: NhsNumber, url: &str) -> String {
        let plain = format!("{source_id}\n{}\n{url}", nhs_number.as_digits());
        let tag = hmac::sign(&self.nonces, plain.as_bytes());
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&tag.as_ref()[..12]);
        let mut sealed = plain.into_bytes();
        if self
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut sealed,
            )
            .is_err()
        {
            // Only for inputs of ~256 GiB.
            return String::new();
        }
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        base64url_encode(&out)
    }

    /// What an id stands for; `None` for anything not sealed by this broker.
    pub fn open(&self, id: &str) -> Option<DocumentRef> {
        if id.len() > 4096 {
            return None;
        }
        let bytes = crate::fhir_api::token::base64url_decode(id)?;
        if bytes.len() < 12 + aead::MAX_TAG_LEN {
            return None;
        }
        let (nonce, sealed) = bytes.split_at(12);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut sealed = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::empty(), &mut sealed)
            .ok()?;
        let text = std::str::from_utf8(plain).ok()?;
        let mut parts = text.splitn(3, '\n');
        let source_id = parts.next()?.to_owned();
        let nhs_number = NhsNumber::parse(parts.next()?).ok()?;
        let url = parts.next()?.to_owned();
        Some(DocumentRef {
            source_id,
            nhs_number,
            url,
        })
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
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(ids.open(&String::from_utf8(altered).expect("ascii")), None);
        assert_eq!(DocumentIds::new().open(&id), None, "another broker's key");
        assert_eq!(ids.open("letter-1"), None);
        assert_eq!(ids.open(""), None);
        assert_eq!(ids.open("!!!"), None);
    }
}
