//! From a parsed [`Config`] to a broker ready to serve: sources (and the directory), router,
//! access policy (objections file), audit trail and TLS material, each built and checked here.
//!
//! `carerecord serve` and `carerecord check-config` both call [`assemble`], so a configuration
//! that passes the check is one serve accepts: the same files read, the same certificates
//! parsed, the same audit file opened for appending. Only two things differ, on purpose: the
//! check binds no port, and it checks the audit trail without taking its lock (so checking a
//! running broker's configuration does not fail because that broker holds its trail).

use std::time::Duration;

use crate::access::{Policy, PolicyError};
use crate::audit::{self, AuditError, AuditLog};
use crate::config::Config;
use crate::fanout::SourceSet;
use crate::lookup::{Broker, BrokerParts, CacheLimits, DeadlineRules, LoadLimits};
use crate::registry::{self, BuildError};
use crate::routing::Router;
use crate::server::{ServeError, Transport};

/// What to do with the audit trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trail {
    /// Open, lock and continue it: serving.
    Open,
    /// Check it could be opened (intact, writable, or creatable) without holding it.
    Check,
}

/// Everything `serve` runs on.
pub struct Assembly {
    /// The broker, ready to serve; `None` under [`Trail::Check`] (a broker needs an open trail).
    pub broker: Option<Broker>,
    /// How callers reach it (plaintext, TLS or mutual TLS), certificates loaded and parsed.
    pub transport: Transport,
    /// The FHIR face, when `[fhir]` is configured.
    pub fhir: Option<crate::fhir_api::FaceParts>,
    /// The clinician's web view, when `[view]` is configured.
    pub view: Option<crate::view::ViewParts>,
    /// Sources configured: `[[sources]]` plus the directory's organisations.
    pub source_count: usize,
}

