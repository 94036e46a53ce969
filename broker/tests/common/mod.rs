//! What the process-level tests share: ports, temp files, the broker as a child process, and a
//! raw HTTP GET for the ops listener.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use carerecord_mock_sources::{LatencyProfile, Region, RegionServer, RegionSpec, ServerOptions};

use carerecord_proto::{CacheDirective, GetCareRecordRequest, Requester};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A synthetic region of `patients` and `organisations`, served over real HTTP on loopback with
/// no added latency.
pub async fn mock_region(patients: usize, organisations: usize) -> (Arc<Region>, RegionServer) {
    let region = Arc::new(Region::generate(&RegionSpec {
        patients,
        organisations,
        ..RegionSpec::default()
    }));
    let server = RegionServer::start_with(
        region.clone(),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        ServerOptions {
            latency: Some(LatencyProfile::ZERO),
            ..ServerOptions::default()
        },
    )
    .await
    .expect("mock region");
    (region, server)
}

/// `carerecord serve --config config`, its stderr (the logs) to `log` when given.
pub fn spawn_serve(config: &Path, log: Option<&Path>) -> Broker {
    let stderr = match log {
        Some(path) => Stdio::from(std::fs::File::create(path).expect("log file")),
        None => Stdio::null(),
    };
    let child = Command::new(env!("CARGO_BIN_EXE_carerecord"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start broker");
    Broker(child)
}

/// Inserts `extra` tables into a mock region's broker config (they must precede `[[sources]]`).
pub fn with_tables(base: &str, extra: &str) -> String {
    let split = base.find("[[sources]]").expect("sources in config");
    format!("{}\n{}\n{}", &base[..split], extra, &base[split..])
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("carerecord-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// Kills the broker if a test fails before it exits by itself.
pub struct Broker(pub Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

pub async fn wait_serving(url: &str) {
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
pub fn get(port: u16, path: &str) -> (u16, String) {
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

pub fn lookup(nhs: &str, org: &str) -> tonic::Request<GetCareRecordRequest> {
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
