//! Content negotiation: how much a client's `Accept` header wants a media type, and whether
//! its `Accept-Encoding` takes zstd. Pure functions over header text, so they are fuzzed.

/// Parses an RFC 9110 `qvalue` (`0`, `0.5`, `1.000`, …: between 0 and 1, at most three
/// decimals). Anything else (`NaN`, `inf`, `-1`, `2`, `1e0`) is not a weight: `None`, and the
/// caller treats the parameter as absent.
fn qvalue(s: &str) -> Option<f32> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let ok = frac.len() <= 3
        && frac.bytes().all(|b| b.is_ascii_digit())
        && match int {
            "0" => true,
            "1" => frac.bytes().all(|b| b == b'0'),
            _ => false,
        };
    ok.then(|| s.parse().ok()).flatten()
}

/// The weight of one comma-separated element (`type;param;q=0.5`), 1 when it gives none.
fn weight<'a>(params: impl Iterator<Item = &'a str>) -> f32 {
    params
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("q")
                .then(|| qvalue(v.trim()))?
        })
        .next()
        .unwrap_or(1.0)
}

/// Quality the `Accept` header gives a media type: the most specific matching range wins
/// (`type/sub` over `type/*` over `*/*`, compared case-insensitively), 0 when none matches.
/// Always within 0..=1.
pub fn accept_quality(accept: &str, ty: &str) -> f32 {
    let (major, _) = ty.split_once('/').unwrap_or((ty, ""));
    let mut best: Option<(u8, f32)> = None;
    for part in accept.split(',') {
        let mut it = part.split(';');
        let range = it.next().unwrap_or("").trim();
        let specificity = if range.eq_ignore_ascii_case(ty) {
            3
        } else if range
            .strip_suffix("/*")
            .is_some_and(|m| m.eq_ignore_ascii_case(major))
        {
            2
        } else if range == "*/*" {
            1
        } else {
            continue;
        };
        if best.is_none_or(|(s, _)| specificity > s) {
            best = Some((specificity, weight(it)));
        }
    }
    best.map(|(_, q)| q).unwrap_or(0.0)
}

/// Whether the `Accept-Encoding` header values list zstd with a non-zero quality.
pub fn accepts_zstd<'a>(values: impl IntoIterator<Item = &'a str>) -> bool {
    values.into_iter().flat_map(|v| v.split(',')).any(|item| {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        coding.eq_ignore_ascii_case("zstd") && weight(parts) > 0.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept() {
        let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
        assert!(
            accept_quality(browser, "text/html") > accept_quality(browser, "text/x-nix-narinfo")
        );
        assert_eq!(accept_quality("*/*", "text/html"), 1.0);
        assert_eq!(accept_quality("*/*;q=0.3", "text/x-nix-narinfo"), 0.3);
        assert_eq!(accept_quality("", "text/html"), 0.0);
        assert_eq!(
            accept_quality("text/*;q=0.5, text/html;q=0.1", "text/html"),
            0.1
        );
        assert_eq!(accept_quality("TEXT/*; Q=0.5", "text/html"), 0.5);
        assert_eq!(accept_quality("Text/HTML;level=1;q=0", "text/html"), 0.0);
    }

    #[test]
    fn weights_outside_the_grammar_count_as_absent() {
        for q in [
            "NaN", "inf", "-1", "2", "1.5", "1e0", "0.0001", "", ".5", "0x1",
        ] {
            assert_eq!(
                accept_quality(&format!("text/html;q={q}"), "text/html"),
                1.0,
                "{q}"
            );
            assert!(accepts_zstd([format!("zstd;q={q}").as_str()]), "{q}");
        }
        assert_eq!(qvalue("1.000"), Some(1.0));
        assert_eq!(qvalue("0.125"), Some(0.125));
    }

    #[test]
    fn accept_encoding() {
        assert!(accepts_zstd(["gzip, deflate, br, zstd"]));
        assert!(accepts_zstd(["gzip", "ZSTD; q=0.5"]));
        assert!(!accepts_zstd(["zstd;q=0", "gzip"]));
        assert!(!accepts_zstd(["zstd;q=0.000"]));
        assert!(!accepts_zstd(["identity, *"]));
        assert!(!accepts_zstd(Vec::<&str>::new()));
    }
}
