//! The access log: one line per request, written by the log phase ([`super::Finish`]).
//!
//! Lines are formatted on the request's task and appended to a shared buffer; one writer thread
//! writes the buffer out every 100 ms, or at once when 64 KiB are waiting, with one `write`.
//! A request never waits for the disk and never wakes a thread per line (a wake-up per line
//! cost more than everything else the log does). When 8 MiB are waiting the output is not
//! keeping up: lines are dropped and counted (`bff_access_log_dropped_total`).
//!
//! What a line holds is fixed here, not configurable, so it can never include `authorization`,
//! cookies or API keys: the only request header logged is `user-agent`. Everything that comes
//! from the request (path, request id, user agent) is escaped, so a client cannot forge lines
//! or inject terminal control sequences.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::{ConfigPath, Problems};

/// How often the writer thread writes what has been queued (nginx's `flush=` for a buffered
/// access log): lines reach the output at most this late.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Queued bytes that wake the writer early.
const BATCH: usize = 64 * 1024;
/// Queued bytes beyond which new lines are dropped (the output is not keeping up).
const MAX_PENDING: usize = 8 << 20;
/// Longest path and user agent logged (longer ones end with `...`).
const MAX_PATH: usize = 2048;
const MAX_USER_AGENT: usize = 512;

/// `[access_log]`: one line per request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// Write the access log.
    pub enabled: bool,
    /// `text` (`key=value` pairs) or `json` (one object per line).
    pub format: AccessLogFormat,
    /// `stderr`, `stdout`, or a file path (appended to; relative paths are resolved against
    /// the config file). A file is reopened on every reload, so `logrotate` + `SIGHUP` works.
    pub output: String,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            format: AccessLogFormat::Text,
            output: "stderr".into(),
        }
    }
}

/// Access log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// `key=value` pairs, strings quoted and escaped.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl AccessLogConfig {
    pub(crate) fn validate(&self, at: &ConfigPath, problems: &mut Problems) {
        if self.output.trim().is_empty() {
            problems.push(
                at.key("output"),
                "must be `stderr`, `stdout` or a file path",
            );
        }
    }

    /// Resolves a relative file `output` against `dir` (the config file's directory).
    pub(crate) fn resolve(&mut self, dir: &Path) {
        if let Output::File(p) = Output::of(&self.output)
            && p.is_relative()
        {
            self.output = dir.join(p).display().to_string();
        }
    }
}

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Output {
    Stderr,
    Stdout,
    File(PathBuf),
}

impl Output {
    fn of(s: &str) -> Self {
        match s {
            "stderr" => Self::Stderr,
            "stdout" => Self::Stdout,
            path => Self::File(PathBuf::from(path)),
        }
    }

    fn open(&self) -> std::io::Result<Box<dyn std::io::Write + Send>> {
        Ok(match self {
            Self::Stderr => Box::new(std::io::stderr()),
            Self::Stdout => Box::new(std::io::stdout()),
            Self::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        })
    }
}

/// What the request tasks and the writer thread share.
#[derive(Debug, Default)]
struct Queue {
    state: Mutex<Pending>,
    /// Wakes the writer early: a full batch, a reopen, or shutdown.
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Pending {
    /// Formatted lines not yet written.
    lines: Vec<u8>,
    reopen: bool,
    closed: bool,
}

/// The request side of the access log: lines are appended to a shared buffer that one writer
/// thread writes out every [`FLUSH_EVERY`] (or at once when a batch is full). Requests never
/// wait for the disk nor wake a thread per line.
#[derive(Debug)]
pub(crate) struct AccessLog {
    queue: Arc<Queue>,
}

impl AccessLog {
    /// Starts the writer thread. An enabled log opens its output now, so a bad path fails
    /// startup; a disabled one opens it when a reload turns it on and the first line comes.
    /// The output itself is bound at startup (a reload that changes it warns).
    pub(crate) fn start(config: &AccessLogConfig) -> std::io::Result<Self> {
        let output = Output::of(&config.output);
        let out = if config.enabled {
            Some(output.open()?)
        } else {
            None
        };
        let queue = Arc::new(Queue::default());
        let writer_queue = queue.clone();
        std::thread::Builder::new()
            .name("bff-access-log".into())
            .spawn(move || writer(&writer_queue, &output, out))?;
        Ok(Self { queue })
    }

