//! Single flight: concurrent lookups for the same record share one fan-out.
//!
//! The fan-out runs in its own task, owned by no caller, so it survives any caller cancelling
//! (tonic drops a handler's future when the client goes away). Callers subscribe to its
//! progress: a unary caller waits for the merged record or its own deadline, whichever is first,
//! and at its deadline merges whatever has arrived; a streaming caller sees each source's answer
//! as it lands.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use carerecord_adapters::{NhsNumber, SourceRequest};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::budget::Budget;
use crate::cache::{CacheKey, RecordCache};
use crate::documents::DocumentIds;
use crate::fanout::{self, Answer, SourceSet};
use crate::lookup::Slot;
use crate::merge::{self, MergedRecord};
use crate::routing::{Plan, Route, Router};

/// How much shorter than a caller needs a flight's deadline may be for the caller to join it:
/// concurrent callers' deadlines differ by their arrival times.
const JOIN_TOLERANCE: std::time::Duration = std::time::Duration::from_millis(50);

/// What a flight has so far.
#[derive(Default)]
pub struct Progress {
    /// Answers in completion order.
    pub answers: Vec<Arc<Answer>>,
    /// The merged record, once every source has answered or timed out.
    pub merged: Option<Arc<MergedRecord>>,
    /// The sources chosen for this patient, once routing has decided.
    pub route: Option<Arc<Route>>,
}

/// One shared fan-out.
pub struct Flight {
    pub nhs_number: NhsNumber,
    /// The sections asked for (merge reports a status for each).
    pub sections: carerecord_adapters::SectionSet,
    /// Every configured source; routing picks this lookup's from them.
    pub sources: Arc<SourceSet>,
    router: Arc<Router>,
    pub budget: Budget,
    progress: watch::Receiver<Progress>,
}

impl Flight {
    /// A fresh view of the flight's progress.
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// The merged record, or — when `deadline` comes first — a merge of what has arrived, with
    /// the rest marked TIMEOUT.
    pub async fn wait(&self, deadline: Instant) -> Arc<MergedRecord> {
        let mut rx = self.subscribe();
        loop {
            if let Some(merged) = rx.borrow_and_update().merged.clone() {
                return merged;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                // The flight task is gone (it cannot panic, but be safe) or our time is up.
                Ok(Err(_)) | Err(_) => break,
            }
        }
        self.merge_so_far(&rx.borrow())
    }

    /// Merges the answers in `progress`, marking missing sources TIMEOUT.
    pub fn merge_so_far(&self, progress: &Progress) -> Arc<MergedRecord> {
        if let Some(merged) = &progress.merged {
            return merged.clone();
        }
        let fallback;
        let route = match &progress.route {
            Some(route) => route.as_ref(),
            None => {
                fallback = self.router.fallback(&self.sources);
                &fallback
            }
        };
        let _span = tracing::info_span!("merge", answers = progress.answers.len()).entered();
        let asked = merge::asked(&route.set, &route.selected_by);
        let now = Instant::now();
        Arc::new(merge::merge(merge::MergeInput {
            nhs_number: self.nhs_number,
            sections: self.sections,
            asked: &asked,
            positions: &route.positions,
            not_asked: &[],
            answers: &progress.answers,
            route_warnings: &route.warnings,
            locators: &route.locators,
            degraded: route.degraded,
            waited: now.saturating_duration_since(self.budget.started),
            now: std::time::SystemTime::now(),
            assembled: now,
        }))
    }
}

/// Flights in progress, by cache key.
#[derive(Default)]
pub struct Flights {
    in_flight: Mutex<HashMap<CacheKey, Arc<Flight>>>,
}

