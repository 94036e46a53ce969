//! A real headless Chromium (Debian's `chromium`), driven over its DevTools protocol: a small
//! client of our own on one WebSocket, enough for the view's tests — open a page at a width,
//! with or without scripts, read the DOM, evaluate an expression, wait for a condition, take a
//! screenshot, read the tab's history.
//!
//! Chromium is started as the machine's probe found it must be here: headless, no sandbox (root
//! in CI), no GPU, and none of its background networking (this machine's network is closed).
//! Each test starts its own browser, with its own empty profile, and kills it when done; at
//! most two run at once (two cores).
//!
//! When no Chromium is installed, [`Browser::launch`] returns `None` and the test says so
//! loudly; `.ci/run` installs it, so CI never skips.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::io::BufRead;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// How long one DevTools command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;
type Outgoing = tokio::sync::mpsc::UnboundedSender<Message>;

/// A running Chromium.
pub struct Browser {
    child: std::process::Child,
    outgoing: Outgoing,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    profile: PathBuf,
    _permit: OwnedSemaphorePermit,
}

/// One tab, attached in flat mode (commands carry its session id).
pub struct Tab {
    session: String,
    outgoing: Outgoing,
    pending: Pending,
    next_id: Arc<AtomicU64>,
}

/// The Chromium binary: `$CHROMIUM`, else Debian's.
pub fn chromium_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn browsers_at_once() -> Arc<Semaphore> {
    static SLOTS: std::sync::OnceLock<Arc<Semaphore>> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| Arc::new(Semaphore::new(2))).clone()
}

/// Says loudly that a browser test did not run, and why — or fails it, when CI has installed
/// Chromium and set `CARERECORD_REQUIRE_CHROMIUM` (`.ci/packages`).
pub fn skip(test: &str, why: &str) {
    assert!(
        std::env::var_os("CARERECORD_REQUIRE_CHROMIUM").is_none(),
        "{test} could not run although CARERECORD_REQUIRE_CHROMIUM is set: {why}"
    );
    eprintln!(
        "\n################################################################\n\
         SKIPPED {test}: {why}\n\
         CI installs what these tests need (.ci/packages: Debian's chromium; the test: npm's axe-core).\n\
         ################################################################\n"
    );
}

impl Browser {
    /// Starts Chromium; `None` when it is not installed.
    pub async fn launch() -> Option<Browser> {
        let binary = chromium_path()?;
        let permit = browsers_at_once().acquire_owned().await.ok()?;
        let profile = crate::temp_path("chromium-profile");
        let _ = std::fs::create_dir_all(&profile);
        // std's process (tokio's `process` feature would rebuild the workspace's tokio).
        let mut child = std::process::Command::new(&binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        let stderr = child.stderr.take().expect("chromium's stderr");
        let (found, address) = oneshot::channel::<String>();
        // Reads Chromium's stderr for its DevTools address, then keeps reading so Chromium
        // never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut found = Some(found);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find("ws://")
                    && let Some(found) = found.take()
                {
                    let _ = found.send(line[at..].trim().to_owned());
                }
            }
        });
        let ws_url = tokio::time::timeout(Duration::from_secs(60), address)
            .await
            .ok()
            .and_then(Result::ok)
            .expect("chromium prints its DevTools address");

        let (socket, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .expect("connect to DevTools");
        let (mut sink, mut stream) = socket.split();
        let (outgoing, mut queue) = tokio::sync::mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(message) = queue.recv().await {
                if sink.send(message).await.is_err() {
                    return;
                }
            }
        });
        let pending: Pending = Arc::default();
        let answers = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let Ok(value) = serde_json::from_str::<Value>(text.as_str()) else {
                    continue;
                };
                let Some(id) = value["id"].as_u64() else {
                    continue; // an event: not needed
                };
                let waiter = answers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                if let Some(waiter) = waiter {
                    let answer = if value["error"].is_null() {
                        Ok(value["result"].clone())
                    } else {
                        Err(value["error"].to_string())
                    };
                    let _ = waiter.send(answer);
                }
            }
        });
        Some(Browser {
            child,
            outgoing,
            pending,
            next_id: Arc::new(AtomicU64::new(1)),
            profile,
            _permit: permit,
        })
    }

    async fn call(&self, method: &str, params: Value) -> Result<Value, String> {
        send(
            &self.outgoing,
            &self.pending,
            &self.next_id,
            None,
            method,
            params,
        )
        .await
    }

    /// A new tab `width` × `height` CSS pixels (a phone when `mobile`), with scripts on or off.
    pub async fn tab(&self, width: u32, height: u32, mobile: bool, scripts: bool) -> Tab {
        let target = self
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await
            .expect("a tab");
        let attached = self
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await
            .expect("attached");
        let tab = Tab {
            session: attached["sessionId"]
                .as_str()
                .expect("a session id")
                .to_owned(),
            outgoing: self.outgoing.clone(),
            pending: self.pending.clone(),
            next_id: self.next_id.clone(),
        };
        tab.call("Page.enable", json!({})).await.expect("Page");
        tab.call("Runtime.enable", json!({}))
            .await
            .expect("Runtime");
        tab.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await
        .expect("metrics");
        if !scripts {
            tab.call(
                "Emulation.setScriptExecutionDisabled",
                json!({"value": true}),
            )
            .await
            .expect("scripts off");
        }
        tab
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

async fn send(
    outgoing: &Outgoing,
    pending: &Pending,
    next_id: &AtomicU64,
    session: Option<&str>,
    method: &str,
    params: Value,
) -> Result<Value, String> {
    let id = next_id.fetch_add(1, Ordering::Relaxed);
    let mut message = json!({"id": id, "method": method, "params": params});
    if let Some(session) = session {
        message["sessionId"] = json!(session);
    }
    let (tx, rx) = oneshot::channel();
    pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, tx);
    outgoing
        .send(Message::text(message.to_string()))
        .map_err(|_| "the DevTools connection is closed".to_owned())?;
    match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Err(format!("{method}: no answer (connection closed)")),
        Err(_) => Err(format!("{method}: no answer in {COMMAND_TIMEOUT:?}")),
    }
}

