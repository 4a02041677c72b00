//! Route matching: which rule of a service's route a request takes. The matcher and the rule
//! types live in `mesh-model`, beside the checks that build them, so the control plane and
//! the proxy read a route the same way.

pub use mesh_model::route::{
    KeyMatch, Match, Matches, MirrorConfig, PathMatch, Redirect, Router, Rule, ValueMatch,
};
