//! `meshctl install` and `meshctl uninstall`: the whole Kubernetes install for this version,
//! printed for `kubectl apply -f -` (and `kubectl delete -f -`). The manifests in
//! `cli/manifests/` are the templates; values change them as objects, not as text (but for the
//! namespace, a checked DNS label put wherever `mesh-system` stands). The CA and the admin
//! token are made fresh, unless the operator brings the CA (`--ca-cert`/`--ca-key`) or keeps
//! the cluster's (`--no-secrets`, for an upgrade).

use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::path::PathBuf;

/// The templates, in the order they apply: the namespace first, the webhook last (it must not
/// call a control plane that does not exist yet for longer than need be). The CRDs are not
/// templates: they are generated from their Rust types (`mesh-crds`) and go after the
/// namespace.
const TEMPLATES: [&str; 4] = [
    include_str!("../manifests/00-namespace.yaml"),
    include_str!("../manifests/20-control-plane-rbac.yaml"),
    include_str!("../manifests/30-control-plane.yaml"),
    include_str!("../manifests/40-webhook.yaml"),
];

/// The namespace the templates are written for.
const TEMPLATE_NAMESPACE: &str = "mesh-system";

#[derive(clap::Args, Debug, Clone)]
pub struct InstallArgs {
    /// A value, `key=value` (several: repeat, or separate with commas). Keys: namespace,
    /// trustDomain, store (kubernetes, file, etcd://host:port,…), controlPlane.image,
    /// controlPlane.replicas, proxy.image, webhook.failurePolicy (Fail or Ignore).
    #[arg(long = "set", value_delimiter = ',')]
    pub set: Vec<String>,
    /// A values file: YAML with the same keys, nested (`controlPlane: {replicas: 3}`).
    /// `--set` wins over it.
    #[arg(short = 'f', long = "values")]
    pub values: Vec<PathBuf>,
    /// The operator's CA certificate (PEM) instead of a fresh one; with --ca-key.
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The key of --ca-cert (PEM).
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Leave the CA and admin-token Secrets out: for an upgrade of a running mesh, which keeps
    /// its own.
    #[arg(long, conflicts_with_all = ["ca_cert", "ca_key"])]
    pub no_secrets: bool,
}

/// What an install is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct Values {
    pub namespace: String,
    pub trust_domain: String,
    pub store: String,
    pub control_plane_image: String,
    pub replicas: u32,
    pub proxy_image: String,
    pub webhook_failure_policy: String,
}

impl Default for Values {
    fn default() -> Self {
        let v = env!("CARGO_PKG_VERSION");
        Self {
            namespace: TEMPLATE_NAMESPACE.into(),
            trust_domain: "mesh.local".into(),
            store: "kubernetes".into(),
            control_plane_image: format!("mesh-control-plane:{v}"),
            replicas: 2,
            proxy_image: format!("mesh-proxy:{v}"),
            webhook_failure_policy: "Fail".into(),
        }
    }
}

/// A DNS label (RFC 1123): what Kubernetes names and our trust domain's parts must be.
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl Values {
    /// Sets one value, checked.
    pub fn set(&mut self, key: &str, value: &str) -> anyhow::Result<()> {
        let bad = |why: &str| anyhow::anyhow!("{key}={value:?}: {why}");
        match key {
            "namespace" if dns_label(value) => self.namespace = value.into(),
            "namespace" => return Err(bad("not a namespace name (lowercase DNS label)")),
            "trustDomain" if !value.is_empty() && value.split('.').all(dns_label) => {
                self.trust_domain = value.into()
            }
            "trustDomain" => return Err(bad("not a trust domain (DNS labels with dots)")),
            "store"
                if value == "kubernetes"
                    || value == "file"
                    || value.starts_with("etcd://")
                    || value.starts_with("etcd+https://") =>
            {
                self.store = value.into()
            }
            "store" => return Err(bad("kubernetes, file, etcd://… or etcd+https://…")),
            "controlPlane.image" if !value.is_empty() => self.control_plane_image = value.into(),
            "proxy.image" if !value.is_empty() => self.proxy_image = value.into(),
            "controlPlane.image" | "proxy.image" => return Err(bad("an image is required")),
            "controlPlane.replicas" => {
                self.replicas = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=50).contains(n))
                    .ok_or_else(|| bad("a whole number from 1 to 50"))?
            }
            "webhook.failurePolicy" if value == "Fail" || value == "Ignore" => {
                self.webhook_failure_policy = value.into()
            }
            "webhook.failurePolicy" => return Err(bad("Fail or Ignore")),
            _ => bail!(
                "unknown value {key:?}: namespace, trustDomain, store, controlPlane.image, \
                 controlPlane.replicas, proxy.image, webhook.failurePolicy"
            ),
        }
        Ok(())
    }

    /// Sets every value of a values file (nested keys), checked.
    pub fn merge_file(&mut self, text: &str) -> anyhow::Result<()> {
        let doc: Value = serde_saphyr::from_str(text)?;
        let mut flat = Vec::new();
        flatten(&doc, String::new(), &mut flat)?;
        for (k, v) in flat {
            self.set(&k, &v)?;
        }
        Ok(())
    }

    /// Values that cannot go together.
    fn check(&self) -> anyhow::Result<()> {
        if self.store == "file" && self.replicas > 1 {
            bail!(
                "store=file keeps state in one replica's data directory: it serves one replica \
                 (set controlPlane.replicas=1, or store=kubernetes or etcd://… for more)"
            );
        }
        Ok(())
    }
}

