//! The clinical-safety fault and data modes of a running region, over real HTTP on 127.0.0.1,
//! switched through the admin API as ops and the demo do: `wrong_patient`,
//! `wrong_patient_refs`, `ignore_include` (with `GET Medication/{id}`), the clinical conflict
//! data mode, and the data variety real servers send (drug references, verification status,
//! "no known allergy", several codings, security labels, authorisations and issues).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use carerecord_mock_sources::{
    LatencyProfile, OrgKind, PatientSummary, Region, RegionServer, RegionSpec, ServerOptions,
};
use serde_json::{Value, json};

const NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

fn spec() -> RegionSpec {
    RegionSpec {
        seed: 42,
        patients: 600,
        organisations: 10,
        page_size: 5,
    }
}

async fn start() -> (Arc<Region>, RegionServer) {
    let region = Arc::new(Region::generate(&spec()));
    let options = ServerOptions {
        latency: Some(LatencyProfile::ZERO),
        ..ServerOptions::default()
    };
    let server = RegionServer::start_with(region.clone(), "127.0.0.1".parse().unwrap(), options)
        .await
        .expect("start");
    (region, server)
}

fn base(server: &RegionServer, code: &str) -> String {
    server.organisation(code).expect("org").base_url.clone()
}

async fn get_json(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c.get(url).send().await.expect("response");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json body"))
}

async fn admin_put(c: &reqwest::Client, server: &RegionServer, path: &str, body: Value) {
    let r = c
        .put(format!("{}/{path}", server.admin_url()))
        .json(&body)
        .send()
        .await
        .expect("admin");
    assert_eq!(r.status().as_u16(), 200, "PUT {path} {body}");
}

async fn admin_reset(c: &reqwest::Client, server: &RegionServer) {
    let r = c
        .post(format!("{}/reset", server.admin_url()))
        .send()
        .await
        .expect("admin reset");
    assert_eq!(r.status().as_u16(), 200);
}

/// Every resource of a search or `$everything`, following `next` links.
async fn all_pages(c: &reqwest::Client, first: String) -> Vec<Value> {
    let mut out = Vec::new();
    let mut url = Some(first);
    while let Some(u) = url {
        let (status, b) = get_json(c, &u).await;
        assert_eq!(status, 200, "{u}: {b}");
        out.extend(
            b["entry"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|e| e["resource"].clone()),
        );
        url = b["link"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["relation"] == "next"))
            .and_then(|l| l["url"].as_str())
            .map(String::from);
    }
    out
}

/// The Patient reference a clinical resource is about.
fn patient_ref(r: &Value) -> Option<String> {
    let field = match r["resourceType"].as_str()? {
        "AllergyIntolerance" => &r["patient"],
        "Appointment" => &r["participant"][0]["actor"],
        "Patient" | "Medication" => return None,
        _ => &r["subject"],
    };
    field["reference"].as_str().map(String::from)
}

/// A patient known to the GP and an acute trust.
fn shared_patient(region: &Region) -> PatientSummary {
    region
        .patients_known_to_at_least(2)
        .find(|p| {
            p.organisations
                .iter()
                .any(|c| region.organisation(c).unwrap().kind == OrgKind::AcuteTrust)
        })
        .expect("a patient known to GP and hospital")
}

async fn patient_id(c: &reqwest::Client, base: &str, nhs: &str) -> String {
    let (_, b) = get_json(c, &format!("{base}/Patient?identifier={NHS}|{nhs}")).await;
    b["entry"][0]["resource"]["id"]
        .as_str()
        .expect("the patient is found")
        .to_string()
}

