//! 4-bit NormalFloat (NF4) storage of frozen weights, for QLoRA (Dettmers et al. 2023,
//! <https://arxiv.org/abs/2305.14314>), bit-compatible with bitsandbytes' `quantize_4bit(...,
//! blocksize=64, quant_type="nf4")`:
//!
//! - the flattened weight is cut into blocks of [`BLOCK`] values; each block keeps its absolute
//!   maximum (`absmax`) and each value the index of the nearest of the 16 NF4 levels
//!   ([`NF4_LEVELS`]) to `value / absmax`; two indices per byte, the first in the high nibble;
//! - **double quantisation** (the paper's §3, bitsandbytes' `compress_statistics=True`): the
//!   absmaxes less their mean (`offset`) are quantised again, in blocks of [`ABSMAX_BLOCK`], to
//!   the nearest of the 256 values of bitsandbytes' signed dynamic 8-bit map
//!   ([`dynamic_map`]), each block with its own fp32 absmax. That cuts the scales from 4 bytes
//!   per 64 weights to about one, so the stored weight takes ~0.516 bytes per parameter
//!   (~0.563 without).
//!
//! Written here rather than bound from bitsandbytes: its kernels are a Python/CUDA library that
//! a Rust process cannot link, and the whole scheme is a few tensor operations in libtorch.

use tch::{Device, Kind, Tensor};

use crate::Result;

/// Weights per 4-bit block (bitsandbytes' default and the paper's).
pub const BLOCK: i64 = 64;
/// Absmaxes per 8-bit block under double quantisation (the paper's).
pub const ABSMAX_BLOCK: i64 = 256;

/// The 16 NF4 levels, as bitsandbytes ships them (`create_normal_map(offset=0.9677083)`, the
/// paper's construction: quantiles of N(0, 1) for 8 positive and 7 negative levels, exact zero,
/// normalised to [-1, 1]); `the_levels_are_the_papers_normal_quantiles` rebuilds them.
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: 256
/// sorted values in [-1, 1], dense near zero, that double quantisation maps absmaxes to.
pub fn dynamic_map() -> Result<Tensor> {
    const MAX_EXPONENT_BITS: i32 = 7;
    const NON_SIGN_BITS: i32 = 7;
    let mut parts = Vec::new();
    let scaled_means = |items: i64, scale: f64| -> Result<Tensor> {
        let b = Tensor::f_linspace(0.1, 1.0, items, (Kind::Float, Device::Cpu))?;
        let means = b
            .f_narrow(0, 0, items - 1)?
            .f_add(&b.f_narrow(0, 1, items - 1)?)?
            .f_div_scalar(2.0)?;
        Ok(means.f_mul_scalar(scale)?)
    };
    for i in 0..MAX_EXPONENT_BITS {
        let items = 2i64.pow((i + NON_SIGN_BITS - MAX_EXPONENT_BITS) as u32) + 1;
        let scale = 10f64.powi(-(MAX_EXPONENT_BITS - 1) + i);
        parts.push(scaled_means(items, scale)?);
        parts.push(scaled_means(items, -scale)?);
    }
    // `2 ** (non_sign_bits - max_exponent_bits) - 1` = 0 extra items for these settings.
    parts.push(Tensor::f_from_slice(&[0f32, 1.0])?);
    let all = Tensor::f_cat(&parts, 0)?;
    let n = all.size()[0];
    let all = if n < 256 {
        Tensor::f_cat(
            &[all, Tensor::f_zeros([256 - n], (Kind::Float, Device::Cpu))?],
            0,
        )?
    } else {
        all
    };
    Ok(all.f_sort(0, false)?.0)
}

