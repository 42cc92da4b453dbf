// Every schema of the fastvideo_offload op library, and which C++ function runs it where.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

// `import fastvideo_offload._C` loads this library, which registers the ops below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace fastvideo_offload {

TORCH_LIBRARY(fastvideo_offload, m) {
  // Host store: where each tensor goes in a block buffer, and the packing into it.
  m.def("layout(Tensor[] tensors, int alignment=256) -> int[]");
  m.def("pack(Tensor[] tensors, int[] offsets, int nbytes, bool pinned, Device? device=None) -> Tensor");
  // An exact-size host buffer left unfilled, for a caller that writes it (a checkpoint read into it).
  m.def("alloc_host(int nbytes, bool pinned, Device? device=None) -> Tensor");
  // Page-locks host memory someone else allocated (a node's shared mapping) in place for `device`, and back.
  // read_only: pages mapped without write access (a node's shared store as its followers map it).
  m.def("pin_host(Tensor memory, Device device, bool read_only=False) -> ()");
  m.def("unpin_host(Tensor memory, Device device) -> ()");
  // The engine of one model, named by a handle. Eager only: hooks call these between kernels.
  // share_staging_with: an engine of the same device whose staging buffers this one shares (the
  // models of a group take turns, so one set serves them all); 0: its own.
  m.def("engine_create(Device device, int prefetch, int staging_threads=1, int share_staging_with=0) -> int",
        &engine_create);
  // staged: a pageable buffer whose uploads go through the engine's pinned staging ring.
  m.def("engine_add_block(int engine, Tensor host, Tensor(a!)[] params, int[] offsets, bool staged=False) -> int",
        &engine_add_block);
  // A staged block whose bytes lie in several host tensors (sources[i]: parameter i's, such as
  // pages mapped from a checkpoint), gathered into the staging buffer at `offsets`.
  m.def(
      "engine_add_gathered_block(int engine, Tensor[] sources, int nbytes, Tensor(a!)[] params, int[] offsets) "
      "-> int",
      &engine_add_gathered_block);
  m.def("engine_enter(int engine, int block) -> ()", &engine_enter);
  m.def("engine_exit(int engine, int block) -> ()", &engine_exit);
  // Training (grad mode): each block runs from a fixed slot; exit_grad's token names that slot's
  // memory, and hold (backward needs the block) fills it again, until as many unholds.
  // enter_grad's in_backward: a checkpoint's recompute; it returns whether the block was held already.
  m.def("engine_enter_grad(int engine, int block, bool in_backward) -> bool", &engine_enter_grad);
  m.def("engine_exit_grad(int engine, int block) -> int", &engine_exit_grad);
  m.def("engine_hold(int engine, int block, int token) -> ()", &engine_hold);
  m.def("engine_unhold(int engine, int block) -> ()", &engine_unhold);
  // Releases every hold (after a backward that raised); returns how many blocks were held.
  m.def("engine_drop_holds(int engine) -> int", &engine_drop_holds);
  m.def("engine_park(int engine, int block) -> ()", &engine_park);
  m.def("engine_reset(int engine) -> ()", &engine_reset);
  m.def("engine_set_slot_budget(int engine, int nbytes) -> ()", &engine_set_slot_budget);
  m.def("engine_invalidate(int engine) -> ()", &engine_invalidate);
  m.def("engine_trim(int engine) -> ()", &engine_trim);
  m.def("engine_set_resident(int engine, int[] blocks) -> ()", &engine_set_resident);
  m.def("engine_stats(int engine) -> Dict(str, int)", &engine_stats);
  // Every block in the execution order learned so far (what a device budget plans in).
  m.def("engine_order(int engine) -> int[]", &engine_order);
  // While on, the staging threads record each piece they copy; the trace returns them, int64 [n, 4]
  // (block, staging thread, start and end in steady_clock ns), and clears them.
  m.def("engine_trace_staging(int engine, bool on) -> ()", &engine_trace_staging);
  // While on (CUDA), each block's exit samples the device memory allocated outside the slots:
  // stats' forward_peak_bytes, the most this forward saw.
  m.def("engine_watch_memory(int engine, bool on) -> ()", &engine_watch_memory);
  m.def("engine_staging_trace(int engine) -> Tensor");
  m.def("engine_destroy(int engine) -> ()", &engine_destroy);
}

TORCH_LIBRARY_IMPL(fastvideo_offload, CompositeExplicitAutograd, m) {
  // Reads only sizes, strides and dtypes, so it also runs on meta and fake tensors.
  m.impl("layout", &layout);
  // These take no tensor, so no backend key picks them; Explicit (not a catch-all) lets them have a fake.
  m.impl("alloc_host", &alloc_host);
  m.impl("engine_staging_trace", &engine_staging_trace);
}

TORCH_LIBRARY_IMPL(fastvideo_offload, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("pin_host", &pin_host);
  m.impl("unpin_host", &unpin_host);
}

#ifdef FVO_WITH_CUDA
TORCH_LIBRARY_IMPL(fastvideo_offload, CUDA, m) { m.impl("pack", &pack_cuda); }
#endif

}  // namespace fastvideo_offload
