//! The web view in a real browser: Debian's headless Chromium, driven over its DevTools
//! protocol, against a synthetic region of mock organisations serving FHIR R4 on loopback (the
//! demo's region), a broker built from the configuration mock-sources writes, and the view.
//!
//! What a clinician would see: the patient and every section; a slow organisation's entries
//! arriving after the page is first painted; a hung organisation shown as "unknown from ...";
//! a conflict marked where the entry is; sensitive data withheld from an ordinary role; a
//! replayed or expired link refused; the page without scripts; axe-core finding no serious or
//! critical accessibility violation; screenshots at a phone's width and a desktop's, written to
//! `target/view-artifacts/`.

use std::sync::Arc;
use std::time::Duration;

use carerecord_broker::Broker;
use carerecord_broker::registry;
use carerecord_e2e::browser::{Browser, Tab, artifacts_dir, axe_core, skip};
use carerecord_e2e::region::{region_config, shared_patient, small_region, start_region};
use carerecord_e2e::view::{ViewFace, start_view};
use carerecord_mock_sources::{
    ClinicalConflictKind, DataMode, Fault, FhirMode, LatencyProfile, RegionServer, RegionSpec,
};
use serde_json::json;

const DESKTOP: (u32, u32) = (1280, 900);
const PHONE: (u32, u32) = (390, 844);
/// Screenshots of the whole page stop at this height (CSS pixels).
const FULL_PAGE: f64 = 6000.0;

/// A region, a broker built from its configuration (sources timing out after
/// `source_timeout`; `sensitive_roles` may see sensitive entries), and the view.
async fn region_view(
    spec: &RegionSpec,
    source_timeout: Duration,
    sensitive_roles: &[&str],
) -> (RegionServer, Arc<Broker>, ViewFace) {
    let server = start_region(spec).await;
    let mut config = region_config(&server, FhirMode::Everything, source_timeout);
    config.access.sensitive_roles = sensitive_roles.iter().map(|r| r.to_string()).collect();
    let sources = registry::build(&config, 1).expect("sources build from the mock config");
    let broker = Arc::new(
        carerecord_broker::assemble::broker_with_sources(&config, sources)
            .expect("broker builds from the mock config"),
    );
    let view = start_view(broker.clone(), |_| {}).await;
    (server, broker, view)
}

async fn browser(test: &str) -> Option<Browser> {
    let browser = Browser::launch().await;
    if browser.is_none() {
        skip(
            test,
            "no Chromium is installed (looked for $CHROMIUM, /usr/bin/chromium)",
        );
    }
    browser
}

fn grouped(nhs: &str) -> String {
    format!("{} {} {}", &nhs[..3], &nhs[3..6], &nhs[6..])
}

/// Waits until the merged record has replaced the progressive page.
async fn complete(tab: &Tab) -> String {
    tab.wait_for_dom(
        |html| html.contains("id=\"record\" aria-busy=\"false\""),
        "the whole record",
    )
    .await
}