/// The per-block scales of an NF4 weight.
pub enum Absmax {
    /// One fp32 absmax per block.
    Plain(Tensor),
    /// Double quantisation: `dynamic_map[codes] * scales[block / 256] + offset`.
    Double {
        /// uint8, one per 4-bit block.
        codes: Tensor,
        /// fp32, one per [`ABSMAX_BLOCK`] absmaxes.
        scales: Tensor,
        /// The mean absmax, subtracted before quantising.
        offset: f64,
        /// [`dynamic_map`], kept on the weight's device.
        map: Tensor,
    },
}

/// A weight stored in NF4: packed 4-bit codes and per-block scales.
pub struct Nf4Weight {
    /// The weight's shape (`[out, in]` for a linear layer).
    pub shape: Vec<i64>,
    /// uint8, two codes per byte (high nibble first), padded with code 7 (0.0) to whole blocks.
    pub packed: Tensor,
    pub absmax: Absmax,
    /// `[256, 2]` fp32 on the weight's device: row b holds the two levels byte b encodes, so
    /// that each forward dequantises with one lookup (built once, at quantisation).
    pairs: Tensor,
}

/// The indices of the nearest of `levels` (sorted) to each of `x`, as bitsandbytes picks them:
/// `bucketize` over the midpoints (a value on a midpoint takes the lower level).
fn nearest(x: &Tensor, levels: &Tensor) -> Result<Tensor> {
    let n = levels.size()[0];
    let mid = levels
        .f_narrow(0, 0, n - 1)?
        .f_add(&levels.f_narrow(0, 1, n - 1)?)?
        .f_div_scalar(2.0)?;
    Ok(x.f_bucketize(&mid, true, false)?.f_to_kind(Kind::Uint8)?)
}

/// `x` (fp32, flat) scaled per block of `block` by its absmax into [-1, 1], zero-padded to whole
/// blocks, as bitsandbytes scales it: whole blocks multiplied by `1 / absmax`, the partial last
/// block divided by its absmax. Returns the scaled values `[blocks, block]` and the absmaxes.
fn scale_blocks(x: &Tensor, block: i64) -> Result<(Tensor, Tensor)> {
    let n = x.size()[0];
    let full = n - n % block;
    let mut scaled = Vec::new();
    let mut absmax = Vec::new();
    if full > 0 {
        let b = x.f_narrow(0, 0, full)?.f_view([full / block, block])?;
        let am = b.f_abs()?.f_amax([1], false)?;
        let inv = am.f_clamp_min(1e-38)?.f_reciprocal()?.f_view([-1, 1])?;
        scaled.push(b.f_mul(&inv)?.f_clamp(-1.0, 1.0)?);
        absmax.push(am);
    }
    if full < n {
        let r = x.f_narrow(0, full, n - full)?;
        let am = r.f_abs()?.f_amax([0], true)?.f_clamp_min(1e-38)?;
        let s = r.f_div(&am)?.f_clamp(-1.0, 1.0)?;
        let s = s.f_constant_pad_nd([0, block - (n - full)])?;
        scaled.push(s.f_view([1, block])?);
        absmax.push(am);
    }
    Ok((Tensor::f_cat(&scaled, 0)?, Tensor::f_cat(&absmax, 0)?))
}

impl Nf4Weight {
    /// Quantises `w` (any float kind; computed in fp32 on its device).
    pub fn quantize(w: &Tensor, double_quant: bool) -> Result<Self> {
        let _g = tch::no_grad_guard();
        let device = w.device();
        let shape = w.size();
        let flat = w.f_detach()?.f_to_kind(Kind::Float)?.f_reshape([-1])?;
        let (scaled, absmax) = scale_blocks(&flat, BLOCK)?;
        let levels = Tensor::f_from_slice(&NF4_LEVELS)?.f_to_device(device)?;
        let codes = nearest(&scaled.f_reshape([-1, 2])?, &levels)?;
        let bytes = Tensor::f_arange(256, (Kind::Int, device))?;
        let pairs = Tensor::f_stack(
            &[
                levels.f_index_select(0, &bytes.f_bitwise_right_shift_tensor_scalar(4)?)?,
                levels.f_index_select(0, &bytes.f_bitwise_and(15)?)?,
            ],
            1,
        )?;
        let packed = codes
            .f_select(1, 0)?
            .f_bitwise_left_shift_tensor_scalar(4)?
            .f_bitwise_or_tensor(&codes.f_select(1, 1)?)?;
        let absmax = if double_quant {
            let offset = absmax.f_mean(Kind::Float)?;
            let centred = absmax.f_sub(&offset)?;
            let (s, scales) = scale_blocks(&centred, ABSMAX_BLOCK)?;
            let map = dynamic_map()?.f_to_device(device)?;
            let nb = absmax.size()[0];
            let codes = nearest(&s.f_reshape([-1])?, &map)?.f_narrow(0, 0, nb)?;
            Absmax::Double {
                codes,
                scales,
                offset: offset.f_double_value(&[])?,
                map,
            }
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Nf4Weight {
            shape,
            packed,
            absmax,
            pairs,
        })
    }

