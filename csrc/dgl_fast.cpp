// The one place where dgl_fast's operator schemas are defined.
//
// Every op is declared here exactly once, in namespace `dgl_fast`. Kernels for a
// device live in csrc/cpu/ and csrc/cuda/ and register against these schemas with
// TORCH_LIBRARY_IMPL; fake (meta) kernels and autograd are attached from Python in
// dgl_fast/ops.py. See csrc/README.md for how to add an op.
#include <torch/library.h>

TORCH_LIBRARY(dgl_fast, m) {
  // Fused softmax + mean cross-entropy + gradient of the logits + correct count.
  //   logits [B, C] floating, labels [B] int64 in [0, C)
  //   -> loss [] (float32, float64 for float64 logits),
  //      dlogits [B, C] = (softmax(logits) - onehot(labels)) / B in the dtype of logits,
  //      correct [] int64 = #{i : argmax(logits[i]) == labels[i]}
  m.def("softmax_xent(Tensor logits, Tensor labels) -> (Tensor loss, Tensor dlogits, Tensor correct)");
}
