//! Serves the out-of-hours adapter over the source protocol, so a stock carerecord broker uses it
//! by configuration alone:
//!
//! ```text
//! out-of-hours-source --api http://ooh.example:8080 --listen 127.0.0.1:50062
//! ```
//!
//! ```toml
//! [[sources]]
//! id = "ooh"
//! organisation_code = "NLO01"
//! organisation_name = "Northside Out-of-Hours"
//! [sources.grpc]
//! url = "http://127.0.0.1:50062"
//! ```

use std::sync::Arc;

use carerecord_adapters::SourceInfo;
use carerecord_adapters::protocol_server::SourceServer;
use out_of_hours_source::OutOfHoursSource;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut api = "http://127.0.0.1:8080".to_owned();
    let mut listen = "127.0.0.1:50062".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--api", Some(value)) => api = value,
            ("--listen", Some(value)) => listen = value,
            _ => return Err("usage: out-of-hours-source [--api URL] [--listen ADDR]".into()),
        }
    }
    let info = SourceInfo {
        id: "ooh".into(),
        organisation_code: "NLO01".into(),
        organisation_name: "Northside Out-of-Hours".into(),
    };
    let source = OutOfHoursSource::new(info, &api)?;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!("serving carerecord.source.v1 on {}", listener.local_addr()?);
    SourceServer::new(Arc::new(source))
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
