// Planted kernels for tests/test_cuda_host_emulation.py: barriers, shared memory, the grid.

// Each thread stores its id, then reads the mirror thread's slot after a barrier; repeated
// `rounds` times with a shift, so every round needs the barrier before and after it.
// Launch: one block of n <= 1024 threads, shared_mem = n * sizeof(int).
extern "C" __global__ void barrier_mirror(int* out, int rounds) {
  extern __shared__ __align__(16) unsigned char smem[];
  int* slots = reinterpret_cast<int*>(smem);
  const int n = blockDim.x;
  const int t = threadIdx.x;
  int value = t;
  for (int r = 0; r < rounds; ++r) {
    slots[t] = value;
    __syncthreads();  // every slot written before any is read
    value = slots[n - 1 - t] + 1;
    __syncthreads();  // every slot read before the next round overwrites it
  }
  out[t] = value;
}

// Block b copies its dynamic shared memory, unwritten, to out[b * bytes : (b+1) * bytes], then
// scribbles zeros over it; the next block on the same OS thread must still see the poison.
// Launch: any grid, shared_mem = bytes.
__global__ void dump_then_scribble(unsigned char* out, int bytes) {
  extern __shared__ unsigned char raw[];
  for (int i = threadIdx.x; i < bytes; i += blockDim.x) out[blockIdx.x * (long long)bytes + i] = raw[i];
  __syncthreads();  // every byte copied before any is overwritten
  for (int i = threadIdx.x; i < bytes; i += blockDim.x) raw[i] = 0;
}

namespace planted {
// A second extern __shared__ array of another type and name, inside a namespace: both must
// alias the same buffer.  Writes through one, reads through the other.
// Launch: one block of n threads, shared_mem = n * sizeof(float2).
__global__ void two_views(const float* in, float* out) {
  extern __shared__ float2 pairs[];
  extern __shared__ __align__(16) unsigned char bytes_view[];
  const int t = threadIdx.x;
  pairs[t] = make_float2(in[t], 2.0f * in[t]);
  __syncthreads();  // the pair written by thread n-1-t is read below
  const float* flat = reinterpret_cast<const float*>(bytes_view);
  const int n = blockDim.x;
  out[t] = flat[2 * (n - 1 - t)] + flat[2 * (n - 1 - t) + 1];
}
}  // namespace planted

// Static shared memory: a block-private tile.  Block b sums in[b*n : (b+1)*n] in a tree.
// Launch: grid g, block n (power of two, <= 256).
__global__ void static_tile_sum(const float* in, float* out) {
  __shared__ float tile[256];
  const int t = threadIdx.x;
  tile[t] = in[blockIdx.x * blockDim.x + t];
  __syncthreads();  // tile complete
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (t < stride) tile[t] += tile[t + stride];
    __syncthreads();  // partial sums of this level complete
  }
  if (t == 0) out[blockIdx.x] = tile[0];
}

// Every thread of a 3-D grid of 3-D blocks writes its global linear id and its indices.
// Launch: any grid/block; ids has prod(grid)*prod(block) int64, coords 6 ints per thread.
template <typename Index>
__global__ void grid_coverage(Index* ids, int* coords) {
  const Index block = blockIdx.x + Index(gridDim.x) * (blockIdx.y + Index(gridDim.y) * blockIdx.z);
  const Index local = threadIdx.x + Index(blockDim.x) * (threadIdx.y + Index(blockDim.y) * threadIdx.z);
  const Index threads = Index(blockDim.x) * blockDim.y * blockDim.z;
  const Index id = block * threads + local;
  ids[id] = id;
  int* c = coords + 6 * id;
  c[0] = blockIdx.x;
  c[1] = blockIdx.y;
  c[2] = blockIdx.z;
  c[3] = threadIdx.x;
  c[4] = threadIdx.y;
  c[5] = threadIdx.z;
}

// Order-independent: each block writes its own output.
__global__ void block_square(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[i] * in[i];
}

// Order-dependent: each block draws a ticket, so out[] records the order blocks ran in.
__global__ void block_ticket(unsigned* counter, unsigned* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = atomicAdd(counter, 1u);
}

// Parameter passing: a struct by value, scalars of several widths, a null pointer.
struct Params {
  long long n;
  int scale;
  float offset;
  double weight;
};
__global__ void params_kernel(Params p, const float* x, const float* maybe_null, float* out,
                              short s, unsigned char c) {
  const long long i = threadIdx.x;
  if (i < p.n)
    out[i] = float(x[i] * p.scale + p.offset + p.weight + s + c + (maybe_null ? 1000.0f : 0.0f));
}

// Four barriers per thread and a little arithmetic, for timing the emulator.
// Launch: any grid, block n; shared_mem = n * 4.
__global__ void four_barriers(float* out) {
  extern __shared__ float buf[];
  const int t = threadIdx.x;
  const int n = blockDim.x;
  float v = float(t + blockIdx.x);
  for (int k = 0; k < 2; ++k) {
    buf[t] = v;
    __syncthreads();  // all written
    v += buf[(t + 1) % n];
    __syncthreads();  // all read
  }
  out[blockIdx.x * n + t] = v;
}

// A lane returns before a warp-wide shuffle: the other 31 lanes wait forever.
__global__ void shuffle_deadlock(int* out) {
  const int lane = threadIdx.x % 32;
  if (lane == 0) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, lane, 0);
}

// Calls __trap() in one thread.
__global__ void traps(int* out) {
  if (threadIdx.x == 3) __trap();
  out[threadIdx.x] = 1;
}

// Early-returning threads do not block later barriers (as on the GPU).
__global__ void early_exit_barrier(int* out) {
  extern __shared__ int slots[];
  const int t = threadIdx.x;
  if (t >= 40) return;
  slots[t] = t * 10;
  __syncthreads();  // the 40 remaining threads' slots written
  out[t] = slots[39 - t];
}

// __syncthreads_count / _and / _or over the block.
__global__ void barrier_reductions(const int* pred, int* out) {
  const int t = threadIdx.x;
  const int count = __syncthreads_count(pred[t]);
  const int all = __syncthreads_and(pred[t]);
  const int any = __syncthreads_or(pred[t]);
  if (t == 0) {
    out[0] = count;
    out[1] = all;
    out[2] = any;
  }
}

namespace planted {
// extern __shared__ inside function templates (g++ then calls the array's thread-local init
// function without a null check, which the build must define).  Reverses a block's values.
// Launch: one block of n threads, shared_mem = n * sizeof(T).
template <typename T>
__device__ T* shared_as() {
  extern __shared__ __align__(16) unsigned char smem[];
  return reinterpret_cast<T*>(smem);
}

template <typename T>
__global__ void reverse_in_shared(const T* in, T* out) {
  T* s = shared_as<T>();
  s[threadIdx.x] = in[threadIdx.x];
  __syncthreads();  // thread t reads the slot thread n-1-t wrote
  out[threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}
}  // namespace planted
