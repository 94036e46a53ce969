//! Who is asking, on the FHIR face: a JSON Web Token the calling system signs for the person at
//! the keyboard, in the manner of GP Connect's access token but signed.
//!
//! Verified with `ring` (already the broker's crypto): ES256 (ECDSA P-256) or EdDSA (Ed25519),
//! the algorithm fixed by the calling system's configured key — the token's `alg` must match it,
//! so `none`, HMAC and algorithm confusion are refused by construction. Required claims: `iss`
//! (the calling system's id), `aud` (this face), `exp`, `iat`, `sub` (user), `role`,
//! `organisation`; optional `name`, `purpose` (`direct_care` | `emergency_access`),
//! `emergency_reason`, `relationship`, `nbf`. A token may live at most `max_lifetime`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use carerecord_proto::{Purpose, Requester};
use ring::signature::{ECDSA_P256_SHA256_FIXED, ED25519, UnparsedPublicKey};
use serde::Deserialize;

/// Clock skew tolerated between the calling system and the broker.
const LEEWAY: Duration = Duration::from_secs(30);
/// Longest token accepted at all (bytes): a requester's claims are small.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Why a token was refused. The text goes back to the caller in an OperationOutcome: it never
/// repeats the token or its claims.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no bearer token: send 'Authorization: Bearer <JWT>' signed by the calling system")]
    Missing,
    #[error("the bearer token is not a well-formed JWT ({0})")]
    Malformed(&'static str),
    #[error(
        "the token's algorithm is not the one configured for this calling system ({0} expected)"
    )]
    WrongAlgorithm(&'static str),
    #[error("the token's signature does not verify against this calling system's key")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token lives longer than {0} seconds: ask for a shorter-lived token")]
    TooLong(u64),
    #[error("the token is for another audience")]
    WrongAudience,
    #[error("the token was issued by another system than the one calling")]
    WrongIssuer,
    #[error("no token key is configured for this calling system")]
    NoKey,
}

impl TokenError {
    /// The stable reason, alongside the core's: callers branch on it.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Missing => "TOKEN_MISSING",
            TokenError::Expired => "TOKEN_EXPIRED",
            TokenError::NoKey => "TOKEN_KEY_NOT_CONFIGURED",
            _ => "TOKEN_INVALID",
        }
    }
}

/// Why a configured key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}: {1}")]
    Read(String, std::io::Error),
    #[error(
        "{0}: not a PEM 'PUBLIC KEY' (SubjectPublicKeyInfo) for P-256 (ES256) or Ed25519 (EdDSA)"
    )]
    Unsupported(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Es256,
    EdDsa,
}

impl Algorithm {
    fn name(self) -> &'static str {
        match self {
            Algorithm::Es256 => "ES256",
            Algorithm::EdDsa => "EdDSA",
        }
    }
}

/// A calling system's public key for its tokens.
#[derive(Debug, Clone)]
pub struct TokenKey {
    algorithm: Algorithm,
    /// The raw public key ring verifies with (uncompressed P-256 point, or 32 Ed25519 bytes).
    public: Vec<u8>,
}

/// DER prefix of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1, 65-byte point).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (id-Ed25519, 32-byte key).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

impl TokenKey {
    /// From a PEM `PUBLIC KEY` file.
    pub fn from_pem_file(path: &std::path::Path) -> Result<TokenKey, KeyError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::Read(name.clone(), e))?;
        TokenKey::from_pem(&text).ok_or(KeyError::Unsupported(name))
    }

    /// From PEM text; `None` unless it is a P-256 or Ed25519 SubjectPublicKeyInfo.
    pub fn from_pem(text: &str) -> Option<TokenKey> {
        let body: String = text
            .lines()
            .skip_while(|l| l.trim() != "-----BEGIN PUBLIC KEY-----")
            .skip(1)
            .take_while(|l| l.trim() != "-----END PUBLIC KEY-----")
            .collect();
        TokenKey::from_spki_der(&base64url::decode_standard(body.trim())?)
    }

    /// From a DER SubjectPublicKeyInfo.
    pub fn from_spki_der(der: &[u8]) -> Option<TokenKey> {
        if let Some(point) = der.strip_prefix(&P256_SPKI_PREFIX[..])
            && point.len() == 65
        {
            return Some(TokenKey {
                algorithm: Algorithm::Es256,
                public: point.to_vec(),
            });
        }
        if let Some(key) = der.strip_prefix(&ED25519_SPKI_PREFIX[..])
            && key.len() == 32
        {
            return Some(TokenKey {
                algorithm: Algorithm::EdDsa,
                public: key.to_vec(),
            });
        }
        None
    }
}

