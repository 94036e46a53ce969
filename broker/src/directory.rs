//! Organisations defined in bulk: a directory file of thousands of organisations with an
//! endpoint template and shared defaults. Loading validates every row but builds no HTTP client:
//! each organisation's connection pool is created on its first lookup, so an idle organisation
//! costs a few hundred bytes.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use carerecord_adapters::fhir::{FhirConfig, FhirSource, SharedClient};
use carerecord_adapters::{
    NhsNumber, Source, SourceError, SourceInfo, SourceReply, SourceRequest, async_trait,
};

use crate::config::DirectoryConfig;

/// One organisation from the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub code: String,
    pub name: String,
    pub kind: String,
    pub base_url: String,
}

/// A directory that cannot be used: which line, and why.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("cannot read directory {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("directory {path}, line {line}: {why}")]
    Line {
        path: std::path::PathBuf,
        line: usize,
        why: String,
    },
}

/// Reads and validates the directory file.
pub fn load(config: &DirectoryConfig) -> Result<Vec<Row>, DirectoryError> {
    let text = std::fs::read_to_string(&config.file).map_err(|source| DirectoryError::Read {
        path: config.file.clone(),
        source,
    })?;
    parse(&text, config.endpoint_template.as_deref(), &config.file)
}

/// Parses directory CSV (RFC 4180 quoting) with the header
/// `organisation_code,organisation_name,kind,base_url`.
pub fn parse(text: &str, template: Option<&str>, path: &Path) -> Result<Vec<Row>, DirectoryError> {
    let bad = |line: usize, why: String| DirectoryError::Line {
        path: path.to_owned(),
        line,
        why,
    };
    let mut rows = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let fields = split_csv(line).map_err(|why| bad(n, why.into()))?;
        if n == 1 {
            let header: Vec<&str> = fields.iter().map(|f| f.trim()).collect();
            if header != ["organisation_code", "organisation_name", "kind", "base_url"] {
                return Err(bad(
                    1,
                    "the header must be organisation_code,organisation_name,kind,base_url".into(),
                ));
            }
            continue;
        }
        let [code, name, kind, base_url]: [String; 4] = fields
            .try_into()
            .map_err(|f: Vec<String>| bad(n, format!("expected 4 fields, found {}", f.len())))?;
        let code = code.trim().to_owned();
        if code.is_empty() || !code.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(bad(
                n,
                format!("organisation code {code:?} is not an ODS-style code"),
            ));
        }
        if !seen.insert(code.to_ascii_uppercase()) {
            return Err(bad(n, format!("organisation {code} appears twice")));
        }
        let base_url = match (base_url.trim(), template) {
            ("", Some(t)) => t.replace("{code}", &code),
            ("", None) => {
                return Err(bad(n, "no base_url and no endpoint_template".into()));
            }
            (url, _) => url.to_owned(),
        };
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(bad(
                n,
                format!("base_url {base_url:?} is not an http(s) URL"),
            ));
        }
        rows.push(Row {
            code,
            name: name.trim().to_owned(),
            kind: kind.trim().to_owned(),
            base_url,
        });
    }
    Ok(rows)
}

/// Splits one CSV line: fields separated by commas, optionally double-quoted with `""` escapes.
fn split_csv(line: &str) -> Result<Vec<String>, &'static str> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (false, '"') if at_start => {
                quoted = true;
                at_start = false;
            }
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (false, ',') => {
                fields.push(std::mem::take(&mut field));
                at_start = true;
            }
            (_, c) => {
                field.push(c);
                at_start = false;
            }
        }
    }
    if quoted {
        return Err("an unterminated quoted field");
    }
    fields.push(field);
    Ok(fields)
}

/// One HTTP client for every organisation of a directory, built on first use: they share its
/// TLS settings, and usually a host, so they share its connections too.
pub type DirectoryClient = Arc<OnceLock<Result<SharedClient, String>>>;

/// A FHIR source whose client is built on first use.
pub struct LazyFhirSource {
    info: SourceInfo,
    config: FhirConfig,
    client: DirectoryClient,
    built: OnceLock<Result<Arc<FhirSource>, String>>,
}

impl LazyFhirSource {
    /// A directory organisation, on the directory's shared `client`.
    pub fn new(info: SourceInfo, config: FhirConfig, client: DirectoryClient) -> Self {
        LazyFhirSource {
            info,
            config,
            client,
            built: OnceLock::new(),
        }
    }

    /// Whether the client has been built (for tests and metrics).
    pub fn is_built(&self) -> bool {
        self.built.get().is_some()
    }
}

#[async_trait]
impl Source for LazyFhirSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    async fn fetch(&self, request: &SourceRequest) -> Result<SourceReply, SourceError> {
        match self.source() {
            Ok(source) => source.fetch(request).await,
            Err(why) => Err(SourceError::Unavailable(format!("misconfigured: {why}"))),
        }
    }

    async fn hint_patient_id(&self, nhs_number: NhsNumber, patient_id: &str) {
        if let Ok(source) = self.source() {
            source.hint_patient_id(nhs_number, patient_id).await;
        }
    }
}

impl LazyFhirSource {
    /// The FHIR source, built on first use.
    fn source(&self) -> &Result<Arc<FhirSource>, String> {
        self.built.get_or_init(|| {
            let client = self
                .client
                .get_or_init(|| SharedClient::new(&self.config).map_err(|e| e.to_string()))
                .clone()?;
            FhirSource::with_client(self.info.clone(), &self.config, client)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "organisation_code,organisation_name,kind,base_url\n";

    #[test]
    fn rows_use_the_template_and_honour_quoting() {
        let text = format!(
            "{HEADER}A81001,\"Riverside, North\",gp_practice,\nRJ1,\"The \"\"Royal\"\"\",acute_trust,https://fhir.rj1.example/R4\n"
        );
        let rows = parse(
            &text,
            Some("http://127.0.0.1:9000/org/{code}/fhir"),
            Path::new("d.csv"),
        )
        .expect("valid");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].name, "Riverside, North");
        assert_eq!(rows[0].base_url, "http://127.0.0.1:9000/org/A81001/fhir");
        assert_eq!(rows[1].name, "The \"Royal\"");
        assert_eq!(rows[1].base_url, "https://fhir.rj1.example/R4");
    }

    #[test]
    fn bad_rows_are_reported_with_their_line() {
        let cases = [
            (format!("{HEADER}A1,x,gp\n"), "line 2", "expected 4 fields"),
            (format!("{HEADER}A1,x,gp,\nA1,y,gp,\n"), "line 3", "twice"),
            (format!("{HEADER}A 1,x,gp,\n"), "line 2", "ODS-style"),
            (format!("{HEADER}A1,x,gp,ftp://x\n"), "line 2", "http(s)"),
            ("code,name\n".to_owned(), "line 1", "header"),
            (format!("{HEADER}A1,\"x,gp,\n"), "line 2", "unterminated"),
        ];
        for (text, line, why) in cases {
            let err = parse(&text, Some("http://h/{code}"), Path::new("d.csv"))
                .expect_err("invalid")
                .to_string();
            assert!(err.contains(line) && err.contains(why), "{err}");
        }
        let err =
            parse(&format!("{HEADER}A1,x,gp,\n"), None, Path::new("d.csv")).expect_err("no url");
        assert!(err.to_string().contains("endpoint_template"));
    }
}
