//! The persona's JSON schema for strict structured outputs, generated from [`PersonaDraft`] and
//! reshaped to the subset of JSON Schema OpenAI accepts. Apart from the client so that the
//! schema's rules can be read, and tested, on their own.

use serde_json::Value;

use crate::domain::PersonaDraft;

/// The JSON schema of a persona, as strict structured outputs require it: every property
/// required, no others allowed, and only keywords of OpenAI's supported subset (references are
/// inlined, and an enum of documented variants becomes a plain `enum`).
pub fn persona_schema() -> Value {
    let mut schema = serde_json::to_value(schemars::schema_for!(PersonaDraft)).unwrap_or_default();
    let defs = schema
        .as_object_mut()
        .and_then(|o| {
            o.remove("$schema");
            o.remove("title");
            o.remove("$defs")
        })
        .unwrap_or_default();
    strictify(&mut schema, &defs);
    schema
}

fn strictify(node: &mut Value, defs: &Value) {
    let Some(obj) = node.as_object_mut() else {
        return;
    };
    if let Some(Value::String(r)) = obj.remove("$ref") {
        let name = r.trim_start_matches("#/$defs/");
        if let Some(def) = defs.get(name).and_then(Value::as_object) {
            for (k, v) in def {
                obj.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
    }
    if let Some(Value::Array(alternatives)) = obj.get("oneOf") {
        let consts: Option<Vec<Value>> = alternatives
            .iter()
            .map(|a| a.get("const").cloned())
            .collect();
        if let Some(consts) = consts {
            obj.remove("oneOf");
            obj.insert("type".into(), Value::String("string".into()));
            obj.insert("enum".into(), Value::Array(consts));
        }
    }
    if let Some(props) = obj.get_mut("properties").and_then(Value::as_object_mut) {
        let keys: Vec<Value> = props.keys().cloned().map(Value::String).collect();
        for child in props.values_mut() {
            strictify(child, defs);
        }
        obj.insert("required".into(), Value::Array(keys));
        obj.insert("additionalProperties".into(), Value::Bool(false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_persona_schema_fits_strict_structured_outputs() {
        let schema = persona_schema();
        assert_eq!(schema["type"], "object");
        assert_eq!(schema["additionalProperties"], false);
        assert_eq!(schema["required"].as_array().map(Vec::len), Some(6));
        let text = schema.to_string();
        for unsupported in [
            "$schema",
            "$ref",
            "$defs",
            "oneOf",
            "\"format\"",
            "\"const\"",
        ] {
            assert!(!text.contains(unsupported), "{unsupported} in {text}");
        }
        let source = &schema["properties"]["source"];
        assert_eq!(source["type"], "string");
        assert_eq!(source["enum"], serde_json::json!(["famous", "original"]));
        assert!(source["description"]
            .as_str()
            .is_some_and(|d| d.contains("famous")));
        assert_eq!(schema["properties"]["name"]["type"], "string");
    }
}
