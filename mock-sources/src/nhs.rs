//! NHS numbers for the synthetic population: the Modulus 11 check, generation in the
//! never-issued 999 range, parsing and display.
//!
//! Why not the broker's own type: this crate plays the outside world (the systems the broker
//! reads), so it must not share code with the product it tests — a bug in the product's check
//! digit would otherwise be invisible, reproduced on both sides. This is an independent
//! implementation of the same public algorithm (NHS Data Dictionary, "NHS number").

use std::fmt;

/// A valid NHS number: ten digits whose last is the Modulus 11 check digit of the first nine.
/// `Debug` is masked like a real patient identifier's would be; `Display` gives the digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NhsNumber(u64);

/// Why a string is not a valid NHS number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid NHS number (ten digits, Modulus 11 check digit)")]
pub struct InvalidNhsNumber;

/// The check digit for nine digits (most significant first), or `None` when the remainder
/// gives 10: such a stem is never issued.
fn check_digit(stem: u32) -> Option<u64> {
    let mut s = stem;
    let mut sum = 0u32;
    // Weights 2..=10 from the ninth digit back to the first.
    for weight in 2..=10 {
        sum += (s % 10) * weight;
        s /= 10;
    }
    match 11 - sum % 11 {
        11 => Some(0),
        10 => None,
        c => Some(u64::from(c)),
    }
}

impl NhsNumber {
    /// The NHS number whose first nine digits are `stem` (at most 999,999,999), if it has one.
    pub fn from_stem(stem: u32) -> Option<NhsNumber> {
        if stem > 999_999_999 {
            return None;
        }
        check_digit(stem).map(|c| NhsNumber(u64::from(stem) * 10 + c))
    }

    /// Parses ten digits, allowing spaces and hyphens between them (`943 476 5919`).
    pub fn parse(input: &str) -> Result<NhsNumber, InvalidNhsNumber> {
        let mut value = 0u64;
        let mut digits = 0;
        for c in input.trim().chars() {
            match c {
                '0'..='9' => {
                    digits += 1;
                    if digits > 10 {
                        return Err(InvalidNhsNumber);
                    }
                    value = value * 10 + u64::from(c as u8 - b'0');
                }
                ' ' | '-' => {}
                _ => return Err(InvalidNhsNumber),
            }
        }
        if digits != 10 {
            return Err(InvalidNhsNumber);
        }
        let stem = u32::try_from(value / 10).map_err(|_| InvalidNhsNumber)?;
        match NhsNumber::from_stem(stem) {
            Some(n) if n.0 == value => Ok(n),
            _ => Err(InvalidNhsNumber),
        }
    }

    /// The ten digits, e.g. `9990000018`.
    pub fn as_digits(&self) -> String {
        format!("{:010}", self.0)
    }

    /// The grouped form people read, e.g. `999 000 0018`.
    pub fn grouped(&self) -> String {
        let d = self.as_digits();
        format!("{} {} {}", &d[0..3], &d[3..6], &d[6..10])
    }
}

impl fmt::Display for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:010}", self.0)
    }
}

impl fmt::Debug for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NhsNumber(***{:02})", self.0 % 100)
    }
}

impl std::str::FromStr for NhsNumber {
    type Err = InvalidNhsNumber;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NhsNumber::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_numbers_check_and_bad_ones_do_not() {
        // Published examples of valid NHS numbers.
        for ok in ["9434765919", "943 476 5919", "943-476-5919", "4010232137"] {
            assert!(NhsNumber::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "9434765918",
            "943476591",
            "94347659190",
            "943476591x",
            "",
            "0000000060",
        ] {
            assert_eq!(NhsNumber::parse(bad), Err(InvalidNhsNumber), "{bad}");
        }
    }

    #[test]
    fn stems_give_valid_numbers_except_where_the_check_digit_would_be_ten() {
        let first = NhsNumber::from_stem(999_000_001).expect("valid");
        assert_eq!(first.as_digits(), "9990000018");
        assert_eq!(first.grouped(), "999 000 0018");
        assert_eq!(format!("{first}"), "9990000018");
        assert_eq!(format!("{first:?}"), "NhsNumber(***18)");
        let mut made = 0;
        for stem in 999_000_000..999_001_000 {
            if let Some(n) = NhsNumber::from_stem(stem) {
                assert_eq!(NhsNumber::parse(&n.as_digits()), Ok(n));
                assert!(n.as_digits().starts_with("999"));
                made += 1;
            }
        }
        assert!((880..=940).contains(&made), "about 10/11 valid: {made}");
        assert_eq!(NhsNumber::from_stem(1_000_000_000), None);
        assert_eq!(
            NhsNumber::from_stem(0).map(|n| n.as_digits()),
            Some("0000000000".into())
        );
    }
}
