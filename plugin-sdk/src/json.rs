//! JSON paths: get, set, remove, rename, flatten, pick and omit fields of a
//! [`serde_json::Value`], inside nested objects and arrays. What filtering and reshaping plugins
//! are made of.
//!
//! # Path syntax
//!
//! Dot-separated keys, with brackets for arrays:
//!
//! | path              | means                                              |
//! |-------------------|----------------------------------------------------|
//! | `user.name`       | key `name` of the object at key `user`             |
//! | `orders[0].id`    | `id` of the first element of the array `orders`    |
//! | `orders[].id`     | `id` of **every** element of `orders`              |
//! | `prices.*.amount` | `amount` of every value of the object `prices`     |
//! | `[].id`           | `id` of every element of a top-level array         |
//! | `a\.b`            | the key `a.b` (a backslash escapes `.`, `[`, `\`)  |
//!
//! Parse paths once, when the plugin loads: [`Path`] implements `Deserialize`, so a config
//! field `allow: Vec<Path>` rejects a malformed path at load time with the field's name.
//!
//! ```
//! use bff_plugin_sdk::json::{Path, pick};
//! use serde_json::json;
//!
//! let doc = json!({"user": {"name": "Ada", "email": "a@x"}, "orders": [{"id": 1, "total": 9}]});
//! let paths: Vec<Path> = ["user.name", "orders[].id"].iter().map(|p| p.parse().unwrap()).collect();
//! assert_eq!(pick(&doc, &paths), json!({"user": {"name": "Ada"}, "orders": [{"id": 1}]}));
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::types::Error;

/// One step of a [`Path`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Step {
    /// A key of an object.
    Key(String),
    /// An element of an array.
    Index(usize),
    /// Every element of an array (`[]`).
    Each,
    /// Every value of an object (`*`).
    AnyKey,
}

/// A parsed JSON path; see the [module docs](self) for the syntax.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Path {
    steps: Vec<Step>,
    text: String,
}

impl FromStr for Path {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::invalid_config(format!("invalid JSON path `{text}`: {why}"));
        let mut steps = Vec::new();
        let mut chars = text.chars().peekable();
        // True right after a `.` (a key must follow) and at the start.
        let mut want_key = true;
        while chars.peek().is_some() {
            if chars.peek() == Some(&'[') {
                chars.next();
                let mut digits = String::new();
                loop {
                    match chars.next() {
                        Some(']') => break,
                        Some(c) if c.is_ascii_digit() => digits.push(c),
                        Some(c) => return Err(bad(&format!("`{c}` inside brackets"))),
                        None => return Err(bad("unclosed `[`")),
                    }
                }
                steps.push(if digits.is_empty() {
                    Step::Each
                } else {
                    Step::Index(digits.parse().map_err(|_| bad("index too large"))?)
                });
                want_key = false;
                continue;
            }
            if chars.peek() == Some(&'.') {
                if want_key {
                    return Err(bad("empty key"));
                }
                chars.next();
                want_key = true;
                if chars.peek().is_none() {
                    return Err(bad("ends with `.`"));
                }
                continue;
            }
            if !want_key {
                return Err(bad("a key must follow `.`"));
            }
            let mut key = String::new();
            let mut escaped = false;
            while let Some(&c) = chars.peek() {
                if escaped {
                    key.push(c);
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '.' || c == '[' {
                    break;
                } else {
                    key.push(c);
                }
                chars.next();
            }
            if escaped {
                return Err(bad("ends with `\\`"));
            }
            steps.push(if key == "*" {
                Step::AnyKey
            } else {
                Step::Key(key)
            });
            want_key = false;
        }
        if steps.is_empty() {
            return Err(bad("empty path"));
        }
        Ok(Self {
            steps,
            text: text.to_owned(),
        })
    }
}

