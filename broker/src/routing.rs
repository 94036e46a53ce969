//! Routing: which sources to ask for this patient. A small region asks every source; a whole
//! region (thousands of organisations) asks the always-ask sources (the area's acute trusts and
//! ambulance service) plus those a record locator names, so a lookup costs a handful of requests,
//! not thousands, and its latency is not hostage to the slowest of thousands.
//!
//! If every locator fails or is slow, the lookup still asks the always-ask sources and says
//! plainly that the view may be missing organisations.
//!
//! The locator's round trip is not paid before anyone is asked: the always-ask organisations,
//! and those a locator named for this patient in the last day, are asked at once
//! ([`Router::plan`]), and only the organisations the locator adds are asked after it answers
//! ([`Router::locate`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::locator::{LocateRequest, Located, Locator};
use carerecord_adapters::{NhsNumber, SourceError, SourceRequest};
use carerecord_proto::{LocatorStatus, SourceOutcome, Warning, WarningKind};
use futures::future::join_all;
use moka::future::Cache;
use tokio::time::Instant;
use tracing::Instrument;

use crate::fanout::{ConfiguredSource, DEFAULT_BREAKER, DEFAULT_MAX_IN_FLIGHT, SourceSet, millis};
use crate::resilience::Guards;

/// Why a source was asked, as the response reports it.
pub const ALL: &str = "all";
pub const ALWAYS_ASK: &str = "always_ask";
/// A locator named the organisation for this patient recently (asked before it answered again).
pub const RECENTLY_LOCATED: &str = "recently_located";

/// How long a locator's answer still says which organisations to ask before it answers again.
/// Asking one that no longer holds records costs a NOT_FOUND, never another patient's data.
const RECENTLY: Duration = Duration::from_secs(24 * 60 * 60);

/// The sources chosen for one lookup, and how.
pub struct Route {
    /// The sources to ask, in configuration order.
    pub set: Arc<SourceSet>,
    /// Where each is in the whole configured set (ascending, parallel to `set.sources`): an
    /// answer's index is its position there, so answers started before the locator answered
    /// keep their place in the route it completes.
    pub positions: Vec<usize>,
    /// Why each was asked, parallel to `set.sources`.
    pub selected_by: Vec<String>,
    /// What each locator said.
    pub locators: Vec<LocatorStatus>,
    /// Locator trouble the clinician must know about.
    pub warnings: Vec<Warning>,
    /// True when a locator failed: the view may miss organisations, so it is never "complete".
    pub degraded: bool,
}

impl Route {
    /// Every source, as a small region is asked.
    pub fn all(set: Arc<SourceSet>) -> Route {
        let selected_by = vec![ALL.to_owned(); set.sources.len()];
        Route {
            positions: (0..set.sources.len()).collect(),
            set,
            selected_by,
            locators: Vec::new(),
            warnings: Vec::new(),
            degraded: false,
        }
    }
}

/// A locator as the broker runs it: behind the same resilience layers as a source (breaker,
/// bulkhead, deadline, panic containment), so a hung or crashing locator costs a lookup no more
/// than its timeout, and a dead one is not asked until its circuit probes.
struct GuardedLocator {
    locator: Arc<dyn Locator>,
    guards: Guards,
}

impl GuardedLocator {
    /// One locate through every layer. `callers_deadline`: the lookup's deadline, not the
    /// locator timeout, bounds this call.
    async fn locate(
        &self,
        ask: &LocateRequest,
        callers_deadline: bool,
    ) -> Result<Located, SourceError> {
        self.guards
            .call(ask.deadline, callers_deadline, self.locator.locate(ask))
            .await
            .map_err(|f| f.into_source_error("locator"))
    }
}

/// How sources are chosen.
pub struct Router {
    mode: Mode,
}

// One router per broker: the size of the variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Mode {
    All,
    Located {
        always_ask: HashSet<String>,
        locators: Vec<GuardedLocator>,
        timeout: Duration,
        /// Locator answers by patient, kept briefly like records (no clinical content).
        cache: Cache<NhsNumber, Answers>,
        /// The same answers kept for [`RECENTLY`]: who to ask while the locator is asked again.
        recent: Cache<NhsNumber, Answers>,
    },
}

/// Each locator's answer, by locator id.
type Answers = Arc<Vec<(String, Located)>>;

/// How a lookup's sources are chosen: all known now, or some now and the rest when the locators
/// answer.
pub enum Plan {
    /// The whole route (every source, or the locators' cached answers).
    Ready(Route),
    /// Ask these now (always-ask, and the organisations the locators named recently); call
    /// [`Router::locate`] for the whole route. As it stands, this is the route a lookup whose
    /// locators never answer ends with.
    Overlapped(Route),
}

impl Router {
    /// Ask every source.
    pub fn all() -> Router {
        Router { mode: Mode::All }
    }

