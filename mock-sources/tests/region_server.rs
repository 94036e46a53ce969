//! End-to-end behaviour of a running region over real HTTP on 127.0.0.1: search, paging,
//! `$everything`, batch, every fault kind as a client observes it, the admin API and counters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use carerecord_mock_sources::{
    Fault, LatencyProfile, OrgKind, PatientSummary, Region, RegionServer, RegionSpec, ServerOptions,
};
use serde_json::{Value, json};

const NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";

fn client() -> reqwest::Client {
    // reqwest is built without a default TLS provider; plain HTTP still needs one installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

async fn start() -> (Arc<Region>, RegionServer) {
    let region = Arc::new(Region::generate(&RegionSpec {
        seed: 42,
        patients: 600,
        organisations: 10,
        page_size: 5,
    }));
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

/// A patient known to the GP and an acute trust, with plenty of resources at the GP.
fn rich_patient(region: &Region) -> PatientSummary {
    region
        .patients_known_to_at_least(2)
        .find(|p| {
            p.organisations
                .iter()
                .any(|c| region.organisation(c).unwrap().kind == OrgKind::AcuteTrust)
                && p.conflict.is_none()
        })
        .expect("a patient known to GP and hospital")
}

#[tokio::test]
async fn patient_search_finds_the_patient_only_where_they_are_known() {
    let (region, server) = start().await;
    let c = client();
    let p = rich_patient(&region);
    let nhs = p.nhs_number.as_digits();
    for org in server.organisations() {
        for query in [
            format!("{NHS}%7C{nhs}"),
            format!("{NHS}|{nhs}"),
            nhs.clone(),
        ] {
            let r = c
                .get(format!("{}/Patient?identifier={query}", org.base_url))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["content-type"], "application/fhir+json");
            let b: Value = r.json().await.unwrap();
            assert_eq!(b["resourceType"], "Bundle");
            assert_eq!(b["type"], "searchset");
            let known = p.organisations.contains(&org.code);
            assert_eq!(
                b["total"],
                if known { 1 } else { 0 },
                "{} {query}",
                org.code
            );
            if known {
                let e = &b["entry"][0];
                assert_eq!(e["search"]["mode"], "match");
                assert_eq!(e["resource"]["identifier"][0]["value"], nhs.as_str());
                assert_eq!(
                    e["resource"]["generalPractitioner"][0]["identifier"]["value"],
                    p.gp.as_str()
                );
                let id = e["resource"]["id"].as_str().unwrap();
                assert_eq!(e["fullUrl"], format!("{}/Patient/{id}", org.base_url));
                assert_eq!(
                    Some(id.to_string()),
                    region.patient_id_at(&p.nhs_number, &org.code)
                );
            }
        }
    }
    let unknown = region.unknown_nhs_number().as_digits();
    let (_, b) = get_json(
        &c,
        &format!(
            "{}/Patient?identifier={NHS}|{unknown}",
            base(&server, &p.gp)
        ),
    )
    .await;
    assert_eq!(b["total"], 0);
    assert!(b.get("entry").is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn searches_page_through_next_links_to_every_result() {
    let (region, server) = start().await;
    let c = client();
    let p = rich_patient(&region);
    let gp = base(&server, &p.gp);
    let id = region.patient_id_at(&p.nhs_number, &p.gp).unwrap();
    let mut url = format!("{gp}/Observation?patient={id}&_count=2");
    let mut ids = Vec::new();
    let mut pages = 0;
    let total = loop {
        let (status, b) = get_json(&c, &url).await;
        assert_eq!(status, 200);
        pages += 1;
        for e in b["entry"].as_array().into_iter().flatten() {
            assert_eq!(
                e["resource"]["subject"]["reference"],
                format!("Patient/{id}")
            );
            ids.push(e["resource"]["id"].as_str().unwrap().to_string());
        }
        let next = b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next");
        match next {
            Some(l) => {
                url = l["url"].as_str().unwrap().to_string();
                assert!(
                    url.starts_with(&gp),
                    "next is absolute on the server's own host:port: {url}"
                );
            }
            None => break b["total"].as_u64().unwrap(),
        }
    };
    assert!(
        total >= 3,
        "GP holds blood pressure and weight at least: {total}"
    );
    assert_eq!(ids.len() as u64, total);
    assert_eq!(pages as u64, total.div_ceil(2));
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len() as u64, total, "no result repeated across pages");

    // The other spellings of the patient parameter find the same results.
    for q in [
        format!("subject=Patient/{id}"),
        format!("patient=Patient/{id}"),
    ] {
        let (_, b) = get_json(&c, &format!("{gp}/Observation?{q}")).await;
        assert_eq!(b["total"].as_u64(), Some(total), "{q}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn everything_returns_the_patient_and_every_resource_paged() {
    let (region, server) = start().await;
    let c = client();
    let p = rich_patient(&region);
    let gp = base(&server, &p.gp);
    let id = region.patient_id_at(&p.nhs_number, &p.gp).unwrap();
    let mut by_type = 0;
    for t in [
        "Condition",
        "AllergyIntolerance",
        "MedicationStatement",
        "MedicationRequest",
        "Observation",
        "DiagnosticReport",
        "CarePlan",
        "DocumentReference",
        "Encounter",
        "Appointment",
    ] {
        let (status, b) = get_json(&c, &format!("{gp}/{t}?patient={id}")).await;
        assert_eq!(status, 200, "{t}");
        by_type += b["total"].as_u64().unwrap();
    }
    for op in ["$everything", "%24everything"] {
        let mut url = format!("{gp}/Patient/{id}/{op}");
        let mut resources: Vec<Value> = Vec::new();
        loop {
            let (status, b) = get_json(&c, &url).await;
            assert_eq!(status, 200);
            assert_eq!(b["total"].as_u64(), Some(by_type + 1));
            resources.extend(
                b["entry"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| e["resource"].clone()),
            );
            match b["link"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["relation"] == "next")
            {
                Some(l) => url = l["url"].as_str().unwrap().to_string(),
                None => break,
            }
        }
        assert_eq!(resources.len() as u64, by_type + 1);
        assert_eq!(resources[0]["resourceType"], "Patient");
        // Document attachments point at text this server serves.
        for doc in resources
            .iter()
            .filter(|r| r["resourceType"] == "DocumentReference")
            .take(2)
        {
            let url = doc["content"][0]["attachment"]["url"].as_str().unwrap();
            let r = c.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200, "{url}");
            assert!(r.text().await.unwrap().contains(&p.nhs_number.as_digits()));
        }
    }
    let (status, b) = get_json(&c, &format!("{gp}/Patient/nobody/$everything")).await;
    assert_eq!(
        (status, b["resourceType"].as_str()),
        (404, Some("OperationOutcome"))
    );
    server.shutdown().await;
}

#[tokio::test]
async fn batch_answers_each_search_with_its_first_page() {
    let (region, server) = start().await;
    let c = client();
    let p = rich_patient(&region);
    let gp = base(&server, &p.gp);
    let id = region.patient_id_at(&p.nhs_number, &p.gp).unwrap();
    let batch = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            { "request": { "method": "GET", "url": format!("Condition?patient={id}") } },
            { "request": { "method": "GET", "url": format!("Observation?patient={id}&_count=1") } },
            { "request": { "method": "GET", "url": format!("Patient?identifier={NHS}|{}", p.nhs_number.as_digits()) } },
        ]
    });
    for path in ["", "/"] {
        let r = c
            .post(format!("{gp}{path}"))
            .json(&batch)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["type"], "batch-response");
        let entries = b["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 3);
        for e in entries {
            assert_eq!(e["response"]["status"], "200 OK");
            assert_eq!(e["resource"]["type"], "searchset");
        }
        let (_, direct) = get_json(&c, &format!("{gp}/Condition?patient={id}")).await;
        assert_eq!(entries[0]["resource"]["total"], direct["total"]);
        let obs = &entries[1]["resource"];
        assert!(obs["total"].as_u64().unwrap() > 1);
        let next = obs["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .expect("next");
        assert!(next["url"].as_str().unwrap().starts_with(&gp));
        assert_eq!(entries[2]["resource"]["total"], 1);
    }
    let r = c
        .post(&gp)
        .body("{\"resourceType\":\"Bundle\"")
        .header("content-type", "application/fhir+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["resourceType"], "OperationOutcome");
    server.shutdown().await;
}

#[tokio::test]
async fn metadata_unknown_types_and_bad_parameters_answer_in_fhir() {
    let (_, server) = start().await;
    let c = client();
    let org = &server.organisations()[0];
    let (status, cap) = get_json(&c, &format!("{}/metadata", org.base_url)).await;
    assert_eq!(status, 200);
    assert_eq!(cap["resourceType"], "CapabilityStatement");
    assert_eq!(cap["fhirVersion"], "4.0.1");
    let types: Vec<&str> = cap["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["type"].as_str())
        .collect();
    assert!(types.contains(&"Appointment") && types.contains(&"Patient") && types.len() == 12);
    assert!(
        types.contains(&"Medication"),
        "Medication is readable by id"
    );
    assert_eq!(
        cap["rest"][0]["resource"][0]["operation"][0]["name"],
        "everything"
    );
    for (path, want) in [
        ("/Medication?patient=x", 404),
        ("/Condition?_count=x&patient=y", 400),
        ("/Condition", 400),
    ] {
        let (status, b) = get_json(&c, &format!("{}{path}", org.base_url)).await;
        assert_eq!(status, want, "{path}");
        assert_eq!(b["resourceType"], "OperationOutcome");
    }
    server.shutdown().await;
}

/// One patient search against an organisation, returning the raw outcome.
async fn patient_search(
    c: &reqwest::Client,
    server: &RegionServer,
    region: &Region,
    code: &str,
) -> reqwest::Result<reqwest::Response> {
    let p = region
        .patients()
        .find(|p| p.organisations.iter().any(|o| o == code))
        .unwrap();
    c.get(format!(
        "{}/Patient?identifier={NHS}|{}",
        base(server, code),
        p.nhs_number.as_digits()
    ))
    .send()
    .await
}

#[tokio::test]
async fn http500_and_error_rate_faults_answer_500_with_an_operation_outcome() {
    let (region, server) = start().await;
    let c = client();
    let code = server.organisations()[0].code.clone();
    server.faults().set_fault(&code, Fault::Http500).unwrap();
    let r = patient_search(&c, &server, &region, &code).await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(
        r.json::<Value>().await.unwrap()["resourceType"],
        "OperationOutcome"
    );

    server
        .faults()
        .set_fault(&code, Fault::ErrorRate(0.5))
        .unwrap();
    let mut failures = 0;
    for _ in 0..60 {
        if patient_search(&c, &server, &region, &code)
            .await
            .unwrap()
            .status()
            == 500
        {
            failures += 1;
        }
    }
    assert!((15..=45).contains(&failures), "about half fail: {failures}");
    server
        .faults()
        .set_fault(&code, Fault::ErrorRate(0.0))
        .unwrap();
    assert_eq!(
        patient_search(&c, &server, &region, &code)
            .await
            .unwrap()
            .status(),
        200
    );
    server.shutdown().await;
}

#[tokio::test]
async fn hang_fault_never_answers_until_the_client_gives_up() {
    let (region, server) = start().await;
    let c = client();
    let code = server.organisations()[1].code.clone();
    server.faults().set_fault(&code, Fault::Hang).unwrap();
    let p = region
        .patients()
        .find(|p| p.organisations.contains(&code))
        .unwrap();
    let started = Instant::now();
    let err = c
        .get(format!(
            "{}/Patient?identifier={}",
            base(&server, &code),
            p.nhs_number.as_digits()
        ))
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .expect_err("no answer");
    assert!(err.is_timeout(), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(290));
    // Shutdown cuts hung connections rather than waiting for them.
    let pending = tokio::spawn({
        let c = c.clone();
        let url = format!("{}/metadata", base(&server, &code));
        async move { c.get(url).send().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = Instant::now();
    server.shutdown().await;
    let outcome = pending.await.unwrap();
    assert!(
        outcome.is_err() && !outcome.as_ref().unwrap_err().is_timeout(),
        "{outcome:?}"
    );
    assert!(stopping.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn reset_fault_drops_the_connection_without_any_response() {
    let (region, server) = start().await;
    let c = client();
    let code = server.organisations()[2].code.clone();
    server.faults().set_fault(&code, Fault::Reset).unwrap();
    let started = Instant::now();
    let err = patient_search(&c, &server, &region, &code)
        .await
        .expect_err("connection reset");
    assert!(!err.is_timeout(), "a reset, not a timeout: {err:?}");
    assert!(err.status().is_none(), "no HTTP status at all: {err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // At the TCP level the client sees a reset (or EOF) and not one byte of HTTP.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server.organisation(&code).unwrap().addr)
        .await
        .unwrap();
    s.write_all(b"GET /fhir/metadata HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf).await {
        Ok(_) => assert!(buf.is_empty(), "no response bytes"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_json_fault_returns_200_with_an_unparseable_body() {
    let (region, server) = start().await;
    let c = client();
    let code = server.organisations()[0].code.clone();
    server
        .faults()
        .set_fault(&code, Fault::MalformedJson)
        .unwrap();
    let r = patient_search(&c, &server, &region, &code).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/fhir+json");
    let body = r.bytes().await.unwrap();
    assert!(!body.is_empty());
    assert!(serde_json::from_slice::<Value>(&body).is_err());
    server.shutdown().await;
}

#[tokio::test]
async fn slow_body_fault_sends_headers_promptly_and_the_body_slowly() {
    let (region, server) = start().await;
    let c = client();
    let code = server.organisations()[0].code.clone();
    server.faults().set_fault(&code, Fault::SlowBody).unwrap();
    let started = Instant::now();
    let mut r = patient_search(&c, &server, &region, &code).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "headers arrive at once"
    );
    let first = r.chunk().await.unwrap().expect("a first chunk");
    assert!(first.len() <= 64);
    let rest = tokio::time::timeout(Duration::from_millis(700), r.bytes()).await;
    assert!(rest.is_err(), "the whole body takes far longer than 700 ms");
    server.shutdown().await;
}

#[tokio::test]
async fn empty_bundle_fault_makes_every_search_find_nothing() {
    let (region, server) = start().await;
    let c = client();
    let p = rich_patient(&region);
    let gp = base(&server, &p.gp);
    let id = region.patient_id_at(&p.nhs_number, &p.gp).unwrap();
    server
        .faults()
        .set_fault(&p.gp, Fault::EmptyBundle)
        .unwrap();
    for url in [
        format!("{gp}/Patient?identifier={NHS}|{}", p.nhs_number.as_digits()),
        format!("{gp}/Condition?patient={id}"),
        format!("{gp}/Observation?patient={id}"),
    ] {
        let (status, b) = get_json(&c, &url).await;
        assert_eq!(status, 200);
        assert_eq!(b["type"], "searchset");
        assert_eq!(b["total"], 0, "{url}");
        assert!(b.get("entry").is_none());
    }
    server.shutdown().await;
}

#[tokio::test]
async fn latency_profile_delays_each_answer() {
    let (region, server) = start().await;
    let c = client();
    let code = server.organisations()[0].code.clone();
    server
        .faults()
        .set_latency(&code, LatencyProfile::Fixed { ms: 200 })
        .unwrap();
    let started = Instant::now();
    assert_eq!(
        patient_search(&c, &server, &region, &code)
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    server.shutdown().await;
}

#[tokio::test]
async fn admin_api_switches_faults_and_latency_at_runtime() {
    let (region, server) = start().await;
    let c = client();
    let admin = server.admin_url();
    let code = server.organisations()[0].code.clone();

    let (status, list) = get_json(&c, &format!("{admin}/organisations")).await;
    assert_eq!(status, 200);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), server.organisations().len());
    assert_eq!(list[0]["code"], code.as_str());
    assert_eq!(list[0]["fault"], "none");
    assert_eq!(list[0]["latency"], "fixed:0");
    assert_eq!(
        list[0]["base_url"],
        server.organisations()[0].base_url.as_str()
    );

    let r = c
        .put(format!("{admin}/organisations/{code}/fault"))
        .json(&json!({"fault": "http500"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(server.faults().fault(&code), Some(Fault::Http500));
    assert_eq!(
        patient_search(&c, &server, &region, &code)
            .await
            .unwrap()
            .status(),
        500
    );

    let r = c
        .put(format!("{admin}/organisations/{code}/latency"))
        .json(&json!({"latency": "tail:20:400"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["latency"], "tail:20:400");

    // `all` addresses every organisation, as the --latency all=... flag does.
    let r = c
        .put(format!("{admin}/organisations/all/latency"))
        .json(&json!({"latency": "fixed:7"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for org in server.organisations() {
        assert_eq!(
            server.faults().latency(&org.code).map(|l| l.to_string()),
            Some("fixed:7".to_owned())
        );
    }

    for (path, body, want) in [
        (
            format!("{admin}/organisations/{code}/fault"),
            json!({"fault": "explode"}),
            400,
        ),
        (
            format!("{admin}/organisations/{code}/latency"),
            json!({"latency": "tail:400:20"}),
            400,
        ),
        (
            format!("{admin}/organisations/NOPE/fault"),
            json!({"fault": "hang"}),
            404,
        ),
        (
            format!("{admin}/organisations/{code}/fault"),
            json!({"wrong": 1}),
            400,
        ),
    ] {
        let r = c.put(&path).json(&body).send().await.unwrap();
        assert_eq!(r.status(), want, "{path} {body}");
    }

    let r = c.post(format!("{admin}/reset")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(server.faults().fault(&code), Some(Fault::None));
    assert_eq!(
        server.faults().latency(&code),
        Some(LatencyProfile::ZERO),
        "back to the startup latency"
    );
    assert_eq!(
        patient_search(&c, &server, &region, &code)
            .await
            .unwrap()
            .status(),
        200
    );
    server.shutdown().await;
}

#[tokio::test]
async fn stats_count_every_request_that_reaches_an_organisation() {
    let (region, server) = start().await;
    let c = client();
    let p = rich_patient(&region);
    let gp = base(&server, &p.gp);
    let id = region.patient_id_at(&p.nhs_number, &p.gp).unwrap();
    assert_eq!(server.stats(&p.gp).unwrap().requests, 0);
    c.get(format!("{gp}/metadata")).send().await.unwrap();
    c.get(format!(
        "{gp}/Patient?identifier={}",
        p.nhs_number.as_digits()
    ))
    .send()
    .await
    .unwrap();
    for _ in 0..3 {
        c.get(format!("{gp}/Condition?patient={id}"))
            .send()
            .await
            .unwrap();
    }
    c.get(format!("{gp}/Patient/{id}/$everything"))
        .send()
        .await
        .unwrap();
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": format!("AllergyIntolerance?patient={id}")}}]});
    c.post(&gp).json(&batch).send().await.unwrap();
    server.faults().set_fault(&p.gp, Fault::Http500).unwrap();
    c.get(format!("{gp}/Condition?patient={id}"))
        .send()
        .await
        .unwrap();

    let s = server.stats(&p.gp).unwrap();
    assert_eq!(s.requests, 8);
    assert_eq!(s.metadata, 1);
    assert_eq!(s.patient_searches, 1);
    assert_eq!(s.resource_searches, 4);
    assert_eq!(s.everything, 1);
    assert_eq!(s.batches, 1);
    assert_eq!(s.faulted, 1);
    assert_eq!(s.searches_by_type.get("Condition"), Some(&4));
    assert_eq!(s.searches_by_type.get("AllergyIntolerance"), Some(&1));
    let other = server
        .organisations()
        .into_iter()
        .find(|o| o.code != p.gp)
        .unwrap();
    assert_eq!(server.stats(&other.code).unwrap().requests, 0);

    let (_, all) = get_json(&c, &format!("{}/stats", server.admin_url())).await;
    assert_eq!(all[&p.gp]["requests"], 8);
    server.faults().reset_stats();
    assert_eq!(server.stats(&p.gp).unwrap().requests, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn broker_config_lists_every_running_organisation() {
    let (_, server) = start().await;
    let text = server.broker_config_toml("127.0.0.1:50051");
    let v: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(v["server"]["listen"].as_str(), Some("127.0.0.1:50051"));
    assert_eq!(v["server"]["plaintext"].as_bool(), Some(true));
    let sources = v["sources"].as_array().unwrap();
    assert_eq!(sources.len(), server.organisations().len());
    for (s, o) in sources.iter().zip(server.organisations()) {
        assert_eq!(s["organisation_code"].as_str(), Some(o.code.as_str()));
        assert_eq!(s["id"].as_str(), Some(o.code.to_lowercase().as_str()));
        assert_eq!(s["fhir"]["base_url"].as_str(), Some(o.base_url.as_str()));
        assert_eq!(s["fhir"]["mode"].as_str(), Some("search"));
    }
    server.shutdown().await;
}

#[tokio::test]
async fn starting_with_an_unknown_organisation_code_is_an_error() {
    let region = Arc::new(Region::generate(&RegionSpec {
        patients: 10,
        ..RegionSpec::default()
    }));
    let options = ServerOptions {
        faults: vec![("NOPE".into(), Fault::Hang)],
        ..ServerOptions::default()
    };
    let err = RegionServer::start_with(region, "127.0.0.1".parse().unwrap(), options)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}
