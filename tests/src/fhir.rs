//! The FHIR face on loopback, next to a test broker: plaintext, every caller `unverified`, its
//! tokens verified with a key made for the test. Requests go through `reqwest`, an HTTP client
//! that knows nothing of the broker.

use std::sync::{Arc, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use carerecord_broker::Broker;
use carerecord_broker::fhir_api::token::{self, TokenKey};
use carerecord_broker::fhir_api::{Face, FaceListener, FaceSettings};
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// The audience every test token carries.
pub const AUDIENCE: &str = "https://carerecord.test/fhir";

/// A FHIR face serving one broker.
pub struct FhirFace {
    /// Base URL, ending in `/`.
    pub base: String,
    /// The private key `unverified` callers sign with.
    pub private: Vec<u8>,
    client: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The OperationOutcome's first reason code, if this is one.
    pub fn reason(&self) -> &str {
        self.body["issue"][0]["details"]["coding"][0]["code"]
            .as_str()
            .unwrap_or("")
    }
}

/// rustls' ring provider for the process (reqwest is built without one).
pub fn install_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    });
}

/// Seconds since 1970.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Claims of [`crate::clinician`] (who asserts a relationship), valid for two minutes.
pub fn clinician_claims() -> Value {
    json!({
        "iss": "unverified", "aud": AUDIENCE, "iat": now(), "exp": now() + 120,
        "sub": "dr-test", "name": "Dr Test", "role": "R8000", "organisation": "A81001",
        "relationship": "test care team",
    })
}

/// Serves the FHIR face for `broker` on `127.0.0.1:0`.
pub async fn start_fhir(broker: Arc<Broker>) -> FhirFace {
    install_crypto();
    let private = token::generate("es256").expect("a key");
    let public = TokenKey::from_pem(&token::public_pem(&private).expect("public key"))
        .expect("the key parses");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let base = format!("http://{}/", listener.local_addr().expect("address"));
    let settings = FaceSettings {
        base_url: base.clone(),
        audience: AUDIENCE.to_owned(),
        max_token_lifetime: Duration::from_secs(300),
        systems: None,
        keys: Default::default(),
        unverified_key: Some(public),
        max_document_bytes: 1024 * 1024,
    };
    let listener = FaceListener::new(listener, None).expect("listener");
    let (stop, stopped) = oneshot::channel::<()>();
    let face = Arc::new(Face { broker, settings });
    tokio::spawn(carerecord_broker::fhir_api::serve(listener, face, async {
        let _ = stopped.await;
    }));
    FhirFace {
        base,
        private,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("HTTP client"),
        _stop: stop,
    }
}

/// The `Parameters` for one NHS number, plus `more` parameters.
pub fn parameters(nhs: &str, more: Vec<Value>) -> Value {
    let mut parameter = vec![json!({
        "name": "patientNHSNumber",
        "valueIdentifier": {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs},
    })];
    parameter.extend(more);
    json!({"resourceType": "Parameters", "parameter": parameter})
}

impl FhirFace {
    /// A token for `claims`, signed with this face's test key.
    pub fn token(&self, claims: &Value) -> String {
        token::sign(&self.private, claims).expect("signed")
    }

    /// A token for [`clinician_claims`] changed by `change`.
    pub fn token_with(&self, change: impl FnOnce(&mut Value)) -> String {
        let mut claims = clinician_claims();
        change(&mut claims);
        self.token(&claims)
    }

    /// `POST Patient/$getstructuredrecord` with `body`, bearing `token` when given.
    pub async fn structured_record(&self, body: &Value, token: Option<&str>) -> Answer {
        let mut request = self
            .client
            .post(format!("{}Patient/$getstructuredrecord", self.base))
            .header("content-type", "application/fhir+json")
            .body(body.to_string());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        read(request.send().await.expect("the face answers")).await
    }

    /// `GET {path}` accepting anything: (status, headers, raw body).
    pub async fn get_raw(
        &self,
        path: &str,
        token: &str,
    ) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("the face answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("a body").to_vec();
        (status, headers, body)
    }

    /// `GET {path}` accepting only FHIR JSON.
    pub async fn get_fhir(&self, path: &str, token: &str) -> Answer {
        let request = self
            .client
            .get(format!("{}{path}", self.base))
            .header("accept", "application/fhir+json")
            .bearer_auth(token);
        read(request.send().await.expect("the face answers")).await
    }

    /// `GET {path}` relative to the base.
    pub async fn get(&self, path: &str, token: Option<&str>) -> Answer {
        let mut request = self.client.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        read(request.send().await.expect("the face answers")).await
    }
}

async fn read(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("a body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}
