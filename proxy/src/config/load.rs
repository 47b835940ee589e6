//! Parse → decode each section → validate, collecting every problem with its line.
//!
//! Sections are decoded one element at a time (each service, client and route on its own), so a
//! typo in one route does not hide a bad regex in a client: all of them are reported together.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::de::DeserializeOwned;
use toml_edit::{Item, Table, Value};

use super::path::Seg;
use super::{Config, ConfigPath};

/// Top-level keys, in the order `config/full.toml` documents them.
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "admin",
    "server",
    "tls",
    "headers",
    "identity",
    "services",
    "clients",
    "routes",
    "plugins",
    "reload",
    "access_log",
    "tracing",
];

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file that was asked for.
        path: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but has problems; all of them are listed.
    #[error("{}", render(origin, problems))]
    Invalid {
        /// Where the text came from (file path).
        origin: String,
        /// Every problem found, sorted by position in the file.
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The problems, if the file was readable.
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid { problems, .. } => problems,
        }
    }
}

fn render(origin: &str, problems: &[Problem]) -> String {
    let mut out = format!(
        "{origin}: {} problem{} found",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str("\n  ");
        out.push_str(&p.display_with(origin));
    }
    out
}

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where in the document (`routes[1].service`).
    pub path: String,
    /// 1-based line and column, when the position could be found in the text.
    pub line_col: Option<(usize, usize)>,
    /// What is wrong, in words.
    pub message: String,
}

impl Problem {
    pub(crate) fn display_with(&self, origin: &str) -> String {
        match self.line_col {
            Some((l, c)) => format!("{origin}:{l}:{c}: {}: {}", self.path, self.message),
            None => format!("{origin}: {}: {}", self.path, self.message),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display_with("config"))
    }
}

/// Problems collected while loading; positions are resolved once at the end.
#[derive(Debug, Default)]
pub(crate) struct Problems(Vec<(ConfigPath, String)>);

impl Problems {
    pub(crate) fn push(&mut self, path: ConfigPath, message: impl Into<String>) {
        self.0.push((path, message.into()));
    }

