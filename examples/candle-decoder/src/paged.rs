//! The adapter an engine on candle needs: one layer's KV-cache write and paged attention, run by
//! `attention-backend`'s [`StepPlan::run`] directly on candle's device buffers.
//!
//! candle hands out its CUDA buffers inside custom ops: an in-place op gets the destination
//! tensor's `CudaStorage` mutably and the sources' immutably, each with its layout (offset and
//! strides). The cache is the destination (the KV write changes it), the fused QKV projection the
//! source; the views given to `run` are sub-ranges of those very `CudaSlice`s, so nothing is
//! copied. The attention output is allocated on candle's device and handed back as a tensor, the
//! way candle's own ops (and candle-flash-attn) return their results.

use std::cell::RefCell;

use attention_backend::cuda::cudarc::driver::CudaSlice;
use attention_backend::cuda::{KvCacheMut, LayerBuffers, LayerStrides, StepPlan};
use attention_backend::AttentionParams;
use candle_core::cuda_backend::CudaStorage;
use candle_core::op::BackpropOp;
use candle_core::{bail, CpuStorage, Error, InplaceOp2, Layout, Result, Storage, Tensor};
use half::bf16;

/// One layer of one planned step, as a candle in-place op on the layer's cache.
struct LayerOp<'a, 'p> {
    plan: RefCell<&'a mut StepPlan<'p>>,
    params: &'a AttentionParams,
    strides: LayerStrides,
    num_tokens: usize,
    /// The attention output, allocated inside the op and taken out after it.
    out: RefCell<Option<CudaSlice<bf16>>>,
}

impl InplaceOp2 for LayerOp<'_, '_> {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        bail!("paged-attention: this example runs the CUDA backend only")
    }

    fn cuda_fwd(&self, cache: &mut CudaStorage, cache_l: &Layout, qkv: &CudaStorage, qkv_l: &Layout) -> Result<()> {
        let p = self.params;
        let (c0, c1) = cache_l
            .contiguous_offsets()
            .ok_or_else(|| Error::Msg("paged-attention: the cache must be contiguous".into()))?;
        let (q0, q1) =
            qkv_l.contiguous_offsets().ok_or_else(|| Error::Msg("paged-attention: qkv must be contiguous".into()))?;
        let q_elems = p.num_heads * p.head_size;
        let kv_elems = p.num_kv_heads * p.head_size;
        if q1 - q0 != self.num_tokens * (q_elems + 2 * kv_elems) {
            bail!("paged-attention: qkv holds {} elements, the step needs {} rows", q1 - q0, self.num_tokens);
        }
        let mut out = cache.device.alloc_zeros::<bf16>((self.num_tokens * q_elems).max(1))?;
        // Views into candle's own allocations: the fused projection read in place through the
        // fused-QKV strides, the cache `[2, num_blocks, block_size, kv_heads, head_size]` split
        // into its key and value halves.
        let fused = qkv.as_cuda_slice::<bf16>()?.slice(q0..q1);
        let mut cache = cache.as_cuda_slice_mut::<bf16>()?.slice_mut(c0..c1);
        let (key, value) = cache.split_at_mut((c1 - c0) / 2);
        let layer = LayerBuffers {
            query: fused.slice(..),
            new_kv: Some((fused.slice(q_elems..), fused.slice(q_elems + kv_elems..))),
            cache: KvCacheMut::Separate { key, value },
            kv_scales: None,
            out: out.slice_mut(..),
            lse: None,
            strides: self.strides,
        };
        self.plan.borrow_mut().run(p, layer).map_err(Error::wrap)?;
        *self.out.borrow_mut() = Some(out);
        Ok(())
    }
}

/// Writes the step's new keys and values (from the fused projection `qkv`,
/// `[num_tokens, (num_heads + 2 * num_kv_heads) * head_size]`, RoPE applied) into `cache` at the
/// step's slots and returns the attention output `[num_tokens, num_heads * head_size]`.
pub fn attention(plan: &mut StepPlan<'_>, params: &AttentionParams, qkv: &Tensor, cache: &Tensor) -> Result<Tensor> {
    let num_tokens = plan.launch().num_tokens;
    let strides = LayerStrides::fused_qkv(plan.planner().config());
    let op = LayerOp { plan: RefCell::new(plan), params, strides, num_tokens, out: RefCell::new(None) };
    cache.inplace_op2(qkv, &op)?;
    let out = op.out.into_inner().ok_or_else(|| Error::Msg("paged-attention produced no output".into()))?;
    let device = match qkv.device() {
        candle_core::Device::Cuda(d) => d.clone(),
        _ => bail!("paged-attention: qkv is not on a CUDA device"),
    };
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, device));
    let shape = (num_tokens, params.num_heads * params.head_size);
    Ok(Tensor::from_storage(storage, shape, BackpropOp::none(), false))
}
