//! Direct launches of the attention kernels (`attention_kernels::attention::paged_attention`) on
//! device buffers built here, so a test controls every byte of the caches and the exact layout of
//! every view (strided query/out, interleaved caches) without going through a backend.

use std::sync::Arc;

use attention_backend::Element;
use attention_kernels::attention::{
    self, AttentionBuffers, AttentionDims, AttentionFeatures, AttentionKernel, AttentionStrides,
};
use attention_kernels::cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// One step's batch and paging: requests `(q_len, kv_len)` with the single-token decodes first,
/// each request's blocks drawn from a shuffled pool with spare blocks nobody owns.
#[derive(Clone, Debug)]
pub struct Step {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_size: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub batch: Vec<(usize, usize)>,
    pub query_start_loc: Vec<i32>,
    pub seq_lens: Vec<i32>,
    /// `[num_reqs, width]`; entries past a request's blocks are stale (another request's block or
    /// a spare one) and must never be read.
    pub block_table: Vec<i32>,
    pub width: usize,
    /// Leading requests with one query token: they run on the decode kernel.
    pub decode_reqs: usize,
    pub num_tokens: usize,
}

impl Step {
    pub fn new(
        heads: (usize, usize),
        head_size: usize,
        block_size: usize,
        batch: &[(usize, usize)],
        spare_blocks: usize,
        rng: &mut StdRng,
    ) -> Self {
        assert!(batch.iter().all(|&(q, kv)| q >= 1 && q <= kv), "bad batch {batch:?}");
        let blocks_of = |kv: usize| kv.div_ceil(block_size);
        let used: usize = batch.iter().map(|&(_, kv)| blocks_of(kv)).sum();
        let num_blocks = used + spare_blocks;
        let mut pool: Vec<i32> = (0..num_blocks as i32).collect();
        pool.shuffle(rng);
        let width = batch.iter().map(|&(_, kv)| blocks_of(kv)).max().unwrap_or(0) + 1;
        let mut block_table = Vec::with_capacity(batch.len() * width);
        let mut next = 0;
        for &(_, kv) in batch {
            let n = blocks_of(kv);
            block_table.extend_from_slice(&pool[next..next + n]);
            next += n;
            for _ in n..width {
                block_table.push(pool[rng.random_range(0..num_blocks)]);
            }
        }
        let mut query_start_loc = vec![0i32];
        for &(q, _) in batch {
            query_start_loc.push(query_start_loc.last().unwrap() + q as i32);
        }
        let decode_reqs = batch.iter().take_while(|&&(q, _)| q == 1).count();
        Step {
            num_heads: heads.0,
            num_kv_heads: heads.1,
            head_size,
            block_size,
            num_blocks,
            batch: batch.to_vec(),
            seq_lens: batch.iter().map(|&(_, kv)| kv as i32).collect(),
            num_tokens: *query_start_loc.last().unwrap() as usize,
            query_start_loc,
            block_table,
            width,
            decode_reqs,
        }
    }

    /// Elements of one cache row (one token, every kv head).
    pub fn row_elems(&self) -> usize {
        self.num_kv_heads * self.head_size
    }

    /// Elements of one packed cache block.
    pub fn block_elems(&self) -> usize {
        self.block_size * self.row_elems()
    }

    /// Cache slot (`block * block_size + offset`) of key `key` of request `r`.
    pub fn slot(&self, r: usize, key: usize) -> usize {
        self.block_table[r * self.width + key / self.block_size] as usize * self.block_size + key % self.block_size
    }

    /// The request and row of query token `t`.
    pub fn row_of(&self, t: usize) -> (usize, usize) {
        let r = self.query_start_loc.partition_point(|&s| s as usize <= t) - 1;
        (r, t - self.query_start_loc[r] as usize)
    }

    pub fn dims(&self, req_begin: usize, req_end: usize) -> AttentionDims {
        AttentionDims {
            num_tokens: self.num_tokens,
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_size: self.head_size,
            num_blocks: self.num_blocks,
            block_size: self.block_size,
            num_reqs: self.batch.len(),
            max_blocks_per_req: self.width,
            req_begin,
            req_end,
        }
    }

    pub fn contiguous_strides(&self) -> AttentionStrides {
        AttentionStrides::contiguous(&self.dims(0, self.batch.len()))
    }
}

/// The attention variant of a test case.
#[derive(Clone, Copy, Debug)]
pub struct Mask {
    pub causal: bool,
    pub window_left: Option<usize>,
    pub window_right: Option<usize>,
    pub softcap: Option<f32>,
    pub scale: f32,
}

