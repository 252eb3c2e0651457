// smoe._C.enums(): the names of every enum that crosses the binding, with their codes.
//
// python/smoe/_core.py and python/smoe/ops/ build their tables (SCORE_FUNCS, DROP_POLICIES, ACTIVATIONS,
// the backend and dtype codes) from this dict at import, so a name or a code exists in one place: here,
// next to the C++ enumerators it names. A table lists each enumerator once; tests/python/test_package.py
// checks the Python tables against it. When include/smoe/*.h grows its own string tables
// (const char* to_string(Enum)), this file should read them instead of spelling the names.
#include <utility>

#include "bindings.h"

namespace py = pybind11;

namespace smoe::bindings {
namespace {

template <class Enum, size_t N>
py::dict table(const std::pair<const char*, Enum> (&entries)[N]) {
  py::dict d;
  for (const auto& [name, value] : entries) d[name] = static_cast<int>(value);
  return d;
}

constexpr std::pair<const char*, Backend> kBackends[] = {
    {"auto", Backend::kAuto}, {"cpu", Backend::kCpu}, {"cuda", Backend::kCuda}, {"simt", Backend::kSimt}};
constexpr std::pair<const char*, DType> kDTypes[] = {{"f32", DType::kF32}, {"f16", DType::kF16}, {"bf16", DType::kBF16},
                                                     {"f64", DType::kF64}, {"i32", DType::kI32}, {"i64", DType::kI64},
                                                     {"u8", DType::kU8}};
constexpr std::pair<const char*, Device> kDevices[] = {{"cpu", Device::kCPU}, {"cuda", Device::kCUDA}};
constexpr std::pair<const char*, ScoreFunc> kScoreFuncs[] = {{"softmax", ScoreFunc::kSoftmax},
                                                             {"sigmoid", ScoreFunc::kSigmoid}};
constexpr std::pair<const char*, GroupScore> kGroupScores[] = {{"max", GroupScore::kMax},
                                                               {"top2_sum", GroupScore::kTop2Sum}};
constexpr std::pair<const char*, DropPolicy> kDropPolicies[] = {{"token_order", DropPolicy::kByTokenOrder},
                                                                {"score", DropPolicy::kByScore}};
constexpr std::pair<const char*, Activation> kActivations[] = {{"swiglu", Activation::kSwiGLU},
                                                               {"geglu", Activation::kGeGLU},
                                                               {"gelu", Activation::kGELU},
                                                               {"relu", Activation::kReLU}};

}  // namespace

void bind_enums(py::module_& m) {
  m.def(
      "enums",
      [] {
        py::dict d;
        d["backend"] = table(kBackends);
        d["dtype"] = table(kDTypes);
        d["device"] = table(kDevices);
        d["score_func"] = table(kScoreFuncs);
        d["group_score"] = table(kGroupScores);
        d["drop_policy"] = table(kDropPolicies);
        d["activation"] = table(kActivations);
        // The activations whose input is [gate | up] (F1 = 2F): smoe::is_gated.
        py::list gated;
        for (const auto& [name, value] : kActivations)
          if (is_gated(value)) gated.append(name);
        d["gated_activation"] = py::tuple(gated);
        return d;
      },
      "Enum names -> codes of the C++ core: {'backend', 'dtype', 'device', 'score_func', 'group_score', "
      "'drop_policy', 'activation': {name: code}, 'gated_activation': (names,)}.");
}

}  // namespace smoe::bindings
