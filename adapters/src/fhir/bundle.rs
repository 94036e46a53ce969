//! Reading FHIR Bundles: searchset pages, their `next` links, the OperationOutcomes a server
//! puts among the results, and the entries of a batch-response.
//!
//! A Bundle that is not a Bundle, or whose paging links cannot be read, makes the whole response
//! invalid (the adapter cannot know what it missed); a single unreadable entry does not.

use super::json::{Field, Malformed};
use super::map::{Collected, PageResource};
use super::model::{Issue, Resource};
use crate::SourceError;

/// A batch-response entry: its HTTP status and the resource it carries, if any.
pub(crate) type BatchAnswer = (u16, Option<Box<Resource>>);

/// One page of results.
pub(crate) struct Page {
    pub resources: Vec<PageResource>,
    /// The `next` link as the server wrote it (absolute or relative), if there is one.
    pub next: Option<String>,
}

/// Splits a searchset (or `$everything`) Bundle into its resources and its next link. Issues
/// of OperationOutcome entries become warnings in `out`; unreadable entries are counted there.
pub(crate) fn read_page(mut bundle: Resource, out: &mut Collected) -> Result<Page, SourceError> {
    expect_bundle(&bundle)?;
    let next = next_link(&bundle)
        .map_err(|Malformed| SourceError::InvalidResponse("Bundle links are malformed".into()))?;
    let entries = match bundle.entry.take() {
        Ok(entries) => entries.unwrap_or_default(),
        Err(Malformed) => {
            return Err(SourceError::InvalidResponse(
                "Bundle entries are not a list".into(),
            ));
        }
    };
    let mut resources = Vec::with_capacity(entries.len());
    for entry in entries {
        let Field::Valid(mut entry) = entry else {
            out.unreadable("unidentified");
            continue;
        };
        let resource = match entry.resource.take() {
            Ok(Some(resource)) => resource,
            Ok(None) => continue,
            Err(Malformed) => {
                out.unreadable("unidentified");
                continue;
            }
        };
        let mode = entry
            .search
            .ok()
            .and_then(|s| s.mode.ok())
            .map(String::as_str);
        if mode == Some("outcome") || resource.resource_type.str() == Ok(Some("OperationOutcome")) {
            outcome_warnings(&resource, out);
            continue;
        }
        resources.push(PageResource {
            full_url: entry.full_url.take().ok().flatten(),
            resource,
        });
    }
    Ok(Page { resources, next })
}

/// The entries of a batch-response Bundle, in request order: each entry's HTTP status and the
/// resource it carries (a searchset Bundle for a search).
pub(crate) fn read_batch_response(mut bundle: Resource) -> Result<Vec<BatchAnswer>, SourceError> {
    expect_bundle(&bundle)?;
    let invalid = |what: &str| SourceError::InvalidResponse(format!("batch-response {what}"));
    let entries = bundle
        .entry
        .take()
        .map_err(|Malformed| invalid("entries are not a list"))?
        .unwrap_or_default();
    let mut results = Vec::with_capacity(entries.len());
    for entry in entries {
        let Field::Valid(mut entry) = entry else {
            return Err(invalid("has an unreadable entry"));
        };
        let status = entry
            .response
            .get()
            .ok()
            .flatten()
            .and_then(|r| r.status.ok())
            .and_then(|s| s.split_whitespace().next())
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| invalid("entry has no response status"))?;
        let resource = entry
            .resource
            .take()
            .map_err(|Malformed| invalid("entry resource is not an object"))?;
        results.push((status, resource));
    }
    Ok(results)
}

pub(crate) fn expect_bundle(resource: &Resource) -> Result<(), SourceError> {
    match resource.resource_type.str() {
        Ok(Some("Bundle")) => Ok(()),
        _ => Err(SourceError::InvalidResponse(
            "expected a FHIR Bundle".into(),
        )),
    }
}

