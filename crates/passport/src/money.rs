//! Money: integer **millicents** (1/1000 of a US cent, $0.00001) inside the daemon.
//!
//! Spend counters, costs, settlement deltas and the spend fields of attestation records are
//! whole millicents, so a model that costs $0.00005 a call charges 5 millicents, not a whole cent.
//! Passports name limits in whole cents ([`crate::Cents`]); the local API and the CLI
//! speak cents, with exact millicent fields beside them where an amount can have a fraction.
//!
//! No floating point anywhere: amounts are `u64` (bounded by [`MAX_MILLICENTS`]), decimal text is
//! parsed digit by digit ([`parse_cents`]), and dollars are printed from integers ([`dollars`]).
//!
//! The bound is 2^53 − 1 millicents (about $90 billion): the largest integer an RFC 8785 record
//! holds exactly. No cost, counter or record amount goes beyond it (a cost above is refused as
//! `invalid_request`; a counter that would pass it refuses the request), so every amount the
//! daemon decides on can be attested.
//!
//! Checked or saturating, and where:
//! - A spend counter plus a cost is **checked**: a sum past the bound refuses the request
//!   (`spend_limit_exceeded`); it never wraps, and never saturates into a figure that is wrong.
//! - A cost *computed* (tokens × price in `policy::meter`, or API cents × 1000 here) **saturates**
//!   at `u64::MAX`, which is past the bound, so the decision refuses it: saturation can only turn a
//!   huge cost into a refused one, never into a small one.
//! - A settlement after the fact moves a counter within `0..=MAX_MILLICENTS` (a refund stops at 0,
//!   an extra charge at the bound) and records the delta it applied, so the log still adds up.
//! - Version 1 counts in cents are migrated × 1000, checked: one that does not fit is corrupt usage,
//!   which blocks; the verifier names such a record field.
//!
//! Rounding to whole cents happens only at the edges, and always up ([`cents_up`]): a cost or a
//! spend shown in whole cents is never less than the real one, so rounding can hide no money.

/// Millicents in one cent.
pub const PER_CENT: u64 = 1000;
/// The largest amount sluice counts anywhere: 2^53 − 1 millicents ($90,071,992,547.40991), the
/// largest integer RFC 8785 JSON represents exactly. Passports may name limits up to
/// `MAX_CENTS` ($100 billion); spend never gets past this bound, so such a limit is not reached.
pub const MAX_MILLICENTS: u64 = (1 << 53) - 1;

/// `cents` in millicents; `None` when that does not fit a `u64`.
pub fn from_cents(cents: u64) -> Option<u64> {
    cents.checked_mul(PER_CENT)
}

/// `cents` in millicents, saturating at `u64::MAX` (which every bound check then refuses).
pub fn from_cents_saturating(cents: u64) -> u64 {
    cents.saturating_mul(PER_CENT)
}

/// Whole cents, rounded up: what a cents field shows for an amount with a fraction.
pub fn cents_up(millicents: u64) -> u64 {
    millicents.div_ceil(PER_CENT)
}

/// `$1234.05`, `$0.00042`: dollars with at least two decimals and as many more (up to five) as
/// the amount needs. Exact: integer arithmetic only, never rounded.
pub fn dollars(millicents: u64) -> String {
    signed_dollars(i128::from(millicents))
}

/// As [`dollars`], for a signed amount (a settlement refund is negative): `-$0.0032`.
pub fn signed_dollars(millicents: i128) -> String {
    const PER_DOLLAR: u128 = 100 * PER_CENT as u128;
    let sign = if millicents < 0 { "-" } else { "" };
    let m = millicents.unsigned_abs();
    let whole = m / PER_DOLLAR;
    let digits = format!("{:05}", m % PER_DOLLAR);
    let significant = digits.trim_end_matches('0').len().max(2);
    format!("{sign}${whole}.{}", &digits[..significant])
}

/// Why a decimal amount of cents was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("{0:?} is not a number of cents (write it like 250, 7.5 or 0.005)")]
    Syntax(String),
    #[error("{0:?} is negative; amounts are never below 0")]
    Negative(String),
    #[error("{0:?} has more precision than sluice counts: the smallest amount is 0.001 cent (one millicent)")]
    TooPrecise(String),
    #[error("{text:?} is more than the largest amount allowed here ({} cents)", cents_text(*max_millicents))]
    TooLarge { text: String, max_millicents: u64 },
}

/// Longest text [`parse_cents`] reads; longer is refused as a syntax error.
const MAX_AMOUNT_TEXT: usize = 64;

/// `1234.005`: millicents as a number of cents, with the decimals it needs (none if whole).
pub fn cents_text(millicents: u64) -> String {
    match millicents % PER_CENT {
        0 => (millicents / PER_CENT).to_string(),
        frac => format!("{}.{}", millicents / PER_CENT, format!("{frac:03}").trim_end_matches('0')),
    }
}

