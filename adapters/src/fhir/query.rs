//! One lookup against a FHIR server: find the patient, then read the wanted sections by search,
//! `$everything` or batch, following `next` links up to the page limit; or (chained mode) both
//! in one batch whose searches name the patient by NHS number instead of by server id.
//!
//! Searches run concurrently as plain futures in this task (no spawned tasks), so when the broker
//! drops the lookup at its deadline every request in flight is dropped with it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use futures::future::try_join_all;
use reqwest::Url;
use reqwest::header::HeaderMap;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::FhirSource;
use super::bundle::{BatchAnswer, read_batch_response, read_page};
use super::client::insert;
use super::config::QueryMode;
use super::identity::{Identity, Rejected};
use super::json::Malformed;
use super::map::{
    self, Collected, Kind, MapContext, Medications, NHS_NUMBER_SYSTEM, PageResource,
    without_history,
};
use super::model::Resource;
use crate::{NhsNumber, SectionSet, Shortfall, SourceError, SourceReply, SourceRequest};

/// Most Medications read one by one after the answer, per lookup: a server that names
/// thousands of medicines it does not return cannot turn one lookup into thousands of requests.
/// Medicines beyond it are shown incomplete.
const MAX_FOLLOW_UP_READS: usize = 32;
/// Follow-up reads in flight at once (the source's own request limit applies as well).
const FOLLOW_UP_CONCURRENCY: usize = 4;
/// Time kept back from the deadline when follow-up reads run: the answer gathered so far must
/// still be mapped and returned, not lost to a timeout because one Medication was slow.
const FOLLOW_UP_HEADROOM: Duration = Duration::from_millis(100);

/// What one attempt at reading the record gathered: the Patients it accepted, the raw answer,
/// and what it noted on the way. An attempt by a remembered id that fails verification is
/// dropped whole, so nothing of it reaches the record.
struct Read {
    identity: Identity,
    out: Collected,
    /// The whole answer, mapped once at the end: a reference may be resolved by any page, and
    /// the same checks run whichever mode brought a resource.
    answer: Vec<PageResource>,
}

impl Read {
    fn new(nhs_number: &NhsNumber, source: &FhirSource) -> Read {
        Read {
            identity: Identity::new(*nhs_number, source.http.base()),
            out: Collected::default(),
            answer: Vec::new(),
        }
    }
}

/// The Patient a Patient search chose.
struct Found {
    /// Its server id.
    id: String,
    patient: carerecord_proto::Patient,
    /// It was the only Patient carrying the NHS number (so its id may be remembered).
    only: bool,
}

/// Statuses with which a server says the Patient at an id is not there (deleted, merged away).
fn gone(status: u16) -> bool {
    matches!(status, 404 | 410)
}

pub(crate) struct Lookup<'a> {
    source: &'a FhirSource,
    /// Requester and request id headers, sent on every request of the lookup.
    headers: HeaderMap,
    ctx: MapContext,
    /// The caller's deadline: follow-up reads stop short of it.
    deadline: Instant,
}

impl<'a> Lookup<'a> {
    pub(crate) fn new(source: &'a FhirSource, request: &SourceRequest) -> Self {
        let mut headers = HeaderMap::new();
        let requester = &request.requester;
        insert(&mut headers, "x-request-id", &request.request_id);
        insert(&mut headers, "x-carerecord-user", &requester.user_id);
        insert(&mut headers, "x-carerecord-role", &requester.role_code);
        insert(
            &mut headers,
            "x-carerecord-organisation",
            &requester.organisation_code,
        );
        let purpose = match carerecord_proto::Purpose::try_from(requester.purpose) {
            Ok(carerecord_proto::Purpose::EmergencyAccess) => "emergency-access",
            _ => "direct-care",
        };
        insert(&mut headers, "x-carerecord-purpose", purpose);
        Lookup {
            source,
            headers,
            ctx: MapContext {
                sections: request.sections,
                medications: source.medications,
                today: map::today_utc(),
            },
            deadline: request.deadline,
        }
    }