#[tokio::test]
async fn wrong_patient_answers_with_another_persons_record_until_switched_off() {
    let (region, server) = start().await;
    let c = client();
    let p = shared_patient(&region);
    let gp = base(&server, &p.gp);
    let nhs = p.nhs_number.as_digits();
    let id = patient_id(&c, &gp, &nhs).await;
    let other = region
        .wrong_patient_at(&p.nhs_number, &p.gp)
        .expect("someone else at the GP");
    assert_ne!(other.nhs_number, p.nhs_number);
    let other_id = region.patient_id_at(&other.nhs_number, &p.gp).unwrap();

    let everything = format!("{gp}/Patient/{id}/$everything?_count=100");
    let right = all_pages(&c, everything.clone()).await;
    assert!(
        right
            .iter()
            .filter_map(patient_ref)
            .all(|r| r == format!("Patient/{id}"))
    );

    admin_put(
        &c,
        &server,
        &format!("organisations/{}/fault", p.gp),
        json!({"fault": "wrong_patient"}),
    )
    .await;
    // The match by NHS number is still right...
    assert_eq!(patient_id(&c, &gp, &nhs).await, id);
    // ...but everything about them is someone else.
    let wrong = all_pages(&c, everything.clone()).await;
    let who = &wrong[0];
    assert_eq!(who["resourceType"], "Patient");
    assert_eq!(who["id"], other_id.as_str());
    assert_eq!(who["identifier"][0]["value"], other.nhs_number.as_digits());
    assert_ne!(who["identifier"][0]["value"], nhs.as_str());
    let refs: BTreeSet<String> = wrong.iter().filter_map(patient_ref).collect();
    assert_eq!(refs, BTreeSet::from([format!("Patient/{other_id}")]));
    let (_, conditions) = get_json(&c, &format!("{gp}/Condition?patient={id}&_count=100")).await;
    for e in conditions["entry"].as_array().into_iter().flatten() {
        assert_eq!(
            patient_ref(&e["resource"]),
            Some(format!("Patient/{other_id}"))
        );
    }

    admin_put(
        &c,
        &server,
        "organisations/all/fault",
        json!({"fault": "wrong_patient_refs"}),
    )
    .await;
    let mixed = all_pages(&c, everything.clone()).await;
    assert_eq!(mixed[0]["id"], id.as_str(), "the Patient is right");
    let refs: BTreeSet<String> = mixed.iter().filter_map(patient_ref).collect();
    assert!(refs.contains(&format!("Patient/{id}")), "{refs:?}");
    assert!(
        refs.contains(&format!("Patient/{other_id}")),
        "some resources point elsewhere: {refs:?}"
    );

    admin_reset(&c, &server).await;
    assert_eq!(all_pages(&c, everything).await, right, "reset restores");
}

/// A MedicationRequest's drug: inline, contained or `Medication/{id}`.
fn drug_reference(r: &Value) -> Option<&str> {
    r["medicationReference"]["reference"].as_str()
}

#[tokio::test]
async fn ignore_include_leaves_medications_to_be_read_by_id() {
    let (region, server) = start().await;
    let c = client();
    // A GP patient with prescriptions.
    let (p, gp, id) = {
        let mut found = None;
        for p in region.patients() {
            let gp = base(&server, &p.gp);
            let id = region.patient_id_at(&p.nhs_number, &p.gp).unwrap();
            let (_, b) = get_json(&c, &format!("{gp}/MedicationRequest?patient={id}")).await;
            if b["total"].as_u64().unwrap_or(0) > 0 {
                found = Some((p, gp, id));
                break;
            }
        }
        found.expect("someone has a prescription")
    };
    let search = format!(
        "{gp}/MedicationRequest?patient={id}&_include=MedicationRequest:medication&_count=100"
    );

    let code = p.gp.clone();
    admin_put(
        &c,
        &server,
        &format!("organisations/{code}/fault"),
        json!({"fault": "ignore_include"}),
    )
    .await;
    let (_, b) = get_json(&c, &search).await;
    let entries = b["entry"].as_array().cloned().unwrap_or_default();
    assert!(!entries.is_empty());
    assert!(
        entries
            .iter()
            .all(|e| e["resource"]["resourceType"] == "MedicationRequest"),
        "no Medication is included"
    );
    for e in &entries {
        let r = &e["resource"];
        assert!(r.get("medicationCodeableConcept").is_none());
        assert!(r.get("contained").is_none());
        let target = drug_reference(r).expect("a medicationReference");
        assert!(target.starts_with("Medication/"), "{target}");
        let (status, m) = get_json(&c, &format!("{gp}/{target}")).await;
        assert_eq!(status, 200, "{target} is readable by id");
        assert_eq!(m["resourceType"], "Medication");
        assert!(m["code"]["coding"][0]["code"].is_string());
    }
    let everything = all_pages(&c, format!("{gp}/Patient/{id}/$everything")).await;
    assert!(
        everything.iter().all(|r| r["resourceType"] != "Medication"),
        "nor does $everything carry them"
    );
    // Still readable once the fault is off.
    let target = drug_reference(&entries[0]["resource"]).unwrap().to_string();
    admin_reset(&c, &server).await;
    let (status, _) = get_json(&c, &format!("{gp}/{target}")).await;
    assert_eq!(status, 200);
    let (status, _) = get_json(&c, &format!("{gp}/Medication?code=x")).await;
    assert_eq!(status, 404, "Medication is read, never searched");
}