impl<'de> Deserialize<'de> for Path {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|e: Error| serde::de::Error::custom(e.message))
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Path {
    /// The steps of the path.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The key the path ends with, if it ends with a key (needed by [`Path::rename`] and
    /// [`Path::flatten`]).
    pub fn last_key(&self) -> Option<&str> {
        match self.steps.last() {
            Some(Step::Key(k)) => Some(k),
            _ => None,
        }
    }

    /// The first value the path reaches.
    ///
    /// ```
    /// # use bff_plugin_sdk::json::Path;
    /// let doc = serde_json::json!({"orders": [{"id": 1}, {"id": 2}]});
    /// let p: Path = "orders[1].id".parse().unwrap();
    /// assert_eq!(p.get(&doc), Some(&serde_json::json!(2)));
    /// ```
    pub fn get<'v>(&self, value: &'v Value) -> Option<&'v Value> {
        self.get_all(value).into_iter().next()
    }

    /// Every value the path reaches, in document order.
    pub fn get_all<'v>(&self, value: &'v Value) -> Vec<&'v Value> {
        let mut out = Vec::new();
        collect(value, &self.steps, &mut out);
        out
    }

    /// Sets every place the path reaches to `new`; missing object keys along the way are
    /// created (a missing or `null` value becomes an object), missing array elements are not.
    /// Returns how many places were set.
    ///
    /// ```
    /// # use bff_plugin_sdk::json::Path;
    /// let mut doc = serde_json::json!({"items": [{}, {}]});
    /// let p: Path = "items[].meta.seen".parse().unwrap();
    /// assert_eq!(p.set(&mut doc, serde_json::json!(true)), 2);
    /// assert_eq!(doc["items"][1]["meta"]["seen"], true);
    /// ```
    pub fn set(&self, value: &mut Value, new: Value) -> usize {
        let mut count = 0;
        set_at(value, &self.steps, &new, &mut count);
        count
    }

    /// Removes every value the path reaches and returns them.
    pub fn remove(&self, value: &mut Value) -> Vec<Value> {
        let (init, last) = self.split_last();
        let mut removed = Vec::new();
        visit_mut(value, init, &mut |parent| match (last, parent) {
            (Step::Key(k), Value::Object(o)) => removed.extend(o.remove(k)),
            (Step::AnyKey, Value::Object(o)) => {
                removed.extend(std::mem::take(o).into_iter().map(|(_, v)| v));
            }
            (Step::Index(i), Value::Array(a)) if *i < a.len() => removed.push(a.remove(*i)),
            (Step::Each, Value::Array(a)) => removed.append(a),
            _ => {}
        });
        removed
    }

    /// Renames the key the path ends with to `new_key`, wherever the path reaches (an existing
    /// `new_key` is replaced). Returns how many keys were renamed; 0 if the path does not end
    /// with a key.
    ///
    /// ```
    /// # use bff_plugin_sdk::json::Path;
    /// let mut doc = serde_json::json!({"items": [{"title": "a"}, {"title": "b"}]});
    /// let p: Path = "items[].title".parse().unwrap();
    /// assert_eq!(p.rename(&mut doc, "name"), 2);
    /// assert_eq!(doc, serde_json::json!({"items": [{"name": "a"}, {"name": "b"}]}));
    /// ```
    pub fn rename(&self, value: &mut Value, new_key: &str) -> usize {
        let Some(key) = self.last_key() else { return 0 };
        let mut count = 0;
        visit_mut(value, self.split_last().0, &mut |parent| {
            if let Value::Object(o) = parent
                && let Some(v) = o.remove(key)
            {
                o.insert(new_key.to_owned(), v);
                count += 1;
            }
        });
        count
    }

    /// Lifts the fields of the object the path ends at into its parent, each key prefixed with
    /// `prefix` (an existing key of the same name is replaced), and removes the object. Returns
    /// how many objects were flattened; a value that is not an object is left alone.
    ///
    /// ```
    /// # use bff_plugin_sdk::json::Path;
    /// let mut doc = serde_json::json!({"user": {"id": 7, "name": {"first": "Ada", "last": "L"}}});
    /// let p: Path = "user.name".parse().unwrap();
    /// assert_eq!(p.flatten(&mut doc, "name_"), 1);
    /// assert_eq!(doc, serde_json::json!({"user": {"id": 7, "name_first": "Ada", "name_last": "L"}}));
    /// ```
    pub fn flatten(&self, value: &mut Value, prefix: &str) -> usize {
        let Some(key) = self.last_key() else { return 0 };
        let mut count = 0;
        visit_mut(value, self.split_last().0, &mut |parent| {
            if let Value::Object(o) = parent
                && let Some(Value::Object(_)) = o.get(key)
                && let Some(Value::Object(inner)) = o.remove(key)
            {
                for (k, v) in inner {
                    o.insert(format!("{prefix}{k}"), v);
                }
                count += 1;
            }
        });
        count
    }

    fn split_last(&self) -> (&[Step], &Step) {
        let (last, init) = self
            .steps
            .split_last()
            .expect("a parsed path has at least one step");
        (init, last)
    }
}

