//! `carerecord serve` as a process, as ops run it: health, metrics over HTTP, SIGHUP reload and
//! SIGTERM draining in-flight lookups — against mock organisations over real HTTP.

mod common;

use std::time::Duration;

use carerecord_mock_sources::LatencyProfile;
use carerecord_proto::care_record_service_client::CareRecordServiceClient;
use common::{free_port, get, lookup, signal, spawn_serve, temp, wait_serving, with_tables};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exposes_probes_and_metrics_reloads_on_hangup_and_drains_on_sigterm() {
    let (region, mock) = common::mock_region(200, 5).await;
    let patient = region
        .patients_known_to_at_least(2)
        .next()
        .expect("a shared patient");
    let nhs = patient.nhs_number.as_digits();

    let grpc_port = free_port();
    let metrics_port = free_port();
    let config_path = temp("broker.toml");
    let base = mock.broker_config_toml(&format!("127.0.0.1:{grpc_port}"));
    let extra = format!(
        "\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[audit]\nfile = \"{}\"\n[resilience]\ndrain_ms = 5000\n[cache]\nttl_secs = 60\n",
        temp("audit.jsonl").display()
    );
    let config = with_tables(&base, &extra);
    std::fs::write(&config_path, &config).expect("write config");

    let log_path = temp("broker.log");
    let mut broker = spawn_serve(&config_path, Some(&log_path));
    let url = format!("http://127.0.0.1:{grpc_port}");
    wait_serving(&url).await;

    let mut client = CareRecordServiceClient::connect(url.clone())
        .await
        .expect("connect");
    let r = client
        .get_care_record(lookup(&nhs, &patient.gp))
        .await
        .expect("lookup")
        .into_inner();
    assert_eq!(r.sources.len(), 5);
    assert_eq!(get(metrics_port, "/livez").0, 200);
    let (status, ready) = get(metrics_port, "/readyz");
    assert_eq!(status, 200, "{ready}");
    assert_eq!(get(metrics_port, "/metricz").0, 404);
    assert_eq!(get(metrics_port, "/").0, 404);
    let (status, metrics) = get(metrics_port, "/metrics");
    assert_eq!(status, 200);
    for name in [
        "carerecord_lookups_total",
        "carerecord_source_requests_total",
        "carerecord_source_duration_seconds",
        "carerecord_breaker_state",
        "carerecord_cache_misses_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }

    // SIGHUP with one source fewer: new lookups see four. The cache TTL edited alongside cannot
    // be applied by a reload, and the log says so.
    let last = config.rfind("[[sources]]").expect("last source");
    let edited = config[..last].replace("ttl_secs = 60", "ttl_secs = 30");
    std::fs::write(&config_path, &edited).expect("rewrite");
    signal(&broker.0, "HUP");
    let mut sources = 0;
    for _ in 0..100 {
        let r = client
            .get_care_record(lookup(&nhs, &patient.gp))
            .await
            .expect("lookup")
            .into_inner();
        sources = r.sources.len();
        if sources == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sources, 4, "reload applied");
    // An invalid file is rejected and the running sources stay.
    std::fs::write(&config_path, "this is not toml [").expect("rewrite");
    signal(&broker.0, "HUP");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = client
        .get_care_record(lookup(&nhs, &patient.gp))
        .await
        .expect("still serving")
        .into_inner();
    assert_eq!(r.sources.len(), 4);

    // SIGTERM during a slow lookup: it still completes, then the process exits cleanly.
    mock.faults()
        .set_latency_all(LatencyProfile::Fixed { ms: 800 });
    let mut slow_client = client.clone();
    let slow_nhs = nhs.clone();
    let gp = patient.gp.clone();
    let in_flight =
        tokio::spawn(async move { slow_client.get_care_record(lookup(&slow_nhs, &gp)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(&broker.0, "TERM");
    // Out of rotation at once, while the in-flight lookup is still being answered.
    let mut readiness = (0, String::new());
    for _ in 0..40 {
        readiness = get(metrics_port, "/readyz");
        if readiness.0 == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(readiness.0, 503, "{}", readiness.1);
    assert!(readiness.1.contains("draining"), "{}", readiness.1);
    assert_eq!(get(metrics_port, "/livez").0, 200, "alive while draining");
    assert!(
        !in_flight.is_finished(),
        "the drain was observed mid-lookup"
    );
    let r = in_flight
        .await
        .expect("task")
        .expect("the in-flight lookup finished")
        .into_inner();
    assert_eq!(r.sources.len(), 4);
    let mut exited = None;
    for _ in 0..100 {
        if let Some(status) = broker.0.try_wait().expect("wait") {
            exited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = exited.expect("broker exited after draining");
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(&log_path).expect("log");
    let restart = log
        .lines()
        .find(|l| l.contains("applied only by a restart"))
        .unwrap_or_else(|| panic!("no restart warning in:\n{log}"));
    assert!(restart.contains("cache.ttl_secs"), "{restart}");
    assert!(
        !restart.contains("sources"),
        "sources are reloaded: {restart}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_while_the_audit_trail_cannot_be_written() {
    if !std::path::Path::new("/dev/full").exists() {
        eprintln!("SKIPPED: no /dev/full on this machine to make audit writes fail");
        return;
    }
    let (region, mock) = common::mock_region(20, 2).await;
    let patient = region
        .patients_known_to_at_least(1)
        .next()
        .expect("a known patient");
    let grpc_port = free_port();
    let ops_port = free_port();
    let base = mock.broker_config_toml(&format!("127.0.0.1:{grpc_port}"));
    // Every write to /dev/full fails with ENOSPC: a full disk under the trail.
    let extra =
        format!("\n[metrics]\nlisten = \"127.0.0.1:{ops_port}\"\n[audit]\nfile = \"/dev/full\"\n");
    let config_path = temp("full-disk.toml");
    std::fs::write(&config_path, with_tables(&base, &extra)).expect("write config");
    let _broker = spawn_serve(&config_path, None);
    let url = format!("http://127.0.0.1:{grpc_port}");
    wait_serving(&url).await;
    let (status, body) = get(ops_port, "/readyz");
    assert_eq!(status, 200, "ready until a write fails: {body}");

    let mut client = CareRecordServiceClient::connect(url)
        .await
        .expect("connect");
    let refused = client
        .get_care_record(lookup(&patient.nhs_number.as_digits(), &patient.gp))
        .await
        .expect_err("nothing is disclosed without an audit record");
    assert_ne!(refused.code(), tonic::Code::Ok);
    let (status, body) = get(ops_port, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("audit trail unwritable"), "{body}");
    assert_eq!(
        get(ops_port, "/livez").0,
        200,
        "alive: restarting would not help"
    );
}
