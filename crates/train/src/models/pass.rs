//! One forward pass over an [`Architecture`]'s stack of layers, written once for every family:
//! the plain forward, the encoders' last hidden state, and the forward and backward with
//! activation (gradient) checkpointing.

use tch::{Device, Kind, Tensor};

use super::{Architecture, Core};
use crate::model::Batch;
use crate::Result;

/// The embeddings and every layer: the last layer's output and what the layers read.
pub(super) fn hidden<A: Architecture>(
    a: &A,
    core: &Core,
    batch: &Batch<'_>,
    train: bool,
) -> Result<(A::Pass, Tensor)> {
    let (p, mut h) = a.embed(core, batch, train)?;
    for i in 0..a.num_layers() {
        h = a.layer(i, &h, &p)?;
    }
    Ok((p, h))
}

/// The model's output (logits) for `batch`.
pub(super) fn forward<A: Architecture>(
    a: &A,
    core: &Core,
    batch: &Batch<'_>,
    train: bool,
) -> Result<Tensor> {
    let (p, h) = hidden(a, core, batch, train)?;
    a.head(&h, batch, &p)
}

/// Incremental decoding: `batch`'s tokens through every layer, each attending to the cached
/// keys and values and appending its own to `cache`; the logits of the last position, `[b,
/// vocab]`.
pub(super) fn forward_step<A: Architecture>(
    a: &A,
    core: &Core,
    batch: &Batch<'_>,
    cache: &mut crate::model::KvCache,
) -> Result<Tensor> {
    let n = a.num_layers();
    cache.layers.resize_with(n, || None);
    let (p, mut h) = a.embed_step(core, batch, cache.len())?;
    for (i, kv) in cache.layers.iter_mut().enumerate() {
        h = a.layer_step(i, &h, &p, kv)?;
    }
    let t = h.size()[1];
    let last = h.f_narrow(1, t - 1, 1)?;
    Ok(a.head(&last, batch, &p)?.f_select(1, 0)?)
}

/// Forward and backward of one batch with activation checkpointing: the forward keeps only
/// each layer's input (run without a graph), and the backward runs each layer's forward
/// again, last layer first, then its backward from the gradient of its output. `backward`
/// gets the logits, computes the loss and calls its backward (gradients reach the head and
/// the last layer's output). Each layer draws its dropout masks from a seed of its own, set
/// again for the recomputation, so both passes drop the same units. The gradients are those
/// of [`forward`] with the same masks.
///
/// Written by hand because tch has no custom autograd functions (PyTorch's
/// `torch.utils.checkpoint` is one): a layer's gradient is that of
/// `sum(layer(x) * grad_output)`, which is `grad_output`'s vector-Jacobian product.
pub(super) fn forward_backward_checkpointed<A: Architecture>(
    a: &A,
    core: &Core,
    batch: &Batch<'_>,
    train: bool,
    backward: &mut dyn FnMut(&Tensor) -> Result<()>,
) -> Result<()> {
    let (p, embedded) = a.embed(core, batch, train)?;
    // Per-layer seeds from the micro-batch's own stream (the caller seeded it).
    let base = Tensor::f_randint(i64::from(i32::MAX), [1], (Kind::Int64, Device::Cpu))?
        .int64_value(&[0]) as u64;
    let seed = |i: usize| base.wrapping_mul(0x9E37_79B9).wrapping_add(i as u64) as i64;
    let n = a.num_layers();
    let mut inputs = Vec::with_capacity(n);
    let mut h = embedded.f_detach()?;
    {
        let _no_graph = tch::no_grad_guard();
        for i in 0..n {
            tch::manual_seed(seed(i));
            let next = a.layer(i, &h, &p)?;
            inputs.push(h);
            h = next;
        }
    }
    let last = h.f_detach()?.set_requires_grad(true);
    let logits = a.head(&last, batch, &p)?;
    backward(&logits)?;
    drop(logits);
    let mut grad = last.grad();
    for i in (0..n).rev() {
        tch::manual_seed(seed(i));
        let x = inputs
            .pop()
            .expect("one input per layer")
            .set_requires_grad(true);
        let y = a.layer(i, &x, &p)?;
        y.f_mul(&grad)?.f_sum(y.kind())?.f_backward()?;
        grad = x.grad();
    }
    if embedded.requires_grad() {
        embedded
            .f_mul(&grad)?
            .f_sum(embedded.kind())?
            .f_backward()?;
    }
    Ok(())
}
