//! The broker configuration for a running region (the `carerecord` TOML format).
//!
//! Written by hand rather than serialised so that the file carries the comments a developer needs
//! (why plaintext is on, what `mode` may be) and keeps the exact table layout the broker documents;
//! strings are escaped as TOML basic strings, and a test parses the result back.

use crate::population::OrgKind;
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
    /// One `POST` batch: the Patient search and every search chained on the NHS number.
    Chained,
}

impl FhirMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FhirMode::Search => "search",
            FhirMode::Everything => "everything",
            FhirMode::Batch => "batch",
            FhirMode::Chained => "chained",
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

/// How long the routed config lets the broker wait for the locator.
pub const LOCATOR_TIMEOUT_MS: u64 = 500;
/// The directory file's header line.
pub const DIRECTORY_HEADER: &str = "organisation_code,organisation_name,kind,base_url";

/// One row of the organisation directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryRow {
    pub organisation_code: String,
    pub organisation_name: String,
    pub kind: OrgKind,
    /// Empty when the broker config's endpoint template covers it.
    pub base_url: String,
}

/// One CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break, with
/// quotes doubled.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The directory CSV: [`DIRECTORY_HEADER`], then one row per organisation; `\n` line ends.
pub fn directory_csv(rows: impl IntoIterator<Item = DirectoryRow>) -> String {
    let mut out = String::from(DIRECTORY_HEADER);
    out.push('\n');
    for r in rows {
        out.push_str(&csv_field(&r.organisation_code));
        out.push(',');
        out.push_str(&csv_field(&r.organisation_name));
        out.push(',');
        out.push_str(r.kind.as_str());
        out.push(',');
        out.push_str(&csv_field(&r.base_url));
        out.push('\n');
    }
    out
}

/// Parses a directory CSV (RFC 4180: quoted fields, doubled quotes, `\n` or `\r\n` line ends)
/// with exactly [`DIRECTORY_HEADER`]'s columns. For tests and tools; the broker has its own.
pub fn parse_directory_csv(text: &str) -> Result<Vec<DirectoryRow>, String> {
    let records = parse_csv(text)?;
    let mut it = records.into_iter();
    let header = it.next().ok_or("empty directory file")?;
    if header.join(",") != DIRECTORY_HEADER {
        return Err(format!(
            "header must be {DIRECTORY_HEADER:?}, not {header:?}"
        ));
    }
    it.enumerate()
        .map(|(i, r)| {
            let line = i + 2;
            let [code, name, kind, url]: [String; 4] = r.try_into().map_err(|r: Vec<String>| {
                format!("record {line}: {} fields, expected 4", r.len())
            })?;
            let kind = [
                OrgKind::GpPractice,
                OrgKind::AcuteTrust,
                OrgKind::MentalHealthTrust,
                OrgKind::AmbulanceService,
                OrgKind::CareHome,
            ]
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(|| format!("record {line}: unknown kind {kind:?}"))?;
            Ok(DirectoryRow {
                organisation_code: code,
                organisation_name: name,
                kind,
                base_url: url,
            })
        })
        .collect()
}

fn parse_csv(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                c => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => quoted = true,
            '"' => return Err(format!("stray quote in field {field:?}")),
            ',' => record.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
                at_start = true;
                continue;
            }
            c => field.push(c),
        }
        at_start = false;
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    if !at_start {
        record.push(field);
        records.push(record);
    }
    Ok(records)
}

/// What goes into a routed broker config.
pub(crate) struct Routed<'a> {
    pub broker_listen: &'a str,
    pub always_ask: &'a [String],
    pub locator_url: &'a str,
    /// Absolute path of the directory CSV.
    pub directory_file: &'a str,
    /// `http://IP:PORT/org/{code}/fhir` when every organisation shares a port.
    pub endpoint_template: Option<&'a str>,
    pub mode: FhirMode,
}

