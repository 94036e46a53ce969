//! A whole area over real HTTP on 127.0.0.1: thousands of organisations on one shared port
//! (`/org/{code}/fhir`), the record locator, per-organisation faults and counters on the shared
//! port, and the directory and routed broker config written for the broker.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use carerecord_mock_sources::broker_config::parse_directory_csv;
use carerecord_mock_sources::{
    Fault, LOCATOR, LatencyProfile, OrgKind, PatientSummary, Region, RegionServer, RegionSpec,
    ServerOptions,
};
use serde_json::{Value, json};

const NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";
const ODS: &str = "https://fhir.nhs.uk/Id/ods-organization-code";

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

fn zero_latency() -> ServerOptions {
    ServerOptions {
        latency: Some(LatencyProfile::ZERO),
        ..ServerOptions::default()
    }
}

fn area(organisations: usize, patients: usize) -> Arc<Region> {
    let start = Instant::now();
    let region = Region::generate(&RegionSpec {
        seed: 42,
        patients,
        organisations,
        page_size: 5,
    });
    println!(
        "generated {patients} patients x {organisations} organisations in {:?}",
        start.elapsed()
    );
    Arc::new(region)
}

async fn start_shared(region: &Arc<Region>, options: ServerOptions) -> RegionServer {
    let start = Instant::now();
    let server = RegionServer::start_shared(region.clone(), "127.0.0.1".parse().unwrap(), options)
        .await
        .expect("start shared");
    println!(
        "started {} organisations on one port in {:?}",
        region.organisations().len(),
        start.elapsed()
    );
    server
}

async fn get_json(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c.get(url).send().await.expect("response");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json body"))
}

