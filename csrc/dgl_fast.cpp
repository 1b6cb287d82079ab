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

  // Ring replay buffer of M mini-batches (PAPER.md section 5). All ring state is int64 tensors on
  // the buffer's device, so neither op synchronises the host and both can be captured in a graph.
  //   storage [M, *batch_shape], label_store [M, B] int64,
  //   state [4] int64 = {head (next slot written), count (filled slots), pushes, samples},
  //   uses [M] int64 (times each slot was sampled), stamps [M] int64 (push number that wrote it).
  // Push: writes x (converted to storage's dtype) and y at `head`, resets that slot's use count,
  // advances head = (head + 1) % M.
  m.def("replay_push(Tensor(a!) storage, Tensor(b!) label_store, Tensor(c!) state, Tensor(d!) uses, "
        "Tensor(e!) stamps, Tensor x, Tensor y) -> ()");
  // Sample: picks a filled slot by `policy` (0 priority_lifo: fewest uses, then newest; 1 fifo:
  // fewest uses, then oldest; 2 uniform: a random slot, from a counter-based hash of (seed,
  // samples)), skipping slots used `max_reuse` times (max_reuse <= 0: no limit), increments its
  // use count and gathers it into out / out_labels. info [2] int64 = {slot or -1, 1 if a sample
  // was taken else 0}; with nothing available, out and out_labels are left as they were.
  m.def("replay_sample(Tensor(a!) state, Tensor(b!) uses, Tensor stamps, Tensor storage, Tensor label_store, "
        "Tensor(c!) out, Tensor(d!) out_labels, Tensor(e!) info, int policy, int max_reuse, int seed) -> ()");

  // Auxiliary-head building blocks (dgl_fast/heads.py composes them; references in reference.py).
  // Adaptive average pooling of x [B, C, H, W] (any strides: NCHW, channels_last, views) to
  // [B, C, out_h, out_w], reading x once; the output is NCHW- or channels_last-contiguous.
  m.def("aux_pool(Tensor x, int out_h, int out_w, bool channels_last_out) -> Tensor");
  // Its backward: grad_x [B, C, in_h, in_w] written once, in NCHW or channels_last layout.
  m.def("aux_pool_bwd(Tensor grad_out, int in_h, int in_w, bool channels_last_in) -> Tensor");
  // Linear + BatchNorm + ReLU on rows: x [N, K], weight [M, K], bias [M] or None, gamma/beta [M].
  //   z = x @ weight.T + bias; training: mean/var = batch mean and biased variance of z's columns,
  //   eval: mean/var = running_mean/running_var; out = relu(gamma * (z - mean) / sqrt(var + eps) + beta).
  //   -> (out [N, M], z [N, M] (saved for backward), mean [M], var [M]); stats in float32 (float64
  //   for float64 inputs). The running statistics are not touched here: see bn_update_stats.
  m.def("linear_bn_relu(Tensor x, Tensor weight, Tensor? bias, Tensor gamma, Tensor beta, Tensor running_mean, "
        "Tensor running_var, bool training, float eps) -> (Tensor out, Tensor z, Tensor mean, Tensor var)");
  //   -> (grad_x, grad_weight, grad_bias, grad_gamma, grad_beta); grad_bias is the column sum of the
  //   gradient of z, what a bias would receive (the autograd wrapper drops it when bias is None).
  m.def("linear_bn_relu_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor z, Tensor mean, Tensor var, "
        "Tensor gamma, Tensor beta, bool training, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // nn.BatchNorm's running-statistics update for several layers in one launch:
  //   running_mean = (1 - m) * running_mean + m * mean
  //   running_var  = (1 - m) * running_var + m * var * n / (n - 1);  num_batches_tracked += 1
  m.def("bn_update_stats(Tensor(a!)[] running_means, Tensor(b!)[] running_vars, Tensor(c!)[] num_batches_tracked, "
        "Tensor[] means, Tensor[] vars, int[] counts, float[] momentums) -> ()");
}
