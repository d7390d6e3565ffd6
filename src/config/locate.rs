//! Map a key path back to its line and column in the TOML text, so that
//! errors found after deserialisation still point at the right place.

use toml_edit::{ImDocument, Item, Value};

use super::error::Seg;

/// 1-based line and column of byte `offset` in `text`. The column counts
/// characters, not bytes: that is what editors and the TOML parser's own
/// messages use, so a non-ASCII character earlier on the line (a hostname,
/// a comment) must not push the reported column to the right.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |nl| nl + 1);
    let col = before[line_start..].chars().count() + 1;
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

#[cfg(test)]
mod tests {
    use super::line_col;

    #[test]
    fn columns_count_characters() {
        let text = "a = 1\nhost = \"ü\", path = \"x\"\n";
        let at = text.find("path").unwrap();
        assert_eq!(line_col(text, at), (2, 13));
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, text.len()), (3, 1));
        // Inside a multi-byte character: the character's own column.
        let inside = text.find('ü').unwrap() + 1;
        assert_eq!(line_col(text, inside), (2, 9));
    }
}
