//! The clinician's web view over real HTTP: the launch from the EHR (single use, short-lived,
//! bound to requester and patient), the page's security headers, the no-script page, the
//! server-sent events, CSRF on the one form, documents and the audit trail. The NHS number kept
//! out of URLs and logs: `tests/view_logs.rs`; the browser tests: `view_browser`.

use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::Source;
use carerecord_broker::access::AccessConfig;
use carerecord_e2e::view::{ViewFace, hidden_field, start_view};
use carerecord_e2e::*;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(5);

async fn view_over(
    sources: Vec<Arc<dyn Source>>,
    settings: Settings,
    change: impl FnOnce(&mut carerecord_broker::view::ViewSettings),
) -> (TestBroker, ViewFace) {
    let broker = start_broker(sources.into_iter().map(|s| (s, LONG)).collect(), settings).await;
    let view = start_view(broker.broker.clone(), change).await;
    (broker, view)
}

async fn gp_and_hospital() -> (TestBroker, ViewFace) {
    view_over(
        vec![Arc::new(gp_source()), Arc::new(hospital_source())],
        Settings::default(),
        |_| {},
    )
    .await
}

/// The audit events of `file`.
fn audit_events(file: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .expect("audit trail")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|line| line["event"].clone())
        .collect()
}

#[tokio::test]
async fn a_launch_url_opens_once_and_carries_no_nhs_number() {
    let (_broker, view) = gp_and_hospital().await;
    let nhs = shared_patient().as_digits();
    let url = view.launch_url(&nhs).await;
    assert!(url.starts_with(&format!("{}launch/", view.base)), "{url}");
    assert!(!url.contains(&nhs), "the NHS number is not in the URL");

    let (cookie, opened) = view.open(&url).await;
    assert_eq!(opened.status, 303);
    assert_eq!(opened.header("location"), format!("{}record", view.base));
    let set_cookie = opened.header("set-cookie");
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=600"] {
        assert!(
            set_cookie.contains(attribute),
            "{attribute} in {set_cookie}"
        );
    }
    let cookie = cookie.expect("a session cookie");
    assert!(!cookie.contains(&nhs));

    let page = view.get("record", Some(&cookie)).await;
    assert_eq!(page.status, 200, "{}", page.body);

    // Opened again (a replay, a second tab, the browser's history): refused, nothing shown.
    let (again, replayed) = view.open(&url).await;
    assert_eq!(replayed.status, 410);
    assert!(again.is_none(), "no session for a replay");
    assert!(
        replayed
            .body
            .contains("data-reason=\"LAUNCH_USED_OR_UNKNOWN\"")
    );
    assert!(!replayed.body.contains("Smith") && !replayed.body.contains("SMITH"));
}

#[tokio::test]
async fn an_expired_launch_url_is_refused_as_expired() {
    let (_broker, view) = view_over(vec![Arc::new(gp_source())], Settings::default(), |s| {
        s.launch_ttl = Duration::ZERO
    })
    .await;
    let url = view.launch_url(&shared_patient().as_digits()).await;
    let (cookie, page) = view.open(&url).await;
    assert_eq!(page.status, 410);
    assert!(cookie.is_none());
    assert!(page.body.contains("data-reason=\"LAUNCH_EXPIRED\""));
}

#[tokio::test]
async fn an_ended_session_shows_nothing() {
    let (_broker, view) = view_over(vec![Arc::new(gp_source())], Settings::default(), |s| {
        s.session_ttl = Duration::ZERO
    })
    .await;
    let cookie = view.session(&shared_patient().as_digits()).await;
    for path in ["record", "record-complete", "record-events"] {
        let page = view.get(path, Some(&cookie)).await;
        assert_eq!(page.status, 401, "{path}");
        assert!(page.body.contains("SESSION_MISSING"), "{path}");
    }
}

#[tokio::test]
async fn without_a_session_cookie_no_page_shows_a_record() {
    let (_broker, view) = gp_and_hospital().await;
    let forged = format!("carerecord-view={}", "ab".repeat(32));
    for cookie in [None, Some(forged.as_str()), Some("carerecord-view=short")] {
        for path in ["record", "record-complete", "record-events", "document/0"] {
            let page = view.get(path, cookie).await;
            assert_eq!(page.status, 401, "{path} with {cookie:?}");
            assert!(!page.body.contains("Smith") && !page.body.contains("SMITH"));
        }
    }
}

