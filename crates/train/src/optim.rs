//! AdamW over tch tensors with state we own (so it can be saved and resumed), and gradient
//! clipping by global norm.
//!
//! The update is torch.optim.AdamW's single-tensor path (decoupled weight decay, bias
//! correction, `eps` added after the corrected square root):
//! `p *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2*v + g*((1-b2)*g);`
//! p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`.
//! Moments are fp32 whatever the parameter kind, or, with [`AdamWConfig::bf16_moments`], bf16
//! (4 bytes per trainable parameter instead of 8): each step reads them into fp32, updates them
//! there and stores them back with stochastic rounding ([`round_bf16_stochastic`]), since with
//! round-to-nearest `0.999 * v` rounds back to `v` in bf16's 8-bit mantissa and the second
//! moment stops decaying. A non-fp32 parameter is updated in fp32 and copied back. Weight decay
//! is off for biases and normalisation weights (by name: ending in `bias`, or containing `norm`
//! or `ln_`), like transformers' Trainer.
//!
//! Everything runs under `no_grad` with in-place ops and no host synchronisation; the only sync of
//! an optimiser step is the one the trainer does to read the loss and the norm together.
//! State is saved to safetensors as `exp_avg.<param>`, `exp_avg_sq.<param>` and `step`.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Keep both moments in bf16 with stochastic rounding instead of fp32.
    pub bf16_moments: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            bf16_moments: false,
        }
    }
}

struct Slot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

pub struct AdamW {
    pub config: AdamWConfig,
    slots: Vec<Slot>,
    /// Completed optimiser steps.
    pub step: i64,
}

impl AdamWConfig {
    /// The kind the moments are stored in.
    pub fn moment_kind(&self) -> Kind {
        if self.bf16_moments {
            Kind::BFloat16
        } else {
            Kind::Float
        }
    }
}

/// `x` (fp32) rounded to bf16 stochastically: up in magnitude with probability equal to the
/// fraction of a bf16 step the dropped low 16 bits of its fp32 pattern make, so that the
/// rounded value's expectation is `x`. Adds uniform noise below bit 16 of the bit pattern and
/// truncates, which is exact for either sign (the pattern is sign and magnitude); the truncated
/// fp32 value converts to bf16 without rounding. Draws from libtorch's generator. Written here
/// because libtorch has no stochastic-rounding conversion.
pub fn round_bf16_stochastic(x: &Tensor) -> Result<Tensor> {
    let bits = x.f_contiguous()?.f_view_dtype(Kind::Int)?;
    let noise = Tensor::f_randint_low(0, 1 << 16, x.size(), (Kind::Int, x.device()))?;
    Ok(bits
        .f_add(&noise)?
        .f_bitwise_and(-(1i64 << 16))?
        .f_view_dtype(Kind::Float)?
        .f_to_kind(Kind::BFloat16)?)
}

/// Whether weight decay applies to a parameter, by its name.
pub fn decays(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !(lower.ends_with("bias") || lower.contains("norm") || lower.contains("ln_"))
}

impl AdamW {
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Result<AdamW> {
        let mut slots = Vec::with_capacity(params.len());
        let kind = config.moment_kind();
        for (name, param) in params {
            let zeros = || Tensor::f_zeros_like(&param).and_then(|z| z.f_to_kind(kind));
            slots.push(Slot {
                decay: decays(&name),
                exp_avg: zeros()?,
                exp_avg_sq: zeros()?,
                name,
                param,
            });
        }
        Ok(AdamW {
            config,
            slots,
            step: 0,
        })
    }

