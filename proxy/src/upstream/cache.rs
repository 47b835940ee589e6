//! The response cache of an upstream service (`[services.NAME.cache]`): part of the upstream
//! phase, in front of the service's connections, so the route's own call and every plugin
//! `send` to the service share it.
//!
//! ```text
//! send(GET) ─▶ lookup ─ fresh ─────────────────────────────▶ stored copy (cache-status: hit)
//!                 ├─ another request is fetching it ─▶ wait ─▶ its copy (collapsed)
//!                 ├─ stale, with a validator ─▶ conditional GET ─ 304 ─▶ stored copy (revalidated)
//!                 └─ missing ─▶ GET ─▶ response streams to the caller, recorded as it passes,
//!                                      stored when its last byte has (fwd=uri-miss; stored)
//!            service fails (connect, timeout, 5xx) with a copy in its stale-if-error window ─▶ stale copy
//! ```
//!
//! A shared cache by RFC 9111: only `GET`s without a body or `range`; a response is stored
//! only if its status is cacheable by default, it has a freshness lifetime (`s-maxage`,
//! `max-age`, `expires`, else the configured `default_ttl`) or a validator, and it has no
//! `no-store`, `private`, `no-cache`, `set-cookie` or `vary: *`. A request that carries a
//! user's credentials (`authorization`, `cookie`, and the identity headers the proxy adds: the
//! JWT `claim_headers`, `x-forwarded-client-cert`) is answered from, and its answer stored as,
//! only a copy the service marked shared (`public`, `s-maxage`, `must-revalidate`), unless
//! that header is one of `key_headers` (then each value has its own copies). One copy per key
//! (path, query and the configured `key_headers`); a copy whose `vary` headers differ from the
//! request's is a miss and is replaced. Client `cache-control` is ignored (as nginx does): the
//! cache is the operator's, not something a client can bypass.
//!
//! Memory is bounded by `max_bytes` (body, headers and key of every copy), evicted by
//! quick_cache's S3-FIFO policy; copies past use are dropped when looked up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use http_body::Frame;
use serde::Deserialize;
use tokio::sync::watch;

use crate::config::{ConfigPath, Problems};
use crate::metrics::CacheSeries;

/// `cache-status` (RFC 9211): how each cache on the path handled the response.
pub(crate) static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// Our name in `cache-status`.
const CACHE_NAME: &str = "bff-proxy";
/// Bookkeeping bytes charged per stored copy on top of its key, headers and body.
const ENTRY_OVERHEAD: u64 = 256;

/// `[services.NAME.cache]`: keep this service's cacheable `GET` responses in memory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Memory for stored responses (bodies, headers and keys); the least recently useful
    /// copies are evicted beyond it.
    pub max_bytes: u64,
    /// Larger responses are passed through and not stored.
    pub max_object_bytes: u64,
    /// Freshness for cacheable responses that give none (no `max-age`, `s-maxage` or
    /// `expires`). Unset: such responses are stored only if they carry a validator (`etag`,
    /// `last-modified`), and then revalidated on every use.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Option<Duration>,
    /// The longest any response is considered fresh, whatever it says.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// How long past its freshness a copy may still be served when the service cannot answer
    /// (connect failure, timeout, 5xx), unless the response said `must-revalidate`. A
    /// `stale-if-error=N` in the response's `cache-control` takes precedence.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    /// Request headers whose values are part of the cache key, for upstreams whose answers
    /// depend on them without saying so in `vary` (e.g. a `claim_headers` user id).
    pub key_headers: Vec<String>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            max_object_bytes: 1 << 20,
            default_ttl: None,
            max_ttl: Duration::from_secs(24 * 3600),
            stale_if_error: Duration::ZERO,
            key_headers: Vec::new(),
        }
    }
}

