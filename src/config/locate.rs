//! Map a key path back to its line and column in the TOML text, so that
//! errors found after deserialisation still point at the right place.

use toml_edit::{ImDocument, Item, Value};

use super::error::Seg;

/// 1-based line and column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, col)
}

/// Byte offset of the deepest part of `path` that exists in the document:
/// the value if it is there, else the key, else its nearest ancestor.
pub fn offset_of(text: &str, path: &[Seg]) -> Option<usize> {
    let doc = ImDocument::parse(text).ok()?;
    descend_table(doc.as_table(), path, None)
}

fn descend_table(t: &toml_edit::Table, rest: &[Seg], mut best: Option<usize>) -> Option<usize> {
    let Some((first, tail)) = rest.split_first() else {
        return best;
    };
    let Seg::Key(k) = first else { return best };
    let Some((key, it)) = t.get_key_value(k) else {
        return best;
    };
    best = key.span().map(|s| s.start).or(best);
    match it {
        Item::Value(v) => {
            best = v.span().map(|s| s.start).or(best);
            descend_value(v, tail, best)
        }
        Item::Table(t) => descend_table(t, tail, best),
        Item::ArrayOfTables(a) => match tail.split_first() {
            Some((Seg::Index(i), rest)) => match a.get(*i) {
                Some(t) => descend_table(t, rest, t.span().map(|s| s.start).or(best)),
                None => best,
            },
            _ => best,
        },
        Item::None => best,
    }
}

fn descend_value(v: &Value, rest: &[Seg], mut best: Option<usize>) -> Option<usize> {
    let Some((first, tail)) = rest.split_first() else {
        return best;
    };
    match (first, v) {
        (Seg::Index(i), Value::Array(a)) => match a.get(*i) {
            Some(v) => {
                best = v.span().map(|s| s.start).or(best);
                descend_value(v, tail, best)
            }
            None => best,
        },
        (Seg::Key(k), Value::InlineTable(t)) => match t.get_key_value(k) {
            Some((key, item)) => {
                best = key.span().map(|s| s.start).or(best);
                match item.as_value() {
                    Some(v) => {
                        best = v.span().map(|s| s.start).or(best);
                        descend_value(v, tail, best)
                    }
                    None => best,
                }
            }
            None => best,
        },
        _ => best,
    }
}
