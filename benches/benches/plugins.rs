//! `cargo bench -p bff-proxy-benches --bench plugins [-- OPTIONS]`: what Wasm plugins cost
//! (hop vs native, chain vs passthrough, aggregation latency). See `benches/README.md`.

use std::process::ExitCode;

/// The allocator the shipped binary uses, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: bff_proxy::Allocator = bff_proxy::Allocator;

use bff_proxy_benches::plugins::{PluginOptions, USAGE, run};

fn main() -> ExitCode {
    let opts = match PluginOptions::parse(std::env::args().skip(1)) {
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