impl CacheConfig {
    pub(crate) fn validate(&self, at: &ConfigPath, problems: &mut Problems) {
        crate::config::check_range(
            self.max_bytes,
            (64 << 10)..=(64 << 30),
            &at.key("max_bytes"),
            problems,
        );
        crate::config::check_range(
            self.max_object_bytes,
            1..=(256 << 20),
            &at.key("max_object_bytes"),
            problems,
        );
        if self.max_object_bytes > self.max_bytes / 4 {
            problems.push(
                at.key("max_object_bytes"),
                "must be at most a quarter of max_bytes, so that one response cannot flush the cache",
            );
        }
        let year = Duration::from_secs(365 * 24 * 3600);
        if let Some(ttl) = self.default_ttl {
            crate::config::check_duration(
                ttl,
                Duration::from_secs(1)..=year,
                &at.key("default_ttl"),
                problems,
            );
        }
        crate::config::check_duration(
            self.max_ttl,
            Duration::from_secs(1)..=year,
            &at.key("max_ttl"),
            problems,
        );
        crate::config::check_duration(
            self.stale_if_error,
            Duration::ZERO..=year,
            &at.key("stale_if_error"),
            problems,
        );
        for (i, name) in self.key_headers.iter().enumerate() {
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                problems.push(
                    at.key("key_headers").index(i),
                    format!("`{}` is not a valid header name", name.escape_debug()),
                );
            }
        }
    }
}

/// How the cache handled one call; the `result` label of `bff_upstream_cache_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Served a fresh copy.
    Hit = 0,
    /// Waited for another request fetching the same key and served what it stored.
    Collapsed = 1,
    /// A stale copy confirmed by the service (304) and served.
    Revalidated = 2,
    /// A stale copy served because the service failed.
    Stale = 3,
    /// Fetched from the service (and stored if cacheable).
    Miss = 4,
    /// Not eligible (not a `GET`, a body, a `range`): passed through.
    Bypass = 5,
}

/// Why a stored copy answers a call (the [`Outcome`]s [`Cache::serve`] records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    Hit,
    Collapsed,
    Revalidated,
    Stale,
}

/// Every [`Outcome`] label, in discriminant order.
pub(crate) const OUTCOMES: [&str; 6] =
    ["hit", "collapsed", "revalidated", "stale", "miss", "bypass"];

/// The request's values (joined; `None` when absent) of each field a response's `vary` names.
type VaryValues = Box<[(HeaderName, Option<Box<[u8]>>)]>;

/// The cache key: path, query and `key_headers` values, separated by characters a URI and a
/// header value cannot contain.
type Key = Arc<str>;

/// One stored response.
#[derive(Debug)]
pub(crate) struct Entry {
    status: StatusCode,
    /// As the service sent them, minus hop-by-hop fields and `age`; `content-length` set.
    headers: HeaderMap,
    body: Bytes,
    /// When the response (or its last revalidation) arrived.
    stored: Instant,
    /// The `age` the service reported.
    initial_age: Duration,
    fresh_for: Duration,
    /// Extra time it may serve when the service fails.
    stale_for: Duration,
    /// The request's values of the response's `vary` fields.
    vary: VaryValues,
    /// The service said any user may get it (`public`, `s-maxage`, `must-revalidate`).
    shared: bool,
    weight: u64,
}

impl Entry {
    fn age(&self, now: Instant) -> Duration {
        self.initial_age + now.saturating_duration_since(self.stored)
    }

    fn is_fresh(&self, now: Instant) -> bool {
        self.age(now) < self.fresh_for
    }

    pub(crate) fn has_validator(&self) -> bool {
        self.headers.contains_key(header::ETAG) || self.headers.contains_key(header::LAST_MODIFIED)
    }

    /// Makes `request` conditional on this copy: `if-none-match` with its `etag`, else
    /// `if-modified-since` with its `last-modified`.
    pub(crate) fn add_validators(&self, request: &mut HeaderMap) {
        if let Some(etag) = self.headers.get(header::ETAG) {
            request.insert(header::IF_NONE_MATCH, etag.clone());
        } else if let Some(modified) = self.headers.get(header::LAST_MODIFIED) {
            request.insert(header::IF_MODIFIED_SINCE, modified.clone());
        }
    }

    pub(crate) fn servable_on_error(&self, now: Instant) -> bool {
        self.age(now) < self.fresh_for + self.stale_for
    }

    /// Worth keeping: fresh, revalidatable, or still within its stale-if-error window.
    fn is_useful(&self, now: Instant) -> bool {
        self.has_validator() || self.servable_on_error(now)
    }

    fn matches_vary(&self, request: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, stored)| joined(request, name).as_deref() == stored.as_deref())
    }
}

