//! Smoke test of the security benchmark: every scenario in quick mode with the built-in
//! generator and no pinning. Asserts that each one measured requests, all answered 2xx with no
//! error (the run itself checks first that tokens are verified and that each new connection is
//! a TLS handshake); never a timing threshold.

use bff_proxy_benches::security::{PROXY_TOKEN_CACHE, Scenario, SecurityOptions, run};

#[test]
fn quick_security_benchmark() {
    let mut opts = SecurityOptions::parse(["--quick".to_owned(), "--no-pin".to_owned()])
        .expect("valid options")
        .expect("not --help");
    opts.json_out = None;
    let mut log = Vec::new();
    let result = run(&opts, &mut log);
    let log = String::from_utf8_lossy(&log);
    let report = result.unwrap_or_else(|e| panic!("the security benchmark fails: {e:#}\n{log}"));
    assert!(report.body_bytes >= 1024, "{log}");
    assert!(report.uncached_tokens > PROXY_TOKEN_CACHE, "{log}");
    for scenario in Scenario::ALL {
        let name = scenario.name();
        let t = report
            .get(scenario)
            .unwrap_or_else(|| panic!("{name} measured\n{log}"));
        assert!(t.median.requests > 0, "{name}: no requests\n{log}");
        assert_eq!(t.non_2xx, 0, "{name}: non-2xx responses\n{log}");
        assert_eq!(t.errors, 0, "{name}: errors\n{log}");
        // The generator reads every body: the proxy passed it through whole.
        assert_eq!(
            t.median.body_bytes,
            t.median.requests * report.body_bytes as u64,
            "{name}\n{log}"
        );
    }
    assert!(report.tls.starts_with("TLS 1.3"), "{}", report.tls);
    let text = report.render();
    assert!(text.contains("| https-new-conn |"), "{text}");
    assert!(text.contains("Every measured request got a 2xx"), "{text}");
}
