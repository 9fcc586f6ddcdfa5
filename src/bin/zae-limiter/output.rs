//! Printing results as aligned text for people or JSON for programs (`--output`).
//!
//! A command describes its result once, as JSON values; the text form is rendered from
//! the same values, so the two outputs cannot disagree.

use serde_json::{Map, Value};

use crate::args::OutputFormat;

/// Where results go.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    pub format: OutputFormat,
}

impl Out {
    pub fn json(&self) -> bool {
        self.format == OutputFormat::Json
    }

    /// Rows under column names: a JSON array of objects, or an aligned table.
    pub fn table(&self, columns: &[&str], rows: Vec<Vec<Value>>) {
        if self.json() {
            let array: Vec<Value> = rows
                .into_iter()
                .map(|row| {
                    let object: Map<String, Value> =
                        columns.iter().map(|c| c.to_string()).zip(row).collect();
                    Value::Object(object)
                })
                .collect();
            print_json(&Value::Array(array));
            return;
        }
        let header: Vec<String> = columns
            .iter()
            .map(|c| c.replace('_', " ").to_uppercase())
            .collect();
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|row| row.iter().map(text).collect())
            .collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in &cells {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |row: &[String]| {
            let mut out = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                if i + 1 == row.len() {
                    out.push_str(cell);
                } else {
                    out.push_str(&format!("{cell:<w$}  "));
                }
            }
            println!("{}", out.trim_end());
        };
        line(&header);
        for row in &cells {
            line(row);
        }
    }

    /// One record: a JSON object, or `key: value` lines.
    pub fn record(&self, fields: Vec<(&str, Value)>) {
        if self.json() {
            let object: Map<String, Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            print_json(&Value::Object(object));
            return;
        }
        let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
        for (key, value) in &fields {
            println!("{:<width$} {}", format!("{key}:"), text(value));
        }
    }

    /// A sentence for people, or a JSON value for programs.
    pub fn message(&self, sentence: impl AsRef<str>, json: Value) {
        if self.json() {
            print_json(&json);
        } else {
            println!("{}", sentence.as_ref());
        }
    }
}

pub fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// A value as a table cell.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "no".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(", "),
        Value::Object(map) if map.is_empty() => "-".into(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}={}", text(v)))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Epoch milliseconds as an RFC 3339 UTC time.
pub fn timestamp(ms: i64) -> Value {
    let Ok(ms) = u64::try_from(ms) else {
        return Value::Null;
    };
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    Value::String(humantime::format_rfc3339_millis(time).to_string())
}

/// A duration in milliseconds for people: `0s`, `1.5s`, `2m 30s`.
pub fn duration_ms(ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    if ms < 60_000 {
        let s = ms as f64 / 1000.0;
        return format!("{}s", trim_float(s));
    }
    humantime::format_duration(std::time::Duration::from_secs(ms.div_ceil(1000))).to_string()
}

fn trim_float(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}
