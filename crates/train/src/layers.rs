//! Building blocks shared by the architectures: linear layers (with an optional LoRA adapter),
//! embeddings, LayerNorm, RMSNorm (three ways of applying its weight), activations, dropout,
//! attention masks, and seeded host-side initialisation.
//!
//! Weights live in the *storage* kind decided at load (fp32 for trainable parameters, the base
//! kind for frozen ones); every forward casts them to the *compute* kind of the activations, so
//! bf16 compute over fp32 master weights needs no autocast.

use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};

use crate::lora::LoraAdapter;
use crate::quant::Nf4Weight;
use crate::Result;

/// Per-forward settings.
#[derive(Debug, Clone, Copy)]
pub struct Fwd {
    /// Kind of the activations (Float on CPU; BFloat16 when the base is bf16).
    pub kind: Kind,
    /// Dropout on.
    pub train: bool,
}

/// `t` in `kind`: a shallow handle when it already is (no copy).
pub fn cast(t: &Tensor, kind: Kind) -> Result<Tensor> {
    Ok(if t.kind() == kind {
        t.shallow_clone()
    } else {
        t.f_to_kind(kind)?
    })
}

pub fn dropout(x: Tensor, p: f64, train: bool) -> Result<Tensor> {
    if train && p > 0.0 {
        Ok(x.f_dropout(p, true)?)
    } else {
        Ok(x)
    }
}

/// A linear layer, weight `[out, in]` as `torch.nn.Linear` stores it.
pub struct Linear {
    /// Hugging Face module name in the task model, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
    /// GPT-2's Conv1D: Hugging Face stores the weight as `[in, out]`; tuna keeps `[out, in]` and
    /// transposes when loading and saving.
    pub conv1d: bool,
    /// QLoRA: the weight stored in NF4, dequantised in each forward (`weight` is then a
    /// zero-stride placeholder of the right shape).
    pub nf4: Option<Box<Nf4Weight>>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor, f: Fwd) -> Result<Tensor> {
        let w = match &self.nf4 {
            Some(q) => q.dequantize(f.kind)?,
            None => cast(&self.weight, f.kind)?,
        };
        let b = match &self.bias {
            Some(b) => Some(cast(b, f.kind)?),
            None => None,
        };
        let y = x.f_linear(&w, b.as_ref())?;
        match &self.lora {
            None => Ok(y),
            Some(l) => Ok(y.f_add(&l.forward(x, f)?)?),
        }
    }

    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }
}

pub fn embedding(weight: &Tensor, ids: &Tensor, kind: Kind) -> Result<Tensor> {
    let e = Tensor::f_embedding(weight, ids, -1, false, false)?;
    cast(&e, kind)
}

/// LayerNorm over the last dimension; without bias for models that leave it out (ModernBERT).
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = x.kind();
        let w = cast(&self.weight, k)?;
        let b = match &self.bias {
            Some(b) => Some(cast(b, k)?),
            None => None,
        };
        let d = *x.size().last().expect("non-scalar");
        Ok(x.f_layer_norm([d], Some(&w), b.as_ref(), self.eps, true)?)
    }
}

/// How an RMSNorm applies its weight; the families differ only there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RmsScale {
    /// Llama, Qwen, Phi-3: normalised in fp32, cast back, then times the weight.
    AfterCast,
    /// OLMo 2: times the weight in fp32, then cast back.
    InFp32,
    /// Gemma: times `1 + weight` in fp32, then cast back (the weight is stored around 0).
    OnePlusInFp32,
}

/// RMSNorm over the last dimension, normalised in fp32.
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
    pub scale: RmsScale,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = x.kind();
        let d = *x.size().last().expect("non-scalar");
        let w = match self.scale {
            RmsScale::OnePlusInFp32 => self.weight.f_to_kind(Kind::Float)?.f_add_scalar(1.0)?,
            _ => self.weight.shallow_clone(),
        };
        if k == Kind::Float {
            return Ok(x.f_rms_norm([d], Some(&cast(&w, k)?), self.eps)?);
        }
        let n = x
            .f_to_kind(Kind::Float)?
            .f_rms_norm([d], None::<Tensor>, self.eps)?;
        Ok(match self.scale {
            RmsScale::AfterCast => n.f_to_kind(k)?.f_mul(&cast(&w, k)?)?,
            _ => n.f_mul(&cast(&w, Kind::Float)?)?.f_to_kind(k)?,
        })
    }
}

/// The activation functions config.json names.
pub fn activation(x: &Tensor, name: &str) -> Result<Tensor> {
    Ok(match name {
        "gelu" => x.f_gelu("none")?,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => x.f_gelu("tanh")?,
        "relu" => x.f_relu()?,
        "silu" | "swish" => x.f_silu()?,
        "tanh" => x.f_tanh()?,
        other => {
            return Err(crate::Error::Config(format!(
                "activation '{other}' is not supported"
            )))
        }
    })
}