    pub(crate) async fn run(&self, nhs_number: &NhsNumber) -> Result<SourceReply, SourceError> {
        let chained = self.source.mode == QueryMode::Chained
            && !self.source.chain_unsupported.load(Ordering::Relaxed);
        let read = if chained {
            let mut read = Read::new(nhs_number, self.source);
            self.chained(nhs_number, &mut read)
                .await?
                .map(|patient| (read, patient))
        } else {
            self.search_then_read(nhs_number).await?
        };
        let Some((read, patient)) = read else {
            return Ok(SourceReply::NotFound);
        };
        let Read {
            mut identity,
            mut out,
            answer,
        } = read;
        let accepted = self.accept(&mut identity, &answer, &mut out)?;
        let base = self.source.http.base().as_str();
        let missing = map::unresolved_medication_references(
            accepted.iter().map(|(_, item)| *item),
            &Medications::new(base, &answer),
        );
        let fetched = self.read_medications(missing).await;
        let medications = Medications::new(base, answer.iter().chain(&fetched));
        map::map_resources(&accepted, &medications, &self.ctx, &mut out);
        let mut record = out.into_source_record(self.ctx.sections);
        record.record.patient = Some(patient);
        record.stamp_provenance(&self.source.info);
        Ok(SourceReply::Found(record))
    }

    /// The record of the patient by server id, the id found by a Patient search (two round
    /// trips), or remembered from an earlier lookup (one round trip, verified on this answer).
    async fn search_then_read(
        &self,
        nhs_number: &NhsNumber,
    ) -> Result<Option<(Read, carerecord_proto::Patient)>, SourceError> {
        if let Some(ids) = &self.source.patient_ids
            && let Some(id) = ids.get(nhs_number).await
        {
            let mut read = Read::new(nhs_number, self.source);
            if let Some(patient) = self.by_cached_id(&id, nhs_number, &mut read).await? {
                return Ok(Some((read, patient)));
            }
            // Everything that answer said is dropped with `read`: nothing of it is used.
            ids.evict(nhs_number).await;
            debug!(
                source = %self.source.info.id,
                "the remembered patient id no longer names this patient; searching again"
            );
            if Instant::now() >= self.deadline {
                return Err(SourceError::Timeout);
            }
        }
        let mut read = Read::new(nhs_number, self.source);
        let Some(found) = self
            .find_patient(nhs_number, &mut read.identity, &mut read.out)
            .await?
        else {
            return Ok(None);
        };
        self.remember(nhs_number, &found).await;
        self.read_record(&found.id, &mut read.out, &mut read.answer)
            .await?;
        Ok(Some((read, found.patient)))
    }

    /// Remembers the id of a Patient search that found exactly one Patient carrying the NHS
    /// number (with several, every lookup searches, so the choice between them and its warning
    /// stay as they are).
    async fn remember(&self, nhs_number: &NhsNumber, found: &Found) {
        if let Some(ids) = &self.source.patient_ids
            && found.only
        {
            ids.insert(*nhs_number, &found.id).await;
        }
    }

