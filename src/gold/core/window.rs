//! Event-time windows: tumbling (`1m`) or hopping (`5m every 1m`), aligned to the Unix epoch.

use std::fmt;
use std::str::FromStr;

use crate::units::parse_duration;

/// A window shape, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    pub size: i64,
    pub slide: i64,
}

/// Why a window setting cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error(transparent)]
    Duration(#[from] crate::units::DurationError),
    #[error("{0:?} is too long")]
    TooLong(String),
    #[error("{0:?} must be longer than zero")]
    NotPositive(String),
    #[error("the slide must divide the window size (got {0:?})")]
    SlideMustDivide(String),
}

impl FromStr for WindowSpec {
    type Err = WindowError;

    /// `1m` (tumbling) or `5m every 1m` (hopping; the slide must divide the size).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let micros = |part: &str| -> Result<i64, WindowError> {
            let d = parse_duration(part.trim())?;
            let us =
                i64::try_from(d.as_micros()).map_err(|_| WindowError::TooLong(part.to_string()))?;
            if us <= 0 {
                return Err(WindowError::NotPositive(part.to_string()));
            }
            Ok(us)
        };
        let (size, slide) = match text.split_once(" every ") {
            Some((size, slide)) => (micros(size)?, micros(slide)?),
            None => {
                let size = micros(text)?;
                (size, size)
            }
        };
        if slide > size || size % slide != 0 {
            return Err(WindowError::SlideMustDivide(text.to_string()));
        }
        Ok(Self { size, slide })
    }
}

impl fmt::Display for WindowSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.size == self.slide {
            write!(f, "{}s", self.size / 1_000_000)
        } else {
            write!(
                f,
                "{}s every {}s",
                self.size / 1_000_000,
                self.slide / 1_000_000
            )
        }
    }
}

impl WindowSpec {
    /// Start of every window holding event time `t` (microseconds), oldest first: `size / slide`
    /// windows for a hopping spec, one for a tumbling one.
    pub fn starts(&self, t: i64) -> impl Iterator<Item = i64> + '_ {
        let last = t.div_euclid(self.slide) * self.slide;
        let count = self.size / self.slide;
        (0..count).rev().map(move |i| last - i * self.slide)
    }

    pub fn end(&self, start: i64) -> i64 {
        start.saturating_add(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_tumbling_and_hopping() {
        let tumbling: WindowSpec = "1m".parse().expect("tumbling");
        assert_eq!((tumbling.size, tumbling.slide), (60_000_000, 60_000_000));
        let hopping: WindowSpec = "5m every 1m".parse().expect("hopping");
        assert_eq!((hopping.size, hopping.slide), (300_000_000, 60_000_000));
        assert!(
            "5m every 2m".parse::<WindowSpec>().is_err(),
            "slide must divide"
        );
        assert!("1m every 5m".parse::<WindowSpec>().is_err());
        assert!("0s".parse::<WindowSpec>().is_err());
        assert!("soon".parse::<WindowSpec>().is_err());
    }

    #[test]
    fn assigns_windows() {
        let tumbling: WindowSpec = "1m".parse().expect("spec");
        assert_eq!(
            tumbling.starts(90_000_000).collect::<Vec<_>>(),
            [60_000_000]
        );
        assert_eq!(tumbling.starts(-1).collect::<Vec<_>>(), [-60_000_000]);
        let hopping: WindowSpec = "3m every 1m".parse().expect("spec");
        assert_eq!(
            hopping.starts(150_000_000).collect::<Vec<_>>(),
            [0, 60_000_000, 120_000_000]
        );
    }

    proptest! {
        /// Every window returned holds t, and every window that holds t is returned.
        #[test]
        fn assignment_is_exactly_the_windows_holding_t(
            t in -10_000_000_000_000i64..10_000_000_000_000,
            slide_s in 1i64..120,
            factor in 1i64..6,
        ) {
            let spec = WindowSpec { size: slide_s * factor * 1_000_000, slide: slide_s * 1_000_000 };
            let starts: Vec<i64> = spec.starts(t).collect();
            prop_assert_eq!(starts.len() as i64, factor);
            for s in &starts {
                prop_assert!(*s <= t && t < spec.end(*s));
                prop_assert_eq!(s.rem_euclid(spec.slide), 0);
            }
            // The window just before the oldest and just after the newest do not hold t.
            let oldest = starts[0] - spec.slide;
            prop_assert!(t >= spec.end(oldest));
            let newest = starts[starts.len() - 1] + spec.slide;
            prop_assert!(newest > t);
        }
    }
}