#[tokio::test]
async fn the_record_fills_in_as_organisations_answer_and_a_hung_one_is_unknown() {
    let Some(browser) = browser("view_browser::the_record_fills_in").await else {
        return;
    };
    let (server, _broker, view) =
        region_view(&small_region(11, 100), Duration::from_millis(2_500), &[]).await;
    let patient = shared_patient(&server);
    let (gp, slow, hung) = (
        patient.organisations[0].clone(),
        patient.organisations[1].clone(),
        patient.organisations[2].clone(),
    );
    let faults = server.faults();
    faults
        .set_latency(&slow, LatencyProfile::Fixed { ms: 400 })
        .expect("slow organisation");
    faults
        .set_fault(&hung, Fault::Hang)
        .expect("hung organisation");

    let nhs = patient.nhs_number.as_digits();
    let url = view
        .launch_url_as(&nhs, |c| c["organisation"] = json!(gp))
        .await;
    let tab = browser.tab(DESKTOP.0, DESKTOP.1, false, true).await;
    tab.goto(&url).await;

    // First paint: the page, before any organisation's data.
    let first = tab.html().await;
    assert!(first.contains("Asking organisations for this record"));
    assert!(
        !first.contains(&format!("data-org=\"{slow}\"")),
        "nothing from the slow organisation yet"
    );
    // The slow organisation's entries arrive while the hung one is still awaited: shown
    // before the record is complete.
    let arrived = tab
        .wait_for_dom(
            |html| {
                html.contains(&format!("data-org=\"{slow}\""))
                    || html.contains("aria-busy=\"false\"")
            },
            "the slow organisation",
        )
        .await;
    assert!(
        arrived.contains("id=\"record\" aria-busy=\"true\""),
        "the slow organisation arrived before the record was complete"
    );
    assert!(arrived.contains("class=\"arrival\""), "its entries shown");

    let html = complete(&tab).await;
    assert!(html.contains(&patient.family.to_uppercase()), "the name");
    assert!(html.contains(&grouped(&nhs)), "the NHS number, 3-3-4");
    for section in [
        "conditions",
        "medications",
        "allergies",
        "test_results",
        "care_plans",
        "documents",
        "encounters",
        "appointments",
    ] {
        assert!(
            html.contains(&format!("id=\"section-{section}\"")),
            "section {section}"
        );
    }
    assert!(
        html.contains(&format!("unknown from {hung}")),
        "the hung organisation is unknown, not absent"
    );
    assert!(html.contains("Did not answer in time"));
    assert!(html.contains("Not every organisation answered"));
    let slow_row = html
        .split("<li class=\"org")
        .find(|li| li.contains(&format!("data-org=\"{slow}\"")))
        .expect("the slow organisation is listed");
    assert!(slow_row.contains("Answered"), "{slow_row}");

    tab.screenshot(&artifacts_dir().join("view-desktop.png"), FULL_PAGE)
        .await;
    // What a clinician sees first, for the README (docs/view-desktop.png is this, committed).
    tab.screenshot(
        &artifacts_dir().join("view-desktop-first-screen.png"),
        f64::from(DESKTOP.1),
    )
    .await;
    let phone = browser.tab(PHONE.0, PHONE.1, true, true).await;
    let again = view
        .launch_url_as(&nhs, |c| c["organisation"] = json!(gp))
        .await;
    phone.goto(&again).await;
    complete(&phone).await;
    let overflow = phone
        .eval("document.documentElement.scrollWidth <= window.innerWidth")
        .await;
    assert_eq!(overflow, json!(true), "no sideways scrolling on a phone");
    phone
        .screenshot(&artifacts_dir().join("view-phone.png"), FULL_PAGE)
        .await;

    // The browser remembers no NHS number: not in a URL, not in a title.
    for (u, title) in tab.history().await {
        assert!(!u.contains(&nhs) && !title.contains(&nhs), "{u} {title}");
    }
}

#[tokio::test]
async fn a_conflict_is_visibly_marked_on_its_entry() {
    let Some(browser) = browser("view_browser::a_conflict_is_visibly_marked").await else {
        return;
    };
    let spec = RegionSpec {
        seed: 42,
        patients: 600,
        organisations: 10,
        page_size: 100,
    };
    let (server, _broker, view) = region_view(&spec, Duration::from_secs(3), &[]).await;
    let (patient, conflict) = server
        .region()
        .patients_with_clinical_conflicts()
        .filter(|p| p.conflict.is_none())
        .find_map(|p| {
            let c = p.clinical_conflict.clone()?;
            (c.kind == ClinicalConflictKind::AllergyResolved).then_some((p, c))
        })
        .expect("the region has an allergy conflict");
    server.faults().set_data_mode_all(DataMode::Conflicts);
    let url = view
        .launch_url_as(&patient.nhs_number.as_digits(), |c| {
            c["organisation"] = json!(conflict.gp)
        })
        .await;
    let tab = browser.tab(DESKTOP.0, DESKTOP.1, false, true).await;
    tab.goto(&url).await;
    complete(&tab).await;
    let marked = tab
        .eval(
            "Array.from(document.querySelectorAll('tr.entry--attention .conflict')).filter(c => { \
               const r = c.getBoundingClientRect(); const s = getComputedStyle(c); \
               return r.width > 0 && r.height > 0 && s.visibility === 'visible' && s.display !== 'none'; \
             }).map(c => c.closest('tr').innerText)",
        )
        .await;
    let rows: Vec<String> = serde_json::from_value(marked).expect("rows");
    assert!(
        rows.iter().any(|r| r.contains(&conflict.display)
            && r.contains("Conflict")
            && r.contains("status")),
        "{} marked as a status conflict, visibly: {rows:?}",
        conflict.display
    );
    tab.screenshot(&artifacts_dir().join("view-conflict.png"), FULL_PAGE)
        .await;
}