/// Parses a decimal number of cents into exact millicents: `250`, `7.5`, `0.005`, `1_000`,
/// `2.5e3` (TOML's float syntax: digits with single `_` between them, an optional fraction and
/// exponent, an optional leading `+`). The value must be a whole number of millicents (at most
/// three decimals once the exponent is applied) and at most `max_millicents`. Never a float:
/// the digits are read one by one.
pub fn parse_cents(text: &str, max_millicents: u64) -> Result<u64, AmountError> {
    let syntax = || AmountError::Syntax(cut(text));
    if text.len() > MAX_AMOUNT_TEXT {
        return Err(syntax());
    }
    let body = match text.as_bytes().first() {
        Some(b'-') => return Err(AmountError::Negative(text.to_string())),
        Some(b'+') => &text[1..],
        _ => text,
    };
    let (number, exponent) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (number, None),
    };
    let int_digits = digits(int_part).ok_or_else(syntax)?;
    let frac_digits = match frac_part {
        Some(f) => digits(f).ok_or_else(syntax)?,
        None => String::new(),
    };
    // value = mantissa × 10^(exp − fraction digits) cents = mantissa × 10^(scale) millicents.
    let mantissa = format!("{int_digits}{frac_digits}");
    let mantissa = mantissa.trim_start_matches('0');
    let exp_digits = match exponent {
        None => None,
        Some(e) => {
            let (neg, d) = match e.as_bytes().first() {
                Some(b'-') => (true, &e[1..]),
                Some(b'+') => (false, &e[1..]),
                _ => (false, e),
            };
            Some((neg, digits(d).ok_or_else(syntax)?))
        }
    };
    if mantissa.is_empty() {
        return Ok(0);
    }
    let exp: i32 = match exp_digits {
        None => 0,
        Some((neg, d)) => {
            // More than four exponent digits cannot give an amount in range (or any precision).
            let d = d.trim_start_matches('0');
            if d.len() > 4 {
                return Err(if neg { AmountError::TooPrecise(cut(text)) } else { too_large(text, max_millicents) });
            }
            let v: i32 = d.parse().unwrap_or(0);
            if neg {
                -v
            } else {
                v
            }
        }
    };
    let frac_len = i32::try_from(frac_digits.len()).map_err(|_| syntax())?;
    let mut scale = exp - frac_len + 3;
    let mut mantissa = mantissa.to_string();
    while scale < 0 {
        match mantissa.strip_suffix('0') {
            Some(m) => {
                mantissa = m.to_string();
                scale += 1;
            }
            None => return Err(AmountError::TooPrecise(cut(text))),
        }
    }
    let max = u128::from(max_millicents);
    // A value in range has at most 20 significant digits, so longer mantissas are out of range.
    if mantissa.len() > 20 || scale > 20 {
        return Err(too_large(text, max_millicents));
    }
    let mut value: u128 = mantissa.bytes().fold(0u128, |acc, b| acc * 10 + u128::from(b - b'0'));
    for _ in 0..scale {
        value = value.checked_mul(10).ok_or_else(|| too_large(text, max_millicents))?;
    }
    if value > max {
        return Err(too_large(text, max_millicents));
    }
    u64::try_from(value).map_err(|_| too_large(text, max_millicents))
}

/// The ASCII digits of `s` with TOML's `_` separators removed (each between two digits); `None`
/// when `s` is empty or anything else.
fn digits(s: &str) -> Option<String> {
    let b = s.as_bytes();
    if b.is_empty() || !b.first()?.is_ascii_digit() || !b.last()?.is_ascii_digit() {
        return None;
    }
    let mut out = String::with_capacity(b.len());
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'0'..=b'9' => out.push(char::from(c)),
            b'_' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => {}
            _ => return None,
        }
    }
    Some(out)
}

fn too_large(text: &str, max_millicents: u64) -> AmountError {
    AmountError::TooLarge { text: cut(text), max_millicents }
}

