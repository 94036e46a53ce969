//! Real HTTP servers for the region: one listener per organisation ([`RegionServer::start_with`])
//! or one listener for every organisation, routed by path (`/org/{code}/fhir`,
//! [`RegionServer::start_shared`]); the region's record locator (`/locator/fhir`, on the shared
//! listener, or on a listener of its own beside per-port organisations); and the admin server.
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
use crate::faults::{DataMode, Fault, FaultControl, LOCATOR, OrgStats, RequestKind};
use crate::latency::LatencyProfile;
use crate::locator::{self, LocatorCtx};
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
    /// Per-organisation faults at start, by code ([`LOCATOR`] for the record locator).
    pub faults: Vec<(String, Fault)>,
    /// The locator's latency at start; `None`: `latency` if given, else 10 ms fixed. (A
    /// `latency_overrides` entry for [`LOCATOR`] works too.)
    pub locator_latency: Option<LatencyProfile>,
    /// The fraction (0..=1) of record pointers the locator does not hold, drawn reproducibly per
    /// patient and organisation: a locator that does not know every organisation. Default 0.
    pub locator_missing_pointers: f64,
}

/// The locator's latency when nothing else is said: a national service, quick but not free.
const LOCATOR_DEFAULT_LATENCY: LatencyProfile = LatencyProfile::Fixed { ms: 10 };

/// One organisation as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunningOrganisation {
    pub code: String,
    pub name: String,
    pub kind: OrgKind,
    /// `http://127.0.0.1:PORT/fhir`, or `http://127.0.0.1:PORT/org/{code}/fhir` on a shared port.
    pub base_url: String,
    /// Where it listens (the shared port's address when started with `start_shared`).
    pub addr: SocketAddr,
}

/// The running region. Dropping it stops the servers; [`RegionServer::shutdown`] also waits.
pub struct RegionServer {
    /// The population every organisation serves from.
    region: Arc<Region>,
    organisations: Vec<RunningOrganisation>,
    admin_addr: SocketAddr,
    /// The listener serving the locator (and, when shared, every organisation).
    router_addr: SocketAddr,
    /// Every organisation on `router_addr` (`start_shared`) rather than on ports of their own.
    shared: bool,
    locator_missing_pointers: f64,
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
            .field("organisations", &self.organisations.len())
            .field("shared", &self.shared)
            .field("router_addr", &self.router_addr)
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

/// What every connection of the path-routed listener shares: `/org/{code}/fhir` for every
/// organisation and `/locator/fhir` for the locator.
struct RouterServer {
    region: Arc<Region>,
    control: FaultControl,
    /// Every organisation's published FHIR base URL, region order (the locator's pointers).
    org_base_urls: Vec<String>,
    /// `http://IP:PORT/locator/fhir`, when the request has no usable Host header.
    locator_base_url: String,
    /// `http://IP:PORT`, when the request has no usable Host header.
    origin: String,
    missing_fraction: f64,
}

/// What a listener serves.
enum App {
    Org(OrgServer),
    Router(RouterServer),
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
        Self::start_mode(region, ip, options, false).await
    }

    /// Serves every organisation from ONE port, routed by path: organisation `CODE`'s FHIR base
    /// is `http://IP:PORT/org/CODE/fhir` (same API, faults, latency and counters as a port of
    /// its own), the locator is `http://IP:PORT/locator/fhir`, and the admin server has its own
    /// port as usual. One listener and one accept loop whatever the number of organisations,
    /// so a region of thousands starts in milliseconds.
    pub async fn start_shared(
        region: Arc<Region>,
        ip: IpAddr,
        options: ServerOptions,
    ) -> io::Result<RegionServer> {
        Self::start_mode(region, ip, options, true).await
    }

