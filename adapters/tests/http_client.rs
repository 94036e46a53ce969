//! The rustls provider trap, in a process of its own (this test binary installs nothing): a
//! client from the kit's `http::client_builder` builds and speaks HTTP with no process-wide
//! provider; `install_default_crypto_provider` makes a plain `reqwest::Client` safe to build.

use carerecord_adapters::http::{self, reqwest};
use carerecord_adapters::testkit::{Garbage, GarbageServer};

#[tokio::test]
async fn an_adapter_builds_an_http_client_without_a_provider_installed() {
    assert!(
        rustls::crypto::CryptoProvider::get_default().is_none(),
        "this test needs a process with no provider installed"
    );
    let client = http::client_builder()
        .build()
        .expect("the kit's client builds without a process-wide provider");
    let upstream = GarbageServer::start(Garbage::JsonNull)
        .await
        .expect("server");
    let body = client
        .get(upstream.url())
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body");
    assert_eq!(body, "null");
    assert!(
        rustls::crypto::CryptoProvider::get_default().is_none(),
        "the kit's client installed nothing behind the caller's back"
    );

    // For clients built some other way: one call, and a plain client builds.
    http::install_default_crypto_provider();
    http::install_default_crypto_provider(); // idempotent
    assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    let plain = reqwest::Client::new();
    let status = plain
        .get(upstream.url())
        .send()
        .await
        .expect("request")
        .status();
    assert_eq!(status, 200);
}
