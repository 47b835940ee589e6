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