fn cut(text: &str) -> String {
    text.chars().take(MAX_AMOUNT_TEXT).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dollars_show_the_fraction_and_never_round() {
        assert_eq!(dollars(0), "$0.00");
        assert_eq!(dollars(5), "$0.00005");
        assert_eq!(dollars(42), "$0.00042");
        assert_eq!(dollars(1_000), "$0.01");
        assert_eq!(dollars(50_000), "$0.50");
        assert_eq!(dollars(99_500_000), "$995.00");
        assert_eq!(dollars(10_050), "$0.1005");
        assert_eq!(dollars(9_950_001), "$99.50001");
        assert_eq!(dollars(u64::MAX), "$184467440737095.51615");
        assert_eq!(signed_dollars(-320), "-$0.0032");
        assert_eq!(signed_dollars(i128::from(u64::MAX) * -1000), "-$184467440737095516.15");
    }

    #[test]
    fn cents_round_up_at_the_edges() {
        assert_eq!(cents_up(0), 0);
        assert_eq!(cents_up(1), 1);
        assert_eq!(cents_up(1_000), 1);
        assert_eq!(cents_up(1_001), 2);
        assert_eq!(cents_up(u64::MAX), u64::MAX / 1000 + 1);
        assert_eq!(from_cents(9_007_199_254_740), Some(MAX_MILLICENTS - 991));
        assert_eq!(MAX_MILLICENTS, 9_007_199_254_740_991);
        assert_eq!(dollars(MAX_MILLICENTS), "$90071992547.40991");
        assert_eq!(cents_text(MAX_MILLICENTS), "9007199254740.991");
        assert_eq!(
            (cents_text(0), cents_text(2_500), cents_text(1_050), cents_text(7)),
            ("0".into(), "2.5".into(), "1.05".into(), "0.007".into())
        );
        assert_eq!(from_cents(u64::MAX), None);
        assert_eq!(from_cents_saturating(u64::MAX), u64::MAX);
    }

    #[test]
    fn decimal_cents_parse_exactly() {
        let ok = |s: &str| parse_cents(s, MAX_MILLICENTS).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("0"), 0);
        assert_eq!(ok("250"), 250_000);
        assert_eq!(ok("7.5"), 7_500);
        assert_eq!(ok("2.5"), 2_500);
        assert_eq!(ok("0.005"), 5);
        assert_eq!(ok("0.001"), 1);
        assert_eq!(ok("0.0010"), 1);
        assert_eq!(ok("+1_000.125"), 1_000_125);
        assert_eq!(ok("2.5e3"), 2_500_000);
        assert_eq!(ok("5E-3"), 5);
        assert_eq!(ok("1000e-6"), 1);
        assert_eq!(ok("0.0e-10000000"), 0);
        assert_eq!(ok("000.100"), 100);
        // 0.1 is not exactly representable as a float; here it is exact.
        assert_eq!(ok("0.1"), 100);
        assert_eq!(ok("9007199254740.991"), MAX_MILLICENTS);
        assert_eq!(ok("9_007_199_254_740_991e-3"), MAX_MILLICENTS);
    }

    #[test]
    fn bad_decimal_cents_are_refused_with_the_reason() {
        let err = |s: &str| parse_cents(s, MAX_MILLICENTS).unwrap_err();
        for s in ["", ".", "1.", ".5", "1..2", "1_", "_1", "1__0", "a", "1e", "1e+", "0x10", "inf", "nan", "1 "] {
            assert!(matches!(err(s), AmountError::Syntax(_)), "{s:?}: {:?}", err(s));
        }
        assert!(matches!(err("-1"), AmountError::Negative(_)));
        assert!(matches!(err("-0.0"), AmountError::Negative(_)));
        assert!(matches!(err("0.0001"), AmountError::TooPrecise(_)));
        assert!(matches!(err("1e-4"), AmountError::TooPrecise(_)));
        assert!(matches!(err("1500e-6"), AmountError::TooPrecise(_)));
        assert!(matches!(err("1e-99999"), AmountError::TooPrecise(_)));
        assert!(matches!(err("9007199254740.992"), AmountError::TooLarge { .. }));
        assert!(matches!(err("1e13"), AmountError::TooLarge { .. }));
        assert!(err("1e13").to_string().contains("(9007199254740.991 cents)"), "{}", err("1e13"));
        assert!(matches!(err("1e99999"), AmountError::TooLarge { .. }));
        assert!(matches!(err(&"9".repeat(40)), AmountError::TooLarge { .. }));
        assert!(matches!(err(&"1".repeat(65)), AmountError::Syntax(_)));
        assert!(err("0.0001").to_string().contains("0.001 cent"), "{}", err("0.0001"));
        assert!(matches!(parse_cents("3", 2_000), Err(AmountError::TooLarge { max_millicents: 2_000, .. })));
        assert_eq!(parse_cents("2", 2_000), Ok(2_000));
    }

    proptest! {
        /// Whatever the text, parsing returns (no panic); every whole number of millicents in
        /// range, written as cents with three decimals, reads back exactly.
        #[test]
        fn parsing_never_panics_and_round_trips(text in "[-+0-9._eE]{0,70}", mc in 0..=MAX_MILLICENTS) {
            let _ = parse_cents(&text, MAX_MILLICENTS);
            let written = format!("{}.{:03}", mc / 1000, mc % 1000);
            prop_assert_eq!(parse_cents(&written, MAX_MILLICENTS), Ok(mc));
            prop_assert_eq!(parse_cents(&cents_text(mc), MAX_MILLICENTS), Ok(mc));
        }

        /// Dollars are exact: the digits read back as the same number of millicents.
        #[test]
        fn dollars_are_exact(mc in any::<u64>()) {
            let d = dollars(mc);
            let (whole, frac) = d.trim_start_matches('$').split_once('.').expect("a point");
            let frac = format!("{frac:0<5}");
            let back = whole.parse::<u128>().expect("whole") * 100_000 + frac.parse::<u128>().expect("frac");
            prop_assert_eq!(back, u128::from(mc));
        }
    }
}
