//! # bff-plugin-sdk
//!
//! The guest side of bff-proxy plugins. This crate owns the WIT contract in `wit/`; the proxy's
//! host bindings are generated from the same files, so host and plugins cannot drift apart.
//!
//! The Rust SDK itself (hook trait, export macro, JSON helpers, native test harness) arrives with
//! the plugin runtime (issue #3). Until then this crate publishes the contract and its version.

/// The WIT package this SDK implements (`bff:plugin@CONTRACT_VERSION`).
pub const CONTRACT_PACKAGE: &str = "bff:plugin";

/// The contract version. The host rejects plugins built against another major version.
pub const CONTRACT_VERSION: &str = "0.1.0";

/// The WIT source of the contract, for tools that want to show or check it.
pub const WIT: &str = include_str!("../wit/plugin.wit");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wit_parses_and_declares_this_version() {
        let mut resolve = wit_parser::Resolve::default();
        let (pkg, _) = resolve
            .push_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/wit"))
            .expect("the WIT contract parses");
        let name = &resolve.packages[pkg].name;
        assert_eq!(
            format!("{}:{}", name.namespace, name.name),
            CONTRACT_PACKAGE
        );
        assert_eq!(
            name.version.as_ref().map(ToString::to_string).as_deref(),
            Some(CONTRACT_VERSION)
        );
        assert!(WIT.contains(&format!("package {CONTRACT_PACKAGE}@{CONTRACT_VERSION};")));
    }
}
