//! `cargo bench -p bff-proxy-benches --bench cache [-- OPTIONS]`: what the response cache
//! saves through bff-proxy (passthrough, hit, slow-upstream, slow-upstream-cached, collapse).
//! See `benches/README.md` and `--help`.

use std::process::ExitCode;

/// The allocator the shipped binary uses, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: bff_proxy::Allocator = bff_proxy::Allocator;

use bff_proxy_benches::cache::{CacheOptions, USAGE, run};

fn main() -> ExitCode {
    let opts = match CacheOptions::parse(std::env::args().skip(1)) {
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
