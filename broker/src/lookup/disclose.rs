//! Disclosure: what may leave the broker, and the audit event that must be written first.
//!
//! For every caller, cache hit or miss: the legitimate relationship is checked on the record,
//! the requester's view is filtered (objections, sensitive entries), the audit event is written —
//! and only then is anything returned. No audit event, no disclosure.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use carerecord_proto::{CareRecord, Purpose, Section, SourceOutcome};

use super::Broker;
use super::answer::{Disclosed, LookupAnswer, SourceUpdate};
use crate::access::{Caller, Denial};
use crate::audit::AuditEvent;
use crate::error::LookupError;
use crate::fanout::Answer;
use crate::merge::MergedRecord;
use crate::validate::LookupRequest;

/// A merged record as one requester may see it.
pub(super) struct Visible {
    record: Disclosed,
    withheld: bool,
    sources: Vec<carerecord_proto::SourceStatus>,
    warnings: Vec<carerecord_proto::Warning>,
}

impl Broker {
    /// Refuses: records the denial (a refusal that cannot be written is still a refusal) and
    /// returns the error for the caller.
    pub(super) async fn deny(
        &self,
        request: &LookupRequest,
        caller: &Caller,
        denial: Denial,
        merged: Option<&MergedRecord>,
    ) -> LookupError {
        let event = self.audit_event(
            request,
            caller,
            "denied",
            denial.to_string(),
            merged,
            None,
            false,
        );
        metrics::counter!(crate::metrics::DENIED, "reason" => denial.label()).increment(1);
        tracing::info!(request_id = %request.request_id, reason = %denial, "access denied");
        if let Err(e) = self.audit.record(&event).await {
            tracing::error!(request_id = %request.request_id, error = %e, "audit trail unavailable");
        }
        LookupError::Denied(denial)
    }

    /// The answer for `request` from a merged record: the relationship check, this requester's
    /// view of the record, and the audit event. Nothing is disclosed unless the audit event was
    /// written.
    pub(super) async fn disclose(
        &self,
        request: &LookupRequest,
        caller: &Caller,
        merged: &Arc<MergedRecord>,
        cache_age: Option<Duration>,
    ) -> Result<LookupAnswer, LookupError> {
        let basis = match self.policy.relationship(request, caller, merged) {
            Ok(basis) => basis,
            Err(denial) => return Err(self.deny(request, caller, denial, Some(merged)).await),
        };
        let view = self.visible(request, merged);
        let emergency = request.purpose == Purpose::EmergencyAccess;
        let kind = if emergency { "break_glass" } else { "access" };
        let event = self.audit_event(
            request,
            caller,
            kind,
            basis.to_string(),
            Some(merged),
            Some(&view),
            cache_age.is_some(),
        );
        if let Err(e) = self.audit.record(&event).await {
            tracing::error!(request_id = %request.request_id, error = %e, "audit trail unavailable: not disclosing");
            return Err(LookupError::AuditUnavailable);
        }
        if emergency {
            tracing::warn!(
                target: "carerecord::audit",
                request_id = %request.request_id,
                user = %request.requester.user_id,
                organisation = %request.requester.organisation_code,
                "emergency access granted: report to the privacy officer"
            );
        }
        tracing::info!(
            target: "carerecord::audit",
            request_id = %request.request_id,
            system = %caller.system,
            user = %request.requester.user_id,
            role = %request.requester.role_code,
            organisation = %request.requester.organisation_code,
            kind,
            withheld = view.withheld,
            "record disclosed"
        );
        Ok(LookupAnswer {
            request_id: request.request_id.clone(),
            record: view.record,
            sources: view.sources,
            complete: merged.complete,
            cache_age,
            warnings: view.warnings,
            emergency_access: emergency,
            withheld: view.withheld,
            assembled_at: merged.assembled_at,
            locators: merged.locators.clone(),
            // A patient's objection: only the requester's own organisation's lines.
            section_statuses: if self.policy.objection_applies(request) {
                let org = request.requester.organisation_code.trim();
                crate::merge::restrict_section_statuses(&merged.section_statuses, |s| {
                    s.organisation_code.eq_ignore_ascii_case(org)
                })
            } else {
                merged.section_statuses.clone()
            },
        })
    }

