//! Routing: ask only the organisations that may know the patient (always-ask plus those a
//! record locator names), and say plainly when the locator did not answer.

use std::sync::Arc;
use std::time::Duration;

use carerecord_adapters::Source;
use carerecord_adapters::SourceError;
use carerecord_adapters::locator::{LocateRequest, Located, Locator, StaticLocator};
use carerecord_adapters::memory::InMemorySource;
use carerecord_e2e::*;
use carerecord_proto::{CacheDirective, GetCareRecordResponse, SourceOutcome, WarningKind};

const LONG: Duration = Duration::from_secs(5);

/// A locator that answers only when the test lets it: what happens before it answers is then a
/// matter of order, not of timing.
struct GatedLocator {
    names: std::sync::Mutex<Vec<String>>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl GatedLocator {
    fn naming(codes: &[&str]) -> Arc<Self> {
        Arc::new(GatedLocator {
            names: std::sync::Mutex::new(codes.iter().map(|c| (*c).to_owned()).collect()),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
        })
    }

    fn name(&self, codes: &[&str]) {
        *self.names.lock().expect("names") = codes.iter().map(|c| (*c).to_owned()).collect();
    }

    /// Lets one locate answer.
    fn answer_once(&self) {
        self.gate.add_permits(1);
    }
}

#[async_trait::async_trait]
impl Locator for GatedLocator {
    fn id(&self) -> &str {
        "spine"
    }

