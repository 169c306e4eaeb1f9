//! Learning-rate schedules with linear warmup, matching transformers'
//! `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup` and
//! `get_cosine_schedule_with_warmup` (0.5 cycles). As there, optimiser step `k` (0-based) runs
//! with `peak * factor(k)`: with warmup the first step has learning rate 0.

use tuna_core::spec::LrSchedule;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: LrSchedule,
    pub peak: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// `warmup_steps` wins when > 0; otherwise `ceil(warmup_ratio * total_steps)` as in
    /// transformers' `TrainingArguments.get_warmup_steps`.
    pub fn new(
        kind: LrSchedule,
        peak: f64,
        total_steps: u64,
        warmup_steps: u64,
        warmup_ratio: f64,
    ) -> Schedule {
        let warmup = if warmup_steps > 0 {
            warmup_steps
        } else {
            (warmup_ratio * total_steps as f64).ceil() as u64
        };
        Schedule {
            kind,
            peak,
            warmup_steps: warmup,
            total_steps,
        }
    }

    /// The multiplier of the peak learning rate at optimiser step `step` (0-based).
    pub fn factor(&self, step: u64) -> f64 {
        let s = step as f64;
        let w = self.warmup_steps as f64;
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        let t = self.total_steps as f64;
        match self.kind {
            LrSchedule::Constant => 1.0,
            LrSchedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            LrSchedule::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    pub fn lr(&self, step: u64) -> f64 {
        self.peak * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_transformers() {
        // transformers: get_linear_schedule_with_warmup(opt, 2, 10) with lr 1.0 gives, for steps
        // 0..10: 0, .5, 1, .875, .75, .625, .5, .375, .25, .125
        let s = Schedule::new(LrSchedule::Linear, 1.0, 10, 2, 0.0);
        let got: Vec<f64> = (0..10).map(|k| s.lr(k)).collect();
        let want = [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        assert_eq!(s.lr(10), 0.0);
    }

    #[test]
    fn cosine_and_constant() {
        let c = Schedule::new(LrSchedule::Cosine, 2.0, 10, 0, 0.2);
        assert_eq!(c.warmup_steps, 2);
        assert_eq!(c.lr(0), 0.0);
        assert_eq!(c.lr(1), 1.0);
        assert!((c.lr(2) - 2.0).abs() < 1e-12);
        // Half way through the decay: cos(pi/2) → factor 0.5.
        assert!((c.lr(6) - 1.0).abs() < 1e-12);
        // Values printed by transformers 5.24's get_cosine_schedule_with_warmup(opt, 2, 10), lr 2.0.
        assert!((c.lr(3) - 1.9238795325112867).abs() < 1e-12);
        assert!((c.lr(9) - 0.07612046748871326).abs() < 1e-12);
        let k = Schedule::new(LrSchedule::Constant, 3.0, 10, 0, 0.0);
        assert!((0..10).all(|i| k.lr(i) == 3.0));
        let kw = Schedule::new(LrSchedule::Constant, 3.0, 10, 3, 0.0);
        assert_eq!((kw.lr(0), kw.lr(1), kw.lr(3)), (0.0, 1.0, 3.0));
        // Ratio rounds up as transformers does.
        assert_eq!(
            Schedule::new(LrSchedule::Linear, 1.0, 7, 0, 0.1).warmup_steps,
            1
        );
    }
}
