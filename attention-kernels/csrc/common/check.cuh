// Error plumbing shared by every launcher.
//
// Each exported launcher returns a cudaError_t so the Rust side can turn it into a typed error at
// the one place a raw status appears. A launcher never synchronises: it reports launch-time errors
// (bad configuration, missing kernel image for this GPU) and leaves execution errors to the stream.
#pragma once

#include <cuda_runtime.h>

#define PA_EXPORT extern "C" __attribute__((visibility("default")))

// The status of the launch just issued on this thread.
static inline cudaError_t pa_last_launch_status() { return cudaGetLastError(); }