    /// Queues a line; drops (and counts) it if the writer is [`MAX_PENDING`] behind.
    pub(crate) fn write(&self, line: &str, dropped: &prometheus::IntCounter) {
        let mut pending = lock(&self.queue.state);
        if pending.lines.len() + line.len() > MAX_PENDING {
            drop(pending);
            dropped.inc();
            return;
        }
        pending.lines.extend_from_slice(line.as_bytes());
        if pending.lines.len() >= BATCH {
            drop(pending);
            self.queue.wake.notify_one();
        }
    }

    /// Reopens a file output (after log rotation), after the lines already queued.
    pub(crate) fn reopen(&self) {
        lock(&self.queue.state).reopen = true;
        self.queue.wake.notify_one();
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        lock(&self.queue.state).closed = true;
        self.queue.wake.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

type Sink = Box<dyn std::io::Write + Send>;

/// The writer thread: takes the pending lines every [`FLUSH_EVERY`] (sooner when woken) and
/// writes them with one call; exits, after a last write, once the [`AccessLog`] is dropped.
fn writer(queue: &Queue, output: &Output, mut out: Option<Sink>) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut failing = false;
    loop {
        let (reopen, closed) = {
            let mut pending = lock(&queue.state);
            if pending.lines.is_empty() && !pending.reopen && !pending.closed {
                pending = queue
                    .wake
                    .wait_timeout(pending, FLUSH_EVERY)
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
            std::mem::swap(&mut batch, &mut pending.lines);
            (std::mem::take(&mut pending.reopen), pending.closed)
        };
        let mut result = Ok(());
        if !batch.is_empty() {
            if out.is_none() {
                out = output.open().ok();
            }
            result = match out.as_mut() {
                Some(o) => o.write_all(&batch).and_then(|()| o.flush()),
                None => Err(std::io::Error::other("the output cannot be opened")),
            };
            batch.clear();
        }
        if reopen && matches!(output, Output::File(_)) && out.is_some() {
            match output.open() {
                Ok(fresh) => out = Some(fresh),
                Err(e) => result = Err(e),
            }
        }
        // Reported once per failing streak, not once per batch.
        match result {
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "cannot write the access log");
            }
            Err(_) => {}
            Ok(()) => failing = false,
        }
        if closed {
            return;
        }
        // Give the buffer back its capacity bound: a burst should not pin memory forever.
        if batch.capacity() > 4 * BATCH {
            batch = Vec::with_capacity(BATCH);
        }
    }
}

/// One access log line's fields.
#[derive(Debug)]
pub(crate) struct Line<'a> {
    pub(crate) request_id: &'a str,
    pub(crate) trace_id: &'a str,
    pub(crate) client: Option<&'a str>,
    pub(crate) route: Option<&'a str>,
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) protocol: &'a str,
    /// The TLS version of the connection (`TLSv1.3`), `None` in cleartext.
    pub(crate) tls: Option<&'a str>,
    pub(crate) peer: IpAddr,
    pub(crate) user_agent: Option<&'a [u8]>,
    pub(crate) status: u16,
    pub(crate) error: Option<&'a str>,
    pub(crate) duration: Duration,
    pub(crate) upstream: Duration,
    pub(crate) upstream_calls: u32,
    /// Upstream calls a response cache answered instead of the service.
    pub(crate) cached: u32,
    pub(crate) plugin: Duration,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) upstream_bytes: u64,
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// At most `max` bytes of `s` (on a char boundary), marked when cut.
fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end]).into()
}

#[derive(Serialize)]
struct JsonLine<'a> {
    ts: String,
    request_id: &'a str,
    trace_id: &'a str,
    client: Option<&'a str>,
    route: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    protocol: &'a str,
    tls: Option<&'a str>,
    peer: IpAddr,
    user_agent: Option<&'a str>,
    status: u16,
    error: Option<&'a str>,
    duration_ms: f64,
    upstream_ms: f64,
    upstream_calls: u32,
    cached: u32,
    plugin_ms: f64,
    bytes_in: u64,
    bytes_out: u64,
    upstream_bytes: u64,
}

