//! Wording of decision details: money, windows, and bounded echoes of request or passport data.
//!
//! A `detail` is read by people and by LLM agents deciding what to do next, so it names the limit,
//! the figures and what would help. It is also written to the attestation log, so anything echoed
//! from a request or a passport is cut to a bounded length here.

use sluice_passport::{Cents, SpendWindow};

/// Longest echo of a request or passport string (an action, a host, an expression) in a detail.
pub const MAX_ECHO_CHARS: usize = 200;
/// Most list items (permissions, allowlist entries) named in one detail.
pub const MAX_LIST_ITEMS: usize = 10;

/// `$1234.05`, `$0.00042`: integer millicents as dollars with the fraction they have, never
/// rounded and never through a float (see [`sluice_passport::money::dollars`]).
pub fn money(millicents: u64) -> String {
    Money(millicents).to_string()
}

/// [`money`] as a `Display` value, for details formatted on every decision: written straight
/// into the detail rather than into a string of its own first. A test compares it with
/// [`sluice_passport::money::dollars`] on every magnitude.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Money(pub u64);

impl std::fmt::Display for Money {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (digits, significant) = fraction_digits(self.0);
        let whole = self.0 / PER_DOLLAR;
        let fraction = std::str::from_utf8(digits.get(..significant).unwrap_or_default()).unwrap_or_default();
        write!(f, "${whole}.{fraction}")
    }
}

/// Millicents per dollar: 100 cents of 1,000 millicents.
const PER_DOLLAR: u64 = 100_000;

/// The five fraction digits of `millicents` in dollars and how many to show: trailing zeros
/// dropped down to two (cents). Shared by [`Money`] and [`Line::money`].
fn fraction_digits(millicents: u64) -> ([u8; 5], usize) {
    let mut digits = [b'0'; 5];
    let mut n = millicents % PER_DOLLAR;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    let significant = digits.iter().rposition(|d| *d != b'0').map_or(0, |at| at + 1).max(2);
    (digits, significant)
}

/// A detail made on every decision (the checks a request passes, an allow's summary), built
/// piece by piece into one string sized up front: no `fmt` machinery and no string of its own
/// for each amount. The result is the text `format!` with [`Money`], [`Cents`]'s `Display` and
/// integers' would give (tests compare them).
pub struct Line(String);

impl Line {
    pub fn with_capacity(bytes: usize) -> Line {
        Line(String::with_capacity(bytes))
    }

    pub fn text(mut self, s: &str) -> Line {
        self.0.push_str(s);
        self
    }

    /// An integer in plain decimal.
    pub fn number(mut self, n: u64) -> Line {
        push_decimal(&mut self.0, n);
        self
    }

    /// Millicents as [`Money`] displays them (`$0.00042`).
    pub fn money(mut self, millicents: u64) -> Line {
        self.0.push('$');
        push_decimal(&mut self.0, millicents / PER_DOLLAR);
        self.0.push('.');
        let (digits, significant) = fraction_digits(millicents);
        for d in digits.iter().take(significant) {
            self.0.push(char::from(*d));
        }
        self
    }

    /// A passport limit as [`Cents`] displays it (`$12.05`).
    pub fn cents(mut self, c: Cents) -> Line {
        self.0.push('$');
        push_decimal(&mut self.0, c.0 / 100);
        self.0.push('.');
        let cents = c.0 % 100;
        self.0.push(char::from(b'0' + (cents / 10) as u8));
        self.0.push(char::from(b'0' + (cents % 10) as u8));
        self
    }

    pub fn done(self) -> String {
        self.0
    }
}

fn push_decimal(out: &mut String, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    while at > 0 {
        at -= 1;
        if let Some(d) = digits.get_mut(at) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in digits.iter().skip(at) {
        out.push(char::from(*d));
    }
}

/// `Daily`, `Weekly`, `Monthly`: the window as the first word of a sentence.
pub fn window_title(w: SpendWindow) -> &'static str {
    match w {
        SpendWindow::Daily => "Daily",
        SpendWindow::Weekly => "Weekly",
        SpendWindow::Monthly => "Monthly",
    }
}

/// `s`, cut to [`MAX_ECHO_CHARS`] characters with a marker saying how much was cut, and with
/// control characters escaped so a detail stays one line.
pub fn echo(s: &str) -> String {
    let total = s.chars().count();
    let mut out = String::with_capacity(s.len().min(MAX_ECHO_CHARS * 4));
    for c in s.chars().take(MAX_ECHO_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if total > MAX_ECHO_CHARS {
        out.push_str(&format!("… ({} more characters)", total - MAX_ECHO_CHARS));
    }
    out
}

/// `a, b, c` for up to [`MAX_LIST_ITEMS`] items, then `and N more`; `none` for an empty list.
pub fn list<I: IntoIterator<Item = String>>(items: I) -> String {
    let items: Vec<String> = items.into_iter().collect();
    if items.is_empty() {
        return "none".to_string();
    }
    let mut out = items.iter().take(MAX_LIST_ITEMS).map(|s| echo(s)).collect::<Vec<_>>().join(", ");
    if items.len() > MAX_LIST_ITEMS {
        out.push_str(&format!(" and {} more", items.len() - MAX_LIST_ITEMS));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_dollars_with_the_fraction() {
        assert_eq!(money(0), "$0.00");
        assert_eq!(money(9_950_000), "$99.50");
        assert_eq!(money(42), "$0.00042");
        assert_eq!(money(u64::MAX), "$184467440737095.51615");
    }

    #[test]
    fn money_displays_what_dollars_writes() {
        let mut amounts = vec![0, 1, 9, 10, 99, 100, 999, 1000, 1001, 99_999, 100_000, 100_001, 123_450, u64::MAX];
        amounts.extend((0..64).map(|b| 1u64 << b));
        amounts.extend((0..20).map(|e| 10u64.pow(e) - 1));
        amounts.extend((0..2000).map(|i| i * 7919 + i % 13));
        for m in amounts {
            assert_eq!(Money(m).to_string(), sluice_passport::money::dollars(m), "{m}");
            assert_eq!(money(m), sluice_passport::money::dollars(m), "{m}");
        }
    }

    #[test]
    fn lines_write_what_format_writes() {
        let mut amounts = vec![0, 1, 9, 10, 99, 100, 999, 1000, 1001, 99_999, 100_000, 100_001, 123_450, u64::MAX];
        amounts.extend((0..64).map(|b| 1u64 << b));
        amounts.extend((1..20).map(|e| 10u64.pow(e) - 1));
        amounts.extend((0..2000).map(|i| i * 7919 + i % 13));
        for n in amounts {
            let line =
                Line::with_capacity(0).text("a ").money(n).text(" b ").cents(Cents(n)).text(" ").number(n).done();
            assert_eq!(line, format!("a {} b {} {n}", Money(n), Cents(n)), "{n}");
        }
    }

    #[test]
    fn echoes_are_bounded_and_one_line() {
        assert_eq!(echo("a\nb"), "a\\nb");
        assert_eq!(echo("it's \"x\" \u{e9}"), "it's \"x\" \u{e9}");
        let long = "x".repeat(1000);
        let e = echo(&long);
        assert!(e.starts_with(&"x".repeat(MAX_ECHO_CHARS)));
        assert!(e.ends_with("(800 more characters)"), "{e}");
    }

    #[test]
    fn lists_are_bounded() {
        assert_eq!(list(Vec::<String>::new()), "none");
        assert_eq!(list(["a".to_string(), "b".to_string()]), "a, b");
        let many = (0..25).map(|i| i.to_string());
        assert_eq!(list(many), "0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 15 more");
    }
}
