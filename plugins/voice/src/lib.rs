//! `voice`: turns a JSON response into a short answer a voice assistant can read out,
//! `{"speech": "..."}`, in the response phase.
//!
//! The config lists sentence templates with `{path}` placeholders into the JSON (see
//! [`bff_plugin_sdk::json`] for paths; `{path|count}` speaks the length of an array or object).
//! A sentence whose placeholders do not all resolve is left out, so a partial aggregate still
//! gives a sensible answer; if no sentence is left, or the response is not a 2xx JSON document,
//! the `fallback` is spoken. The answer is cut at a sentence boundary to `max_chars`.

use bff_plugin_sdk::json::Path;
use bff_plugin_sdk::template::Part;
use bff_plugin_sdk::{Capabilities, Context, Error, Plugin, Response};
use serde::Deserialize;
use serde_json::{Value, json};

/// The plugin's config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Sentence templates, spoken in order.
    pub sentences: Vec<String>,
    /// Spoken when no sentence can be made.
    #[serde(default = "default_fallback")]
    pub fallback: String,
    /// Longest answer in characters (whole sentences are kept).
    #[serde(default = "default_max_chars")]
    pub max_chars: usize,
}

fn default_fallback() -> String {
    "Sorry, I can't answer that right now.".to_owned()
}

fn default_max_chars() -> usize {
    400
}

/// A piece of a sentence template.
#[derive(Debug)]
enum Piece {
    Text(String),
    Value(Path),
    Count(Path),
}

/// The `voice` plugin.
#[derive(Debug)]
pub struct Voice {
    sentences: Vec<Vec<Piece>>,
    fallback: String,
    max_chars: usize,
}

