//! The web view never writes the NHS number into a URL or a log line: a launch, its session,
//! every page, the events, a replay and a refusal, with every log line of the process captured.
//! Its own test binary, because it installs the process's one `tracing` subscriber.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carerecord_adapters::Source;
use carerecord_e2e::view::start_view;
use carerecord_e2e::*;
use serde_json::json;

/// Everything `tracing` writes in this process.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn the_nhs_number_is_in_no_url_and_no_log_line() {
    let logs = Captured::default();
    // The whole process's subscriber (this binary holds this one test), at every level: a
    // scoped subscriber misses events whose call sites other tests' threads registered first.
    tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .init();

    let broker = start_broker(
        vec![
            (
                Arc::new(gp_source()) as Arc<dyn Source>,
                Duration::from_secs(5),
            ),
            (Arc::new(hospital_source()), Duration::from_secs(5)),
        ],
        Settings::default(),
    )
    .await;
    let view = start_view(broker.broker.clone(), |_| {}).await;
    let nhs = shared_patient().as_digits();
    let grouped = format!("{} {} {}", &nhs[..3], &nhs[3..6], &nhs[6..]);
    let url = view.launch_url(&nhs).await;
    let (cookie, opened) = view.open(&url).await;
    let cookie = cookie.expect("a session");
    let mut urls = vec![url.clone(), opened.header("location").to_owned()];
    for path in ["record", "record-events", "record-complete"] {
        let page = view.get(path, Some(&cookie)).await;
        assert_eq!(page.status, 200, "{path}");
        // Every address the pages link to, load or post to.
        for attribute in ["href=\"", "src=\"", "action=\"", "url="] {
            for piece in page.body.split(attribute).skip(1) {
                urls.push(piece.split(['"', '\\']).next().unwrap_or("").to_owned());
            }
        }
    }
    let replay = view.open(&url).await.1;
    assert_eq!(replay.status, 410);
    let refused = view
        .launch(&nhs, Some(&view.token_with(|c| c["role"] = json!("R9999"))))
        .await;
    assert_eq!(refused.status, 403);

    assert!(urls.len() > 5, "{urls:?}");
    for u in &urls {
        assert!(!u.contains(&nhs), "NHS number in {u}");
    }
    let written =
        String::from_utf8_lossy(&logs.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    assert!(
        written.contains("view launch issued") && written.contains("view session started"),
        "the view logged: {written}"
    );
    assert!(
        !written.contains(&nhs),
        "NHS number in the logs:\n{written}"
    );
    assert!(!written.contains(&grouped), "NHS number in the logs");
}