/// What a token must be checked against.
#[derive(Debug, Clone)]
pub struct Expectations<'a> {
    /// This face's audience (`[fhir] audience`).
    pub audience: &'a str,
    /// The calling system's id, as the client certificate identified it (`unverified` without
    /// mutual TLS).
    pub issuer: &'a str,
    pub max_lifetime: Duration,
    pub now: SystemTime,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

/// `aud` may be a string or a list of strings (RFC 7519).
#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    aud: Option<Audience>,
    exp: Option<u64>,
    iat: Option<u64>,
    nbf: Option<u64>,
    #[serde(default)]
    sub: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    organisation: String,
    #[serde(default)]
    purpose: String,
    #[serde(default)]
    emergency_reason: String,
    #[serde(default)]
    relationship: String,
}

/// The requester a verified token speaks for. Missing requester fields are left empty: the
/// core's request check refuses them with its own reasons, as on gRPC.
pub fn verify(
    token: &str,
    key: &TokenKey,
    expect: &Expectations<'_>,
) -> Result<Requester, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed("too long"));
    }
    let mut parts = token.split('.');
    let (Some(raw_header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("not three parts"));
    };
    let signed = &token[..raw_header.len() + 1 + payload.len()];
    let header: Header = base64url::decode(raw_header)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(TokenError::Malformed("header"))?;
    if header.alg != key.algorithm.name() {
        return Err(TokenError::WrongAlgorithm(key.algorithm.name()));
    }
    let signature = base64url::decode(signature).ok_or(TokenError::Malformed("signature"))?;
    let verifier = match key.algorithm {
        Algorithm::Es256 => UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &key.public),
        Algorithm::EdDsa => UnparsedPublicKey::new(&ED25519, &key.public),
    };
    verifier
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| TokenError::BadSignature)?;
    // Only a signed payload is read.
    let claims: Claims = base64url::decode(payload)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(TokenError::Malformed("claims"))?;

    let now = expect
        .now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let leeway = LEEWAY.as_secs();
    let exp = claims.exp.ok_or(TokenError::Malformed("exp is required"))?;
    let iat = claims.iat.ok_or(TokenError::Malformed("iat is required"))?;
    if exp.saturating_add(leeway) <= now {
        return Err(TokenError::Expired);
    }
    if iat > now.saturating_add(leeway)
        || claims
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(leeway))
    {
        return Err(TokenError::NotYetValid);
    }
    if exp.saturating_sub(iat) > expect.max_lifetime.as_secs() {
        return Err(TokenError::TooLong(expect.max_lifetime.as_secs()));
    }
    let audience_ok = match &claims.aud {
        Some(Audience::One(a)) => a == expect.audience,
        Some(Audience::Many(list)) => list.iter().any(|a| a == expect.audience),
        None => false,
    };
    if !audience_ok {
        return Err(TokenError::WrongAudience);
    }
    if claims.iss.as_deref() != Some(expect.issuer) {
        return Err(TokenError::WrongIssuer);
    }
    Ok(requester_of(claims))
}

fn requester_of(claims: Claims) -> Requester {
    let purpose = match claims.purpose.as_str() {
        "emergency_access" => Purpose::EmergencyAccess,
        // Unknown values are refused by the core's check below, as on gRPC.
        "" | "direct_care" => Purpose::DirectCare,
        _ => Purpose::Unspecified,
    };
    Requester {
        user_id: claims.sub,
        user_name: claims.name,
        role_code: claims.role,
        organisation_code: claims.organisation,
        purpose: purpose as i32,
        emergency_reason: claims.emergency_reason,
        asserted_relationship: claims.relationship,
    }
}

/// Who a token *says* is asking, without verifying it: only to describe a refused caller in
/// the audit trail (as gRPC records an unrecognised system's request), never to decide anything.
pub fn unverified_requester(token: &str) -> Option<Requester> {
    if token.len() > MAX_TOKEN_BYTES {
        return None;
    }
    let payload = token.split('.').nth(1)?;
    let claims: Claims = serde_json::from_slice(&base64url::decode(payload)?).ok()?;
    Some(requester_of(claims))
}