#[tokio::test]
async fn sensitive_data_is_withheld_from_an_ordinary_role() {
    let Some(browser) = browser("view_browser::sensitive_data_is_withheld").await else {
        return;
    };
    // R8000 may see sensitive entries; R8001, an ordinary clinical role, may not.
    let (server, broker, view) =
        region_view(&small_region(3, 100), Duration::from_secs(3), &["R8000"]).await;
    // A patient whose GP holds a sexual health entry (labelled restricted), found as R8000.
    let mut found = None;
    for p in server.region().patients() {
        let request = carerecord_broker::validate::check(
            carerecord_proto::GetCareRecordRequest {
                nhs_number: p.nhs_number.as_digits(),
                requester: Some(carerecord_proto::Requester {
                    role_code: "R8000".into(),
                    asserted_relationship: "test care team".into(),
                    ..carerecord_e2e::clinician_of(&p.gp)
                }),
                ..Default::default()
            },
            broker.new_request_id(),
            None,
        )
        .expect("a valid request");
        let answer = broker
            .lookup(
                request,
                carerecord_broker::CallingSystem::Identified(carerecord_broker::access::Caller {
                    system: "unverified".into(),
                    trusted_assertions: false,
                }),
            )
            .await;
        if answer.is_ok_and(|a| {
            a.record
                .conditions
                .iter()
                .any(|e| e.summary.contains("Chlamydial"))
        }) {
            found = Some(p);
            break;
        }
    }
    let patient = found.expect("the region has a patient with a sexual health entry");
    let nhs = patient.nhs_number.as_digits();

    let tab = browser.tab(DESKTOP.0, DESKTOP.1, false, true).await;
    let ordinary = view
        .launch_url_as(&nhs, |c| {
            c["role"] = json!("R8001");
            c["organisation"] = json!(patient.gp);
        })
        .await;
    tab.goto(&ordinary).await;
    let html = complete(&tab).await;
    assert!(
        html.contains("Some information is withheld"),
        "told something is withheld"
    );
    assert!(!html.contains("Chlamydial"), "and not what");

    let permitted = view
        .launch_url_as(&nhs, |c| c["organisation"] = json!(patient.gp))
        .await;
    tab.goto(&permitted).await;
    let html = complete(&tab).await;
    assert!(
        html.contains("Chlamydial"),
        "a permitted role sees it (so the test can fail)"
    );
}

#[tokio::test]
async fn a_replayed_or_expired_launch_url_is_refused_in_the_browser() {
    let Some(browser) = browser("view_browser::a_replayed_or_expired_launch_url").await else {
        return;
    };
    let (server, broker, view) =
        region_view(&small_region(5, 100), Duration::from_secs(3), &[]).await;
    let patient = shared_patient(&server);
    let nhs = patient.nhs_number.as_digits();
    let url = view
        .launch_url_as(&nhs, |c| c["organisation"] = json!(patient.gp))
        .await;
    let first = browser.tab(DESKTOP.0, DESKTOP.1, false, true).await;
    first.goto(&url).await;
    complete(&first).await;

    let second = browser.tab(DESKTOP.0, DESKTOP.1, false, true).await;
    second.goto(&url).await;
    let html = second.html().await;
    assert!(html.contains("This link cannot be opened"), "{html}");
    assert!(html.contains("LAUNCH_USED_OR_UNKNOWN"));
    assert!(!html.contains(&patient.family.to_uppercase()));

    let expiring = start_view(broker, |s| s.launch_ttl = Duration::ZERO).await;
    let stale = expiring
        .launch_url_as(&nhs, |c| c["organisation"] = json!(patient.gp))
        .await;
    second.goto(&stale).await;
    let html = second.html().await;
    assert!(html.contains("LAUNCH_EXPIRED"), "{html}");
    assert!(!html.contains(&patient.family.to_uppercase()));
}