/// Every value of `name` in `headers`, joined by `, ` (`None` if absent).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<Box<[u8]>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut out = first.as_bytes().to_vec();
    for v in values {
        out.extend_from_slice(b", ");
        out.extend_from_slice(v.as_bytes());
    }
    Some(out.into_boxed_slice())
}

#[derive(Debug, Clone, Copy)]
struct Weigher;

impl quick_cache::Weighter<Key, Arc<Entry>> for Weigher {
    fn weight(&self, key: &Key, entry: &Arc<Entry>) -> u64 {
        entry.weight + key.len() as u64
    }
}

/// A service's cache: the stored copies and the fetches in flight.
#[derive(Debug)]
pub(crate) struct Cache {
    config: CacheConfig,
    key_headers: Box<[HeaderName]>,
    store: quick_cache::sync::Cache<Key, Arc<Entry>, Weigher>,
    /// Keys being fetched by a request that will store the answer; others wait for it.
    inflight: DashMap<Key, (u64, watch::Receiver<()>)>,
    next_fetch: AtomicU64,
    series: CacheSeries,
}

/// What a lookup found.
pub(crate) enum Lookup {
    Fresh(Arc<Entry>),
    /// Past its freshness but worth revalidating or serving on error.
    Stale(Arc<Entry>),
    /// A copy for another `vary` variant.
    OtherVariant,
    /// A copy the request's credentials may not be answered from.
    NotShared,
    Missing,
}

/// This request fetches `key` for everyone; dropping it (stored or not) releases the waiters.
#[derive(Debug)]
pub(crate) struct Leader {
    cache: Arc<Cache>,
    key: Key,
    id: u64,
    _done: watch::Sender<()>,
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.cache
            .inflight
            .remove_if(&self.key, |_, (id, _)| *id == self.id);
    }
}

impl Cache {
    pub(crate) fn new(config: &CacheConfig, series: CacheSeries) -> Self {
        // Shards of at least four maximum objects: quick_cache refuses a copy heavier than
        // about a shard's capacity.
        let shards = (config.max_bytes / (4 * config.max_object_bytes.max(1))).clamp(1, 16);
        let shards = 1usize << shards.ilog2();
        let store = quick_cache::sync::Cache::with_options(
            quick_cache::OptionsBuilder::new()
                .shards(shards)
                .estimated_items_capacity(
                    usize::try_from(config.max_bytes / 8192)
                        .unwrap_or(usize::MAX)
                        .max(64),
                )
                .weight_capacity(config.max_bytes)
                .build()
                .expect("shards, items and weight are set"),
            Weigher,
            quick_cache::DefaultHashBuilder::default(),
            quick_cache::sync::DefaultLifecycle::default(),
        );
        Self {
            key_headers: config
                .key_headers
                .iter()
                .map(|h| HeaderName::from_bytes(h.as_bytes()).expect("validated header names"))
                .collect(),
            config: config.clone(),
            store,
            inflight: DashMap::new(),
            next_fetch: AtomicU64::new(0),
            series,
        }
    }

    pub(crate) fn config(&self) -> &CacheConfig {
        &self.config
    }

    pub(crate) fn count(&self, outcome: Outcome) {
        self.series.count(outcome);
    }

