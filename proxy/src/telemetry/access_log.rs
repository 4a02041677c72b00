//! Access log, opt-in per proxy (`--access-log stderr|PATH`): one JSON line per request. Lines
//! go through a bounded queue to one writer task, so a slow disk never slows a request: when
//! the queue is full the line is dropped and counted (`mesh_telemetry_dropped_total`).

use super::Detail;
use super::metrics::{Outcome, metrics};
use crate::http::errors::REASONS;
use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

/// Lines waiting for the writer; past this they are dropped.
pub const QUEUE_LINES: usize = 8192;

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stderr,
    File(std::path::PathBuf),
}

impl Target {
    pub fn parse(s: &str) -> Self {
        match s {
            "stderr" | "-" => Target::Stderr,
            p => Target::File(p.into()),
        }
    }
}

type Entry = (Box<Detail>, Outcome);

static QUEUE: OnceLock<mpsc::Sender<Entry>> = OnceLock::new();
/// Query strings are replaced by `?redacted` in lines (`--access-log-redact-query`): they
/// carry tokens and personal data as often as paths do not.
static REDACT_QUERY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `path` as a line shows it.
fn shown_path(path: &str) -> std::borrow::Cow<'_, str> {
    match path.split_once('?') {
        Some((p, _)) if REDACT_QUERY.load(Ordering::Relaxed) => format!("{p}?redacted").into(),
        _ => path.into(),
    }
}

/// True once `start` ran: requests then carry the detail a line needs.
pub fn enabled() -> bool {
    QUEUE.get().is_some()
}

/// Opens the target and starts the writer (once per process).
pub fn start(target: &Target, redact_query: bool) -> std::io::Result<()> {
    REDACT_QUERY.store(redact_query, Ordering::Relaxed);
    let mut out: Box<dyn Write + Send> = match target {
        Target::Stderr => Box::new(std::io::stderr()),
        Target::File(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
    };
    let (tx, mut rx) = mpsc::channel::<Entry>(QUEUE_LINES);
    if QUEUE.set(tx).is_err() {
        return Ok(());
    }
    // Formatting and writing block: on their own thread, in batches, flushed when the queue
    // is empty.
    std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || {
            while let Some((d, o)) = rx.blocking_recv() {
                let mut ok = writeln!(out, "{}", line(&d, &o)).is_ok();
                while let Ok((d, o)) = rx.try_recv() {
                    ok &= writeln!(out, "{}", line(&d, &o)).is_ok();
                }
                if !(ok && out.flush().is_ok()) {
                    eprintln!("access log: write failed");
                }
            }
        })?;
    Ok(())
}

/// The JSON line of one request.
pub fn line(d: &Detail, o: &Outcome) -> String {
    let time = time::OffsetDateTime::from(d.start)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    serde_json::json!({
        "time": time,
        "direction": d.direction.as_str(),
        "method": d.method.as_str(),
        "authority": d.authority,
        "path": shown_path(&d.path),
        "status": o.status,
        "grpc_status": o.grpc.filter(|g| *g != u16::MAX),
        "duration_ms": o.latency.as_secs_f64() * 1000.0,
        "bytes": o.response_bytes,
        "service": &*d.service,
        "route": &*d.route,
        "upstream": d.upstream.map(|a| a.to_string()),
        "backend_version": d.version.as_deref(),
        "identity": &*d.peer,
        "trace_id": d.trace_id.as_deref(),
        "error": o.error.map(|i| REASONS.get(i).copied().unwrap_or("other")),
    })
    .to_string()
}

/// Queues the line of one request (dropped and counted if the queue is full).
pub fn log(d: Box<Detail>, o: Outcome) {
    if let Some(q) = QUEUE.get()
        && q.try_send((d, o)).is_err()
    {
        metrics().access_log_dropped.fetch_add(1, Ordering::Relaxed);
    }
}
