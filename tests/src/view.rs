//! The web view on loopback, next to a test broker: plaintext, every launching system
//! `unverified`, its requester tokens verified with a key made for the test. Requests go through
//! `reqwest` (redirects not followed, cookies carried by hand), as an EHR and a browser would
//! send them.

use std::sync::Arc;
use std::time::Duration;

use carerecord_broker::Broker;
use carerecord_broker::fhir_api::token::{self, TokenKey};
use carerecord_broker::fhir_api::{FaceListener, FaceSettings};
use carerecord_broker::view::{View, ViewSettings};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::fhir::{install_crypto, now};

/// The audience every view test token carries.
pub const VIEW_AUDIENCE: &str = "https://carerecord.test/view";

/// A web view serving one broker.
pub struct ViewFace {
    /// Base URL, ending in `/`.
    pub base: String,
    /// The private key `unverified` launchers sign with.
    pub private: Vec<u8>,
    client: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

/// A response, read whole.
#[derive(Debug)]
pub struct Page {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Page {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// Claims of a clinician at A81001 who asserts a relationship, valid for two minutes.
pub fn launch_claims() -> Value {
    json!({
        "iss": "unverified", "aud": VIEW_AUDIENCE, "iat": now(), "exp": now() + 120,
        "sub": "dr-view", "name": "Dr View", "role": "R8000", "organisation": "A81001",
        "relationship": "test care team",
    })
}

/// Default settings for a view at `base`: launches last a minute, sessions ten.
pub fn view_settings(base: &str, public: TokenKey) -> ViewSettings {
    ViewSettings {
        base_url: base.to_owned(),
        launching: FaceSettings {
            base_url: base.to_owned(),
            audience: VIEW_AUDIENCE.to_owned(),
            max_token_lifetime: Duration::from_secs(300),
            systems: None,
            keys: Default::default(),
            unverified_key: Some(public),
            max_document_bytes: 1024 * 1024,
        },
        ehr_origins: Vec::new(),
        launch_ttl: Duration::from_secs(60),
        session_ttl: Duration::from_secs(600),
        max_document_bytes: 1024 * 1024,
    }
}

/// Serves the view for `broker` on `127.0.0.1:0`, its settings changed by `change`.
pub async fn start_view(broker: Arc<Broker>, change: impl FnOnce(&mut ViewSettings)) -> ViewFace {
    install_crypto();
    let private = token::generate("es256").expect("a key");
    let public = TokenKey::from_pem(&token::public_pem(&private).expect("public key"))
        .expect("the key parses");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let base = format!("http://{}/", listener.local_addr().expect("address"));
    let mut settings = view_settings(&base, public);
    change(&mut settings);
    let listener = FaceListener::new(listener, None).expect("listener");
    let (stop, stopped) = oneshot::channel::<()>();
    let view = Arc::new(View::new(broker, settings));
    tokio::spawn(carerecord_broker::view::serve(listener, view, async {
        let _ = stopped.await;
    }));
    ViewFace {
        base,
        private,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("HTTP client"),
        _stop: stop,
    }
}

async fn read(response: reqwest::Response) -> Page {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.text().await.expect("a body");
    Page {
        status,
        headers,
        body,
    }
}

impl ViewFace {
    /// A token for `claims`, signed with this view's test key.
    pub fn token(&self, claims: &Value) -> String {
        token::sign(&self.private, claims).expect("signed")
    }

    /// A token for [`launch_claims`] changed by `change`.
    pub fn token_with(&self, change: impl FnOnce(&mut Value)) -> String {
        let mut claims = launch_claims();
        change(&mut claims);
        self.token(&claims)
    }

    /// `POST /launch` as the EHR sends it.
    pub async fn launch(&self, nhs: &str, token: Option<&str>) -> Page {
        let mut request = self
            .client
            .post(format!("{}launch", self.base))
            .header("content-type", "application/json")
            .body(json!({ "nhs_number": nhs }).to_string());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        read(request.send().await.expect("the view answers")).await
    }

    /// A launch URL for `nhs` by the clinician `change` makes of [`launch_claims`].
    pub async fn launch_url_as(&self, nhs: &str, change: impl FnOnce(&mut Value)) -> String {
        let launched = self.launch(nhs, Some(&self.token_with(change))).await;
        assert_eq!(launched.status, 201, "launch: {}", launched.body);
        let body: Value = serde_json::from_str(&launched.body).expect("JSON");
        body["url"].as_str().expect("a url").to_owned()
    }

    /// A launch URL for `nhs` by the default clinician.
    pub async fn launch_url(&self, nhs: &str) -> String {
        self.launch_url_as(nhs, |_| {}).await
    }

    /// `GET url` (absolute), with `cookie` when given.
    pub async fn get_url(&self, url: &str, cookie: Option<&str>) -> Page {
        self.get_with(url, cookie, &[]).await
    }

    /// `GET url` (absolute), with `cookie` when given and the `extra` headers (as a browser's
    /// Fetch Metadata).
    pub async fn get_with(&self, url: &str, cookie: Option<&str>, extra: &[(&str, &str)]) -> Page {
        let mut request = self.client.get(url);
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        read(request.send().await.expect("the view answers")).await
    }

    /// `GET {base}{path}`, with `cookie` when given.
    pub async fn get(&self, path: &str, cookie: Option<&str>) -> Page {
        self.get_url(&format!("{}{path}", self.base), cookie).await
    }

    /// `POST {base}{path}` with a form body and extra headers.
    pub async fn post_form(
        &self,
        path: &str,
        cookie: Option<&str>,
        form: &str,
        headers: &[(&str, &str)],
    ) -> Page {
        let mut request = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_owned());
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        read(request.send().await.expect("the view answers")).await
    }

    /// Opens a launch URL: the session cookie (`name=value`) it sets, and the response.
    pub async fn open(&self, url: &str) -> (Option<String>, Page) {
        let page = self.get_url(url, None).await;
        let cookie = page
            .headers
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::to_owned);
        (cookie, page)
    }

    /// A session for `nhs` by the default clinician: its cookie.
    pub async fn session(&self, nhs: &str) -> String {
        let url = self.launch_url(nhs).await;
        let (cookie, page) = self.open(&url).await;
        assert_eq!(page.status, 303, "the launch opens: {}", page.body);
        cookie.expect("a session cookie")
    }
}

/// The value of a hidden form field in `html` (`name="{name}" value="..."`).
pub fn hidden_field(html: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker)? + marker.len();
    let end = html[start..].find('"')?;
    Some(html[start..start + end].to_owned())
}
