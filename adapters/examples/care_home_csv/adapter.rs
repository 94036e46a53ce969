//! A worked example adapter: a care home whose medication administration record (MAR) system
//! exports a CSV file of residents' allergies and medicines every night, to a folder the broker
//! can read.
//!
//! It shows the whole contract on a small scale: NotFound versus error, the deadline, provenance,
//! coded concepts, ISO 8601 dates from UK-style ones, only the sections asked for, warnings for
//! bad rows, and redacted error text. `ADAPTERS.md` walks through it.

use std::path::PathBuf;

use async_trait::async_trait;
use carerecord_adapters::proto::{
    AllergyDetail, CareRecord, Coding, Entry, MedicationDetail, Provenance, Section, entry,
};
use carerecord_adapters::{
    NhsNumber, Source, SourceError, SourceInfo, SourceRecord, SourceReply, SourceRequest,
};
use tokio::io::AsyncReadExt;

/// The export's first line. Any other first line means the file is not an export we understand.
pub const HEADER: &str =
    "nhs_number,kind,code_system,code,display,dose,start_date,status,id,last_updated";

/// A small export as the care home's system writes it: UK dates, quoted fields with commas, a
/// BOM-less UTF-8 file with CRLF or LF line ends.
pub const SAMPLE_EXPORT: &str = "\
nhs_number,kind,code_system,code,display,dose,start_date,status,id,last_updated
9990000018,allergy,snomed,91936005,Allergy to penicillin,,2009,active,ALG-0041,2024-02-11T10:02:00Z
9990000018,allergy,snomed,300916003,Latex allergy,,03/2015,active,ALG-0042,2024-02-11T10:03:00Z
9990000018,medication,dmd,39732311000001104,Amlodipine 5mg tablets,One tablet in the morning,01/03/2021,active,MAR-1187,2024-05-01T08:15:00Z
9990000018,medication,dmd,322236009,Paracetamol 500mg tablets,\"Two tablets, up to four times a day when required\",14/03/2024,active,MAR-1203,2024-05-02T19:40:00Z
9990000018,medication,dmd,325278007,Metformin 500mg tablets,One tablet twice a day,02/2019,stopped,MAR-0977,2024-01-20T09:00:00Z
9990000034,medication,dmd,322236009,Paracetamol 500mg tablets,One tablet at night,05/01/2024,active,MAR-1190,2024-05-01T21:00:00Z
";

/// Largest export read by default: a care home's file is kilobytes; this stops a runaway one.
pub const DEFAULT_MAX_BYTES: u64 = 8 * 1024 * 1024;

const SNOMED: &str = "http://snomed.info/sct";
const DMD: &str = "https://dmd.nhs.uk";

/// The care home's export as a carerecord source.
pub struct CareHomeCsvSource {
    /// Who the source is (from the broker's configuration).
    info: SourceInfo,
    /// The export file. Read afresh on every fetch: a new night's export is seen at once, and
    /// there is no copy of clinical data to keep in step.
    path: PathBuf,
    /// Largest export read, so a runaway file cannot exhaust the broker's memory.
    max_bytes: u64,
}

impl CareHomeCsvSource {
    /// A source reading the export at `path`.
    pub fn new(info: SourceInfo, path: impl Into<PathBuf>) -> Self {
        CareHomeCsvSource {
            info,
            path: path.into(),
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }

    async fn read(&self, request: &SourceRequest) -> Result<SourceReply, SourceError> {
        let bytes = read_capped(&self.path, self.max_bytes).await?;
        // Error texts describe the problem, never the file's content: they reach callers.
        let text = String::from_utf8(bytes)
            .map_err(|_| SourceError::InvalidResponse("the export is not UTF-8 text".into()))?;
        let mut reply = parse_export(&text, request)?;
        if let SourceReply::Found(record) = &mut reply {
            record.stamp_provenance(&self.info);
        }
        Ok(reply)
    }
}

#[async_trait]
impl Source for CareHomeCsvSource {
    fn info(&self) -> &SourceInfo {
        &self.info
    }