    /// How many problems so far (a section compares before and after its checks).
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// Parses, decodes and validates config text. Relative paths in it are taken relative to
/// `base` (the file's directory) when given, else to the working directory; files the config
/// names (TLS certificates and CAs, the JWKS) are read and checked here, with everything else.
pub(super) fn load(
    text: &str,
    origin: &str,
    base: Option<&std::path::Path>,
) -> Result<Config, ConfigError> {
    let invalid = |problems| ConfigError::Invalid {
        origin: origin.to_owned(),
        problems,
    };
    // The span-preserving document locates problems; the plain table feeds serde.
    let doc = match text.parse::<toml_edit::Document<String>>() {
        Ok(doc) => doc,
        Err(e) => {
            let line_col = e.span().map(|s| line_col(text, s.start));
            return Err(invalid(vec![Problem {
                path: "(syntax)".into(),
                line_col,
                message: e.message().trim().to_owned(),
            }]));
        }
    };
    let mut table: toml::Table = match toml::from_str(text) {
        Ok(t) => t,
        Err(e) => {
            return Err(invalid(vec![Problem {
                path: "(syntax)".into(),
                line_col: e.span().map(|s| line_col(text, s.start)),
                message: e.message().trim().to_owned(),
            }]));
        }
    };

    let mut problems = Problems::default();
    let root = ConfigPath::root();
    let mut config = Config::default();
    if let Some(v) = table.remove("listen")
        && let Some(addr) = decode(v, &root.key("listen"), &mut problems)
    {
        config.listen = addr;
    }
    macro_rules! section {
        ($key:literal, $field:ident) => {
            if let Some(v) = table.remove($key) {
                if let Some(s) = decode(v, &root.key($key), &mut problems) {
                    config.$field = s;
                }
            }
        };
    }
    section!("admin", admin);
    section!("server", server);
    section!("headers", headers);
    section!("identity", identity);
    section!("plugins", plugins);
    section!("reload", reload);
    section!("access_log", access_log);
    if let Some(v) = table.remove("tls") {
        config.tls = decode(v, &root.key("tls"), &mut problems);
    }
    if let Some(v) = table.remove("tracing") {
        config.tracing = decode(v, &root.key("tracing"), &mut problems);
    }
    if let Some(v) = table.remove("services") {
        config.services = decode_map(v, &root.key("services"), &mut problems);
    }
    if let Some(v) = table.remove("clients") {
        config.clients = decode_list(v, &root.key("clients"), &mut problems);
    }
    if let Some(v) = table.remove("routes") {
        config.routes = decode_list(v, &root.key("routes"), &mut problems);
    }
    for key in table.keys() {
        let message = format!(
            "unknown field `{key}`, expected one of {}",
            TOP_LEVEL_KEYS
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let message = match suggestion(&message) {
            Some(near) => format!("{message}; did you mean `{near}`?"),
            None => message,
        };
        problems.push(root.key(key.clone()), message);
    }

    if let Some(base) = base {
        config.resolve_paths(base);
    }
    if let Some(tls) = &mut config.tls {
        tls.load(&root.key("tls"), &mut problems);
    }
    if let Some(jwt) = &mut config.identity.jwt {
        jwt.load(&root.key("identity").key("jwt"), &mut problems);
    }
    for (name, service) in &mut config.services {
        service.load_tls(&root.key("services").key(name.clone()), &mut problems);
    }
    config.validate(&mut problems);
    if problems.0.is_empty() {
        return Ok(config);
    }
    let mut out: Vec<Problem> = problems
        .0
        .into_iter()
        .map(|(path, message)| Problem {
            line_col: locate(&doc, &path).map(|span| line_col(text, span.start)),
            path: path.to_string(),
            message,
        })
        .collect();
    // Stable order: by position, then unlocated ones last in discovery order.
    out.sort_by_key(|p| p.line_col.unwrap_or((usize::MAX, usize::MAX)));
    Err(invalid(out))
}

/// Decodes one value, recording a problem (with the exact inner path) on failure.
///
/// When serde stops at a bad key (unknown, or of the wrong type), that key is recorded, removed
/// and decoding retried, so one typo does not hide the rest of the element's problems. The
/// result is still discarded by the caller's problem count; it only feeds later checks.
fn decode<T: DeserializeOwned>(
    mut value: toml::Value,
    at: &ConfigPath,
    problems: &mut Problems,
) -> Option<T> {
    // Bounded: each retry removes one key.
    for _ in 0..64 {
        let err = match serde_path_to_error::deserialize(value.clone()) {
            Ok(v) => return Some(v),
            Err(e) => e,
        };
        let mut inner: Vec<Seg> = ConfigPath::root()
            .join_serde(err.path())
            .segments()
            .to_vec();
        let message = err.inner().message().trim().to_owned();
        // Unknown-field errors name the key in the message; point at the key itself.
        if let Some(name) = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
            && inner.last() != Some(&Seg::Key(name.to_owned()))
        {
            inner.push(Seg::Key(name.to_owned()));
        }
        let message = match suggestion(&message) {
            Some(near) => format!("{message}; did you mean `{near}`?"),
            None => message,
        };
        let mut path = at.clone();
        for seg in &inner {
            path = match seg {
                Seg::Key(k) => path.key(k.clone()),
                Seg::Index(i) => path.index(*i),
            };
        }
        problems.push(path, message);
        if !remove_at(&mut value, &inner) {
            return None;
        }
    }
    None
}

/// Removes the key or element at `path` inside `value`; false if there is nothing to remove.
fn remove_at(value: &mut toml::Value, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut cur = value;
    for seg in parents {
        let next = match (seg, cur) {
            (Seg::Key(k), toml::Value::Table(t)) => t.get_mut(k),
            (Seg::Index(i), toml::Value::Array(a)) => a.get_mut(*i),
            _ => None,
        };
        match next {
            Some(n) => cur = n,
            None => return false,
        }
    }
    match (last, cur) {
        (Seg::Key(k), toml::Value::Table(t)) => t.remove(k).is_some(),
        (Seg::Index(i), toml::Value::Array(a)) if *i < a.len() => {
            a.remove(*i);
            true
        }
        _ => false,
    }
}

fn decode_map<T: DeserializeOwned>(
    value: toml::Value,
    at: &ConfigPath,
    problems: &mut Problems,
) -> BTreeMap<String, T> {
    let mut out = BTreeMap::new();
    match value {
        toml::Value::Table(t) => {
            for (name, v) in t {
                if let Some(item) = decode(v, &at.key(name.clone()), problems) {
                    out.insert(name, item);
                }
            }
        }
        other => problems.push(
            at.clone(),
            format!(
                "expected a table of named entries, found {}",
                other.type_str()
            ),
        ),
    }
    out
}

fn decode_list<T: DeserializeOwned>(
    value: toml::Value,
    at: &ConfigPath,
    problems: &mut Problems,
) -> Vec<T> {
    match value {
        toml::Value::Array(items) => items
            .into_iter()
            .enumerate()
            .filter_map(|(i, v)| decode(v, &at.index(i), problems))
            .collect(),
        other => {
            problems.push(
                at.clone(),
                format!("expected an array of tables, found {}", other.type_str()),
            );
            Vec::new()
        }
    }
}

/// A node of the span-preserving document while walking a [`ConfigPath`].
enum Node<'a> {
    Item(&'a Item),
    Table(&'a Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn span(&self) -> Option<Range<usize>> {
        match self {
            Node::Item(i) => i.span(),
            Node::Table(t) => t.span(),
            Node::Value(v) => v.span(),
        }
    }

    /// The child under `key`, with the key's own span (the best place to point at).
    fn child_key(&self, key: &str) -> Option<(Option<Range<usize>>, Node<'a>)> {
        let table_child = |t: &'a Table| {
            t.get_key_value(key)
                .map(|(k, item)| (k.span(), Node::Item(item)))
        };
        match *self {
            Node::Table(t) | Node::Item(Item::Table(t)) => table_child(t),
            Node::Item(Item::Value(Value::InlineTable(t))) | Node::Value(Value::InlineTable(t)) => {
                t.get_key_value(key).map(|(k, v)| (k.span(), Node::Item(v)))
            }
            _ => None,
        }
    }

    fn child_index(&self, index: usize) -> Option<Node<'a>> {
        match *self {
            Node::Item(Item::ArrayOfTables(a)) => a.get(index).map(Node::Table),
            Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => {
                a.get(index).map(Node::Value)
            }
            _ => None,
        }
    }
}

/// The span of the deepest part of `path` found in the document.
fn locate(doc: &toml_edit::Document<String>, path: &ConfigPath) -> Option<Range<usize>> {
    let mut node = Node::Table(doc.as_table());
    let mut best = None;
    for seg in path.segments() {
        let next = match seg {
            Seg::Key(k) => node.child_key(k).map(|(key_span, n)| {
                best = key_span.or_else(|| n.span()).or(best.clone());
                n
            }),
            Seg::Index(i) => node.child_index(*i).inspect(|n| {
                best = n.span().or(best.clone());
            }),
        };
        match next {
            Some(n) => node = n,
            None => break,
        }
    }
    best
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// For serde's "unknown field `x`, expected one of `a`, `b`" messages: the expected name
/// closest to the typo, if it is close enough to be what was meant.
fn suggestion(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown ")?;
    let rest = rest
        .strip_prefix("field `")
        .or_else(|| rest.strip_prefix("variant `"))?;
    let (typo, expected) = rest.split_once('`')?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|cand| (edit_distance(typo, cand), cand))
        .filter(|(d, cand)| *d <= 2.max(cand.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, cand)| cand.to_owned())
}

/// Levenshtein distance over chars; names here are short, so the O(n·m) table is fine.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