    /// The record read by a remembered Patient id in one round trip: `$everything` (which holds
    /// the Patient), or the searches by id with `Patient/{id}` read alongside (in the same batch
    /// in batch mode). The Patient at the id must still carry the NHS number and be active;
    /// `Ok(None)` when it does not (another person, merged, deleted, gone): the caller discards
    /// the whole answer. Other failures are the source's answer, as in the search flow.
    async fn by_cached_id(
        &self,
        id: &str,
        nhs_number: &NhsNumber,
        read: &mut Read,
    ) -> Result<Option<carerecord_proto::Patient>, SourceError> {
        let Read {
            identity,
            out,
            answer,
        } = read;
        match self.source.mode {
            QueryMode::Everything => {
                let url = self.everything_url(id)?;
                let first = match self.source.http.get(url, &self.headers).await {
                    Err(SourceError::Status(status)) if gone(status) => return Ok(None),
                    other => other?,
                };
                self.read_everything(first, out, answer).await?;
                // Without the Patient the answer cannot be shown to be about this patient.
                let Some(item) = answer.iter().find(|item| {
                    item.resource.resource_type.str() == Ok(Some("Patient"))
                        && item.resource.id.str() == Ok(Some(id))
                }) else {
                    return Ok(None);
                };
                self.verify_cached(
                    identity,
                    &item.resource,
                    item.full_url.as_deref(),
                    id,
                    nhs_number,
                    out,
                )
            }
            QueryMode::Search => {
                let mut url = self.resource_url("Patient");
                if let Ok(mut segments) = url.path_segments_mut() {
                    segments.push(id);
                }
                let (patient, searched) = futures::join!(
                    self.source.http.get(url, &self.headers),
                    self.search_all(id, out, answer)
                );
                let patient = match patient {
                    Err(SourceError::Status(status)) if gone(status) => return Ok(None),
                    other => other?,
                };
                let verified = self.verify_cached(identity, &patient, None, id, nhs_number, out)?;
                if verified.is_some() {
                    searched?;
                }
                Ok(verified)
            }
            QueryMode::Batch | QueryMode::Chained => {
                let kinds = Kind::searched(self.ctx.sections, self.ctx.medications);
                let mut patient_url = self.resource_url("Patient");
                if let Ok(mut segments) = patient_url.path_segments_mut() {
                    segments.push(id);
                }
                let urls = std::iter::once(patient_url).chain(
                    kinds
                        .iter()
                        .map(|kind| self.search_url(*kind, "patient", id)),
                );
                let mut answers = self.post_batch(urls).await?.into_iter();
                let (status, patient) = answers.next().ok_or_else(|| {
                    SourceError::InvalidResponse(
                        "batch-response has the wrong number of entries".into(),
                    )
                })?;
                if gone(status) {
                    return Ok(None);
                }
                if !(200..300).contains(&status) {
                    return Err(SourceError::Status(status));
                }
                let Some(patient) = patient else {
                    return Ok(None);
                };
                let verified = self.verify_cached(identity, &patient, None, id, nhs_number, out)?;
                if verified.is_some() {
                    self.read_batch_answers(&kinds, answers.collect(), out, answer)
                        .await?;
                }
                Ok(verified)
            }
        }
    }

    /// The Patient at a remembered id judged: still this patient's record (the same id, the NHS
    /// number among its identifiers, not marked inactive as a merged-away record is) and
    /// accepted by the identity check, or `None`.
    fn verify_cached(
        &self,
        identity: &mut Identity,
        patient: &Resource,
        full_url: Option<&str>,
        id: &str,
        nhs_number: &NhsNumber,
        out: &mut Collected,
    ) -> Result<Option<carerecord_proto::Patient>, SourceError> {
        let holds = patient.resource_type.str() == Ok(Some("Patient"))
            && patient.id.str() == Ok(Some(id))
            && patient.active.ok() != Some(&false)
            && map::patient_has_nhs_number(patient, nhs_number);
        if !holds || !identity.add_patient(patient, full_url)? {
            return Ok(None);
        }
        Ok(Some(self.patient_record(patient, id, nhs_number, out)))
    }

    /// The second round trip of the two-round-trip flow: the record of the patient found by
    /// the Patient search, as the configured mode reads it. Chained mode lands here only once
    /// the server has refused the chain, and then reads by batch (the server answers batches).
    async fn read_record(
        &self,
        patient_id: &str,
        out: &mut Collected,
        answer: &mut Vec<PageResource>,
    ) -> Result<(), SourceError> {
        match self.source.mode {
            QueryMode::Search => self.search_all(patient_id, out, answer).await?,
            QueryMode::Everything => {
                let first = self
                    .source
                    .http
                    .get(self.everything_url(patient_id)?, &self.headers)
                    .await?;
                self.read_everything(first, out, answer).await?;
            }
            QueryMode::Batch | QueryMode::Chained => self.batch(patient_id, out, answer).await?,
        }
        Ok(())
    }

    /// One search per wanted type by patient id, run concurrently.
    async fn search_all(
        &self,
        patient_id: &str,
        out: &mut Collected,
        answer: &mut Vec<PageResource>,
    ) -> Result<(), SourceError> {
        let searches = Kind::searched(self.ctx.sections, self.ctx.medications)
            .into_iter()
            .map(|kind| {
                let url = self.search_url(kind, "patient", patient_id);
                async move {
                    let mut found = Collected::default();
                    let mut resources = Vec::new();
                    match self.source.http.get(url, &self.headers).await {
                        Ok(first) => {
                            self.read_pages(first, kind, &mut found, &mut resources)
                                .await?;
                        }
                        Err(SourceError::Status(status))
                            if kind == Kind::Composition && unsupported(status) =>
                        {
                            composition_unsupported(status);
                        }
                        Err(error) => return Err(error),
                    }
                    Ok::<_, SourceError>((found, resources))
                }
            });
        for (found, resources) in try_join_all(searches).await? {
            out.absorb(found);
            answer.extend(resources);
        }
        Ok(())
    }