/// Boolean attention mask (`true` = may attend) `[batch, 1, q, k]` for SDPA, or None when plain
/// causal attention (`is_causal`) is exact.
pub struct AttnMask {
    pub mask: Option<Tensor>,
    pub is_causal: bool,
}

/// Mask for decoders: causal, padding keys masked, optional sliding window (a query at `i` sees
/// keys `j` with `i - window < j <= i`). A query row with no visible key (a sequence of padding
/// only) gets its own position, so SDPA never returns NaN.
///
/// `all_real` says the batch has no padding (checked by the caller); then no mask tensor is
/// built and SDPA runs with `is_causal`, which lets it pick flash attention on GPU.
pub fn causal_mask(
    attention_mask: &Tensor,
    sliding_window: Option<i64>,
    all_real: bool,
) -> Result<AttnMask> {
    let t = attention_mask.size()[1];
    let t_cap = sliding_window.is_none_or(|w| w >= t);
    if all_real && t_cap {
        return Ok(AttnMask {
            mask: None,
            is_causal: true,
        });
    }
    let dev = attention_mask.device();
    let (allowed, eye) = causal_window(t, sliding_window, dev)?;
    let keys = attention_mask.f_ne(0)?.f_view([-1, 1, 1, t])?; // [b,1,1,t]
    let allowed = allowed.f_logical_and(&keys)?; // [b,1,t,t]
    let none = allowed.f_any_dim(-1, true)?.f_logical_not()?; // [b,1,t,1]
    let allowed = allowed.f_logical_or(&eye.f_logical_and(&none)?)?;
    Ok(AttnMask {
        mask: Some(allowed),
        is_causal: false,
    })
}

/// Mask for incremental decoding: the last `t` of the `T` positions `attention_mask` (`[b, T]`)
/// covers query the keys of all `T` (the cache's and their own): query `i` (position `T - t +
/// i`) sees key `j <= T - t + i` that is not padding, within `sliding_window` positions. A query
/// with no visible key (left padding) sees itself. `[b, 1, t, T]`.
pub fn step_mask(attention_mask: &Tensor, t: i64, sliding_window: Option<i64>) -> Result<AttnMask> {
    let total = attention_mask.size()[1];
    let dev = attention_mask.device();
    let q = Tensor::f_arange_start(total - t, total, (Kind::Int64, dev))?.f_view([t, 1])?;
    let k = Tensor::f_arange(total, (Kind::Int64, dev))?.f_view([1, total])?;
    let mut allowed = k.f_le_tensor(&q)?;
    if let Some(w) = sliding_window {
        allowed = allowed.f_logical_and(&q.f_sub(&k)?.f_lt(w)?)?;
    }
    let eye = q.f_eq_tensor(&k)?.f_view([1, 1, t, total])?;
    let keys = attention_mask.f_ne(0)?.f_view([-1, 1, 1, total])?;
    let allowed = allowed.f_view([1, 1, t, total])?.f_logical_and(&keys)?;
    let none = allowed.f_any_dim(-1, true)?.f_logical_not()?;
    Ok(AttnMask {
        mask: Some(allowed.f_logical_or(&eye.f_logical_and(&none)?)?),
        is_causal: false,
    })
}

/// Position ids of the last `t` tokens of rows padded on the left: each row's count of real
/// tokens before a token (as transformers' `generate` numbers them; padding gets 1), `[b, t]`.
pub fn step_positions(attention_mask: &Tensor, t: i64) -> Result<Tensor> {
    let m = attention_mask.f_ne(0)?.f_to_kind(Kind::Int64)?;
    let pos = m
        .f_cumsum(-1, Kind::Int64)?
        .f_sub_scalar(1)?
        .f_masked_fill(&m.f_eq(0)?, 1)?;
    let total = pos.size()[1];
    Ok(pos.f_narrow(1, total - t, t)?)
}

/// The causal pattern of `t` positions, `[1, 1, t, t]` (`true` where query `i` may see key
/// `j`: `j <= i`, and `i - j < window` with a sliding window), and the diagonal `[1, 1, t, t]`.
fn causal_window(
    t: i64,
    sliding_window: Option<i64>,
    dev: tch::Device,
) -> Result<(Tensor, Tensor)> {
    let idx = Tensor::f_arange(t, (Kind::Int64, dev))?;
    let q = idx.f_view([t, 1])?;
    let k = idx.f_view([1, t])?;
    let mut allowed = k.f_le_tensor(&q)?;
    if let Some(w) = sliding_window {
        allowed = allowed.f_logical_and(&q.f_sub(&k)?.f_lt(w)?)?;
    }
    Ok((
        allowed.f_view([1, 1, t, t])?,
        q.f_eq_tensor(&k)?.f_view([1, 1, t, t])?,
    ))
}

