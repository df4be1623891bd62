//! The fused linear head's `f64` reference: the logits `z = H W^T + b` in `f64`, then
//! [`cpu::compute`](crate::cpu::compute)'s loss and logit gradient `G`, then `dH = G W`,
//! `dW = G^T H`, `db = sum_rows G`. Mirror of shaders/linear.wgsl and shaders/matmul.wgsl.

use crate::error::Result;
use crate::problem::Gradient;

use super::batch::{LinearBatch, LinearOutput};
use super::problem::HeadGradients;

/// The loss and gradients of `batch` under `spec`, in `f64` from the inputs' exact values.
///
/// ```
/// use lsce::linear::{cpu, HeadGradients, LinearBatch};
/// let (hidden, head) = ([1.0f32, 0.0], [1.0f32, 0.0, 0.0, 1.0, -1.0, 0.0]);
/// let batch = LinearBatch::classes(2, &hidden, &head, &[0]).unwrap();
/// let out = cpu::compute(&lsce::LossSpec::pytorch(0.0), &batch, HeadGradients::All).unwrap();
/// // z = [1, 0, -1]: the loss is lse(z) - 1.
/// let lse = (1f64.exp() + 1.0 + (-1f64).exp()).ln();
/// assert!((out.loss.loss[0] - (lse - 1.0)).abs() < 1e-12);
/// assert_eq!(out.d_head.unwrap().len(), 6);
/// ```
pub fn compute(
    spec: &crate::LossSpec,
    batch: &LinearBatch<'_>,
    gradients: HeadGradients,
) -> Result<LinearOutput<f64>> {
    let values = batch.validate_layout(spec)?;
    batch.loss.check_labels(spec, batch.vocab())?;
    let (rows, dim, vocab) = (
        batch.rows() as usize,
        batch.dim as usize,
        batch.vocab() as usize,
    );
    let mut z = vec![0.0f64; rows * vocab];
    for r in 0..rows {
        for v in 0..vocab {
            let dot: f64 = (0..dim)
                .map(|d| batch.hidden.get(r * dim + d) * batch.head.get(v * dim + d))
                .sum();
            z[r * vocab + v] = dot + batch.bias.map_or(0.0, |b| b.get(v));
        }
    }
    let gradient = match gradients {
        HeadGradients::None => Gradient::None,
        _ => Gradient::Separate,
    };
    let mut loss = crate::cpu::compute_from(spec, values, &batch.loss, &|i| z[i], gradient);
    let g = loss.grad.take();
    let (mut d_hidden, mut d_head, mut d_bias) = (None, None, None);
    if let Some(g) = g {
        let mut dh = vec![0.0; rows * dim];
        for r in 0..rows {
            for v in 0..vocab {
                let gv = g[r * vocab + v];
                for d in 0..dim {
                    dh[r * dim + d] += gv * batch.head.get(v * dim + d);
                }
            }
        }
        d_hidden = Some(dh);
        if gradients == HeadGradients::All {
            let mut dw = vec![0.0; vocab * dim];
            let mut db = vec![0.0; vocab];
            for r in 0..rows {
                for v in 0..vocab {
                    let gv = g[r * vocab + v];
                    db[v] += gv;
                    for d in 0..dim {
                        dw[v * dim + d] += gv * batch.hidden.get(r * dim + d);
                    }
                }
            }
            d_head = Some(dw);
            d_bias = batch.bias.map(|_| db);
        }
    }
    Ok(LinearOutput {
        loss,
        d_hidden,
        d_head,
        d_bias,
    })
}
