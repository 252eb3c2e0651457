// smoe/status.h: the error type of the C++ core.
//
// Every entry point returns a Status. A failed Status carries a code and a message that names the
// op, the argument and what was expected, e.g.
//   "topk_gating: argument 'logits': expected dtype f32, bf16 or f16, got i32".
// The Python binding turns kInvalidArgument into ValueError and every other failure into
// RuntimeError, each carrying the message.
#pragma once

#include <string>
#include <string_view>
#include <utility>

namespace smoe {

enum class Code : int {
  kOk = 0,
  kInvalidArgument = 1,  // shape, dtype, device, value out of range: the caller's fault
  kUnsupported = 2,      // valid request this build or backend cannot serve (e.g. cuda not compiled)
  kDeviceError = 3,      // a CUDA/driver/emulator error
  kInternal = 4,         // a bug in smoe
};

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status Ok() { return Status(); }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  Code code_ = Code::kOk;
  std::string message_;
};

// "op: argument 'arg': expected <expected>, got <got>"
inline Status invalid_argument(std::string_view op, std::string_view arg, std::string_view expected,
                               std::string_view got) {
  std::string m;
  m.reserve(op.size() + arg.size() + expected.size() + got.size() + 40);
  m.append(op).append(": argument '").append(arg).append("': expected ").append(expected);
  if (!got.empty()) m.append(", got ").append(got);
  return Status(Code::kInvalidArgument, std::move(m));
}

inline Status unsupported(std::string_view op, std::string_view what) {
  std::string m(op);
  m.append(": ").append(what);
  return Status(Code::kUnsupported, std::move(m));
}

}  // namespace smoe

#define SMOE_RETURN_IF_ERROR(expr)               \
  do {                                           \
    ::smoe::Status smoe_status_ = (expr);        \
    if (!smoe_status_.ok()) return smoe_status_; \
  } while (0)
