//! One lookup against a FHIR server: find the patient, then read the wanted sections by search,
//! `$everything` or batch, following `next` links up to the page limit.
//!
//! Searches run concurrently as plain futures in this task (no spawned tasks), so when the broker
//! drops the lookup at its deadline every request in flight is dropped with it.

use futures::future::try_join_all;
use reqwest::Url;
use reqwest::header::HeaderMap;
use tracing::debug;

use super::FhirSource;
use super::bundle::{read_batch_response, read_page};
use super::client::insert;
use super::config::QueryMode;
use super::map::{self, Collected, Kind, MapContext, NHS_NUMBER_SYSTEM};
use super::model::Resource;
use crate::{NhsNumber, SourceError, SourceRecord, SourceReply, SourceRequest};

pub(crate) struct Lookup<'a> {
    source: &'a FhirSource,
    /// Requester and request id headers, sent on every request of the lookup.
    headers: HeaderMap,
    ctx: MapContext,
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
        }
    }

    pub(crate) async fn run(&self, nhs_number: &NhsNumber) -> Result<SourceReply, SourceError> {
        let mut out = Collected::default();
        let Some((patient_id, patient)) = self.find_patient(nhs_number, &mut out).await? else {
            return Ok(SourceReply::NotFound);
        };
        match self.source.mode {
            QueryMode::Search => {
                let searches = Kind::searched(self.ctx.sections, self.ctx.medications)
                    .into_iter()
                    .map(|kind| {
                        let url = self.search_url(kind, &patient_id);
                        async move {
                            let mut found = Collected::default();
                            let first = self.source.http.get(url, &self.headers).await?;
                            self.read_pages(first, kind.name(), &mut found).await?;
                            Ok::<_, SourceError>(found)
                        }
                    });
                for found in try_join_all(searches).await? {
                    out.absorb(found);
                }
            }
            QueryMode::Everything => {
                let mut url = self.source.http.base().clone();
                url.path_segments_mut()
                    .map_err(|()| SourceError::Other("base URL cannot take a path".into()))?
                    .pop_if_empty()
                    .extend(["Patient", &patient_id, "$everything"]);
                // Ask for large pages: every extra page is another round trip.
                url.query_pairs_mut()
                    .append_pair("_count", &self.source.page_size);
                let first = self.source.http.get(url, &self.headers).await?;
                self.read_pages(first, "$everything", &mut out).await?;
            }
            QueryMode::Batch => self.batch(&patient_id, &mut out).await?,
        }
        let (mut record, warnings) = out.into_parts();
        record.patient = Some(patient);
        let mut record = SourceRecord {
            record,
            warnings,
            nested: Vec::new(),
            ..SourceRecord::default()
        };
        record.stamp_provenance(&self.source.info);
        Ok(SourceReply::Found(record))
    }

    /// The patient's server id and demographics, or `None` when the server does not know them.
    async fn find_patient(
        &self,
        nhs_number: &NhsNumber,
        out: &mut Collected,
    ) -> Result<Option<(String, carerecord_proto::Patient)>, SourceError> {
        let mut url = self.resource_url("Patient");
        url.query_pairs_mut().append_pair(
            "identifier",
            &format!("{NHS_NUMBER_SYSTEM}|{}", nhs_number.as_digits()),
        );
        let bundle = self.source.http.get(url, &self.headers).await?;
        let page = read_page(bundle, out)?;
        let mut candidates = page.resources.into_iter().filter(|r| {
            r.resource.resource_type.str() == Ok(Some("Patient"))
                && map::patient_has_nhs_number(&r.resource, nhs_number)
        });
        let Some(first) = candidates.next() else {
            return Ok(None);
        };
        let rest: Vec<_> = candidates.collect();
        let chosen = if rest.is_empty() {
            first.resource
        } else {
            out.warnings.push(format!(
                "source has {} patient records for this NHS number; the first active one was used",
                rest.len() + 1
            ));
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
        let patient = match map::patient(&chosen, nhs_number) {
            Ok(patient) => patient,
            Err(_) => {
                out.warnings
                    .push("the source's Patient resource could not be read in full".into());
                carerecord_proto::Patient {
                    nhs_number: nhs_number.as_digits(),
                    provenance: vec![carerecord_proto::Provenance {
                        source_entry_id: id.clone(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }
            }
        };
        Ok(Some((id, patient)))
    }

    /// Maps `first` and every page after it (following `next` links, at most `page_limit`
    /// pages in all) into `out`.
    async fn read_pages(
        &self,
        first: Resource,
        what: &str,
        out: &mut Collected,
    ) -> Result<(), SourceError> {
        let mut bundle = first;
        let mut pages = 1;
        loop {
            let page = read_page(bundle, out)?;
            map::map_page(&page.resources, &self.ctx, out);
            let Some(next) = page.next else { break };
            if pages >= self.source.page_limit {
                out.warnings.push(format!(
                    "{what} results run past {} pages; later pages were not read",
                    self.source.page_limit
                ));
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
    async fn batch(&self, patient_id: &str, out: &mut Collected) -> Result<(), SourceError> {
        let kinds = Kind::searched(self.ctx.sections, self.ctx.medications);
        let base = self.source.http.base().as_str();
        let entries: Vec<serde_json::Value> = kinds
            .iter()
            .map(|kind| {
                let url = self.search_url(*kind, patient_id);
                let relative = url.as_str().strip_prefix(base).unwrap_or(url.as_str());
                serde_json::json!({"request": {"method": "GET", "url": relative}})
            })
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({
            "resourceType": "Bundle",
            "type": "batch",
            "entry": entries,
        }))
        .map_err(|_| SourceError::Other("could not encode the batch".into()))?;
        let response = self.source.http.post_base(body, &self.headers).await?;
        let answers = read_batch_response(response)?;
        if answers.len() != kinds.len() {
            return Err(SourceError::InvalidResponse(
                "batch-response has the wrong number of entries".into(),
            ));
        }
        let pages = kinds
            .iter()
            .zip(answers)
            .map(|(kind, (status, resource))| async move {
                if !(200..300).contains(&status) {
                    return Err(SourceError::Status(status));
                }
                let resource = resource.ok_or_else(|| {
                    SourceError::InvalidResponse("batch-response entry has no Bundle".into())
                })?;
                let mut found = Collected::default();
                self.read_pages(*resource, kind.name(), &mut found).await?;
                Ok::<_, SourceError>(found)
            });
        for found in try_join_all(pages).await? {
            out.absorb(found);
        }
        Ok(())
    }

    fn resource_url(&self, resource_type: &str) -> Url {
        let mut url = self.source.http.base().clone();
        // The base always ends in '/', so this only appends a segment.
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().push(resource_type);
        }
        url
    }

    fn search_url(&self, kind: Kind, patient_id: &str) -> Url {
        let mut url = self.resource_url(kind.name());
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("patient", patient_id);
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

    #[test]
    fn fhir_ids_are_checked_before_use_in_a_path() {
        assert!(is_fhir_id("pat-1.A"));
        assert!(!is_fhir_id(""));
        assert!(!is_fhir_id("../Practitioner/1"));
        assert!(!is_fhir_id("a?b"));
        assert!(!is_fhir_id(&"x".repeat(65)));
    }
}
