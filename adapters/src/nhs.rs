//! NHS numbers: parsing, the Modulus 11 check, and display.

use std::fmt;

/// A validated NHS number: ten digits whose last is the Modulus 11 check digit of the first nine.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NhsNumber([u8; 10]);

/// Why a string is not an NHS number. Messages are written for the person who typed it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NhsNumberError {
    #[error("NHS number is empty")]
    Empty,
    #[error("NHS number may contain only digits, spaces and hyphens; found {0:?}")]
    InvalidCharacter(char),
    #[error("NHS number must have 10 digits; found {0}")]
    WrongLength(usize),
    #[error(
        "NHS number check digit is wrong (expected {expected}, found {found}): check for a typing error"
    )]
    CheckDigitMismatch { expected: u8, found: u8 },
    #[error("NHS number is not valid: its first nine digits give no possible check digit")]
    NoValidCheckDigit,
}

impl NhsNumber {
    /// Parses the forms people type: `9434765919`, `943 476 5919`, `943-476-5919`.
    pub fn parse(input: &str) -> Result<Self, NhsNumberError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(NhsNumberError::Empty);
        }
        let mut digits = [0u8; 10];
        let mut n = 0usize;
        for c in input.chars() {
            match c {
                '0'..='9' => {
                    if n < 10 {
                        digits[n] = c as u8 - b'0';
                    }
                    n += 1;
                }
                ' ' | '-' => {}
                other => return Err(NhsNumberError::InvalidCharacter(other)),
            }
        }
        if n != 10 {
            return Err(NhsNumberError::WrongLength(n));
        }
        let expected = Self::check_digit(&digits[..9]).ok_or(NhsNumberError::NoValidCheckDigit)?;
        if expected != digits[9] {
            return Err(NhsNumberError::CheckDigitMismatch {
                expected,
                found: digits[9],
            });
        }
        Ok(NhsNumber(digits))
    }

    /// The Modulus 11 check digit for nine digits, or `None` when the remainder gives 10
    /// (such a number is never issued).
    pub fn check_digit(first_nine: &[u8]) -> Option<u8> {
        let sum: u32 = first_nine
            .iter()
            .zip((2..=10u32).rev())
            .map(|(d, w)| u32::from(*d) * w)
            .sum();
        match 11 - (sum % 11) {
            11 => Some(0),
            10 => None,
            c => Some(c as u8),
        }
    }

    /// Builds the NHS number whose first nine digits are those of `stem` (0..=999_999_999), if one
    /// exists. Used to make synthetic patients in the never-issued 999 range.
    pub fn from_stem(stem: u32) -> Option<Self> {
        if stem > 999_999_999 {
            return None;
        }
        let mut digits = [0u8; 10];
        let mut s = stem;
        for i in (0..9).rev() {
            digits[i] = (s % 10) as u8;
            s /= 10;
        }
        digits[9] = Self::check_digit(&digits[..9])?;
        Some(NhsNumber(digits))
    }

    /// The ten digits without separators, e.g. `9434765919`.
    pub fn as_digits(&self) -> String {
        self.0.iter().map(|d| char::from(b'0' + d)).collect()
    }

    /// The grouped form people read, e.g. `943 476 5919`.
    pub fn grouped(&self) -> String {
        let d = self.as_digits();
        format!("{} {} {}", &d[0..3], &d[3..6], &d[6..10])
    }
}

impl fmt::Display for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_digits())
    }
}

/// Debug shows the number masked: NHS numbers are patient identifiers and must not leak into
/// logs through `{:?}`.
impl fmt::Debug for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NhsNumber(***{}{})", self.0[8], self.0[9])
    }
}

impl std::str::FromStr for NhsNumber {
    type Err = NhsNumberError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_forms_people_type() {
        for s in [
            "9434765919",
            "943 476 5919",
            "943-476-5919",
            " 943 476 5919 ",
        ] {
            assert_eq!(
                NhsNumber::parse(s).map(|n| n.as_digits()),
                Ok("9434765919".into()),
                "{s}"
            );
        }
    }

    #[test]
    fn rejects_bad_numbers_with_the_reason() {
        let cases: &[(&str, NhsNumberError)] = &[
            ("", NhsNumberError::Empty),
            ("   ", NhsNumberError::Empty),
            ("943476591", NhsNumberError::WrongLength(9)),
            ("94347659190", NhsNumberError::WrongLength(11)),
            ("943476591x", NhsNumberError::InvalidCharacter('x')),
            ("943.476.5919", NhsNumberError::InvalidCharacter('.')),
            (
                "9434765918",
                NhsNumberError::CheckDigitMismatch {
                    expected: 9,
                    found: 8,
                },
            ),
            // 000000006x: sum = 6*2 = 12, 12 % 11 = 1, 11 - 1 = 10 -> never valid
            ("0000000060", NhsNumberError::NoValidCheckDigit),
        ];
        for (input, want) in cases {
            assert_eq!(NhsNumber::parse(input).as_ref(), Err(want), "{input:?}");
        }
    }

    #[test]
    fn check_digit_of_eleven_becomes_zero() {
        // 999000001: find a stem whose sum is divisible by 11 and check it ends with 0.
        let stem = (0..1000u32)
            .map(|i| 999_000_000 + i)
            .find(|s| {
                let n = NhsNumber::from_stem(*s);
                n.is_some_and(|n| n.as_digits().ends_with('0'))
            })
            .expect("some stem has check digit 0");
        let n = NhsNumber::from_stem(stem).expect("valid");
        assert_eq!(NhsNumber::parse(&n.as_digits()), Ok(n));
    }

    #[test]
    fn synthetic_numbers_are_valid_and_in_the_test_range() {
        let mut made = 0;
        for stem in 999_000_000..999_000_200 {
            if let Some(n) = NhsNumber::from_stem(stem) {
                assert!(n.as_digits().starts_with("999"));
                assert_eq!(NhsNumber::parse(&n.grouped()), Ok(n));
                made += 1;
            }
        }
        assert!(
            made > 150,
            "about 10/11 of stems give a valid number, got {made}"
        );
    }

    #[test]
    fn debug_masks_the_number() {
        let n = NhsNumber::parse("9434765919").expect("valid");
        assert_eq!(format!("{n:?}"), "NhsNumber(***19)");
    }
}
