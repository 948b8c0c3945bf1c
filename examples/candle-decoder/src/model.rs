//! A small Llama-style decoder written with candle ops, random weights, bf16: token embedding,
//! then per layer RMSNorm, a fused QKV projection, RoPE, attention, the output projection and a
//! SwiGLU MLP, each with its residual; a final RMSNorm and the LM head. The attention is a
//! closure, so the same weights run once on paged-attention-rs and once on candle's dense
//! attention.

use candle_core::{DType, Device, Module, Result, Tensor, D};

/// The model's shape. Head size and head counts are ones the CUDA kernels are built for.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub vocab: usize,
    pub layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_size: usize,
    pub intermediate: usize,
    pub max_position: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
}

impl Config {
    pub fn hidden(&self) -> usize {
        self.num_heads * self.head_size
    }

    /// Columns of the fused QKV projection: query heads, then key heads, then value heads.
    pub fn fused(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_size
    }
}

/// A deterministic generator (splitmix64), so both runs and every machine see the same weights
/// and prompts without a random-number crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    pub fn symmetric(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A `[rows, cols]` bf16 weight with variance `1 / rows` (so activations stay of order one).
fn weight(rng: &mut Rng, rows: usize, cols: usize, dev: &Device) -> Result<Tensor> {
    let a = (3.0 / rows as f32).sqrt();
    let data: Vec<f32> = (0..rows * cols).map(|_| a * rng.symmetric()).collect();
    Tensor::from_vec(data, (rows, cols), dev)?.to_dtype(DType::BF16)
}

/// RMSNorm weights near one.
fn norm_weight(rng: &mut Rng, n: usize, dev: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..n).map(|_| 1.0 + 0.1 * rng.symmetric()).collect();
    Tensor::from_vec(data, n, dev)?.to_dtype(DType::BF16)
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl Module for RmsNorm {
    /// In f32, like Llama implementations, then back to bf16.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        xf.broadcast_div(&rms)?.to_dtype(DType::BF16)?.broadcast_mul(&self.weight)
    }
}

struct Layer {
    attn_norm: RmsNorm,
    /// `[hidden, fused]`.
    wqkv: Tensor,
    /// `[hidden, hidden]`.
    wo: Tensor,
    mlp_norm: RmsNorm,
    /// `[hidden, 2 * intermediate]`: gate, then up.
    w_gate_up: Tensor,
    /// `[intermediate, hidden]`.
    w_down: Tensor,
}

/// The decoder's weights and RoPE tables.
pub struct Model {
    pub cfg: Config,
    embed: Tensor,
    layers: Vec<Layer>,
    final_norm: RmsNorm,
    lm_head: Tensor,
    /// `[max_position, head_size / 2]`, f32.
    cos: Tensor,
    sin: Tensor,
}

impl Model {
    pub fn random(cfg: Config, seed: u64, dev: &Device) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let h = cfg.hidden();
        let embed_data: Vec<f32> = (0..cfg.vocab * h).map(|_| rng.symmetric()).collect();
        let embed = Tensor::from_vec(embed_data, (cfg.vocab, h), dev)?.to_dtype(DType::BF16)?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for _ in 0..cfg.layers {
            layers.push(Layer {
                attn_norm: RmsNorm { weight: norm_weight(&mut rng, h, dev)?, eps: cfg.rms_eps },
                wqkv: weight(&mut rng, h, cfg.fused(), dev)?,
                wo: weight(&mut rng, h, h, dev)?,
                mlp_norm: RmsNorm { weight: norm_weight(&mut rng, h, dev)?, eps: cfg.rms_eps },
                w_gate_up: weight(&mut rng, h, 2 * cfg.intermediate, dev)?,
                w_down: weight(&mut rng, cfg.intermediate, h, dev)?,
            });
        }
        let final_norm = RmsNorm { weight: norm_weight(&mut rng, h, dev)?, eps: cfg.rms_eps };
        let lm_head = weight(&mut rng, h, cfg.vocab, dev)?;
        let half = cfg.head_size / 2;
        let mut cos = Vec::with_capacity(cfg.max_position * half);
        let mut sin = Vec::with_capacity(cfg.max_position * half);
        for pos in 0..cfg.max_position {
            for i in 0..half {
                let freq = cfg.rope_theta.powf(-((2 * i) as f32) / cfg.head_size as f32);
                let angle = pos as f32 * freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (cfg.max_position, half), dev)?;
        let sin = Tensor::from_vec(sin, (cfg.max_position, half), dev)?;
        Ok(Model { cfg, embed, layers, final_norm, lm_head, cos, sin })
    }

    /// RoPE (rotate-half form) on the query and key heads of the fused projection
    /// `[tokens, fused]`; the value heads pass through. The result is one fused buffer again, the
    /// layout the attention reads in place (an engine's fused RoPE kernel writes the same).
    fn rope(&self, qkv: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        let tokens = qkv.dim(0)?;
        let heads = c.num_heads + 2 * c.num_kv_heads;
        let rotated = c.num_heads + c.num_kv_heads;
        let x = qkv.reshape((tokens, heads, c.head_size))?;
        let qk = x.narrow(1, 0, rotated)?.to_dtype(DType::F32)?;
        let v = x.narrow(1, rotated, c.num_kv_heads)?;
        let cos = self.cos.index_select(positions, 0)?;
        let sin = self.sin.index_select(positions, 0)?;
        let cos = Tensor::cat(&[&cos, &cos], 1)?.unsqueeze(1)?;
        let sin = Tensor::cat(&[&sin, &sin], 1)?.unsqueeze(1)?;
        let half = c.head_size / 2;
        let (x1, x2) = (qk.narrow(2, 0, half)?, qk.narrow(2, half, half)?);
        let turned = Tensor::cat(&[&x2.neg()?, &x1], 2)?;
        let qk = (qk.broadcast_mul(&cos)? + turned.broadcast_mul(&sin)?)?.to_dtype(DType::BF16)?;
        Tensor::cat(&[&qk, &v], 1)?.reshape((tokens, c.fused()))
    }

    /// Logits `[tokens, vocab]` (f32) of one step's tokens at their positions. `attention(layer,
    /// qkv)` gets the fused, RoPE'd projection and returns `[tokens, hidden]`.
    pub fn forward(
        &self,
        tokens: &[u32],
        positions: &[u32],
        mut attention: impl FnMut(usize, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let dev = self.embed.device();
        let ids = Tensor::new(tokens, dev)?;
        let pos = Tensor::new(positions, dev)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        for (i, l) in self.layers.iter().enumerate() {
            let qkv = l.attn_norm.forward(&x)?.matmul(&l.wqkv)?;
            let qkv = self.rope(&qkv, &pos)?;
            let attn = attention(i, &qkv)?;
            x = (x + attn.matmul(&l.wo)?)?;
            let gate_up = l.mlp_norm.forward(&x)?.matmul(&l.w_gate_up)?;
            let inter = self.cfg.intermediate;
            let act = (gate_up.narrow(1, 0, inter)?.silu()? * gate_up.narrow(1, inter, inter)?)?;
            x = (x + act.matmul(&l.w_down)?)?;
        }
        self.final_norm.forward(&x)?.matmul(&self.lm_head)?.to_dtype(DType::F32)
    }
}