fn collect<'v>(value: &'v Value, steps: &[Step], out: &mut Vec<&'v Value>) {
    let Some((step, rest)) = steps.split_first() else {
        out.push(value);
        return;
    };
    match (step, value) {
        (Step::Key(k), Value::Object(o)) => {
            if let Some(v) = o.get(k) {
                collect(v, rest, out);
            }
        }
        (Step::AnyKey, Value::Object(o)) => o.values().for_each(|v| collect(v, rest, out)),
        (Step::Index(i), Value::Array(a)) => {
            if let Some(v) = a.get(*i) {
                collect(v, rest, out);
            }
        }
        (Step::Each, Value::Array(a)) => a.iter().for_each(|v| collect(v, rest, out)),
        _ => {}
    }
}

/// Calls `f` on every value `steps` reach.
fn visit_mut(value: &mut Value, steps: &[Step], f: &mut dyn FnMut(&mut Value)) {
    let Some((step, rest)) = steps.split_first() else {
        f(value);
        return;
    };
    match (step, value) {
        (Step::Key(k), Value::Object(o)) => {
            if let Some(v) = o.get_mut(k) {
                visit_mut(v, rest, f);
            }
        }
        (Step::AnyKey, Value::Object(o)) => o.values_mut().for_each(|v| visit_mut(v, rest, f)),
        (Step::Index(i), Value::Array(a)) => {
            if let Some(v) = a.get_mut(*i) {
                visit_mut(v, rest, f);
            }
        }
        (Step::Each, Value::Array(a)) => a.iter_mut().for_each(|v| visit_mut(v, rest, f)),
        _ => {}
    }
}

fn set_at(value: &mut Value, steps: &[Step], new: &Value, count: &mut usize) {
    let Some((step, rest)) = steps.split_first() else {
        *value = new.clone();
        *count += 1;
        return;
    };
    if let Step::Key(k) = step {
        if value.is_null() {
            *value = Value::Object(Map::new());
        }
        if let Value::Object(o) = value {
            // Create the key only where the rest of the path can be created too.
            let creatable = matches!(rest.first(), None | Some(Step::Key(_)));
            if creatable {
                set_at(o.entry(k.clone()).or_insert(Value::Null), rest, new, count);
            } else if let Some(v) = o.get_mut(k) {
                set_at(v, rest, new, count);
            }
        }
        return;
    }
    match (step, value) {
        (Step::AnyKey, Value::Object(o)) => {
            o.values_mut().for_each(|v| set_at(v, rest, new, count));
        }
        (Step::Index(i), Value::Array(a)) => {
            if let Some(v) = a.get_mut(*i) {
                set_at(v, rest, new, count);
            }
        }
        (Step::Each, Value::Array(a)) => a.iter_mut().for_each(|v| set_at(v, rest, new, count)),
        _ => {}
    }
}

