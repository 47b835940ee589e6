//! Every shipped config file (`config/*.toml`) loads and validates. The files under
//! `config/invalid/` have their own test with expected messages.

use std::path::PathBuf;

#[test]
fn every_shipped_config_file_loads() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(
        files.iter().any(|p| p.ends_with("full.toml")),
        "config/full.toml is among {files:?}"
    );

    let failures: Vec<String> = files
        .iter()
        .filter_map(|path| bff_proxy::Config::load(path).err().map(|e| e.to_string()))
        .collect();
    assert!(
        failures.is_empty(),
        "config files that do not load:\n{}",
        failures.join("\n")
    );
}

#[test]
fn full_toml_documents_every_section() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/full.toml");
    let cfg = bff_proxy::Config::load(&path).expect("config/full.toml loads");
    // The reference file shows each kind of thing at least once.
    assert!(
        cfg.services.len() >= 2,
        "services: {:?}",
        cfg.services.keys()
    );
    assert!(
        cfg.services
            .values()
            .any(|s| s.protocol == bff_proxy::config::Protocol::Http2),
        "an http2 service"
    );
    assert!(
        cfg.services.values().any(|s| s.cache.is_some()),
        "a service with a response cache"
    );
    let rules: Vec<_> = cfg.clients.iter().flat_map(|c| &c.identify).collect();
    assert!(
        rules.iter().any(|r| r.equals.is_some()),
        "a header-equals rule"
    );
    assert!(
        rules.iter().any(|r| r.regex.is_some()),
        "a header-regex rule"
    );
    assert!(
        rules.iter().any(|r| r.user_agent.is_some()),
        "a user-agent rule"
    );
    assert!(
        rules.iter().any(|r| r.api_key_header.is_some()),
        "an API-key rule"
    );
    assert!(cfg.identity.default_client.is_some(), "a default client");
    assert!(cfg.routes.iter().any(|r| r.rewrite.is_some()), "a rewrite");
    assert!(
        cfg.routes.iter().any(|r| !r.clients.is_empty()),
        "a client-specific route"
    );
    assert!(
        cfg.routes.iter().any(|r| !r.methods.is_empty()),
        "a route with methods"
    );
}
