//! Validates JSON documents against the Kubernetes JSON schemas (the strict
//! flavour: unknown fields are errors), offline.
//!
//! The schema file (`testdata/schema/k8s-v*.json`, made by `generate.py`
//! there from the schemas the PyPI package kubernetes-validate bundles)
//! holds the definitions the kinds we use reach. They use a small part of
//! JSON Schema: `type`, `enum`, `properties`, `additionalProperties`,
//! `required`, `items`, `$ref`, `oneOf`, `format`, plus `x-kubernetes-*`
//! annotations. This validator implements exactly those and refuses a
//! schema that uses anything else, so a newer schema cannot be half
//! checked without notice.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

pub struct Schemas {
    defs: Map<String, Value>,
    /// `"apps/v1 DaemonSet"` → definition name.
    kinds: BTreeMap<String, String>,
}

/// Keywords that only annotate.
const ANNOTATIONS: &[&str] = &[
    "description",
    "x-kubernetes-group-version-kind",
    "x-kubernetes-patch-strategy",
    "x-kubernetes-patch-merge-key",
    "x-kubernetes-map-type",
    "x-kubernetes-unions",
    "x-kubernetes-list-map-keys",
];

impl Schemas {
    pub fn parse(text: &str) -> Schemas {
        let v: Value = serde_json::from_str(text).expect("schema file is JSON");
        let defs = v["$defs"].as_object().expect("$defs").clone();
        let kinds = v["kinds"]
            .as_object()
            .expect("kinds")
            .iter()
            .map(|(k, d)| (k.clone(), d.as_str().expect("definition name").to_owned()))
            .collect();
        Schemas { defs, kinds }
    }

    /// Every problem with `doc`, as `path: message`; empty when valid.
    pub fn validate(&self, doc: &Value) -> Vec<String> {
        let api = doc["apiVersion"].as_str().unwrap_or("");
        let kind = doc["kind"].as_str().unwrap_or("");
        let Some(def) = self.kinds.get(&format!("{api} {kind}")) else {
            return vec![format!(
                "no schema for apiVersion `{api}` kind `{kind}` (add it to generate.py)"
            )];
        };
        let mut problems = Vec::new();
        let schema = Value::String(format!("#/$defs/{def}"));
        let mut root = Map::new();
        root.insert("$ref".into(), schema);
        self.check(&Value::Object(root), doc, "", &mut problems);
        problems
    }

    /// Every problem with `doc` against `schema` (a CRD's
    /// `openAPIV3Schema`, say), as `path: message`.
    #[cfg(feature = "k8s")]
    pub fn check_schema(&self, schema: &Value, doc: &Value) -> Vec<String> {
        let mut problems = Vec::new();
        self.check(schema, doc, "", &mut problems);
        problems
    }