/// A trie of paths, for [`pick`].
#[derive(Debug, Clone, Default)]
struct Node {
    /// A path ends here: keep the whole value.
    end: bool,
    children: Vec<(Step, Node)>,
}

impl Node {
    fn insert(&mut self, steps: &[Step]) {
        let Some((step, rest)) = steps.split_first() else {
            self.end = true;
            return;
        };
        let pos = match self.children.iter().position(|(s, _)| s == step) {
            Some(p) => p,
            None => {
                self.children.push((step.clone(), Node::default()));
                self.children.len() - 1
            }
        };
        self.children[pos].1.insert(rest);
    }

    /// The child for `step`, if any.
    fn child(&self, step: &Step) -> Option<&Node> {
        self.children
            .iter()
            .find(|(s, _)| s == step)
            .map(|(_, n)| n)
    }

    /// The child for key `k`, if any (without building a [`Step`]).
    fn key_child(&self, k: &str) -> Option<&Node> {
        self.children.iter().find_map(|(s, n)| match s {
            Step::Key(key) if key == k => Some(n),
            _ => None,
        })
    }

    /// Adds everything `other` selects to this node.
    fn absorb(&mut self, other: &Node) {
        self.end |= other.end;
        for (step, theirs) in &other.children {
            match self.children.iter_mut().find(|(s, _)| s == step) {
                Some((_, ours)) => ours.absorb(theirs),
                None => self.children.push((step.clone(), theirs.clone())),
            }
        }
    }

    /// Makes each value's node say all that is selected of it, so [`project`] follows one node
    /// per value and never merges two projections: a node that keeps its whole value drops its
    /// children, a key also gets what `*` selects, an index what `[]` selects.
    fn normalize(&mut self) {
        if self.end {
            self.children.clear();
            return;
        }
        let any_key = self.child(&Step::AnyKey).cloned();
        let each = self.child(&Step::Each).cloned();
        for (step, node) in &mut self.children {
            match (step, &any_key, &each) {
                (Step::Key(_), Some(any), _) => node.absorb(any),
                (Step::Index(_), _, Some(each)) => node.absorb(each),
                _ => {}
            }
        }
        for (_, node) in &mut self.children {
            node.normalize();
        }
    }
}

/// What `node` (normalized) selects of `value`, or `None` if nothing.
fn project(value: &Value, node: &Node) -> Option<Value> {
    if node.end {
        return Some(value.clone());
    }
    match value {
        Value::Object(o) => {
            let mut out = Map::new();
            match node.child(&Step::AnyKey) {
                // Every key: by its own node if it has one (which includes what `*` selects).
                Some(any) => {
                    for (k, v) in o {
                        let n = node.key_child(k).unwrap_or(any);
                        if let Some(p) = project(v, n) {
                            out.insert(k.clone(), p);
                        }
                    }
                }
                None => {
                    for (step, child) in &node.children {
                        if let Step::Key(k) = step
                            && let Some(p) = o.get(k).and_then(|v| project(v, child))
                        {
                            out.insert(k.clone(), p);
                        }
                    }
                }
            }
            (!out.is_empty()).then_some(Value::Object(out))
        }
        Value::Array(a) => {
            let each = node.child(&Step::Each);
            let indexed = node
                .children
                .iter()
                .any(|(s, _)| matches!(s, Step::Index(_)));
            let mut out = Vec::new();
            for (i, v) in a.iter().enumerate() {
                // An element's own index node includes what `[]` selects.
                let n = if indexed {
                    node.child(&Step::Index(i)).or(each)
                } else {
                    each
                };
                let Some(n) = n else { continue };
                match project(v, n) {
                    Some(p) => out.push(p),
                    // With `[]`, every element keeps its place (possibly as `{}`); with indexes
                    // only, just the chosen elements.
                    None if each.is_some() && v.is_object() => out.push(Value::Object(Map::new())),
                    None => {}
                }
            }
            (!out.is_empty() || each.is_some()).then_some(Value::Array(out))
        }
        _ => None,
    }
}

