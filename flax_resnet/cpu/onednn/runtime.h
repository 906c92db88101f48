// The oneDNN C API pieces conv_onednn.cc builds on: memory descriptors across oneDNN 2.x (structs)
// and 3.x (handles), the process's CPU engine and a stream per thread, memory objects over XLA's
// buffers, post-ops (2.x and 3.x signatures), and running oneDNN on the calling thread alone.
#pragma once

#include <dlfcn.h>

#include <memory>
#include <vector>

#include "oneapi/dnnl/dnnl.h"

namespace fr_onednn {

#if DNNL_VERSION_MAJOR >= 3
using MdRef = const_dnnl_memory_desc_t;
class Md {
 public:
  Md() = default;
  Md(const Md&) = delete;
  ~Md() {
    if (h_) dnnl_memory_desc_destroy(h_);
  }
  dnnl_status_t strided(int nd, const dnnl_dims_t dims, dnnl_data_type_t dt, const dnnl_dims_t strides) {
    return dnnl_memory_desc_create_with_strides(&h_, nd, dims, dt, strides);
  }
  dnnl_status_t any(int nd, const dnnl_dims_t dims, dnnl_data_type_t dt) {
    return dnnl_memory_desc_create_with_tag(&h_, nd, dims, dt, dnnl_format_tag_any);
  }
  MdRef get() const { return h_; }

 private:
  dnnl_memory_desc_t h_ = nullptr;
};
#else
using MdRef = const dnnl_memory_desc_t*;
class Md {
 public:
  dnnl_status_t strided(int nd, const dnnl_dims_t dims, dnnl_data_type_t dt, const dnnl_dims_t strides) {
    return dnnl_memory_desc_init_by_strides(&d_, nd, dims, dt, strides);
  }
  dnnl_status_t any(int nd, const dnnl_dims_t dims, dnnl_data_type_t dt) {
    return dnnl_memory_desc_init_by_tag(&d_, nd, dims, dt, dnnl_format_tag_any);
  }
  MdRef get() const { return &d_; }

 private:
  dnnl_memory_desc_t d_{};
};
#endif

dnnl_engine_t engine() {
  static dnnl_engine_t e = [] {
    dnnl_engine_t made = nullptr;
    return dnnl_engine_create(&made, dnnl_cpu, 0) == dnnl_success ? made : nullptr;
  }();
  return e;
}

dnnl_stream_t stream() {
  thread_local std::unique_ptr<dnnl_stream, dnnl_status_t (*)(dnnl_stream_t)> s(
      [] {
        dnnl_stream_t made = nullptr;
        return dnnl_stream_create(&made, engine(), dnnl_stream_default_flags) == dnnl_success ? made : nullptr;
      }(),
      dnnl_stream_destroy);
  return s.get();
}

// A memory object over an existing buffer, destroyed with its scope.
struct Mem {
  dnnl_memory_t m = nullptr;
  Mem(MdRef md, void* data) {  // no object for an empty descriptor (no scratchpad needed)
    if (md && dnnl_memory_desc_get_size(md) > 0) dnnl_memory_create(&m, md, engine(), data);
  }
  ~Mem() {
    if (m) dnnl_memory_destroy(m);
  }
};

void* buffer(std::vector<char>& v, MdRef md) {
  const size_t bytes = md ? dnnl_memory_desc_get_size(md) : 0;
  if (v.size() < bytes) v.resize(bytes);
  return bytes ? v.data() : nullptr;
}

// Post-ops on `attr`: a sum (dst's previous contents added), then a ReLU; nothing if neither.
inline dnnl_status_t set_post_ops(bool sum, bool relu, dnnl_primitive_attr_t attr) {
  if (!sum && !relu) return dnnl_success;
  dnnl_post_ops_t po = nullptr;
  dnnl_status_t st = dnnl_post_ops_create(&po);
#if DNNL_VERSION_MAJOR >= 3
  if (st == dnnl_success && sum) st = dnnl_post_ops_append_sum(po, 1.f, 0, dnnl_data_type_undef);
  if (st == dnnl_success && relu) st = dnnl_post_ops_append_eltwise(po, dnnl_eltwise_relu, 0.f, 0.f);
#else
  if (st == dnnl_success && sum) st = dnnl_post_ops_append_sum(po, 1.f);
  if (st == dnnl_success && relu) st = dnnl_post_ops_append_eltwise(po, 1.f, dnnl_eltwise_relu, 0.f, 0.f);
#endif
  if (st == dnnl_success) st = dnnl_primitive_attr_set_post_ops(attr, po);
  if (po) dnnl_post_ops_destroy(po);
  return st;
}

// Each thread that calls oneDNN runs it on itself alone: the threads are XLA's (parallel_for), not an
// OpenMP team on top of them. The OpenMP runtime is the one libdnnl loaded (found by its soname,
// not by a global symbol lookup that could land in another copy, such as PyTorch's), and the
// calling thread's setting is put back afterwards.
class OneThread {
 public:
  OneThread() {
    static const Omp omp = find();
    if (omp.set && omp.get) {
      set_ = omp.set;
      before_ = omp.get();
      if (before_ != 1) set_(1);
    }
  }
  ~OneThread() {
    if (set_ && before_ != 1) set_(before_);
  }

 private:
  struct Omp {
    void (*set)(int) = nullptr;
    int (*get)() = nullptr;
  };
  static Omp find() {
    for (const char* name : {"libgomp.so.1", "libiomp5.so", "libomp.so.5", "libomp.so"}) {
      if (void* h = dlopen(name, RTLD_NOW | RTLD_NOLOAD)) {
        Omp omp{reinterpret_cast<void (*)(int)>(dlsym(h, "omp_set_num_threads")),
                reinterpret_cast<int (*)()>(dlsym(h, "omp_get_max_threads"))};
        if (omp.set && omp.get) return omp;
      }
    }
    return {};
  }
  void (*set_)(int) = nullptr;
  int before_ = 1;
};

}  // namespace fr_onednn