    async fn start_mode(
        region: Arc<Region>,
        ip: IpAddr,
        options: ServerOptions,
        shared: bool,
    ) -> io::Result<RegionServer> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        let named = options.latency_overrides.iter().map(|(c, _)| c);
        for code in named.chain(options.faults.iter().map(|(c, _)| c)) {
            if region.organisation(code).is_none() && !code.eq_ignore_ascii_case(LOCATOR) {
                return Err(invalid(format!(
                    "no organisation with code {code:?} in this region"
                )));
            }
        }
        if !(0.0..=1.0).contains(&options.locator_missing_pointers) {
            return Err(invalid(format!(
                "locator_missing_pointers must be between 0 and 1, not {}",
                options.locator_missing_pointers
            )));
        }
        // Last setting wins, as on the command line; by code, so thousands stay cheap.
        let mut latency_by_code = std::collections::HashMap::new();
        for (c, l) in &options.latency_overrides {
            latency_by_code.insert(c.to_ascii_uppercase(), *l);
        }
        let mut fault_by_code = std::collections::HashMap::new();
        for (c, f) in &options.faults {
            fault_by_code.insert(c.to_ascii_uppercase(), *f);
        }
        let settings = region
            .organisations()
            .iter()
            .map(|o| {
                let key = o.code.to_ascii_uppercase();
                let latency = latency_by_code
                    .get(&key)
                    .copied()
                    .or(options.latency)
                    .unwrap_or_else(|| LatencyProfile::default_for(o.kind));
                let fault = fault_by_code.get(&key).copied().unwrap_or_default();
                (o.code.clone(), latency, fault)
            })
            .collect();
        let locator_latency = latency_by_code
            .get(LOCATOR)
            .copied()
            .or(options.locator_latency)
            .or(options.latency)
            .unwrap_or(LOCATOR_DEFAULT_LATENCY);
        let locator_fault = fault_by_code.get(LOCATOR).copied().unwrap_or_default();
        let control = FaultControl::with_locator(
            region.spec().seed,
            settings,
            (locator_latency, locator_fault),
        );
        let (shutdown, shutdown_rx) = watch::channel(false);
        let display_ip = match ip {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            other => other,
        };

        let mut organisations = Vec::with_capacity(region.organisations().len());
        let mut tasks = Vec::new();
        let router_listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let router_addr = SocketAddr::new(display_ip, router_listener.local_addr()?.port());
        let origin = format!("http://{router_addr}");
        for (i, o) in region.organisations().iter().enumerate() {
            let (base_url, addr) = if shared {
                (format!("{origin}/org/{}/fhir", o.code), router_addr)
            } else {
                let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
                let addr = listener.local_addr()?;
                let base_url = format!("http://{}/fhir", SocketAddr::new(display_ip, addr.port()));
                let server = Arc::new(App::Org(OrgServer {
                    region: region.clone(),
                    org: i,
                    base_url: base_url.clone(),
                    control: control.clone(),
                }));
                tasks.push(tokio::spawn(accept_loop(
                    listener,
                    server,
                    shutdown_rx.clone(),
                )));
                (base_url, addr)
            };
            organisations.push(RunningOrganisation {
                code: o.code.clone(),
                name: o.name.clone(),
                kind: o.kind,
                base_url,
                addr,
            });
        }
        let router = Arc::new(App::Router(RouterServer {
            region: region.clone(),
            control: control.clone(),
            org_base_urls: organisations.iter().map(|o| o.base_url.clone()).collect(),
            locator_base_url: format!("{origin}/locator/fhir"),
            origin,
            missing_fraction: options.locator_missing_pointers,
        }));
        tasks.push(tokio::spawn(accept_loop(
            router_listener,
            router,
            shutdown_rx.clone(),
        )));

