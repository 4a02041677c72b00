//! Request paths as an app will read them, so that a rule on `/admin/*` and the app agree on
//! which resource was asked for: `//admin/x`, `/./admin/x`, `/a/../admin/x` and `/%61dmin/x`
//! all name `/admin/x` to most frameworks, and so they do to the rules.
//!
//! What [`normalize`] does (RFC 3986 §6.2.2 and §5.2.4):
//! - percent-encoded unreserved characters (letters, digits, `-`, `.`, `_`, `~`) are decoded,
//!   the hex digits of other encodings uppercased;
//! - runs of `/` become one;
//! - `.` and `..` segments are removed (`..` above the root stays at the root).
//!
//! Encodings that frameworks disagree on are refused, not guessed at, when the path decides
//! something (`strict`): an encoded `/` or `\` (`%2F`, `%5C`), an encoded NUL, a raw `\`.
//! A malformed percent-encoding is always refused.

use std::borrow::Cow;

/// Why a path is refused rather than normalised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path {0:?} does not start with /")]
    NotAbsolute(String),
    #[error("malformed percent-encoding in the path")]
    BadEncoding,
    #[error("{0} in the path is ambiguous (apps disagree on what it means); refused")]
    Ambiguous(&'static str),
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// True when the path is already in normal form (the common case: one pass over its bytes, no
/// allocation): it starts with `/`, has no `%` or `\`, no empty segment but a trailing one,
/// and no `.` or `..` segment.
fn is_normal(p: &str) -> bool {
    let b = p.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    // The length of the segment being read, and whether it is all dots so far.
    let (mut len, mut dots) = (0usize, true);
    for &c in &b[1..] {
        match c {
            b'%' | b'\\' => return false,
            b'/' => {
                // An empty segment before this slash, or `.` / `..`.
                if len == 0 || (dots && len <= 2) {
                    return false;
                }
                (len, dots) = (0, true);
            }
            _ => {
                len += 1;
                dots &= c == b'.';
            }
        }
    }
    // The last segment: empty (a trailing slash) is fine; `.` or `..` is not.
    !(len > 0 && dots && len <= 2)
}

/// The normal form of `path` (without query). `strict`: refuse encodings apps disagree on
/// (set when a rule matches on paths). `*` (OPTIONS) is kept as it is.
pub fn normalize(path: &str, strict: bool) -> Result<Cow<'_, str>, PathError> {
    if path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    if is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute(path.to_string()));
    }
    // Decode what may be decoded; refuse what is ambiguous.
    let b = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEncoding);
                };
                let c = h * 16 + l;
                if unreserved(c) {
                    decoded.push(char::from(c));
                } else {
                    if strict {
                        match c {
                            b'/' => return Err(PathError::Ambiguous("an encoded slash (%2F)")),
                            b'\\' => {
                                return Err(PathError::Ambiguous("an encoded backslash (%5C)"));
                            }
                            0 => return Err(PathError::Ambiguous("an encoded NUL (%00)")),
                            _ => {}
                        }
                    }
                    decoded.push('%');
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
                }
                i += 3;
            }
            b'\\' if strict => return Err(PathError::Ambiguous("a backslash")),
            _ => {
                // Copy the run up to the next `%` (or `\`) as it is (valid UTF-8: `path` is).
                let end = b[i..]
                    .iter()
                    .position(|c| *c == b'%' || (strict && *c == b'\\'))
                    .map_or(b.len(), |n| i + n);
                decoded.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    // Merge slashes and remove dot segments.
    let mut out: Vec<&str> = Vec::new();
    let ends_with_slash = {
        let last = decoded.rsplit('/').next().unwrap_or("");
        last.is_empty() || last == "." || last == ".."
    };
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut n = String::with_capacity(decoded.len());
    for s in &out {
        n.push('/');
        n.push_str(s);
    }
    if ends_with_slash || n.is_empty() {
        n.push('/');
    }
    Ok(Cow::Owned(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_name_the_same_resource_normalise_alike() {
        for (raw, want) in [
            ("/admin/x", "/admin/x"),
            ("//admin/x", "/admin/x"),
            ("/admin//x", "/admin/x"),
            ("/./admin/x", "/admin/x"),
            ("/a/../admin/x", "/admin/x"),
            ("/%61dmin/x", "/admin/x"),
            ("/%2e%2e/admin/x", "/admin/x"),
            ("/a/%2E/admin/./x", "/a/admin/x"),
            ("/../../admin/x", "/admin/x"),
            ("/admin/", "/admin/"),
            ("/admin/x/..", "/admin/"),
            ("/admin/x/.", "/admin/x/"),
            ("/", "/"),
            ("//", "/"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/%7euser", "/~user"),
            ("*", "*"),
        ] {
            assert_eq!(normalize(raw, true).as_deref(), Ok(want), "{raw}");
        }
        assert!(matches!(
            normalize("/plain/path", true),
            Ok(Cow::Borrowed(_))
        ));
        assert!(matches!(
            normalize("/with/slash/", true),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn ambiguous_and_malformed_paths_are_refused() {
        for raw in ["/admin%2Fx", "/admin%2fx", "/a%5Cb", "/a\\b", "/a%00"] {
            assert!(
                matches!(normalize(raw, true), Err(PathError::Ambiguous(_))),
                "{raw}"
            );
        }
        for raw in ["/a%", "/a%2", "/a%zz", "/a%g0"] {
            assert_eq!(normalize(raw, false), Err(PathError::BadEncoding), "{raw}");
        }
        assert!(matches!(
            normalize("admin", true),
            Err(PathError::NotAbsolute(_))
        ));
        // Not strict (no rule looks at paths): kept, only normalised around.
        assert_eq!(normalize("//a%2fb", false).as_deref(), Ok("/a%2Fb"));
        assert_eq!(normalize("/a\\b", false).as_deref(), Ok("/a\\b"));
    }
}
