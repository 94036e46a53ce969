//! OpenTelemetry from outside: `carerecord serve` with `[telemetry]` pointed at a minimal OTLP
//! receiver on loopback, a lookup carrying the EHR's W3C `traceparent`, mock organisations over
//! real HTTP and one FHIR server that records the `traceparent` it is sent.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use carerecord_proto::care_record_service_client::CareRecordServiceClient;
use common::{free_port, lookup, signal, spawn_serve, temp, wait_serving, with_tables};
use serde_json::Value;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

type Seen = Arc<Mutex<Vec<String>>>;

/// Serves `app` on a loopback port; returns its base URL.
async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// Accepts OTLP/HTTP JSON trace exports and keeps each body.
async fn otlp_receiver(bodies: Seen) -> String {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: String| {
            let bodies = bodies.clone();
            async move {
                bodies.lock().expect("lock").push(body);
                ([("content-type", "application/json")], "{}")
            }
        }),
    );
    serve(app).await
}

/// A FHIR server that knows nobody and remembers the `traceparent` of each request.
async fn recording_fhir_server(traceparents: Seen) -> String {
    let app = axum::Router::new().fallback(move |headers: HeaderMap| {
        let traceparents = traceparents.clone();
        async move {
            if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
                traceparents.lock().expect("lock").push(tp.to_owned());
            }
            (
                [("content-type", "application/fhir+json")],
                r#"{"resourceType":"Bundle","type":"searchset","total":0,"entry":[]}"#,
            )
        }
    });
    serve(app).await
}

/// Every span exported: (name, traceId, spanId, parentSpanId).
fn spans(bodies: &[String]) -> Vec<(String, String, String, String)> {
    let text = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_lowercase();
    let mut out = Vec::new();
    for body in bodies {
        let json: Value = serde_json::from_str(body).expect("OTLP JSON");
        for rs in json["resourceSpans"].as_array().into_iter().flatten() {
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    out.push((
                        text(s, "name"),
                        text(s, "traceId"),
                        text(s, "spanId"),
                        text(s, "parentSpanId"),
                    ));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_for_the_lookup_each_source_and_the_merge_join_the_callers_trace_and_name_no_patient()
{
    let bodies: Seen = Arc::default();
    let traceparents: Seen = Arc::default();
    let collector = otlp_receiver(bodies.clone()).await;
    let recorder = recording_fhir_server(traceparents.clone()).await;
    let (region, mock) = common::mock_region(50, 2).await;
    let patient = region
        .patients_known_to_at_least(2)
        .next()
        .expect("a shared patient");

    let grpc_port = free_port();
    let audit = temp("telemetry-audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let extra = format!(
        "[telemetry]\notlp_endpoint = \"{collector}\"\nservice_name = \"carerecord-test\"\n[audit]\nfile = \"{}\"\n",
        audit.display()
    );
    let config = format!(
        "{}\n[[sources]]\nid = \"recorder\"\norganisation_code = \"RREC1\"\norganisation_name = \"Recording Trust\"\ntimeout_ms = 2000\n[sources.fhir]\nbase_url = \"{recorder}/\"\n",
        with_tables(
            &mock.broker_config_toml(&format!("127.0.0.1:{grpc_port}")),
            &extra
        )
    );
    let config_path = temp("telemetry.toml");
    std::fs::write(&config_path, config).expect("config");
    let log_path = temp("telemetry.log");
    let mut broker = spawn_serve(&config_path, Some(&log_path));
    let url = format!("http://127.0.0.1:{grpc_port}");
    wait_serving(&url).await;

    let nhs = patient.nhs_number.as_digits();
    let mut request = lookup(&nhs, &patient.gp);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN}-01")
            .parse()
            .expect("header"),
    );
    let mut client = CareRecordServiceClient::connect(url)
        .await
        .expect("connect");
    let answer = client
        .get_care_record(request)
        .await
        .expect("lookup")
        .into_inner();
    assert_eq!(answer.sources.len(), 3);

    // Stopping flushes the exporter.
    signal(&broker.0, "TERM");
    for _ in 0..200 {
        if broker.0.try_wait().expect("wait").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bodies = bodies.lock().expect("lock").clone();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let spans = spans(&bodies);
    let named = |name: &'static str| spans.iter().filter(move |s| s.0 == name);
    for name in ["grpc", "lookup", "source", "merge"] {
        assert!(
            named(name).count() > 0,
            "no {name} span in {spans:?}\n{log}"
        );
    }
    assert_eq!(named("source").count(), 3, "one span per source");
    for (name, trace, ..) in &spans {
        assert_eq!(trace, TRACE_ID, "{name} is in the caller's trace");
    }
    let server = named("grpc").next().expect("grpc span");
    assert_eq!(
        server.3, CALLER_SPAN,
        "the call's span is the caller's child"
    );

    // The FHIR server was sent our trace, naming the broker's span for that source call.
    let sent = traceparents.lock().expect("lock").clone();
    assert!(!sent.is_empty(), "no traceparent reached the FHIR server");
    for tp in &sent {
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!(parts[1], TRACE_ID, "{tp}");
        assert!(
            named("source").any(|s| s.2 == parts[2]),
            "{tp} names a source span"
        );
    }

    // Nothing that identifies the patient leaves in a span.
    let everything = bodies.concat();
    for secret in [
        nhs.as_str(),
        patient.family.as_str(),
        patient.given.as_str(),
        patient.birth_date.as_str(),
    ] {
        assert!(
            !everything.contains(secret),
            "{secret:?} exported in a span"
        );
    }
}