pub(crate) fn next_link(bundle: &Resource) -> Result<Option<String>, Malformed> {
    for link in bundle.link.items()? {
        if link.relation.str()? == Some("next") {
            return Ok(link.url.str()?.map(str::to_owned));
        }
    }
    Ok(None)
}

/// Warnings from an OperationOutcome's error and warning issues: severity and issue code only,
/// never the free text (which may hold anything, patient data included).
pub(crate) fn outcome_warnings(outcome: &Resource, out: &mut Collected) {
    let Some(issues) = outcome.issue.ok() else {
        return;
    };
    for issue in issues.iter().filter_map(Field::ok) {
        if let Some(warning) = issue_warning(issue)
            && !out.warnings.contains(&warning)
        {
            out.warnings.push(warning);
        }
    }
}

fn issue_warning(issue: &Issue) -> Option<String> {
    let severity = match issue.severity.ok()?.as_str() {
        "fatal" => "a fatal error",
        "error" => "an error",
        "warning" => "a warning",
        _ => return None,
    };
    let code = issue
        .code
        .ok()
        .map(String::as_str)
        .filter(|c| c.len() <= 40 && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'))
        .unwrap_or("unknown");
    Some(format!("source reported {severity} (issue code {code})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::model::parse_resource;

    fn bundle(json: &str) -> Resource {
        parse_resource(json.as_bytes()).expect("valid JSON")
    }

    #[test]
    fn a_page_yields_resources_next_link_and_redacted_outcome_warnings() {
        let mut out = Collected::default();
        let page = read_page(
            bundle(
                r#"{"resourceType":"Bundle","type":"searchset",
                "link":[{"relation":"self","url":"http://x/Condition?patient=1"},
                        {"relation":"next","url":"http://x/Condition?patient=1&page=2"}],
                "entry":[
                  {"fullUrl":"http://x/Condition/1","resource":{"resourceType":"Condition","id":"1"},"search":{"mode":"match"}},
                  {"resource":{"resourceType":"OperationOutcome","issue":[
                     {"severity":"warning","code":"too-costly","diagnostics":"Patient 9990000018 has 20000 results"},
                     {"severity":"information","code":"informational"}]},"search":{"mode":"outcome"}},
                  "garbage"
                ]}"#,
            ),
            &mut out,
        )
        .expect("a Bundle");
        assert_eq!(page.resources.len(), 1);
        assert_eq!(
            page.resources[0].full_url.as_deref(),
            Some("http://x/Condition/1")
        );
        assert_eq!(
            page.next.as_deref(),
            Some("http://x/Condition?patient=1&page=2")
        );
        let (_, warnings) = out.into_parts();
        assert_eq!(
            warnings,
            vec![
                "source reported a warning (issue code too-costly)".to_owned(),
                "1 unidentified resource could not be read".to_owned(),
            ]
        );
        assert!(
            !warnings.iter().any(|w| w.contains("999")),
            "no diagnostics text"
        );
    }

    #[test]
    fn not_a_bundle_is_an_invalid_response() {
        let mut out = Collected::default();
        let err = read_page(bundle(r#"{"resourceType":"Patient","id":"1"}"#), &mut out)
            .err()
            .expect("not a Bundle");
        assert_eq!(
            err,
            SourceError::InvalidResponse("expected a FHIR Bundle".into())
        );
        let err = read_page(
            bundle(r#"{"resourceType":"Bundle","entry":{"a":1}}"#),
            &mut out,
        )
        .err()
        .expect("entry not a list");
        assert!(matches!(err, SourceError::InvalidResponse(_)));
    }

    #[test]
    fn batch_response_entries_carry_status_and_resource() {
        let entries = read_batch_response(bundle(
            r#"{"resourceType":"Bundle","type":"batch-response","entry":[
                {"resource":{"resourceType":"Bundle","type":"searchset"},"response":{"status":"200 OK"}},
                {"response":{"status":"404"}}]}"#,
        ))
        .expect("valid");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].0, 200);
        assert!(entries[0].1.is_some());
        assert_eq!(entries[1].0, 404);
        assert!(entries[1].1.is_none());
    }
}
