//! Services outside the mesh, as the admin API declares them: what `meshctl external`
//! shows, and the DNS lookups of hosts declared without addresses (when declared, then every
//! [`RESOLVE_INTERVAL`] on the leader).

use crate::state::registry::Registry;
use mesh_proto::v1 as pb;
use std::sync::Arc;

/// What `meshctl external` shows of an external service (no key material).
pub(crate) fn external_info(
    host: &str,
    x: &crate::state::records::ExternalRecord,
) -> pb::ExternalInfo {
    pb::ExternalInfo {
        host: host.to_string(),
        port: u32::from(x.port),
        tls: x.tls,
        custom_ca: !x.ca_pem.is_empty(),
        sni: x.sni.clone(),
        client_certificate: !x.client_cert_pem.is_empty(),
        addresses: x.addresses.clone(),
    }
}

/// How often the leader resolves again the hosts of externals declared without addresses.
pub const RESOLVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Resolves, every [`RESOLVE_INTERVAL`] on the leader, the hosts of externals declared
/// without addresses, and writes the ones whose addresses changed (a failed lookup keeps the
/// last ones). Runs until the process ends.
pub async fn refresh_externals(
    registry: Arc<Registry>,
    leader: crate::replicas::leader::Leadership,
) {
    let mut tick = tokio::time::interval(RESOLVE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if !leader.is_leader() {
            continue;
        }
        let due: Vec<(String, crate::state::records::ExternalRecord)> = registry
            .state()
            .services
            .iter()
            .filter_map(|(k, s)| s.external.clone().map(|x| (k.clone(), x)))
            .filter(|(_, x)| x.resolved)
            .collect();
        for (host, mut x) in due {
            match resolve(&host, x.port).await {
                Ok(now) if now != x.addresses => {
                    tracing::info!(%host, before = ?x.addresses, after = ?now, "external's addresses changed");
                    x.addresses = now;
                    if let Err(e) = registry.set_external(&host, x).await {
                        tracing::warn!(%host, error = %e, "cannot update an external's addresses");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(%host, error = %e, "external not resolved; its last addresses stay")
                }
            }
        }
    }
}

/// The addresses of `host` (DNS, as the control plane's host resolves it), for an external
/// service declared without any (here, or by a MeshExternal object).
pub(crate) async fn resolve(host: &str, port: u16) -> Result<Vec<String>, String> {
    let found = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::lookup_host((host, port)),
    )
    .await
    .map_err(|_| format!("resolving {host:?} timed out; give its addresses"))?
    .map_err(|e| format!("cannot resolve {host:?} ({e}); give its addresses"))?;
    let mut out: Vec<String> = found.map(|a| a.to_string()).collect();
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err(format!(
            "{host:?} resolves to no address; give its addresses"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hosts_resolve_to_addresses_or_say_why_not() {
        let a = resolve("localhost", 8443).await.unwrap();
        assert!(a.iter().any(|a| a == "127.0.0.1:8443"), "{a:?}");
        let e = resolve("no-such-host.invalid", 443).await.unwrap_err();
        assert!(e.contains("give its addresses"), "{e}");
    }
}
