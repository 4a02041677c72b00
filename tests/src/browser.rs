//! Headless Chromium (Debian's, installed by `scripts/install-test-deps.sh`) driven over the
//! Chrome DevTools Protocol: open a page, evaluate JavaScript in it, collect its console
//! errors and uncaught exceptions, take a screenshot.

use anyhow::Context;
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Time a CDP call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Browser {
    _child: Child,
    _profile: tempfile::TempDir,
    ws: Ws,
    next_id: u64,
    /// Console errors and exceptions seen so far.
    errors: Vec<String>,
}

impl Browser {
    /// Starts Chromium headless on a fresh profile, with no network beyond what pages ask for.
    pub async fn launch() -> anyhow::Result<Self> {
        let bin = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("chromium is not installed: run scripts/install-test-deps.sh as root")?;
        let profile = tempfile::tempdir()?;
        let mut child = Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let stderr = child.stderr.take().context("chromium stderr")?;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let browser_ws = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(l) = lines.next_line().await? {
                if let Some(url) = l.strip_prefix("DevTools listening on ") {
                    return anyhow::Ok(url.trim().to_string());
                }
            }
            anyhow::bail!("chromium exited before listening")
        })
        .await
        .context("chromium did not start in 30 s")??;
        // Keep draining stderr so Chromium never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let port = browser_ws
            .split(':')
            .nth(2)
            .and_then(|s| s.split('/').next())
            .context("devtools port")?;
        let devtools: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let targets = super::admin_get(devtools, "/json/list").await?.json;
        let page_ws = targets
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .context("no page target")?
            .to_string();
        let (ws, _) = tokio_tungstenite::connect_async(page_ws).await?;
        let mut b = Self {
            _child: child,
            _profile: profile,
            ws,
            next_id: 0,
            errors: Vec::new(),
        };
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            b.call(domain, json!({})).await?;
        }
        Ok(b)
    }

    fn note_event(&mut self, v: &Value) {
        match v["method"].as_str() {
            Some("Runtime.exceptionThrown") => self
                .errors
                .push(format!("exception: {}", v["params"]["exceptionDetails"])),
            Some("Runtime.consoleAPICalled") if v["params"]["type"] == "error" => self
                .errors
                .push(format!("console.error: {}", v["params"]["args"])),
            Some("Log.entryAdded") if v["params"]["entry"]["level"] == "error" => {
                self.errors.push(format!("log: {}", v["params"]["entry"]))
            }
            _ => {}
        }
    }

    /// Calls a CDP method and returns its result (events seen meanwhile are noted).
    pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::Text(msg.into())).await?;
        let reply = tokio::time::timeout(CALL_TIMEOUT, async {
            while let Some(m) = self.ws.next().await {
                let Message::Text(t) = m? else { continue };
                let v: Value = serde_json::from_str(&t)?;
                if v["id"] == id {
                    return anyhow::Ok(v);
                }
                self.note_event(&v);
            }
            anyhow::bail!("devtools connection closed")
        })
        .await
        .with_context(|| format!("{method} took over {CALL_TIMEOUT:?}"))??;
        if let Some(e) = reply.get("error") {
            anyhow::bail!("{method}: {e}");
        }
        Ok(reply["result"].clone())
    }

    pub async fn navigate(&mut self, url: &str) -> anyhow::Result<()> {
        self.call("Page.navigate", json!({"url": url})).await?;
        Ok(())
    }

    /// The value of a JavaScript expression in the page.
    pub async fn eval(&mut self, expr: &str) -> anyhow::Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            anyhow::bail!("{expr}: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expr` until `done` accepts its value (bounded by `timeout`); returns it.
    pub async fn wait_for(
        &mut self,
        expr: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.eval(expr).await?;
            if done(&v) {
                return Ok(v);
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("{expr} still {v} after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Console errors and uncaught exceptions so far.
    pub fn errors(&self) -> &[String] {
        &self.errors
    }

    /// Saves a PNG of the page.
    pub async fn screenshot(&mut self, path: &Path) -> anyhow::Result<()> {
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await?;
        let data = r["data"].as_str().context("screenshot data")?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }
}
