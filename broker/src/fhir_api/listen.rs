//! The FHIR face's listener: plaintext (development) or TLS with the same certificate, client CA
//! and calling systems as gRPC. Handshakes run in their own tasks under a timeout, so a client
//! that connects and says nothing holds no one else up; each connection carries the peer's
//! certificate chain to the handlers (`ConnectInfo<Peer>`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::config::TlsConfig;

/// A TLS handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections handshaken but not yet taken by the server.
const BACKLOG: usize = 128;
/// TLS handshakes in progress at once: beyond this, new connections are closed at once, so a
/// flood of clients that connect and say nothing cannot use up the process's file descriptors
/// (shared with gRPC and the connections to the sources).
const MAX_HANDSHAKES: usize = 256;

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The client's certificate chain (leaf first), when it presented one under mutual TLS.
    pub certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// An accepted connection, plaintext or TLS.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection for T {}

/// The face's listener.
pub struct FaceListener {
    local: SocketAddr,
    accepted: mpsc::Receiver<(Pin<Box<dyn Connection>>, Peer)>,
}

/// Why TLS could not be set up for the face.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{0}: {1}")]
    Pem(String, String),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// The rustls server configuration for `[server.tls]`, ALPN HTTP/1.1.
pub fn tls_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, ListenError> {
    tls_config_with(tls, ClientCertificates::Required)
}

/// Whether a listener under `client_ca` insists on a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertificates {
    /// Every connection presents one (the FHIR face: systems only).
    Required,
    /// Asked for and verified when presented, but a connection without one is accepted (the web
    /// view: browsers have none; the routes that need a calling system check for it).
    Optional,
}

/// [`tls_config`], choosing whether a client certificate is required.
pub fn tls_config_with(
    tls: &TlsConfig,
    clients: ClientCertificates,
) -> Result<Arc<rustls::ServerConfig>, ListenError> {
    let pem_err = |path: &std::path::Path| {
        let name = path.display().to_string();
        move |e: rustls_pki_types::pem::Error| ListenError::Pem(name.clone(), e.to_string())
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(pem_err(&tls.cert))?
        .collect::<Result<_, _>>()
        .map_err(pem_err(&tls.cert))?;
    let key =
        rustls_pki_types::PrivateKeyDer::from_pem_file(&tls.key).map_err(pem_err(&tls.key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = match &tls.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(pem_err(ca))? {
                roots.add(cert.map_err(pem_err(ca))?)?;
            }
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            if clients == ClientCertificates::Optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| ListenError::Verifier(e.to_string()))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(certs, key)?,
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl FaceListener {
    /// Accepts on `listener`; with `tls`, every connection is handshaken first (failures are
    /// logged at debug and dropped).
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<FaceListener, ListenError> {
        let local = listener.local_addr()?;
        let (tx, accepted) = mpsc::channel::<(Pin<Box<dyn Connection>>, Peer)>(BACKLOG);
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let (tcp, addr) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "FHIR face: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let tx = tx.clone();
                match &acceptor {
                    None => {
                        let peer = Peer {
                            addr,
                            certificates: None,
                        };
                        if tx.send((Box::pin(tcp), peer)).await.is_err() {
                            return;
                        }
                    }
                    Some(acceptor) => {
                        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                            tracing::debug!(%addr, "FHIR face: too many TLS handshakes in progress; connection closed");
                            continue;
                        };
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            let stream = match tokio::time::timeout(
                                HANDSHAKE_TIMEOUT,
                                acceptor.accept(tcp),
                            )
                            .await
                            {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(e)) => {
                                    tracing::debug!(%addr, error = %e, "FHIR face: TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%addr, "FHIR face: TLS handshake timed out");
                                    return;
                                }
                            };
                            let certificates = stream.get_ref().1.peer_certificates().map(|c| {
                                Arc::new(c.iter().map(|c| c.clone().into_owned()).collect())
                            });
                            let _ = tx
                                .send((Box::pin(stream), Peer { addr, certificates }))
                                .await;
                        });
                    }
                }
            }
        });
        Ok(FaceListener { local, accepted })
    }
}

impl axum::serve::Listener for FaceListener {
    type Io = Pin<Box<dyn Connection>>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept task only ends when this receiver is gone; wait forever otherwise.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            certificates: None,
        })
    }
}

impl Connected<IncomingStream<'_, FaceListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, FaceListener>) -> Self {
        stream.remote_addr().clone()
    }
}