fn temp_file(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "mock-sources-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Patients known to several organisations of different kinds.
fn varied_patients(region: &Region, n: usize) -> Vec<PatientSummary> {
    region
        .patients_known_to_at_least(4)
        .filter(|p| p.conflict.is_none())
        .take(n)
        .collect()
}

#[tokio::test]
async fn shared_port_serves_each_organisation_below_its_own_path() {
    let region = area(3000, 2000);
    let server = start_shared(&region, zero_latency()).await;
    assert!(server.is_shared());
    let c = client();
    let template = server.endpoint_template().expect("shared has a template");
    for o in server.organisations().iter().step_by(97) {
        assert_eq!(o.base_url, template.replace("{code}", &o.code));
    }
    for p in varied_patients(&region, 4) {
        let nhs = p.nhs_number.as_digits();
        for code in &p.organisations {
            let base = &server.organisation(code).unwrap().base_url;
            assert!(base.ends_with(&format!("/org/{code}/fhir")), "{base}");
            let (s, b) = get_json(&c, &format!("{base}/Patient?identifier={NHS}%7C{nhs}")).await;
            assert_eq!((s, &b["total"]), (200, &json!(1)), "{code}");
            let id = b["entry"][0]["resource"]["id"]
                .as_str()
                .unwrap()
                .to_string();
            assert_eq!(
                b["entry"][0]["fullUrl"],
                format!("{base}/Patient/{id}"),
                "fullUrl keeps the /org prefix"
            );
            assert_eq!(
                Some(&id),
                region.patient_id_at(&p.nhs_number, code).as_ref()
            );

            // $everything, one resource a page, following `next` links to the end.
            let mut url = format!("{base}/Patient/{id}/$everything?_count=1");
            let mut seen = HashSet::new();
            let total = loop {
                let (s, b) = get_json(&c, &url).await;
                assert_eq!(s, 200, "{url}");
                let total = b["total"].as_u64().unwrap();
                for e in b["entry"].as_array().into_iter().flatten() {
                    assert!(e["fullUrl"].as_str().unwrap().starts_with(base.as_str()));
                    // A referenced Medication rides with every page that references it.
                    if e["search"]["mode"] == "match" {
                        assert!(seen.insert(e["fullUrl"].as_str().unwrap().to_string()));
                    }
                }
                let next = b["link"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|l| l["relation"] == "next")
                    .map(|l| l["url"].as_str().unwrap().to_string());
                match next {
                    Some(n) => {
                        assert!(
                            n.starts_with(&format!("{base}/Patient/{id}/$everything?")),
                            "{n}"
                        );
                        url = n;
                    }
                    None => break total,
                }
            };
            assert!(total >= 1);
            assert_eq!(seen.len() as u64, total, "{code}");

            // A batch with relative and rooted entry URLs.
            let rooted = format!("/org/{code}/fhir/Condition?patient={id}");
            let body = json!({
                "resourceType": "Bundle",
                "type": "batch",
                "entry": [
                    { "request": { "method": "GET", "url": format!("Condition?patient={id}") } },
                    { "request": { "method": "GET", "url": rooted } },
                ],
            });
            let r = c.post(base).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let b: Value = r.json().await.unwrap();
            assert_eq!(b["type"], "batch-response");
            assert_eq!(b["entry"][0]["response"]["status"], "200 OK");
            assert_eq!(b["entry"][1]["response"]["status"], "200 OK", "{rooted}");
            assert_eq!(
                b["entry"][0]["resource"]["total"],
                b["entry"][1]["resource"]["total"]
            );
        }
        // An organisation that does not know the patient finds nothing.
        let stranger = server
            .organisations()
            .into_iter()
            .find(|o| !p.organisations.contains(&o.code))
            .unwrap();
        let (_, b) = get_json(
            &c,
            &format!("{}/Patient?identifier={NHS}|{nhs}", stranger.base_url),
        )
        .await;
        assert_eq!(b["total"], 0);
    }
    // Unknown organisations and paths outside `/fhir` are FHIR 404s.
    let origin = template.split("/org/").next().unwrap().to_string();
    for path in ["/org/NOPE/fhir/metadata", "/org/RJ1/other", "/elsewhere"] {
        let (s, b) = get_json(&c, &format!("{origin}{path}")).await;
        assert_eq!(
            (s, b["resourceType"].as_str()),
            (404, Some("OperationOutcome")),
            "{path}"
        );
    }
    let (s, b) = get_json(&c, &format!("{origin}/org/rj1/fhir/metadata")).await;
    assert_eq!(
        (s, &b["resourceType"]),
        (200, &json!("CapabilityStatement"))
    );
    server.shutdown().await;
}

#[tokio::test]
async fn the_locator_names_the_gp_and_exactly_the_organisations_that_know_the_patient() {
    let region = area(3000, 2000);
    let server = start_shared(&region, zero_latency()).await;
    let c = client();
    let locator = server.locator_url();
    assert!(locator.ends_with("/locator/fhir"));
    for p in region
        .patients()
        .step_by(97)
        .chain(varied_patients(&region, 5))
    {
        let nhs = p.nhs_number.as_digits();
        let (s, b) = get_json(&c, &format!("{locator}/Patient?identifier={NHS}|{nhs}")).await;
        assert_eq!(
            (s, &b["type"], &b["total"]),
            (200, &json!("searchset"), &json!(1))
        );
        let patient = &b["entry"][0]["resource"];
        assert_eq!(patient["resourceType"], "Patient");
        assert_eq!(patient["id"], nhs.as_str());
        assert_eq!(patient["identifier"][0]["value"], nhs.as_str());
        assert_eq!(patient["name"][0]["family"], p.family.as_str());
        assert_eq!(patient["birthDate"], p.birth_date.as_str());
        assert_eq!(
            patient["generalPractitioner"],
            json!([{ "identifier": { "system": ODS, "value": p.gp } }])
        );

        for q in [
            format!("subject:identifier={NHS}%7C{nhs}"),
            format!("subject:identifier={NHS}|{nhs}"),
            format!("patient:identifier={NHS}|{nhs}"),
        ] {
            let (s, b) = get_json(&c, &format!("{locator}/DocumentReference?{q}")).await;
            assert_eq!(s, 200);
            assert_eq!(b["type"], "searchset");
            let entries = b["entry"].as_array().unwrap();
            let custodians: Vec<&str> = entries
                .iter()
                .map(|e| {
                    e["resource"]["custodian"]["identifier"]["value"]
                        .as_str()
                        .unwrap()
                })
                .collect();
            assert_eq!(custodians, p.organisations, "{q}");
            assert_eq!(b["total"], p.organisations.len());
            for e in entries {
                let d = &e["resource"];
                let code = d["custodian"]["identifier"]["value"].as_str().unwrap();
                assert_eq!(d["resourceType"], "DocumentReference");
                assert_eq!(d["status"], "current");
                assert_eq!(d["custodian"]["identifier"]["system"], ODS);
                assert_eq!(
                    d["subject"],
                    json!({ "identifier": { "system": NHS, "value": nhs } })
                );
                assert_eq!(d["type"]["coding"][0]["system"], "http://snomed.info/sct");
                // The patient's record at the organisation: its endpoint, then its own id.
                let url = d["content"][0]["attachment"]["url"].as_str().unwrap();
                let base = &server.organisation(code).unwrap().base_url;
                let id = url
                    .strip_prefix(&format!("{base}/Patient/"))
                    .unwrap_or_else(|| panic!("{url} is not a Patient at {base}"));
                assert!(
                    id.starts_with(&format!("{}-", code.to_ascii_lowercase())),
                    "{url}"
                );
                assert_eq!(
                    e["fullUrl"],
                    format!("{locator}/DocumentReference/{}", d["id"].as_str().unwrap())
                );
            }
        }
    }
    // Nobody knows the unknown patient: empty bundles, not errors.
    let unknown = region.unknown_nhs_number().as_digits();
    for path in [
        format!("Patient?identifier={NHS}|{unknown}"),
        format!("DocumentReference?subject:identifier={NHS}%7C{unknown}"),
        "DocumentReference?subject:identifier=not-a-number".to_string(),
    ] {
        let (s, b) = get_json(&c, &format!("{locator}/{path}")).await;
        assert_eq!((s, &b["total"]), (200, &json!(0)), "{path}");
        assert!(b.get("entry").is_none());
    }
    server.shutdown().await;
}

#[tokio::test]
async fn stats_faults_and_latency_are_per_organisation_and_for_the_locator() {
    let region = area(3000, 1000);
    let server = start_shared(&region, zero_latency()).await;
    let c = client();
    let faults = server.faults();
    let p = varied_patients(&region, 1).remove(0);
    let nhs = p.nhs_number.as_digits();
    let locator = server.locator_url();
    faults.reset_stats();

    get_json(&c, &format!("{locator}/Patient?identifier={NHS}|{nhs}")).await;
    get_json(
        &c,
        &format!("{locator}/DocumentReference?subject:identifier={NHS}|{nhs}"),
    )
    .await;
    for code in &p.organisations {
        let base = &server.organisation(code).unwrap().base_url;
        get_json(&c, &format!("{base}/Patient?identifier={NHS}|{nhs}")).await;
    }
    let s = server.stats(LOCATOR).unwrap();
    assert_eq!(
        (s.requests, s.patient_searches, s.resource_searches),
        (2, 1, 1)
    );
    assert_eq!(s.searches_by_type.get("DocumentReference"), Some(&1));
    for code in &p.organisations {
        let s = server.stats(code).unwrap();
        assert_eq!((s.requests, s.patient_searches), (1, 1), "{code}");
    }
    let asked: usize = server
        .organisations()
        .iter()
        .map(|o| server.stats(&o.code).unwrap().requests as usize)
        .sum();
    assert_eq!(
        asked,
        p.organisations.len(),
        "no other organisation was asked"
    );

    // Faults: the locator and one organisation, independently.
    faults.set_fault(LOCATOR, Fault::Http500).unwrap();
    let gp_base = server.organisation(&p.gp).unwrap().base_url.clone();
    faults.set_fault(&p.gp, Fault::EmptyBundle).unwrap();
    let (s, b) = get_json(
        &c,
        &format!("{locator}/DocumentReference?subject:identifier={NHS}|{nhs}"),
    )
    .await;
    assert_eq!((s, &b["resourceType"]), (500, &json!("OperationOutcome")));
    assert_eq!(server.stats(LOCATOR).unwrap().faulted, 1);
    let (_, b) = get_json(&c, &format!("{gp_base}/Patient?identifier={NHS}|{nhs}")).await;
    assert_eq!(b["total"], 0, "empty_bundle at the GP");
    let other = &server.organisation(&p.organisations[1]).unwrap().base_url;
    let (_, b) = get_json(&c, &format!("{other}/Patient?identifier={NHS}|{nhs}")).await;
    assert_eq!(
        b["total"], 1,
        "the next organisation on the same port is unaffected"
    );

    // set_fault_all is for organisations; the locator keeps its own, and clear_faults clears it.
    faults.set_fault_all(Fault::Http500);
    assert_eq!(faults.fault(LOCATOR), Some(Fault::Http500));
    faults.set_fault(LOCATOR, Fault::None).unwrap();
    let (s, _) = get_json(&c, &format!("{locator}/Patient?identifier={NHS}|{nhs}")).await;
    assert_eq!(s, 200, "the locator answers while every organisation fails");
    faults.set_fault(LOCATOR, Fault::Hang).unwrap();
    faults.clear_faults();
    assert_eq!(faults.fault(LOCATOR), Some(Fault::None));

    // Latency for the locator only.
    faults
        .set_latency(LOCATOR, LatencyProfile::Fixed { ms: 150 })
        .unwrap();
    let t = Instant::now();
    get_json(&c, &format!("{locator}/Patient?identifier={NHS}|{nhs}")).await;
    assert!(t.elapsed() >= Duration::from_millis(150));
    let t = Instant::now();
    get_json(&c, &format!("{gp_base}/Patient?identifier={NHS}|{nhs}")).await;
    assert!(t.elapsed() < Duration::from_millis(150));

    // The admin API addresses the locator as LOCATOR and reports its counters.
    let admin = server.admin_url();
    let r = c
        .put(format!("{admin}/organisations/LOCATOR/fault"))
        .json(&json!({ "fault": "empty_bundle" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["code"].as_str(), v["fault"].as_str()),
        (Some("LOCATOR"), Some("empty_bundle"))
    );
    assert_eq!(v["base_url"], locator.as_str());
    let (_, b) = get_json(
        &c,
        &format!("{locator}/DocumentReference?subject:identifier={NHS}|{nhs}"),
    )
    .await;
    assert_eq!(b["total"], 0);
    let (_, stats) = get_json(&c, &format!("{admin}/stats")).await;
    assert_eq!(
        stats["LOCATOR"]["requests"],
        server.stats(LOCATOR).unwrap().requests
    );
    assert_eq!(stats.as_object().unwrap().len(), 3001);
    server.shutdown().await;
}

#[tokio::test]
async fn missing_pointers_are_left_out_reproducibly() {
    let region = area(200, 500);
    let options = ServerOptions {
        locator_missing_pointers: 0.3,
        ..zero_latency()
    };
    let server = start_shared(&region, options).await;
    let c = client();
    let (mut all, mut named) = (0, 0);
    for p in region.patients().take(80) {
        let nhs = p.nhs_number.as_digits();
        let (_, b) = get_json(
            &c,
            &format!(
                "{}/DocumentReference?subject:identifier={NHS}|{nhs}",
                server.locator_url()
            ),
        )
        .await;
        let custodians: Vec<String> = b["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                e["resource"]["custodian"]["identifier"]["value"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(custodians, server.located_organisations(&p.nhs_number));
        assert!(custodians.iter().all(|c| p.organisations.contains(c)));
        all += p.organisations.len();
        named += custodians.len();
    }
    assert!(named < all, "some pointers are missing ({named} of {all})");
    let bad = ServerOptions {
        locator_missing_pointers: 1.5,
        ..ServerOptions::default()
    };
    assert!(
        RegionServer::start_shared(region, "127.0.0.1".parse().unwrap(), bad)
            .await
            .is_err()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn directory_and_routed_config_round_trip() {
    let region = area(3000, 500);
    let server = start_shared(&region, zero_latency()).await;
    let path = temp_file("organisations.csv");
    server.write_directory(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("organisation_code,organisation_name,kind,base_url\n"));
    let rows = parse_directory_csv(&text).expect("the directory parses");
    assert_eq!(rows.len(), 3000);
    let mut quoted = 0;
    for (row, o) in rows.iter().zip(region.organisations()) {
        assert_eq!(row.organisation_code, o.code);
        assert_eq!(row.organisation_name, o.name);
        assert_eq!(row.kind, o.kind);
        assert_eq!(
            row.base_url, "",
            "the endpoint template covers shared organisations"
        );
        if o.name.contains(',') {
            quoted += 1;
            assert!(text.contains(&format!("{},\"{}\",", o.code, o.name)));
        }
    }
    assert!(
        quoted > 100,
        "care homes named with their town are quoted ({quoted})"
    );
    for kind in [
        "gp_practice",
        "acute_trust",
        "mental_health_trust",
        "ambulance_service",
        "care_home",
    ] {
        assert!(text.contains(&format!(",{kind},")), "{kind}");
    }

    let config = server.broker_config_toml_routed("127.0.0.1:50051", &path);
    println!("{config}");
    assert!(config.starts_with("# Written by mock-sources: a routed"));
    let v: toml::Table = toml::from_str(&config).expect("valid TOML");
    assert_eq!(v["server"]["listen"].as_str(), Some("127.0.0.1:50051"));
    assert_eq!(v["server"]["plaintext"].as_bool(), Some(true));
    assert_eq!(v["routing"]["mode"].as_str(), Some("located"));
    let always: Vec<&str> = v["routing"]["always_ask"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(always, server.always_ask());
    assert_eq!(always, ["RJ1", "R1F", "RYA"]);
    let loc = &v["routing"]["locators"].as_array().unwrap()[0];
    assert_eq!(
        loc["base_url"].as_str(),
        Some(server.locator_url().as_str())
    );
    let file = v["directory"]["file"].as_str().unwrap();
    assert!(std::path::Path::new(file).is_absolute());
    assert_eq!(std::path::Path::new(file), path);
    assert_eq!(
        v["directory"]["endpoint_template"].as_str(),
        server.endpoint_template().as_deref()
    );
    assert_eq!(v["directory"]["mode"].as_str(), Some("everything"));
    assert!(v.get("sources").is_none());
    let _ = std::fs::remove_file(&path);
    server.shutdown().await;
}

#[tokio::test]
async fn per_port_regions_have_a_locator_and_a_directory_with_urls() {
    let region = area(10, 300);
    let server =
        RegionServer::start_with(region.clone(), "127.0.0.1".parse().unwrap(), zero_latency())
            .await
            .unwrap();
    assert!(!server.is_shared());
    assert_eq!(server.endpoint_template(), None);
    let c = client();
    let p = region.patients_known_to_at_least(3).next().unwrap();
    let nhs = p.nhs_number.as_digits();
    let (_, b) = get_json(
        &c,
        &format!(
            "{}/DocumentReference?subject:identifier={NHS}|{nhs}",
            server.locator_url()
        ),
    )
    .await;
    let urls: Vec<&str> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["resource"]["content"][0]["attachment"]["url"]
                .as_str()
                .unwrap()
        })
        .collect();
    let want: Vec<String> = p
        .organisations
        .iter()
        .map(|c| server.organisation(c).unwrap().base_url.clone())
        .collect();
    let bases: Vec<&str> = urls
        .iter()
        .map(|u| u.split_once("/Patient/").map_or(*u, |(base, _)| base))
        .collect();
    assert_eq!(
        bases, want,
        "each the patient's record at that organisation: {urls:?}"
    );
    assert!(urls.iter().all(|u| !u.contains("/org/")), "{urls:?}");
    assert_eq!(server.stats(LOCATOR).unwrap().requests, 1);

    let rows = parse_directory_csv(&server.directory_csv()).unwrap();
    assert_eq!(rows.len(), 10);
    for (row, o) in rows.iter().zip(server.organisations()) {
        assert_eq!(row.base_url, o.base_url);
    }
    let path = temp_file("dir.csv");
    let config = server.broker_config_toml_routed("127.0.0.1:0", &path);
    let v: toml::Table = toml::from_str(&config).unwrap();
    assert!(v["directory"].get("endpoint_template").is_none());
    assert_eq!(
        region
            .organisations()
            .iter()
            .filter(|o| o.kind == OrgKind::AcuteTrust)
            .count(),
        2
    );
    server.shutdown().await;
}
