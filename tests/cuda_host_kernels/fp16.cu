// Planted kernels for tests/test_cuda_host_emulation.py: __half and __nv_bfloat16.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// Grid-stride loops; any launch covers n elements.
#define FOR_EACH(i, n) \
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// Narrowing from float by every spelling: out has 6 rows of n.
__global__ void from_float(const float* in, unsigned short* out, long long n) {
  FOR_EACH(i, n) {
    const float x = in[i];
    const __half implicit_half = x;
    const __nv_bfloat16 implicit_bf16 = x;
    out[0 * n + i] = __half_as_ushort(__float2half(x));
    out[1 * n + i] = __half_as_ushort(__float2half_rn(x));
    out[2 * n + i] = __half_as_ushort(implicit_half);
    out[3 * n + i] = __bfloat16_as_ushort(__float2bfloat16(x));
    out[4 * n + i] = __bfloat16_as_ushort(__float2bfloat16_rn(x));
    out[5 * n + i] = __bfloat16_as_ushort(implicit_bf16);
  }
}

// Narrowing from double (rounded once): out has 2 rows of n.
__global__ void from_double(const double* in, unsigned short* out, long long n) {
  FOR_EACH(i, n) {
    out[i] = __half_as_ushort(__double2half(in[i]));
    out[n + i] = __bfloat16_as_ushort(__double2bfloat16(in[i]));
  }
}

// Widening to float: out has 4 rows of n (half explicit, half implicit, bf16 both ways).
__global__ void to_float(const unsigned short* in, float* out, long long n) {
  FOR_EACH(i, n) {
    const __half h = __ushort_as_half(in[i]);
    const __nv_bfloat16 b = __ushort_as_bfloat16(in[i]);
    const float implicit_h = h;
    const float implicit_b = b;
    out[i] = __half2float(h);
    out[n + i] = implicit_h;
    out[2 * n + i] = __bfloat162float(b);
    out[3 * n + i] = implicit_b;
  }
}

// Half and bfloat16 arithmetic: out has 5 rows of n per type (add, sub, mul, div, fma).
template <typename T>
__global__ void arithmetic(const T* a, const T* b, const T* c, T* out, long long n) {
  FOR_EACH(i, n) {
    out[i] = a[i] + b[i];
    out[n + i] = __hsub(a[i], b[i]);
    out[2 * n + i] = a[i] * b[i];
    out[3 * n + i] = a[i] / b[i];
    out[4 * n + i] = __hfma(a[i], b[i], c[i]);
  }
}
