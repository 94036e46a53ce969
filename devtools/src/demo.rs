//! `carerecord-dev demo`: the main job on an embedded default. Starts a synthetic region (mock
//! organisations serving FHIR R4 over real HTTP on loopback), a broker configured for it, and
//! looks up a patient known to several organisations over real gRPC. The broker also serves its
//! FHIR R4 face (plaintext loopback, tokens verified with a key made for this run): the demo asks
//! it for the same patient and prints a ready-to-paste `curl` with a freshly signed token. And it
//! serves the clinician's web view: the demo launches it for the same patient, as an EHR would,
//! and prints the launch URL to open in a browser.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use carerecord_adapters::fhir::QueryMode;
use carerecord_broker::assemble::{Trail, assemble};
use carerecord_broker::cli::lookup::{LookupArgs, lookup_text};
use carerecord_broker::cli::serve::shutdown_signal;
use carerecord_broker::config::Config;
use carerecord_broker::fhir_api::{self, Face, FaceListener, token};
use carerecord_broker::server::{self, Transport};
use carerecord_broker::view::{self, View};
use carerecord_mock_sources::{Region, RegionServer, RegionSpec};
use clap::Args;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the region, the broker and its FHIR face running after the lookup (until Ctrl-C),
    /// for `carerecord lookup` and the printed `curl`.
    #[arg(long)]
    pub keep_running: bool,
    /// Broker listen address when kept running (otherwise a free loopback port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// FHIR face listen address when kept running (otherwise a free loopback port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub fhir_listen: SocketAddr,
    /// Web view listen address when kept running (otherwise a free loopback port).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub view_listen: SocketAddr,
    /// Seed of the synthetic population.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Number of synthetic patients.
    #[arg(long, default_value_t = 10_000)]
    pub patients: usize,
    /// Number of organisations.
    #[arg(long, default_value_t = 10)]
    pub organisations: usize,
    /// How the broker reads each organisation: search, everything (the default: with the
    /// patient id cache one round trip for a patient looked up before, and the least CPU; see
    /// BENCHMARKS.md section 7), batch or chained.
    #[arg(long, value_parser = crate::parse_query_mode, default_value = "everything")]
    pub mode: QueryMode,
    /// Look up this patient instead of one known to several organisations.
    #[arg(long)]
    pub nhs_number: Option<String>,
    /// Print the lookup as JSON.
    #[arg(long)]
    pub json: bool,
    /// Stream the lookup: organisations as they answer.
    #[arg(long)]
    pub stream: bool,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let spec = RegionSpec {
        seed: args.seed,
        patients: args.patients,
        organisations: args.organisations,
        ..RegionSpec::default()
    };
    let region = Arc::new(Region::generate(&spec));
    let mock = RegionServer::start(region.clone(), IpAddr::V4(Ipv4Addr::LOCALHOST))
        .await
        .context("cannot start the mock organisations")?;

    let bind = if args.keep_running {
        args.listen
    } else {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    };
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("cannot listen on {bind}"))?;
    let addr = listener.local_addr()?;
    let fhir_bind = if args.keep_running {
        args.fhir_listen
    } else {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    };
    let fhir_listener = tokio::net::TcpListener::bind(fhir_bind)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {fhir_bind} for the FHIR face (choose another with --fhir-listen)"
            )
        })?;
    let fhir_addr = fhir_listener.local_addr()?;
    let view_bind = if args.keep_running {
        args.view_listen
    } else {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    };
    let view_listener = tokio::net::TcpListener::bind(view_bind)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {view_bind} for the web view (choose another with --view-listen)"
            )
        })?;
    let view_addr = view_listener.local_addr()?;
    let keys = DemoKeys::make()?;

    let mode = crate::mock_mode(args.mode);
    let mut text = mock.broker_config_toml_with(&addr.to_string(), |_| mode);
    // The FHIR face, plaintext on loopback: every caller is `unverified`, its tokens checked with
    // the public half of this run's key (base URL and audience by default: http://{listen}/).
    text.push_str(&format!(
        "\n[fhir]\nlisten = \"{fhir_addr}\"\nunverified_token_key = {}\n",
        toml_string(&keys.public_pem.display().to_string())
    ));
    // The web view, plaintext on loopback, launched with the same key; a launch URL waits ten
    // minutes to be opened (once), so there is time to paste it into a browser.
    text.push_str(&format!(
        "\n[view]\nlisten = \"{view_addr}\"\nunverified_token_key = {}\nlaunch_ttl_secs = 600\n",
        toml_string(&keys.public_pem.display().to_string())
    ));
    let mut config = Config::parse(&text, Path::new("<mock-sources region>"))?;
    config.audit.file = std::env::temp_dir().join(format!(
        "carerecord-demo-audit-{}.jsonl",
        std::process::id()
    ));
    let assembly = assemble(&config, Trail::Open)?;
    let broker = Arc::new(assembly.broker.context("the demo broker was not built")?);
    let face = assembly
        .fhir
        .context("the demo's FHIR face was not configured")?;
    let view_parts = assembly
        .view
        .context("the demo's web view was not configured")?;
    let view_base = view_parts.settings.base_url.clone();
    let view_audience = view_parts.settings.launching.audience.clone();
    let (view_stop, view_stopped) = tokio::sync::oneshot::channel::<()>();
    let view_serving = tokio::spawn(view::serve(
        FaceListener::new(view_listener, view_parts.tls)?,
        Arc::new(View::new(broker.clone(), view_parts.settings)),
        async {
            let _ = view_stopped.await;
        },
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server::run(
        listener,
        broker.clone(),
        Transport::plaintext(),
        async {
            let _ = stopped.await;
        },
    ));
    let base = face.settings.base_url.clone();
    let audience = face.settings.audience.clone();
    let (fhir_stop, fhir_stopped) = tokio::sync::oneshot::channel::<()>();
    let fhir_serving = tokio::spawn(fhir_api::serve(
        FaceListener::new(fhir_listener, face.tls)?,
        Arc::new(Face {
            broker,
            settings: face.settings,
        }),
        async {
            let _ = fhir_stopped.await;
        },
    ));

    let patient = match &args.nhs_number {
        Some(n) => {
            let nhs = carerecord_adapters::NhsNumber::parse(n)?;
            region
                .patient(&nhs)
                .with_context(|| format!("{} is not in the synthetic population", nhs.grouped()))?
        }
        None => region
            .patients_known_to_at_least(3)
            .next()
            .context("the synthetic region has no patient known to three organisations")?,
    };

    let url = format!("http://{addr}");
    if !args.json {
        println!(
            "Synthetic region: {} organisations serving FHIR R4 on loopback, {} patients (seed {}).",
            mock.organisations().len(),
            region.patient_count(),
            args.seed
        );
        for org in mock.organisations() {
            println!("  {:<8} {:<45} {}", org.code, org.name, org.base_url);
        }
        println!(
            "Broker on {url}. Looking up {} as a clinician (R8000) at the registered GP practice {}:\n",
            patient.nhs_number.grouped(),
            patient.gp
        );
    }
    let mut lookup = LookupArgs::for_patient(&patient.nhs_number.as_digits(), &url);
    lookup.org = patient.gp.clone();
    lookup.json = args.json;
    lookup.stream = args.stream;
    print!("{}", lookup_text(&lookup).await?);

    let nhs = patient.nhs_number.as_digits();
    let bearer = keys.token(&audience, &patient.gp)?;
    if !args.json {
        // The same patient through the FHIR face, as the printed curl asks for it.
        let asked = structured_record(&base, &nhs, &bearer).await;
        println!(
            "\nFHIR R4 face on {base}: POST Patient/$getstructuredrecord for {} -> {asked}",
            patient.nhs_number.grouped()
        );
        println!(
            "{}",
            curl_hint(&base, &nhs, &bearer, &keys, &audience, &patient.gp)
        );
        if !args.keep_running {
            println!(
                "(The demo stops now: run it with --keep-running to keep the region, the broker and the FHIR face up and try that curl.)"
            );
        }
        // The clinician's view, launched as an EHR would: the NHS number goes in the launch
        // request's body; the URL holds only a single-use code.
        let view_bearer = keys.token(&view_audience, &patient.gp)?;
        match launch(&view_base, &nhs, &view_bearer).await {
            Ok(url) => {
                println!(
                    "\nClinician's web view on {view_base}: launched for {} as Dr Demo (R8000, {}). Open in a browser (works once, within 10 minutes):\n  {url}",
                    patient.nhs_number.grouped(),
                    patient.gp
                );
                println!(
                    "Another launch, while the demo runs (a fresh token: the 'token sign' above with --audience {}):\n\
                     \x20 curl -s -X POST '{view_base}launch' -H 'Content-Type: application/json' -H 'Authorization: Bearer {view_bearer}' -d '{{\"nhs_number\":\"{nhs}\"}}'",
                    view_audience
                );
                if !args.keep_running {
                    println!("(Run the demo with --keep-running to open it.)");
                }
            }
            Err(e) => println!("\nClinician's web view on {view_base}: launch failed: {e}"),
        }
    }

    if args.keep_running {
        println!(
            "\nRunning until Ctrl-C. Try:\n  cargo run --bin carerecord -- lookup {} --broker {url} --org {}\n  cargo run --bin mock-sources -- patients --limit 10   # more NHS numbers\nAdmin (faults, latency): {}",
            patient.nhs_number.grouped(),
            patient.gp,
            mock.admin_url()
        );
        shutdown_signal().await;
    }
    let _ = view_stop.send(());
    let _ = view_serving.await;
    let _ = fhir_stop.send(());
    let _ = fhir_serving.await;
    let _ = stop.send(());
    let _ = serving.await;
    mock.shutdown().await;
    Ok(())
}

