//! `--chaos`: fault injection for testing a grid, never for lending a machine. With
//! `wrong=P,slow=P,drop=P,garbage=P`, that fraction of finished tiles is sent back wrong
//! (one element changed, with a valid checksum, as a cheater would), held back past its
//! deadline, lost by dropping the connection mid-tile, or replaced by an undecodable frame.
//! The coordinator must catch, survive and recover from each.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::RngExt;
use tabgrid_shared::Dtype;
use tabgrid_shared::matrix;
use tabgrid_shared::worker::Computed;

/// How long a `slow` result is held back: longer than any lease the tests give out.
pub const SLOW_DELAY: Duration = Duration::from_secs(3);

/// Probabilities of each fault, per finished tile; at most one fault hits a tile.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Chaos {
    pub wrong: f64,
    pub slow: f64,
    pub drop: f64,
    pub garbage: f64,
}

/// The fault that hits one tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Wrong,
    Slow,
    Drop,
    Garbage,
}

impl Chaos {
    pub fn is_off(&self) -> bool {
        *self == Chaos::default()
    }

    /// Draws the fault for one tile (`unit` uniform in `[0, 1)`).
    pub fn pick(&self, unit: f64) -> Option<Fault> {
        let mut edge = 0.0;
        for (p, fault) in [
            (self.wrong, Fault::Wrong),
            (self.slow, Fault::Slow),
            (self.drop, Fault::Drop),
            (self.garbage, Fault::Garbage),
        ] {
            edge += p;
            if unit < edge {
                return Some(fault);
            }
        }
        None
    }
}

impl FromStr for Chaos {
    type Err = String;

    fn from_str(s: &str) -> Result<Chaos, String> {
        let mut chaos = Chaos::default();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected NAME=P"))?;
            let p: f64 = value
                .trim()
                .parse()
                .map_err(|_| format!("{part:?}: {value:?} is not a probability"))?;
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{part:?}: a probability is between 0 and 1"));
            }
            match name.trim() {
                "wrong" => chaos.wrong = p,
                "slow" => chaos.slow = p,
                "drop" => chaos.drop = p,
                "garbage" => chaos.garbage = p,
                other => {
                    return Err(format!(
                        "unknown fault {other:?} (wrong, slow, drop, garbage)"
                    ));
                }
            }
        }
        let total = chaos.wrong + chaos.slow + chaos.drop + chaos.garbage;
        if total > 1.0 + 1e-9 {
            return Err(format!("the probabilities add up to {total}, over 1"));
        }
        Ok(chaos)
    }
}

impl fmt::Display for Chaos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wrong={},slow={},drop={},garbage={}",
            self.wrong, self.slow, self.drop, self.garbage
        )
    }
}

/// Makes a result wrong the way a careless or lazy cheater would: one element off by more
/// than the tile's largest value (so far beyond rounding), with the checksum recomputed
/// later by the session so that the payload looks intact.
pub fn corrupt(done: &mut Computed, rng: &mut impl rand::Rng) {
    let dtype = done.dtype;
    let Ok(payload) = done.outcome.as_mut() else {
        return;
    };
    match dtype {
        Dtype::F32 => {
            let mut values = matrix::f32s(payload);
            if values.is_empty() {
                return;
            }
            let largest = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let at = rng.random_range(0..values.len());
            values[at] += 1.0 + 2.0 * largest;
            *payload = matrix::f32_bytes(&values);
        }
        Dtype::F64 => {
            let mut values = matrix::f64s(payload);
            if values.is_empty() {
                return;
            }
            let largest = values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let at = rng.random_range(0..values.len());
            values[at] += 1.0 + 2.0 * largest;
            *payload = matrix::f64_bytes(&values);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_picks() {
        let chaos: Chaos = "wrong=0.5, drop=0.25".parse().unwrap();
        assert_eq!(chaos.wrong, 0.5);
        assert_eq!(chaos.drop, 0.25);
        assert_eq!(chaos.pick(0.1), Some(Fault::Wrong));
        assert_eq!(chaos.pick(0.6), Some(Fault::Drop));
        assert_eq!(chaos.pick(0.9), None);
        assert!("wrong=2".parse::<Chaos>().is_err());
        assert!("wrong=0.7,slow=0.7".parse::<Chaos>().is_err());
        assert!("evil=0.1".parse::<Chaos>().is_err());
        assert!(Chaos::default().is_off());
    }

    #[test]
    fn corruption_changes_the_payload() {
        let mut done = Computed {
            lease: 1,
            dtype: Dtype::F32,
            outcome: Ok(1.5f32.to_le_bytes().repeat(8)),
            compute_micros: 1,
        };
        let before = done.clone();
        corrupt(&mut done, &mut rand::rng());
        assert_ne!(done.outcome, before.outcome);
    }
}