impl Tab {
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, String> {
        send(
            &self.outgoing,
            &self.pending,
            &self.next_id,
            Some(&self.session),
            method,
            params,
        )
        .await
    }

    /// Navigates, and waits until the document has loaded (its stream may still be open).
    pub async fn goto(&self, url: &str) {
        let answer = self
            .call("Page.navigate", json!({"url": url}))
            .await
            .expect("navigate");
        assert!(
            answer["errorText"].is_null(),
            "navigation to {url} failed: {answer}"
        );
        self.wait_for_dom(|html| html.contains("</footer>"), "the page to load")
            .await;
    }

    /// The whole document as HTML, read through the DOM domain (works with scripts off).
    pub async fn html(&self) -> String {
        let document = self
            .call("DOM.getDocument", json!({"depth": 0}))
            .await
            .expect("the document");
        self.call(
            "DOM.getOuterHTML",
            json!({"nodeId": document["root"]["nodeId"]}),
        )
        .await
        .map(|v| v["outerHTML"].as_str().unwrap_or("").to_owned())
        .unwrap_or_default()
    }

    /// Polls the DOM until `ready` holds (at most a minute: a generous bound, not a timing
    /// assertion).
    pub async fn wait_for_dom(&self, ready: impl Fn(&str) -> bool, what: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let html = self.html().await;
            if ready(&html) {
                return html;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited a minute for {what}; the page is:\n{html}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Evaluates `expression` in the page (promises awaited), by value.
    pub async fn eval(&self, expression: &str) -> Value {
        let answer = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await
            .expect("evaluate");
        assert!(
            answer["exceptionDetails"].is_null(),
            "{expression} threw: {}",
            answer["exceptionDetails"]
        );
        answer["result"]["value"].clone()
    }

    /// Presses a key (`Tab`, `Enter`) as a keyboard would.
    pub async fn press(&self, key: &str, code: u32) {
        for kind in ["rawKeyDown", "keyUp"] {
            let mut event =
                json!({"type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code});
            if key == "Enter" && kind == "rawKeyDown" {
                event["type"] = json!("keyDown");
                event["text"] = json!("\r");
            }
            self.call("Input.dispatchKeyEvent", event)
                .await
                .expect("a key press");
        }
    }

    /// The tab's history, oldest first (what the browser remembers of where it has been).
    pub async fn history(&self) -> Vec<(String, String)> {
        let history = self
            .call("Page.getNavigationHistory", json!({}))
            .await
            .expect("history");
        history["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                (
                    e["url"].as_str().unwrap_or("").to_owned(),
                    e["title"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    /// A PNG of the page from its top, at most `max_height` CSS pixels tall, written to `path`.
    pub async fn screenshot(&self, path: &Path, max_height: f64) {
        let metrics = self
            .call("Page.getLayoutMetrics", json!({}))
            .await
            .expect("layout metrics");
        let size = &metrics["cssContentSize"];
        let width = size["width"].as_f64().unwrap_or(1000.0);
        let height = size["height"].as_f64().unwrap_or(1000.0).min(max_height);
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({
                    "format": "png",
                    "captureBeyondViewport": true,
                    "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
                }),
            )
            .await
            .expect("a screenshot");
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap_or(""))
            .expect("base64 PNG");
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(path, png).expect("write the screenshot");
    }
}

/// Where the browser tests write their artifacts: `target/view-artifacts/`.
pub fn artifacts_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("view-artifacts");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// axe-core's `axe.min.js`: `$AXE_CORE_JS`, or npm's `axe-core` installed under
/// `target/view-tools/` (once per run, at test time; not committed). `None` if npm cannot
/// install it.
pub fn axe_core() -> Option<String> {
    static AXE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    AXE.get_or_init(|| {
        if let Some(path) = std::env::var_os("AXE_CORE_JS") {
            return std::fs::read_to_string(path).ok();
        }
        let tools = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("view-tools");
        let script = tools.join("node_modules/axe-core/axe.min.js");
        if !script.exists() {
            let _ = std::fs::create_dir_all(&tools);
            let installed = std::process::Command::new("npm")
                .args([
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--no-save",
                    "--prefix",
                ])
                .arg(&tools)
                .arg("axe-core@4")
                .stdout(Stdio::null())
                .status();
            if !installed.is_ok_and(|s| s.success()) {
                return None;
            }
        }
        std::fs::read_to_string(script).ok()
    })
    .clone()
}
