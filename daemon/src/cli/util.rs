//! Small helpers shared by the subcommands.

use anyhow::{bail, Context};
use std::path::Path;

/// Parses `30d`, `12h`, `15m`, `90s` into seconds.
pub fn parse_duration(s: &str) -> anyhow::Result<i64> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num.parse().with_context(|| format!("duration {s:?}: expected a number followed by s, m, h or d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("duration {s:?}: unit must be s, m, h or d (for example 30d)"),
    };
    n.checked_mul(mult).with_context(|| format!("duration {s:?} is too large"))
}

/// Formats seconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| t.to_string())
}

/// Reads a passport file: the compact token, surrounding whitespace ignored.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let max = crate::passport::jws::MAX_TOKEN_LEN as u64 + 64;
    let text = crate::files::read_text(path, max, crate::files::Links::Follow)?;
    Ok(text.trim().to_string())
}

pub fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Waits for SIGTERM or SIGINT (what systemd and a terminal send); never returns if the handlers
/// cannot be installed, so a foreground server keeps running rather than stopping at once.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_duration("90s").unwrap(), 90);
        assert_eq!(parse_duration("2h").unwrap(), 7200);
        for bad in ["", "d", "30", "30w", "-1d", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
