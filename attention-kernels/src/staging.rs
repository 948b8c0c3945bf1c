//! Page-locked (pinned) host buffers, the staging area of per-step metadata uploads.
//!
//! A copy from pageable memory makes the driver stage it through a bounce buffer and return only
//! when the source may be reused, which costs host time every step; a copy from pinned memory is a
//! plain asynchronous DMA. cudarc's allocator for it is `unsafe` because the memory starts
//! uninitialised, so this crate, the workspace's FFI boundary, hands it out zero-filled.

use std::sync::Arc;

use cudarc::driver::{CudaContext, DeviceRepr, PinnedHostSlice, ValidAsZeroBits};

use crate::KernelError;

/// A zero-filled pinned host buffer of `len` elements (at least one, so its pointer is never
/// dangling), allocated on `ctx`.
///
/// # Errors
/// [`KernelError::InvalidArgument`] when `len` elements of `T` overflow `isize`;
/// [`KernelError::Cuda`] (with the driver's status) when the driver cannot pin that much memory.
pub fn pinned_zeros<T: DeviceRepr + ValidAsZeroBits>(
    ctx: &Arc<CudaContext>,
    len: usize,
) -> Result<PinnedHostSlice<T>, KernelError> {
    let len = len.max(1);
    let bytes = len.checked_mul(std::mem::size_of::<T>()).filter(|&b| b <= isize::MAX as usize);
    if bytes.is_none() {
        return Err(KernelError::InvalidArgument {
            kernel: "pinned_zeros",
            what: format!("{len} elements of {} bytes overflow the address space", std::mem::size_of::<T>()),
        });
    }
    let driver = |e: cudarc::driver::DriverError| KernelError::Cuda {
        kernel: "pinned_zeros",
        code: e.0 as i32,
        message: format!("{e:?}"),
    };
    // Plain (cached) page-locked memory, as `cudaHostAlloc`'s default: the host writes the staging
    // area row by row, in pieces that rarely fill whole cache lines, which write-combined memory
    // (cudarc's `alloc_pinned` default) turns into many small uncached bus writes.
    // SAFETY: `alloc_pinned_with_flags` returns `len` elements of uninitialised page-locked memory;
    // the size was checked above, so its internal size assertion cannot fire. Nothing reads the
    // memory before the `write_bytes` below initialises all of it.
    let mut buf = unsafe { ctx.alloc_pinned_with_flags::<T>(len, 0) }.map_err(driver)?;
    let ptr = buf.as_mut_ptr().map_err(driver)?;
    // SAFETY: `ptr` points to the `len` elements just allocated and owned by `buf`; all-zero bytes
    // are a valid `T` (`ValidAsZeroBits`).
    unsafe { std::ptr::write_bytes(ptr, 0, len) };
    Ok(buf)
}

/// A pinned staging buffer written by the host and read by asynchronous uploads, with the
/// ordering between the two kept by its owner (an event recorded after the uploads and waited on
/// before the next write), not by cudarc's per-access event synchronisation: that costs a driver
/// call on every access, several per step.
#[derive(Debug)]
pub struct Staging<T> {
    buf: PinnedHostSlice<T>,
    ptr: *mut T,
    len: usize,
}

// SAFETY: the buffer is owned memory like a `Vec`; `ptr` points into it and is only dereferenced
// through `&self` / `&mut self`, so the usual borrow rules make sharing it across threads sound.
unsafe impl<T: Send> Send for Staging<T> {}
// SAFETY: as above; `&Staging` only hands out `&[T]`.
unsafe impl<T: Sync> Sync for Staging<T> {}

impl<T: DeviceRepr + ValidAsZeroBits> Staging<T> {
    /// A zero-filled staging buffer of `len` elements (at least one) on `ctx`.
    ///
    /// # Errors
    /// As [`pinned_zeros`].
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, KernelError> {
        let mut buf = pinned_zeros::<T>(ctx, len)?;
        let len = buf.len();
        let ptr = buf.as_mut_ptr().map_err(|e| KernelError::Cuda {
            kernel: "Staging::new",
            code: e.0 as i32,
            message: format!("{e:?}"),
        })?;
        Ok(Staging { buf, ptr, len })
    }
}

impl<T> Staging<T> {
    /// The elements, for writing. The caller must have waited for every upload that reads them
    /// (see the type's docs); the borrow rules then make the access exclusive.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: `ptr` points to `len` initialised elements owned by `buf`, alive as long as
        // `self`; `&mut self` makes this the only access from the host.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The elements, for an upload's source.
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: as in `as_mut_slice`, shared.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (a staging buffer holds at least one element).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The underlying cudarc buffer.
    pub fn pinned(&self) -> &PinnedHostSlice<T> {
        &self.buf
    }
}
