//! Compiles the mesh protos with protox (pure Rust), so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mesh = [
        "mesh/v1/discovery.proto",
        "mesh/v1/identity.proto",
        "mesh/v1/admin.proto",
        "mesh/v1/telemetry.proto",
        "mesh/v1/replicas.proto",
    ];
    let example = ["mesh/example/v1/echo.proto"];
    for f in mesh.iter().chain(&example) {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(mesh, ["."])?;
    // Policies, routes and authorization rules are stored by the control plane as JSON, so they derive serde
    // (fields default when absent, so stored values survive added fields).
    let mut b = tonic_prost_build::configure();
    for m in [
        "Policy",
        "Timeouts",
        "Retry",
        "CircuitBreaker",
        "Rate",
        "RateLimit",
        "LoadBalancer",
        "Fault",
        "Hedge",
        "AdaptiveConcurrency",
        "Route",
        "WeightedBackend",
        "RouteRule",
        "RouteMatch",
        "KeyMatch",
        "HeaderValue",
        "Redirect",
        "Mirror",
        "Authz",
        "AuthzRule",
    ] {
        // Matches the message and its nested oneofs.
        b = b
            .type_attribute(
                format!(".mesh.v1.{m}"),
                "#[derive(serde::Serialize, serde::Deserialize)]",
            )
            .type_attribute(
                format!(".mesh.v1.{m}"),
                "#[cfg_attr(feature = \"schema\", derive(schemars::JsonSchema))]",
            )
            .message_attribute(format!(".mesh.v1.{m}"), "#[serde(default)]")
            .enum_attribute(
                format!(".mesh.v1.{m}"),
                "#[serde(rename_all = \"snake_case\")]",
            );
    }
    // Added fields whose empty value the stored JSON and `-o json` leave out, as before.
    for f in [
        ".mesh.v1.WeightedBackend.service",
        ".mesh.v1.Mirror.service",
    ] {
        b = b.field_attribute(f, "#[serde(skip_serializing_if = \"String::is_empty\")]");
    }
    for f in [
        ".mesh.v1.Policy.hedge",
        ".mesh.v1.Policy.adaptive_concurrency",
        ".mesh.v1.RateLimit.global",
    ] {
        b = b.field_attribute(f, "#[serde(skip_serializing_if = \"Option::is_none\")]");
    }
    b = b.field_attribute(
        ".mesh.v1.RateLimit.global_per_caller",
        "#[serde(skip_serializing_if = \"std::ops::Not::not\")]",
    );
    // The mesh's own streams (a discovery and a telemetry stream per proxy, held open) start
    // with small codec buffers; the example app keeps tonic's defaults, as an app would.
    b.codec_path("crate::codec::SmallBuffers")
        .compile_fds(fds)?;
    tonic_prost_build::configure().compile_fds(protox::compile(example, ["."])?)?;
    Ok(())
}
