//! `carerecord lookup`: a terminal client for a running broker.

use std::path::PathBuf;
use std::time::Duration;

use crate::render;
use anyhow::Context;
use carerecord_adapters::federation::BrokerSourceConfig;
use carerecord_proto::care_record_event::Event;
use carerecord_proto::care_record_service_client::CareRecordServiceClient;
use carerecord_proto::{
    CacheDirective, GetCareRecordRequest, GetCareRecordResponse, Purpose, Requester, Section,
};
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct LookupArgs {
    /// The patient's NHS number (spaces or hyphens allowed).
    pub nhs_number: String,
    /// The broker's address.
    #[arg(
        long,
        default_value = "http://127.0.0.1:50051",
        env = "CARERECORD_BROKER"
    )]
    pub broker: String,
    /// Print the response as JSON (proto3 JSON mapping).
    #[arg(long)]
    pub json: bool,
    /// Stream: show each organisation as it answers.
    #[arg(long)]
    pub stream: bool,
    /// Your user id.
    #[arg(long, env = "CARERECORD_USER", default_value = "cli-user")]
    pub user: String,
    /// Your RBAC role code.
    #[arg(long, env = "CARERECORD_ROLE", default_value = "R8000")]
    pub role: String,
    /// Your organisation's ODS code.
    #[arg(long, env = "CARERECORD_ORG", default_value = "CLI")]
    pub org: String,
    /// Emergency (break-glass) access, with this reason.
    #[arg(long)]
    pub emergency: Option<String>,
    /// Only these sections (comma separated: conditions, medications, allergies, test_results,
    /// care_plans, documents, encounters, appointments).
    #[arg(long, value_delimiter = ',')]
    pub sections: Vec<String>,
    /// Ask the sources now rather than accept a cached record.
    #[arg(long)]
    pub fresh: bool,
    /// Deadline for the whole lookup, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub timeout_ms: u64,
    /// PEM CA certificate to trust for the broker (private PKI); implies TLS.
    #[arg(long, env = "CARERECORD_CA")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate, for a broker requiring mutual TLS.
    #[arg(long, env = "CARERECORD_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key for `--cert`.
    #[arg(long, env = "CARERECORD_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// TLS server name to verify, when it differs from the broker URL's host.
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// The region's affinity secret: sends `x-carerecord-affinity` (a keyed hash of the NHS
    /// number) so a load balancer keeps one patient on one broker.
    #[arg(long, env = "CARERECORD_AFFINITY_SECRET", hide_env_values = true)]
    pub affinity_secret: Option<String>,
}

impl LookupArgs {
    /// Arguments for a lookup with defaults, as the demo uses them.
    pub fn for_patient(nhs_number: &str, broker: &str) -> Self {
        LookupArgs {
            nhs_number: nhs_number.to_owned(),
            broker: broker.to_owned(),
            json: false,
            stream: false,
            user: "demo-user".into(),
            role: "R8000".into(),
            org: "DEMO".into(),
            emergency: None,
            sections: Vec::new(),
            fresh: false,
            timeout_ms: 5000,
            ca: None,
            cert: None,
            key: None,
            tls_domain: None,
            affinity_secret: None,
        }
    }

    /// How to reach the broker: TLS when the URL is `https://` or a CA or certificate is given.
    fn endpoint(&self) -> anyhow::Result<tonic::transport::Endpoint> {
        BrokerSourceConfig {
            url: self.broker.clone(),
            ca_cert: self.ca.clone(),
            client_cert: self.cert.clone(),
            client_key: self.key.clone(),
            tls_domain: self.tls_domain.clone(),
        }
        .endpoint()
        .with_context(|| format!("cannot reach the broker at {}", self.broker))
    }

    fn request(&self) -> anyhow::Result<tonic::Request<GetCareRecordRequest>> {
        let sections = self
            .sections
            .iter()
            .map(|s| {
                Section::from_short_name(s)
                    .map(|s| s as i32)
                    .with_context(|| format!("unknown section {s:?}"))
            })
            .collect::<anyhow::Result<Vec<i32>>>()?;
        let (purpose, reason) = match &self.emergency {
            Some(reason) => (Purpose::EmergencyAccess, reason.clone()),
            None => (Purpose::DirectCare, String::new()),
        };
        let mut request = tonic::Request::new(GetCareRecordRequest {
            nhs_number: self.nhs_number.clone(),
            requester: Some(Requester {
                user_id: self.user.clone(),
                role_code: self.role.clone(),
                organisation_code: self.org.clone(),
                purpose: purpose as i32,
                emergency_reason: reason,
                ..Requester::default()
            }),
            sections,
            cache: if self.fresh {
                CacheDirective::RequireFresh
            } else {
                CacheDirective::AllowCached
            } as i32,
            via_brokers: Vec::new(),
        });
        request.set_timeout(Duration::from_millis(self.timeout_ms));
        if let Some(secret) = &self.affinity_secret {
            let key = crate::affinity::key(secret.as_bytes(), &self.nhs_number);
            request.metadata_mut().insert(
                crate::affinity::HEADER,
                key.parse().context("affinity key is not a header value")?,
            );
        }
        Ok(request)
    }
}

