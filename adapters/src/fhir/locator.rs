//! A record locator over FHIR: the registered GP from `Patient.generalPractitioner` (as the
//! demographics service gives it) and record pointers as `DocumentReference`s searched by
//! subject identifier, grouped by `custodian` (as the National Record Locator gives them).

use async_trait::async_trait;
use reqwest::Url;
use reqwest::header::HeaderMap;
use serde::Deserialize;

use super::bundle::{expect_bundle, next_link};
use super::client::{FhirHttp, insert};
use super::config::{FhirConfig, FhirConfigError};
use super::model::Resource;
use crate::locator::{LocateRequest, Located, Locator};
use crate::{NhsNumber, SourceError};

const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
/// Pointer pages followed at most: a patient with more is an anomaly, not a reason to hang.
const MAX_POINTER_PAGES: usize = 5;

/// `[[routing.locators]]` in the broker config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FhirLocatorConfig {
    /// Name in responses and metrics.
    pub id: String,
    /// FHIR base URL of the locator service.
    pub base_url: String,
    /// Ask for the registered GP (`Patient.generalPractitioner`).
    #[serde(default = "yes")]
    pub registered_gp: bool,
    /// Ask for record pointers (`DocumentReference` custodians).
    #[serde(default = "yes")]
    pub record_pointers: bool,
    /// PEM CA certificate to trust (private PKI).
    pub ca_cert: Option<std::path::PathBuf>,
    /// PEM client certificate and key (mutual TLS).
    pub client_cert: Option<std::path::PathBuf>,
    pub client_key: Option<std::path::PathBuf>,
    /// Environment variable holding a bearer token.
    pub bearer_token_env: Option<String>,
}

fn yes() -> bool {
    true
}

/// A FHIR record locator.
pub struct FhirLocator {
    id: String,
    http: FhirHttp,
    registered_gp: bool,
    record_pointers: bool,
}

impl FhirLocator {
    pub fn new(config: &FhirLocatorConfig) -> Result<Self, FhirConfigError> {
        let mut fhir = FhirConfig::new(&config.base_url);
        fhir.ca_cert.clone_from(&config.ca_cert);
        fhir.client_cert.clone_from(&config.client_cert);
        fhir.client_key.clone_from(&config.client_key);
        fhir.bearer_token_env.clone_from(&config.bearer_token_env);
        Ok(FhirLocator {
            id: config.id.clone(),
            http: FhirHttp::new(&fhir)?,
            registered_gp: config.registered_gp,
            record_pointers: config.record_pointers,
        })
    }

    fn url(&self, resource_type: &str, param: &str, nhs: &NhsNumber) -> Url {
        let mut url = self.http.base().clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().push(resource_type);
        }
        url.query_pairs_mut()
            .append_pair(param, &format!("{NHS_NUMBER_SYSTEM}|{}", nhs.as_digits()));
        url
    }

    async fn registered_gp(
        &self,
        nhs: &NhsNumber,
        headers: &HeaderMap,
        out: &mut Located,
    ) -> Result<(), SourceError> {
        let bundle = self
            .http
            .get(self.url("Patient", "identifier", nhs), headers)
            .await?;
        expect_bundle(&bundle)?;
        for patient in resources(&bundle, "Patient") {
            let gps = patient.general_practitioner.items().map_err(malformed)?;
            for gp in gps {
                if let Some(code) = ods_code(gp.identifier.get().map_err(malformed)?)? {
                    out.add(code);
                }
            }
        }
        Ok(())
    }

    async fn pointers(
        &self,
        nhs: &NhsNumber,
        headers: &HeaderMap,
        out: &mut Located,
    ) -> Result<(), SourceError> {
        let mut url = self.url("DocumentReference", "subject:identifier", nhs);
        for _ in 0..MAX_POINTER_PAGES {
            let bundle = self.http.get(url, headers).await?;
            expect_bundle(&bundle)?;
            for pointer in resources(&bundle, "DocumentReference") {
                if pointer.status.str().map_err(malformed)? == Some("entered-in-error") {
                    continue;
                }
                if let Some(custodian) = pointer.custodian.get().map_err(malformed)?
                    && let Some(code) = ods_code(custodian.identifier.get().map_err(malformed)?)?
                {
                    match patient_id_in(pointer) {
                        Some(id) => out.add_with_patient_id(code, id),
                        None => out.add(code),
                    }
                }
            }
            match next_link(&bundle).map_err(malformed)? {
                Some(next) => url = self.http.resolve_link(&next)?,
                None => break,
            }
        }
        Ok(())
    }
}

