//! The `bff-proxy` command: parses arguments, sets up logging, loads config and runs.
//! Everything else lives in the library so tests and benches run the same code.
//!
//! Exit codes: 0 success, 2 bad command line, 64 invalid config, 66 unreadable config file,
//! 69 a listener could not be bound, 70 any other failure, 73 the access log cannot be opened.

use std::path::PathBuf;
use std::process::ExitCode;

use bff_proxy::telemetry::{self, LogFormat};
use bff_proxy::{Config, ConfigError, Proxy};
use clap::{Parser, Subcommand};

/// See [`bff_proxy::Allocator`].
#[global_allocator]
static ALLOCATOR: bff_proxy::Allocator = bff_proxy::Allocator;

const EXIT_CONFIG: u8 = 64;
const EXIT_NO_INPUT: u8 = 66;
const EXIT_UNAVAILABLE: u8 = 69;
const EXIT_SOFTWARE: u8 = 70;
const EXIT_CANT_CREATE: u8 = 73;

/// Backend-for-Frontend edge proxy: identifies each client (web, mobile, voice, partner...)
/// and serves it its own routes to your microservices.
#[derive(Debug, Parser)]
#[command(name = "bff-proxy", version, propagate_version = true)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "BFF_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter, `RUST_LOG` syntax (e.g. `info` or `info,bff_proxy=debug`).
    #[arg(long, global = true, default_value = "info", env = "RUST_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve traffic with a config file until SIGTERM/SIGINT, then drain and exit 0.
    Run {
        /// Config file (TOML). See config/full.toml for every key.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a config file: prints every problem with its line, exits non-zero if any.
    Check {
        /// Config file (TOML).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Start demo upstream services and the proxy with config/demo.toml on the default ports.
    Demo {
        /// Demo config (defaults to config/demo.toml, or the built-in copy if absent).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(cli.log_format, &cli.log) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(cfg) => run_with_runtime(1, async move {
                // Plugins are part of the config: load and initialize them as `run` would.
                match bff_proxy::check_plugins(&cfg).await {
                    Ok(uses) => {
                        println!(
                            "{}: ok: {}; {uses} plugin use(s) loaded",
                            config.display(),
                            cfg.summary()
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => start_failed(&e),
                }
            }),
            Err(e) => config_failed(&e),
        },
        Command::Run { config } => {
            let cfg = match Config::load(&config) {
                Ok(cfg) => cfg,
                Err(e) => return config_failed(&e),
            };
            run_with_runtime(cfg.server.worker_threads, async move {
                let proxy = match Proxy::bind(&cfg).await {
                    Ok(p) => p,
                    Err(e) => return start_failed(&e),
                };
                tracing::info!(config = %config.display(), "config loaded");
                proxy.run(bff_proxy::shutdown_signal()).await;
                ExitCode::SUCCESS
            })
        }
        Command::Demo { config } => run_with_runtime(0, async move {
            match bff_proxy::demo::run(config, bff_proxy::shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(demo_exit_code(&e))
                }
            }
        }),
    }
}

fn config_failed(e: &ConfigError) -> ExitCode {
    eprintln!("error: {e}");
    match e {
        ConfigError::Read { source, .. } => {
            eprintln!("  caused by: {source}");
            ExitCode::from(EXIT_NO_INPUT)
        }
        ConfigError::Invalid { .. } => ExitCode::from(EXIT_CONFIG),
    }
}

/// Bad plugins are a config problem (64); anything else at startup is the environment (69).
fn start_failed(e: &bff_proxy::StartError) -> ExitCode {
    eprintln!("error: {}", bff_proxy::ErrorChain(e));
    match e {
        bff_proxy::StartError::Plugins(_) => ExitCode::from(EXIT_CONFIG),
        bff_proxy::StartError::AccessLog { .. } => ExitCode::from(EXIT_CANT_CREATE),
        _ => ExitCode::from(EXIT_UNAVAILABLE),
    }
}

/// The same exit codes as `run` and `check`, found by what the demo failed on.
fn demo_exit_code(e: &anyhow::Error) -> u8 {
    if let Some(c) = e.downcast_ref::<ConfigError>() {
        return match c {
            ConfigError::Read { .. } => EXIT_NO_INPUT,
            ConfigError::Invalid { .. } => EXIT_CONFIG,
        };
    }
    if let Some(bff_proxy::StartError::Plugins(_)) = e.downcast_ref::<bff_proxy::StartError>() {
        return EXIT_CONFIG;
    }
    let cannot_listen = e.downcast_ref::<bff_proxy::StartError>().is_some()
        || e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
        });
    if cannot_listen {
        EXIT_UNAVAILABLE
    } else {
        EXIT_SOFTWARE
    }
}

fn run_with_runtime(worker_threads: usize, fut: impl Future<Output = ExitCode>) -> ExitCode {
    match bff_proxy::runtime_builder(worker_threads).build() {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(EXIT_SOFTWARE)
        }
    }
}
