//! `meshctl inject -f` (and `--uninject`): injects (or un-injects) every pod template of a multi-document YAML manifest (Pods,
//! Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs, and `List`s of them);
//! other documents pass through unchanged.

use super::{InjectConfig, InjectError, Outcome, inject_pod, uninject_pod};
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
    rewrite_manifest(yaml, &|pod| inject_pod(pod, cfg), "injected")
}

/// Undoes `inject_manifest` (`meshctl inject --uninject`).
pub fn uninject_manifest(yaml: &str) -> Result<(String, Report), ManifestError> {
    rewrite_manifest(yaml, &uninject_pod, "uninjected")
}

type PodEdit<'a> = dyn Fn(&Value) -> Result<Outcome, InjectError> + 'a;

fn rewrite_manifest(
    yaml: &str,
    edit: &PodEdit<'_>,
    done: &str,
) -> Result<(String, Report), ManifestError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| ManifestError::Yaml(e.to_string()))?;
    let mut report = Report::default();
    let mut out = Vec::with_capacity(docs.len());
    for (i, mut doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        edit_object(&mut doc, i + 1, edit, done, &mut report)?;
        out.push(serde_saphyr::to_string(&doc).map_err(|e| ManifestError::Yaml(e.to_string()))?);
    }
    Ok((out.join("---\n"), report))
}

fn edit_object(
    obj: &mut Value,
    doc: usize,
    edit: &PodEdit<'_>,
    done: &str,
    report: &mut Report,
) -> Result<(), ManifestError> {
    let kind = obj["kind"].as_str().unwrap_or("").to_string();
    if kind == "List" {
        if let Some(items) = obj["items"].as_array_mut() {
            for item in items {
                edit_object(item, doc, edit, done, report)?;
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
    match edit(template) {
        Ok(Outcome::Injected(new)) => {
            *template = new;
            report.lines.push(format!("{kind}/{name}: {done}"));
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
