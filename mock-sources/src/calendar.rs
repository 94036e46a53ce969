//! Civil dates as day numbers, and the FHIR date/dateTime/instant formats.
//!
//! Output must not depend on the wall clock (so a seed always yields the same bytes), and the
//! arithmetic we need (ages, "three days later", future appointments) is simple enough that a
//! date library would be more weight than help. Days are counted from 1970-01-01. This crate
//! plays the outside world, so it has its own implementation rather than the broker's.

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    // Count from 1 March, so the leap day is the last day of the counting year.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = (i64::from(month) + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The `(year, month, day)` of a day number (the inverse of [`days_from_civil`]).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = ((month_from_march + 2) % 12 + 1) as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

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