fn flatten(v: &Value, prefix: String, out: &mut Vec<(String, String)>) -> anyhow::Result<()> {
    match v {
        Value::Null if prefix.is_empty() => Ok(()),
        Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(v, key, out)?;
            }
            Ok(())
        }
        Value::String(s) => {
            out.push((prefix, s.clone()));
            Ok(())
        }
        Value::Number(_) | Value::Bool(_) => {
            out.push((prefix, v.to_string()));
            Ok(())
        }
        _ => bail!("{prefix}: a value must be a string, number or map"),
    }
}

/// The Secrets' contents: the CA certificate and key, and the admin token.
pub struct Secrets {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub admin_token: String,
}

impl Secrets {
    /// A fresh P-256 root (ten years) and a 256-bit admin token.
    pub fn generate() -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::OrganizationName, "mesh");
        p.distinguished_name
            .push(DnType::CommonName, "mesh root CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(5);
        p.not_after = now + time::Duration::days(3650);
        let cert = p.self_signed(&key)?;
        Ok(Self {
            ca_cert_pem: cert.pem(),
            ca_key_pem: key.serialize_pem(),
            admin_token: token()?,
        })
    }

    /// The operator's CA, checked to be a CA certificate whose key is the one given.
    pub fn with_ca(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<Self> {
        let cert_pem = std::fs::read_to_string(cert)
            .with_context(|| format!("--ca-cert {}", cert.display()))?;
        let key_pem =
            std::fs::read_to_string(key).with_context(|| format!("--ca-key {}", key.display()))?;
        let pair = rcgen::KeyPair::from_pem(&key_pem)
            .map_err(|e| anyhow::anyhow!("--ca-key {}: not a private key: {e}", key.display()))?;
        match ca_check(&cert_pem, &pair) {
            Ok(()) => {}
            Err(why) => bail!("--ca-cert {}: {why}", cert.display()),
        }
        Ok(Self {
            ca_cert_pem: cert_pem,
            ca_key_pem: key_pem,
            admin_token: token()?,
        })
    }
}

/// Checks that `cert_pem` is a CA certificate whose public key is `key`'s.
fn ca_check(cert_pem: &str, key: &rcgen::KeyPair) -> Result<(), &'static str> {
    use rcgen::PublicKeyData;
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|_| "not a PEM certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|_| "not a certificate")?;
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|b| b.value.ca);
    if !is_ca {
        return Err("not a CA certificate (basicConstraints CA:TRUE)");
    }
    if cert.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        return Err("its public key is not that of --ca-key");
    }
    Ok(())
}

fn token() -> anyhow::Result<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("random token: {e}"))?;
    Ok(hex::encode(b))
}

/// Every object of the install for `values`, in apply order (Secrets after the namespace).
pub fn render(values: &Values, secrets: Option<&Secrets>) -> anyhow::Result<Vec<Value>> {
    values.check()?;
    let ns = values.namespace.as_str();
    let mut docs = Vec::new();
    for (i, t) in TEMPLATES.iter().enumerate() {
        let text = t.replace(TEMPLATE_NAMESPACE, ns);
        let parsed: Vec<Value> = serde_saphyr::from_multiple(&text)?;
        docs.extend(parsed.into_iter().filter(|d| !d.is_null()));
        if i == 0 {
            for crd in mesh_crds::all() {
                docs.push(serde_json::to_value(crd)?);
            }
        }
    }
    let single = values.replicas == 1;
    // One replica: no autoscaler, and no disruption budget that would block every drain.
    docs.retain(|d| {
        !(single && (d["kind"] == "HorizontalPodAutoscaler" || d["kind"] == "PodDisruptionBudget"))
    });
    for d in &mut docs {
        match d["kind"].as_str() {
            Some("Deployment") => deployment(d, values)?,
            Some("HorizontalPodAutoscaler") => {
                d["spec"]["minReplicas"] = values.replicas.into();
                d["spec"]["maxReplicas"] = values.replicas.max(5).into();
            }
            Some("MutatingWebhookConfiguration") => {
                for w in d["webhooks"].as_array_mut().into_iter().flatten() {
                    w["failurePolicy"] = values.webhook_failure_policy.clone().into();
                }
            }
            _ => {}
        }
    }
    if let Some(s) = secrets {
        let at = docs
            .iter()
            .position(|d| d["kind"] == "Namespace")
            .map_or(0, |i| i + 1);
        let label = json!({"app.kubernetes.io/part-of": "mesh"});
        let ca = json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": "mesh-ca", "namespace": ns, "labels": label},
            "stringData": {"tls.crt": s.ca_cert_pem, "tls.key": s.ca_key_pem}});
        let token = json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "mesh-admin-token", "namespace": ns, "labels": label},
            "stringData": {"token": s.admin_token}});
        docs.insert(at, token);
        docs.insert(at, ca);
    }
    Ok(docs)
}

