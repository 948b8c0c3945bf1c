//! Errors of the launch layer.

use thiserror::Error;

/// Why a launcher refused or failed.
///
/// The launchers check that every buffer is large enough for the dimensions they are given (that is
/// what makes them safe to call); the semantic checks with richer messages live in
/// `attention-backend`'s validation, which runs first.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelError {
    /// A buffer holds fewer elements than the dimensions require.
    #[error("{kernel}: buffer `{buffer}` holds {actual} elements, the launch needs at least {required}")]
    BufferTooSmall {
        /// Kernel being launched.
        kernel: &'static str,
        /// Argument name.
        buffer: &'static str,
        /// Elements needed.
        required: usize,
        /// Elements present.
        actual: usize,
    },
    /// A dimension is out of the range the kernel supports.
    #[error("{kernel}: {what}")]
    InvalidArgument {
        /// Kernel being launched.
        kernel: &'static str,
        /// What is wrong.
        what: String,
    },
    /// No CUDA driver or no visible device.
    #[error("no CUDA device: {reason}")]
    NoDevice {
        /// What is missing.
        reason: String,
    },
    /// The CUDA runtime rejected the launch.
    #[error("{kernel}: CUDA error {code}: {message}")]
    Cuda {
        /// Kernel being launched.
        kernel: &'static str,
        /// `cudaError_t` value.
        code: i32,
        /// The runtime's message for it.
        message: String,
    },
}