pub(crate) fn render_routed(r: &Routed<'_>) -> String {
    let mut out = String::new();
    out.push_str(
        "# Written by mock-sources: a routed local-development broker config for this synthetic region.\n",
    );
    out.push_str("[server]\n");
    out.push_str(&format!("listen = {}\n", toml_string(r.broker_listen)));
    out.push_str("plaintext = true\n");
    out.push_str("\n[routing]\n");
    out.push_str("mode = \"located\"\n");
    let always: Vec<String> = r.always_ask.iter().map(|c| toml_string(c)).collect();
    out.push_str(&format!("always_ask = [{}]\n", always.join(", ")));
    out.push_str(&format!("locator_timeout_ms = {LOCATOR_TIMEOUT_MS}\n"));
    out.push_str("[[routing.locators]]\n");
    out.push_str("id = \"region-locator\"\n");
    out.push_str(&format!("base_url = {}\n", toml_string(r.locator_url)));
    out.push_str("registered_gp = true\n");
    out.push_str("record_pointers = true\n");
    out.push_str("\n[directory]\n");
    out.push_str(&format!("file = {}\n", toml_string(r.directory_file)));
    if let Some(t) = r.endpoint_template {
        out.push_str(&format!("endpoint_template = {}\n", toml_string(t)));
    }
    out.push_str(&format!("timeout_ms = {SOURCE_TIMEOUT_MS}\n"));
    out.push_str(&format!("mode = {}\n", toml_string(r.mode.as_str())));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_quoting_and_parses_back() {
        let rows = vec![
            DirectoryRow {
                organisation_code: "VM133".into(),
                organisation_name: "Willow House Care Home, Riverside".into(),
                kind: OrgKind::CareHome,
                base_url: String::new(),
            },
            DirectoryRow {
                organisation_code: "RJ1".into(),
                organisation_name: "St \"Odd\" Trust\nline two".into(),
                kind: OrgKind::AcuteTrust,
                base_url: "http://127.0.0.1:1/fhir".into(),
            },
        ];
        let text = directory_csv(rows.clone());
        assert!(text.starts_with("organisation_code,organisation_name,kind,base_url\n"));
        assert!(text.contains("VM133,\"Willow House Care Home, Riverside\",care_home,\n"));
        assert!(text.contains("\"St \"\"Odd\"\" Trust\nline two\""));
        assert_eq!(parse_directory_csv(&text), Ok(rows.clone()));
        assert_eq!(
            parse_directory_csv(&text.replace('\n', "\r\n")).map(|r| r.len()),
            Ok(2)
        );
        assert!(parse_directory_csv("a,b\n").is_err());
        assert!(
            parse_directory_csv(&format!("{DIRECTORY_HEADER}\nX,\"open,gp_practice,\n")).is_err()
        );
    }

    #[test]
    fn routed_config_has_the_documented_shape() {
        let always = vec!["RJ1".to_string(), "RYA".to_string()];
        let text = render_routed(&Routed {
            broker_listen: "127.0.0.1:50051",
            always_ask: &always,
            locator_url: "http://127.0.0.1:4000/locator/fhir",
            directory_file: "/tmp/dir \"x\".csv",
            endpoint_template: Some("http://127.0.0.1:4000/org/{code}/fhir"),
            mode: FhirMode::Everything,
        });
        let v: toml::Table = toml::from_str(&text).expect("valid TOML");
        assert_eq!(v["server"]["listen"].as_str(), Some("127.0.0.1:50051"));
        assert_eq!(v["server"]["plaintext"].as_bool(), Some(true));
        assert_eq!(v["routing"]["mode"].as_str(), Some("located"));
        let always: Vec<&str> = v["routing"]["always_ask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(always, ["RJ1", "RYA"]);
        assert_eq!(v["routing"]["locator_timeout_ms"].as_integer(), Some(500));
        let loc = &v["routing"]["locators"].as_array().unwrap()[0];
        assert_eq!(loc["id"].as_str(), Some("region-locator"));
        assert_eq!(
            loc["base_url"].as_str(),
            Some("http://127.0.0.1:4000/locator/fhir")
        );
        assert_eq!(loc["registered_gp"].as_bool(), Some(true));
        assert_eq!(loc["record_pointers"].as_bool(), Some(true));
        assert_eq!(v["directory"]["file"].as_str(), Some("/tmp/dir \"x\".csv"));
        assert_eq!(
            v["directory"]["endpoint_template"].as_str(),
            Some("http://127.0.0.1:4000/org/{code}/fhir")
        );
        assert_eq!(v["directory"]["timeout_ms"].as_integer(), Some(2000));
        assert_eq!(v["directory"]["mode"].as_str(), Some("everything"));
        assert!(v.get("sources").is_none());
    }

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
