// ONNX Runtime's C API as olive_lab's kernels use it, declared here rather than vendored (no package index this
// project can install from ships ORT's headers).
//
// The API is a table of function pointers (OrtApi) that only ever grows, so a position in it is stable across
// releases. This file declares just the entries the ops call, by position: those of ORT's OrtApi as of API version
// 17 (ORT 1.17). RegisterCustomOps (library.cc) asks ORT for that version, so any ORT >= 1.17 serves it.
// tests/test_kernels.py runs every entry on the installed ORT but the CUDA stream's, which `python -m
// bench.cuda_lora kernel-check` runs on a GPU.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <string>
#include <vector>

namespace ort {

struct Status;
struct Value;
struct KernelContext;
struct KernelInfo;
struct SessionOptions;
struct CustomOpDomain;
struct TypeAndShape;
struct ShapeInferContext;

constexpr uint32_t kApiVersion = 17;
enum ErrorCode { kOk = 0, kFail = 1, kInvalidArgument = 2 };
enum ElementType { kFloat = 1, kInt8 = 3, kInt64 = 7, kFloat16 = 10 };
enum Characteristic { kRequired = 0 };
enum MemType { kDefaultMemory = 0 };

// Positions in OrtApi of the entries used here.
enum Entry : size_t {
  CreateStatus = 0,
  CreateCustomOpDomain = 26,
  CustomOpDomain_Add = 27,
  AddCustomOpDomain = 28,
  GetTensorMutableData = 51,
  GetTensorElementType = 60,
  GetDimensionsCount = 61,
  GetDimensions = 62,
  GetTensorTypeAndShape = 65,
  KernelContext_GetInput = 90,
  KernelContext_GetOutput = 91,
  ReleaseTensorTypeAndShapeInfo = 99,
  KernelContext_GetGPUComputeStream = 193,
  KernelContext_ParallelFor = 274,  // API version 17
};

using Api = void* const;  // OrtApi, seen as its table of entries

struct ApiBase {  // OrtApiBase
  const Api* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

// OrtCustomOp, through the members read at kOpVersion (16: the V2 kernel entries, which return a status).
constexpr uint32_t kOpVersion = 16;
struct CustomOp {
  uint32_t version;
  void* (*CreateKernel)(const CustomOp*, const Api*, const KernelInfo*);
  const char* (*GetName)(const CustomOp*);
  const char* (*GetExecutionProviderType)(const CustomOp*);
  ElementType (*GetInputType)(const CustomOp*, size_t);
  size_t (*GetInputTypeCount)(const CustomOp*);
  ElementType (*GetOutputType)(const CustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const CustomOp*);
  void (*KernelCompute)(void*, KernelContext*);
  void (*KernelDestroy)(void*);
  Characteristic (*GetInputCharacteristic)(const CustomOp*, size_t);
  Characteristic (*GetOutputCharacteristic)(const CustomOp*, size_t);
  MemType (*GetInputMemoryType)(const CustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const CustomOp*);
  int (*GetVariadicInputHomogeneity)(const CustomOp*);
  int (*GetVariadicOutputMinArity)(const CustomOp*);
  int (*GetVariadicOutputHomogeneity)(const CustomOp*);
  Status* (*CreateKernelV2)(const CustomOp*, const Api*, const KernelInfo*, void**);
  Status* (*KernelComputeV2)(void*, KernelContext*);
};

template <typename Fn>
inline Fn entry(const Api* api, Entry at) {
  return reinterpret_cast<Fn>(api[at]);
}

inline Status* error(const Api* api, const std::string& message) {
  return entry<Status* (*)(ErrorCode, const char*)>(api, CreateStatus)(kInvalidArgument, message.c_str());
}

struct Tensor {
  const Value* value = nullptr;
  ElementType type = kFloat;
  std::vector<int64_t> dims;
};

// Type and shape of a value; a status on failure.
inline Status* describe(const Api* api, const Value* value, Tensor* out) {
  TypeAndShape* info = nullptr;
  if (Status* s = entry<Status* (*)(const Value*, TypeAndShape**)>(api, GetTensorTypeAndShape)(value, &info)) return s;
  size_t rank = 0;
  Status* s = entry<Status* (*)(const TypeAndShape*, ElementType*)>(api, GetTensorElementType)(info, &out->type);
  if (!s) s = entry<Status* (*)(const TypeAndShape*, size_t*)>(api, GetDimensionsCount)(info, &rank);
  if (!s) {
    out->dims.resize(rank);
    s = entry<Status* (*)(const TypeAndShape*, int64_t*, size_t)>(api, GetDimensions)(info, out->dims.data(), rank);
  }
  entry<void (*)(TypeAndShape*)>(api, ReleaseTensorTypeAndShapeInfo)(info);
  out->value = value;
  return s;
}

inline void* data_of(const Api* api, const Value* value, Status** status) {
  void* data = nullptr;
  *status = entry<Status* (*)(Value*, void**)>(api, GetTensorMutableData)(const_cast<Value*>(value), &data);
  return data;
}

// The kernel context's input i, described; a status on failure.
inline Status* input(const Api* api, const KernelContext* context, size_t i, Tensor* out) {
  const Value* value = nullptr;
  if (Status* s = entry<Status* (*)(const KernelContext*, size_t, const Value**)>(api, KernelContext_GetInput)(
          context, i, &value))
    return s;
  return describe(api, value, out);
}

inline std::string dims_text(const std::vector<int64_t>& dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
  return text + "]";
}

}  // namespace ort