    pub(crate) fn key(&self, path: &str, query: Option<&str>, headers: &HeaderMap) -> Key {
        let mut key = String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1));
        key.push_str(path);
        if let Some(q) = query {
            key.push('?');
            key.push_str(q);
        }
        for name in &self.key_headers {
            key.push('\n');
            match joined(headers, name) {
                Some(v) => key.push_str(&String::from_utf8_lossy(&v)),
                None => key.push('\u{1}'),
            }
        }
        key.into()
    }

    /// Whether `request` carries credentials of one of `credentials` that are not part of
    /// the key: then only shared copies may answer it and only shared answers be stored.
    pub(crate) fn credentialed(&self, request: &HeaderMap, credentials: &[HeaderName]) -> bool {
        [header::AUTHORIZATION, header::COOKIE]
            .iter()
            .chain(credentials)
            .any(|h| request.contains_key(h) && !self.key_headers.contains(h))
    }

    pub(crate) fn lookup(
        &self,
        key: &Key,
        request: &HeaderMap,
        credentialed: bool,
        now: Instant,
    ) -> Lookup {
        let Some(entry) = self.store.get(key) else {
            return Lookup::Missing;
        };
        if credentialed && !entry.shared {
            return Lookup::NotShared;
        }
        if !entry.matches_vary(request) {
            return Lookup::OtherVariant;
        }
        if entry.is_fresh(now) {
            return Lookup::Fresh(entry);
        }
        if entry.is_useful(now) {
            return Lookup::Stale(entry);
        }
        self.remove(key, &entry);
        Lookup::Missing
    }

    fn remove(&self, key: &Key, entry: &Arc<Entry>) {
        self.store.remove_if(key, |e| Arc::ptr_eq(e, entry));
        self.series.resize(self.store.weight(), self.store.len());
    }

    /// Leads the fetch of `key`, or returns the channel that closes when its leader is done.
    pub(crate) fn lead(self: &Arc<Self>, key: &Key) -> Result<Leader, watch::Receiver<()>> {
        match self.inflight.entry(key.clone()) {
            dashmap::Entry::Occupied(o) => Err(o.get().1.clone()),
            dashmap::Entry::Vacant(v) => {
                let id = self.next_fetch.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = watch::channel(());
                v.insert((id, rx));
                Ok(Leader {
                    cache: self.clone(),
                    key: key.clone(),
                    id,
                    _done: tx,
                })
            }
        }
    }

    /// Stores a complete response under `key`.
    fn insert(&self, key: Key, head: StoredHead, body: Bytes) {
        let StoredHead {
            status,
            mut headers,
            policy,
            vary,
        } = head;
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let weight = ENTRY_OVERHEAD
            + body.len() as u64
            + headers
                .iter()
                .map(|(k, v)| (k.as_str().len() + v.len()) as u64)
                .sum::<u64>();
        let entry = Entry {
            status,
            headers,
            body,
            stored: policy.received,
            initial_age: policy.initial_age,
            fresh_for: policy.fresh_for,
            stale_for: policy.stale_for,
            vary,
            shared: policy.shared,
            weight,
        };
        self.store.insert(key, Arc::new(entry));
        self.series.resize(self.store.weight(), self.store.len());
    }

    /// Refreshes a stale copy from a `304`: its headers update the stored ones (RFC 9111
    /// §4.3.4) and its freshness starts over. If the updated response may no longer be
    /// stored, the copy returned serves this once and is dropped from the cache.
    pub(crate) fn refresh(
        &self,
        key: &Key,
        old: &Arc<Entry>,
        not_modified: &HeaderMap,
        request: &RequestFacts,
        now: Instant,
    ) -> Arc<Entry> {
        let mut headers = old.headers.clone();
        for name in not_modified.keys() {
            if name == header::CONTENT_LENGTH || name == header::AGE || name == CACHE_STATUS {
                continue;
            }
            headers.remove(name);
            for v in not_modified.get_all(name) {
                headers.append(name.clone(), v.clone());
            }
        }
        crate::pipeline::remove_hop_by_hop(&mut headers);
        let policy = self.policy(old.status, &headers, request, now);
        let entry = Arc::new(Entry {
            status: old.status,
            body: old.body.clone(),
            stored: now,
            initial_age: policy.as_ref().map_or(Duration::ZERO, |p| p.initial_age),
            fresh_for: policy.as_ref().map_or(Duration::ZERO, |p| p.fresh_for),
            stale_for: policy.as_ref().map_or(Duration::ZERO, |p| p.stale_for),
            vary: old.vary.clone(),
            shared: policy.as_ref().is_some_and(|p| p.shared),
            weight: old.weight,
            headers,
        });
        match policy {
            Some(_) => {
                self.store.insert(key.clone(), entry.clone());
                self.series.resize(self.store.weight(), self.store.len());
            }
            None => self.remove(key, old),
        }
        entry
    }

    /// How long a response may be stored and used, if it may be stored at all.
    fn policy(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        request: &RequestFacts,
        now: Instant,
    ) -> Option<Policy> {
        if !cacheable_by_default(status) || headers.contains_key(header::SET_COOKIE) {
            return None;
        }
        let cc = Directives::parse(headers.get_all(header::CACHE_CONTROL));
        if cc.no_store || cc.private || cc.no_cache {
            return None;
        }
        let shared = cc.public || cc.s_maxage.is_some() || cc.must_revalidate;
        if request.credentialed && !shared {
            return None;
        }
        if headers.get_all(header::VARY).iter().any(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii() == b"*")
        }) {
            return None;
        }
        let explicit = cc
            .s_maxage
            .or(cc.max_age)
            .map(Duration::from_secs)
            .or_else(|| {
                let expires = headers.get(header::EXPIRES)?;
                // An invalid `expires` (such as "0") means already expired.
                let Some(expires) = http_date(expires) else {
                    return Some(Duration::ZERO);
                };
                let date = headers
                    .get(header::DATE)
                    .and_then(http_date)
                    .unwrap_or_else(SystemTime::now);
                Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
            });
        let has_validator =
            headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
        let fresh_for = explicit
            .or(self.config.default_ttl)
            .unwrap_or(Duration::ZERO)
            .min(self.config.max_ttl);
        let stale_for = if cc.must_revalidate {
            Duration::ZERO
        } else {
            cc.stale_if_error
                .map_or(self.config.stale_if_error, Duration::from_secs)
                .min(self.config.max_ttl)
        };
        if fresh_for.is_zero() && !has_validator && stale_for.is_zero() {
            return None;
        }
        let initial_age = headers
            .get(header::AGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_secs);
        Some(Policy {
            shared,
            received: now,
            initial_age,
            fresh_for,
            stale_for,
        })
    }

    /// If a fresh response may be stored, the recording that stores it as it streams by.
    pub(crate) fn admit(
        self: &Arc<Self>,
        key: Key,
        head: &http::response::Parts,
        request: &RequestFacts,
        leader: Option<Leader>,
    ) -> Option<Box<Recording>> {
        let declared = head
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.config.max_object_bytes) {
            return None;
        }
        let policy = self.policy(head.status, &head.headers, request, Instant::now())?;
        let vary = head
            .headers
            .get_all(header::VARY)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .map(|name| {
                let value = joined(&request.headers, &name);
                (name, value)
            })
            .collect();
        let mut headers = head.headers.clone();
        crate::pipeline::remove_hop_by_hop(&mut headers);
        headers.remove(header::AGE);
        Some(Box::new(Recording {
            cache: self.clone(),
            key,
            head: Some(StoredHead {
                status: head.status,
                headers,
                policy,
                vary,
            }),
            chunks: Vec::new(),
            len: 0,
            _leader: leader,
        }))
    }

    /// Drops every stored copy whose path starts with `prefix` (all with `None`); returns how
    /// many were dropped.
    pub(crate) fn purge(&self, prefix: Option<&str>) -> usize {
        let before = self.store.len();
        match prefix {
            None => self.store.clear(),
            Some(p) => self.store.retain(|k, _| !k.starts_with(p)),
        }
        self.series.resize(self.store.weight(), self.store.len());
        before.saturating_sub(self.store.len())
    }

    /// The stored copy as a response to a request with `request` headers: `age` set,
    /// `cache-status` appended, and a `304` instead when the request's own conditional
    /// (`if-none-match`, else `if-modified-since`) matches it.
    pub(crate) fn serve(
        &self,
        entry: &Entry,
        request: &HeaderMap,
        served: Served,
        now: Instant,
    ) -> Response<Bytes> {
        let age = entry.age(now);
        let mut headers = entry.headers.clone();
        headers.insert(header::AGE, HeaderValue::from(age.as_secs()));
        let status = match served {
            Served::Hit => {
                self.series.count(Outcome::Hit);
                let ttl = entry.fresh_for.saturating_sub(age).as_secs();
                HeaderValue::try_from(format!("{CACHE_NAME}; hit; ttl={ttl}")).expect("ASCII")
            }
            Served::Collapsed => {
                self.series.count(Outcome::Collapsed);
                HeaderValue::from_static("bff-proxy; fwd=uri-miss; collapsed")
            }
            Served::Revalidated => {
                self.series.count(Outcome::Revalidated);
                HeaderValue::from_static("bff-proxy; fwd=stale; fwd-status=304")
            }
            Served::Stale => {
                self.series.count(Outcome::Stale);
                HeaderValue::from_static("bff-proxy; fwd=stale; detail=stale-if-error")
            }
        };
        headers.append(CACHE_STATUS.clone(), status);
        let mut response = Response::new(entry.body.clone());
        if entry.status == StatusCode::OK && not_modified_for(request, &entry.headers) {
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            *response.body_mut() = Bytes::new();
            headers.retain_304();
        } else {
            *response.status_mut() = entry.status;
        }
        *response.headers_mut() = headers;
        response
    }
}

