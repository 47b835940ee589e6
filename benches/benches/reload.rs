//! `cargo bench -p bff-proxy-benches --bench reload [-- OPTIONS]`: hot reload (time to serve a
//! new plugin version, latency during a reload storm, startup with cached plugins). See
//! `benches/README.md`.

use std::process::ExitCode;

/// The allocator the shipped binary uses, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: bff_proxy::Allocator = bff_proxy::Allocator;

use bff_proxy_benches::reload::{ReloadOptions, USAGE, run};

fn main() -> ExitCode {
    // BENCH_LOG=debug shows the proxy's reload log lines.
    if let Ok(filter) = std::env::var("BENCH_LOG") {
        let _ = bff_proxy::telemetry::init(bff_proxy::telemetry::LogFormat::Text, &filter);
    }
    let opts = match ReloadOptions::parse(std::env::args().skip(1)) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(&opts, &mut std::io::stdout()) {
        Ok(report) => {
            println!("{}", report.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
