//! Real HTTP servers for the region: one listener per organisation, plus the admin server.
//!
//! Organisation ports are served with hyper directly rather than through a router because some
//! faults live below HTTP: `reset` must close the TCP connection with an RST and no response,
//! and `hang` must hold a connection open without answering. Each connection therefore owns a
//! small control block the request handler can use to kill it, and the socket is wrapped so that
//! a killed connection is dropped with `SO_LINGER 0` (an RST, not a polite FIN). Latency and
//! faults are read from [`FaultControl`] on every request, so they can change at runtime.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::api::{self, Ctx};
use crate::broker_config::{self, FhirMode};
use crate::faults::{Fault, FaultControl, OrgStats};
use crate::latency::LatencyProfile;
use crate::population::{OrgKind, Region};

/// A hung request is given up on by the server after this long (clients give up much sooner).
const HANG_LIMIT: Duration = Duration::from_secs(300);
/// `slow_body`: this many bytes every [`SLOW_BODY_INTERVAL`].
const SLOW_BODY_CHUNK: usize = 64;
const SLOW_BODY_INTERVAL: Duration = Duration::from_millis(500);
/// Largest request body accepted (batches are small).
const MAX_BODY: usize = 1 << 20;

/// How to start the region's servers.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Latency for every organisation; `None` uses the per-kind defaults (5–30 ms fixed).
    /// Tests usually want `Some(LatencyProfile::ZERO)`.
    pub latency: Option<LatencyProfile>,
    /// Per-organisation latency at start, by code (applied after `latency`).
    pub latency_overrides: Vec<(String, LatencyProfile)>,
    /// Per-organisation faults at start, by code.
    pub faults: Vec<(String, Fault)>,
}

/// One organisation as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunningOrganisation {
    pub code: String,
    pub name: String,
    pub kind: OrgKind,
    /// `http://127.0.0.1:PORT/fhir`.
    pub base_url: String,
    pub addr: SocketAddr,
}

/// The running region. Dropping it stops the servers; [`RegionServer::shutdown`] also waits.
pub struct RegionServer {
    /// The population every organisation serves from.
    region: Arc<Region>,
    organisations: Vec<RunningOrganisation>,
    admin_addr: SocketAddr,
    /// Shared with every server and the admin API: the same knobs from code and over HTTP.
    control: FaultControl,
    /// Flipped to stop accept loops and cut open connections (also fires when dropped).
    shutdown: watch::Sender<bool>,
    /// Accept loops and the admin server, awaited by `shutdown`.
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for RegionServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionServer")
            .field("organisations", &self.organisations)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

/// What every connection of one organisation shares.
struct OrgServer {
    region: Arc<Region>,
    org: usize,
    base_url: String,
    control: FaultControl,
}

impl RegionServer {
    /// Starts one server per organisation on `ip:0` (each on its own port) and the admin server,
    /// with the default per-kind latency.
    pub async fn start(region: Arc<Region>, ip: IpAddr) -> io::Result<RegionServer> {
        Self::start_with(region, ip, ServerOptions::default()).await
    }

    pub async fn start_with(
        region: Arc<Region>,
        ip: IpAddr,
        options: ServerOptions,
    ) -> io::Result<RegionServer> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        let named = options.latency_overrides.iter().map(|(c, _)| c);
        for code in named.chain(options.faults.iter().map(|(c, _)| c)) {
            if region.organisation(code).is_none() {
                return Err(invalid(format!(
                    "no organisation with code {code:?} in this region"
                )));
            }
        }
        let settings = region
            .organisations()
            .iter()
            .map(|o| {
                let latency = options
                    .latency_overrides
                    .iter()
                    .rev()
                    .find(|(c, _)| c.eq_ignore_ascii_case(&o.code))
                    .map(|(_, l)| *l)
                    .or(options.latency)
                    .unwrap_or_else(|| LatencyProfile::default_for(o.kind));
                let fault = options
                    .faults
                    .iter()
                    .rev()
                    .find(|(c, _)| c.eq_ignore_ascii_case(&o.code))
                    .map(|(_, f)| *f)
                    .unwrap_or_default();
                (o.code.clone(), latency, fault)
            })
            .collect();
        let control = FaultControl::new(region.spec().seed, settings);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let display_ip = match ip {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            other => other,
        };

