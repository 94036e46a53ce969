//! Civil dates as day numbers, and the FHIR date/dateTime/instant formats.
//!
//! Output must not depend on the wall clock (so a seed always yields the same bytes), and the
//! arithmetic we need (ages, "three days later", future appointments) is simple enough that a
//! date library would be more weight than help. Days are counted from 1970-01-01.

pub use carerecord_adapters::calendar::{civil_from_days, days_from_civil};

/// FHIR `date`: `YYYY-MM-DD`.
pub fn date(day: i64) -> String {
    let (y, m, d) = civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// FHIR `instant` (also a valid `dateTime`): `YYYY-MM-DDThh:mm:00Z`.
pub fn instant(day: i64, minute_of_day: u32) -> String {
    let minute = minute_of_day.min(24 * 60 - 1);
    format!("{}T{:02}:{:02}:00Z", date(day), minute / 60, minute % 60)
}

/// Parses `YYYY-MM-DD` (optionally followed by a time, which is ignored) into a day number.
pub fn parse_date(s: &str) -> Option<i64> {
    let s = s.get(..10)?;
    let mut parts = s.split('-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=days_in_month(y, m)).contains(&d) {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Whole years between two day numbers (age on `on` for someone born on `born`).
pub fn years_between(born: i64, on: i64) -> i64 {
    let (by, bm, bd) = civil_from_days(born);
    let (oy, om, od) = civil_from_days(on);
    let mut years = oy - by;
    if (om, od) < (bm, bd) {
        years -= 1;
    }
    years
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(date(days_from_civil(2024, 2, 29)), "2024-02-29");
        assert_eq!(date(days_from_civil(1957, 3, 2)), "1957-03-02");
        for z in -40_000..40_000 {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }

    #[test]
    fn parses_and_rejects_dates() {
        assert_eq!(parse_date("2026-03-02"), Some(days_from_civil(2026, 3, 2)));
        assert_eq!(
            parse_date("2026-03-02T10:00:00Z"),
            Some(days_from_civil(2026, 3, 2))
        );
        assert_eq!(parse_date("2025-02-29"), None);
        assert_eq!(parse_date("2026-13-01"), None);
        assert_eq!(parse_date("26-1-1"), None);
        assert_eq!(parse_date("é"), None);
    }

    #[test]
    fn age_counts_birthdays() {
        let born = days_from_civil(1957, 3, 2);
        assert_eq!(years_between(born, days_from_civil(2026, 3, 1)), 68);
        assert_eq!(years_between(born, days_from_civil(2026, 3, 2)), 69);
    }
}
