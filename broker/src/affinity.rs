//! The patient-affinity key a client puts on each lookup so a load balancer sends one patient's
//! lookups to one broker (its cache and single flight), without the NHS number in any header a
//! proxy logs or hashes.
//!
//! The key is an HMAC-SHA256 of the NHS number's ten digits under a secret shared by the region's
//! clients, truncated to 128 bits and hex encoded. Unkeyed, a hash of a ten-digit number is
//! reversed by trying them all; keyed, it says nothing to whoever reads proxy logs.

use ring::hmac;

/// The header nginx (or any L7 balancer) hashes on; see OPERATIONS.md, Scale out.
pub const HEADER: &str = "x-carerecord-affinity";

/// The affinity key for `nhs_number` (as typed: spaces and hyphens are dropped, so "943 476
/// 5919" and "9434765919" meet the same broker) under the region's `secret`.
pub fn key(secret: &[u8], nhs_number: &str) -> String {
    let digits: String = nhs_number.chars().filter(char::is_ascii_digit).collect();
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, secret),
        digits.as_bytes(),
    );
    tag.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_stable_per_patient_and_reveals_no_digits() {
        let a = key(b"region secret", "9434765919");
        assert_eq!(a, key(b"region secret", "9434765919"));
        assert_eq!(a.len(), 32);
        assert!(!a.contains("9434765919"));
        assert_ne!(a, key(b"region secret", "9434765870"), "another patient");
        assert_ne!(a, key(b"another secret", "9434765919"), "another region");
        assert_eq!(a, key(b"region secret", "943 476-5919"), "as typed");
    }

    #[test]
    fn the_key_matches_hmac_sha256_as_other_languages_compute_it() {
        // Python: hmac.new(b"key", b"9434765919", hashlib.sha256).hexdigest()[:32]
        assert_eq!(
            key(b"key", "9434765919"),
            "2ce2f6cf75848afb7ed0e35345e511b8"
        );
    }
}