    /// Ask `always_ask` organisations plus those the locators name. Each locator gets the
    /// default breaker and bulkhead of a source.
    pub fn located(
        always_ask: impl IntoIterator<Item = String>,
        locators: Vec<Arc<dyn Locator>>,
        timeout: Duration,
        cache_ttl: Duration,
    ) -> Router {
        Router {
            mode: Mode::Located {
                always_ask: always_ask
                    .into_iter()
                    .map(|c| c.trim().to_ascii_uppercase())
                    .collect(),
                locators: locators
                    .into_iter()
                    .map(|locator| GuardedLocator {
                        locator,
                        guards: Guards::new(DEFAULT_BREAKER, DEFAULT_MAX_IN_FLIGHT),
                    })
                    .collect(),
                timeout,
                cache: Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(cache_ttl)
                    .build(),
                recent: Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(RECENTLY.max(cache_ttl))
                    .build(),
            },
        }
    }

    /// The route used when routing itself did not finish in time: the always-ask sources only.
    pub fn fallback(&self, set: &Arc<SourceSet>) -> Route {
        match &self.mode {
            Mode::All => Route::all(set.clone()),
            Mode::Located {
                always_ask,
                locators,
                ..
            } => build(set, always_ask, &[], &[], unanswered(locators)),
        }
    }

    /// The sources to ask at once. Looks only at what is already known (the locators' cached or
    /// recent answers), never at every configured organisation.
    pub async fn plan(&self, set: &Arc<SourceSet>, nhs_number: NhsNumber) -> Plan {
        let Mode::Located {
            always_ask,
            locators,
            cache,
            recent,
            ..
        } = &self.mode
        else {
            return Plan::Ready(Route::all(set.clone()));
        };
        if let Some(answers) = cache.get(&nhs_number).await {
            let statuses = answers
                .iter()
                .map(|(id, located)| LocatorStatus {
                    locator_id: id.clone(),
                    outcome: SourceOutcome::Ok as i32,
                    organisations: located.organisations.len() as u32,
                    message: "from cache".into(),
                    ..LocatorStatus::default()
                })
                .collect();
            return Plan::Ready(build(set, always_ask, &answers, &[], statuses));
        }
        let recently = recent.get(&nhs_number).await.unwrap_or_default();
        Plan::Overlapped(build(set, always_ask, &[], &recently, unanswered(locators)))
    }

    /// Chooses the sources for `request`: [`Router::plan`], then [`Router::locate`] if needed.
    pub async fn route(&self, set: &Arc<SourceSet>, request: &SourceRequest) -> Route {
        match self.plan(set, request.nhs_number).await {
            Plan::Ready(route) => route,
            Plan::Overlapped(early) => self.locate(set, request, &early).await,
        }
    }

    /// Asks the locators, and returns the whole route: always-ask, what they named, and every
    /// source of `early` (already asked: its answers keep their place).
    pub async fn locate(
        &self,
        set: &Arc<SourceSet>,
        request: &SourceRequest,
        early: &Route,
    ) -> Route {
        let Mode::Located {
            always_ask,
            locators,
            timeout,
            cache,
            recent,
        } = &self.mode
        else {
            return Route::all(set.clone());
        };
        let ask = LocateRequest {
            request_id: request.request_id.clone(),
            nhs_number: request.nhs_number,
            deadline: (Instant::now() + *timeout).min(request.deadline),
            requester: request.requester.clone(),
        };
        let started = Instant::now();
        let callers_deadline = request.deadline < started + *timeout;
        let results = join_all(locators.iter().map(|l| {
            let ask = &ask;
            let id = l.locator.id().to_owned();
            let span = tracing::info_span!("locator", request_id = %ask.request_id, locator = %id);
            async move {
                let result = l.locate(ask, callers_deadline).await;
                (id, result, started.elapsed())
            }
            .instrument(span)
        }))
        .await;
        let mut statuses = Vec::with_capacity(results.len());
        let mut answers = Vec::with_capacity(results.len());
        for (id, result, latency) in results {
            match result {
                Ok(located) => {
                    statuses.push(LocatorStatus {
                        locator_id: id.clone(),
                        outcome: SourceOutcome::Ok as i32,
                        latency_ms: millis(latency),
                        organisations: located.organisations.len() as u32,
                        message: String::new(),
                    });
                    answers.push((id, located));
                }
                Err(e) => {
                    tracing::warn!(locator = %id, error = %e, "record locator failed");
                    statuses.push(LocatorStatus {
                        locator_id: id,
                        outcome: e.outcome() as i32,
                        latency_ms: millis(latency),
                        organisations: 0,
                        message: e.to_string(),
                    });
                }
            }
        }
        // The organisations' own ids for the patient, where a locator said them: each source may
        // then read the record in one request (it verifies the answer as for any remembered id).
        for (_, located) in &answers {
            for (code, id) in &located.patient_ids {
                for &index in set.indices_for_organisation(code) {
                    if let Some(configured) = set.sources.get(index) {
                        configured
                            .source
                            .hint_patient_id(request.nhs_number, id)
                            .await;
                    }
                }
            }
        }
        if answers.len() == locators.len() {
            let answers = Arc::new(answers.clone());
            cache.insert(request.nhs_number, answers.clone()).await;
            recent.insert(request.nhs_number, answers).await;
        }
        let mut route = build(set, always_ask, &answers, &[], statuses);
        // Whatever was asked early stays in the route, with its reason, even if the locators no
        // longer name it: its answer is never dropped.
        if early
            .positions
            .iter()
            .any(|p| route.positions.binary_search(p).is_err())
        {
            route = union(route, early);
        }
        route
    }
}