/// One reason a configuration cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error(transparent)]
    Sources(BuildError),
    #[error(transparent)]
    Routing(BuildError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Tls(#[from] ServeError),
    #[error(transparent)]
    FhirFace(#[from] crate::fhir_api::FaceConfigError),
    #[error(transparent)]
    View(#[from] crate::view::ViewConfigError),
}

/// Every reason a configuration cannot be served, found in one pass.
#[derive(Debug)]
pub struct Problems(pub Vec<Problem>);

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            many => {
                write!(f, "{} problems:", many.len())?;
                for p in many {
                    write!(f, "\n  - {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Problems {}

/// Builds and checks everything the configuration names. Under [`Trail::Open`] the result
/// holds the broker; under [`Trail::Check`] everything is built and checked the same way, the
/// trail is checked without being held, and no broker is made.
pub fn assemble(config: &Config, trail: Trail) -> Result<Assembly, Problems> {
    let mut problems = Vec::new();
    let sources = registry::build(config, 1)
        .map_err(|e| problems.push(Problem::Sources(e)))
        .ok();
    let router = registry::router(config)
        .map_err(|e| problems.push(Problem::Routing(e)))
        .ok();
    let policy = Policy::new(&config.access)
        .map_err(|e| problems.push(e.into()))
        .ok();
    let transport = tls(config).map_err(|e| problems.push(e.into())).ok();
    let fhir = crate::fhir_api::from_config(config)
        .map_err(|e| problems.push(e.into()))
        .ok()
        .flatten();
    let view = crate::view::from_config(config)
        .map_err(|e| problems.push(e.into()))
        .ok()
        .flatten();
    // Checking reads the trail without holding it; serving opens it below, once nothing else is
    // wrong (then only to report it alongside the other problems is it checked here). Both find
    // the same faults with the same messages.
    if (trail == Trail::Check || !problems.is_empty())
        && let Err(e) = audit::check_usable(&config.audit.file, config.audit.instance.as_deref())
    {
        problems.push(e.into());
    }
    let (Some(sources), Some(router), Some(policy), Some(transport), true) =
        (sources, router, policy, transport, problems.is_empty())
    else {
        return Err(Problems(problems));
    };
    // Only a configuration with nothing else wrong opens (creates, locks) the trail, so a
    // refused start leaves no file behind and holds no lock.
    let audit = match trail {
        Trail::Open => Some(open_trail(config).map_err(|e| Problems(vec![e.into()]))?),
        Trail::Check => None,
    };
    let source_count = sources.sources.len();
    let broker = audit.map(|audit| Broker::new(parts(config, policy, audit, router), sources));
    Ok(Assembly {
        broker,
        transport,
        fhir,
        view,
        source_count,
    })
}

/// A broker over `sources` given by the caller (tests, benches, embedders), with everything
/// else — policy, audit trail, routing, limits — from `config`, as `serve` builds it.
pub fn broker_with_sources(config: &Config, sources: SourceSet) -> Result<Broker, Problems> {
    let policy = Policy::new(&config.access).map_err(|e| Problems(vec![e.into()]))?;
    let router = registry::router(config).map_err(|e| Problems(vec![Problem::Routing(e)]))?;
    let audit = open_trail(config).map_err(|e| Problems(vec![e.into()]))?;
    Ok(Broker::new(parts(config, policy, audit, router), sources))
}

/// The trail `[audit]` names: this instance's own (an unnamed one only for a configuration
/// built in code without an instance).
fn open_trail(config: &Config) -> Result<AuditLog, AuditError> {
    match &config.audit.instance {
        Some(instance) => AuditLog::open_named(&config.audit.file, config.audit.fsync, instance),
        None => AuditLog::open(&config.audit.file, config.audit.fsync),
    }
}

/// What the core is made of besides its sources, from the configuration file's sections.
fn parts(config: &Config, policy: Policy, audit: AuditLog, router: Router) -> BrokerParts {
    let r = &config.resilience;
    // The door must be narrower than any source's bulkhead: a flight calls each source at most
    // once and holds its door slot until its calls end, so the door sheds before a bulkhead
    // can refuse a lookup (which would leave it partial, or its relationship unconfirmed).
    let max_in_flight = r.max_lookups_in_flight.min(r.source_max_in_flight);
    if max_in_flight < r.max_lookups_in_flight {
        tracing::warn!(
            configured = r.max_lookups_in_flight,
            used = max_in_flight,
            "resilience.max_lookups_in_flight lowered to resilience.source_max_in_flight: \
             the broker sheds at the door before any source's bulkhead refuses"
        );
    }
    BrokerParts {
        broker_id: config.server.broker_id.clone(),
        deadlines: DeadlineRules {
            max_lookup: Duration::from_millis(config.budget.max_lookup_ms),
            merge_headroom: Duration::from_millis(config.budget.merge_headroom_ms),
        },
        cache: CacheLimits {
            max_bytes: config.cache.max_bytes,
            ttl: config.cache.ttl(),
            partial_ttl: config.cache.partial_ttl(),
        },
        policy,
        audit,
        limits: LoadLimits {
            max_in_flight,
            retry_after: Duration::from_millis(r.shed_retry_after_ms),
        },
        router,
    }
}

/// The transport, with its certificates and key read and parsed the way the server will
/// (tonic builds its TLS acceptor from them), so a bad file is found before a port is bound.
fn tls(config: &Config) -> Result<Transport, ServeError> {
    let transport = Transport::from_config(&config.server)?;
    if let (Some(acceptor), Some(files)) = (&transport.tls, &config.server.tls) {
        tonic::transport::Server::builder()
            .tls_config(acceptor.clone())
            .map_err(|e| {
                ServeError::Certificate(format!(
                    "[server.tls] cert {}, key {}: {}",
                    files.cert.display(),
                    files.key.display(),
                    describe(&e)
                ))
            })?;
    }
    Ok(transport)
}

/// An error with its causes, which tonic keeps out of its own message.
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