impl Flights {
    /// Joins the flight for `key`, or starts one. Returns the flight and whether this call
    /// started it. A flight whose deadline falls well short of what this caller can wait for
    /// (another caller's tight deadline) is not joined: a new one replaces it for later callers.
    ///
    /// A flight this call starts holds the starting lookup's `slot` until its source calls are
    /// over, so the door counts a fan-out whose caller went away (see `lookup::admission`).
    #[allow(clippy::too_many_arguments)]
    pub fn join_or_start(
        self: &Arc<Self>,
        key: CacheKey,
        sources: Arc<SourceSet>,
        router: Arc<Router>,
        request: SourceRequest,
        budget: Budget,
        cache: Arc<RecordCache>,
        slot: Arc<Slot>,
        documents: Arc<DocumentIds>,
    ) -> (Arc<Flight>, bool) {
        // What this caller could use: up to the slowest source timeout, within its budget.
        let needed_until = budget
            .sources_deadline
            .min(budget.started + sources.longest_timeout());
        let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        // A flight bounded only by the configured cap serves everyone equally well; one cut
        // short by its caller's tight deadline does not serve a caller who can wait longer.
        if let Some(flight) = map.get(&key)
            && (!flight.budget.caller_limited
                || flight.budget.sources_deadline + JOIN_TOLERANCE >= needed_until)
        {
            return (flight.clone(), false);
        }
        let (tx, rx) = watch::channel(Progress::default());
        let flight = Arc::new(Flight {
            nhs_number: request.nhs_number,
            sections: request.sections,
            sources: sources.clone(),
            router: router.clone(),
            budget,
            progress: rx,
        });
        map.insert(key, flight.clone());
        drop(map);

        let flights = self.clone();
        let span = tracing::info_span!("fanout", request_id = %request.request_id);
        let task_flight = flight.clone();
        tokio::spawn(
            async move {
                // Removes the flight from the map however this task ends.
                let _guard = Leave {
                    flights: &flights,
                    key,
                    flight: &task_flight,
                };
                // Each answer, before anyone sees it: no source's internal document URL leaves
                // the broker, and its documents are fetched through it.
                let publish = |mut answer: fanout::Answer| {
                    if let Some(r) = answer.record.as_mut() {
                        documents.rewrite(
                            &mut r.record,
                            &answer.status.source_id,
                            request.nhs_number,
                        );
                    }
                    tx.send_modify(|p| p.answers.push(Arc::new(answer)));
                };
                match router.plan(&sources, request.nhs_number).await {
                    Plan::Ready(route) => {
                        let route = Arc::new(route);
                        tx.send_modify(|p| p.route = Some(route.clone()));
                        let positions = route.positions.iter().copied();
                        fanout::run_at(&sources, positions, &request, &budget, &publish).await;
                    }
                    // The sources known now are asked while the locators are: the locator's
                    // round trip is paid only by the organisations it adds.
                    Plan::Overlapped(early) => {
                        let early = Arc::new(early);
                        tx.send_modify(|p| p.route = Some(early.clone()));
                        let now = early.positions.iter().copied();
                        let first = fanout::run_at(&sources, now, &request, &budget, &publish);
                        let rest = async {
                            let route = Arc::new(router.locate(&sources, &request, &early).await);
                            tx.send_modify(|p| p.route = Some(route.clone()));
                            let added = route
                                .positions
                                .iter()
                                .copied()
                                .filter(|p| early.positions.binary_search(p).is_err());
                            fanout::run_at(&sources, added, &request, &budget, &publish).await;
                        };
                        futures::join!(first, rest);
                    }
                }
                // No source call is left: give the place back before callers see the record.
                drop(slot);
                let (merged, cut_short) = {
                    let progress = tx.borrow();
                    let cut_short = progress.answers.iter().any(|a| a.cut_short);
                    (task_flight.merge_so_far(&progress), cut_short)
                };
                // A record cut short by one caller's tight deadline would decide the next
                // callers' answers (and their access) for the partial TTL: not cached.
                // Callers first, then the cache (a new caller meanwhile still finds the flight).
                tx.send_modify(|p| p.merged = Some(merged.clone()));
                if !cut_short {
                    cache.insert(key, merged).await;
                }
            }
            .instrument(span),
        );
        (flight, true)
    }

    /// Number of flights in progress.
    pub fn len(&self) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Whether no flight is in progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Leave<'a> {
    flights: &'a Flights,
    key: CacheKey,
    flight: &'a Arc<Flight>,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut map = self
            .flights
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Only remove our own flight: a newer one may have replaced it.
        if map
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(f, self.flight))
        {
            map.remove(&self.key);
        }
    }
}