/// Every locator as "did not answer in time": the status of a route the locators have not
/// completed.
fn unanswered(locators: &[GuardedLocator]) -> Vec<LocatorStatus> {
    locators
        .iter()
        .map(|l| LocatorStatus {
            locator_id: l.locator.id().to_owned(),
            outcome: SourceOutcome::Timeout as i32,
            message: "did not answer in time".into(),
            ..LocatorStatus::default()
        })
        .collect()
}

/// `route` with `early`'s sources added (configuration order kept).
fn union(route: Route, early: &Route) -> Route {
    let mut chosen: BTreeMap<usize, (ConfiguredSource, String)> = BTreeMap::new();
    for (i, &p) in early.positions.iter().enumerate() {
        if let (Some(s), Some(why)) = (early.set.sources.get(i), early.selected_by.get(i)) {
            chosen.insert(p, (s.clone(), why.clone()));
        }
    }
    for (i, &p) in route.positions.iter().enumerate() {
        if let (Some(s), Some(why)) = (route.set.sources.get(i), route.selected_by.get(i)) {
            chosen.insert(p, (s.clone(), why.clone()));
        }
    }
    let epoch = route.set.epoch;
    let mut positions = Vec::with_capacity(chosen.len());
    let mut sources = Vec::with_capacity(chosen.len());
    let mut selected_by = Vec::with_capacity(chosen.len());
    for (p, (s, why)) in chosen {
        positions.push(p);
        sources.push(s);
        selected_by.push(why);
    }
    Route {
        set: Arc::new(SourceSet::new(sources, epoch)),
        positions,
        selected_by,
        ..route
    }
}

/// The route from the always-ask codes, the locators' answers, and their recent answers (a
/// reason only for organisations nothing else selected).
fn build(
    set: &Arc<SourceSet>,
    always_ask: &HashSet<String>,
    answers: &[(String, Located)],
    recently: &[(String, Located)],
    locators: Vec<LocatorStatus>,
) -> Route {
    // Only the chosen sources are touched: the work per lookup does not grow with the number
    // of organisations configured (a region has thousands). By position: configuration order.
    let mut reasons: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for code in always_ask {
        for &index in set.indices_for_organisation(code) {
            reasons
                .entry(index)
                .or_default()
                .push(ALWAYS_ASK.to_owned());
        }
    }
    let mut warnings = Vec::new();
    for (locator, located) in answers {
        for code in &located.organisations {
            let indices = set.indices_for_organisation(code);
            if indices.is_empty() {
                warnings.push(Warning {
                    kind: WarningKind::UnknownOrganisation as i32,
                    message: format!(
                        "Record locator {locator} says organisation {code} holds records for this patient, but the broker is not configured to reach it: its records are not in this view."
                    ),
                    source_ids: Vec::new(),
                });
            }
            for &index in indices {
                let why = format!("locator:{locator}");
                let reasons = reasons.entry(index).or_default();
                if !reasons.contains(&why) {
                    reasons.push(why);
                }
            }
        }
    }
    for (_, located) in recently {
        for code in &located.organisations {
            for &index in set.indices_for_organisation(code) {
                let reasons = reasons.entry(index).or_default();
                if reasons.is_empty() {
                    reasons.push(RECENTLY_LOCATED.to_owned());
                }
            }
        }
    }
    let failed: Vec<&LocatorStatus> = locators
        .iter()
        .filter(|l| l.outcome != SourceOutcome::Ok as i32)
        .collect();
    let degraded = !failed.is_empty();
    if degraded {
        let names: Vec<&str> = failed.iter().map(|l| l.locator_id.as_str()).collect();
        warnings.push(Warning {
            kind: WarningKind::LocatorUnavailable as i32,
            message: format!(
                "The record locator ({}) did not answer: only the organisations asked for every patient were asked, so records held elsewhere may be missing from this view.",
                names.join(", ")
            ),
            source_ids: Vec::new(),
        });
    }
    let mut sources = Vec::with_capacity(reasons.len());
    let mut positions = Vec::with_capacity(reasons.len());
    let mut selected_by = Vec::with_capacity(reasons.len());
    for (index, why) in reasons {
        if let Some(source) = set.sources.get(index) {
            sources.push(source.clone());
            positions.push(index);
            selected_by.push(why.join(","));
        }
    }
    Route {
        set: Arc::new(SourceSet::new(sources, set.epoch)),
        positions,
        selected_by,
        locators,
        warnings,
        degraded,
    }
}