    async fn fetch(&self, request: &SourceRequest) -> Result<SourceReply, SourceError> {
        // The deadline bounds the whole read. Dropping `read` part-way is harmless: it holds
        // nothing but an open file, which closes on drop.
        tokio::time::timeout_at(request.deadline, self.read(request))
            .await
            .unwrap_or(Err(SourceError::Timeout))
    }
}

/// Reads at most `max` bytes of the file; a bigger file is `TooLarge`, a missing or unreadable
/// one `Unavailable` (the path stays in the operator's config, not in the error).
async fn read_capped(path: &std::path::Path, max: u64) -> Result<Vec<u8>, SourceError> {
    let unreadable = |_| SourceError::Unavailable("the export file cannot be read".into());
    let file = tokio::fs::File::open(path).await.map_err(unreadable)?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(unreadable)?;
    if bytes.len() as u64 > max {
        return Err(SourceError::TooLarge(
            usize::try_from(max).unwrap_or(usize::MAX),
        ));
    }
    Ok(bytes)
}

/// The patient's rows of the export, in the sections asked for.
fn parse_export(text: &str, request: &SourceRequest) -> Result<SourceReply, SourceError> {
    let mut lines = text.lines().enumerate();
    let header = lines
        .next()
        .map(|(_, l)| l.trim_start_matches('\u{feff}').trim());
    if header != Some(HEADER) {
        return Err(SourceError::InvalidResponse(
            "the export does not start with the expected header".into(),
        ));
    }
    let mut record = CareRecord::default();
    let mut warnings = Vec::new();
    let mut known = false;
    // Rows whose NHS number cannot be read might be this patient's.
    let mut unattributable = 0usize;
    for (index, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let Some(fields) = split_csv(line).filter(|f| f.len() == 10) else {
            unattributable += 1;
            continue;
        };
        let Ok(nhs_number) = NhsNumber::parse(&fields[0]) else {
            unattributable += 1;
            continue;
        };
        if nhs_number != request.nhs_number {
            continue;
        }
        known = true;
        match row_to_entry(&fields) {
            Ok((section, entry)) if request.sections.contains(section) => {
                if let Some(entries) = record.section_mut(section) {
                    entries.push(entry);
                }
            }
            Ok(_) => {}
            // The line number lets the care home find the row; the row itself stays out.
            Err(why) => warnings.push(format!("export line {}: {why}; row skipped", index + 1)),
        }
    }
    if !known {
        if unattributable > 0 {
            // "Not known here" would be a guess, and a clinician would believe it.
            return Err(SourceError::InvalidResponse(format!(
                "{unattributable} row(s) of the export could not be read, so it cannot say \
                 whether it holds this patient"
            )));
        }
        return Ok(SourceReply::NotFound);
    }
    if unattributable > 0 {
        warnings.push(format!(
            "{unattributable} row(s) of the export could not be read and may belong to this \
             patient"
        ));
    }
    Ok(SourceReply::Found(SourceRecord {
        record,
        warnings,
        nested: Vec::new(),
        ..SourceRecord::default()
    }))
}

/// One row as an entry, or why it cannot be one (text safe to show: no field values).
fn row_to_entry(fields: &[String]) -> Result<(Section, Entry), &'static str> {
    let [
        _,
        kind,
        system,
        code,
        display,
        dose,
        start,
        status,
        id,
        updated,
    ] = fields
    else {
        return Err("wrong number of fields");
    };
    let section = match kind.as_str() {
        "allergy" => Section::Allergies,
        "medication" => Section::Medications,
        _ => return Err("kind is neither allergy nor medication"),
    };
    let system = match system.to_ascii_lowercase().as_str() {
        "snomed" => SNOMED,
        "dmd" => DMD,
        _ => return Err("code system is neither snomed nor dmd"),
    };
    // SNOMED CT and dm+d identifiers are 6 to 18 digits.
    if !(6..=18).contains(&code.len()) || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err("code is not a SNOMED CT or dm+d identifier");
    }
    if id.is_empty() {
        return Err("no record id");
    }
    let effective = if start.is_empty() {
        String::new()
    } else {
        uk_date_to_iso(start).ok_or("start date is not DD/MM/YYYY, MM/YYYY or YYYY")?
    };
    if !updated.is_empty() && !is_utc_timestamp(updated) {
        return Err("last_updated is not YYYY-MM-DDThh:mm:ssZ");
    }
    let (summary, detail) = match section {
        Section::Medications => (
            if dose.is_empty() {
                display.clone()
            } else {
                format!("{display} — {dose}")
            },
            entry::Detail::Medication(MedicationDetail {
                dosage: dose.clone(),
                // The MAR records what the home gives: a statement that the resident takes it.
                kind: "statement".into(),
                ..MedicationDetail::default()
            }),
        ),
        _ => (
            display.clone(),
            entry::Detail::Allergy(AllergyDetail {
                allergy_type: "allergy".into(),
                ..AllergyDetail::default()
            }),
        ),
    };
    Ok((
        section,
        Entry {
            concept: Some(Coding {
                system: system.into(),
                code: code.clone(),
                display: display.clone(),
            }),
            summary,
            status: status.trim().to_ascii_lowercase().replace(' ', "-"),
            effective,
            provenance: vec![Provenance {
                source_entry_id: id.clone(),
                last_updated: updated.clone(),
                // Source id and organisation come from SourceInfo (stamp_provenance).
                ..Provenance::default()
            }],
            detail: Some(detail),
            ..Entry::default()
        },
    ))
}

/// "14/03/2024" → "2024-03-14", "03/2015" → "2015-03", "2009" → "2009": the export's UK dates as
/// ISO 8601, keeping their precision.
fn uk_date_to_iso(date: &str) -> Option<String> {
    let parts: Vec<&str> = date.trim().split('/').collect();
    let number = |s: &str, len: usize, range: std::ops::RangeInclusive<u32>| {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
            .filter(|n| range.contains(n))
    };
    match parts.as_slice() {
        [year] => Some(format!("{:04}", number(year, 4, 1900..=2100)?)),
        [month, year] => Some(format!(
            "{:04}-{:02}",
            number(year, 4, 1900..=2100)?,
            number(month, 2, 1..=12)?
        )),
        [day, month, year] => Some(format!(
            "{:04}-{:02}-{:02}",
            number(year, 4, 1900..=2100)?,
            number(month, 2, 1..=12)?,
            number(day, 2, 1..=31)?
        )),
        _ => None,
    }
}

/// Whether `text` has the shape `YYYY-MM-DDThh:mm:ssZ` (what the export writes for last_updated).
fn is_utc_timestamp(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// Splits one CSV line (RFC 4180 quoting: `"a, b"`, `""` for a quote). `None` if a quote is
/// left open or text follows a closing quote.
fn split_csv(line: &str) -> Option<Vec<String>> {
    let mut fields = Vec::new();
    let mut chars = line.trim_end_matches('\r').chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => break,
                    c => field.push(c),
                }
            }
            fields.push(field);
            match chars.next() {
                None => return Some(fields),
                Some(',') => {}
                Some(_) => return None,
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field.trim().to_owned());
                        return Some(fields);
                    }
                    Some(',') => break,
                    Some(c) => field.push(c),
                }
            }
            fields.push(field.trim().to_owned());
        }
    }
}
