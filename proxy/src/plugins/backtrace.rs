//! Where a plugin was when it failed, for the log line of the failure (request path: a hook
//! call or an instantiation that trapped, spent its CPU budget or hit its memory limit).
//!
//! Wasmtime attaches a Wasm backtrace to such an error. [`GuestTrace`] keeps its innermost
//! frames by function name (from the module's `name` section, Rust names demangled, so a
//! plugin built with `strip = "debuginfo"` shows `my_plugin::reshape`; a stripped one shows
//! `wasm-function[N]`). It goes into the failure's log message only: a client never sees it.

use std::fmt;
use std::sync::Arc;

use wasmtime::WasmBacktrace;

/// Frames shown, innermost first; a deeper stack ends with `<- …`.
const MAX_FRAMES: usize = 6;
/// A frame's name is cut at this many characters (generic Rust names can run long).
const MAX_NAME_CHARS: usize = 120;

/// The innermost frames of a failed call's Wasm backtrace, or nothing when the error has none.
/// Displays as ` at inner <- outer <- …` (leading space) or as nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GuestTrace(Option<Arc<str>>);

impl GuestTrace {
    /// The backtrace wasmtime attached to `error`, if any.
    pub(crate) fn of(error: &wasmtime::Error) -> Self {
        error
            .downcast_ref::<WasmBacktrace>()
            .map_or_else(Self::default, |bt| {
                Self::from_names(bt.frames().iter().map(|frame| {
                    frame.func_name().map_or_else(
                        || format!("wasm-function[{}]", frame.func_index()),
                        readable,
                    )
                }))
            })
    }

    /// Joins frame names, innermost first. Leading frames of the Rust runtime (the abort or
    /// out-of-memory path a trap went through) shrink to the innermost one and `…`, so the
    /// plugin's own functions are what the frames shown are spent on.
    fn from_names(names: impl Iterator<Item = String>) -> Self {
        let names: Vec<String> = names.collect();
        let runtime = names.iter().take_while(|n| is_runtime(n)).count();
        // A stack of runtime frames only is shown as it is.
        let (lead, rest) = names.split_at(if runtime == names.len() { 0 } else { runtime });
        let mut shown: Vec<&str> = match lead {
            [] => Vec::new(),
            [one] => vec![one.as_str()],
            [innermost, ..] => vec![innermost.as_str(), "…"],
        };
        shown.extend(rest.iter().take(MAX_FRAMES).map(String::as_str));
        if rest.len() > MAX_FRAMES {
            shown.push("…");
        }
        let out = shown.join(" <- ");
        Self((!out.is_empty()).then(|| out.into()))
    }
}

impl fmt::Display for GuestTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(frames) => write!(f, " at {frames}"),
            None => Ok(()),
        }
    }
}

/// Whether a frame belongs to the Rust runtime rather than to the plugin: the standard
/// library (abort, panic and allocation-failure paths) and the libc `abort` under it.
fn is_runtime(name: &str) -> bool {
    const PREFIXES: [&str; 9] = [
        "std::", "core::", "alloc::", "<std::", "<core::", "<alloc::", "__rust", "rust_", "__rdl",
    ];
    name == "abort" || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// A frame name as a person reads it: Rust symbols demangled without their hash, cut at
/// [`MAX_NAME_CHARS`].
fn readable(name: &str) -> String {
    let full = match rustc_demangle::try_demangle(name) {
        Ok(symbol) => format!("{symbol:#}"),
        Err(_) => name.to_owned(),
    };
    match full.char_indices().nth(MAX_NAME_CHARS) {
        Some((cut, _)) => format!("{}…", &full[..cut]),
        None => full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_demangled_and_the_stack_is_cut() {
        let names = [
            "_ZN5probe4spin17h0123456789abcdefE",
            "probe::on_request",
            "wasm-function[7]",
            "d",
            "e",
            "f",
            "g",
        ];
        let trace = GuestTrace::from_names(names.iter().map(|n| readable(n)));
        assert_eq!(
            trace.to_string(),
            " at probe::spin <- probe::on_request <- wasm-function[7] <- d <- e <- f <- …"
        );
    }

    #[test]
    fn runtime_frames_of_an_abort_shrink_to_the_innermost() {
        let names = [
            "abort",
            "std::sys::pal::wasi::helpers::abort_internal",
            "std::process::abort",
            "std::alloc::rust_oom",
            "alloc::raw_vec::finish_grow",
            "probe::eat_memory",
            "probe::on_request",
        ];
        let trace = GuestTrace::from_names(names.iter().map(|n| (*n).to_owned()));
        assert_eq!(
            trace.to_string(),
            " at abort <- … <- probe::eat_memory <- probe::on_request"
        );
        // A stack of runtime frames only, or one runtime frame, is shown as it is.
        let only = GuestTrace::from_names(names[..3].iter().map(|n| (*n).to_owned()));
        assert_eq!(
            only.to_string(),
            " at abort <- std::sys::pal::wasi::helpers::abort_internal <- std::process::abort"
        );
        let one = GuestTrace::from_names(["core::f", "probe::g"].iter().map(|n| (*n).to_owned()));
        assert_eq!(one.to_string(), " at core::f <- probe::g");
    }

    #[test]
    fn no_frames_display_as_nothing() {
        assert_eq!(GuestTrace::from_names(std::iter::empty()).to_string(), "");
        assert_eq!(
            GuestTrace::of(&wasmtime::Error::msg("no trace")),
            GuestTrace::default()
        );
    }

    #[test]
    fn long_names_are_cut() {
        let long = "x".repeat(300);
        let shown = readable(&long);
        assert_eq!(shown.chars().count(), MAX_NAME_CHARS + 1);
        assert!(shown.ends_with('…'));
    }
}