#[tokio::test]
async fn every_page_carries_a_strict_policy_no_store_and_no_referrer() {
    let (_broker, view) = view_over(vec![Arc::new(gp_source())], Settings::default(), |s| {
        s.ehr_origins = vec!["https://ehr.example.nhs.uk".into()]
    })
    .await;
    let cookie = view.session(&shared_patient().as_digits()).await;
    for path in [
        "record",
        "record-complete",
        "assets/view.css",
        "assets/view.js",
        "nowhere",
    ] {
        let page = view.get(path, Some(&cookie)).await;
        let csp = page.header("content-security-policy");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "form-action 'self'",
            "base-uri 'none'",
            "frame-ancestors https://ehr.example.nhs.uk",
        ] {
            assert!(csp.contains(directive), "{path}: {directive} in {csp}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
        assert_eq!(page.header("cache-control"), "no-store", "{path}");
        assert_eq!(page.header("x-content-type-options"), "nosniff");
        assert_eq!(page.header("referrer-policy"), "no-referrer");
    }
    // No inline script anywhere: the one script is our own file.
    let page = view.get("record", Some(&cookie)).await;
    assert_eq!(page.body.matches("<script").count(), 1);
    assert!(
        page.body
            .contains("<script src=\"assets/view.js\" defer></script>")
    );
    for handler in [" onclick=", " onload=", " onerror=", "javascript:"] {
        assert!(!page.body.contains(handler), "no inline handler {handler}");
    }

    // Without configured EHR origins the view cannot be framed at all.
    let (_b, unframed) = gp_and_hospital().await;
    let cookie = unframed.session(&shared_patient().as_digits()).await;
    let page = unframed.get("record", Some(&cookie)).await;
    assert!(
        page.header("content-security-policy")
            .contains("frame-ancestors 'none'")
    );
}

#[tokio::test]
async fn the_page_without_scripts_shows_the_record_and_the_view_is_audited_under_the_launching_user()
 {
    let audit_file = temp_path("view-audit.jsonl");
    let (_broker, view) = view_over(
        vec![Arc::new(gp_source()), Arc::new(hospital_source())],
        Settings {
            audit_file: audit_file.clone(),
            ..Settings::default()
        },
        |_| {},
    )
    .await;
    let nhs = shared_patient().as_digits();
    let cookie = view.session(&nhs).await;
    let page = view.get("record-complete", Some(&cookie)).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let grouped = format!("{} {} {}", &nhs[..3], &nhs[3..6], &nhs[6..]);
    for want in [
        "SMITH",
        grouped.as_str(),
        "Riverside Medical Practice",
        "Royal Infirmary",
        "Type 2 diabetes",
        "Atrial fibrillation",
        "Current medicines",
        "Check the patient's identity",
        "Record as of",
    ] {
        assert!(
            page.body.contains(want),
            "missing {want:?} in {}",
            page.body
        );
    }
    for section in ["conditions", "medications", "allergies", "test_results"] {
        assert!(
            page.body.contains(&format!("id=\"section-{section}\"")),
            "{section}"
        );
    }
    assert!(
        !page.body.contains("<script"),
        "the no-script page loads no script"
    );

    let events = audit_events(&audit_file);
    let viewed: Vec<&Value> = events.iter().filter(|e| e["patient"] == nhs).collect();
    assert_eq!(viewed.len(), 1, "one view, one audit event: {viewed:?}");
    assert_eq!(viewed[0]["kind"], "access");
    assert_eq!(viewed[0]["user_id"], "dr-view");
    assert_eq!(viewed[0]["system"], "unverified");
}

#[tokio::test]
async fn the_events_stream_each_organisation_then_the_whole_record() {
    let (_broker, view) = gp_and_hospital().await;
    let cookie = view.session(&shared_patient().as_digits()).await;
    let page = view.get("record-events", Some(&cookie)).await;
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").starts_with("text/event-stream"));
    assert_eq!(page.header("cache-control"), "no-store");
    let names: Vec<&str> = page
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(names, ["source", "source", "complete"], "{}", page.body);
    let data: Vec<Value> = page
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).expect("JSON data"))
        .collect();
    let organisations: String = data[..2]
        .iter()
        .map(|d| d["organisation"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(organisations.contains("Riverside Medical Practice"));
    assert!(organisations.contains("Royal Infirmary"));
    assert!(
        data[..2]
            .iter()
            .any(|d| d["sections"]["conditions"].as_str().is_some())
    );
    let whole = data[2]["html"].as_str().expect("the record");
    assert!(whole.starts_with("<div id=\"record\""));
    assert!(whole.contains("Atrial fibrillation") && whole.contains("Type 2 diabetes"));
}

#[tokio::test]
async fn the_refresh_form_needs_this_sessions_csrf_token_from_this_origin() {
    let (_broker, view) = gp_and_hospital().await;
    let cookie = view.session(&shared_patient().as_digits()).await;
    let page = view.get("record", Some(&cookie)).await;
    let csrf = hidden_field(&page.body, "csrf").expect("the form's token");
    let origin = view.base.trim_end_matches('/').to_owned();

    let refused = [
        ("no token", String::new(), origin.clone()),
        (
            "another token",
            format!("csrf={}", "0".repeat(64)),
            origin.clone(),
        ),
        (
            "another origin",
            format!("csrf={csrf}"),
            "https://evil.example".to_owned(),
        ),
    ];
    for (what, form, from) in refused {
        let page = view
            .post_form("refresh", Some(&cookie), &form, &[("origin", &from)])
            .await;
        assert_eq!(page.status, 403, "{what}");
        assert!(page.body.contains("CSRF_TOKEN_INVALID"), "{what}");
    }
    let other = view.session(&shared_patient().as_digits()).await;
    let page = view
        .post_form("refresh", Some(&other), &format!("csrf={csrf}"), &[])
        .await;
    assert_eq!(page.status, 403, "one session's token is not another's");

    let page = view
        .post_form(
            "refresh",
            Some(&cookie),
            &format!("csrf={csrf}"),
            &[("origin", &origin)],
        )
        .await;
    assert_eq!(page.status, 303);
    assert_eq!(page.header("location"), format!("{}record", view.base));
}

#[tokio::test]
async fn refused_launches_say_why_with_the_cores_reasons() {
    let audit_file = temp_path("view-refused.jsonl");
    let (_broker, view) = view_over(
        vec![Arc::new(gp_source())],
        Settings {
            audit_file: audit_file.clone(),
            ..Settings::default()
        },
        |_| {},
    )
    .await;
    let nhs = shared_patient().as_digits();
    let reason = |body: &str| -> String {
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        v["issue"][0]["details"]["coding"][0]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        ("no token", nhs.clone(), None, 401, "TOKEN_MISSING"),
        (
            "a token for the FHIR face",
            nhs.clone(),
            Some(view.token_with(|c| c["aud"] = json!(carerecord_e2e::fhir::AUDIENCE))),
            401,
            "TOKEN_INVALID",
        ),
        (
            "an invalid NHS number",
            "1234567890".to_owned(),
            Some(view.token_with(|_| {})),
            400,
            "INVALID_NHS_NUMBER",
        ),
        (
            "a role that may not view records",
            nhs.clone(),
            Some(view.token_with(|c| c["role"] = json!("R9999"))),
            403,
            "ROLE_NOT_PERMITTED",
        ),
    ];
    for (what, patient, token, status, want) in cases {
        let page = view.launch(&patient, token.as_deref()).await;
        assert_eq!(page.status, status, "{what}: {}", page.body);
        assert_eq!(reason(&page.body), want, "{what}");
    }
    // A form post (what a cross-site page could send) is not a launch.
    let page = view
        .post_form(
            "launch",
            None,
            &format!("nhs_number={nhs}"),
            &[(
                "authorization",
                &format!("Bearer {}", view.token_with(|_| {})),
            )],
        )
        .await;
    assert_eq!(page.status, 415);
    // The refused role is in the audit trail, as on every face.
    let events = audit_events(&audit_file);
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "denied" && e["role"] == "R9999" && e["patient"] == nhs),
        "{events:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Documents

const LETTER_URL: &str = "https://hospital.internal/fhir/Binary/discharge-1";
const LETTER: &str = "Discharge summary: admitted with chest pain, troponin negative.";

fn hospital_with_a_letter() -> Arc<dyn Source> {
    use carerecord_proto::{CareRecord, DocumentDetail, Entry, Patient, entry::Detail};
    Arc::new(
        carerecord_adapters::memory::InMemorySource::new("hospital", "RXX", "Riverside Hospital")
            .with_patient(
                shared_patient(),
                CareRecord {
                    patient: Some(Patient {
                        family_name: "Smith".into(),
                        birth_date: "1957-03-02".into(),
                        ..Patient::default()
                    }),
                    documents: vec![Entry {
                        concept: coding(SNOMED, "373942005", "Discharge summary"),
                        summary: "Discharge summary".into(),
                        effective: "2026-10-01".into(),
                        detail: Some(Detail::Document(DocumentDetail {
                            document_type: "Discharge summary".into(),
                            url: LETTER_URL.into(),
                            content_type: "text/plain".into(),
                            author: "Riverside Hospital".into(),
                        })),
                        ..Entry::default()
                    }],
                    ..CareRecord::default()
                },
            )
            .with_document(LETTER_URL, "text/plain", LETTER),
    )
}

#[tokio::test]
async fn a_document_opened_from_the_view_is_streamed_as_an_attachment_and_audited() {
    let audit_file = temp_path("view-documents.jsonl");
    let (_broker, view) = view_over(
        vec![Arc::new(gp_source()), hospital_with_a_letter()],
        Settings {
            audit_file: audit_file.clone(),
            access: AccessConfig {
                trust_unverified_assertions: true,
                ..AccessConfig::default()
            },
            ..Settings::default()
        },
        |_| {},
    )
    .await;
    let cookie = view.session(&shared_patient().as_digits()).await;
    let page = view.get("record-complete", Some(&cookie)).await;
    let link = page
        .body
        .split("href=\"")
        .skip(1)
        .map(|p| p.split('"').next().unwrap_or(""))
        .find(|h| h.starts_with("document/"))
        .expect("a link to the letter")
        .to_owned();
    let letter = view.get(&link, Some(&cookie)).await;
    assert_eq!(letter.status, 200);
    assert_eq!(letter.body, LETTER);
    assert_eq!(letter.header("content-disposition"), "attachment");
    assert_eq!(
        letter.header("content-security-policy"),
        "sandbox; default-src 'none'"
    );
    assert_eq!(letter.header("cache-control"), "no-store");
    let events = audit_events(&audit_file);
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "document" && e["user_id"] == "dr-view"),
        "{events:?}"
    );
    // Another session's cookie cannot be used without the session; none: refused.
    let refused = view.get(&link, None).await;
    assert_eq!(refused.status, 401);
}