    async fn locate(&self, _: &LocateRequest) -> Result<Located, SourceError> {
        let permit = self
            .gate
            .acquire()
            .await
            .map_err(|_| SourceError::Timeout)?;
        permit.forget();
        let mut located = Located::default();
        for code in self.names.lock().expect("names").iter() {
            located.add(code);
        }
        Ok(located)
    }
}

/// Waits until `calls()` reaches `n`; false if it did not within `LONG`.
async fn called(source: &InMemorySource, n: u64) -> bool {
    tokio::time::timeout(LONG, async {
        while source.calls() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .is_ok()
}

/// Routing for the gated locator: its answers never reused, so every lookup asks it again.
fn gated(locator: Arc<GatedLocator>) -> Settings {
    Settings {
        always_ask: vec!["RYA".into()],
        locators: vec![locator],
        locator_timeout: LONG,
        locator_cache: Duration::ZERO,
        ..Settings::default()
    }
}

struct Region {
    gp: Arc<InMemorySource>,
    hospital: Arc<InMemorySource>,
    ambulance: Arc<InMemorySource>,
    others: Vec<Arc<InMemorySource>>,
}

fn region() -> Region {
    Region {
        gp: Arc::new(gp_source()),
        hospital: Arc::new(hospital_source()),
        ambulance: Arc::new(InMemorySource::new("ambulance", "RYA", "Ambulance Service")),
        others: (0..20)
            .map(|i| {
                Arc::new(InMemorySource::new(
                    &format!("home{i}"),
                    &format!("VM{i:03}"),
                    "Care home",
                ))
            })
            .collect(),
    }
}

impl Region {
    fn sources(&self) -> Vec<(Arc<dyn Source>, Duration)> {
        let mut v: Vec<(Arc<dyn Source>, Duration)> = vec![
            (self.gp.clone(), LONG),
            (self.hospital.clone(), LONG),
            (self.ambulance.clone(), LONG),
        ];
        v.extend(
            self.others
                .iter()
                .map(|s| (s.clone() as Arc<dyn Source>, LONG)),
        );
        v
    }

    fn others_called(&self) -> u64 {
        self.others.iter().map(|s| s.calls()).sum()
    }
}

fn routed(locator: Arc<dyn Locator>) -> Settings {
    Settings {
        always_ask: vec!["RYA".into()],
        locators: vec![locator],
        locator_timeout: Duration::from_millis(200),
        ..Settings::default()
    }
}

async fn lookup(b: &TestBroker) -> GetCareRecordResponse {
    let mut r = request(&shared_patient().as_digits(), LONG);
    r.get_mut().cache = CacheDirective::RequireFresh as i32;
    b.client()
        .await
        .get_care_record(r)
        .await
        .expect("lookup")
        .into_inner()
}

fn statuses(r: &GetCareRecordResponse) -> Vec<(&str, &str)> {
    r.sources
        .iter()
        .map(|s| (s.source_id.as_str(), s.selected_by.as_str()))
        .collect()
}

#[tokio::test]
async fn only_always_ask_and_located_organisations_are_asked() {
    let region = region();
    let locator =
        Arc::new(StaticLocator::new("spine").with(shared_patient(), &["A81001", "RJ122"]));
    let b = start_broker(region.sources(), routed(locator.clone())).await;
    let r = lookup(&b).await;
    assert_eq!(
        statuses(&r),
        [
            ("gp", "locator:spine"),
            ("hospital", "locator:spine"),
            ("ambulance", "always_ask")
        ]
    );
    assert!(r.complete);
    assert_eq!(
        r.record.expect("record").allergies.len(),
        1,
        "merged across the located two"
    );
    assert_eq!(
        region.others_called(),
        0,
        "the 20 unrelated organisations were not asked"
    );
    assert_eq!(
        (
            region.gp.calls(),
            region.hospital.calls(),
            region.ambulance.calls()
        ),
        (1, 1, 1)
    );
    assert_eq!(r.locators.len(), 1);
    assert_eq!(r.locators[0].outcome, SourceOutcome::Ok as i32);
    assert_eq!(r.locators[0].organisations, 2);

    // The locator's answer is reused for the next lookup of the same patient.
    let again = lookup(&b).await;
    assert_eq!(again.sources.len(), 3);
    assert_eq!(locator.calls(), 1);
}

#[tokio::test]
async fn a_failed_locator_still_serves_always_ask_and_says_the_view_may_be_missing_organisations() {
    let region = region();
    let down = Arc::new(StaticLocator::new("spine").failing(SourceError::Status(503)));
    let b = start_broker(region.sources(), routed(down)).await;
    let r = lookup(&b).await;
    assert_eq!(statuses(&r), [("ambulance", "always_ask")]);
    assert!(!r.complete, "never presented as complete");
    let warning = r
        .warnings
        .iter()
        .find(|w| w.kind == WarningKind::LocatorUnavailable as i32)
        .expect("locator warning");
    assert!(
        warning.message.contains("may be missing"),
        "{}",
        warning.message
    );
    assert_eq!(r.locators[0].outcome, SourceOutcome::Error as i32);
    assert_eq!(region.others_called() + region.gp.calls(), 0);
}

#[tokio::test]
async fn a_slow_locator_is_cut_off_at_its_timeout() {
    let region = region();
    let slow = Arc::new(
        StaticLocator::new("spine")
            .with(shared_patient(), &["A81001"])
            .with_delay(Duration::from_secs(10)),
    );
    let b = start_broker(region.sources(), routed(slow)).await;
    let r = lookup(&b).await;
    assert_eq!(r.locators[0].outcome, SourceOutcome::Timeout as i32);
    assert!(
        r.locators[0].latency_ms < 2_000,
        "{}",
        r.locators[0].latency_ms
    );
    assert_eq!(statuses(&r), [("ambulance", "always_ask")]);
}

#[tokio::test]
async fn an_organisation_the_broker_cannot_reach_is_reported_not_crashed_on() {
    let region = region();
    let locator =
        Arc::new(StaticLocator::new("spine").with(shared_patient(), &["A81001", "ZZ999"]));
    let b = start_broker(region.sources(), routed(locator)).await;
    let r = lookup(&b).await;
    assert_eq!(statuses(&r).len(), 2, "gp and ambulance");
    let unknown = r
        .warnings
        .iter()
        .find(|w| w.kind == WarningKind::UnknownOrganisation as i32)
        .expect("unknown organisation warning");
    assert!(unknown.message.contains("ZZ999"));
    assert!(r.complete, "every organisation it could ask answered");
}

#[tokio::test]
async fn without_locators_every_source_is_asked_as_before() {
    let region = region();
    let b = start_broker(region.sources(), Settings::default()).await;
    let r = lookup(&b).await;
    assert_eq!(r.sources.len(), 23);
    assert!(r.sources.iter().all(|s| s.selected_by == "all"));
    assert!(r.locators.is_empty());
}

#[tokio::test]
async fn always_ask_organisations_are_asked_while_the_locator_is_still_answering() {
    let region = region();
    let locator = GatedLocator::naming(&["A81001"]);
    let b = Arc::new(start_broker(region.sources(), gated(locator.clone())).await);
    let pending = tokio::spawn({
        let b = b.clone();
        async move { lookup(&b).await }
    });
    assert!(
        called(&region.ambulance, 1).await,
        "the always-ask organisation is asked before the locator answers"
    );
    assert_eq!(
        region.gp.calls(),
        0,
        "the GP is known only from the locator"
    );
    locator.answer_once();
    let r = pending.await.expect("lookup task");
    assert_eq!(
        statuses(&r),
        [("gp", "locator:spine"), ("ambulance", "always_ask")]
    );
    assert!(r.complete);
    assert_eq!((region.gp.calls(), region.ambulance.calls()), (1, 1));
}

#[tokio::test]
async fn organisations_the_locator_named_recently_are_asked_before_it_answers_again() {
    let region = region();
    let locator = GatedLocator::naming(&["A81001", "RJ122"]);
    let b = Arc::new(start_broker(region.sources(), gated(locator.clone())).await);
    locator.answer_once();
    let first = lookup(&b).await;
    assert_eq!(first.sources.len(), 3);
    assert_eq!((region.gp.calls(), region.hospital.calls()), (1, 1));

    // Asked again (its answer is not reused): the GP and the hospital it named are asked at
    // once, not after it answers.
    let pending = tokio::spawn({
        let b = b.clone();
        async move { lookup(&b).await }
    });
    assert!(
        called(&region.gp, 2).await,
        "the GP is asked before the locator answers"
    );
    assert!(called(&region.hospital, 2).await);
    // This time the locator no longer names the hospital: what it already answered is still
    // in the record, and says why it was asked.
    locator.name(&["A81001"]);
    locator.answer_once();
    let r = pending.await.expect("lookup task");
    assert_eq!(
        statuses(&r),
        [
            ("gp", "locator:spine"),
            ("hospital", "recently_located"),
            ("ambulance", "always_ask")
        ]
    );
    assert!(r.complete);
    let hospital = &r.sources[1];
    assert_eq!(
        (hospital.outcome, hospital.message.as_str()),
        (SourceOutcome::Ok as i32, ""),
        "the hospital's answer is merged, not dropped as unasked"
    );
    assert!(hospital.entries > 0);
    assert_eq!(
        (region.gp.calls(), region.hospital.calls()),
        (2, 2),
        "each asked once"
    );
    assert_eq!(region.others_called(), 0);
}

#[tokio::test]
async fn a_lookup_whose_locator_never_answers_keeps_what_the_early_organisations_said() {
    let region = region();
    let locator = GatedLocator::naming(&["A81001"]);
    let settings = Settings {
        locator_timeout: Duration::from_millis(300),
        ..gated(locator.clone())
    };
    let b = start_broker(region.sources(), settings).await;
    locator.answer_once();
    lookup(&b).await;
    // Never answers again: the GP it named before is still asked, and the view says the
    // locator did not answer.
    let r = lookup(&b).await;
    assert_eq!(
        statuses(&r),
        [("gp", "recently_located"), ("ambulance", "always_ask")]
    );
    assert!(
        !r.complete,
        "a locator that did not answer never gives a complete view"
    );
    assert_eq!(r.locators[0].outcome, SourceOutcome::Timeout as i32);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.kind == WarningKind::LocatorUnavailable as i32)
    );
    assert_eq!(region.gp.calls(), 2);
}
