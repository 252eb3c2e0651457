// smoe/comm/ep.h: expert-parallel MoE forward over a Communicator (C++ users, tests, benchmarks).
//
// Rank p of P holds experts [p*E/P, (p+1)*E/P) (w1 [E/P, F1, H], w2 [E/P, H, F]). ep_moe_forward:
//  1. routing_plan over all E experts: expert-sorted rows are rank-major (experts are contiguous per rank);
//  2. exchange the per-(destination rank, local expert) counts (all_to_all_v, E/P int64 per peer);
//  3. permute_forward, then all_to_all_v of the rows (uneven splits);
//  4. a local plan over the received rows: expert-major, source-rank order inside an expert (= the
//     global token order when the ranks' batches are concatenated in rank order);
//  5. expert_mlp_forward on the local shards, permute_forward back to received order, all_to_all_v back;
//  6. combine_forward with the first plan.
// Same bits as the single-process pipeline on the concatenated batch (each expert sees the same rows in
// the same order). Host memory only (the in-process communicator); on GPUs, smoe.distributed does the
// same with torch.distributed, and NcclCommunicator serves the all-to-all microbenchmark.
#pragma once

#include <vector>

#include "comm/communicator.h"
#include "smoe/smoe.h"

namespace smoe::comm {

struct EpMoeParams {
  int32_t num_experts = 0;  // E (global)
  Activation activation = Activation::kSwiGLU;
  int64_t capacity = -1;  // per rank, < 0: dropless
  DropPolicy drop_policy = DropPolicy::kByTokenOrder;
};

// What moved (for tests and benchmarks): rows sent to / received from each rank, and the received
// counts per (source rank, local expert), row-major [P, E/P].
struct EpLayout {
  std::vector<int64_t> send_rows, recv_rows, recv_counts;
};

// x [T, H]; experts [T, K] i32; weights [T, K] f32 (f64 with f64 x); w1 [E/P, F1, H]; w2 [E/P, H, F];
// y [T, H] out. layout may be null. Every rank of comm must call it (T may differ, may be 0).
Status ep_moe_forward(Communicator& comm, const Exec& exec, const EpMoeParams& params, const TensorView& x,
                      const TensorView& experts, const TensorView& weights, const TensorView& w1, const TensorView& w2,
                      const TensorView& y, EpLayout* layout = nullptr);

}  // namespace smoe::comm
