// Planted bugs for tests/test_cuda_host_emulation.py: each kernel has a correct twin.

// --- (a) one element past the end --------------------------------------------------------

// out[i] = i for i < n.  Launch: enough threads to cover n.
__global__ void fill_correct(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = float(i);
}

// Planted bug: `<=` writes out[n], one element past the end.
__global__ void fill_off_by_one(float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = float(i);
}

// The same bug through a strided view: element i lives at out[i * stride].
__global__ void fill_strided_off_by_one(float* out, long long n, long long stride) {
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i <= n) out[i * stride] = float(i);
}

// Reads dynamic shared memory one float past what the launch asked for (n floats).
__global__ void shared_off_by_one(float* out) {
  extern __shared__ float s[];
  const int t = threadIdx.x;
  s[t] = float(t);
  __syncthreads();  // all of s written
  out[t] = s[t + 1];  // planted bug: thread n-1 reads s[n]
}

// --- (b) a missing barrier ----------------------------------------------------------------

// Rotates each block's values left by one through shared memory.
// Launch: grid g, block n, shared_mem = n * 4; in and out have g * n floats.
__global__ void rotate_with_barrier(const float* in, float* out) {
  extern __shared__ float s[];
  const int t = threadIdx.x, n = blockDim.x;
  const int base = blockIdx.x * n;
  s[t] = in[base + t];
  __syncthreads();  // thread t reads the slot thread t+1 wrote
  out[base + t] = s[(t + 1) % n];
}

// Planted bug: the barrier between the store and the load is gone.
__global__ void rotate_missing_barrier(const float* in, float* out) {
  extern __shared__ float s[];
  const int t = threadIdx.x, n = blockDim.x;
  const int base = blockIdx.x * n;
  s[t] = in[base + t];
  out[base + t] = s[(t + 1) % n];
}

// Planted bug, other direction: reads the slot of thread t-1, barrier missing.
__global__ void rotate_right_missing_barrier(const float* in, float* out) {
  extern __shared__ float s[];
  const int t = threadIdx.x, n = blockDim.x;
  const int base = blockIdx.x * n;
  s[t] = in[base + t];
  out[base + t] = s[(t + n - 1) % n];
}

// --- (c) a wrong index ----------------------------------------------------------------------

// Cross-correlation y[i] = sum_k x[i + k] * w[k], i < n - taps + 1 (as np.correlate 'valid').
__global__ void correlate_correct(const float* x, const float* w, float* y, int n, int taps) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n - taps + 1) return;
  float acc = 0.0f;
  for (int k = 0; k < taps; ++k) acc = fmaf(x[i + k], w[k], acc);
  y[i] = acc;
}

// Planted bug: the filter index is flipped, which computes a convolution instead.
__global__ void correlate_flipped_index(const float* x, const float* w, float* y, int n, int taps) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n - taps + 1) return;
  float acc = 0.0f;
  for (int k = 0; k < taps; ++k) acc = fmaf(x[i + k], w[taps - 1 - k], acc);
  y[i] = acc;
}