/// base64 without a dependency: JWTs use the URL alphabet without padding, PEM the standard one.
mod base64url {
    fn value(c: u8, url: bool) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'-' if url => 62,
            b'_' if url => 63,
            b'+' if !url => 62,
            b'/' if !url => 63,
            _ => return None,
        })
    }

    fn decode_with(text: &str, url: bool) -> Option<Vec<u8>> {
        let bytes: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        let bytes = if url {
            bytes
        } else {
            let trimmed = bytes.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
            bytes[..trimmed].to_vec()
        };
        if bytes.len() % 4 == 1 {
            return None;
        }
        let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
        for chunk in bytes.chunks(4) {
            let mut acc = 0u32;
            for (i, &c) in chunk.iter().enumerate() {
                acc |= value(c, url)? << (18 - 6 * i);
            }
            let n = chunk.len() * 6 / 8;
            for i in 0..n {
                out.push((acc >> (16 - 8 * i)) as u8);
            }
        }
        Some(out)
    }

    /// URL-safe, unpadded (JWT).
    pub fn decode(text: &str) -> Option<Vec<u8>> {
        decode_with(text, true)
    }

    /// Standard alphabet, padding allowed (PEM).
    pub fn decode_standard(text: &str) -> Option<Vec<u8>> {
        decode_with(text, false)
    }

    /// URL-safe, unpadded.
    pub fn encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        out
    }
}

pub use base64url::decode as base64url_decode;
pub use base64url::encode as base64url_encode;

/// Signs a token with a PKCS#8 ES256 or Ed25519 private key: for the CLI (`carerecord token`),
/// demos and tests. A calling system in production signs its own.
pub fn sign(pkcs8: &[u8], claims: &serde_json::Value) -> Result<String, SignError> {
    let rng = ring::rand::SystemRandom::new();
    type Signer = Box<dyn Fn(&[u8]) -> Result<Vec<u8>, SignError>>;
    let (alg, signer): (&str, Signer) =
        if let Ok(pair) = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8) {
            (
                "EdDSA",
                Box::new(move |m| Ok(pair.sign(m).as_ref().to_vec())),
            )
        } else {
            let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                pkcs8,
                &rng,
            )
            .map_err(|_| SignError::Key)?;
            let rng = rng.clone();
            (
                "ES256",
                Box::new(move |m| {
                    pair.sign(&rng, m)
                        .map(|s| s.as_ref().to_vec())
                        .map_err(|_| SignError::Sign)
                }),
            )
        };
    let header = base64url::encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).as_bytes());
    let payload = base64url::encode(claims.to_string().as_bytes());
    let signed = format!("{header}.{payload}");
    let signature = signer(signed.as_bytes())?;
    Ok(format!("{signed}.{}", base64url::encode(&signature)))
}

/// Why a token could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("not a PKCS#8 ES256 (P-256) or Ed25519 private key")]
    Key,
    #[error("signing failed")]
    Sign,
}

/// The SubjectPublicKeyInfo PEM for a PKCS#8 private key (what a calling system registers).
pub fn public_pem(pkcs8: &[u8]) -> Result<String, SignError> {
    use ring::signature::KeyPair;
    let der = if let Ok(pair) = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8) {
        [&ED25519_SPKI_PREFIX[..], pair.public_key().as_ref()].concat()
    } else {
        let rng = ring::rand::SystemRandom::new();
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8,
            &rng,
        )
        .map_err(|_| SignError::Key)?;
        [&P256_SPKI_PREFIX[..], pair.public_key().as_ref()].concat()
    };
    Ok(pem("PUBLIC KEY", &der))
}

/// Standard base64 with padding (PEM, FHIR `base64Binary`).
pub fn base64_standard(bytes: &[u8]) -> String {
    let mut standard: String = base64url::encode(bytes)
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    while !standard.len().is_multiple_of(4) {
        standard.push('=');
    }
    standard
}

