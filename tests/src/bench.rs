//! Shared by the benchmarks: how many rounds to run, and the spread of a figure over them.

/// A figure over several rounds: median (the upper one of an even count), lowest, highest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; panics if there are none.
    pub fn of(values: &[f64]) -> Spread {
        assert!(!values.is_empty(), "no rounds to summarise");
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Spread {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }

    /// `median (min..max)` with `decimals` digits after the point.
    pub fn show(&self, decimals: usize) -> String {
        format!(
            "{:.*} ({:.*}..{:.*})",
            decimals, self.median, decimals, self.min, decimals, self.max
        )
    }
}

/// `ISOLA_BENCH_ROUNDS`, or `default`.
pub fn rounds(default: usize) -> usize {
    std::env::var("ISOLA_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_upper_median_and_the_extremes() {
        let s = Spread::of(&[3.0, 1.0, 4.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 4.0));
        assert_eq!(Spread::of(&[0.5]).show(2), "0.50 (0.50..0.50)");
    }
}
