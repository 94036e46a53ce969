//! Whose record a resource is in: the identity check every mapped resource passes.
//!
//! A FHIR server can answer about someone else: a bad match, a search parameter it ignores, a
//! `$everything` built for the wrong Patient, a resource filed against the wrong `Patient`. A
//! merged record that mixes two people is a clinical hazard, so every resource the adapter maps,
//! in every query mode and on every page, must point at a Patient that carries the requested NHS
//! number: by relative id (`Patient/123`), by absolute URL or the `fullUrl` it was listed under
//! (`urn:uuid:` included), or by a logical reference with an NHS number identifier. Anything
//! else is never mapped; it is described (type and reason, never content) in
//! `SourceRecord::wrong_patient`.

use std::collections::HashSet;

use reqwest::Url;

use super::json::Malformed;
use super::map::{Kind, NHS_NUMBER_SYSTEM, PageResource, patient_has_nhs_number};
use super::model::{Reference, Resource};
use crate::{NhsNumber, SourceError};

/// The Patients a lookup accepted (they carry the requested NHS number) and those it rejected.
#[derive(Debug)]
pub(crate) struct Identity {
    nhs_number: NhsNumber,
    /// The source's base URL: `{base}Patient/{id}` is the same as `Patient/{id}`.
    base: String,
    /// Server ids of accepted Patients.
    ids: HashSet<String>,
    /// `fullUrl`s (and `{base}Patient/{id}` forms) of accepted Patients.
    urls: HashSet<String>,
    /// Ids and URLs of Patients that carry another (or no) NHS number.
    rejected: HashSet<String>,
}

/// What a reference says about whose record a resource is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Points {
    /// The matched patient.
    Ours,
    /// Another patient, or another server's.
    Elsewhere,
    /// Not a Patient (a Practitioner, a Location, a Group).
    NotPatient,
    /// Cannot be resolved to any Patient the answer knows.
    Unknown,
}

/// Why a resource was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    /// It is about someone else, or cannot be shown to be about the patient: the text (a
    /// reason, no content) goes to `wrong_patient`.
    WrongPatient(&'static str),
    /// Its patient reference has the wrong shape: counted as unreadable.
    Malformed,
}

impl Identity {
    pub(crate) fn new(nhs_number: NhsNumber, base: &Url) -> Identity {
        Identity {
            nhs_number,
            base: base.as_str().to_owned(),
            ids: HashSet::new(),
            urls: HashSet::new(),
            rejected: HashSet::new(),
        }
    }

    /// Records a Patient resource of the answer (from the Patient search or among the results):
    /// accepted when it carries the requested NHS number, rejected otherwise. `Err` when the
    /// source describes an already accepted Patient (same id or URL) as someone else: it
    /// contradicts itself about who the patient is, and nothing it says can be trusted.
    pub(crate) fn add_patient(
        &mut self,
        resource: &Resource,
        full_url: Option<&str>,
    ) -> Result<bool, SourceError> {
        let id = resource.id.ok().map(String::as_str);
        let mut keys: Vec<String> = Vec::new();
        if let Some(id) = id {
            keys.push(id.to_owned());
            keys.push(format!("{}Patient/{id}", self.base));
        }
        if let Some(url) = full_url {
            keys.push(without_history(url).to_owned());
        }
        if patient_has_nhs_number(resource, &self.nhs_number) {
            if keys.iter().any(|k| self.rejected.contains(k)) {
                return Err(contradiction());
            }
            if let Some(id) = id {
                self.ids.insert(id.to_owned());
            }
            self.urls
                .extend(keys.into_iter().filter(|k| k.contains(':')));
            Ok(true)
        } else {
            let known = id.is_some_and(|id| self.ids.contains(id))
                || keys.iter().any(|k| self.urls.contains(k));
            match (known, carries_an_nhs_number(resource)) {
                // The accepted Patient again, shown without its identifiers (a summary view):
                // nothing says it is someone else.
                (true, false) => Ok(true),
                (true, true) => Err(contradiction()),
                (false, _) => {
                    self.rejected.extend(keys);
                    Ok(false)
                }
            }
        }
    }