/// A copy of `value` with only what `paths` reach (an allow-list). Objects keep their shape; an
/// array under `[]` keeps every element, each trimmed the same way. To apply the same paths to
/// many documents, build a [`Selection`] once instead.
pub fn pick(value: &Value, paths: &[Path]) -> Value {
    Selection::new(paths).pick(value)
}

/// Paths merged into one tree, built once (in [`Plugin::new`](crate::Plugin::new)) and applied to
/// every document: [`pick`] without rebuilding the tree each time.
///
/// ```
/// # use bff_plugin_sdk::json::{Path, Selection};
/// let paths: Vec<Path> = ["id", "price.amount"].iter().map(|p| p.parse().unwrap()).collect();
/// let keep = Selection::new(&paths);
/// let doc = serde_json::json!({"id": 7, "price": {"amount": 5, "currency": "EUR"}, "raw": "…"});
/// assert_eq!(keep.pick(&doc), serde_json::json!({"id": 7, "price": {"amount": 5}}));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Selection {
    root: Node,
}

impl Selection {
    /// The tree of `paths`.
    pub fn new(paths: &[Path]) -> Self {
        let mut root = Node::default();
        for p in paths {
            root.insert(&p.steps);
        }
        root.normalize();
        Self { root }
    }

    /// A copy of `value` with only what the paths reach (see [`pick`]).
    pub fn pick(&self, value: &Value) -> Value {
        project(value, &self.root).unwrap_or_else(|| match value {
            Value::Array(_) => Value::Array(Vec::new()),
            _ => Value::Object(Map::new()),
        })
    }
}

