//! Runs the gRPC server on a listener the caller provides (tests bind `127.0.0.1:0`), with
//! standard health checking and server reflection so ordinary gRPC tools work without our
//! `.proto`.

use std::future::Future;
use std::sync::Arc;

use carerecord_proto::care_record_service_server::CareRecordServiceServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::config::{ServerConfig, SystemConfig};
use crate::lookup::Broker;
use crate::service::CareRecordApi;

/// Largest request we accept: a lookup request is tiny; anything big is abuse.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Largest response we send: a whole care record can be large, but not unbounded.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// How callers reach the server: plaintext (development) or TLS, and with mutual TLS the
/// calling systems allowed.
#[derive(Clone, Default)]
pub struct Transport {
    pub tls: Option<ServerTlsConfig>,
    pub systems: Option<Vec<SystemConfig>>,
}

impl Transport {
    /// Plain-text gRPC: local development only.
    pub fn plaintext() -> Self {
        Transport::default()
    }

    /// From `[server]` config, reading certificate files.
    pub fn from_config(server: &ServerConfig) -> Result<Self, ServeError> {
        let Some(tls) = &server.tls else {
            return Ok(Transport::plaintext());
        };
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| ServeError::Certificate(format!("{}: {e}", path.display())))
        };
        let mut config =
            ServerTlsConfig::new().identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
        let mut systems = None;
        if let Some(ca) = &tls.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read(ca)?));
            systems = Some(tls.systems.clone());
        }
        Ok(Transport {
            tls: Some(config),
            systems,
        })
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight calls finish.
pub async fn run(
    listener: TcpListener,
    broker: Arc<Broker>,
    transport: Transport,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<CareRecordServiceServer<CareRecordApi>>()
        .await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(carerecord_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // Python's reflection client still asks v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(carerecord_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // On shutdown: refuse new lookups, report NOT_SERVING (so load balancers stop sending), and
    // let tonic stop accepting while in-flight calls finish. The caller bounds the drain.
    let draining = {
        let health = health.clone();
        let broker = broker.clone();
        async move {
            shutdown.await;
            broker.start_draining();
            health
                .set_not_serving::<CareRecordServiceServer<CareRecordApi>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            tracing::info!(
                in_flight = broker.lookups_in_flight(),
                "draining: refusing new lookups, finishing those in flight"
            );
        }
    };
    let api = crate::record_response::CareRecordGrpc::new(
        CareRecordApi::new(broker, transport.systems),
        MAX_REQUEST_BYTES,
        MAX_RESPONSE_BYTES,
    );

    // `Server::tcp_nodelay` is ignored for a caller-provided listener: set it on the incoming
    // stream, or every small response waits ~40 ms for Nagle's algorithm.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = Server::builder();
    if let Some(tls) = transport.tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api)
        .serve_with_incoming_shutdown(incoming, draining)
        .await?;
    Ok(())
}
