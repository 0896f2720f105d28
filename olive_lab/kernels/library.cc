// libolive_lab_kernels.so's entry point: registers the custom-op domain "olive_lab" and its ops.
//   LoraResident (lora_resident.cc): the resident multi-LoRA branch, CUDA kernels plus a CPU reference;
//   LoraBranch (lora_branch.cc): the LoRA branch of CPU models, the adapter as float16 inputs.
#include "ort_abi.h"

ort::Status* add_lora_resident_ops(const ort::Api* api, ort::CustomOpDomain* domain);
ort::Status* add_lora_branch_ops(const ort::Api* api, ort::CustomOpDomain* domain);

// The entry point ORT looks up in a custom-op library (SessionOptions.register_custom_ops_library, or ORT GenAI's
// session_options.custom_ops_library).
extern "C" __attribute__((visibility("default"))) ort::Status* RegisterCustomOps(ort::SessionOptions* options,
                                                                                 const ort::ApiBase* base) {
  const ort::Api* api = base->GetApi(ort::kApiVersion);
  if (!api) return nullptr;  // ORT older than 1.17 cannot even make a status for this: it reports the missing op
  using ort::entry;
  ort::CustomOpDomain* domain = nullptr;
  if (ort::Status* s = entry<ort::Status* (*)(const char*, ort::CustomOpDomain**)>(api, ort::CreateCustomOpDomain)(
          "olive_lab", &domain))
    return s;
  if (ort::Status* s = add_lora_resident_ops(api, domain)) return s;
  if (ort::Status* s = add_lora_branch_ops(api, domain)) return s;
  // The domain must outlive every session built from `options`: it is never released (one per registration).
  return entry<ort::Status* (*)(ort::SessionOptions*, ort::CustomOpDomain*)>(api, ort::AddCustomOpDomain)(options,
                                                                                                          domain);
}
