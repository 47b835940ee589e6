//! Prometheus metrics: one [`Metrics`] (and its registry) created at startup, passed to what
//! records, and served at `GET /metrics` on the admin listener. It lives outside the snapshot,
//! so counters survive reloads.
//!
//! Label values come only from config (plugin names) and fixed sets (reload outcome), never from
//! request data, so the series count is bounded by the config.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Every metric the proxy exports, registered in one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// `bff_reloads_total{outcome}`: reloads by outcome (`applied`, `unchanged`, `rejected`).
    pub(crate) reloads: IntCounterVec,
    /// `bff_reload_duration_seconds`: time to build and validate a snapshot.
    pub(crate) reload_duration: Histogram,
    /// `bff_last_reload_success_timestamp_seconds`: Unix time of the last applied or unchanged reload.
    pub(crate) last_reload_success: Gauge,
    /// `bff_plugin_load_errors_total{plugin}`: plugin files refused (the serving version kept).
    pub(crate) plugin_load_errors: IntCounterVec,
    /// `bff_plugins_loaded`: plugins in the live snapshot.
    pub(crate) plugins_loaded: IntGauge,
}

impl Metrics {
    /// Creates the registry and every metric in it.
    pub fn new() -> Self {
        let registry = Registry::new();
        let reloads = IntCounterVec::new(
            Opts::new(
                "bff_reloads_total",
                "Config and plugin reloads (startup included), by outcome.",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let reload_duration = Histogram::with_opts(
            HistogramOpts::new(
                "bff_reload_duration_seconds",
                "Time to read, compile, validate and swap in a new snapshot.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        let last_reload_success = Gauge::new(
            "bff_last_reload_success_timestamp_seconds",
            "Unix time of the last reload that was applied or found nothing to change.",
        )
        .expect("valid metric");
        let plugin_load_errors = IntCounterVec::new(
            Opts::new(
                "bff_plugin_load_errors_total",
                "Plugin files refused at load (invalid, incompatible, missing, config rejected); the serving version is kept.",
            ),
            &["plugin"],
        )
        .expect("valid metric");
        let plugins_loaded = IntGauge::new("bff_plugins_loaded", "Plugins in the live snapshot.")
            .expect("valid metric");
        for c in [
            Box::new(reloads.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reload_duration.clone()),
            Box::new(last_reload_success.clone()),
            Box::new(plugin_load_errors.clone()),
            Box::new(plugins_loaded.clone()),
        ] {
            registry
                .register(c)
                .expect("metric names are unique in the registry");
        }
        for outcome in ["applied", "unchanged", "rejected"] {
            reloads.with_label_values(&[outcome]);
        }
        Self {
            registry,
            reloads,
            reload_duration,
            last_reload_success,
            plugin_load_errors,
            plugins_loaded,
        }
    }

    /// The registry, for callers that add their own collectors.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition format of every metric.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