/// PEM text with the standard alphabet, padded, 64 columns.
pub fn pem(label: &str, der: &[u8]) -> String {
    let standard = base64_standard(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in standard.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A fresh PKCS#8 private key (`es256` or `ed25519`), for the CLI and tests.
pub fn generate(algorithm: &str) -> Result<Vec<u8>, SignError> {
    let rng = ring::rand::SystemRandom::new();
    match algorithm {
        "ed25519" | "EdDSA" => ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|d| d.as_ref().to_vec())
            .map_err(|_| SignError::Key),
        _ => ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .map(|d| d.as_ref().to_vec())
        .map_err(|_| SignError::Key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const AUD: &str = "https://broker.example/fhir";

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs()
    }

    fn claims() -> serde_json::Value {
        json!({
            "iss": "ehr", "aud": AUD, "iat": now(), "exp": now() + 120,
            "sub": "U1", "name": "Dr Jones", "role": "R8000", "organisation": "H81001",
        })
    }

    fn expect() -> Expectations<'static> {
        Expectations {
            audience: AUD,
            issuer: "ehr",
            max_lifetime: Duration::from_secs(300),
            now: SystemTime::now(),
        }
    }

    fn key_pair(alg: &str) -> (Vec<u8>, TokenKey) {
        let private = generate(alg).expect("key");
        let public = TokenKey::from_pem(&public_pem(&private).expect("public")).expect("parses");
        (private, public)
    }

    #[test]
    fn a_token_signed_by_the_calling_systems_key_names_the_requester() {
        for alg in ["es256", "ed25519"] {
            let (private, public) = key_pair(alg);
            let token = sign(&private, &claims()).expect("signed");
            let requester = verify(&token, &public, &expect()).expect(alg);
            assert_eq!(requester.user_id, "U1");
            assert_eq!(requester.user_name, "Dr Jones");
            assert_eq!(requester.role_code, "R8000");
            assert_eq!(requester.organisation_code, "H81001");
            assert_eq!(requester.purpose, Purpose::DirectCare as i32);
        }
    }

    #[test]
    fn another_key_an_altered_claim_or_another_algorithm_is_refused() {
        let (private, public) = key_pair("es256");
        let (_, other) = key_pair("es256");
        let token = sign(&private, &claims()).expect("signed");
        assert_eq!(
            verify(&token, &other, &expect()),
            Err(TokenError::BadSignature)
        );

        // Change a claim, keep the signature.
        let mut parts: Vec<&str> = token.split('.').collect();
        let mut altered = claims();
        altered["role"] = json!("R0001");
        let payload = base64url::encode(altered.to_string().as_bytes());
        parts[1] = &payload;
        assert_eq!(
            verify(&parts.join("."), &public, &expect()),
            Err(TokenError::BadSignature)
        );

        // An Ed25519 token against an ES256 key, and an unsigned one.
        let (ed_private, _) = key_pair("ed25519");
        let ed_token = sign(&ed_private, &claims()).expect("signed");
        assert_eq!(
            verify(&ed_token, &public, &expect()),
            Err(TokenError::WrongAlgorithm("ES256"))
        );
        let none = format!(
            "{}.{}.",
            base64url::encode(br#"{"alg":"none"}"#),
            base64url::encode(claims().to_string().as_bytes())
        );
        assert_eq!(
            verify(&none, &public, &expect()),
            Err(TokenError::WrongAlgorithm("ES256"))
        );
        assert!(matches!(
            verify("not-a-jwt", &public, &expect()),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn expired_early_long_lived_other_audience_or_issuer_is_refused() {
        let (private, public) = key_pair("ed25519");
        let with = |change: &dyn Fn(&mut serde_json::Value)| {
            let mut c = claims();
            change(&mut c);
            verify(&sign(&private, &c).expect("signed"), &public, &expect())
        };
        assert_eq!(
            with(&|c| {
                c["iat"] = json!(now() - 600);
                c["exp"] = json!(now() - 400);
            }),
            Err(TokenError::Expired)
        );
        assert_eq!(
            with(&|c| {
                c["iat"] = json!(now() + 600);
                c["exp"] = json!(now() + 700);
            }),
            Err(TokenError::NotYetValid)
        );
        assert_eq!(
            with(&|c| c["exp"] = json!(now() + 3600)),
            Err(TokenError::TooLong(300))
        );
        assert_eq!(
            with(&|c| c["aud"] = json!("https://elsewhere.example")),
            Err(TokenError::WrongAudience)
        );
        assert_eq!(
            with(&|c| c["aud"] = json!(["x", AUD])).map(|r| r.user_id),
            Ok("U1".to_owned()),
            "a list of audiences containing ours"
        );
        assert_eq!(
            with(&|c| c["iss"] = json!("another-ehr")),
            Err(TokenError::WrongIssuer)
        );
        assert!(matches!(
            with(&|c| {
                c.as_object_mut().map(|o| o.remove("exp"));
            }),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn emergency_purpose_and_reason_are_carried() {
        let (private, public) = key_pair("es256");
        let mut c = claims();
        c["purpose"] = json!("emergency_access");
        c["emergency_reason"] = json!("unconscious in ED");
        let r = verify(&sign(&private, &c).expect("signed"), &public, &expect()).expect("valid");
        assert_eq!(r.purpose, Purpose::EmergencyAccess as i32);
        assert_eq!(r.emergency_reason, "unconscious in ED");
    }

    #[test]
    fn base64_round_trips_and_pem_keys_parse() {
        for n in 0..40u8 {
            let data: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(base64url::decode(&base64url::encode(&data)), Some(data));
        }
        let (private, _) = key_pair("es256");
        let text = public_pem(&private).expect("pem");
        assert!(text.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        assert!(TokenKey::from_pem(&text).is_some());
        assert!(
            TokenKey::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
                .is_none()
        );
    }
}