        let admin_listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let admin_addr = SocketAddr::new(display_ip, admin_listener.local_addr()?.port());
        let router = crate::admin::router(
            control.clone(),
            organisations.clone(),
            format!("http://{router_addr}/locator/fhir"),
            region.clone(),
        );
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
        info!(
            organisations = organisations.len(),
            shared,
            router = %router_addr,
            admin = %admin_addr,
            "mock region started"
        );
        Ok(RegionServer {
            region,
            organisations,
            admin_addr,
            router_addr,
            shared,
            locator_missing_pointers: options.locator_missing_pointers,
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
        self.region
            .org_index(code)
            .and_then(|i| self.organisations.get(i))
    }

    /// The record locator's FHIR base, `http://IP:PORT/locator/fhir` (on the shared port, or
    /// on a port of its own beside per-port organisations). See the `locator` module docs.
    pub fn locator_url(&self) -> String {
        format!("http://{}/locator/fhir", self.router_addr)
    }

    /// Were the organisations started on one shared port ([`RegionServer::start_shared`])?
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// `http://IP:PORT/org/{code}/fhir` when shared (the directory's endpoint template: `{code}`
    /// is literal), else `None` (every organisation has its own port).
    pub fn endpoint_template(&self) -> Option<String> {
        self.shared
            .then(|| format!("http://{}/org/{{code}}/fhir", self.router_addr))
    }

    /// The organisations a routed broker should always ask: see [`Region::always_ask`].
    pub fn always_ask(&self) -> Vec<String> {
        self.region.always_ask()
    }

    /// The organisations the locator's record pointers name for this patient (GP first),
    /// allowing for `ServerOptions::locator_missing_pointers`. Empty for an unknown patient.
    /// (`nhs_number` as for [`Region::patient`].)
    pub fn located_organisations(
        &self,
        nhs_number: &(impl std::fmt::Display + ?Sized),
    ) -> Vec<String> {
        self.region
            .located_organisations(nhs_number, self.locator_missing_pointers)
    }

    /// The organisation directory as CSV (RFC 4180; `\n` line ends): header
    /// `organisation_code,organisation_name,kind,base_url`, one row per organisation in region
    /// order; `base_url` empty when shared (the endpoint template covers it), filled otherwise.
    pub fn directory_csv(&self) -> String {
        let rows = self
            .organisations
            .iter()
            .map(|o| broker_config::DirectoryRow {
                organisation_code: o.code.clone(),
                organisation_name: o.name.clone(),
                kind: o.kind,
                base_url: if self.shared {
                    String::new()
                } else {
                    o.base_url.clone()
                },
            });
        broker_config::directory_csv(rows)
    }

    /// Writes [`RegionServer::directory_csv`] to `path`.
    pub fn write_directory(&self, path: &std::path::Path) -> io::Result<()> {
        std::fs::write(path, self.directory_csv())
    }

    /// A routed broker config: `[routing]` in `located` mode with this region's always-ask
    /// organisations and its locator, and every organisation from the directory at
    /// `directory_path` (made absolute); no `[[sources]]`. Organisations are read with
    /// `$everything`.
    pub fn broker_config_toml_routed(
        &self,
        broker_listen: &str,
        directory_path: &std::path::Path,
    ) -> String {
        self.broker_config_toml_routed_with(broker_listen, directory_path, FhirMode::Everything)
    }

    /// As [`RegionServer::broker_config_toml_routed`], choosing the directory's FHIR mode.
    pub fn broker_config_toml_routed_with(
        &self,
        broker_listen: &str,
        directory_path: &std::path::Path,
        mode: FhirMode,
    ) -> String {
        let file =
            std::path::absolute(directory_path).unwrap_or_else(|_| directory_path.to_path_buf());
        broker_config::render_routed(&broker_config::Routed {
            broker_listen,
            always_ask: &self.always_ask(),
            locator_url: &self.locator_url(),
            directory_file: &file.to_string_lossy(),
            endpoint_template: self.endpoint_template().as_deref(),
            mode,
        })
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

async fn accept_loop(listener: TcpListener, server: Arc<App>, shutdown: watch::Receiver<bool>) {
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
    server: Arc<App>,
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
        async move {
            let resp = match &*server {
                App::Org(org) => handle(org, &conn, req).await,
                App::Router(router) => handle_routed(router, &conn, req).await,
            };
            Ok::<_, Infallible>(resp)
        }
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

/// The Host header, if it is safe to build links from.
fn host_of(req: &Request<Incoming>) -> Option<&str> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() < 256
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
}

/// Host header → base URL for links, so clients that reached us by another name can follow them.
fn base_url_for(server: &OrgServer, req: &Request<Incoming>) -> String {
    match host_of(req) {
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
    let base_url = base_url_for(server, &req);
    with_faults(
        &server.control,
        server.org,
        kind,
        conn,
        req,
        |parts, body, served| {
            let ctx = Ctx {
                region: &server.region,
                org: server.org,
                base_url: &base_url,
                path_prefix: "",
                empty: served.fault == Fault::EmptyBundle,
                fault: served.fault,
                data: served.data,
                control: Some(&server.control),
            };
            api::handle(
                &ctx,
                &parts.method,
                parts.uri.path(),
                parts.uri.query(),
                body,
            )
        },
    )
    .await
}

/// The path-routed listener: `/org/{code}/fhir...` → that organisation, `/locator/...` → the
/// locator, anything else → 404 (counted nowhere).
async fn handle_routed(
    server: &RouterServer,
    conn: &ConnectionControl,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let origin = host_of(&req).map_or_else(|| server.origin.clone(), |h| format!("http://{h}"));
    if let Some(rest) = path.strip_prefix("/org/") {
        let (code, tail) = rest.split_once('/').map_or((rest, ""), |(c, t)| (c, t));
        let org = server.region.org_index(code);
        if let Some(org) = org.filter(|_| tail == "fhir" || tail.starts_with("fhir/")) {
            let code = &server.region.organisations()[org].code;
            let prefix = format!("/org/{code}");
            let inner = format!("/{tail}");
            let base_url = format!("{origin}{prefix}/fhir");
            let kind = api::classify(req.method(), &inner);
            return with_faults(
                &server.control,
                org,
                kind,
                conn,
                req,
                |parts, body, served| {
                    let ctx = Ctx {
                        region: &server.region,
                        org,
                        base_url: &base_url,
                        path_prefix: &prefix,
                        empty: served.fault == Fault::EmptyBundle,
                        fault: served.fault,
                        data: served.data,
                        control: Some(&server.control),
                    };
                    api::handle(&ctx, &parts.method, &inner, parts.uri.query(), body)
                },
            )
            .await;
        }
        let message = match org {
            None => format!("no organisation with code {code:?} in this region"),
            Some(_) => format!("no such endpoint: {path} (FHIR is below /org/{code}/fhir)"),
        };
        return fhir_response(api::outcome_response(
            StatusCode::NOT_FOUND,
            "not-found",
            &message,
        ));
    }
    if let Some(inner) = path.strip_prefix("/locator")
        && let Some(index) = server.control.locator_index()
    {
        let inner = inner.to_string();
        let base_url = if host_of(&req).is_some() {
            format!("{origin}/locator/fhir")
        } else {
            server.locator_base_url.clone()
        };
        let kind = locator::classify(req.method(), &inner);
        return with_faults(
            &server.control,
            index,
            kind,
            conn,
            req,
            |parts, _, served| {
                let ctx = LocatorCtx {
                    region: &server.region,
                    base_url: &base_url,
                    org_base_urls: &server.org_base_urls,
                    missing_fraction: server.missing_fraction,
                    empty: served.fault == Fault::EmptyBundle,
                };
                locator::handle(&ctx, &parts.method, &inner, parts.uri.query())
            },
        )
        .await;
    }
    fhir_response(api::outcome_response(
        StatusCode::NOT_FOUND,
        "not-found",
        &format!(
            "no such endpoint: {path} (organisations are at /org/{{code}}/fhir, the locator at /locator/fhir)"
        ),
    ))
}

/// What shapes a request's answer once it is served at all: faults that change the data
/// (`empty_bundle`, `wrong_patient`, `wrong_patient_refs`, `ignore_include`) and the data mode.
#[derive(Debug, Clone, Copy)]
struct Served {
    fault: Fault,
    data: DataMode,
}

/// Counts the request against `index` (an organisation, or the locator), applies its latency
/// and fault, and otherwise answers with `serve(parts, body, served)`.
async fn with_faults(
    control: &FaultControl,
    index: usize,
    kind: RequestKind,
    conn: &ConnectionControl,
    req: Request<Incoming>,
    serve: impl FnOnce(&http::request::Parts, &[u8], Served) -> api::ApiResponse,
) -> Response<Body> {
    let (n, fault, latency, data) = control.begin(index, kind);
    // Faults that answer with (different) data are not counted as faulted requests.
    let faulted = !matches!(
        fault,
        Fault::None
            | Fault::EmptyBundle
            | Fault::WrongPatient
            | Fault::WrongPatientRefs
            | Fault::IgnoreInclude
    ) && !matches!(fault, Fault::ErrorRate(p) if control.draw(index, n, 1) >= p);
    if faulted {
        control.count_fault(index);
    }

    if fault == Fault::Hang {
        tokio::time::sleep(HANG_LIMIT).await;
        conn.reset_now();
        return std::future::pending().await;
    }
    let delay = latency.sample(&[control.seed(), 0x1A7E, index as u64, n]);
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
    let resp = serve(&parts, &body, Served { fault, data });
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