    pub fn param_names(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.name.clone()).collect()
    }

    /// Names of the parameters that get weight decay.
    pub fn decayed(&self) -> Vec<String> {
        self.slots
            .iter()
            .filter(|s| s.decay)
            .map(|s| s.name.clone())
            .collect()
    }

    /// Sets every gradient to zero.
    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            s.param.zero_grad();
        }
    }

    /// The global L2 norm of the gradients as a 0-dim fp32 tensor (no host sync); a parameter
    /// without a gradient counts as zero.
    pub fn grad_norm(&self) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        let device = self
            .slots
            .first()
            .map(|s| s.param.device())
            .unwrap_or(tch::Device::Cpu);
        let mut norms = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let g = s.param.grad();
            if g.defined() {
                norms.push(g.f_to_kind(Kind::Float)?.f_norm()?);
            }
        }
        if norms.is_empty() {
            return Ok(Tensor::f_zeros([], (Kind::Float, device))?);
        }
        Ok(Tensor::f_stack(&norms, 0)?.f_norm()?)
    }

    /// Scales the gradients so their global norm is at most `max_norm`, as
    /// torch.nn.utils.clip_grad_norm_ does (`coef = min(1, max_norm / (norm + 1e-6))`), without a
    /// host sync. `norm` is [`AdamW::grad_norm`]'s result.
    pub fn clip_grad_norm(&mut self, norm: &Tensor, max_norm: f64) -> Result<()> {
        if max_norm <= 0.0 {
            return Ok(());
        }
        let _g = tch::no_grad_guard();
        let coef = norm
            .f_add_scalar(1e-6)?
            .f_reciprocal()?
            .f_mul_scalar(max_norm)?
            .f_clamp_max(1.0)?;
        for s in &mut self.slots {
            let mut g = s.param.grad();
            if g.defined() {
                let c = coef.f_to_kind(g.kind())?;
                let _ = g.f_mul_(&c)?;
            }
        }
        Ok(())
    }

    /// One AdamW step at learning rate `lr`. Parameters without a gradient are skipped.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        let _g = tch::no_grad_guard();
        self.step += 1;
        let c = self.config;
        let t = self.step as f64;
        let bc1 = 1.0 - c.beta1.powf(t);
        let bc2 = 1.0 - c.beta2.powf(t);
        let step_size = lr / bc1;
        let bc2_sqrt = bc2.sqrt();
        for s in &mut self.slots {
            let g = s.param.grad();
            if !g.defined() {
                continue;
            }
            let g = if g.kind() == Kind::Float {
                g
            } else {
                g.f_to_kind(Kind::Float)?
            };
            let fp32 = s.param.kind() == Kind::Float;
            let mut p = if fp32 {
                s.param.shallow_clone()
            } else {
                s.param.f_to_kind(Kind::Float)?
            };
            if s.decay && c.weight_decay != 0.0 {
                let _ = p.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
            }
            // bf16 moments are updated in fp32 copies, stored back after the update.
            let (mut m, mut v) = if c.bf16_moments {
                (
                    s.exp_avg.f_to_kind(Kind::Float)?,
                    s.exp_avg_sq.f_to_kind(Kind::Float)?,
                )
            } else {
                (s.exp_avg.shallow_clone(), s.exp_avg_sq.shallow_clone())
            };
            let _ = m.f_lerp_(&g, 1.0 - c.beta1)?;
            let _ = v.f_mul_scalar_(c.beta2)?;
            let _ = v.f_addcmul_(&g, &g.f_mul_scalar(1.0 - c.beta2)?)?;
            // p -= step_size * m / (sqrt(v) / sqrt(bc2) + eps), computed as
            // p += m / ((sqrt(v) + eps * sqrt(bc2)) * -1 / (step_size * sqrt(bc2))): the same value in
            // four passes over memory instead of six.
            if step_size != 0.0 {
                let mut denom = v.f_sqrt()?;
                let _ = denom.f_add_scalar_(c.eps * bc2_sqrt)?;
                let _ = denom.f_mul_scalar_(-1.0 / (step_size * bc2_sqrt))?;
                let _ = p.f_addcdiv_(&m, &denom)?;
            }
            if c.bf16_moments {
                s.exp_avg.f_copy_(&round_bf16_stochastic(&m)?)?;
                s.exp_avg_sq.f_copy_(&round_bf16_stochastic(&v)?)?;
            }
            if !fp32 {
                s.param.f_copy_(&p)?;
            }
        }
        Ok(())
    }

    /// The state as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`, `step`), on CPU.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.slots.len() + 1);
        for s in &self.slots {
            out.push((
                format!("exp_avg.{}", s.name),
                s.exp_avg.f_to_device(tch::Device::Cpu)?.f_contiguous()?,
            ));
            out.push((
                format!("exp_avg_sq.{}", s.name),
                s.exp_avg_sq.f_to_device(tch::Device::Cpu)?.f_contiguous()?,
            ));
        }
        out.push(("step".to_string(), Tensor::from_slice(&[self.step])));
        Ok(out)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors = self.state_tensors()?;
        Tensor::write_safetensors(&tensors, path).map_err(Error::from)
    }

    /// Restores the state written by [`AdamW::save`]; every parameter must be present.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let map: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)?.into_iter().collect();
        self.load_tensors(&map)
    }

    pub fn load_tensors(&mut self, map: &BTreeMap<String, Tensor>) -> Result<()> {
        let _g = tch::no_grad_guard();
        let step = map
            .get("step")
            .ok_or_else(|| Error::Config("optimizer state has no `step`".into()))?;
        let step = step.f_int64_value(&[0])?;
        for s in &mut self.slots {
            for (prefix, dst) in [
                ("exp_avg", &mut s.exp_avg),
                ("exp_avg_sq", &mut s.exp_avg_sq),
            ] {
                let key = format!("{prefix}.{}", s.name);
                let src = map
                    .get(&key)
                    .ok_or_else(|| Error::Config(format!("optimizer state lacks {key}")))?;
                if src.size() != dst.size() {
                    return Err(Error::Config(format!(
                        "optimizer state {key}: shape {:?}, expected {:?}",
                        src.size(),
                        dst.size()
                    )));
                }
                dst.f_copy_(src)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stochastic_rounding_is_unbiased_and_lands_on_neighbouring_bf16_values() {
        tch::manual_seed(0);
        // 1 + 2^-10 lies a quarter of a bf16 step (2^-7 at 1.0) above 1.0, and -3.3 between
        // two bf16 neighbours.
        for x in [1.0f32 + 2f32.powi(-10), -3.3] {
            let t = Tensor::full([200_000], f64::from(x), (Kind::Float, tch::Device::Cpu));
            let r = round_bf16_stochastic(&t).unwrap();
            assert_eq!(r.kind(), Kind::BFloat16);
            let r = r.to_kind(Kind::Float);
            let (lo, hi) = (
                f64::try_from(r.min()).unwrap(),
                f64::try_from(r.max()).unwrap(),
            );
            let nearest =
                f64::try_from(t.to_kind(Kind::BFloat16).to_kind(Kind::Float).max()).unwrap();
            assert!(lo < f64::from(x) && f64::from(x) < hi, "{lo} {x} {hi}");
            assert!(lo == nearest || hi == nearest, "{lo} {hi} {nearest}");
            let mean = f64::try_from(r.mean(Kind::Double)).unwrap();
            let step = hi - lo;
            assert!(
                (mean - f64::from(x)).abs() < 0.01 * step,
                "{x}: mean {mean} (step {step})"
            );
        }
        // Values bf16 holds exactly stay as they are.
        let exact = Tensor::from_slice(&[0.0f32, 1.0, -2.5, 0.15625]);
        let r = round_bf16_stochastic(&exact).unwrap().to_kind(Kind::Float);
        assert_eq!(
            Vec::<f32>::try_from(&r).unwrap(),
            vec![0.0, 1.0, -2.5, 0.15625]
        );
    }

    #[test]
    fn bf16_moments_keep_decaying_where_round_to_nearest_would_stall() {
        // A gradient that stops: v should decay as 0.999^t. Stored with round-to-nearest bf16,
        // 0.999 * v rounds back to v; stochastic rounding keeps the decay on average.
        let p = Tensor::zeros([50_000], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let cfg = AdamWConfig {
            bf16_moments: true,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), p.shallow_clone())], cfg).unwrap();
        tch::manual_seed(1);
        // One step with gradient 1 (v = 0.001), then 500 with gradient 0.
        p.sum(Kind::Float).backward();
        opt.step(1e-3).unwrap();
        let _ = p.grad().zero_();
        // Round-to-nearest would keep v where it is.
        let v0 = Tensor::from_slice(&[0.001f32]).to_kind(Kind::BFloat16);
        let decayed = (v0.to_kind(Kind::Float) * 0.999).to_kind(Kind::BFloat16);
        assert_eq!(
            f64::try_from(&decayed).unwrap(),
            f64::try_from(&v0).unwrap()
        );
        for _ in 0..500 {
            opt.step(1e-3).unwrap();
        }
        let v = opt.slots[0].exp_avg_sq.to_kind(Kind::Float);
        let mean = f64::try_from(v.mean(Kind::Double)).unwrap();
        let want = 0.001 * 0.999f64.powi(500);
        assert!((mean / want - 1.0).abs() < 0.01, "v {mean} vs {want}");
        assert_eq!(opt.slots[0].exp_avg_sq.kind(), Kind::BFloat16);
    }

    #[test]
    fn no_decay_names() {
        assert!(!decays("transformer.h.0.ln_1.weight"));
        assert!(!decays("model.layers.0.input_layernorm.weight"));
        assert!(!decays("bert.embeddings.LayerNorm.weight"));
        assert!(!decays("classifier.bias"));
        assert!(!decays("model.norm.weight"));
        assert!(decays("model.layers.0.self_attn.q_proj.weight"));
        assert!(decays("transformer.wte.weight"));
    }
}