    /// Checks the Patients among an answer's resources (`$everything` returns the Patient
    /// itself): each is accepted or rejected, the rejected ones described in `wrong_patient`.
    /// An answer that holds Patients, none of them the requested one, is about someone else.
    pub(crate) fn check_patients(
        &mut self,
        resources: &[PageResource],
        wrong_patient: &mut Vec<String>,
    ) -> Result<(), SourceError> {
        let mut any = false;
        let mut ours = false;
        for item in resources {
            if item.resource.resource_type.str() != Ok(Some("Patient")) {
                continue;
            }
            any = true;
            if self.add_patient(&item.resource, item.full_url.as_deref())? {
                ours = true;
            } else {
                wrong_patient.push("Patient: carries another NHS number, or none".into());
            }
        }
        if any && !ours {
            return Err(SourceError::WrongPatient(
                "its answer holds a Patient who does not carry the requested NHS number, and none who does"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Whether a resource of a mapped type is about the matched patient.
    pub(crate) fn check(&self, kind: Kind, r: &Resource) -> Result<(), Rejected> {
        if kind == Kind::Appointment {
            return self.check_participants(r);
        }
        let field = if kind == Kind::AllergyIntolerance {
            &r.patient
        } else {
            &r.subject
        };
        let reference = field
            .get()
            .map_err(|Malformed| Rejected::Malformed)?
            .ok_or(Rejected::WrongPatient("has no patient reference"))?;
        match self
            .points(reference, true)
            .map_err(|_| Rejected::Malformed)?
        {
            Points::Ours => Ok(()),
            Points::Elsewhere => Err(Rejected::WrongPatient("refers to another patient")),
            Points::NotPatient => Err(Rejected::WrongPatient("is not about a single patient")),
            Points::Unknown => Err(Rejected::WrongPatient(
                "refers to a patient that cannot be resolved to the matched one",
            )),
        }
    }

    /// An Appointment names its patients among its participants: at least one must be ours,
    /// and none another patient.
    fn check_participants(&self, r: &Resource) -> Result<(), Rejected> {
        let mut ours = false;
        let participants = r.participant.items().map_err(|_| Rejected::Malformed)?;
        for participant in participants {
            let Some(actor) = participant.actor.get().map_err(|_| Rejected::Malformed)? else {
                continue;
            };
            match self.points(actor, false).map_err(|_| Rejected::Malformed)? {
                Points::Ours => ours = true,
                Points::Elsewhere => {
                    return Err(Rejected::WrongPatient(
                        "has another patient as a participant",
                    ));
                }
                Points::NotPatient | Points::Unknown => {}
            }
        }
        if ours {
            Ok(())
        } else {
            Err(Rejected::WrongPatient(
                "has no participant who is the patient",
            ))
        }
    }

    /// Where a reference points. `patient_expected`: the element can only be a patient (a
    /// `subject`), so an untyped reference that cannot be resolved is `Unknown`; otherwise
    /// (an Appointment participant) it may be anyone and is `NotPatient`.
    fn points(&self, reference: &Reference, patient_expected: bool) -> Result<Points, Malformed> {
        let mut verdicts = Vec::with_capacity(2);
        if let Some(identifier) = reference.identifier.get()?
            && identifier.system.str()? == Some(NHS_NUMBER_SYSTEM)
        {
            let wanted = self.nhs_number.as_digits();
            let same = identifier
                .value
                .str()?
                .is_some_and(|v| v.chars().filter(|c| !c.is_whitespace()).eq(wanted.chars()));
            verdicts.push(if same {
                Points::Ours
            } else {
                Points::Elsewhere
            });
        }
        let stated_type = reference.type_.str()?;
        if let Some(text) = reference.reference.str()? {
            verdicts.push(self.points_text(text, stated_type, patient_expected));
        } else if verdicts.is_empty() {
            // Display text only: nothing says who it is.
            verdicts.push(match stated_type {
                Some("Patient") => Points::Unknown,
                Some(_) => Points::NotPatient,
                None if patient_expected => Points::Unknown,
                None => Points::NotPatient,
            });
        }
        // Any part pointing elsewhere wins: a reference to our Patient with another person's
        // NHS number is not ours.
        Ok(if verdicts.contains(&Points::Elsewhere) {
            Points::Elsewhere
        } else if verdicts.contains(&Points::Ours) {
            Points::Ours
        } else if verdicts.contains(&Points::Unknown) {
            Points::Unknown
        } else {
            Points::NotPatient
        })
    }

    fn points_text(&self, text: &str, stated_type: Option<&str>, patient_expected: bool) -> Points {
        let text = without_history(text);
        if text.starts_with('#') {
            // A contained Patient is not the Patient matched by NHS number.
            return Points::Elsewhere;
        }
        if self.urls.contains(text) {
            return Points::Ours;
        }
        if self.rejected.contains(text) {
            return Points::Elsewhere;
        }
        if text.starts_with("urn:") {
            return match stated_type {
                Some("Patient") => Points::Unknown,
                Some(_) => Points::NotPatient,
                None if patient_expected => Points::Unknown,
                None => Points::NotPatient,
            };
        }
        let (relative, on_this_server) = match text.strip_prefix(self.base.as_str()) {
            Some(rest) => (rest, true),
            None if text.contains("://") => (text, false),
            None => (text, true),
        };
        let mut parts = relative.rsplit('/');
        let id = parts.next().unwrap_or_default();
        let type_ = parts.next().or(stated_type);
        if type_ != Some("Patient") {
            return if type_.is_none() && patient_expected {
                Points::Unknown
            } else {
                Points::NotPatient
            };
        }
        if !on_this_server {
            // Another server's Patient/123 is not this server's Patient/123.
            return Points::Elsewhere;
        }
        if self.ids.contains(id) {
            Points::Ours
        } else {
            Points::Elsewhere
        }
    }
}

/// Whether a Patient carries any NHS number at all.
fn carries_an_nhs_number(resource: &Resource) -> bool {
    resource.identifier.ok().is_some_and(|identifiers| {
        identifiers
            .iter()
            .filter_map(|i| i.ok())
            .any(|i| i.system.str() == Ok(Some(NHS_NUMBER_SYSTEM)))
    })
}

fn contradiction() -> SourceError {
    SourceError::WrongPatient(
        "it describes the matched Patient with another NHS number in the same answer".into(),
    )
}

/// `Patient/1/_history/2` → `Patient/1`: a versioned reference is still to the same Patient.
fn without_history(reference: &str) -> &str {
    match reference.find("/_history/") {
        Some(at) => &reference[..at],
        None => reference,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::model::parse_resource;

    const NHS: &str = "9990000018";

    fn resource(json: &str) -> Resource {
        parse_resource(json.as_bytes()).expect("test JSON")
    }

    fn identity() -> Identity {
        let base = Url::parse("https://gp.example/fhir/").expect("url");
        let mut identity = Identity::new(NhsNumber::parse(NHS).expect("valid"), &base);
        let patient = resource(
            r#"{"resourceType":"Patient","id":"p1","identifier":[{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9990000018"}]}"#,
        );
        assert_eq!(
            identity.add_patient(
                &patient,
                Some("urn:uuid:6f0d1c1e-8b0a-4b8e-9a53-3a4b0b6c0f11")
            ),
            Ok(true)
        );
        let other = resource(
            r#"{"resourceType":"Patient","id":"p2","identifier":[{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9434765919"}]}"#,
        );
        assert_eq!(identity.add_patient(&other, None), Ok(false));
        identity
    }

    fn condition(subject: &str) -> Resource {
        resource(&format!(
            r#"{{"resourceType":"Condition","id":"c","subject":{subject}}}"#
        ))
    }

    #[test]
    fn references_to_the_matched_patient_are_accepted_in_every_form() {
        let identity = identity();
        for subject in [
            r#"{"reference":"Patient/p1"}"#,
            r#"{"reference":"Patient/p1/_history/3"}"#,
            r#"{"reference":"https://gp.example/fhir/Patient/p1"}"#,
            r#"{"reference":"urn:uuid:6f0d1c1e-8b0a-4b8e-9a53-3a4b0b6c0f11"}"#,
            r#"{"identifier":{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"999 000 0018"}}"#,
            r#"{"reference":"Patient/p1","identifier":{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9990000018"}}"#,
        ] {
            assert_eq!(
                identity.check(Kind::Condition, &condition(subject)),
                Ok(()),
                "{subject}"
            );
        }
    }

    #[test]
    fn references_anywhere_else_are_rejected() {
        let identity = identity();
        for subject in [
            r#"{"reference":"Patient/p2"}"#,
            r#"{"reference":"Patient/p9"}"#,
            r#"{"reference":"https://other.example/fhir/Patient/p1"}"#,
            r#"{"reference":"urn:uuid:00000000-0000-0000-0000-000000000000"}"#,
            r#"{"identifier":{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9434765919"}}"#,
            r#"{"reference":"Patient/p1","identifier":{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9434765919"}}"#,
            r#"{"reference":"Group/g1"}"#,
            r##"{"reference":"#p"}"##,
            r#"{"display":"Mr Smith"}"#,
        ] {
            assert!(
                matches!(
                    identity.check(Kind::Condition, &condition(subject)),
                    Err(Rejected::WrongPatient(_))
                ),
                "{subject}"
            );
        }
        let no_subject = resource(r#"{"resourceType":"Condition","id":"c"}"#);
        assert_eq!(
            identity.check(Kind::Condition, &no_subject),
            Err(Rejected::WrongPatient("has no patient reference"))
        );
        assert_eq!(
            identity.check(Kind::Condition, &condition(r#""Patient/p1""#)),
            Err(Rejected::Malformed)
        );
    }

    #[test]
    fn allergies_use_patient_and_appointments_their_participants() {
        let identity = identity();
        let allergy = resource(
            r#"{"resourceType":"AllergyIntolerance","patient":{"reference":"Patient/p1"}}"#,
        );
        assert_eq!(identity.check(Kind::AllergyIntolerance, &allergy), Ok(()));
        let by_subject = resource(
            r#"{"resourceType":"AllergyIntolerance","subject":{"reference":"Patient/p1"}}"#,
        );
        assert!(
            identity
                .check(Kind::AllergyIntolerance, &by_subject)
                .is_err()
        );

        let ours = resource(
            r#"{"resourceType":"Appointment","participant":[{"actor":{"reference":"Practitioner/x","display":"Dr X"}},{"actor":{"reference":"Patient/p1"}}]}"#,
        );
        assert_eq!(identity.check(Kind::Appointment, &ours), Ok(()));
        let theirs = resource(
            r#"{"resourceType":"Appointment","participant":[{"actor":{"reference":"Patient/p1"}},{"actor":{"reference":"Patient/p2"}}]}"#,
        );
        assert!(identity.check(Kind::Appointment, &theirs).is_err());
        let nobody = resource(
            r#"{"resourceType":"Appointment","participant":[{"actor":{"reference":"Location/l"}}]}"#,
        );
        assert!(identity.check(Kind::Appointment, &nobody).is_err());
    }

    #[test]
    fn resources_may_refer_to_any_patient_carrying_the_number() {
        let mut identity = identity();
        let duplicate = resource(
            r#"{"resourceType":"Patient","id":"p1-old","active":false,"identifier":[{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9990000018"}]}"#,
        );
        assert_eq!(identity.add_patient(&duplicate, None), Ok(true));
        for subject in [
            r#"{"reference":"Patient/p1"}"#,
            r#"{"reference":"Patient/p1-old"}"#,
        ] {
            assert_eq!(
                identity.check(Kind::Condition, &condition(subject)),
                Ok(()),
                "{subject}"
            );
        }
    }

    #[test]
    fn a_source_contradicting_itself_about_the_patient_is_wrong_patient() {
        let mut identity = identity();
        let p1_as_someone_else = resource(
            r#"{"resourceType":"Patient","id":"p1","identifier":[{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9434765919"}]}"#,
        );
        assert!(matches!(
            identity.add_patient(&p1_as_someone_else, None),
            Err(SourceError::WrongPatient(_))
        ));
        // The same Patient without identifiers says nothing about who it is: still ours.
        let p1_bare = resource(r#"{"resourceType":"Patient","id":"p1"}"#);
        assert_eq!(identity.add_patient(&p1_bare, None), Ok(true));
        let stranger_bare = resource(r#"{"resourceType":"Patient","id":"p7"}"#);
        assert_eq!(identity.add_patient(&stranger_bare, None), Ok(false));
    }

    #[test]
    fn an_answer_whose_only_patient_is_someone_else_is_wrong_patient() {
        let base = Url::parse("https://gp.example/fhir/").expect("url");
        let mut identity = Identity::new(NhsNumber::parse(NHS).expect("valid"), &base);
        let answer = vec![PageResource {
            full_url: None,
            resource: Box::new(resource(
                r#"{"resourceType":"Patient","id":"p9","identifier":[{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9434765919"}]}"#,
            )),
        }];
        let mut wrong = Vec::new();
        assert!(matches!(
            identity.check_patients(&answer, &mut wrong),
            Err(SourceError::WrongPatient(_))
        ));
    }
}
