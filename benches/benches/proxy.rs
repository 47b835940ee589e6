//! `cargo bench -p bff-proxy-benches --bench proxy [-- OPTIONS]`: direct vs bff-proxy vs nginx
//! on loopback. See `benches/README.md` and `--help`.

use std::process::ExitCode;

/// The allocator the shipped binary uses, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: bff_proxy::Allocator = bff_proxy::Allocator;

fn main() -> ExitCode {
    let opts = match bff_proxy_benches::Options::parse(std::env::args().skip(1)) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            print!("{}", bff_proxy_benches::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let mut stdout = std::io::stdout();
    match bff_proxy_benches::run(&opts, &mut stdout) {
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