/// The organisation's own Patient id, when a pointer's attachment URL is the patient's record
/// there (`…/Patient/{id}` or `…/Patient/{id}/$everything`). Unreadable or other URLs: none.
fn patient_id_in(pointer: &Resource) -> Option<&str> {
    pointer
        .content
        .items()
        .ok()?
        .filter_map(|c| c.attachment.get().ok().flatten())
        .filter_map(|a| a.url.str().ok().flatten())
        .find_map(|url| {
            let path = url.split(['?', '#']).next().unwrap_or(url);
            let (_, after) = path.rsplit_once("/Patient/")?;
            let id = after.split('/').next()?;
            (!id.is_empty()).then_some(id)
        })
}

fn malformed<E>(_: E) -> SourceError {
    SourceError::InvalidResponse("a locator answer could not be read".into())
}

fn resources<'a>(
    bundle: &'a Resource,
    resource_type: &'a str,
) -> impl Iterator<Item = &'a Resource> {
    bundle
        .entry
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.resource.ok())
        .map(|r| r.as_ref())
        .filter(move |r| r.resource_type.ok().map(String::as_str) == Some(resource_type))
}

fn ods_code(identifier: Option<&super::model::Identifier>) -> Result<Option<&str>, SourceError> {
    let Some(identifier) = identifier else {
        return Ok(None);
    };
    if identifier.system.str().map_err(malformed)? != Some(ODS_SYSTEM) {
        return Ok(None);
    }
    identifier.value.str().map_err(malformed)
}

#[async_trait]
impl Locator for FhirLocator {
    fn id(&self) -> &str {
        &self.id
    }

    async fn locate(&self, request: &LocateRequest) -> Result<Located, SourceError> {
        let mut headers = HeaderMap::new();
        insert(&mut headers, "x-request-id", &request.request_id);
        insert(
            &mut headers,
            "x-carerecord-user",
            &request.requester.user_id,
        );
        insert(
            &mut headers,
            "x-carerecord-organisation",
            &request.requester.organisation_code,
        );
        let work = async {
            let mut gp = Located::default();
            let mut pointed = Located::default();
            let (a, b) = tokio::join!(
                async {
                    if self.registered_gp {
                        self.registered_gp(&request.nhs_number, &headers, &mut gp)
                            .await
                    } else {
                        Ok(())
                    }
                },
                async {
                    if self.record_pointers {
                        self.pointers(&request.nhs_number, &headers, &mut pointed)
                            .await
                    } else {
                        Ok(())
                    }
                }
            );
            a?;
            b?;
            for code in pointed.organisations {
                gp.add(&code);
            }
            for (code, id) in pointed.patient_ids {
                gp.add_with_patient_id(&code, &id);
            }
            Ok(gp)
        };
        tokio::time::timeout_at(request.deadline, work)
            .await
            .unwrap_or(Err(SourceError::Timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pointer(url: &str) -> Resource {
        let json = serde_json::json!({
            "resourceType": "DocumentReference",
            "status": "current",
            "custodian": { "identifier": { "system": ODS_SYSTEM, "value": "RJ1" } },
            "content": [{ "attachment": { "contentType": "application/fhir+json", "url": url } }],
        });
        super::super::model::parse_resource(json.to_string().as_bytes()).expect("a resource")
    }

    #[test]
    fn a_pointer_to_the_patients_record_gives_the_organisations_own_id() {
        for (url, want) in [
            (
                "https://fhir.rj1.example/R4/Patient/rj1-100042",
                Some("rj1-100042"),
            ),
            (
                "https://fhir.rj1.example/R4/Patient/abc/$everything",
                Some("abc"),
            ),
            (
                "https://fhir.rj1.example/R4/Patient/abc?_format=json",
                Some("abc"),
            ),
            // The endpoint alone, a document, an empty id: no id.
            ("https://fhir.rj1.example/R4", None),
            ("https://fhir.rj1.example/R4/Binary/doc-1", None),
            ("https://fhir.rj1.example/R4/Patient/", None),
        ] {
            assert_eq!(patient_id_in(&pointer(url)), want, "{url}");
        }
    }
}
