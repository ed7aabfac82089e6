//! Cgroup patterns: absolute paths under the cgroup v2 mount whose segments
//! may contain `*` (any run of characters within one segment).

/// Why `pattern` is not a usable cgroup pattern, if it is not.
pub(super) fn check(pattern: &str) -> Result<(), String> {
    let Some(rest) = pattern.strip_prefix('/') else {
        return Err(format!(
            "cgroup `{pattern}` must be an absolute path starting with `/` \
             (relative to the cgroup v2 mount)"
        ));
    };
    if rest.is_empty() {
        // Every workload, the agent included, would be in this domain.
        return Err("cgroup `/` is the root cgroup; it cannot belong to a domain".to_owned());
    }
    if pattern.contains("..") {
        return Err(format!("cgroup `{pattern}` must not contain `..`"));
    }
    if rest.split('/').any(str::is_empty) {
        return Err(format!(
            "cgroup `{pattern}` has an empty path segment (`//` or a trailing `/`)"
        ));
    }
    // `/a/./b` is `/a/b` spelled differently, which would slip past the
    // check that two domains do not claim the same cgroup.
    if rest.split('/').any(|s| s == ".") {
        return Err(format!("cgroup `{pattern}` must not contain `.` segments"));
    }
    Ok(())
}

/// Whether some cgroup path matches both (valid) patterns. `*` does not
/// cross `/`, so that needs the same number of segments, each pair of which
/// has a common match.
pub(super) fn may_overlap(a: &str, b: &str) -> bool {
    let a: Vec<&str> = a.split('/').collect();
    let b: Vec<&str> = b.split('/').collect();
    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| segments_overlap(x, y))
}

/// Whether one string matches both segment globs. Runs both globs side by
/// side: `reach[i][j]` says some prefix of a common string takes `a` to
/// position `i` and `b` to `j`. A `*` may match nothing (skip it) or swallow
/// the other side's next symbol (which covers the other side's `*` too).
fn segments_overlap(a: &str, b: &str) -> bool {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut reach = vec![vec![false; b.len() + 1]; a.len() + 1];
    reach[0][0] = true;
    // Every step moves forward in `a`, `b` or both, so row-major order
    // visits each cell after all cells that can reach it.
    for i in 0..=a.len() {
        for j in 0..=b.len() {
            if !reach[i][j] {
                continue;
            }
            let star_a = a.get(i) == Some(&'*');
            let star_b = b.get(j) == Some(&'*');
            if star_a {
                reach[i + 1][j] = true;
                if j < b.len() {
                    reach[i][j + 1] = true;
                }
            }
            if star_b {
                reach[i][j + 1] = true;
                if i < a.len() {
                    reach[i + 1][j] = true;
                }
            }
            if i < a.len() && j < b.len() && !star_a && a[i] == b[j] {
                reach[i + 1][j + 1] = true;
            }
        }
    }
    reach[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_invalid_patterns() {
        for ok in [
            "/a",
            "/a.slice/b.scope",
            "/kubepods.slice/*contractor*",
            "/*/x",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("a.slice", "absolute"),
            ("", "absolute"),
            ("/", "root cgroup"),
            ("/a/../b", "`..`"),
            ("/a..b", "`..`"),
            ("/a//b", "empty path segment"),
            ("/a/", "empty path segment"),
            ("/a/./b", "`.` segments"),
        ] {
            let err = check(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn overlap() {
        let yes = [
            ("/a", "/a"),
            ("/a/*", "/a/b"),
            ("/k/*contractor*", "/k/pod-contractor-1"),
            ("/k/*contractor*", "/k/*staging*"),
            ("/k/a*", "/k/*b"),
            ("/*", "/x"),
            ("/k/a*c", "/k/ab*"),
            ("/k/*", "/k/*"),
        ];
        for (a, b) in yes {
            assert!(may_overlap(a, b), "{a} {b}");
            assert!(may_overlap(b, a), "{b} {a}");
        }
        let no = [
            ("/a", "/b"),
            ("/a", "/a/b"),
            ("/a/*", "/a"),
            ("/*", "/a/b"),
            ("/k/a*", "/k/b*"),
            ("/k/*a", "/k/*b"),
            ("/k/a*c", "/k/ab*d"),
            ("/k/x*y*z", "/k/x*q"),
        ];
        for (a, b) in no {
            assert!(!may_overlap(a, b), "{a} {b}");
            assert!(!may_overlap(b, a), "{b} {a}");
        }
    }
}