        let mut organisations = Vec::new();
        let mut tasks = Vec::new();
        for (i, o) in region.organisations().iter().enumerate() {
            let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
            let addr = listener.local_addr()?;
            let base_url = format!("http://{}/fhir", SocketAddr::new(display_ip, addr.port()));
            let server = Arc::new(OrgServer {
                region: region.clone(),
                org: i,
                base_url: base_url.clone(),
                control: control.clone(),
            });
            tasks.push(tokio::spawn(accept_loop(
                listener,
                server,
                shutdown_rx.clone(),
            )));
            organisations.push(RunningOrganisation {
                code: o.code.clone(),
                name: o.name.clone(),
                kind: o.kind,
                base_url,
                addr,
            });
        }

        let admin_listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let admin_addr = SocketAddr::new(display_ip, admin_listener.local_addr()?.port());
        let router = crate::admin::router(control.clone(), organisations.clone());
        let mut admin_shutdown = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let stop = async move {
                stopped(&mut admin_shutdown).await;
            };
            if let Err(e) = axum::serve(admin_listener, router)
                .with_graceful_shutdown(stop)
                .await
            {
                warn!(error = %e, "admin server stopped");
            }
        }));
        info!(organisations = organisations.len(), admin = %admin_addr, "mock region started");
        Ok(RegionServer {
            region,
            organisations,
            admin_addr,
            control,
            shutdown,
            tasks,
        })
    }

    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    pub fn organisations(&self) -> Vec<RunningOrganisation> {
        self.organisations.clone()
    }

    /// The running organisation with this code (case-insensitive).
    pub fn organisation(&self, code: &str) -> Option<&RunningOrganisation> {
        self.organisations
            .iter()
            .find(|o| o.code.eq_ignore_ascii_case(code))
    }

    /// `http://127.0.0.1:PORT/admin`.
    pub fn admin_url(&self) -> String {
        format!("http://{}/admin", self.admin_addr)
    }

    pub fn faults(&self) -> FaultControl {
        self.control.clone()
    }

    pub fn stats(&self, org_code: &str) -> Option<OrgStats> {
        self.control.stats(org_code)
    }

    /// A broker config with one `search`-mode source per organisation.
    pub fn broker_config_toml(&self, broker_listen: &str) -> String {
        broker_config::render(broker_listen, &self.organisations, |_| FhirMode::Search)
    }

    /// A broker config choosing the FHIR access mode per organisation.
    pub fn broker_config_toml_with(
        &self,
        broker_listen: &str,
        mode: impl Fn(&RunningOrganisation) -> FhirMode,
    ) -> String {
        broker_config::render(broker_listen, &self.organisations, mode)
    }

    /// Stops accepting, cuts open connections (including hung ones) and waits for the servers.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for RegionServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

async fn accept_loop(
    listener: TcpListener,
    server: Arc<OrgServer>,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(serve_connection(stream, server.clone(), shutdown.clone()));
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped(&mut stop) => break,
        }
    }
}

/// Resolves once shutdown is signalled (or the region was dropped).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Lets a request handler kill its own connection.
#[derive(Default)]
struct ConnectionControl {
    /// Close with an RST rather than a FIN.
    reset: AtomicBool,
    kill: Notify,
}

impl ConnectionControl {
    fn reset_now(&self) {
        self.reset.store(true, Ordering::SeqCst);
        self.kill.notify_one();
    }
}

async fn serve_connection(
    stream: TcpStream,
    server: Arc<OrgServer>,
    mut shutdown: watch::Receiver<bool>,
) {
    let conn = Arc::new(ConnectionControl::default());
    let io = TokioIo::new(ResettableStream {
        inner: stream,
        conn: conn.clone(),
    });
    let handler_conn = conn.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let server = server.clone();
        let conn = handler_conn.clone();
        async move { Ok::<_, Infallible>(handle(&server, &conn, req).await) }
    });
    let serving = hyper::server::conn::http1::Builder::new().serve_connection(io, service);
    tokio::select! {
        result = serving => {
            if let Err(e) = result {
                debug!(error = %e, "connection ended with an error");
            }
        }
        _ = conn.kill.notified() => {}
        _ = stopped(&mut shutdown) => {}
    }
    // Dropping `serving` drops the stream; `ResettableStream` turns that into an RST if asked.
}

