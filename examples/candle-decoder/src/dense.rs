//! The reference: causal softmax attention written with candle ops over each request's full,
//! dense K/V history (kept per layer and request, grown by concatenation), in f32.

use candle_core::{DType, Result, Tensor, D};

use crate::model::Config;

/// One scheduled piece of a request in a step: `q_len` new tokens at rows `row..row + q_len`,
/// after which the request holds `seq_len` tokens.
#[derive(Clone, Copy, Debug)]
pub struct Piece {
    pub req: usize,
    pub row: usize,
    pub q_len: usize,
    pub seq_len: usize,
}

/// Dense K/V history: `history[layer][request]` is `(keys, values)`, `[len, kv_heads, head_size]`.
pub struct DenseCache {
    history: Vec<Vec<Option<(Tensor, Tensor)>>>,
}

impl DenseCache {
    pub fn new(layers: usize, requests: usize) -> Self {
        DenseCache { history: (0..layers).map(|_| vec![None; requests]).collect() }
    }

    /// Appends the step's keys and values of layer `layer` and returns its attention output
    /// `[tokens, hidden]` (bf16) for the step's `pieces`, in row order.
    pub fn attention(&mut self, cfg: &Config, layer: usize, qkv: &Tensor, pieces: &[Piece]) -> Result<Tensor> {
        let (h, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_size);
        let group = h / kvh;
        let scale = 1.0 / (d as f64).sqrt();
        let dev = qkv.device();
        let mut outs = Vec::with_capacity(pieces.len());
        for p in pieces {
            let rows = qkv.narrow(0, p.row, p.q_len)?.reshape((p.q_len, h + 2 * kvh, d))?;
            let q = rows.narrow(1, 0, h)?;
            let k_new = rows.narrow(1, h, kvh)?;
            let v_new = rows.narrow(1, h + kvh, kvh)?;
            let slot = &mut self.history[layer][p.req];
            let (k, v) = match slot.take() {
                Some((k, v)) => (Tensor::cat(&[&k, &k_new], 0)?, Tensor::cat(&[&v, &v_new], 0)?),
                None => (k_new.contiguous()?, v_new.contiguous()?),
            };
            let len = k.dim(0)?;
            if len != p.seq_len {
                candle_core::bail!("dense history of request {} holds {len} tokens, expected {}", p.req, p.seq_len);
            }
            // Query head `g * group + j` reads kv head `g`: fold the group into the query rows.
            let qf = q.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?.reshape((kvh, group * p.q_len, d))?;
            let kf = k.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?;
            let vf = v.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?;
            let scores = (qf.matmul(&kf.t()?.contiguous()?)? * scale)?.reshape((kvh, group, p.q_len, len))?;
            // Bottom-right causal: new token i sits at position len - q_len + i.
            let past = len - p.q_len;
            let mask: Vec<f32> = (0..p.q_len)
                .flat_map(|i| (0..len).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY }))
                .collect();
            let mask = Tensor::from_vec(mask, (p.q_len, len), dev)?;
            let scores = scores.broadcast_add(&mask)?;
            let max = scores.max_keepdim(D::Minus1)?;
            let e = scores.broadcast_sub(&max)?.exp()?;
            let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.reshape((kvh, group * p.q_len, len))?;
            let o = probs.matmul(&vf)?.reshape((h, p.q_len, d))?.transpose(0, 1)?.contiguous()?;
            outs.push(o.reshape((p.q_len, h * d))?.to_dtype(DType::BF16)?);
            *slot = Some((k, v));
        }
        Tensor::cat(&outs, 0)
    }
}