impl Mask {
    pub fn causal(head_size: usize) -> Self {
        Mask {
            causal: true,
            window_left: None,
            window_right: None,
            softcap: None,
            scale: 1.0 / (head_size as f32).sqrt(),
        }
    }

    pub fn window(self, left: Option<usize>, right: Option<usize>) -> Self {
        Mask { window_left: left, window_right: right, ..self }
    }

    pub fn softcap(self, cap: f32) -> Self {
        Mask { softcap: Some(cap), ..self }
    }

    pub fn non_causal(self) -> Self {
        Mask { causal: false, ..self }
    }

    /// Whether query position `pos` sees key `key` of a sequence of `seq_len` keys (the kernels'
    /// semantics, written out independently).
    pub fn visible(&self, pos: usize, key: usize, seq_len: usize) -> bool {
        let (p, k) = (pos as i64, key as i64);
        k < seq_len as i64
            && !(self.causal && k > p)
            && self.window_right.is_none_or(|w| k <= p + w as i64)
            && self.window_left.is_none_or(|w| k >= p - w as i64)
    }

    pub fn features(&self) -> AttentionFeatures<'static> {
        AttentionFeatures {
            scale: self.scale,
            causal: self.causal,
            window_left: self.window_left,
            window_right: self.window_right,
            softcap: self.softcap,
            alibi_slopes: None,
            sinks: None,
        }
    }
}

/// The step's metadata on the device.
pub struct DeviceMeta {
    pub query_start_loc: CudaSlice<i32>,
    pub seq_lens: CudaSlice<i32>,
    pub block_table: CudaSlice<i32>,
}

impl DeviceMeta {
    pub fn upload(stream: &Arc<CudaStream>, step: &Step) -> Self {
        DeviceMeta {
            query_start_loc: stream.clone_htod(&step.query_start_loc).unwrap(),
            seq_lens: stream.clone_htod(&step.seq_lens).unwrap(),
            block_table: stream.clone_htod(&step.block_table).unwrap(),
        }
    }
}

/// The views one step's attention reads and writes.
pub struct Views<'a, T> {
    pub query: CudaView<'a, T>,
    pub key_cache: CudaView<'a, T>,
    pub value_cache: CudaView<'a, T>,
    pub out: CudaViewMut<'a, T>,
    pub lse: Option<CudaViewMut<'a, f32>>,
    pub strides: AttentionStrides,
}

/// Runs the step as an engine would: the decode kernel (with `num_splits` partitions) over the
/// leading decodes, the prefill kernel over the rest.
pub fn run<T: Element>(
    stream: &Arc<CudaStream>,
    step: &Step,
    meta: &DeviceMeta,
    mask: &Mask,
    num_splits: usize,
    v: &mut Views<'_, T>,
) {
    let n = step.batch.len();
    let features = mask.features();
    let mut launch = |kernel: AttentionKernel, begin: usize, end: usize, ws: Option<CudaViewMut<'_, f32>>| {
        let bufs = AttentionBuffers {
            query: v.query.slice(..),
            key_cache: v.key_cache.slice(..),
            value_cache: v.value_cache.slice(..),
            kv_scales: None,
            query_start_loc: meta.query_start_loc.as_view(),
            seq_lens: meta.seq_lens.as_view(),
            block_table: meta.block_table.as_view(),
            out: v.out.slice_mut(..),
            lse: v.lse.as_mut().map(|l| l.slice_mut(..)),
            workspace: ws,
            strides: v.strides,
        };
        attention::paged_attention(stream, kernel, &step.dims(begin, end), &features, bufs)
            .unwrap_or_else(|e| panic!("{kernel:?} launch failed: {e}"));
    };
    if step.decode_reqs > 0 {
        let len = attention::decode_workspace_len(num_splits, step.decode_reqs, step.num_heads, step.head_size);
        let mut ws = (len > 0).then(|| stream.alloc_zeros::<f32>(len).unwrap());
        launch(
            AttentionKernel::Decode { num_splits, split_keys: 0 },
            0,
            step.decode_reqs,
            ws.as_mut().map(|w| w.as_view_mut()),
        );
    }
    if step.decode_reqs < n {
        let max_query_len = step.batch[step.decode_reqs..].iter().map(|&(q, _)| q).max().unwrap_or(0);
        launch(AttentionKernel::Prefill { max_query_len, max_sms: 0 }, step.decode_reqs, n, None);
    }
}
