//! Numbers, durations and identities the way a person reads them in a narrow column.

use std::time::{Duration, SystemTime};

/// `512 B`, `1.5 KiB`, `20 MiB`: three significant digits at most.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

/// The two largest units of a duration: `45s`, `3m12s`, `2h5m`, `3d4h`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, minutes, seconds) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    let pair = |a: u64, ua: &str, b: u64, ub: &str| {
        if b == 0 {
            format!("{a}{ua}")
        } else {
            format!("{a}{ua}{b}{ub}")
        }
    };
    match () {
        _ if days > 0 => pair(days, "d", hours, "h"),
        _ if hours > 0 => pair(hours, "h", minutes, "m"),
        _ if minutes > 0 => pair(minutes, "m", seconds, "s"),
        _ => format!("{seconds}s"),
    }
}

/// Seconds as the API reports them (never negative, maybe fractional) as a duration.
pub fn seconds(s: f64) -> String {
    duration(Duration::from_secs_f64(s.max(0.0)))
}

/// How far `when` is from `now`: `in 23h`, `2h ago`.
pub fn relative(when: SystemTime, now: SystemTime) -> String {
    match when.duration_since(now) {
        Ok(ahead) => format!("in {}", duration(ahead)),
        Err(e) => format!("{} ago", duration(e.duration())),
    }
}

/// An RFC 3339 time as `2026-11-22 20:52` (UTC), or as given if it does not parse.
pub fn timestamp(rfc3339: &str) -> (String, Option<SystemTime>) {
    match humantime::parse_rfc3339_weak(rfc3339) {
        Ok(t) => {
            let text = humantime::format_rfc3339_seconds(t).to_string();
            // `2026-11-22T20:52:00Z` → `2026-11-22 20:52`
            let short = text.get(..16).map(|s| s.replacen('T', " ", 1)).unwrap_or(text);
            (short, Some(t))
        }
        Err(_) => (rfc3339.to_owned(), None),
    }
}

/// `spiffe://TD/ns/NS/sa/SA` → `NS/SA`: in one mesh the trust domain is the same everywhere,
/// and the prefix would take half a narrow column. Anything else is left as it is.
pub fn identity(id: &str) -> String {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .and_then(|(_, path)| path.strip_prefix("ns/"))
        .and_then(|path| path.split_once("/sa/"))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'))
        .map(|(ns, sa)| format!("{ns}/{sa}"))
        .unwrap_or_else(|| id.to_owned())
}

pub fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(20 << 20), "20 MiB");
        assert_eq!(bytes(u64::MAX), "16 EiB");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(Duration::from_secs(45)), "45s");
        assert_eq!(duration(Duration::from_secs(192)), "3m12s");
        assert_eq!(duration(Duration::from_secs(7200)), "2h");
        assert_eq!(duration(Duration::from_secs(7500)), "2h5m");
        assert_eq!(duration(Duration::from_secs(4 * 86_400 + 3600)), "4d1h");
        assert_eq!(seconds(-1.0), "0s");
        assert_eq!(seconds(59.9), "59s");
    }

    #[test]
    fn times() {
        let (text, t) = timestamp("2026-11-22T20:52:33Z");
        assert_eq!(text, "2026-11-22 20:52");
        let t = t.unwrap();
        assert_eq!(relative(t, t - Duration::from_secs(23 * 3600)), "in 23h");
        assert_eq!(relative(t, t + Duration::from_secs(125)), "2m5s ago");
        assert_eq!(timestamp("soon").0, "soon");
    }

    #[test]
    fn identities() {
        assert_eq!(identity("spiffe://cluster.local/ns/shop/sa/web"), "shop/web");
        assert_eq!(identity("spiffe://example.org/ns/a/sa/b"), "a/b");
        for other in ["spiffe://td/something", "web", "spiffe://td/ns//sa/x", ""] {
            assert_eq!(identity(other), other);
        }
    }
}
