//! What a Grafana dashboard asks Prometheus for (every series selector in
//! its queries, with the labels it filters or groups on), and whether a
//! Prometheus text exposition holds a series that answers each one.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

/// Labels Prometheus adds when it scrapes: never in `/metrics` itself.
const SCRAPE_LABELS: [&str; 2] = ["instance", "job"];

/// One series a query needs: its exact sample name (`_bucket`, `_sum` and
/// `_count` kept as written) and the labels it must carry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Wanted {
    pub name: String,
    /// Label name → the exact value wanted, or None for any value.
    pub labels: BTreeMap<String, Option<String>>,
}

impl fmt::Display for Wanted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name)?;
        if self.labels.is_empty() {
            return Ok(());
        }
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| match v {
                Some(v) => format!("{k}={v:?}"),
                None => k.clone(),
            })
            .collect();
        write!(f, "{{{}}}", labels.join(","))
    }
}

/// Every query text of the dashboard: the `expr` of each target (panels
/// nested in rows included) and the query of each template variable.
pub fn query_texts(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(e)) = map.get("expr") {
                    out.push(e.clone());
                }
                for child in map.values() {
                    walk(child, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let q = &var["query"];
        match q.get("query").unwrap_or(q) {
            Value::String(s) => out.push(s.clone()),
            other => panic!("template variable {}: query {other}", var["name"]),
        }
    }
    out
}

/// The series one PromQL query (or Grafana `label_values(...)`) needs.
/// Labels in `by (...)` (and the label `label_values` lists) are wanted on
/// every metric of the query; matchers on the metric they follow: `="v"`
/// wants that value, `=~` (or a value with a `$variable`) wants the label
/// with any value; negative matchers want nothing.
pub fn wanted(query: &str) -> Vec<Wanted> {
    let chars: Vec<char> = query.chars().collect();
    let mut grouping: Vec<String> = Vec::new();
    let mut metrics: Vec<Wanted> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' {
            i = skip_string(&chars, i).1;
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = skip_spaces(&chars, i);
            let opens = chars.get(next) == Some(&'(');
            if (word == "by" || word == "without") && opens {
                let close = find(&chars, next, ')');
                if word == "by" {
                    grouping.extend(split_labels(&chars[next + 1..close]));
                }
                i = close + 1;
            } else if word.starts_with("fleetgate_") {
                let mut w = Wanted {
                    name: word,
                    labels: BTreeMap::new(),
                };
                if chars.get(next) == Some(&'{') {
                    i = matchers(&chars, next, &mut w.labels);
                }
                metrics.push(w);
            }
        } else {
            i += 1;
        }
    }
    if let Some(rest) = query.trim().strip_prefix("label_values(") {
        let label = rest.trim_end().trim_end_matches(')');
        let label = label.rsplit(',').next().unwrap_or("").trim();
        if !label.is_empty() && !label.contains('}') {
            grouping.push(label.to_string());
        }
    }
    for w in &mut metrics {
        for g in &grouping {
            if !SCRAPE_LABELS.contains(&g.as_str()) {
                w.labels.entry(g.clone()).or_insert(None);
            }
        }
    }
    metrics
}

fn skip_spaces(chars: &[char], mut i: usize) -> usize {
    while chars.get(i).is_some_and(|c| c.is_whitespace()) {
        i += 1;
    }
    i
}

fn find(chars: &[char], from: usize, want: char) -> usize {
    (from..chars.len())
        .find(|&j| chars[j] == want)
        .unwrap_or_else(|| panic!("no {want:?} after position {from}"))
}

/// A double-quoted string starting at `open`: its value and the position
/// after its closing quote.
fn skip_string(chars: &[char], open: usize) -> (String, usize) {
    let mut value = String::new();
    let mut j = open + 1;
    while j < chars.len() && chars[j] != '"' {
        if chars[j] == '\\' && j + 1 < chars.len() {
            j += 1;
        }
        value.push(chars[j]);
        j += 1;
    }
    (value, j + 1)
}

fn split_labels(chars: &[char]) -> Vec<String> {
    let text: String = chars.iter().collect();
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// Parses `{a="x", b=~"$v", c!="y"}` from `open`; returns the position
/// after `}`.
fn matchers(chars: &[char], open: usize, labels: &mut BTreeMap<String, Option<String>>) -> usize {
    let mut i = open + 1;
    loop {
        i = skip_spaces(chars, i);
        match chars.get(i) {
            Some('}') => return i + 1,
            Some(',') => {
                i += 1;
                continue;
            }
            None => panic!("unclosed matcher list"),
            _ => {}
        }
        let start = i;
        while chars[i].is_ascii_alphanumeric() || chars[i] == '_' {
            i += 1;
        }
        let label: String = chars[start..i].iter().collect();
        i = skip_spaces(chars, i);
        let op_start = i;
        while "=!~".contains(chars[i]) {
            i += 1;
        }
        let op: String = chars[op_start..i].iter().collect();
        i = skip_spaces(chars, i);
        assert_eq!(chars[i], '"', "matcher {label}{op} without a quoted value");
        let (value, after) = skip_string(chars, i);
        i = after;
        if SCRAPE_LABELS.contains(&label.as_str()) {
            continue;
        }
        match op.as_str() {
            "=" if !value.contains('$') => {
                labels.insert(label, Some(value));
            }
            "=" | "=~" => {
                labels.entry(label).or_insert(None);
            }
            _ => {}
        }
    }
}

/// One sample line of a text exposition: its name and labels.
#[derive(Debug)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// The samples of a Prometheus text exposition (comments skipped).
pub fn parse_exposition(text: &str) -> Vec<Series> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let chars: Vec<char> = line.chars().collect();
        let end = chars
            .iter()
            .position(|&c| c == '{' || c == ' ')
            .unwrap_or(chars.len());
        let name: String = chars[..end].iter().collect();
        let mut labels = BTreeMap::new();
        if chars.get(end) == Some(&'{') {
            let mut i = end + 1;
            while chars[i] != '}' {
                if chars[i] == ',' {
                    i += 1;
                    continue;
                }
                let eq = find(&chars, i, '=');
                let label: String = chars[i..eq].iter().collect();
                let (value, after) = skip_string(&chars, eq + 1);
                labels.insert(label, value);
                i = after;
            }
        }
        out.push(Series { name, labels });
    }
    out
}

/// Whether some series answers `w`.
pub fn present(w: &Wanted, series: &[Series]) -> bool {
    series.iter().any(|s| {
        s.name == w.name
            && w.labels.iter().all(|(k, v)| {
                s.labels
                    .get(k)
                    .is_some_and(|have| v.as_ref().is_none_or(|want| want == have))
            })
    })
}
