//! `meshctl inject -f`: injects every pod template of a multi-document YAML manifest (Pods,
//! Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs, and `List`s of them);
//! other documents pass through unchanged.

use super::{InjectConfig, InjectError, Outcome, inject_pod};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not valid YAML: {0}")]
    Yaml(String),
    #[error("document {doc} ({kind} {name}): {err}")]
    Inject {
        doc: usize,
        kind: String,
        name: String,
        err: InjectError,
    },
}

/// What happened to each workload, for the summary on stderr.
#[derive(Debug, Default)]
pub struct Report {
    /// "Kind/name: injected" or "Kind/name: skipped (why)".
    pub lines: Vec<String>,
}

/// Where a kind keeps its pod template, as a JSON pointer.
fn template_path(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// Injects into the manifest text; returns the new YAML and a report.
pub fn inject_manifest(yaml: &str, cfg: &InjectConfig) -> Result<(String, Report), ManifestError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| ManifestError::Yaml(e.to_string()))?;
    let mut report = Report::default();
    let mut out = Vec::with_capacity(docs.len());
    for (i, mut doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        inject_object(&mut doc, i + 1, cfg, &mut report)?;
        out.push(serde_saphyr::to_string(&doc).map_err(|e| ManifestError::Yaml(e.to_string()))?);
    }
    Ok((out.join("---\n"), report))
}

fn inject_object(
    obj: &mut Value,
    doc: usize,
    cfg: &InjectConfig,
    report: &mut Report,
) -> Result<(), ManifestError> {
    let kind = obj["kind"].as_str().unwrap_or("").to_string();
    if kind == "List" {
        if let Some(items) = obj["items"].as_array_mut() {
            for item in items {
                inject_object(item, doc, cfg, report)?;
            }
        }
        return Ok(());
    }
    let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
    let Some(path) = template_path(&kind) else {
        return Ok(());
    };
    let Some(template) = obj.pointer_mut(path) else {
        return Ok(());
    };
    match inject_pod(template, cfg) {
        Ok(Outcome::Injected(new)) => {
            *template = new;
            report.lines.push(format!("{kind}/{name}: injected"));
        }
        Ok(Outcome::Skipped(why)) => report.lines.push(format!("{kind}/{name}: skipped ({why})")),
        Err(err) => {
            return Err(ManifestError::Inject {
                doc,
                kind,
                name,
                err,
            });
        }
    }
    Ok(())
}