    fn resolve<'a>(&'a self, reference: &str) -> &'a Value {
        let name = reference
            .strip_prefix("#/$defs/")
            .unwrap_or_else(|| panic!("unsupported $ref {reference}"));
        self.defs
            .get(name)
            .unwrap_or_else(|| panic!("$ref to a missing definition {name}"))
    }

    fn check(&self, schema: &Value, v: &Value, at: &str, out: &mut Vec<String>) {
        let Some(s) = schema.as_object() else {
            // `additionalProperties: true` and friends.
            assert!(schema.is_boolean(), "schema at {at} is not an object");
            if schema == &Value::Bool(false) {
                out.push(format!("{at}: not allowed"));
            }
            return;
        };
        for key in s.keys() {
            let known = [
                "$ref",
                "type",
                "enum",
                "properties",
                "additionalProperties",
                "required",
                "items",
                "oneOf",
                "format",
                "x-kubernetes-list-type",
                // A CRD's openAPIV3Schema (structural schemas).
                "nullable",
                "minimum",
                "x-kubernetes-preserve-unknown-fields",
            ];
            assert!(
                known.contains(&key.as_str()) || ANNOTATIONS.contains(&key.as_str()),
                "the schema uses `{key}` (at {at}), which this validator does not implement"
            );
        }
        if v.is_null() && s.get("nullable") == Some(&Value::Bool(true)) {
            return;
        }
        if let (Some(min), Some(n)) = (s.get("minimum").and_then(Value::as_f64), v.as_f64())
            && n < min
        {
            out.push(format!("{at}: {v} is below the minimum {min}"));
        }
        if let Some(r) = s.get("$ref") {
            self.check(self.resolve(r.as_str().expect("$ref string")), v, at, out);
        }
        if let Some(t) = s.get("type") {
            let types: Vec<&str> = match t {
                Value::String(one) => vec![one.as_str()],
                Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
                _ => panic!("bad type at {at}"),
            };
            if !types.iter().any(|t| type_matches(t, v)) {
                out.push(format!(
                    "{at}: expected {}, found {}",
                    types.join(" or "),
                    describe(v)
                ));
                return;
            }
        }
        if let Some(Value::Array(choices)) = s.get("enum")
            && !v.is_null()
            && !choices.contains(v)
        {
            out.push(format!(
                "{at}: {v} is not one of {}",
                Value::Array(choices.clone())
            ));
        }
        if let Some(Value::Array(options)) = s.get("oneOf") {
            let passing = options
                .iter()
                .filter(|o| {
                    let mut sub = Vec::new();
                    self.check(o, v, at, &mut sub);
                    sub.is_empty()
                })
                .count();
            // IntOrString and Quantity list string and number separately;
            // `null` matches both, which is fine (the field is optional).
            if passing == 0 || (passing > 1 && !v.is_null()) {
                out.push(format!("{at}: {v} matches {passing} of the oneOf choices"));
            }
        }
        if let Some(f) = s.get("format").and_then(Value::as_str) {
            check_format(f, v, at, out);
        }
        if let Value::Object(obj) = v {
            let props = s.get("properties").and_then(Value::as_object);
            if let Some(Value::Array(required)) = s.get("required") {
                for r in required.iter().filter_map(Value::as_str) {
                    if !obj.contains_key(r) {
                        out.push(format!("{at}: missing required field `{r}`"));
                    }
                }
            }
            for (k, child) in obj {
                let path = format!("{at}.{k}");
                match props.and_then(|p| p.get(k)) {
                    Some(ps) => self.check(ps, child, &path, out),
                    None => match s.get("additionalProperties") {
                        Some(Value::Bool(false)) => out.push(format!("{path}: unknown field")),
                        Some(extra) => self.check(extra, child, &path, out),
                        None => {}
                    },
                }
            }
        }
        if let Value::Array(items) = v {
            if let Some(item_schema) = s.get("items") {
                for (i, item) in items.iter().enumerate() {
                    self.check(item_schema, item, &format!("{at}[{i}]"), out);
                }
            }
            match s.get("x-kubernetes-list-type").and_then(Value::as_str) {
                Some("map") => {
                    let keys: Vec<&str> = s
                        .get("x-kubernetes-list-map-keys")
                        .and_then(Value::as_array)
                        .map(|k| k.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    let mut seen = Vec::new();
                    for item in items {
                        let key: Vec<&Value> = keys.iter().map(|k| &item[*k]).collect();
                        if seen.contains(&key) {
                            out.push(format!("{at}: two entries with the same {keys:?}: {key:?}"));
                        }
                        seen.push(key);
                    }
                }
                Some("set") => {
                    for (i, item) in items.iter().enumerate() {
                        if items[..i].contains(item) {
                            out.push(format!("{at}: {item} appears twice in a set"));
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        other => panic!("unknown JSON schema type {other}"),
    }
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn check_format(format: &str, v: &Value, at: &str, out: &mut Vec<String>) {
    let problem = match (format, v) {
        ("int32", Value::Number(n)) if n.as_i64().is_none_or(|n| i32::try_from(n).is_err()) => {
            format!("{v} does not fit in int32")
        }
        ("int64", Value::Number(n)) if n.is_u64() && n.as_i64().is_none() => {
            format!("{v} does not fit in int64")
        }
        ("byte", Value::String(s))
            if !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=\n\r".contains(&b)) =>
        {
            "not base64".to_owned()
        }
        // Any RFC 3339 time, as the API server takes it (`parse_ts` also
        // refuses years past what Unix ns hold).
        ("date-time", Value::String(s))
            if time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .is_err() =>
        {
            format!("`{s}` is not an RFC 3339 time")
        }
        // Everything else only annotates (`double`, `int-or-string`, ...).
        _ => return,
    };
    out.push(format!("{at}: {problem}"));
}
