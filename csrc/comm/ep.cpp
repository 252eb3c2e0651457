// ep_moe_forward: see ep.h.
#include "comm/ep.h"

#include <cstdint>
#include <vector>

namespace smoe::comm {
namespace {

// A host buffer of bytes viewed as a [rows, cols] (or [n]) tensor of dtype.
struct Buf {
  std::vector<unsigned char> bytes;
  TensorView view(DType t, std::initializer_list<int64_t> shape) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    bytes.resize(static_cast<size_t>(std::max<int64_t>(n, 1) * dtype_size(t)));
    return make_view(bytes.data(), t, shape);
  }
};

}  // namespace

Status ep_moe_forward(Communicator& comm, const Exec& exec, const EpMoeParams& params, const TensorView& x,
                      const TensorView& experts, const TensorView& weights, const TensorView& w1, const TensorView& w2,
                      const TensorView& y, EpLayout* layout) {
  const char* op = "ep_moe_forward";
  const int P = comm.size();
  const int32_t E = params.num_experts;
  if (E < 1 || E % P != 0)
    return invalid_argument(op, "num_experts", "a multiple of the group size " + std::to_string(P), std::to_string(E));
  const int64_t El = E / P;
  SMOE_RETURN_IF_ERROR(expect_dims(op, "x", x, 2, "[T, H]"));
  SMOE_RETURN_IF_ERROR(expect_dims(op, "experts", experts, 2, "[T, K]"));
  SMOE_RETURN_IF_ERROR(expect_dims(op, "w1", w1, 3, "[E/P, F1, H]"));
  SMOE_RETURN_IF_ERROR(expect_size(op, "w1", w1, 0, El, "E/P (= num_experts / group size)"));
  for (const auto* v : {&x, &experts, &weights, &w1, &w2, &y})
    if (v->defined() && v->device != Device::kCPU)
      return unsupported(op, "the C++ EP path runs on host memory (CPU tensors); use smoe.distributed on GPUs");
  if (comm.device() != Device::kCPU) return unsupported(op, "the C++ EP path needs a host-memory communicator");
  const int64_t T = x.size(0), H = x.size(1), K = experts.size(1);
  const DType dt = x.dtype;

  // 1. routing plan over all experts.
  RoutingPlanParams rp;
  rp.num_experts = E;
  rp.capacity = params.capacity;
  rp.drop_policy = params.drop_policy;
  const int64_t r_max = routing_plan_max_rows(rp, T, K);
  Buf b_counts, b_offsets, b_row_of, b_tor, b_ws;
  TensorView counts = b_counts.view(DType::kI32, {E});
  TensorView offsets = b_offsets.view(DType::kI64, {E + 1});
  TensorView row_of = b_row_of.view(DType::kI32, {T, K});
  TensorView tor = b_tor.view(DType::kI32, {r_max});
  const int64_t ws_bytes = routing_plan_workspace_bytes(rp, T, K);
  TensorView ws = ws_bytes > 0 ? b_ws.view(DType::kU8, {ws_bytes}) : TensorView();
  SMOE_RETURN_IF_ERROR(routing_plan(exec, rp, experts, weights, counts, offsets, row_of, tor, ws));

  // 2. counts per (destination, local expert) -> per (source, local expert).
  std::vector<int64_t> send_c(static_cast<size_t>(E)), recv_c(static_cast<size_t>(E));
  for (int32_t e = 0; e < E; ++e) send_c[e] = counts.data_as<int32_t>()[e];
  std::vector<int64_t> per_peer(P, El), disp = displacements(per_peer);
  SMOE_RETURN_IF_ERROR(comm.all_to_all_v(send_c.data(), per_peer.data(), disp.data(), recv_c.data(), per_peer.data(),
                                         disp.data(), DType::kI64, exec.stream));
  std::vector<int64_t> send_rows(P, 0), recv_rows(P, 0);
  for (int p = 0; p < P; ++p)
    for (int64_t e = 0; e < El; ++e) {
      send_rows[p] += send_c[p * El + e];
      recv_rows[p] += recv_c[p * El + e];
    }
  int64_t r_send = 0, n_recv = 0;
  for (int p = 0; p < P; ++p) r_send += send_rows[p], n_recv += recv_rows[p];

  // 3. permute (rank-major rows) and send.
  Buf b_xs, b_xr;
  TensorView xs = b_xs.view(dt, {r_max, H});
  SMOE_RETURN_IF_ERROR(permute_forward(exec, x, tor, xs));
  TensorView xr = b_xr.view(dt, {n_recv, H});
  auto elems = [&](const std::vector<int64_t>& rows) {
    std::vector<int64_t> v(rows);
    for (auto& r : v) r *= H;
    return v;
  };
  const std::vector<int64_t> se = elems(send_rows), re = elems(recv_rows);
  const std::vector<int64_t> sd = displacements(se), rd = displacements(re);
  SMOE_RETURN_IF_ERROR(
      comm.all_to_all_v(xs.data, se.data(), sd.data(), xr.data, re.data(), rd.data(), dt, exec.stream));

  // 4. local plan: received row j of (source p, expert e) goes to expert-major position.
  Buf b_ltor, b_loff, b_lrow;
  TensorView ltor = b_ltor.view(DType::kI32, {n_recv});
  TensorView loff = b_loff.view(DType::kI64, {El + 1});
  TensorView lrow = b_lrow.view(DType::kI32, {n_recv});
  {
    std::vector<int64_t> start(static_cast<size_t>(P * El));
    int64_t s = 0;
    for (int64_t i = 0; i < P * El; ++i) start[i] = s, s += recv_c[i];
    int64_t r = 0;
    loff.data_as<int64_t>()[0] = 0;
    for (int64_t e = 0; e < El; ++e) {
      for (int p = 0; p < P; ++p)
        for (int64_t i = 0; i < recv_c[p * El + e]; ++i, ++r) {
          const int64_t j = start[p * El + e] + i;
          ltor.data_as<int32_t>()[r] = static_cast<int32_t>(j);
          lrow.data_as<int32_t>()[j] = static_cast<int32_t>(r);
        }
      loff.data_as<int64_t>()[e + 1] = r;
    }
  }

  // 5. local experts, back to received order, send back.
  const int64_t F = w2.defined() && w2.ndim == 3 ? w2.size(2) : 0;
  const int64_t F1 = w1.size(1);
  Buf b_pre, b_act, b_ys, b_yr, b_yb;
  TensorView pre = b_pre.view(dt, {n_recv, F1}), act = b_act.view(dt, {n_recv, F});
  TensorView ys = b_ys.view(dt, {n_recv, H}), yr = b_yr.view(dt, {n_recv, H});
  ExpertMlpParams mp;
  mp.activation = params.activation;
  SMOE_RETURN_IF_ERROR(expert_mlp_forward(exec, mp, xr, ltor, loff, w1, w2, pre, act, ys));
  SMOE_RETURN_IF_ERROR(permute_forward(exec, ys, lrow, yr));
  TensorView yb = b_yb.view(dt, {r_send, H});
  SMOE_RETURN_IF_ERROR(
      comm.all_to_all_v(yr.data, re.data(), rd.data(), yb.data, se.data(), sd.data(), dt, exec.stream));

  // 6. combine with the first plan (row_of refers to rows < offsets[E] = r_send).
  SMOE_RETURN_IF_ERROR(combine_forward(exec, yb, weights, row_of, y));
  if (layout) *layout = EpLayout{send_rows, recv_rows, recv_c};
  return Status::Ok();
}

}  // namespace smoe::comm
