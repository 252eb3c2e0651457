// The device guard of the CUDA entry points (smoe::cuda::DeviceGuard, SMOE_DEVICE_DISPATCH in
// csrc/cuda/dispatch.h) through the emulator's device model (two emulated devices): tensors
// allocated on device 1 while device 0 is current make an unguarded launcher fault (the emulator
// reports the pointer of another device, as a GPU without peer access does), while the guarded call
// runs on device 1, matches the CPU backend and leaves device 0 current.
#include <cstring>

#include "cpu/permute.h"
#include "cuda/dispatch.h"
#include "cuda_testing.h"
#include "smoe/simt/runtime_api.h"
#include "smoe/simt/testing.h"

namespace smoe::testing {
namespace {

simt::Options two_devices() {
  simt::Options o = simt::options();
  o.devices = 2;
  o.quiet = true;
  return o;
}

// A cudaMalloc'ed copy of v on the current device.
template <class T>
T* device_copy(const std::vector<T>& v) {
  void* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, v.size() * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return static_cast<T*>(p);
}

TEST(SimtDeviceGuard, EntryPointsRunOnTheDeviceOfTheirTensors) {
  simt::ScopedOptions scope(two_devices());
  const int64_t T = 6, H = 16, R = 8;
  std::vector<float> x = uniform<float>(size_t(T * H), 1);
  std::vector<int32_t> tok = {0, 5, -1, 3, 3, 1, 2, 4};
  ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
  float* dx = device_copy(x);
  int32_t* dtok = device_copy(tok);
  float* dxs = device_copy(std::vector<float>(size_t(R * H), 0.0f));
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  auto on_cuda1 = [](TensorView v) {
    v.device = Device::kCUDA;
    v.device_index = 1;
    return v;
  };
  const TensorView xv = on_cuda1(make_view(dx, {T, H})), tv = on_cuda1(make_view(dtok, {R}));
  const TensorView xsv = on_cuda1(make_view(dxs, {R, H}));
  EXPECT_EQ(detail::cuda_device_of(xv, tv, xsv), 1);
  EXPECT_EQ(detail::cuda_device_of(TensorView{}, make_view(x.data(), {T, H})), -1);

  // Guarded: runs on device 1, restores device 0.
  EXPECT_OK(detail::on_device<sim::DeviceGuard>(detail::cuda_device_of(xv, tv, xsv),
                                                [&] { return sim::permute_forward(xv, tv, xsv, nullptr); }));
  int current = -1;
  ASSERT_EQ(cudaGetDevice(&current), cudaSuccess);
  EXPECT_EQ(current, 0);
  std::vector<float> xs(size_t(R * H)), want(size_t(R * H));
  ASSERT_EQ(cudaMemcpy(xs.data(), dxs, xs.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_TRUE(
      cpu::permute_forward(make_view(x.data(), {T, H}), make_view(tok.data(), {R}), make_view(want.data(), {R, H}))
          .ok());
  EXPECT_TRUE(bitwise_equal(xs, want));

  // A guard for a device that does not exist reports it; nothing runs.
  bool ran = false;
  const Status bad = detail::on_device<sim::DeviceGuard>(5, [&] {
    ran = true;
    return Status::Ok();
  });
  EXPECT_FALSE(bad.ok());
  EXPECT_FALSE(ran);
  EXPECT_NE(bad.message().find("cudaSetDevice"), std::string::npos) << bad.message();
  cudaGetLastError();

  // Unguarded, with device 0 current: the emulator reports the launch on the wrong device.
  const Status st = sim::permute_forward(xv, tv, xsv, nullptr);
  EXPECT_EQ(st.code(), Code::kDeviceError);
  EXPECT_NE(st.message().find("allocated on device 1"), std::string::npos) << st.message();
  cudaDeviceReset();  // clears the (sticky) fault and frees the buffers
}

}  // namespace
}  // namespace smoe::testing