#[tokio::test]
async fn medicines_are_named_inline_contained_or_by_an_included_reference() {
    let (region, server) = start().await;
    let c = client();
    let mut seen = BTreeSet::new();
    for p in region.patients_known_to_at_least(2).take(80) {
        for code in &p.organisations {
            let b = base(&server, code);
            let id = region.patient_id_at(&p.nhs_number, code).unwrap();
            let (_, page) = get_json(
                &c,
                &format!(
                    "{b}/MedicationRequest?patient={id}&_include=MedicationRequest:medication&_count=3"
                ),
            )
            .await;
            let entries = page["entry"].as_array().cloned().unwrap_or_default();
            let included: BTreeSet<String> = entries
                .iter()
                .filter(|e| e["search"]["mode"] == "include")
                .map(|e| format!("Medication/{}", e["resource"]["id"].as_str().unwrap()))
                .collect();
            for e in entries.iter().filter(|e| e["search"]["mode"] == "match") {
                let r = &e["resource"];
                match drug_reference(r) {
                    None => {
                        assert!(r["medicationCodeableConcept"].is_object());
                        seen.insert("inline");
                    }
                    Some(local) if local.starts_with('#') => {
                        assert_eq!(r["contained"][0]["id"], &local[1..]);
                        seen.insert("contained");
                    }
                    Some(other) => {
                        assert!(
                            included.contains(other),
                            "{other} is included on the page that references it"
                        );
                        seen.insert("included");
                    }
                }
            }
        }
    }
    assert_eq!(
        seen,
        BTreeSet::from(["contained", "included", "inline"]),
        "every naming is served somewhere"
    );
}

/// The resource in `resources` coded `code` (allergy or condition code, or the drug).
fn coded<'a>(resources: &'a [Value], rt: &str, code: &str) -> Vec<&'a Value> {
    resources
        .iter()
        .filter(|r| r["resourceType"] == rt)
        .filter(|r| {
            ["code", "medicationCodeableConcept"].iter().any(|f| {
                r[*f]["coding"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["code"] == code))
            })
        })
        .collect()
}

async fn everything_of(
    c: &reqwest::Client,
    server: &RegionServer,
    region: &Region,
    p: &PatientSummary,
    code: &str,
) -> Vec<Value> {
    let id = region.patient_id_at(&p.nhs_number, code).expect("known");
    all_pages(
        c,
        format!("{}/Patient/{id}/$everything?_count=100", base(server, code)),
    )
    .await
}