#[tokio::test]
async fn without_scripts_the_page_still_shows_the_whole_record() {
    let Some(browser) = browser("view_browser::without_scripts").await else {
        return;
    };
    let (server, _broker, view) =
        region_view(&small_region(9, 100), Duration::from_secs(3), &[]).await;
    let patient = shared_patient(&server);
    let nhs = patient.nhs_number.as_digits();
    let url = view
        .launch_url_as(&nhs, |c| c["organisation"] = json!(patient.gp))
        .await;
    let tab = browser.tab(DESKTOP.0, DESKTOP.1, false, false).await;
    tab.goto(&url).await;
    let html = complete(&tab).await;
    assert!(html.contains(&patient.family.to_uppercase()));
    assert!(html.contains(&grouped(&nhs)));
    assert!(html.contains("id=\"organisations\""));
    let history = tab.history().await;
    let last = &history.last().expect("a history").0;
    assert!(last.ends_with("/record-complete"), "{history:?}");
    for (u, title) in &history {
        assert!(!u.contains(&nhs) && !title.contains(&nhs), "{u} {title}");
    }
}

#[tokio::test]
async fn axe_core_finds_no_serious_or_critical_violations() {
    let Some(browser) = browser("view_browser::axe_core").await else {
        return;
    };
    let Some(axe) = axe_core() else {
        skip(
            "view_browser::axe_core",
            "axe-core could not be installed with npm (npm install axe-core@4 into target/view-tools); set AXE_CORE_JS to its axe.min.js",
        );
        return;
    };
    let (server, _broker, view) =
        region_view(&small_region(13, 100), Duration::from_secs(3), &[]).await;
    let patient = shared_patient(&server);
    let nhs = patient.nhs_number.as_digits();
    let mut report = Vec::new();
    for (name, (width, height), mobile) in [("desktop", DESKTOP, false), ("phone", PHONE, true)] {
        let url = view
            .launch_url_as(&nhs, |c| c["organisation"] = json!(patient.gp))
            .await;
        let tab = browser.tab(width, height, mobile, true).await;
        tab.goto(&url).await;
        complete(&tab).await;
        tab.eval(&axe).await;
        let violations = tab
            .eval(
                "axe.run(document, {resultTypes: ['violations']}).then(r => r.violations.map(v => \
                   ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(n => n.target.join(' '))})))",
            )
            .await;
        let serious: Vec<&serde_json::Value> = violations
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["impact"] == "serious" || v["impact"] == "critical")
            .collect();
        assert!(
            serious.is_empty(),
            "{name}: serious or critical violations: {serious:#?}"
        );
        report.push(json!({"width": name, "violations": violations}));
        if mobile {
            continue;
        }
        // Keyboard: the first Tab reaches the skip link, which takes focus to the record; the
        // next reaches the one button.
        tab.eval("document.activeElement && document.activeElement.blur()")
            .await;
        tab.press("Tab", 9).await;
        assert_eq!(
            tab.eval("document.activeElement.className").await,
            json!("skip-link")
        );
        tab.press("Tab", 9).await;
        assert_eq!(
            tab.eval("document.activeElement.textContent").await,
            json!("Ask every organisation again")
        );
        tab.eval("document.querySelector('.skip-link').focus()")
            .await;
        tab.press("Enter", 13).await;
        assert_eq!(
            tab.eval("document.activeElement.id").await,
            json!("main"),
            "the skip link takes focus to the record"
        );
        // Print: the form and the skip link are not printed.
        tab.call("Emulation.setEmulatedMedia", json!({"media": "print"}))
            .await
            .expect("print media");
        assert_eq!(
            tab.eval("getComputedStyle(document.querySelector('.header__refresh')).display")
                .await,
            json!("none"),
            "the print stylesheet applies"
        );
    }
    std::fs::write(
        artifacts_dir().join("axe-report.json"),
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    )
    .expect("write the axe report");
}
