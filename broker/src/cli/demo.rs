//! `carerecord demo`: placeholder until mock-sources lands.
use clap::Args;

#[derive(Args, Debug)]
pub struct DemoArgs {}

pub async fn run(_args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("demo not yet available")
}
