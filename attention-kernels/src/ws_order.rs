//! The order in which the warp-specialised prefill's persistent blocks take their work items.
//!
//! The kernel's grid is one block per SM, and its work items (the query rows of one request and one
//! query head that its consumers share, [`ws_item_rows`]) come heaviest first. Block `b` of a grid
//! of `g` takes one item per round: in round `k` the items `k g .. (k + 1) g` go to the blocks in
//! order, so block 0 always gets the heaviest item of the round and block `g - 1` the lightest.
//! Within a causal request the items lighten row block by row block, so over many rounds the
//! first blocks collect a surplus that the last round cannot even out: the launch ends with the
//! first blocks still working. The zig-zag order walks every other round's blocks in reverse (the
//! block that took a round's heaviest item takes the next round's lightest), which pairs heavy with
//! light and leaves the blocks within about one item of each other. The mixed step's partition
//! model (`attention-backend`'s `partition` module) walks the same order as the kernel.

use std::sync::OnceLock;

use crate::KernelError;

/// The environment variable that chooses the item order of the warp-specialised prefill (read once
/// per process): `strided` or `zigzag` (case and surrounding blanks ignored); unset or blank, the
/// default ([`WsOrder::DEFAULT`]). Any other value makes prefill launches fail with
/// [`KernelError::InvalidArgument`].
pub const WS_ORDER_ENV: &str = "PAGED_ATTN_WS_ORDER";

/// Consumer warpgroups of the warp-specialised prefill at head 64: three, or two in a build with
/// `PAGED_ATTN_WS_HEAD64_CONSUMERS=2` set (attention-kernels' build script).
#[cfg(not(pa_ws_head64_two_consumers))]
const HEAD64_CONSUMERS: usize = 3;
#[cfg(pa_ws_head64_two_consumers)]
const HEAD64_CONSUMERS: usize = 2;

/// Query rows of one work item of the warp-specialised prefill at `head_size`, 64 per consumer
/// warpgroup: 192 at head 64 (128 in a two-consumer build), 128 at every other head size. The
/// kernel's item count and the mixed step's partition model both follow it; it is fixed when the
/// kernels are built, not chosen per launch.
pub fn ws_item_rows(head_size: usize) -> usize {
    64 * if head_size <= 64 { HEAD64_CONSUMERS } else { 2 }
}

/// How the persistent blocks share the work items (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WsOrder {
    /// Block `b` takes items `b, b + g, b + 2g, ...`.
    Strided,
    /// Even rounds as [`WsOrder::Strided`], odd rounds with the blocks reversed.
    ZigZag,
}

impl WsOrder {
    /// The order the launchers use unless [`WS_ORDER_ENV`] says otherwise: the zig-zag, which
    /// measured 5-14% faster on one or two causal requests of 1024-4096 tokens and within 2% of
    /// the strided order elsewhere (docs/PERFORMANCE.md, sixteenth session).
    pub const DEFAULT: WsOrder = WsOrder::ZigZag;

    /// The value of `PaAttnArgs::prefill_order` for this order.
    pub fn code(self) -> i32 {
        match self {
            WsOrder::Strided => 0,
            WsOrder::ZigZag => 1,
        }
    }

    /// The block of a grid of `grid` blocks that takes work item `item` (`grid > 0`).
    pub fn block_of(self, item: usize, grid: usize) -> usize {
        let (round, pos) = (item / grid, item % grid);
        match self {
            WsOrder::ZigZag if round % 2 == 1 => grid - 1 - pos,
            _ => pos,
        }
    }

    /// Parses a [`WS_ORDER_ENV`] value: blank is the default; `None` for anything but `strided`
    /// or `zigzag`.
    pub fn parse(s: &str) -> Option<WsOrder> {
        let s = s.trim();
        if s.is_empty() {
            Some(WsOrder::DEFAULT)
        } else if s.eq_ignore_ascii_case("strided") {
            Some(WsOrder::Strided)
        } else if s.eq_ignore_ascii_case("zigzag") {
            Some(WsOrder::ZigZag)
        } else {
            None
        }
    }

    /// The order from [`WS_ORDER_ENV`], read once per process.
    ///
    /// # Errors
    /// [`KernelError::InvalidArgument`] when the variable holds something else than an order.
    pub fn from_env() -> Result<WsOrder, KernelError> {
        static ENV: OnceLock<Result<WsOrder, KernelError>> = OnceLock::new();
        ENV.get_or_init(|| from_var(std::env::var(WS_ORDER_ENV))).clone()
    }
}

/// [`WsOrder::from_env`] for one reading of the variable.
fn from_var(var: Result<String, std::env::VarError>) -> Result<WsOrder, KernelError> {
    crate::env_setting::read(var, WsOrder::DEFAULT, WsOrder::parse).map_err(|v| KernelError::InvalidArgument {
        kernel: "paged_prefill",
        what: format!("{WS_ORDER_ENV}={v}: expected strided or zigzag (unset = the default)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        assert_eq!(WsOrder::parse(""), Some(WsOrder::DEFAULT));
        assert_eq!(WsOrder::parse(" ZigZag "), Some(WsOrder::ZigZag));
        assert_eq!(WsOrder::parse("strided"), Some(WsOrder::Strided));
        for bad in ["snake", "1", "zig-zag", "strided,zigzag"] {
            assert_eq!(WsOrder::parse(bad), None, "{bad:?}");
        }
        assert_eq!(from_var(Err(std::env::VarError::NotPresent)), Ok(WsOrder::DEFAULT));
        match from_var(Ok("reverse".into())) {
            Err(KernelError::InvalidArgument { what, .. }) => assert!(what.contains("reverse"), "{what}"),
            other => panic!("{other:?}"),
        }
    }

    /// Every item goes to exactly one block, each block takes one item per full round, and the
    /// zig-zag mirrors the strided order in odd rounds only.
    #[test]
    fn every_round_covers_every_block_once() {
        for grid in [1usize, 2, 5, 132] {
            for order in [WsOrder::Strided, WsOrder::ZigZag] {
                for round in 0..4 {
                    let mut seen = vec![false; grid];
                    for pos in 0..grid {
                        let b = order.block_of(round * grid + pos, grid);
                        assert!(!seen[b], "{order:?} grid {grid} round {round}: block {b} twice");
                        seen[b] = true;
                        let want = if order == WsOrder::ZigZag && round % 2 == 1 { grid - 1 - pos } else { pos };
                        assert_eq!(b, want);
                    }
                }
            }
        }
        assert_eq!(WsOrder::Strided.code(), 0);
        assert_eq!(WsOrder::ZigZag.code(), 1);
    }

    /// Two consumers' rows at every head size but 64; head 64's three unless built with two.
    #[test]
    fn item_rows_per_head_size() {
        for head in [80, 96, 112, 128, 192, 256] {
            assert_eq!(ws_item_rows(head), 128, "head {head}");
        }
        let head64 = if cfg!(pa_ws_head64_two_consumers) { 128 } else { 192 };
        assert_eq!(ws_item_rows(64), head64);
    }
}
