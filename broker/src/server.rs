//! Runs the gRPC server on a listener the caller provides (tests bind `127.0.0.1:0`), with
//! standard health checking and server reflection so ordinary gRPC tools work without our
//! `.proto`.

use std::future::Future;
use std::sync::Arc;

use carerecord_proto::care_record_service_server::CareRecordServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::lookup::Broker;
use crate::service::CareRecordApi;

/// Largest request we accept: a lookup request is tiny; anything big is abuse.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Largest response we send: a whole care record can be large, but not unbounded.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight calls finish.
pub async fn run(
    listener: TcpListener,
    broker: Arc<Broker>,
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

    let api = CareRecordServiceServer::new(CareRecordApi::new(broker))
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(MAX_RESPONSE_BYTES);

    Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(api)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
