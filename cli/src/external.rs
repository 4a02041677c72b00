//! `meshctl external`: services outside the mesh that apps call through their sidecars
//! (`add api.payments.example --port 443 --tls`), and `meshctl egress`: whether anything else
//! outside may be reached.

use super::client::Admin;
use super::output::Table;
use anyhow::Context;
use clap::Subcommand;
use mesh_proto::v1 as pb;
use serde_json::json;
use std::path::PathBuf;

#[derive(Subcommand, Debug, Clone)]
pub enum ExternalCmd {
    /// Declare (or replace) a service outside the mesh. Apps call `http://<host>` through
    /// their sidecar; the sidecar connects to the host's port, originating TLS with --tls.
    Add {
        /// Its DNS name, as apps call it (e.g. api.payments.example).
        host: String,
        /// The port it listens on.
        #[arg(long)]
        port: u16,
        /// Originate TLS to it (verified against the system's roots, or --ca-cert).
        #[arg(long)]
        tls: bool,
        /// Roots that verify its certificate (PEM), instead of the system's.
        #[arg(long, requires = "tls")]
        ca_cert: Option<PathBuf>,
        /// The name sent in SNI and verified in its certificate (default: the host).
        #[arg(long, requires = "tls")]
        sni: Option<String>,
        /// A client certificate (PEM chain) the sidecar presents, with --client-key.
        #[arg(long, requires_all = ["tls", "client_key"])]
        client_cert: Option<PathBuf>,
        #[arg(long, requires = "client_cert")]
        client_key: Option<PathBuf>,
        /// Its addresses, ip:port (repeatable); default: the host as the control plane
        /// resolves it now.
        #[arg(long = "address")]
        addresses: Vec<String>,
    },
    /// Remove an external service (its route and policy go with it).
    Remove { host: String },
    /// External services.
    List,
}

fn read(p: &Option<PathBuf>) -> anyhow::Result<String> {
    match p {
        None => Ok(String::new()),
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        }
    }
}

fn info_json(x: &pb::ExternalInfo) -> serde_json::Value {
    json!({
        "host": x.host, "port": x.port, "tls": x.tls, "custom_ca": x.custom_ca, "sni": x.sni,
        "client_certificate": x.client_certificate, "addresses": x.addresses,
    })
}

pub async fn run(c: &mut Admin, cmd: ExternalCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        ExternalCmd::Add {
            host,
            port,
            tls,
            ca_cert,
            sni,
            client_cert,
            client_key,
            addresses,
        } => {
            let x = pb::External {
                host,
                port: u32::from(port),
                tls,
                ca_pem: read(&ca_cert)?,
                sni: sni.unwrap_or_default(),
                client_cert_pem: read(&client_cert)?,
                client_key_pem: read(&client_key)?,
                addresses,
            };
            let r = c
                .set_external(pb::SetExternalRequest { external: Some(x) })
                .await?
                .into_inner();
            if json {
                return crate::output::print_value(&info_json(&r));
            }
            println!(
                "external service {} set: {} at {}",
                r.host,
                if r.tls { "TLS" } else { "plaintext" },
                r.addresses.join(", ")
            );
        }
        ExternalCmd::Remove { host } => {
            c.remove_external(pb::RemoveExternalRequest { host: host.clone() })
                .await?;
            println!("external service {host} removed");
        }
        ExternalCmd::List => {
            let r = c
                .list_externals(pb::ListExternalsRequest {})
                .await?
                .into_inner();
            if json {
                let v: Vec<_> = r.externals.iter().map(info_json).collect();
                return crate::output::print_value(&serde_json::Value::Array(v));
            }
            let mut t = Table::new(&[
                "HOST",
                "PORT",
                "TLS",
                "CA",
                "SNI",
                "CLIENT-CERT",
                "ADDRESSES",
            ]);
            for x in r.externals {
                t.row(vec![
                    x.host,
                    x.port.to_string(),
                    if x.tls { "yes" } else { "no" }.into(),
                    if x.custom_ca {
                        "given"
                    } else if x.tls {
                        "system"
                    } else {
                        "-"
                    }
                    .into(),
                    x.sni,
                    if x.client_certificate { "yes" } else { "no" }.into(),
                    x.addresses.join(","),
                ]);
            }
            t.print();
        }
    }
    Ok(())
}

/// `meshctl egress <namespace> <mode>`.
pub async fn egress(c: &mut Admin, namespace: String, mode: String) -> anyhow::Result<()> {
    let r = c
        .set_egress_mode(pb::SetEgressModeRequest {
            namespace: namespace.clone(),
            mode: mode.clone(),
        })
        .await?
        .into_inner();
    println!(
        "egress of namespace {namespace} set to {mode} (revision {})",
        r.revision
    );
    Ok(())
}
