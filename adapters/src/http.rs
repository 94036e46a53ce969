//! An HTTP client for adapters, without the rustls provider trap.
//!
//! The workspace builds reqwest with `rustls-no-provider`: a plain `reqwest::Client::new()` (or
//! `Client::builder().build()`) panics unless a process-wide rustls `CryptoProvider` has been
//! installed first — and an adapter cannot know whether the binary embedding it did. Build
//! clients from [`client_builder`] instead: it carries its own TLS configuration (ring, the
//! Mozilla roots, HTTP/2 with HTTP/1.1 fallback), so it never depends on global state. Use the
//! re-exported [`reqwest`] rather than your own dependency, so there is one copy in the build.
//!
//! Code that builds clients some other way (a library you call) can call
//! [`install_default_crypto_provider`] first, once, at start.

use std::sync::Arc;

/// The reqwest the kit and the built-in adapters use: depend on this rather than adding your own
/// (a second version, or other TLS features, would bring a second crypto provider).
pub use reqwest;

/// A `reqwest::ClientBuilder` whose TLS does not depend on a process-wide crypto provider:
/// ring, the Mozilla root certificates, ALPN for HTTP/2 and HTTP/1.1. Add timeouts, pools and
/// headers as usual; call `.build()` without fear of a panic.
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().tls_backend_preconfigured(tls_config())
}

/// TLS for [`client_builder`]: ring's provider, explicitly, so no global default is consulted.
fn tls_config() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        // Fails only for a provider lacking every default TLS version; ring has them all (a
        // fixed fact of this build, pinned by the test below, not something a caller controls).
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tls
}

/// Installs ring as the process-wide rustls provider, if none is installed yet (a no-op
/// otherwise). For code that builds reqwest or rustls clients without [`client_builder`]; call
/// it once at start, in binaries and tests. The `carerecord` binary calls it before building any
/// source. The conformance kit deliberately does not: a kit that hid the trap would let an
/// adapter pass its tests and panic in another binary.
pub fn install_default_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: a provider is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kit_tls_configuration_builds() {
        let tls = super::tls_config();
        assert_eq!(tls.alpn_protocols[0], b"h2");
    }
}