pub async fn run(args: LookupArgs) -> anyhow::Result<()> {
    use std::io::Write;
    // Printed as it arrives: with --stream each organisation appears when it answers.
    lookup_into(&args, &mut |text| {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    })
    .await
}

/// Performs the lookup and renders it as the terminal shows it.
pub async fn lookup_text(args: &LookupArgs) -> anyhow::Result<String> {
    let mut out = String::new();
    lookup_into(args, &mut |text| out.push_str(text)).await?;
    Ok(out)
}

/// Performs the lookup, handing each piece of the rendering to `out` as soon as it is known.
async fn lookup_into(args: &LookupArgs, out: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    let channel = args
        .endpoint()?
        .connect()
        .await
        .with_context(|| format!("cannot connect to the broker at {}", args.broker))?;
    let mut client = CareRecordServiceClient::new(channel);
    let request = args.request()?;
    if args.stream {
        let mut stream = client
            .stream_care_record(request)
            .await
            .map_err(status_error)?
            .into_inner();
        while let Some(event) = stream.message().await.map_err(status_error)? {
            match event.event {
                Some(Event::Source(s)) => {
                    if let Some(status) = &s.status {
                        if args.json {
                            out(&(serde_json::to_string(&s)? + "\n"));
                        } else {
                            out(&format!("arrived: {}", render::source_line(status, 0)));
                        }
                    }
                }
                Some(Event::Complete(r)) => {
                    if args.json {
                        out(&(serde_json::to_string_pretty(&explicit_json(&r)?)? + "\n"));
                    } else {
                        out("\n");
                        out(&render::response(&r));
                    }
                }
                None => {}
            }
        }
    } else {
        let response = client
            .get_care_record(request)
            .await
            .map_err(status_error)?
            .into_inner();
        if args.json {
            out(&(serde_json::to_string_pretty(&explicit_json(&response)?)? + "\n"));
        } else {
            out(&render::response(&response));
        }
    }
    Ok(())
}

/// The response as proto3 JSON, plus what proto3 JSON leaves out but a reader must see: every
/// section of the record (an empty one as `[]`, never absent) and `complete` (also when false).
fn explicit_json(r: &GetCareRecordResponse) -> anyhow::Result<serde_json::Value> {
    let mut value = serde_json::to_value(r)?;
    if let Some(object) = value.as_object_mut() {
        object.insert("complete".into(), r.complete.into());
        let record = object
            .entry("record")
            .or_insert_with(|| serde_json::json!({}));
        if let Some(record) = record.as_object_mut() {
            for section in [
                "conditions",
                "medications",
                "allergies",
                "testResults",
                "carePlans",
                "documents",
                "encounters",
                "appointments",
            ] {
                record
                    .entry(section)
                    .or_insert_with(|| serde_json::json!([]));
            }
        }
    }
    Ok(value)
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "the broker refused the lookup ({:?}): {}",
        s.code(),
        s.message()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_output_shows_empty_sections_and_an_incomplete_record() {
        let response = GetCareRecordResponse {
            record: Some(carerecord_proto::CareRecord {
                allergies: vec![carerecord_proto::Entry {
                    summary: "Penicillin".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..GetCareRecordResponse::default()
        };
        let json = explicit_json(&response).expect("json");
        assert_eq!(json["complete"], serde_json::json!(false));
        let record = &json["record"];
        for section in carerecord_proto::Section::ALL {
            let name = match section.short_name() {
                "test_results" => "testResults",
                "care_plans" => "carePlans",
                other => other,
            };
            assert!(record[name].is_array(), "{name} in {record}");
        }
        assert_eq!(record["allergies"].as_array().map(Vec::len), Some(1));
        assert_eq!(record["conditions"], serde_json::json!([]));
        // Every key pbjson would write for a full record is one we also write when empty.
        let full = carerecord_proto::CareRecord {
            test_results: vec![Default::default()],
            care_plans: vec![Default::default()],
            ..Default::default()
        };
        let full = serde_json::to_value(&full).expect("json");
        assert!(full["testResults"].is_array() && full["carePlans"].is_array());
    }
}