/// Removes everything `paths` reach (a deny-list), in place.
///
/// ```
/// # use bff_plugin_sdk::json::{Path, omit};
/// let mut doc = serde_json::json!({"user": {"name": "Ada", "email": "a@x"}, "items": [{"id": 1, "raw": "…"}]});
/// let deny: Vec<Path> = ["user.email", "items[].raw"].iter().map(|p| p.parse().unwrap()).collect();
/// omit(&mut doc, &deny);
/// assert_eq!(doc, serde_json::json!({"user": {"name": "Ada"}, "items": [{"id": 1}]}));
/// ```
pub fn omit(value: &mut Value, paths: &[Path]) {
    for p in paths {
        p.remove(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(s: &str) -> Path {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ps(s: &[&str]) -> Vec<Path> {
        s.iter().map(|s| p(s)).collect()
    }

    #[test]
    fn parses_every_form() {
        use Step::*;
        assert_eq!(
            p("a.b[2][].*.c\\.d").steps(),
            [
                Key("a".into()),
                Key("b".into()),
                Index(2),
                Each,
                AnyKey,
                Key("c.d".into())
            ]
        );
        assert_eq!(p("[].id").steps(), [Each, Key("id".into())]);
        assert_eq!(p("a.b").to_string(), "a.b");
    }

    #[test]
    fn rejects_malformed_paths_with_the_reason() {
        for (bad, why) in [
            ("", "empty path"),
            ("a..b", "empty key"),
            (".a", "empty key"),
            ("a.", "ends with `.`"),
            ("a[x]", "inside brackets"),
            ("a[1", "unclosed"),
            ("a[0]b", "must follow"),
            ("a\\", "ends with"),
        ] {
            let err = bad.parse::<Path>().expect_err(bad);
            assert_eq!(err.kind, crate::ErrorKind::InvalidConfig);
            assert!(err.message.contains(why), "{bad}: {}", err.message);
        }
    }

    #[test]
    fn deserializes_from_config() {
        let v: Vec<Path> = serde_json::from_value(json!(["a.b", "c[]"])).expect("ok");
        assert_eq!(v.len(), 2);
        let err = serde_json::from_value::<Vec<Path>>(json!(["a..b"])).expect_err("fails");
        assert!(err.to_string().contains("empty key"), "{err}");
    }

    #[test]
    fn get_and_get_all() {
        let doc = json!({"a": [{"b": 1}, {"b": 2}, {"c": 3}], "m": {"x": {"v": 1}, "y": {"v": 2}}});
        assert_eq!(p("a[1].b").get(&doc), Some(&json!(2)));
        assert_eq!(p("a[].b").get_all(&doc), [&json!(1), &json!(2)]);
        assert_eq!(p("m.*.v").get_all(&doc).len(), 2);
        assert_eq!(
            p("a.b").get(&doc),
            None,
            "a key does not reach into an array"
        );
        assert_eq!(p("a[9]").get(&doc), None);
    }

    #[test]
    fn set_creates_objects_but_not_array_elements() {
        let mut doc = json!({"a": null, "list": []});
        assert_eq!(p("a.b.c").set(&mut doc, json!(1)), 1);
        assert_eq!(p("list[3].x").set(&mut doc, json!(1)), 0);
        assert_eq!(p("missing[0]").set(&mut doc, json!(1)), 0);
        assert_eq!(doc, json!({"a": {"b": {"c": 1}}, "list": []}));
        assert_eq!(p("a.b").set(&mut doc, json!("x")), 1);
        assert_eq!(doc["a"], json!({"b": "x"}));
    }

    #[test]
    fn remove_each_form() {
        let mut doc = json!({"a": [1, 2, 3], "o": {"x": 1, "y": 2}, "k": {"z": 1}});
        assert_eq!(p("a[1]").remove(&mut doc), [json!(2)]);
        assert_eq!(p("o.*").remove(&mut doc).len(), 2);
        assert_eq!(p("k.z").remove(&mut doc), [json!(1)]);
        assert_eq!(p("a[]").remove(&mut doc).len(), 2);
        assert_eq!(doc, json!({"a": [], "o": {}, "k": {}}));
        assert!(p("nope.x").remove(&mut doc).is_empty());
    }

    #[test]
    fn rename_and_flatten_need_a_final_key() {
        let mut doc = json!({"a": [{"b": {"c": 1}}]});
        assert_eq!(p("a[0]").rename(&mut doc, "x"), 0);
        assert_eq!(p("a[]").flatten(&mut doc, ""), 0);
        assert_eq!(p("a[].b").flatten(&mut doc, ""), 1);
        assert_eq!(doc, json!({"a": [{"c": 1}]}));
        assert_eq!(p("a[].c").flatten(&mut doc, ""), 0, "not an object");
    }

    #[test]
    fn pick_keeps_shape_and_arrays() {
        let doc = json!({
            "user": {"name": {"first": "Ada", "last": "L"}, "email": "e"},
            "orders": [{"id": 1, "total": 5, "lines": [{"sku": "a", "qty": 1}]}, {"id": 2, "total": 6, "lines": []}],
            "tags": ["x", "y"],
            "n": 3
        });
        assert_eq!(
            pick(
                &doc,
                &ps(&[
                    "user.name.first",
                    "orders[].id",
                    "orders[].lines[].sku",
                    "n"
                ])
            ),
            json!({
                "user": {"name": {"first": "Ada"}},
                "orders": [{"id": 1, "lines": [{"sku": "a"}]}, {"id": 2, "lines": []}],
                "n": 3
            })
        );
        assert_eq!(
            pick(&doc, &ps(&["orders[1].id"])),
            json!({"orders": [{"id": 2}]})
        );
        assert_eq!(pick(&doc, &ps(&["tags"])), json!({"tags": ["x", "y"]}));
        assert_eq!(pick(&doc, &ps(&["nothing.here"])), json!({}));
        assert_eq!(
            pick(&json!([{"a": 1, "b": 2}]), &ps(&["[].a"])),
            json!([{"a": 1}])
        );
    }

    #[test]
    fn pick_merges_overlapping_paths() {
        let doc = json!({"m": {"x": {"a": 1, "b": 2, "c": 3}}});
        assert_eq!(
            pick(&doc, &ps(&["m.*.a", "m.x.b"])),
            json!({"m": {"x": {"a": 1, "b": 2}}})
        );
        assert_eq!(pick(&doc, &ps(&["m", "m.x.a"])), doc);
    }

    #[test]
    fn overlapping_paths_never_lose_what_one_of_them_keeps() {
        // `[]` keeps every element whole; `[0][1]` alone would keep one value of the first. The
        // two together keep everything (merging the two projections used to drop `1` and `3`).
        let doc = json!({"l": [[1, 2, 3], 4], "m": {"x": [1, 2], "y": [3]}});
        assert_eq!(
            pick(&doc, &ps(&["l[]", "l[0][1]"])),
            json!({"l": [[1, 2, 3], 4]})
        );
        assert_eq!(
            pick(&doc, &ps(&["l[0][1]", "l[]"])),
            json!({"l": [[1, 2, 3], 4]})
        );
        // `m.*` keeps each value whole, whatever `m.x[0]` says.
        assert_eq!(
            pick(&doc, &ps(&["m.x[0]", "m.*"])),
            json!({"m": {"x": [1, 2], "y": [3]}})
        );
        // Indexes with `[]` below: the chosen element gets both selections.
        let items = json!({"i": [{"a": 1, "b": 2, "c": 3}, {"a": 4, "b": 5, "c": 6}]});
        assert_eq!(
            pick(&items, &ps(&["i[].a", "i[1].b"])),
            json!({"i": [{"a": 1}, {"a": 4, "b": 5}]})
        );
    }

    #[test]
    fn omit_removes_every_listed_path() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "l": [{"x": 1, "y": 2}, {"x": 3}]});
        omit(&mut doc, &ps(&["a.b", "l[].x", "missing"]));
        assert_eq!(doc, json!({"a": {"c": 2}, "l": [{"y": 2}, {}]}));
    }

    /// Random documents and paths (a fixed-seed generator, so a failure reproduces): a path's
    /// text parses back to its steps, `pick` keeps everything a path reaches, `omit` leaves
    /// nothing it reaches, `rename` moves what it reaches, `set` puts the value wherever the path
    /// then reaches.
    #[test]
    fn random_documents_and_paths_keep_the_helpers_promises() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for case in 0..4000 {
            let doc = rng.value(3);
            let paths: Vec<Vec<Step>> = (0..1 + rng.below(3)).map(|_| rng.path(&doc)).collect();
            let parsed: Vec<Path> = paths
                .iter()
                .map(|steps| {
                    let text = render(steps);
                    let path = p(&text);
                    assert_eq!(path.steps(), &steps[..], "case {case}: `{text}`");
                    path
                })
                .collect();
            let picked = pick(&doc, &parsed);
            for path in &parsed {
                // An index picks the element out of its array, so its position changes.
                if path.steps().iter().any(|s| matches!(s, Step::Index(_))) {
                    continue;
                }
                assert_eq!(
                    path.get_all(&picked),
                    path.get_all(&doc),
                    "case {case}: pick {path} from {doc} gave {picked}"
                );
            }
            for path in &parsed {
                // Removing element i moves the next one into its place.
                if matches!(path.steps().last(), Some(Step::Index(_))) {
                    continue;
                }
                let mut trimmed = doc.clone();
                omit(&mut trimmed, std::slice::from_ref(path));
                assert!(
                    path.get_all(&trimmed).is_empty(),
                    "case {case}: omit {path} from {doc} left {trimmed}"
                );
                if let Some(Step::Key(_)) = path.steps().last() {
                    let mut renamed = doc.clone();
                    let n = path.rename(&mut renamed, "new");
                    let mut moved = path.steps().to_vec();
                    moved.pop();
                    moved.push(Step::Key("new".into()));
                    let moved = p(&render(&moved));
                    assert_eq!(
                        n,
                        path.get_all(&doc).len(),
                        "case {case}: rename {path} in {doc}"
                    );
                    assert_eq!(
                        moved.get_all(&renamed),
                        path.get_all(&doc),
                        "case {case}: rename {path} in {doc} gave {renamed}"
                    );
                }
                let mut set = doc.clone();
                let n = path.set(&mut set, json!("SET"));
                let reached = path.get_all(&set);
                assert_eq!(
                    reached.len(),
                    n,
                    "case {case}: set {path} on {doc} gave {set}"
                );
                assert!(
                    reached.iter().all(|v| **v == json!("SET")),
                    "case {case}: set {path} on {doc} gave {set}"
                );
            }
        }
    }

    /// xorshift64: enough randomness for shapes, no dependency.
    struct Rng(u64);

    /// Keys with the characters paths escape (`.`, `[`, `\\`). (An empty key has no path.)
    const KEYS: [&str; 5] = ["a", "b", "c.d", "e[0]", "f\\g"];

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn key(&mut self) -> String {
            KEYS[self.below(KEYS.len())].to_owned()
        }

        fn value(&mut self, depth: u32) -> Value {
            match (depth, self.below(7)) {
                (_, 0) => Value::Null,
                (_, 1) => json!(self.below(100)),
                (_, 2) => json!(format!("s{}", self.below(10))),
                (0, _) => json!(self.below(2) == 0),
                (_, 3 | 4) => {
                    Value::Array((0..self.below(4)).map(|_| self.value(depth - 1)).collect())
                }
                _ => Value::Object(
                    (0..self.below(4))
                        .map(|_| (self.key(), self.value(depth - 1)))
                        .collect(),
                ),
            }
        }

        /// A path that mostly follows `doc`'s shape, with the odd step that reaches nothing.
        fn path(&mut self, doc: &Value) -> Vec<Step> {
            let mut steps = Vec::new();
            let mut at = Some(doc);
            loop {
                let step = match (at, self.below(8)) {
                    (_, 0) => Step::Key(self.key()),
                    (_, 1) => Step::AnyKey,
                    (Some(Value::Object(o)), _) if !o.is_empty() => {
                        let k = o
                            .keys()
                            .nth(self.below(o.len()))
                            .cloned()
                            .unwrap_or_default();
                        Step::Key(k)
                    }
                    (Some(Value::Array(a)), n) if !a.is_empty() => {
                        if n % 2 == 0 {
                            Step::Each
                        } else {
                            Step::Index(self.below(a.len() + 1))
                        }
                    }
                    _ => Step::Key(self.key()),
                };
                at = at.and_then(|v| match (&step, v) {
                    (Step::Key(k), Value::Object(o)) => o.get(k),
                    (Step::Index(i), Value::Array(a)) => a.get(*i),
                    (Step::Each, Value::Array(a)) => a.first(),
                    (Step::AnyKey, Value::Object(o)) => o.values().next(),
                    _ => None,
                });
                steps.push(step);
                if steps.len() >= 4 || self.below(3) == 0 {
                    return steps;
                }
            }
        }
    }

    /// The text of `steps` in the path syntax.
    fn render(steps: &[Step]) -> String {
        let mut out = String::new();
        for (i, step) in steps.iter().enumerate() {
            match step {
                Step::Key(k) => {
                    if i > 0 {
                        out.push('.');
                    }
                    for c in k.chars() {
                        if matches!(c, '.' | '[' | '\\') {
                            out.push('\\');
                        }
                        out.push(c);
                    }
                }
                Step::AnyKey => {
                    if i > 0 {
                        out.push('.');
                    }
                    out.push('*');
                }
                Step::Index(n) => out.push_str(&format!("[{n}]")),
                Step::Each => out.push_str("[]"),
            }
        }
        out
    }
}