// ---------------------------------------------------------------------------------------------
// Under mutual TLS: the EHR by its certificate, the clinician's browser without one

#[tokio::test]
async fn under_mutual_tls_only_a_known_system_launches_and_a_browser_without_a_certificate_opens_it()
 {
    use carerecord_broker::config::SystemConfig;
    use carerecord_broker::fhir_api::token::{self, TokenKey};
    use carerecord_broker::fhir_api::{FaceListener, listen};
    use carerecord_broker::view::View;
    use carerecord_e2e::pki::TestCa;

    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let audit_file = temp_path("view-mtls-audit.jsonl");
    let broker = start_broker(
        vec![(Arc::new(gp_source()) as Arc<dyn Source>, LONG)],
        Settings {
            audit_file: audit_file.clone(),
            ..Settings::default()
        },
    )
    .await;
    let ca = TestCa::new("carerecord view test CA");
    let tls = carerecord_e2e::pki::server_tls(&ca);
    let private = token::generate("es256").expect("key");
    let public = TokenKey::from_pem(&token::public_pem(&private).expect("pem")).expect("parses");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let base = format!("https://localhost:{port}/");
    let mut settings = carerecord_e2e::view::view_settings(&base, public.clone());
    settings.launching.unverified_key = None;
    settings.launching.systems = Some(vec![SystemConfig {
        id: "a81001-gp".into(),
        dns_name: "gp.a81001.test".into(),
        trusted_assertions: true,
        token_key: None,
    }]);
    settings.launching.keys = [("a81001-gp".to_owned(), public)].into();
    let listener = FaceListener::new(
        listener,
        Some(
            listen::tls_config_with(&tls, listen::ClientCertificates::Optional)
                .expect("TLS config"),
        ),
    )
    .expect("listener");
    let view = Arc::new(View::new(broker.broker.clone(), settings));
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(carerecord_broker::view::serve(listener, view, async {
        let _ = stopped.await;
    }));

    let client_for = |leaf: Option<&carerecord_e2e::pki::Leaf>| {
        carerecord_e2e::pki::https_client(&ca, leaf, LONG)
    };
    let nhs = shared_patient().as_digits();
    let mut claims = carerecord_e2e::view::launch_claims();
    claims["iss"] = json!("a81001-gp");
    let signed = token::sign(&private, &claims).expect("signed");
    let launch = |client: reqwest::Client| {
        let url = format!("{base}launch");
        let body = json!({ "nhs_number": nhs }).to_string();
        let signed = signed.clone();
        async move {
            client
                .post(url)
                .header("content-type", "application/json")
                .bearer_auth(signed)
                .body(body)
                .send()
                .await
                .expect("answered")
        }
    };

    // No certificate, or one for a system not configured: no launch, and the refusal audited.
    for client in [
        client_for(None),
        client_for(Some(&ca.client("stranger.example"))),
    ] {
        let refused = launch(client).await;
        assert_eq!(refused.status(), 403);
        let body: Value = refused.json().await.expect("JSON");
        assert_eq!(
            body["issue"][0]["details"]["coding"][0]["code"],
            "UNKNOWN_CALLING_SYSTEM"
        );
    }
    assert!(
        audit_events(&audit_file)
            .iter()
            .any(|e| e["kind"] == "denied" && e["system"] == "unknown" && e["patient"] == nhs),
        "the unknown system's refusal is audited"
    );

    // The EHR launches; the clinician's browser, with no certificate, opens it.
    let ehr = client_for(Some(&ca.client("gp.a81001.test")));
    let launched = launch(ehr).await;
    assert_eq!(launched.status(), 201);
    let url = launched.json::<Value>().await.expect("JSON")["url"]
        .as_str()
        .expect("a url")
        .to_owned();
    let browser = client_for(None);
    let opened = browser.get(&url).send().await.expect("opened");
    assert_eq!(opened.status(), 303);
    let set_cookie = opened.headers()["set-cookie"]
        .to_str()
        .expect("a cookie")
        .to_owned();
    assert!(set_cookie.contains("; Secure"), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap_or("").to_owned();
    let page = browser
        .get(format!("{base}record-complete"))
        .header("cookie", cookie)
        .send()
        .await
        .expect("the page");
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("HTML").contains("SMITH"));
    let viewed = audit_events(&audit_file);
    assert!(
        viewed
            .iter()
            .any(|e| e["kind"] == "access" && e["system"] == "a81001-gp" && e["patient"] == nhs),
        "the view is audited under the launching system: {viewed:?}"
    );
}