impl Line<'_> {
    /// The line in `format`, newline included.
    pub(crate) fn render(&self, format: AccessLogFormat) -> String {
        let ts = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let path = clip(self.path, MAX_PATH);
        let ua = self.user_agent.map(String::from_utf8_lossy);
        let ua = ua.as_deref().map(|u| clip(u, MAX_USER_AGENT));
        match format {
            AccessLogFormat::Json => {
                let line = JsonLine {
                    ts,
                    request_id: self.request_id,
                    trace_id: self.trace_id,
                    client: self.client,
                    route: self.route,
                    method: self.method,
                    path: &path,
                    protocol: self.protocol,
                    tls: self.tls,
                    peer: self.peer,
                    user_agent: ua.as_deref(),
                    status: self.status,
                    error: self.error,
                    duration_ms: millis(self.duration),
                    upstream_ms: millis(self.upstream),
                    upstream_calls: self.upstream_calls,
                    cached: self.cached,
                    plugin_ms: millis(self.plugin),
                    bytes_in: self.bytes_in,
                    bytes_out: self.bytes_out,
                    upstream_bytes: self.upstream_bytes,
                };
                let mut s = serde_json::to_string(&line).unwrap_or_default();
                s.push('\n');
                s
            }
            AccessLogFormat::Text => {
                let mut s = String::with_capacity(320);
                let _ = write!(s, "{ts} request_id=");
                quoted(&mut s, self.request_id);
                let _ = write!(
                    s,
                    " trace_id={} client={} route={} method={} path=",
                    self.trace_id,
                    self.client.unwrap_or("-"),
                    self.route.unwrap_or("-"),
                    self.method
                );
                quoted(&mut s, &path);
                let _ = write!(
                    s,
                    " status={} error={} duration_ms={:.3} upstream_ms={:.3} upstream_calls={} cached={} plugin_ms={:.3} bytes_in={} bytes_out={} upstream_bytes={} peer={} protocol={} tls={} user_agent=",
                    self.status,
                    self.error.unwrap_or("-"),
                    millis(self.duration),
                    millis(self.upstream),
                    self.upstream_calls,
                    self.cached,
                    millis(self.plugin),
                    self.bytes_in,
                    self.bytes_out,
                    self.upstream_bytes,
                    self.peer,
                    self.protocol,
                    self.tls.unwrap_or("-"),
                );
                match &ua {
                    Some(ua) => quoted(&mut s, ua),
                    None => s.push('-'),
                }
                s.push('\n');
                s
            }
        }
    }
}

/// Appends `v` in double quotes, with `"` and `\` escaped and every control or non-ASCII
/// character written as `\xNN` / `\u{...}`, so a value can neither end the line nor the field.
fn quoted(out: &mut String, v: &str) {
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_ascii_graphic() || c == ' ' => out.push(c),
            c if c.is_ascii() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(path: &'a str, ua: &'a [u8]) -> Line<'a> {
        Line {
            request_id: "r\"1",
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            client: Some("mobile"),
            route: None,
            method: "GET",
            path,
            protocol: "HTTP/1.1",
            tls: Some("TLSv1.3"),
            peer: "127.0.0.1".parse().expect("ip"),
            user_agent: Some(ua),
            status: 200,
            error: None,
            duration: Duration::from_micros(1500),
            upstream: Duration::from_micros(900),
            upstream_calls: 2,
            cached: 1,
            plugin: Duration::from_micros(120),
            bytes_in: 0,
            bytes_out: 42,
            upstream_bytes: 100,
        }
    }

    #[test]
    fn text_escapes_everything_from_the_request() {
        let s = line("/a b\u{1b}[31m", b"evil\nua=\"x\"\xff").render(AccessLogFormat::Text);
        assert_eq!(s.matches('\n').count(), 1, "{s}");
        assert!(s.ends_with('\n'));
        assert!(s.contains(r#"request_id="r\"1""#), "{s}");
        assert!(s.contains(" protocol=HTTP/1.1 tls=TLSv1.3 "), "{s}");
        assert!(s.contains(r#"path="/a b\x1b[31m""#), "{s}");
        assert!(
            s.contains(r#"user_agent="evil\x0aua=\"x\"\u{fffd}""#),
            "{s}"
        );
        assert!(s.contains(" client=mobile route=- "), "{s}");
        assert!(s.contains(
            " duration_ms=1.500 upstream_ms=0.900 upstream_calls=2 cached=1 plugin_ms=0.120 "
        ));
        assert!(!s.contains('\u{1b}'));
    }

    #[test]
    fn json_is_one_object_per_line() {
        let s = line("/x\u{0}", b"ua").render(AccessLogFormat::Json);
        assert_eq!(s.matches('\n').count(), 1);
        let v: serde_json::Value = serde_json::from_str(&s).expect("json");
        assert_eq!(v["path"], "/x\u{0}");
        assert_eq!(v["route"], serde_json::Value::Null);
        assert_eq!(v["bytes_out"], 42);
        assert_eq!(v["upstream_ms"], 0.9);
        assert!(s.contains("\\u0000"));
    }

    #[test]
    fn long_values_are_clipped() {
        let long = "/".repeat(5000);
        let s = line(&long, b"ua").render(AccessLogFormat::Text);
        assert!(s.len() < 3000);
        assert!(s.contains("...\""));
    }
}