/// A TCP stream that is closed with an RST when its connection was killed by the `reset` fault.
struct ResettableStream {
    inner: TcpStream,
    conn: Arc<ConnectionControl>,
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.conn.reset.load(Ordering::SeqCst) {
            // SO_LINGER 0 makes close() send RST; close does not block with a zero timeout.
            let _ = self.inner.set_zero_linger();
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Host header → base URL for links, so clients that reached us by another name can follow them.
fn base_url_for(server: &OrgServer, req: &Request<Incoming>) -> String {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() < 256
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        });
    match host {
        Some(h) => format!("http://{h}/fhir"),
        None => server.base_url.clone(),
    }
}

async fn handle(
    server: &OrgServer,
    conn: &ConnectionControl,
    req: Request<Incoming>,
) -> Response<Body> {
    let kind = api::classify(req.method(), req.uri().path());
    let (n, fault, latency) = server.control.begin(server.org, kind);
    let faulted = !matches!(fault, Fault::None | Fault::EmptyBundle)
        && !matches!(fault, Fault::ErrorRate(p) if server.control.draw(server.org, n, 1) >= p);
    if faulted {
        server.control.count_fault(server.org);
    }

    if fault == Fault::Hang {
        tokio::time::sleep(HANG_LIMIT).await;
        conn.reset_now();
        return std::future::pending().await;
    }
    let delay = latency.sample(&[server.control.seed(), 0x1A7E, server.org as u64, n]);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match fault {
        Fault::Reset => {
            conn.reset_now();
            return std::future::pending().await;
        }
        Fault::Http500 => {
            return fhir_response(api::outcome_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "injected fault: http500",
            ));
        }
        Fault::ErrorRate(_) if faulted => {
            return fhir_response(api::outcome_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "transient",
                "injected fault: error_rate",
            ));
        }
        _ => {}
    }

    let base_url = base_url_for(server, &req);
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(Body::new(body), MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return fhir_response(api::outcome_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-costly",
                "request body too large or unreadable",
            ));
        }
    };
    let ctx = Ctx {
        region: &server.region,
        org: server.org,
        base_url: &base_url,
        empty: fault == Fault::EmptyBundle,
        control: Some(&server.control),
    };
    let resp = api::handle(
        &ctx,
        &parts.method,
        parts.uri.path(),
        parts.uri.query(),
        &body,
    );
    match fault {
        Fault::MalformedJson => {
            // Cut the document off part-way and add junk: a parser must fail, not guess.
            let mut cut = resp.body.slice(..resp.body.len() * 3 / 5).to_vec();
            cut.extend_from_slice(b"\x00{\"resourceType\":");
            fhir_response(api::ApiResponse {
                body: Bytes::from(cut),
                ..resp
            })
        }
        Fault::SlowBody => slow_response(resp),
        _ => fhir_response(resp),
    }
}

fn response(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn fhir_response(resp: api::ApiResponse) -> Response<Body> {
    response(resp.status, resp.content_type, Body::from(resp.body))
}

/// Headers now, then the body a few bytes at a time.
fn slow_response(resp: api::ApiResponse) -> Response<Body> {
    let body = resp.body;
    let chunks = futures::stream::unfold(0usize, move |offset| {
        let body = body.clone();
        async move {
            if offset >= body.len() {
                return None;
            }
            tokio::time::sleep(SLOW_BODY_INTERVAL).await;
            let end = (offset + SLOW_BODY_CHUNK).min(body.len());
            Some((Ok::<_, Infallible>(body.slice(offset..end)), end))
        }
    });
    response(resp.status, resp.content_type, Body::from_stream(chunks))
}
