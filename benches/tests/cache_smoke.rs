//! Smoke test of the cache benchmark: every scenario and the collapse rounds in quick mode,
//! with no pinning. The run itself fails unless the cached scenarios are answered from memory
//! (`cache-status: bff-proxy; hit`, no upstream request during the measured load) and every
//! collapse round reaches the upstream exactly once; this asserts that it passed, that every
//! request got a 2xx with the whole body, and never a timing threshold.

use bff_proxy_benches::cache::{CacheOptions, HIT, Scenario, run};

#[test]
fn quick_cache_benchmark() {
    let mut opts = CacheOptions::parse(["--quick".to_owned(), "--no-pin".to_owned()])
        .expect("valid options")
        .expect("not --help");
    opts.json_out = None;
    let mut log = Vec::new();
    let result = run(&opts, &mut log);
    let log = String::from_utf8_lossy(&log);
    let report = result.unwrap_or_else(|e| panic!("the cache benchmark fails: {e:#}\n{log}"));
    assert!(report.body_bytes >= 1024, "{log}");
    assert!(report.hit_status.starts_with(HIT), "{}", report.hit_status);
    for scenario in Scenario::ALL {
        let name = scenario.name();
        let s = report
            .get(scenario)
            .unwrap_or_else(|| panic!("{name} measured\n{log}"));
        let t = &s.result;
        assert!(t.median.requests > 0, "{name}: no requests\n{log}");
        assert_eq!(t.non_2xx, 0, "{name}: non-2xx responses\n{log}");
        assert_eq!(t.errors, 0, "{name}: errors\n{log}");
        assert_eq!(
            t.median.body_bytes,
            t.median.requests * report.body_bytes as u64,
            "{name}: whole bodies\n{log}"
        );
        if scenario.cached() {
            assert_eq!(s.upstream_requests, 0, "{name}\n{log}");
        } else {
            assert!(s.upstream_requests >= s.requests, "{name}\n{log}");
        }
    }
    let c = &report.collapse;
    assert_eq!(c.rounds.len(), opts.collapse_rounds, "{log}");
    assert_eq!(c.upstream_range(), (1, 1), "{log}");
    for r in &c.rounds {
        assert_eq!(
            r.misses + r.collapsed + r.hits,
            opts.collapse,
            "{r:?}\n{log}"
        );
        assert_eq!(r.misses, 1, "{r:?}\n{log}");
    }
    let text = report.render();
    assert!(text.contains("| slow-upstream-cached |"), "{text}");
    assert!(text.contains("Every measured request got a 2xx"), "{text}");
}
