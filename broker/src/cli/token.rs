//! `carerecord token`: make a calling system's token key, and sign a requester token with it —
//! for setting up and testing the FHIR face. A calling system in production signs its own.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use crate::fhir_api::token;

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Make a new private key (PKCS#8 DER) and print its public key (PEM) for `token_key`.
    NewKey {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
        /// `es256` (P-256) or `ed25519`.
        #[arg(long, default_value = "es256")]
        algorithm: String,
    },
    /// Sign a requester token with a private key made by `new-key`; prints the JWT.
    Sign(SignArgs),
}

#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// The private key file (`new-key --out`).
    #[arg(long)]
    pub key: PathBuf,
    /// The calling system's id (`iss`): as its client certificate is configured, or
    /// `unverified` without mutual TLS.
    #[arg(long, default_value = "unverified")]
    pub system: String,
    /// The FHIR face's audience (`[fhir] audience`; default: its base URL without the '/').
    #[arg(long)]
    pub audience: String,
    #[arg(long)]
    pub user: String,
    #[arg(long, default_value = "")]
    pub user_name: String,
    #[arg(long)]
    pub role: String,
    #[arg(long)]
    pub org: String,
    /// `direct_care` or `emergency_access`.
    #[arg(long, default_value = "direct_care")]
    pub purpose: String,
    #[arg(long, default_value = "")]
    pub emergency_reason: String,
    /// A relationship the calling system asserts (honoured only for trusted systems).
    #[arg(long, default_value = "")]
    pub relationship: String,
    /// Lifetime in seconds (the face accepts at most `[fhir] max_token_lifetime_secs`).
    #[arg(long, default_value_t = 300)]
    pub lifetime: u64,
}

pub fn run(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::NewKey { out, algorithm } => {
            let private = token::generate(&algorithm)?;
            std::fs::write(&out, &private)
                .with_context(|| format!("cannot write {}", out.display()))?;
            print!("{}", token::public_pem(&private)?);
            Ok(())
        }
        TokenCommand::Sign(args) => {
            println!("{}", sign(&args)?);
            Ok(())
        }
    }
}

/// The JWT for `args`.
pub fn sign(args: &SignArgs) -> anyhow::Result<String> {
    let private =
        std::fs::read(&args.key).with_context(|| format!("cannot read {}", args.key.display()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = json!({
        "iss": args.system, "aud": args.audience, "iat": now, "exp": now + args.lifetime,
        "sub": args.user, "name": args.user_name, "role": args.role, "organisation": args.org,
        "purpose": args.purpose, "emergency_reason": args.emergency_reason,
        "relationship": args.relationship,
    });
    Ok(token::sign(&private, &claims)?)
}