#[tokio::test]
async fn conflict_mode_makes_the_gp_and_the_other_organisation_disagree_until_reset() {
    let (region, server) = start().await;
    let c = client();
    let (_, listed) = get_json(&c, &format!("{}/conflicts?limit=200", server.admin_url())).await;
    let listed = listed.as_array().cloned().unwrap_or_default();
    let patients: Vec<PatientSummary> = region.patients_with_clinical_conflicts().collect();
    assert!(patients.len() >= 10, "{}", patients.len());
    assert_eq!(listed.len(), patients.len().min(200));
    assert_eq!(
        listed[0]["nhs_number"],
        patients[0].nhs_number.as_digits(),
        "the admin API lists the same patients as the library"
    );

    // One patient of each kind the region has.
    let mut by_kind = std::collections::BTreeMap::new();
    for p in &patients {
        let conflict = p.clinical_conflict.clone().unwrap();
        by_kind
            .entry(format!("{:?}", conflict.kind))
            .or_insert((p.clone(), conflict));
    }
    assert!(by_kind.len() >= 4, "{:?}", by_kind.keys());

    let mut before = Vec::new();
    for (p, conflict) in by_kind.values() {
        before.push(everything_of(&c, &server, &region, p, &conflict.organisation).await);
    }
    admin_put(
        &c,
        &server,
        "organisations/all/data",
        json!({"data": "conflicts"}),
    )
    .await;
    for (kind, (p, conflict)) in &by_kind {
        let gp = everything_of(&c, &server, &region, p, &conflict.gp).await;
        let other = everything_of(&c, &server, &region, p, &conflict.organisation).await;
        let code = conflict.code.as_str();
        let status = |r: &Value, f: &str| r[f]["coding"][0]["code"].as_str().map(String::from);
        match kind.as_str() {
            "AllergyResolved" | "AllergyRefuted" => {
                let at_gp = coded(&gp, "AllergyIntolerance", code);
                let there = coded(&other, "AllergyIntolerance", code);
                assert_eq!(
                    status(at_gp[0], "clinicalStatus").as_deref(),
                    Some("active")
                );
                let want = if kind == "AllergyResolved" {
                    ("resolved", "confirmed")
                } else {
                    ("inactive", "refuted")
                };
                assert_eq!(
                    (
                        status(there[0], "clinicalStatus").as_deref(),
                        status(there[0], "verificationStatus").as_deref()
                    ),
                    (Some(want.0), Some(want.1)),
                    "{kind}"
                );
            }
            "NoKnownAllergy" => {
                assert_eq!(coded(&gp, "AllergyIntolerance", "716186003").len(), 1);
                assert!(coded(&gp, "AllergyIntolerance", code).is_empty());
                let there = coded(&other, "AllergyIntolerance", code);
                assert_eq!(
                    status(there[0], "clinicalStatus").as_deref(),
                    Some("active")
                );
            }
            "MedicineStopped" => {
                let at_gp = coded(&gp, "MedicationStatement", code);
                let there = coded(&other, "MedicationStatement", code);
                assert_eq!(at_gp[0]["status"], "active");
                assert_eq!(there[0]["status"], "stopped");
            }
            "Dosage" => {
                let at_gp = coded(&gp, "MedicationStatement", code);
                let there = coded(&other, "MedicationStatement", code);
                assert_eq!(at_gp[0]["dosage"][0]["text"], conflict.gp_says.as_str());
                assert_eq!(
                    there[0]["dosage"][0]["text"],
                    conflict.organisation_says.as_str()
                );
                assert_ne!(conflict.gp_says, conflict.organisation_says);
            }
            other => panic!("unexpected kind {other}"),
        }
    }
    admin_reset(&c, &server).await;
    for ((p, conflict), was) in by_kind.values().zip(&before) {
        let now = everything_of(&c, &server, &region, p, &conflict.organisation).await;
        assert_eq!(&now, was, "reset restores");
    }
}

