//! Smoke test: the whole benchmark in quick mode with the built-in generator and no nginx, so
//! it needs nothing from apt. Asserts that every request succeeded and that something was
//! measured; never a timing threshold.

use std::time::Duration;

use bff_proxy_benches::report::{BFF, DIRECT};
use bff_proxy_benches::{GeneratorChoice, Options};

#[test]
fn quick_run_direct_and_through_bff_proxy() {
    let opts = Options {
        duration: Duration::from_millis(800),
        warmup: Duration::from_millis(100),
        connections: 4,
        rounds: 1,
        nginx: false,
        pin: false,
        generator: GeneratorChoice::Builtin,
        json_out: None,
        ..Options::quick()
    };
    let mut log = Vec::new();
    let report = bff_proxy_benches::run(&opts, &mut log).expect("the benchmark runs");
    let log = String::from_utf8_lossy(&log);
    assert_eq!(report.sizes.len(), 2, "{log}");
    for size in &report.sizes {
        assert!(size.body_bytes >= 1024, "{log}");
        for target in [DIRECT, BFF] {
            let t = size
                .get(target)
                .unwrap_or_else(|| panic!("{target} measured at {}\n{log}", size.label));
            assert_eq!(t.non_2xx, 0, "{target} {}: non-2xx\n{log}", size.label);
            assert_eq!(t.errors, 0, "{target} {}: errors\n{log}", size.label);
            assert!(t.median.requests > 0, "{target} {}\n{log}", size.label);
            assert!(t.median.rps > 0.0, "{target} {}\n{log}", size.label);
            // The built-in generator reads every body: the proxy passed it through whole.
            assert_eq!(
                t.median.body_bytes,
                t.median.requests * size.body_bytes as u64,
                "{target} {}\n{log}",
                size.label
            );
        }
        assert!(size.ratio(BFF).is_some_and(|r| r > 0.0), "{log}");
    }
    let text = report.render();
    assert!(text.contains("| bff-proxy |"), "{text}");
}

/// The plugin benchmark in quick mode (built-in generator): every part runs, every request
/// succeeds, the Wasm hop gives the native transform's output (checked inside), never a timing
/// threshold.
#[test]
fn quick_plugin_benchmark() {
    use bff_proxy_benches::plugins::{PluginOptions, run};
    let mut opts = PluginOptions::parse(["--quick".to_owned(), "--builtin".to_owned()])
        .expect("valid options")
        .expect("not --help");
    opts.json_out = None;
    let mut log = Vec::new();
    let report = run(&opts, &mut log).expect("the plugin benchmark runs");
    let log = String::from_utf8_lossy(&log);
    assert_eq!(report.hops.len(), 3, "{log}");
    for h in &report.hops {
        assert!(h.out_bytes < h.body_bytes, "fields trims: {h:?}");
        assert!(
            h.native.ops_per_sec > 0.0 && h.wasm.ops_per_sec > 0.0 && h.reused.ops_per_sec > 0.0,
            "{h:?}"
        );
    }
    let chain = report.chain.as_ref().expect("chain measured");
    for m in [&chain.passthrough, &chain.chain, &chain.chain_reused] {
        assert!(m.requests > 0 && m.non_2xx == 0 && m.errors == 0, "{m:?}");
    }
    assert!(chain.chain_out_bytes > 0 && chain.chain_out_bytes < chain.body_bytes as u64);
    let agg = report.aggregate.as_ref().expect("aggregate measured");
    for m in [&agg.sequential, &agg.concurrent] {
        assert!(m.requests > 0 && m.non_2xx == 0 && m.errors == 0, "{m:?}");
    }
    let rendered = report.render();
    assert!(rendered.contains("Wasm / native"), "{rendered}");
    assert!(
        rendered.contains("aggregate over three services"),
        "{rendered}"
    );
}

/// The reload benchmark in quick mode (built-in generator): every part runs, new versions go
/// live, no request fails during the reload storm (checked inside), never a timing threshold.
#[test]
fn quick_reload_benchmark() {
    use bff_proxy_benches::reload::{ReloadOptions, run};
    let mut opts = ReloadOptions::parse(["--quick".to_owned(), "--builtin".to_owned()])
        .expect("valid options")
        .expect("not --help");
    opts.json_out = None;
    let mut log = Vec::new();
    let report = run(&opts, &mut log).unwrap_or_else(|e| {
        panic!(
            "the reload benchmark fails: {e:#}\n{}",
            String::from_utf8_lossy(&log)
        )
    });
    assert_eq!(report.restarts, 2);
    assert!(report.swap_new.max_ms > 0.0);
    assert!(report.steady.requests > 0 && report.storm.requests > 0);
    assert!(
        report.storm_reloads > 0,
        "versions were shipped during the storm"
    );
    let text = report.render();
    assert!(text.contains("## Hot reload"), "{text}");
}