fn parse_sentence(i: usize, template: &str) -> Result<Vec<Piece>, Error> {
    let bad = |why: String| Error::invalid_config(format!("sentences[{i}]: {why}"));
    let parts = bff_plugin_sdk::template::parse(template).map_err(|e| bad(e.message))?;
    let pieces = parts
        .into_iter()
        .map(|part| {
            let inner = match part {
                Part::Text(t) => return Ok(Piece::Text(t.to_owned())),
                Part::Placeholder(inner) => inner,
            };
            let (path, filter) = match inner.split_once('|') {
                Some((p, f)) => (p.trim(), Some(f.trim())),
                None => (inner, None),
            };
            let path: Path = path.parse().map_err(|e: Error| bad(e.message))?;
            match filter {
                None => Ok(Piece::Value(path)),
                Some("count") => Ok(Piece::Count(path)),
                Some(other) => Err(bad(format!("unknown filter `{other}` (known: count)"))),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if pieces
        .iter()
        .all(|p| matches!(p, Piece::Text(t) if t.trim().is_empty()))
    {
        return Err(bad("empty sentence".to_owned()));
    }
    Ok(pieces)
}

/// How a JSON value is read out; `None` for what cannot be (objects, arrays, null, "").
fn speak(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.replace('_', " ")),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(if *b { "yes" } else { "no" }.to_owned()),
        _ => None,
    }
}

impl Voice {
    /// The speech for `doc`.
    pub fn speech(&self, doc: &Value) -> String {
        let mut out = String::new();
        for sentence in &self.sentences {
            let Some(text) = render(sentence, doc) else {
                continue;
            };
            let extra = usize::from(!out.is_empty());
            if out.chars().count() + extra + text.chars().count() > self.max_chars {
                break;
            }
            if extra == 1 {
                out.push(' ');
            }
            out.push_str(&text);
        }
        if out.is_empty() {
            self.fallback.clone()
        } else {
            out
        }
    }
}

fn render(sentence: &[Piece], doc: &Value) -> Option<String> {
    let mut s = String::new();
    for piece in sentence {
        match piece {
            Piece::Text(t) => s.push_str(t),
            Piece::Value(p) => s.push_str(&speak(p.get(doc)?)?),
            Piece::Count(p) => match p.get(doc)? {
                Value::Array(a) => s.push_str(&a.len().to_string()),
                Value::Object(o) => s.push_str(&o.len().to_string()),
                _ => return None,
            },
        }
    }
    Some(s.trim().to_owned())
}

impl Plugin for Voice {
    type Config = Config;

    fn new(config: Config) -> Result<Self, Error> {
        if config.sentences.is_empty() {
            return Err(Error::invalid_config("sentences: at least one is needed"));
        }
        if config.max_chars == 0 {
            return Err(Error::invalid_config("max_chars must be at least 1"));
        }
        let sentences = config
            .sentences
            .iter()
            .enumerate()
            .map(|(i, t)| parse_sentence(i, t))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            sentences,
            fallback: config.fallback,
            max_chars: config.max_chars,
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE.reads_response_body().response_only()
    }

    fn on_response(&self, _ctx: &Context, response: Response) -> Result<Response, Error> {
        let doc = if response.is_success() {
            response.json_body::<Value>().unwrap_or(Value::Null)
        } else {
            Value::Null
        };
        let speech = if doc.is_null() {
            self.fallback.clone()
        } else {
            self.speech(&doc)
        };
        let mut out = Response::json(response.status, &json!({ "speech": speech }))?;
        // Keep what the response says about itself (partial answers, caching), not its encoding.
        for (name, value) in response.headers.iter() {
            if name != "content-type" && name != "content-length" && name != "content-encoding" {
                out.headers.append(name, value);
            }
        }
        Ok(out)
    }
}

bff_plugin_sdk::export!(Voice);

#[cfg(test)]
mod tests {
    use super::*;
    use bff_plugin_sdk::ErrorKind;
    use bff_plugin_sdk::testing::Harness;

    fn cfg() -> Value {
        json!({
            "sentences": [
                "Hi {user.name.first}.",
                "Your latest order, {orders.orders[0].id}, is {orders.orders[0].status}.",
                "You have {orders.orders|count} recent orders.",
                "You have {user.loyalty.points} points.",
            ],
            "fallback": "Sorry, not now.",
        })
    }

    fn speech(h: &Harness<Voice>, resp: Response) -> (u16, String) {
        let out = h.on_response(resp).expect("on_response");
        let v: Value = out.json_body().expect("json");
        (out.status, v["speech"].as_str().expect("speech").to_owned())
    }

    #[test]
    fn speaks_every_sentence_it_can() {
        let h = Harness::<Voice>::new(cfg()).expect("valid");
        let doc = json!({
            "user": {"name": {"first": "Maya"}, "loyalty": {"points": 2340}},
            "orders": {"orders": [{"id": "o-5002", "status": "out_for_delivery"}, {"id": "o-5001"}]}
        });
        let (status, s) = speech(&h, Response::json(200, &doc).expect("json"));
        assert_eq!(status, 200);
        assert_eq!(
            s,
            "Hi Maya. Your latest order, o-5002, is out for delivery. You have 2 recent orders. You have 2340 points."
        );
    }

    #[test]
    fn skips_sentences_with_missing_values_and_falls_back() {
        let h = Harness::<Voice>::new(cfg()).expect("valid");
        let (_, s) = speech(
            &h,
            Response::json(200, &json!({"user": {"name": {"first": "Maya"}}})).expect("json"),
        );
        assert_eq!(s, "Hi Maya.");
        let (status, s) = speech(
            &h,
            Response::json(502, &json!({"error": {}})).expect("json"),
        );
        assert_eq!((status, s.as_str()), (502, "Sorry, not now."));
        let (_, s) = speech(&h, Response::text(200, "plain"));
        assert_eq!(s, "Sorry, not now.");
    }

    #[test]
    fn cuts_at_a_sentence_boundary_and_keeps_headers() {
        let mut c = cfg();
        c["max_chars"] = json!(20);
        let h = Harness::<Voice>::new(c).expect("valid");
        let doc = json!({"user": {"name": {"first": "Maya"}, "loyalty": {"points": 1}}});
        let resp = Response::json(200, &doc)
            .expect("json")
            .with_header("x-bff-partial", "orders");
        let out = h.on_response(resp).expect("on_response");
        assert_eq!(out.headers.get("x-bff-partial"), Some("orders"));
        assert_eq!(out.headers.get_all("content-type").count(), 1);
        assert_eq!(
            out.json_body::<Value>().expect("json")["speech"],
            "Hi Maya."
        );
    }

    #[test]
    fn bad_configs_are_refused_at_load() {
        for (c, want) in [
            (json!({"sentences": []}), "at least one"),
            (json!({"sentences": ["Hi {user."]}), "unclosed"),
            (
                json!({"sentences": ["Hi {a..b}"]}),
                "sentences[0]: invalid JSON path",
            ),
            (
                json!({"sentences": ["{a|upper}"]}),
                "unknown filter `upper`",
            ),
            (
                json!({"sentences": ["ok", "  "]}),
                "sentences[1]: empty sentence",
            ),
            (json!({"sentences": ["ok"], "max_chars": 0}), "max_chars"),
        ] {
            let err = Harness::<Voice>::new(c).expect_err(want);
            assert_eq!(err.kind, ErrorKind::InvalidConfig);
            assert!(err.message.contains(want), "{want}: {}", err.message);
        }
    }
}