    /// The per-block absmaxes in fp32 (undoing double quantisation).
    pub fn absmax(&self) -> Result<Tensor> {
        Ok(match &self.absmax {
            Absmax::Plain(a) => a.shallow_clone(),
            Absmax::Double {
                codes,
                scales,
                offset,
                map,
            } => {
                let nb = codes.size()[0];
                let pad = (ABSMAX_BLOCK - nb % ABSMAX_BLOCK) % ABSMAX_BLOCK;
                let v = map
                    .f_index_select(0, &codes.f_to_kind(Kind::Int)?)?
                    .f_constant_pad_nd([0, pad])?
                    .f_view([-1, ABSMAX_BLOCK])?
                    .f_mul(&scales.f_view([-1, 1])?)?;
                v.f_reshape([-1])?
                    .f_narrow(0, 0, nb)?
                    .f_add_scalar(*offset)?
            }
        })
    }

    /// The weight in `kind`: each code's level times its block's absmax (fp32, then cast).
    pub fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        let _g = tch::no_grad_guard();
        let values = self
            .pairs
            .f_index_select(0, &self.packed.f_to_kind(Kind::Int)?)?
            .f_view([-1, BLOCK])?
            .f_mul(&self.absmax()?.f_view([-1, 1])?)?;
        let n: i64 = self.shape.iter().product();
        let w = values
            .f_reshape([-1])?
            .f_narrow(0, 0, n)?
            .f_view(&*self.shape)?;
        Ok(if kind == Kind::Float {
            w
        } else {
            w.f_to_kind(kind)?
        })
    }

    /// Bytes the stored weight takes (codes and scales; not the lookup tables, a few KB per
    /// weight whatever its size).
    pub fn bytes(&self) -> u64 {
        let b = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        b(&self.packed)
            + match &self.absmax {
                Absmax::Plain(a) => b(a),
                Absmax::Double { codes, scales, .. } => b(codes) + b(scales) + 8,
            }
    }

    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// Another handle to the same storage.
    pub fn shallow_clone(&self) -> Self {
        Nf4Weight {
            shape: self.shape.clone(),
            packed: self.packed.shallow_clone(),
            pairs: self.pairs.shallow_clone(),
            absmax: match &self.absmax {
                Absmax::Plain(a) => Absmax::Plain(a.shallow_clone()),
                Absmax::Double {
                    codes,
                    scales,
                    offset,
                    map,
                } => Absmax::Double {
                    codes: codes.shallow_clone(),
                    scales: scales.shallow_clone(),
                    offset: *offset,
                    map: map.shallow_clone(),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paper's construction (bitsandbytes' `create_normal_map(0.9677083, use_extra_value)`):
    /// N(0, 1) quantiles at 8 evenly spaced probabilities from 0.9677083 down to 0.5 for the
    /// positive half and 7 for the negative, plus zero, scaled so the largest is 1.
    #[test]
    fn the_levels_are_the_papers_normal_quantiles() {
        let offset = 0.967_708_3f64;
        let ppf = |p: f64| {
            let t = Tensor::from_slice(&[2.0 * p - 1.0]).erfinv();
            std::f64::consts::SQRT_2 * t.double_value(&[0])
        };
        let lin = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|i| offset + (0.5 - offset) * i as f64 / (n - 1) as f64)
                .collect()
        };
        let pos: Vec<f64> = lin(9)[..8].iter().map(|&p| ppf(p)).collect();
        let neg: Vec<f64> = lin(8)[..7].iter().map(|&p| -ppf(p)).collect();
        let mut v: Vec<f64> = pos.into_iter().chain([0.0]).chain(neg).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let max = v.iter().cloned().fold(f64::MIN, f64::max);
        for (got, want) in v.iter().map(|x| x / max).zip(NF4_LEVELS) {
            assert!((got - f64::from(want)).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn the_dynamic_map_is_256_sorted_values_in_minus_one_to_one() {
        let m: Vec<f32> = Vec::try_from(dynamic_map().unwrap()).unwrap();
        assert_eq!(m.len(), 256);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!((m[0] < -0.99, m[255]), (true, 1.0));
        assert!(m.contains(&0.0));
    }

    /// Every value comes back within half the widest gap between levels times its block's absmax
    /// (plus the absmax's own double-quantisation error), zero stays zero, and the stored weight
    /// takes the bytes the scheme promises.
    #[test]
    fn round_trip_error_and_size() {
        tch::manual_seed(3);
        // An odd shape: a partial last block and an odd count of values.
        let w = Tensor::randn([301, 77], (Kind::Float, Device::Cpu))
            .f_mul_scalar(0.02)
            .unwrap();
        let half_gap = NF4_LEVELS
            .windows(2)
            .map(|p| p[1] - p[0])
            .fold(0f32, f32::max)
            / 2.0;
        for dq in [false, true] {
            let q = Nf4Weight::quantize(&w, dq).unwrap();
            let d = q.dequantize(Kind::Float).unwrap();
            assert_eq!(d.size(), w.size());
            let flat = w.reshape([-1]).constant_pad_nd([0, 64 - 301 * 77 % 64]);
            let am = flat.view([-1, 64]).abs().amax([1], true);
            let err = (&d.reshape([-1]).constant_pad_nd([0, 64 - 301 * 77 % 64]) - &flat)
                .view([-1, 64])
                .abs();
            // Double quantisation moves each absmax by well under 1%.
            let bound = am * f64::from(half_gap) * if dq { 1.01 } else { 1.0 + 1e-6 };
            let worst = (err - bound).max().double_value(&[]);
            assert!(worst <= 0.0, "dq {dq}: exceeds the bound by {worst}");
            let per_param = q.bytes() as f64 / q.numel() as f64;
            let want = if dq {
                0.5 + 1.0 / 64.0
            } else {
                0.5 + 4.0 / 64.0
            };
            assert!(
                (per_param - want).abs() < 0.01,
                "dq {dq}: {per_param} bytes/param"
            );
        }
        let z = Nf4Weight::quantize(&Tensor::zeros([3, 64], (Kind::Float, Device::Cpu)), true)
            .unwrap()
            .dequantize(Kind::Float)
            .unwrap();
        assert_eq!(z.abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    /// A 4096 x 4096 weight, the size of a 7B model's attention projections, stored with double
    /// quantisation: at most 0.55 bytes per parameter (the bound).
    #[test]
    fn a_large_weight_takes_under_0_55_bytes_per_parameter() {
        let w = Tensor::randn([4096, 4096], (Kind::Float, Device::Cpu));
        let q = Nf4Weight::quantize(&w, true).unwrap();
        let per_param = q.bytes() as f64 / q.numel() as f64;
        assert!(per_param <= 0.55, "{per_param}");
        assert_eq!(q.dequantize(Kind::BFloat16).unwrap().kind(), Kind::BFloat16);
    }
}