/// This run's token key: the private half signs the demo's tokens, the public half is the
/// FHIR face's `unverified_token_key`. Both live in a directory removed when the demo ends.
struct DemoKeys {
    dir: PathBuf,
    private: Vec<u8>,
    private_der: PathBuf,
    public_pem: PathBuf,
}

impl DemoKeys {
    fn make() -> anyhow::Result<DemoKeys> {
        let dir = std::env::temp_dir().join(format!("carerecord-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let private = token::generate("es256").context("cannot make the demo's token key")?;
        let public = token::public_pem(&private).context("cannot derive the public key")?;
        let private_der = dir.join("token-key.der");
        let public_pem = dir.join("token-key.pub.pem");
        write_private(&private_der, &private)?;
        std::fs::write(&public_pem, public)
            .with_context(|| format!("cannot write {}", public_pem.display()))?;
        Ok(DemoKeys {
            dir,
            private,
            private_der,
            public_pem,
        })
    }

    /// A requester token for a clinician (R8000) at `organisation`, valid five minutes (the
    /// face's default maximum).
    fn token(&self, audience: &str, organisation: &str) -> anyhow::Result<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = serde_json::json!({
            "iss": "unverified",
            "aud": audience,
            "iat": now,
            "exp": now + 300,
            "sub": "demo-user",
            "name": "Dr Demo",
            "role": "R8000",
            "organisation": organisation,
            "purpose": "direct_care",
        });
        token::sign(&self.private, &claims).context("cannot sign the demo token")
    }
}

impl Drop for DemoKeys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The private key, readable by its owner only where the platform says so.
fn write_private(path: &Path, der: &[u8]) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::io::Write::write_all(&mut file, der)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A TOML basic string (JSON's escaping is valid TOML).
fn toml_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The GP Connect-style `Parameters` naming one patient (every section). `nhs` is ten digits,
/// so the text needs no escaping (in JSON or between the curl's single quotes).
fn parameters(nhs: &str) -> String {
    format!(
        r#"{{"resourceType":"Parameters","parameter":[{{"name":"patientNHSNumber","valueIdentifier":{{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"{nhs}"}}}}]}}"#
    )
}

/// Asks the FHIR face what the printed curl asks; a one-line summary of the answer.
async fn structured_record(base: &str, nhs: &str, bearer: &str) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => return format!("no HTTP client: {e}"),
    };
    let answer = client
        .post(format!("{base}Patient/$getstructuredrecord"))
        .header("content-type", "application/fhir+json")
        .bearer_auth(bearer)
        .body(parameters(nhs))
        .send()
        .await;
    let response = match answer {
        Ok(r) => r,
        Err(e) => return format!("no answer: {e}"),
    };
    let status = response.status();
    let body: serde_json::Value = match response.bytes().await {
        Ok(b) => serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null),
        Err(e) => return format!("{status}, body unreadable: {e}"),
    };
    let entries = body["entry"].as_array().map_or(&[][..], Vec::as_slice);
    if body["resourceType"] == "Bundle" {
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for e in entries {
            *counts
                .entry(e["resource"]["resourceType"].as_str().unwrap_or("?"))
                .or_default() += 1;
        }
        let counts: Vec<String> = counts.iter().map(|(t, n)| format!("{n} {t}")).collect();
        format!(
            "{status}, a {} Bundle of {} resources ({})",
            body["type"].as_str().unwrap_or("?"),
            entries.len(),
            counts.join(", ")
        )
    } else {
        let reason = body["issue"][0]["details"]["coding"][0]["code"]
            .as_str()
            .unwrap_or("");
        format!("{status} {reason}")
    }
}

