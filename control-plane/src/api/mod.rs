//! What operators reach: the admin gRPC API (meshctl) with its scopes, and the plain-HTTP port
//! with metrics, probes and the dashboard.

pub mod admin;
pub mod dashboard;
pub mod web;