/// `HeaderMap` helper: keep what a `304` carries (RFC 9110 §15.4.5).
trait Retain304 {
    fn retain_304(&mut self);
}

impl Retain304 for HeaderMap {
    fn retain_304(&mut self) {
        const KEPT: [HeaderName; 8] = [
            header::CACHE_CONTROL,
            header::CONTENT_LOCATION,
            header::DATE,
            header::ETAG,
            header::EXPIRES,
            header::VARY,
            header::AGE,
            header::LAST_MODIFIED,
        ];
        let mut kept = HeaderMap::new();
        for name in KEPT.iter().chain([&CACHE_STATUS]) {
            for v in self.get_all(name) {
                kept.append(name.clone(), v.clone());
            }
        }
        *self = kept;
    }
}

/// Whether the request's own conditional says it already has this representation.
fn not_modified_for(request: &HeaderMap, stored: &HeaderMap) -> bool {
    if request.contains_key(header::IF_NONE_MATCH) {
        let Some(etag) = stored.get(header::ETAG) else {
            return false;
        };
        let etag = weak(etag.as_bytes());
        return request
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .any(|t| t == b"*" || weak(t) == etag);
    }
    match (
        request.get(header::IF_MODIFIED_SINCE).and_then(http_date),
        stored.get(header::LAST_MODIFIED).and_then(http_date),
    ) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// An entity tag without its weakness marker (`If-None-Match` compares weakly).
fn weak(tag: &[u8]) -> &[u8] {
    tag.strip_prefix(b"W/").unwrap_or(tag)
}

fn http_date(v: &HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(v.to_str().ok()?).ok()
}

/// RFC 9110 §15.1: statuses a cache may store without explicit freshness. Others (and `206`,
/// which needs range support) are never stored.
fn cacheable_by_default(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// What storing decisions need from the request once it has been sent.
#[derive(Debug)]
pub(crate) struct RequestFacts {
    credentialed: bool,
    /// The request's headers as the caller sent them: the values the answer's `vary` names,
    /// and the caller's own conditionals.
    headers: HeaderMap,
}

impl RequestFacts {
    pub(crate) fn of(headers: &HeaderMap, credentialed: bool) -> Self {
        Self {
            credentialed,
            headers: headers.clone(),
        }
    }

    pub(crate) fn headers(&self) -> &HeaderMap {
        &self.headers
    }
}

/// Freshness of a storable response.
#[derive(Debug, Clone, Copy)]
struct Policy {
    shared: bool,
    received: Instant,
    initial_age: Duration,
    fresh_for: Duration,
    stale_for: Duration,
}

/// A response head waiting for its body.
#[derive(Debug)]
struct StoredHead {
    status: StatusCode,
    headers: HeaderMap,
    policy: Policy,
    vary: VaryValues,
}

/// The `cache-control` directives a shared cache acts on.
#[derive(Debug, Default, PartialEq, Eq)]
struct Directives {
    no_store: bool,
    no_cache: bool,
    private: bool,
    public: bool,
    must_revalidate: bool,
    max_age: Option<u64>,
    s_maxage: Option<u64>,
    stale_if_error: Option<u64>,
}

impl Directives {
    fn parse<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> Self {
        let mut d = Self::default();
        for value in values {
            let Ok(value) = value.to_str() else {
                // Unreadable: treat as the most restrictive.
                d.no_store = true;
                continue;
            };
            for item in split_outside_quotes(value) {
                let (name, arg) = match item.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (item.trim(), None),
                };
                // A malformed delta-seconds makes the response stale (RFC 9111 §4.2.1).
                let seconds = || Some(arg.and_then(|a| a.parse::<u64>().ok()).unwrap_or(0));
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => d.no_store = true,
                    "no-cache" => d.no_cache = true,
                    "private" => d.private = true,
                    "public" => d.public = true,
                    "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                    "max-age" => d.max_age = seconds(),
                    "s-maxage" => d.s_maxage = seconds(),
                    "stale-if-error" => d.stale_if_error = seconds(),
                    _ => {}
                }
            }
        }
        d
    }
}