/// Asks the web view for a launch for `nhs`, as an EHR does: the launch URL.
async fn launch(base: &str, nhs: &str, bearer: &str) -> anyhow::Result<String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    let response = client
        .post(format!("{base}launch"))
        .header("content-type", "application/json")
        .bearer_auth(bearer)
        .body(serde_json::json!({ "nhs_number": nhs }).to_string())
        .send()
        .await?;
    let status = response.status();
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await?)?;
    body["url"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{status}: {body}"))
}

/// The ready-to-paste curl, and how to sign a new token once this one expires.
fn curl_hint(
    base: &str,
    nhs: &str,
    bearer: &str,
    keys: &DemoKeys,
    audience: &str,
    organisation: &str,
) -> String {
    format!(
        "Fetch it yourself (the token is valid for 5 minutes):\n\
         \x20 curl -s -X POST '{base}Patient/$getstructuredrecord' \\\n\
         \x20   -H 'Content-Type: application/fhir+json' \\\n\
         \x20   -H 'Authorization: Bearer {bearer}' \\\n\
         \x20   -d '{params}'\n\
         A fresh token, while the demo runs:\n\
         \x20 cargo run -q --bin carerecord -- token sign --key {key} --audience {audience} --user demo-user --role R8000 --org {organisation}",
        params = parameters(nhs),
        key = keys.private_der.display(),
    )
}
