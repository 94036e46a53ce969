//! A directory's organisations share one HTTP client: thousands of organisations behind one
//! host reuse its connections instead of each opening (and keeping) its own.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use carerecord_adapters::{NhsNumber, SectionSet, SourceReply, SourceRequest};
use carerecord_broker::config::Config;
use carerecord_broker::registry;
use carerecord_proto::Requester;

/// A loopback listener that counts the TCP connections it accepts.
struct Counting {
    inner: tokio::net::TcpListener,
    accepted: Arc<AtomicUsize>,
}

impl axum::serve::Listener for Counting {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if let Ok((stream, addr)) = self.inner.accept().await {
                self.accepted.fetch_add(1, Ordering::SeqCst);
                return (stream, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

#[tokio::test]
async fn directory_organisations_on_one_host_share_its_connections() {
    carerecord_adapters::http::install_default_crypto_provider();
    let accepted = Arc::new(AtomicUsize::new(0));
    let inner = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = inner.local_addr().expect("addr");
    // Every organisation's FHIR endpoint: knows nobody.
    let app = axum::Router::new().fallback(|| async {
        (
            [("content-type", "application/fhir+json")],
            r#"{"resourceType":"Bundle","type":"searchset","total":0,"entry":[]}"#,
        )
    });
    let listener = Counting {
        inner,
        accepted: accepted.clone(),
    };
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = std::env::temp_dir().join(format!("carerecord-directory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let csv = dir.join("organisations.csv");
    std::fs::write(
        &csv,
        "organisation_code,organisation_name,kind,base_url\nA81001,One Practice,gp_practice,\nA81002,Two Practice,gp_practice,\nA81003,Three Practice,gp_practice,\n",
    )
    .expect("csv");
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nplaintext = true\n[directory]\nfile = \"{}\"\nendpoint_template = \"http://{addr}/{{code}}/R4\"\n",
        csv.display()
    );
    let config = Config::parse(&toml, Path::new("directory.toml")).expect("config");
    let set = registry::build(&config, 1).expect("sources");
    assert_eq!(set.sources.len(), 3);

    let nhs: NhsNumber = "9434765919".parse().expect("nhs");
    for configured in &set.sources {
        let request = SourceRequest {
            request_id: "shared-client".into(),
            nhs_number: nhs,
            sections: SectionSet::ALL,
            deadline: tokio::time::Instant::now() + Duration::from_secs(5),
            requester: Requester {
                user_id: "t".into(),
                role_code: "R8000".into(),
                organisation_code: "A81001".into(),
                ..Requester::default()
            },
            via_brokers: Vec::new(),
        };
        let reply = configured
            .source
            .fetch(&request)
            .await
            .expect("the organisation answers");
        assert!(matches!(reply, SourceReply::NotFound), "knows nobody");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "three organisations on one host, one connection between them"
    );
}
