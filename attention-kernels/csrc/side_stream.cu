// A second stream for running the decode and prefill parts of a mixed batch side by side.
//
// Decode is bound by memory bandwidth and prefill by tensor-core throughput; back to back, each
// leaves the other's resource idle. Launched on two streams, the two grids share the SMs. The fork
// and join are events, so the pattern also records into a CUDA graph: capturing the main stream
// pulls the side stream into the capture at the fork and out of it at the join.

#include <new>

#include "common/check.cuh"

namespace {

struct SideStream {
  cudaStream_t stream = nullptr;
  cudaEvent_t fork = nullptr;
  cudaEvent_t join = nullptr;
};

void destroy(SideStream* s) {
  if (s == nullptr) return;
  if (s->join) cudaEventDestroy(s->join);
  if (s->fork) cudaEventDestroy(s->fork);
  if (s->stream) cudaStreamDestroy(s->stream);
  delete s;
}

}  // namespace

// Creates a non-blocking stream and two timing-free events on the current device (context).
PA_EXPORT cudaError_t pa_side_stream_create(void** out) {
  if (out == nullptr) return cudaErrorInvalidValue;
  SideStream* s = new (std::nothrow) SideStream();
  if (s == nullptr) return cudaErrorMemoryAllocation;
  cudaError_t err = cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking);
  if (err == cudaSuccess) err = cudaEventCreateWithFlags(&s->fork, cudaEventDisableTiming);
  if (err == cudaSuccess) err = cudaEventCreateWithFlags(&s->join, cudaEventDisableTiming);
  if (err != cudaSuccess) {
    destroy(s);
    return err;
  }
  *out = s;
  return cudaSuccess;
}

// Destroys what pa_side_stream_create made (the context must be current). Work still queued on
// the side stream completes first: the stream is destroyed asynchronously by the runtime.
PA_EXPORT void pa_side_stream_destroy(void* side) { destroy(static_cast<SideStream*>(side)); }

// The side stream's handle, for launches on it.
PA_EXPORT cudaStream_t pa_side_stream_handle(void* side) {
  return side ? static_cast<SideStream*>(side)->stream : nullptr;
}

// Work queued on the side stream after this waits for everything queued on `stream` before it.
PA_EXPORT cudaError_t pa_side_stream_fork(void* side, cudaStream_t stream) {
  SideStream* s = static_cast<SideStream*>(side);
  if (s == nullptr) return cudaErrorInvalidValue;
  cudaError_t err = cudaEventRecord(s->fork, stream);
  if (err != cudaSuccess) return err;
  return cudaStreamWaitEvent(s->stream, s->fork, 0);
}

// Work queued on `stream` after this waits for everything queued on the side stream before it.
PA_EXPORT cudaError_t pa_side_stream_join(void* side, cudaStream_t stream) {
  SideStream* s = static_cast<SideStream*>(side);
  if (s == nullptr) return cudaErrorInvalidValue;
  cudaError_t err = cudaEventRecord(s->join, s->stream);
  if (err != cudaSuccess) return err;
  return cudaStreamWaitEvent(stream, s->join, 0);
}
