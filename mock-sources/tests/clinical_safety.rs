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