/// Mask for packed rows (`segment_ids` `[b, t]`, examples numbered from 1, 0 = padding): a
/// query sees the keys of its own example at or before it (within `sliding_window`); a padding
/// query sees only itself, so SDPA never returns NaN.
pub fn packed_mask(segment_ids: &Tensor, sliding_window: Option<i64>) -> Result<AttnMask> {
    let s = segment_ids.size();
    let (b, t) = (s[0], s[1]);
    let dev = segment_ids.device();
    let (allowed, eye) = causal_window(t, sliding_window, dev)?;
    let sq = segment_ids.f_view([b, 1, t, 1])?;
    let sk = segment_ids.f_view([b, 1, 1, t])?;
    let same = sq.f_eq_tensor(&sk)?.f_logical_and(&sk.f_ne(0)?)?; // [b,1,t,t]
    let allowed = allowed.f_logical_and(&same)?;
    let pad_q = sq.f_eq(0)?;
    let allowed = allowed.f_logical_or(&eye.f_logical_and(&pad_q)?)?;
    Ok(AttnMask {
        mask: Some(allowed),
        is_causal: false,
    })
}

/// Mask for encoders (BERT): padding keys masked `[batch, 1, 1, k]`; a sequence of padding only
/// sees every key (no NaN).
pub fn padding_mask(attention_mask: &Tensor, all_real: bool) -> Result<AttnMask> {
    if all_real {
        return Ok(AttnMask {
            mask: None,
            is_causal: false,
        });
    }
    let t = attention_mask.size()[1];
    let keys = attention_mask.f_ne(0)?.f_view([-1, 1, 1, t])?;
    let none = keys.f_any_dim(-1, true)?.f_logical_not()?;
    Ok(AttnMask {
        mask: Some(keys.f_logical_or(&none)?),
        is_causal: false,
    })
}

/// The lowest finite value of `kind` (`torch.finfo(dtype).min`), with which transformers' eager
/// attention masks a score (DeBERTa, ModernBERT): a query whose every key is masked then attends
/// uniformly instead of returning NaN.
pub fn lowest(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Half => -65504.0,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// Whether every position of `attention_mask` is a real token. One host read (a device sync on
/// GPU) per forward, so the common unpadded batch can use `is_causal` attention.
pub fn all_real(attention_mask: &Tensor) -> Result<bool> {
    if attention_mask.numel() == 0 {
        return Ok(true);
    }
    let all = attention_mask.f_ne(0)?.f_all()?.f_to_kind(Kind::Int64)?;
    Ok(i64::try_from(&all).map_err(crate::Error::Torch)? != 0)
}

/// Index of the last real token of each row (right padding): `sum(mask) - 1`, at least 0.
pub fn last_token_index(attention_mask: &Tensor) -> Result<Tensor> {
    Ok(attention_mask
        .f_ne(0)?
        .f_sum_dim_intlist(-1, false, Kind::Int64)?
        .f_sub_scalar(1)?
        .f_clamp_min(0)?)
}

/// Seeded host-side random numbers (independent of libtorch's global generator, so parallel
/// tests and resumed jobs initialise the same way).
pub struct HostRng(rand::rngs::StdRng);

impl HostRng {
    pub fn new(seed: i64, stream: &str) -> Self {
        // Mix the stream name into the seed so each tensor gets its own sequence.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed as u64;
        for b in stream.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        HostRng(rand::rngs::StdRng::seed_from_u64(h))
    }

    /// `n` samples of N(0, std²) (Box-Muller).
    pub fn normal(&mut self, n: usize, std: f64) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let u1: f64 = 1.0 - self.0.gen::<f64>();
            let u2: f64 = self.0.gen::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let th = 2.0 * std::f64::consts::PI * u2;
            out.push((r * th.cos() * std) as f32);
            out.push((r * th.sin() * std) as f32);
        }
        out.truncate(n);
        out
    }

    /// `n` samples of U(-bound, bound).
    pub fn uniform(&mut self, n: usize, bound: f64) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.0.gen::<f64>() * 2.0 - 1.0) * bound) as f32)
            .collect()
    }
}

/// Scaled dot-product attention over `[batch, heads, seq, head_dim]` tensors.
pub fn sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    m: &AttnMask,
    dropout_p: f64,
    scale: Option<f64>,
    gqa: bool,
) -> Result<Tensor> {
    Ok(Tensor::f_scaled_dot_product_attention(
        q,
        k,
        v,
        m.mask.as_ref(),
        dropout_p,
        m.is_causal,
        scale,
        gqa,
    )?)
}

/// The hidden state at each row's index `idx` (`[batch]`): `[batch, seq, dim]` -> `[batch, dim]`.
pub fn gather_rows(h: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let s = h.size();
    let index = idx.f_view([s[0], 1, 1])?.f_expand([s[0], 1, s[2]], false)?;
    Ok(h.f_gather(1, &index, false)?.f_squeeze_dim(1)?)
}