/// Splits a list on commas that are not inside a quoted string.
fn split_outside_quotes(s: &str) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    let mut start = 0;
    let mut parts = Vec::new();
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty())
}

/// A response body on its way to the caller, kept as it passes and stored once its last
/// byte has: a body that errors, is dropped early or outgrows `max_object_bytes` is not.
#[derive(Debug)]
pub(crate) struct Recording {
    cache: Arc<Cache>,
    key: Key,
    /// `None` once stored or given up.
    head: Option<StoredHead>,
    chunks: Vec<Bytes>,
    len: u64,
    /// Released (waiters woken) when the recording is dropped: after storing, or giving up.
    _leader: Option<Leader>,
}

impl Recording {
    /// Feeds one polled frame through; `end` says the body has no more.
    pub(crate) fn observe<E>(&mut self, polled: &Poll<Option<Result<Frame<Bytes>, E>>>, end: bool) {
        if self.head.is_none() {
            return;
        }
        match polled {
            Poll::Pending => return,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.len += data.len() as u64;
                    if self.len > self.cache.config.max_object_bytes {
                        self.give_up();
                        return;
                    }
                    self.chunks.push(data.clone());
                }
            }
            Poll::Ready(Some(Err(_))) => {
                self.give_up();
                return;
            }
            Poll::Ready(None) => {}
        }
        if end || matches!(polled, Poll::Ready(None)) {
            self.finish();
        }
    }

    fn give_up(&mut self) {
        self.head = None;
        self.chunks = Vec::new();
        self._leader = None;
    }

    /// Stores what was recorded (the whole body, when the caller knows it has ended).
    pub(crate) fn finish(&mut self) {
        let Some(head) = self.head.take() else {
            return;
        };
        // One exact-size copy: a received chunk may be a slice of a much larger read buffer,
        // which storing it would keep alive (and uncounted).
        let mut body = Vec::with_capacity(usize::try_from(self.len).unwrap_or(0));
        for chunk in self.chunks.drain(..) {
            body.extend_from_slice(&chunk);
        }
        self.cache.insert(self.key.clone(), head, body.into());
        self._leader = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(v: &str) -> Directives {
        Directives::parse([&HeaderValue::from_str(v).expect("valid")])
    }

    #[test]
    fn directives_parse_case_quotes_and_bad_numbers() {
        let d =
            cc(r#"Public, MAX-AGE=60, s-maxage="120", private="set-cookie, x", stale-if-error=30"#);
        assert!(d.public && d.private);
        assert_eq!(d.max_age, Some(60));
        assert_eq!(d.s_maxage, Some(120));
        assert_eq!(d.stale_if_error, Some(30));
        assert!(!d.no_store);
        assert_eq!(cc("max-age=soon").max_age, Some(0));
        assert!(cc("no-store").no_store);
        assert!(cc("no-cache=\"set-cookie\"").no_cache);
        assert!(cc("proxy-revalidate").must_revalidate);
    }

    #[test]
    fn conditionals_compare_weakly_and_by_date() {
        let mut stored = HeaderMap::new();
        stored.insert(header::ETAG, HeaderValue::from_static("W/\"v1\""));
        stored.insert(
            header::LAST_MODIFIED,
            HeaderValue::from_static("Tue, 01 Dec 2026 10:00:00 GMT"),
        );
        let req = |name: HeaderName, v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static(v));
            h
        };
        assert!(not_modified_for(
            &req(header::IF_NONE_MATCH, "\"v0\", \"v1\""),
            &stored
        ));
        assert!(not_modified_for(&req(header::IF_NONE_MATCH, "*"), &stored));
        assert!(!not_modified_for(
            &req(header::IF_NONE_MATCH, "\"v2\""),
            &stored
        ));
        assert!(not_modified_for(
            &req(header::IF_MODIFIED_SINCE, "Tue, 01 Dec 2026 10:00:00 GMT"),
            &stored
        ));
        assert!(!not_modified_for(
            &req(header::IF_MODIFIED_SINCE, "Tue, 01 Dec 2026 09:59:59 GMT"),
            &stored
        ));
        assert!(!not_modified_for(&HeaderMap::new(), &stored));
    }
}
