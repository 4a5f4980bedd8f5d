//! Per-connection templates: `{conn}`, `{conn % N}` and `{conn / N}`, each optionally `+ M`, in
//! paths, headers and claims.

/// Replaces every `{conn}`, `{conn % N}` and `{conn / N}` (each optionally followed by `+ M`)
/// in `text`; anything else is kept as is.
pub fn expand(text: &str, conn: u64) -> String {
    if !text.contains('{') {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('}').and_then(|end| eval(&after[..end], conn).map(|v| (end, v))) {
            Some((end, value)) => {
                out.push_str(&value.to_string());
                rest = &after[end + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn eval(expr: &str, conn: u64) -> Option<u64> {
    let expr = expr.trim();
    if let Some((lhs, offset)) = expr.rsplit_once('+') {
        return eval(lhs, conn)?.checked_add(offset.trim().parse().ok()?);
    }
    if expr == "conn" {
        return Some(conn);
    }
    let (lhs, op, rhs) = if let Some((l, r)) = expr.split_once('%') {
        (l, '%', r)
    } else {
        let (l, r) = expr.split_once('/')?;
        (l, '/', r)
    };
    if lhs.trim() != "conn" {
        return None;
    }
    let n: u64 = rhs.trim().parse().ok().filter(|n| *n > 0)?;
    Some(if op == '%' { conn % n } else { conn / n })
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn expands_conn_expressions_and_leaves_json_alone() {
        assert_eq!(expand("/agents/agent-{conn}/terminal", 7), "/agents/agent-7/terminal");
        assert_eq!(expand(r#"["agent-{conn % 100}"]"#, 1234), r#"["agent-34"]"#);
        assert_eq!(expand("{conn / 10}", 1234), "123");
        assert_eq!(expand("observe={conn % 10 + 1}", 19), "observe=10");
        assert_eq!(expand("{conn + 5}", 1), "6");
        assert_eq!(expand(r#"{"a": 1}"#, 3), r#"{"a": 1}"#);
    }
}