    /// `Patient/{id}/$everything?_count=N`. Large pages: every extra page is another round trip.
    fn everything_url(&self, patient_id: &str) -> Result<Url, SourceError> {
        let mut url = self.source.http.base().clone();
        url.path_segments_mut()
            .map_err(|()| SourceError::Other("base URL cannot take a path".into()))?
            .pop_if_empty()
            .extend(["Patient", patient_id, "$everything"]);
        url.query_pairs_mut()
            .append_pair("_count", &self.source.page_size);
        Ok(url)
    }

    /// The Patient search by NHS number and every wanted search chained on the same NHS
    /// number (`patient.identifier=`), in one `batch` Bundle: one round trip. The Patient
    /// entry is judged exactly as the Patient search of the other modes (the same code), so
    /// the chained results are then checked against the Patients it accepted, as any mode's
    /// are: a server that resolves the chain to someone else is caught by the identity check.
    ///
    /// A server that answers a chained search with a 4xx does not support the chain: the
    /// lookup reads the record by id in a second batch (using the Patient it already has), and
    /// the source is read in two round trips from then on.
    async fn chained(
        &self,
        nhs_number: &NhsNumber,
        read: &mut Read,
    ) -> Result<Option<carerecord_proto::Patient>, SourceError> {
        let Read {
            identity,
            out,
            answer,
        } = read;
        let kinds = Kind::searched(self.ctx.sections, self.ctx.medications);
        let token = nhs_number_token(nhs_number);
        let urls = std::iter::once(self.patient_search_url(nhs_number)).chain(
            kinds
                .iter()
                .map(|kind| self.search_url(*kind, CHAINED_PATIENT, &token)),
        );
        let mut answers = self.post_batch(urls).await?.into_iter();
        let (status, patients) = answers.next().ok_or_else(|| {
            SourceError::InvalidResponse("batch-response has the wrong number of entries".into())
        })?;
        if !(200..300).contains(&status) {
            return Err(SourceError::Status(status));
        }
        let patients = patients.ok_or_else(|| {
            SourceError::InvalidResponse("batch-response entry has no Bundle".into())
        })?;
        let Some(found) = self.choose_patient(*patients, nhs_number, identity, out)? else {
            return Ok(None);
        };
        // Verified like any Patient search: if the chain is refused, the next lookups read by id.
        self.remember(nhs_number, &found).await;
        let answers: Vec<BatchAnswer> = answers.collect();
        // Composition is the one type a server may not search at all (see
        // `composition_unsupported`): its refusal says nothing about the chain.
        let refused = kinds
            .iter()
            .zip(&answers)
            .find(|(kind, (status, _))| **kind != Kind::Composition && (400..500).contains(status))
            .map(|(_, (status, _))| *status);
        if let Some(status) = refused {
            if !self.source.chain_unsupported.swap(true, Ordering::Relaxed) {
                warn!(
                    source = %self.source.info.id,
                    status,
                    "source refuses chained searches; it is read in two round trips from now on"
                );
            }
            self.batch(&found.id, out, answer).await?;
        } else {
            self.read_batch_answers(&kinds, answers, out, answer)
                .await?;
        }
        Ok(Some(found.patient))
    }

