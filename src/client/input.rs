//! The batch client's input: one prompt a line, or JSON lines `{"custom_id", "prompt"}`,
//! mixed freely. Each item is named by its `custom_id`, or by its line number when it has
//! none, so every output line can be matched to its input. A line that cannot be an item
//! (not JSON, no prompt, a name used twice) is reported as failed rather than stopping the
//! run: the other prompts still go.

use std::collections::HashSet;

use serde::Deserialize;

use ingest_api::handlers::batches::custom_id_problem;

/// A prompt to submit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// 1-based line of the input.
    pub line: usize,
    pub custom_id: String,
    pub prompt: String,
}

/// A line that is not an item, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    pub line: usize,
    pub custom_id: Option<String>,
    pub error: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonItem {
    #[serde(default)]
    custom_id: Option<serde_json::Value>,
    prompt: Option<String>,
}

/// The items of `text`, in order, and the lines that are not items. Blank lines are skipped.
pub fn parse(text: &str) -> (Vec<Item>, Vec<BadLine>) {
    let mut items = Vec::new();
    let mut bad = Vec::new();
    let mut seen = HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            continue;
        }
        match item_of(line, trimmed, &mut seen) {
            Ok(item) => items.push(item),
            Err((custom_id, error)) => bad.push(BadLine {
                line,
                custom_id,
                error,
            }),
        }
    }
    (items, bad)
}

type LineError = (Option<String>, String);

fn item_of(line: usize, text: &str, seen: &mut HashSet<String>) -> Result<Item, LineError> {
    let (custom_id, prompt) = if text.starts_with('{') {
        let json: JsonItem = serde_json::from_str(text)
            .map_err(|e| (None, format!("not a JSON item {{custom_id, prompt}}: {e}")))?;
        let custom_id = match json.custom_id {
            None => line.to_string(),
            Some(serde_json::Value::String(s)) => s,
            // A number is a fine name; written back as text.
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(_) => return Err((None, "custom_id must be a string".into())),
        };
        let prompt = json
            .prompt
            .ok_or_else(|| (Some(custom_id.clone()), "no prompt".to_owned()))?;
        (custom_id, prompt)
    } else {
        (line.to_string(), text.to_owned())
    };
    let named = |error: String| (Some(custom_id.clone()), error);
    // The API's own rule, so a line it would refuse is reported here.
    if let Some(problem) = custom_id_problem(&custom_id) {
        return Err(named(problem));
    }
    if prompt.trim().is_empty() {
        return Err(named("the prompt is empty".into()));
    }
    if !seen.insert(custom_id.clone()) {
        return Err(named(format!("custom_id {custom_id:?} is used twice")));
    }
    Ok(Item {
        line,
        custom_id,
        prompt: prompt.trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_json_items_mix_and_bad_lines_are_named() {
        let text = "Yoda\n\n{\"custom_id\": \"a\", \"prompt\": \"Gandalf\"}\n{\"prompt\": \"Ada\"}\n\
                    {not json\n{\"custom_id\": \"a\", \"prompt\": \"again\"}\n{\"custom_id\": 7, \"prompt\": \" \"}\n";
        let (items, bad) = parse(text);
        let got: Vec<(usize, &str, &str)> = items
            .iter()
            .map(|i| (i.line, i.custom_id.as_str(), i.prompt.as_str()))
            .collect();
        assert_eq!(
            got,
            [(1, "1", "Yoda"), (3, "a", "Gandalf"), (4, "4", "Ada")]
        );
        let lines: Vec<(usize, Option<&str>)> = bad
            .iter()
            .map(|b| (b.line, b.custom_id.as_deref()))
            .collect();
        assert_eq!(lines, [(5, None), (6, Some("a")), (7, Some("7"))]);
        assert!(bad[1].error.contains("used twice"), "{:?}", bad[1]);
        assert!(bad[2].error.contains("empty"), "{:?}", bad[2]);
    }
}
