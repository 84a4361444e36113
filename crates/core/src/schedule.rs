//! When triggered tables run: a fixed interval (`"15m"`) or a five-field cron expression
//! (`"*/5 * * * *"`, evaluated in UTC), plus the human duration syntax the config uses.
//!
//! Pure arithmetic on Unix seconds so it is testable without a clock.

use std::time::Duration;

/// A malformed duration or cron expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// Not `<number><unit>` with unit ms, s, m, h or d.
    #[error("invalid duration {0:?}: expected a number and a unit, e.g. 250ms, 30s, 5m, 1h, 1d")]
    Duration(String),
    /// A cron expression that is not five valid fields.
    #[error("invalid cron expression {expr:?}: {reason}")]
    Cron { expr: String, reason: String },
}

/// A size: bytes, or a number with kB, MB, GB (powers of 1000) or KiB, MiB, GiB (`128MB`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size (e.g. 128MB)"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} in {text:?} (use kB, MB, GB, KiB, MiB or GiB)")),
    };
    n.checked_mul(factor).filter(|n| *n > 0).ok_or_else(|| format!("{text:?} is not a usable size"))
}

/// Parses `250ms`, `30s`, `5m`, `1h`, `1d` (a zero duration is an error).
pub fn parse_duration(text: &str) -> Result<Duration, ScheduleError> {
    let err = || ScheduleError::Duration(text.to_string());
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (number, unit) = t.split_at(split);
    let n: u64 = number.parse().map_err(|_| err())?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86400),
        _ => return Err(err()),
    };
    if d.is_zero() {
        return Err(err());
    }
    Ok(d)
}

/// When a triggered table runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// Every so often, counted from the end of the previous run.
    Every(Duration),
    /// At the minutes a cron expression names (UTC).
    Cron(Cron),
}

impl Schedule {
    /// Parses an interval (`15m`) or, when the text has spaces, a five-field cron expression.
    pub fn parse(text: &str) -> Result<Self, ScheduleError> {
        if text.trim().contains(char::is_whitespace) {
            Cron::parse(text).map(Schedule::Cron)
        } else {
            parse_duration(text).map(Schedule::Every)
        }
    }

    /// How long after `now` (Unix seconds, possibly fractional) the next run is due, given
    /// the previous run ended at `now`.
    pub fn delay_after(&self, now_unix: f64) -> Duration {
        match self {
            Schedule::Every(d) => *d,
            Schedule::Cron(c) => {
                let next = c.next_after(now_unix.floor() as i64);
                Duration::from_secs_f64((next as f64 - now_unix).max(0.0))
            }
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Every(d) => write!(f, "every {d:?}"),
            Schedule::Cron(c) => write!(f, "cron {:?}", c.expr),
        }
    }
}

/// A five-field cron expression: minute hour day-of-month month day-of-week, each `*`, a
/// number, a range `a-b`, a list `a,b` or a step `*/n` / `a-b/n`. As in Vixie cron, when both
/// day fields are restricted a day matches if either does. Day-of-week 0 and 7 are Sunday.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    expr: String,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_restricted: bool,
    weekdays_restricted: bool,
}

impl Cron {
    /// Parses a five-field expression.
    pub fn parse(expr: &str) -> Result<Self, ScheduleError> {
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let err = |reason: String| ScheduleError::Cron { expr: expr.to_string(), reason };
        if fields.len() != 5 {
            return Err(err(format!(
                "expected 5 fields (minute hour day-of-month month day-of-week), found {}",
                fields.len()
            )));
        }
        let field = |i: usize, name: &str, lo: u32, hi: u32| {
            parse_field(fields[i], lo, hi).map_err(|r| err(format!("{name} field {:?}: {r}", fields[i])))
        };
        let mut weekdays = field(4, "day-of-week", 0, 7)?;
        if weekdays & (1 << 7) != 0 {
            weekdays |= 1; // 7 is Sunday too
        }
        Ok(Self {
            expr: expr.trim().to_string(),
            minutes: field(0, "minute", 0, 59)?,
            hours: field(1, "hour", 0, 23)?,
            days: field(2, "day-of-month", 1, 31)?,
            months: field(3, "month", 1, 12)?,
            weekdays,
            days_restricted: fields[2] != "*",
            weekdays_restricted: fields[4] != "*",
        })
    }