#[tokio::test]
async fn emergency_access_is_said_at_the_top_of_the_page() {
    let (_broker, view) = gp_and_hospital().await;
    let url = view
        .launch_url_as(&shared_patient().as_digits(), |c| {
            c["purpose"] = json!("emergency_access");
            c["emergency_reason"] = json!("unconscious in ED");
            c.as_object_mut().map(|o| o.remove("relationship"));
        })
        .await;
    let (cookie, _) = view.open(&url).await;
    let page = view.get("record-complete", cookie.as_deref()).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let emergency = page.body.find("<h2>Emergency access</h2>").expect("said");
    let first_section = page.body.find("id=\"section-").expect("a section");
    assert!(emergency < first_section);
}

#[tokio::test]
async fn another_site_can_open_the_view_but_not_fetch_or_embed_its_pages_as_resources() {
    let audit_file = temp_path("view-cross-site.jsonl");
    let (_broker, view) = view_over(
        vec![Arc::new(gp_source()), Arc::new(hospital_source())],
        Settings {
            audit_file: audit_file.clone(),
            ..Settings::default()
        },
        |_| {},
    )
    .await;
    let nhs = shared_patient().as_digits();
    let cookie = view.session(&nhs).await;
    let url = |path: &str| format!("{}{path}", view.base);
    // Another site's page loading the record as an image, a script or a fetch: refused before
    // the session is used, and no lookup is made or audited.
    for (mode, dest) in [
        ("no-cors", "image"),
        ("no-cors", "script"),
        ("cors", "empty"),
    ] {
        for path in ["record-complete", "record-events", "record"] {
            let page = view
                .get_with(
                    &url(path),
                    Some(&cookie),
                    &[
                        ("sec-fetch-site", "cross-site"),
                        ("sec-fetch-mode", mode),
                        ("sec-fetch-dest", dest),
                    ],
                )
                .await;
            assert_eq!(page.status, 403, "{path} as {mode}/{dest}");
            assert!(!page.body.contains("SMITH"));
        }
    }
    assert!(
        audit_events(&audit_file)
            .iter()
            .all(|e| e["patient"] != nhs),
        "nothing was looked up"
    );
    // The EHR navigating a frame to the view, and the page's own requests, are served.
    let framed = view
        .get_with(
            &url("record-complete"),
            Some(&cookie),
            &[
                ("sec-fetch-site", "cross-site"),
                ("sec-fetch-mode", "navigate"),
                ("sec-fetch-dest", "iframe"),
            ],
        )
        .await;
    assert_eq!(framed.status, 200, "{}", framed.body);
    assert!(framed.body.contains("SMITH"));
    let own = view
        .get_with(
            &url("record-complete"),
            Some(&cookie),
            &[
                ("sec-fetch-site", "same-origin"),
                ("sec-fetch-mode", "cors"),
                ("sec-fetch-dest", "empty"),
            ],
        )
        .await;
    assert_eq!(own.status, 200);
}