/// The control plane's Deployment with `values`.
fn deployment(d: &mut Value, values: &Values) -> anyhow::Result<()> {
    d["spec"]["replicas"] = values.replicas.into();
    let c = d["spec"]["template"]["spec"]["containers"]
        .get_mut(0)
        .context("the control plane's container")?;
    c["image"] = values.control_plane_image.clone().into();
    let args = c["args"].as_array_mut().context("its args")?;
    let set = |args: &mut Vec<Value>, flag: &str, v: &str| {
        let prefix = format!("{flag}=");
        args.retain(|a| !a.as_str().is_some_and(|a| a.starts_with(&prefix)));
        args.push(format!("{flag}={v}").into());
    };
    set(args, "--store", &values.store);
    set(args, "--trust-domain", &values.trust_domain);
    set(args, "--proxy-image", &values.proxy_image);
    set(
        args,
        "--inject-control-plane",
        &format!("https://mesh-control-plane.{}.svc:15010", values.namespace),
    );
    Ok(())
}

/// The install as YAML documents for `kubectl apply -f -`.
pub fn install(args: &InstallArgs) -> anyhow::Result<String> {
    let values = values_of(args)?;
    let secrets = match (&args.ca_cert, &args.ca_key, args.no_secrets) {
        (_, _, true) => None,
        (Some(c), Some(k), _) => Some(Secrets::with_ca(c, k)?),
        _ => Some(Secrets::generate()?),
    };
    let docs = render(&values, secrets.as_ref())?;
    let mut out = format!(
        "# meshctl install {}: namespace {}, store {}, {} control-plane replica(s).\n\
         # Apply with: meshctl install | kubectl apply -f -\n",
        env!("CARGO_PKG_VERSION"),
        values.namespace,
        values.store,
        values.replicas
    );
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&d)?);
    }
    Ok(out)
}

/// What removes the install: every object it made, by kind and name, the namespace last, for
/// `kubectl delete -f -`.
pub fn uninstall(args: &InstallArgs) -> anyhow::Result<String> {
    let values = values_of(args)?;
    let placeholder = Secrets {
        ca_cert_pem: String::new(),
        ca_key_pem: String::new(),
        admin_token: String::new(),
    };
    let docs = render(&values, Some(&placeholder))?;
    let mut out = format!(
        "# meshctl uninstall {}: delete with: meshctl uninstall | kubectl delete -f -\n\
         # The trust-bundle ConfigMaps (mesh-ca-bundle) the control plane wrote in workload\n\
         # namespaces stay; injected pods keep their sidecar until they are recreated.\n",
        env!("CARGO_PKG_VERSION")
    );
    for d in docs.iter().rev() {
        let mut meta = json!({"name": d["metadata"]["name"]});
        if !d["metadata"]["namespace"].is_null() {
            meta["namespace"] = d["metadata"]["namespace"].clone();
        }
        let stub = json!({"apiVersion": d["apiVersion"], "kind": d["kind"], "metadata": meta});
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&stub)?);
    }
    Ok(out)
}

fn values_of(args: &InstallArgs) -> anyhow::Result<Values> {
    let mut values = Values::default();
    for f in &args.values {
        let text = std::fs::read_to_string(f).with_context(|| format!("-f {}", f.display()))?;
        values
            .merge_file(&text)
            .with_context(|| format!("-f {}", f.display()))?;
    }
    for kv in &args.set {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--set {kv:?}: expected key=value"))?;
        values.set(k.trim(), v.trim())?;
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_and_files_flatten() {
        let mut v = Values::default();
        v.merge_file("controlPlane:\n  replicas: 3\n  image: reg/cp:1\nstore: etcd://e:2379\n")
            .unwrap();
        assert_eq!(
            (v.replicas, v.control_plane_image.as_str()),
            (3, "reg/cp:1")
        );
        assert_eq!(v.store, "etcd://e:2379");
        for (k, bad) in [
            ("namespace", "Mesh_System"),
            ("controlPlane.replicas", "0"),
            ("store", "redis://x"),
            ("webhook.failurePolicy", "Maybe"),
            ("nosuch", "1"),
        ] {
            assert!(v.set(k, bad).is_err(), "{k}={bad}");
        }
        v.set("store", "file").unwrap();
        assert!(v.check().is_err(), "file store with 3 replicas");
    }
}
