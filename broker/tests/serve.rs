//! `carerecord serve` as a process, as ops run it: health, metrics over HTTP, SIGHUP reload and
//! SIGTERM draining in-flight lookups — against mock organisations over real HTTP.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use carerecord_mock_sources::{LatencyProfile, Region, RegionServer, RegionSpec, ServerOptions};
use carerecord_proto::care_record_service_client::CareRecordServiceClient;
use carerecord_proto::{CacheDirective, GetCareRecordRequest, Requester};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("carerecord-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// Kills the broker if a test fails before it exits by itself.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn wait_serving(url: &str) {
    for _ in 0..200 {
        if let Ok(channel) = tonic::transport::Channel::from_shared(url.to_owned())
            .expect("url")
            .connect()
            .await
        {
            let mut health = HealthClient::new(channel);
            if let Ok(r) = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "carerecord.v1.CareRecordService".into(),
                })
                .await
                && r.into_inner().status == ServingStatus::Serving as i32
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("broker never became SERVING at {url}");
}

/// `GET path` on the ops listener: the status code and the whole response.
fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("ops port");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, response)
}

fn lookup(nhs: &str, org: &str) -> tonic::Request<GetCareRecordRequest> {
    let mut r = tonic::Request::new(GetCareRecordRequest {
        nhs_number: nhs.to_owned(),
        requester: Some(Requester {
            user_id: "ops-test".into(),
            role_code: "R8000".into(),
            organisation_code: org.into(),
            ..Requester::default()
        }),
        cache: CacheDirective::RequireFresh as i32,
        ..GetCareRecordRequest::default()
    });
    r.set_timeout(Duration::from_secs(5));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exposes_probes_and_metrics_reloads_on_hangup_and_drains_on_sigterm() {
    let region = Arc::new(Region::generate(&RegionSpec {
        patients: 200,
        organisations: 5,
        ..RegionSpec::default()
    }));
    let mock = RegionServer::start_with(
        region.clone(),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        ServerOptions {
            latency: Some(LatencyProfile::ZERO),
            ..ServerOptions::default()
        },
    )
    .await
    .expect("mock region");
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
    // The sections must precede the [[sources]] array, so insert them before it.
    let split = base.find("[[sources]]").expect("sources in config");
    let config = format!("{}{}\n{}", &base[..split], extra, &base[split..]);
    std::fs::write(&config_path, &config).expect("write config");

    let log_path = temp("broker.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_carerecord"))
        .args(["serve", "--config", config_path.to_str().expect("utf8")])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start broker");
    let mut broker = Broker(child);
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
    let region = Arc::new(Region::generate(&RegionSpec {
        patients: 20,
        organisations: 2,
        ..RegionSpec::default()
    }));
    let mock = RegionServer::start_with(
        region.clone(),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        ServerOptions {
            latency: Some(LatencyProfile::ZERO),
            ..ServerOptions::default()
        },
    )
    .await
    .expect("mock region");
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
    let split = base.find("[[sources]]").expect("sources in config");
    let config_path = temp("full-disk.toml");
    std::fs::write(
        &config_path,
        format!("{}{}\n{}", &base[..split], extra, &base[split..]),
    )
    .expect("write config");
    let child = Command::new(env!("CARGO_BIN_EXE_carerecord"))
        .args(["serve", "--config", config_path.to_str().expect("utf8")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start broker");
    let _broker = Broker(child);
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
