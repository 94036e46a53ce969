//! The broker configuration for a running region (the `carerecord` TOML format).
//!
//! Written by hand rather than serialised so that the file carries the comments a developer needs
//! (why plaintext is on, what `mode` may be) and keeps the exact table layout the broker documents;
//! strings are escaped as TOML basic strings, and a test parses the result back.

use crate::server::RunningOrganisation;

/// How the broker should read a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FhirMode {
    /// `Patient?identifier=` then one search per resource type.
    #[default]
    Search,
    /// `Patient/{id}/$everything`.
    Everything,
    /// One `POST` batch of searches.
    Batch,
}

impl FhirMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FhirMode::Search => "search",
            FhirMode::Everything => "everything",
            FhirMode::Batch => "batch",
        }
    }
}

/// Per-source timeout written into the config.
pub const SOURCE_TIMEOUT_MS: u64 = 2000;

/// A TOML basic string literal, quotes included.
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\u{:04X}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub(crate) fn render(
    broker_listen: &str,
    orgs: &[RunningOrganisation],
    mode: impl Fn(&RunningOrganisation) -> FhirMode,
) -> String {
    let mut out = String::new();
    out.push_str(
        "# Written by mock-sources: a local-development broker config for this synthetic region.\n",
    );
    out.push_str("[server]\n");
    out.push_str(&format!("listen = {}\n", toml_string(broker_listen)));
    out.push_str("# Plain-text gRPC, explicitly allowed for loopback development only.\n");
    out.push_str("plaintext = true\n");
    for o in orgs {
        out.push('\n');
        // The name is user-visible text: keep it out of the comment line, where it cannot be escaped.
        out.push_str(&format!(
            "# {} {}\n",
            o.kind.label(),
            o.code.replace(['\n', '\r'], " ")
        ));
        out.push_str("[[sources]]\n");
        out.push_str(&format!(
            "id = {}\n",
            toml_string(&o.code.to_ascii_lowercase())
        ));
        out.push_str(&format!("organisation_code = {}\n", toml_string(&o.code)));
        out.push_str(&format!("organisation_name = {}\n", toml_string(&o.name)));
        out.push_str(&format!("timeout_ms = {SOURCE_TIMEOUT_MS}\n"));
        out.push_str("[sources.fhir]\n");
        out.push_str(&format!("base_url = {}\n", toml_string(&o.base_url)));
        out.push_str(&format!("mode = {}\n", toml_string(mode(o).as_str())));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::population::OrgKind;

    fn org(code: &str, name: &str, port: u16) -> RunningOrganisation {
        RunningOrganisation {
            code: code.into(),
            name: name.into(),
            kind: OrgKind::GpPractice,
            base_url: format!("http://127.0.0.1:{port}/fhir"),
            addr: ([127, 0, 0, 1], port).into(),
        }
    }

    #[test]
    fn renders_the_documented_shape_and_parses_back() {
        let orgs = [
            org("A81001", "Riverside Medical Practice", 40123),
            org("RJ1", "St \"Odd\" \\ Trust\n", 40124),
        ];
        let text = render("127.0.0.1:50051", &orgs, |o| {
            if o.code == "RJ1" {
                FhirMode::Batch
            } else {
                FhirMode::Search
            }
        });
        assert!(text.starts_with("# Written by mock-sources"));
        let v: toml::Table = toml::from_str(&text).expect("valid TOML");
        assert_eq!(v["server"]["listen"].as_str(), Some("127.0.0.1:50051"));
        assert_eq!(v["server"]["plaintext"].as_bool(), Some(true));
        let sources = v["sources"].as_array().unwrap();
        assert_eq!(sources.len(), 2);
        assert_eq!(sources[0]["id"].as_str(), Some("a81001"));
        assert_eq!(sources[0]["organisation_code"].as_str(), Some("A81001"));
        assert_eq!(
            sources[0]["organisation_name"].as_str(),
            Some("Riverside Medical Practice")
        );
        assert_eq!(sources[0]["timeout_ms"].as_integer(), Some(2000));
        assert_eq!(
            sources[0]["fhir"]["base_url"].as_str(),
            Some("http://127.0.0.1:40123/fhir")
        );
        assert_eq!(sources[0]["fhir"]["mode"].as_str(), Some("search"));
        assert_eq!(
            sources[1]["organisation_name"].as_str(),
            Some("St \"Odd\" \\ Trust\n")
        );
        assert_eq!(sources[1]["fhir"]["mode"].as_str(), Some("batch"));
    }
}