    /// The first matching minute strictly after `unix` (seconds), as Unix seconds.
    pub fn next_after(&self, unix: i64) -> i64 {
        let mut t = (unix.div_euclid(60) + 1) * 60;
        // Every valid expression matches within about four years (Feb 29); bound the search.
        let limit = t + 5 * 366 * 86400;
        while t < limit {
            let (days, secs) = (t.div_euclid(86400), t.rem_euclid(86400));
            let (_, month, day) = civil_from_days(days);
            let weekday = (days + 4).rem_euclid(7) as u32; // 1970-01-01 was a Thursday
            let day_ok = match (self.days_restricted, self.weekdays_restricted) {
                (true, true) => bit(self.days, day) || bit(self.weekdays, weekday),
                _ => bit(self.days, day) && bit(self.weekdays, weekday),
            };
            if !bit(self.months, month) || !day_ok {
                t = (days + 1) * 86400;
                continue;
            }
            let (hour, minute) = ((secs / 3600) as u32, ((secs % 3600) / 60) as u32);
            if !bit(self.hours, hour) {
                t = days * 86400 + (hour as i64 + 1) * 3600;
                continue;
            }
            if bit(self.minutes, minute) {
                return t;
            }
            t += 60;
        }
        limit
    }
}

fn bit(set: u64, n: u32) -> bool {
    set & (1 << n) != 0
}

fn parse_field(text: &str, lo: u32, hi: u32) -> Result<u64, String> {
    let mut set = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, s.parse::<u32>().map_err(|_| format!("bad step {s:?}"))?),
            None => (part, 1),
        };
        if step == 0 {
            return Err("a step of 0".into());
        }
        let number = |s: &str| s.parse::<u32>().map_err(|_| format!("{s:?} is not a number"));
        let (a, b) = match range {
            "*" => (lo, hi),
            r => match r.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None if part.contains('/') => (number(r)?, hi),
                None => (number(r)?, number(r)?),
            },
        };
        if a < lo || b > hi || a > b {
            return Err(format!("values must be within {lo}-{hi}"));
        }
        let mut v = a;
        while v <= b {
            set |= 1 << v;
            v += step;
        }
    }
    Ok(set)
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-22 05:07:30 UTC, a Sunday.
    const NOW: i64 = 1_795_324_050;

    fn next(expr: &str, from: i64) -> i64 {
        Cron::parse(expr).unwrap().next_after(from)
    }

    #[test]
    fn durations_read_like_config_values() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "5", "m", "0s", "1.5s", "5 weeks", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_schedule_is_an_interval_or_a_cron_expression() {
        assert_eq!(Schedule::parse("15m"), Ok(Schedule::Every(Duration::from_secs(900))));
        assert!(matches!(Schedule::parse("*/5 * * * *"), Ok(Schedule::Cron(_))));
        let err = Schedule::parse("*/5 * * *").unwrap_err().to_string();
        assert!(err.contains("expected 5 fields"), "{err}");
        let err = Schedule::parse("61 * * * *").unwrap_err().to_string();
        assert!(err.contains("minute field \"61\""), "{err}");
    }

    #[test]
    fn cron_finds_the_next_matching_minute_in_utc() {
        assert_eq!(civil_from_days(NOW / 86400), (2026, 11, 22));
        let minute = NOW - NOW % 60; // 05:07:00
        assert_eq!(next("* * * * *", NOW), minute + 60);
        assert_eq!(next("*/5 * * * *", NOW), minute + 3 * 60); // 05:10
        assert_eq!(next("0 6 * * *", NOW), minute - 7 * 60 + 3600); // 06:00 today
        assert_eq!(next("30 4 * * *", NOW), minute - 7 * 60 - 3600 + 30 * 60 + 86400); // 04:30 tomorrow
        assert_eq!(next("0 0 * * 1", NOW), (NOW / 86400 + 1) * 86400); // Monday 00:00
        assert_eq!(next("0 0 1 1 *", NOW), 1_798_761_600); // 2027-01-01
        assert_eq!(next("0 0 29 2 *", NOW), 1_835_395_200); // 2028-02-29
        assert_eq!(next("0 12 * * 0,7", NOW), (NOW / 86400) * 86400 + 12 * 3600);
        // Sunday noon
    }

    #[test]
    fn a_restricted_day_of_month_or_day_of_week_matches_either() {
        // 1st of the month OR a Monday: the next is Monday 2026-11-23.
        assert_eq!(next("0 0 1 * 1", NOW), (NOW / 86400 + 1) * 86400);
    }

    #[test]
    fn a_cron_schedule_waits_until_the_next_match() {
        let s = Schedule::parse("*/5 * * * *").unwrap();
        assert_eq!(s.delay_after(NOW as f64), Duration::from_secs(150));
    }
}