#[tokio::test]
async fn the_population_carries_the_variety_real_records_do_deterministically() {
    let (region, server) = start().await;
    let (_, again) = start().await;
    let c = client();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for p in region.patients().take(250) {
        let gp = everything_of(&c, &server, &region, &p, &p.gp).await;
        let twin = everything_of(&c, &again, &region, &p, &p.gp).await;
        let text = |rs: &[Value], s: &RegionServer| {
            serde_json::to_string(rs)
                .unwrap()
                .replace(&base(s, &p.gp), "BASE")
        };
        assert!(
            text(&gp, &server) == text(&twin, &again),
            "the same seed serves the same record (bar the server's address)"
        );
        for r in &gp {
            let rt = r["resourceType"].as_str().unwrap_or("");
            if let Some(v) = r["verificationStatus"]["coding"][0]["code"].as_str() {
                seen.insert(format!("{rt} {v}"));
                if v == "entered-in-error" {
                    assert!(r.get("clinicalStatus").is_none(), "con-5/ait-2: {r}");
                } else {
                    assert!(r["clinicalStatus"].is_object(), "con-3/ait-1: {r}");
                }
                if v == "refuted" {
                    assert_eq!(r["clinicalStatus"]["coding"][0]["code"], "inactive");
                }
            }
            if r["code"]["coding"][0]["code"] == "716186003" {
                seen.insert("no known allergy".into());
            }
            if r["code"]["coding"].as_array().is_some_and(|c| c.len() > 1) {
                seen.insert(format!("{rt} with several codings"));
            }
            if r["meta"]["security"].is_array() {
                seen.insert(format!("{rt} with a security label"));
            }
            if let Some(sev) = r["reaction"][0]["severity"].as_str() {
                seen.insert(format!("severity {sev}"));
            }
            if rt == "MedicationRequest" {
                seen.insert(format!(
                    "MedicationRequest {}",
                    r["intent"].as_str().unwrap()
                ));
                if r["basedOn"].is_array() {
                    assert!(r["dispenseRequest"]["validityPeriod"]["start"].is_string());
                    seen.insert("issue based on an authorisation".into());
                }
            }
        }
    }
    for want in [
        "Condition confirmed",
        "Condition provisional",
        "Condition unconfirmed",
        "Condition refuted",
        "Condition entered-in-error",
        "AllergyIntolerance confirmed",
        "AllergyIntolerance unconfirmed",
        "AllergyIntolerance refuted",
        "no known allergy",
        "Condition with several codings",
        "Condition with a security label",
        "severity mild",
        "severity moderate",
        "MedicationRequest plan",
        "MedicationRequest order",
        "issue based on an authorisation",
    ] {
        assert!(seen.contains(want), "{want} missing from {seen:?}");
    }
}

#[tokio::test]
async fn a_long_record_spans_pages_at_a_small_count() {
    let (region, server) = start().await;
    let c = client();
    let p = region
        .patients_known_to_at_least(2)
        .find(|p| p.clinical_conflict.is_none())
        .unwrap();
    let id = region.patient_id_at(&p.nhs_number, &p.gp).unwrap();
    let (_, first) = get_json(
        &c,
        &format!("{}/Patient/{id}/$everything?_count=3", base(&server, &p.gp)),
    )
    .await;
    assert!(first["total"].as_u64().unwrap() > 3);
    assert!(
        first["link"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["relation"] == "next"),
        "a next link: the record is longer than a page"
    );
}

#[tokio::test]
async fn the_admin_api_validates_data_modes_and_names_the_wrong_patient() {
    let (region, server) = start().await;
    let c = client();
    let admin = server.admin_url();
    let p = shared_patient(&region);
    let r = c
        .put(format!("{admin}/organisations/{}/data", p.gp))
        .json(&json!({"data": "chaos"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = c
        .put(format!("{admin}/organisations/NOPE/data"))
        .body("conflicts")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = c
        .put(format!("{admin}/organisations/{}/data", p.gp))
        .body("conflicts")
        .send()
        .await
        .unwrap();
    let shown: Value = r.json().await.unwrap();
    assert_eq!(shown["data"], "conflicts", "a bare spec works too");
    assert_eq!(shown["fault"], "none");

    let (status, who) = get_json(
        &c,
        &format!(
            "{admin}/patients/{}/wrong-patient/{}",
            p.nhs_number.as_digits(),
            p.gp
        ),
    )
    .await;
    assert_eq!(status, 200);
    let other = region.wrong_patient_at(&p.nhs_number, &p.gp).unwrap();
    assert_eq!(who["nhs_number"], other.nhs_number.as_digits());
    assert_eq!(
        who["patient_id"],
        region.patient_id_at(&other.nhs_number, &p.gp).unwrap()
    );
    let (status, _) = get_json(&c, &format!("{admin}/patients/123/wrong-patient/{}", p.gp)).await;
    assert_eq!(status, 404);
}