    /// What this requester may see of a merged record: everything their role permits, or —
    /// when the patient objected to sharing and this is not an emergency — only their own
    /// organisation's entries as it reported them (re-merged from its own answers, so no other
    /// organisation's content rides under its name), its own source statuses and warnings.
    fn visible(&self, request: &LookupRequest, merged: &Arc<MergedRecord>) -> Visible {
        if !self.policy.objection_applies(request) {
            // Nothing held back (the common case): the cached record itself, not a copy.
            let withholds = !self.policy.sees_sensitive(request)
                && *merged
                    .restricted_content
                    .get_or_init(|| self.policy.holds_back_anything(&merged.record));
            if !withholds {
                return Visible {
                    record: Disclosed::whole(merged.clone()),
                    withheld: false,
                    sources: merged.sources.clone(),
                    warnings: merged.warnings.clone(),
                };
            }
            let mut view = self.policy.view(request, &merged.record);
            let mut warnings = merged.warnings.clone();
            if view.withheld {
                crate::merge::rebuild_conflicts(&mut view.record, &mut warnings);
            }
            return Visible {
                record: view.record.into(),
                withheld: view.withheld,
                sources: merged.sources.clone(),
                warnings,
            };
        }
        let org = request.requester.organisation_code.trim();
        let ours = |code: &str| code.eq_ignore_ascii_case(org);
        let own: Vec<&Answer> = merged
            .answers
            .iter()
            .map(AsRef::as_ref)
            .filter(|a| ours(&a.status.organisation_code))
            .collect();
        let others_had_data = merged
            .answers
            .iter()
            .any(|a| !ours(&a.status.organisation_code));
        let mut warnings = Vec::new();
        let today = carerecord_adapters::calendar::rfc3339(merged.assembled_at);
        let record = crate::merge::merge_found(
            request.nhs_number,
            &own,
            today.get(..10).unwrap_or(&today),
            &mut warnings,
        );
        let mut view = self.policy.view(request, &record);
        if view.withheld {
            crate::merge::rebuild_conflicts(&mut view.record, &mut warnings);
        }
        Visible {
            record: view.record.into(),
            withheld: view.withheld || others_had_data,
            sources: merged
                .sources
                .iter()
                .filter(|s| ours(&s.organisation_code))
                .cloned()
                .collect(),
            warnings,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn audit_event(
        &self,
        request: &LookupRequest,
        caller: &Caller,
        kind: &str,
        decision: String,
        merged: Option<&MergedRecord>,
        view: Option<&Visible>,
        from_cache: bool,
    ) -> AuditEvent {
        let q = &request.requester;
        AuditEvent {
            time: carerecord_adapters::calendar::rfc3339(SystemTime::now()),
            request_id: request.request_id.clone(),
            kind: kind.to_owned(),
            system: caller.system.clone(),
            user_id: q.user_id.clone(),
            user_name: q.user_name.clone(),
            role: q.role_code.clone(),
            organisation: q.organisation_code.clone(),
            patient: request.nhs_number.as_digits(),
            purpose: match request.purpose {
                Purpose::EmergencyAccess => "emergency_access",
                _ => "direct_care",
            }
            .to_owned(),
            emergency_reason: q.emergency_reason.clone(),
            decision,
            sources: merged
                .map(|m| {
                    m.sources
                        .iter()
                        .map(|s| format!("{}:{}", s.source_id, SourceOutcome::label_of(s.outcome)))
                        .collect()
                })
                .unwrap_or_default(),
            returned: view
                .map(|v| {
                    Section::ALL
                        .iter()
                        .map(|s| format!("{}:{}", s.short_name(), v.record.section(*s).len()))
                        .collect()
                })
                .unwrap_or_default(),
            withheld: view.is_some_and(|v| v.withheld),
            from_cache,
        }
    }

    /// Whether the relationship is already established before the record is whole (streaming
    /// releases events as soon as it is): emergency access, a trusted assertion, or this one
    /// source's answer — the requester's own organisation answering.
    pub(super) fn released_by(
        &self,
        request: &LookupRequest,
        caller: &Caller,
        answer: Option<&Answer>,
    ) -> bool {
        if request.purpose == Purpose::EmergencyAccess {
            return true;
        }
        if self.policy.trusted_assertion(request, caller) {
            return true;
        }
        answer.is_some_and(|a| {
            self.policy.relationship_from_answer(
                request,
                &a.status.organisation_code,
                a.status.outcome,
            )
        })
    }

    /// Audits the moment a stream starts disclosing, before its first source event: a client
    /// that disconnects mid-stream, or a break-glass view, is still on the record. Fails closed.
    pub(super) async fn audit_release(
        &self,
        request: &LookupRequest,
        caller: &Caller,
    ) -> Result<(), LookupError> {
        let emergency = request.purpose == Purpose::EmergencyAccess;
        let basis = if emergency {
            "emergency access"
        } else if self.policy.trusted_assertion(request, caller) {
            "relationship asserted by calling system"
        } else {
            "requesting organisation holds records for the patient"
        };
        let event = self.audit_event(
            request,
            caller,
            if emergency { "break_glass" } else { "access" },
            format!("stream released: {basis}"),
            None,
            None,
            false,
        );
        self.audit.record(&event).await.map_err(|e| {
            tracing::error!(request_id = %request.request_id, error = %e, "audit trail unavailable: not streaming");
            LookupError::AuditUnavailable
        })
    }

    /// The update for one live answer, as this requester may see it, or `None` when the
    /// requester may not even learn that this source answered (a patient's objection).
    /// Contributions never carry the address: the final answer's demographics are authoritative
    /// (another source may mark the patient restricted).
    pub(super) fn source_update(
        &self,
        request: &LookupRequest,
        answer: &Answer,
    ) -> Option<SourceUpdate> {
        if self.policy.objection_applies(request)
            && !answer
                .status
                .organisation_code
                .eq_ignore_ascii_case(request.requester.organisation_code.trim())
        {
            return None;
        }
        Some(SourceUpdate {
            status: crate::merge::status_of(answer),
            contribution: answer.record.as_ref().map(|r| {
                let mut view = self.policy.view(request, &r.record).record;
                if let Some(p) = view.patient.as_mut() {
                    p.address.clear();
                    p.registered_gp_code.clear();
                }
                view
            }),
        })
    }

    /// Updates replayed from a cached record: each source's status, and the merged entries it
    /// reported, as this requester may see them.
    pub(super) fn replayed_updates(
        &self,
        request: &LookupRequest,
        merged: &Arc<MergedRecord>,
    ) -> Vec<SourceUpdate> {
        let Visible {
            record: visible,
            sources,
            ..
        } = self.visible(request, merged);
        sources
            .iter()
            .map(|status| {
                let mut contribution = CareRecord::default();
                // A federated broker's entries carry "its-id/remote-id".
                let nested_prefix = format!("{}/", status.source_id);
                let ours = |id: &str| id == status.source_id || id.starts_with(&nested_prefix);
                let reported_by =
                    |e: &&carerecord_proto::Entry| e.provenance.iter().any(|p| ours(&p.source_id));
                for section in Section::ALL {
                    if let Some(slot) = contribution.section_mut(section) {
                        slot.extend(visible.section(section).iter().filter(reported_by).cloned());
                    }
                }
                if let Some(p) = &visible.patient
                    && p.provenance.iter().any(|p| ours(&p.source_id))
                {
                    contribution.patient = Some(p.clone());
                }
                SourceUpdate {
                    status: status.clone(),
                    contribution: Some(contribution),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_outcomes_read_as_before() {
        assert_eq!(SourceOutcome::label_of(SourceOutcome::Ok as i32), "OK");
        assert_eq!(
            SourceOutcome::label_of(SourceOutcome::NotFound as i32),
            "NOT_FOUND"
        );
        assert_eq!(
            SourceOutcome::label_of(SourceOutcome::CircuitOpen as i32),
            "CIRCUIT_OPEN"
        );
        assert_eq!(
            SourceOutcome::label_of(SourceOutcome::WrongPatient as i32),
            "WRONG_PATIENT"
        );
        assert_eq!(SourceOutcome::label_of(0), "UNKNOWN");
        assert_eq!(SourceOutcome::label_of(999), "UNKNOWN");
    }
}