    /// The resources of wanted types that are about the matched patient. Patients in the answer
    /// are checked first (a `$everything` about someone else fails the whole answer); every
    /// other resource about someone else is described in `wrong_patient` and never mapped.
    fn accept<'r>(
        &self,
        identity: &mut Identity,
        answer: &'r [PageResource],
        out: &mut Collected,
    ) -> Result<Vec<(Kind, &'r PageResource)>, SourceError> {
        identity.check_patients(answer, &mut out.wrong_patient)?;
        let mut accepted = Vec::with_capacity(answer.len());
        // Sections that lost resources to the identity check: what the source said there is
        // not "none recorded", it is cut short.
        let mut rejected_in = SectionSet::NONE;
        let mut rejected = 0usize;
        for item in answer {
            let kind = match item.kind() {
                Ok(Some(kind)) if self.ctx.wants(kind) => kind,
                Ok(_) => continue,
                Err(Malformed) => {
                    out.unreadable("unidentified");
                    continue;
                }
            };
            match identity.check(kind, &item.resource) {
                Ok(()) => accepted.push((kind, item)),
                Err(Rejected::WrongPatient(reason)) => {
                    out.wrong_patient.push(format!("{}: {reason}", kind.name()));
                    rejected_in = rejected_in.with(kind.section());
                    rejected += 1;
                }
                Err(Rejected::Malformed) => out.unreadable(kind.name()),
            }
        }
        if rejected > 0 {
            warn!(
                source = %self.source.info.id,
                rejected,
                accepted = accepted.len(),
                "fhir answer held resources about another patient"
            );
            // Nothing it said about the clinical record was about this patient: that is an
            // answer about someone else, not an empty record.
            if accepted.is_empty() {
                return Err(SourceError::WrongPatient(format!(
                    "all {rejected} clinical resources it returned were about another patient"
                )));
            }
            out.shortfalls.push(Shortfall {
                sections: rejected_in,
                reason: format!("{rejected} resource(s) about another patient discarded"),
            });
        }
        Ok(accepted)
    }

    /// The patient's server id and demographics, or `None` when the server does not know them.
    /// Every Patient the search returns is checked: those carrying the NHS number are accepted
    /// (resources may refer to any of them), the others rejected; a search that returns only
    /// other people is answering about someone else, not "not found".
    async fn find_patient(
        &self,
        nhs_number: &NhsNumber,
        identity: &mut Identity,
        out: &mut Collected,
    ) -> Result<Option<Found>, SourceError> {
        let url = self.patient_search_url(nhs_number);
        let bundle = self.source.http.get(url, &self.headers).await?;
        self.choose_patient(bundle, nhs_number, identity, out)
    }

    /// The Patient search's answer judged, whichever request brought it (a GET, or the first
    /// entry of a chained batch): see [`Lookup::find_patient`].
    fn choose_patient(
        &self,
        bundle: Resource,
        nhs_number: &NhsNumber,
        identity: &mut Identity,
        out: &mut Collected,
    ) -> Result<Option<Found>, SourceError> {
        let page = read_page(bundle, out)?;
        let mut candidates = Vec::new();
        for item in page.resources {
            if item.resource.resource_type.str() != Ok(Some("Patient")) {
                continue;
            }
            if identity.add_patient(&item.resource, item.full_url.as_deref())? {
                candidates.push(item);
            } else {
                out.wrong_patient.push(
                    "Patient: the patient search returned someone without the requested NHS number"
                        .into(),
                );
            }
        }
        if candidates.is_empty() {
            if out.wrong_patient.is_empty() {
                return Ok(None);
            }
            return Err(SourceError::WrongPatient(
                "its patient search returned only Patients without the requested NHS number".into(),
            ));
        }
        let mut candidates = candidates.into_iter();
        let Some(first) = candidates.next() else {
            return Ok(None);
        };
        let rest: Vec<_> = candidates.collect();
        let only = rest.is_empty();
        let chosen = if only {
            first.resource
        } else {
            // The other records' data is not read: the answer is short, never silently whole.
            let reason = format!(
                "source has {} patient records for this NHS number; only the first active one was read",
                rest.len() + 1
            );
            out.warnings.push(reason.clone());
            out.shortfalls.push(crate::Shortfall {
                sections: self.ctx.sections,
                reason,
            });
            std::iter::once(first)
                .chain(rest)
                .map(|r| r.resource)
                .reduce(|chosen, next| {
                    if chosen.active.ok() == Some(&false) && next.active.ok() != Some(&false) {
                        next
                    } else {
                        chosen
                    }
                })
                .ok_or_else(|| SourceError::Other("no patient candidates".into()))?
        };
        let id = chosen
            .id
            .ok()
            .filter(|id| is_fhir_id(id))
            .cloned()
            .ok_or_else(|| {
                SourceError::InvalidResponse("the Patient has no valid resource id".into())
            })?;
        let patient = self.patient_record(&chosen, &id, nhs_number, out);
        Ok(Some(Found { id, patient, only }))
    }

    /// The patient's demographics from their Patient resource; a Patient that cannot be read in
    /// full still names the patient (by the NHS number asked for) with a warning.
    fn patient_record(
        &self,
        resource: &Resource,
        id: &str,
        nhs_number: &NhsNumber,
        out: &mut Collected,
    ) -> carerecord_proto::Patient {
        match map::patient(resource, nhs_number) {
            Ok(patient) => patient,
            Err(_) => {
                out.warnings
                    .push("the source's Patient resource could not be read in full".into());
                carerecord_proto::Patient {
                    nhs_number: nhs_number.as_digits(),
                    provenance: vec![carerecord_proto::Provenance {
                        source_entry_id: id.to_owned(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }
            }
        }
    }

    /// Gathers one search's first page and every page after it (following `next` links, at
    /// most `page_limit` pages in all) into `resources`.
    async fn read_pages(
        &self,
        first: Resource,
        kind: Kind,
        out: &mut Collected,
        resources: &mut Vec<PageResource>,
    ) -> Result<(), SourceError> {
        let sections = SectionSet::NONE.with(kind.section());
        self.gather(first, kind.name(), sections, out, resources)
            .await
    }

    /// Gathers a `$everything` answer, every page of it.
    async fn read_everything(
        &self,
        first: Resource,
        out: &mut Collected,
        resources: &mut Vec<PageResource>,
    ) -> Result<(), SourceError> {
        self.gather(first, "$everything", self.ctx.sections, out, resources)
            .await
    }

    /// A search cut at the page limit is a shortfall of the sections it feeds, not a silent cut.
    async fn gather(
        &self,
        first: Resource,
        what: &str,
        sections: SectionSet,
        out: &mut Collected,
        resources: &mut Vec<PageResource>,
    ) -> Result<(), SourceError> {
        let mut bundle = first;
        let mut pages = 1;
        loop {
            let page = read_page(bundle, out)?;
            resources.extend(page.resources);
            let Some(next) = page.next else { break };
            if pages >= self.source.page_limit {
                let reason = format!(
                    "{what} results run past {} pages; later pages were not read",
                    self.source.page_limit
                );
                out.warn(reason.clone());
                out.shortfalls.push(Shortfall { sections, reason });
                break;
            }
            let url = self.source.http.resolve_link(&next)?;
            bundle = self.source.http.get(url, &self.headers).await?;
            pages += 1;
        }
        debug!(search = what, pages, "fhir search read");
        Ok(())
    }

    /// Every search in one `batch` Bundle; each answer is a searchset whose later pages are
    /// fetched with plain GETs.
    async fn batch(
        &self,
        patient_id: &str,
        out: &mut Collected,
        answer: &mut Vec<PageResource>,
    ) -> Result<(), SourceError> {
        let kinds = Kind::searched(self.ctx.sections, self.ctx.medications);
        let urls = kinds
            .iter()
            .map(|kind| self.search_url(*kind, "patient", patient_id));
        let answers = self.post_batch(urls).await?;
        self.read_batch_answers(&kinds, answers, out, answer).await
    }

    /// One `batch` Bundle of GETs, one per URL, posted to the base; the answers in request
    /// order, exactly as many as were asked.
    async fn post_batch(
        &self,
        urls: impl Iterator<Item = Url>,
    ) -> Result<Vec<BatchAnswer>, SourceError> {
        let base = self.source.http.base().as_str();
        let entries: Vec<serde_json::Value> = urls
            .map(|url| {
                let relative = url.as_str().strip_prefix(base).unwrap_or(url.as_str());
                serde_json::json!({"request": {"method": "GET", "url": relative}})
            })
            .collect();
        let asked = entries.len();
        let body = serde_json::to_vec(&serde_json::json!({
            "resourceType": "Bundle",
            "type": "batch",
            "entry": entries,
        }))
        .map_err(|_| SourceError::Other("could not encode the batch".into()))?;
        let response = self.source.http.post_base(body, &self.headers).await?;
        let answers = read_batch_response(response)?;
        if answers.len() != asked {
            return Err(SourceError::InvalidResponse(
                "batch-response has the wrong number of entries".into(),
            ));
        }
        Ok(answers)
    }

    /// Each search's answer of a batch-response (in `kinds` order), every page of it: later
    /// pages are fetched with plain GETs, at most `page_limit` pages per search.
    async fn read_batch_answers(
        &self,
        kinds: &[Kind],
        answers: Vec<BatchAnswer>,
        out: &mut Collected,
        answer: &mut Vec<PageResource>,
    ) -> Result<(), SourceError> {
        let pages = kinds
            .iter()
            .zip(answers)
            .map(|(kind, (status, resource))| async move {
                let mut found = Collected::default();
                let mut resources = Vec::new();
                if !(200..300).contains(&status) {
                    if *kind == Kind::Composition && unsupported(status) {
                        composition_unsupported(status);
                        return Ok((found, resources));
                    }
                    return Err(SourceError::Status(status));
                }
                let resource = resource.ok_or_else(|| {
                    SourceError::InvalidResponse("batch-response entry has no Bundle".into())
                })?;
                self.read_pages(*resource, *kind, &mut found, &mut resources)
                    .await?;
                Ok::<_, SourceError>((found, resources))
            });
        for (found, resources) in try_join_all(pages).await? {
            out.absorb(found);
            answer.extend(resources);
        }
        Ok(())
    }

    /// Reads Medications that no part of the answer held, one GET each, a few at a time, and
    /// only until shortly before the deadline: a medicine whose Medication is not read in time
    /// is shown incomplete rather than costing the whole answer. Only on this path does a
    /// lookup make requests beyond its searches, and only for references left unresolved.
    async fn read_medications(&self, references: Vec<String>) -> Vec<PageResource> {
        if references.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        let remaining = self.deadline.saturating_duration_since(now);
        let until = now + remaining.saturating_sub((remaining / 10).min(FOLLOW_UP_HEADROOM));
        let reads = references
            .into_iter()
            .filter_map(|reference| {
                let (url, id) = self.medication_url(&reference)?;
                Some((reference, url, id))
            })
            .take(MAX_FOLLOW_UP_READS)
            .map(|(reference, url, id)| async move {
                let read =
                    tokio::time::timeout_at(until, self.source.http.get(url, &self.headers)).await;
                match read {
                    Ok(Ok(resource))
                        if resource.resource_type.str() == Ok(Some("Medication"))
                            && resource.id.str().ok().flatten().is_none_or(|got| got == id) =>
                    {
                        Some(PageResource {
                            full_url: Some(reference),
                            resource: Box::new(resource),
                        })
                    }
                    Ok(Ok(_)) => {
                        debug!("follow-up read returned something other than the Medication");
                        None
                    }
                    Ok(Err(error)) => {
                        debug!(%error, "follow-up Medication read failed");
                        None
                    }
                    Err(_) => {
                        debug!("follow-up Medication read ran out of time");
                        None
                    }
                }
            });
        futures::stream::iter(reads)
            .buffer_unordered(FOLLOW_UP_CONCURRENCY)
            .filter_map(std::future::ready)
            .collect()
            .await
    }

    /// Where a Medication reference can be read, and the id expected back: relative
    /// `Medication/{id}`, or an absolute URL on this source. `urn:uuid:` references and other
    /// servers' URLs cannot be (the token and requester headers stay with this source).
    fn medication_url(&self, reference: &str) -> Option<(Url, String)> {
        let reference = without_history(reference);
        let base = self.source.http.base().as_str();
        let relative = match reference.strip_prefix(base) {
            Some(rest) => rest,
            None if reference.contains(':') => return None,
            None => reference,
        };
        let ("Medication", id) = relative.split_once('/')? else {
            return None;
        };
        if !is_fhir_id(id) {
            return None;
        }
        let mut url = self.resource_url("Medication");
        url.path_segments_mut().ok()?.push(id);
        Some((url, id.to_owned()))
    }

    fn resource_url(&self, resource_type: &str) -> Url {
        let mut url = self.source.http.base().clone();
        // The base always ends in '/', so this only appends a segment.
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().push(resource_type);
        }
        url
    }

    /// `Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|N`.
    fn patient_search_url(&self, nhs_number: &NhsNumber) -> Url {
        let mut url = self.resource_url("Patient");
        url.query_pairs_mut()
            .append_pair("identifier", &nhs_number_token(nhs_number));
        url
    }

    /// A search of `kind` for the patient named by `param=value`: `patient={id}`, or the
    /// chained `patient.identifier={NHS number token}`.
    fn search_url(&self, kind: Kind, param: &str, value: &str) -> Url {
        let mut url = self.resource_url(kind.name());
        {
            let mut query = url.query_pairs_mut();
            query.append_pair(param, value);
            match kind {
                Kind::MedicationStatement => {
                    query.append_pair("_include", "MedicationStatement:medication");
                }
                Kind::MedicationRequest => {
                    query.append_pair("_include", "MedicationRequest:medication");
                }
                Kind::Appointment => {
                    query.append_pair("date", &format!("ge{}", self.ctx.today));
                }
                _ => {}
            }
            query.append_pair("_count", &self.source.page_size);
        }
        url
    }
}

/// The chained search parameter naming the patient by identifier. FHIR R4 defines `patient`
/// on every type the adapter searches (Appointment's is its patient actor; AllergyIntolerance
/// has no `subject`), so one name serves all of them, as `patient={id}` does in search mode.
const CHAINED_PATIENT: &str = "patient.identifier";

/// The NHS number as a FHIR token, `https://fhir.nhs.uk/Id/nhs-number|N`.
fn nhs_number_token(nhs_number: &NhsNumber) -> String {
    format!("{NHS_NUMBER_SYSTEM}|{}", nhs_number.as_digits())
}

/// Statuses with which a server says it cannot search a resource type (rather than failing).
fn unsupported(status: u16) -> bool {
    matches!(status, 400 | 403 | 404 | 405 | 422 | 501)
}

/// Few servers can search `Composition`. One that says it cannot (rather than failing) still
/// answers for everything else, and is not marked short: a server without the capability holds
/// no Compositions it could give by search, and marking every such source PARTIAL on every
/// lookup would teach clinicians to ignore PARTIAL. Logged, for operators.
fn composition_unsupported(status: u16) {
    debug!(
        status,
        "source cannot search Composition; documents come from DocumentReference only"
    );
}

/// FHIR's id syntax: 1–64 of `A-Z a-z 0-9 - .`. Checked before an id goes into a URL path.
fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn follow_up_reads_go_only_to_this_source() {
        let config = crate::fhir::FhirConfig::new("https://gp.example/fhir");
        let info = crate::SourceInfo {
            id: "gp".into(),
            organisation_code: "Y1".into(),
            organisation_name: "GP".into(),
        };
        let source = FhirSource::new(info, &config).expect("valid");
        let request = SourceRequest {
            request_id: "r".into(),
            nhs_number: NhsNumber::parse("9990000018").expect("valid"),
            sections: SectionSet::ALL,
            deadline: Instant::now() + Duration::from_secs(1),
            requester: carerecord_proto::Requester::default(),
            via_brokers: vec![],
        };
        let lookup = Lookup::new(&source, &request);
        let url = |r: &str| lookup.medication_url(r).map(|(u, id)| (u.to_string(), id));
        let expected = Some((
            "https://gp.example/fhir/Medication/m1".to_owned(),
            "m1".to_owned(),
        ));
        assert_eq!(url("Medication/m1"), expected);
        assert_eq!(url("Medication/m1/_history/2"), expected);
        assert_eq!(url("https://gp.example/fhir/Medication/m1"), expected);
        // Never elsewhere (the token and requester headers would follow), never a non-id.
        assert_eq!(url("https://elsewhere.example/fhir/Medication/m1"), None);
        assert_eq!(url("urn:uuid:8d3bd2c6-6b0e-4f4b-9d0f-4b0f5d1a7c11"), None);
        assert_eq!(url("Medication/../Patient/p1"), None);
        assert_eq!(url("Substance/s1"), None);
    }

    #[test]
    fn fhir_ids_are_checked_before_use_in_a_path() {
        assert!(is_fhir_id("pat-1.A"));
        assert!(!is_fhir_id(""));
        assert!(!is_fhir_id("../Practitioner/1"));
        assert!(!is_fhir_id("a?b"));
        assert!(!is_fhir_id(&"x".repeat(65)));
    }
}
