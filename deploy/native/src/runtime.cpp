#include "runtime.h"

#include <cstdio>
#include <cstring>

#include <executorch/extension/module/module.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/platform.h>
#include <executorch/runtime/platform/runtime.h>

#include "../kernels/threadpool.h"
#include "files.h"

namespace edgetl {

namespace et = ::executorch::runtime;
using ::executorch::extension::Module;

namespace {
bool g_verbose = false;  // set once by init_runtime before anything runs

void emit_log(et_timestamp_t, et_pal_log_level_t level, const char* file, const char*, size_t line, const char* msg, size_t len) {
  if (g_verbose) std::fprintf(stderr, "executorch %c %s:%zu] %.*s\n", static_cast<char>(level), file, line, static_cast<int>(len), msg);
}

const char* dtype_name(::executorch::aten::ScalarType t) {
  switch (t) {
    case ::executorch::aten::ScalarType::Float: return "float32";
    case ::executorch::aten::ScalarType::Long: return "int64";
    case ::executorch::aten::ScalarType::Int: return "int32";
    case ::executorch::aten::ScalarType::Double: return "float64";
    case ::executorch::aten::ScalarType::Byte: return "uint8";
    case ::executorch::aten::ScalarType::Bool: return "bool";
    default: return "other";
  }
}

TensorView view(const std::string& name, const et::EValue& v) {
  if (!v.isTensor()) throw DeviceError("output " + name + " of the training program is not a tensor");
  auto t = v.toTensor();
  return {name, t.mutable_data_ptr(), t.nbytes(), static_cast<size_t>(t.numel()), dtype_name(t.scalar_type())};
}

template <typename T>
T check(et::Result<T> r, const std::string& what) {
  if (!r.ok()) throw DeviceError(what + " failed: ExecuTorch error " + et::to_string(r.error()));
  return std::move(r.get());
}
}  // namespace

void init_runtime(bool verbose) {
  g_verbose = verbose;
  et::register_pal(et::PalImpl::create(emit_log, __FILE__));
  et::runtime_init();
}

void set_threads(unsigned n) { edgetl_kernels::set_thread_count(n); }

void require_kernels(const std::vector<std::string>& operators, const std::string& program) {
  std::string missing;
  for (const auto& op : operators)
    if (!et::registry_has_op_function(op.c_str())) missing += (missing.empty() ? "" : ", ") + op;
  if (!missing.empty())
    throw DeviceError(program + " needs kernels this edgetl-device lacks: " + missing +
                      " (build edgetl-device from the edgetl that exported the bundle: deploy/native/build.sh)");
}

struct Program::Impl {
  std::string path, data;
  std::unique_ptr<Module> module;
};

Program::Program(const std::string& pte, const std::string& ptd) : impl_(new Impl) {
  impl_->path = pte;
  impl_->data = ptd;
  impl_->module =
      ptd.empty() ? std::make_unique<Module>(pte, Module::LoadMode::Mmap) : std::make_unique<Module>(pte, ptd, Module::LoadMode::Mmap);
  et::Error err = impl_->module->load();
  if (err != et::Error::Ok)
    throw DeviceError("cannot load program " + pte + (ptd.empty() ? "" : " with " + ptd) + ": ExecuTorch error " + et::to_string(err));
}

Program::~Program() = default;

void Program::load_method(const std::string& method) {
  if (impl_->module->is_method_loaded(method)) return;
  et::Error err = impl_->module->load_method(method);
  if (err == et::Error::Ok) return;
  std::string what = "cannot load method " + method + " of " + impl_->path;
  if (!impl_->data.empty()) {
    what += " with weights " + impl_->data;
    if (err == et::Error::NotFound) what += " (the weights file lacks tensors the program needs: weights of another model?)";
  }
  throw DeviceError(what + ": ExecuTorch error " + et::to_string(err));
}

std::vector<float> Program::run(const std::string& method, float* input, const std::vector<int64_t>& shape) {
  load_method(method);
  std::vector<::executorch::aten::SizesType> sizes(shape.begin(), shape.end());
  auto tensor = ::executorch::extension::from_blob(input, sizes, ::executorch::aten::ScalarType::Float);
  auto out = check(impl_->module->execute(method, {et::EValue(*tensor)}), "running " + method + " of " + impl_->path);
  if (out.empty() || !out[0].isTensor()) throw DeviceError(method + " of " + impl_->path + " returned no tensor");
  auto t = out[0].toTensor();
  const float* p = t.const_data_ptr<float>();
  return std::vector<float>(p, p + t.numel());
}

TrainingSession::TrainingSession(const std::string& pte, const std::string& ptd, const std::vector<std::string>& buffer_names,
                                 const std::string& method)
    : program_(pte, ptd), method_(method), buffer_names_(buffer_names) {
  program_.load_method(method);
  auto& module = *program_.impl_->module;
  auto fqns = check(module.execute("__et_training_fqn_" + method), pte + " is not a training program: reading its parameter names");
  for (const auto& v : fqns) names_.emplace_back(v.toString());
  auto meta = check(module.method_meta(method), "reading " + method + " of " + pte);
  size_t n_out = meta.num_outputs();
  if (n_out < 2 * names_.size() + 1 + buffer_names_.size())
    throw DeviceError(pte + ": " + method + " has " + std::to_string(n_out) + " outputs, too few for " + std::to_string(names_.size()) +
                      " parameters and " + std::to_string(buffer_names_.size()) + " running statistics");
  num_user_outputs_ = n_out - 2 * names_.size();  // parameters last, their gradients before them
}

TrainingSession::~TrainingSession() = default;

float TrainingSession::step(float* features, const std::vector<int64_t>& feature_shape, int64_t* labels, std::vector<float>* logits) {
  std::vector<::executorch::aten::SizesType> fs(feature_shape.begin(), feature_shape.end());
  auto x = ::executorch::extension::from_blob(features, fs, ::executorch::aten::ScalarType::Float);
  auto y = ::executorch::extension::from_blob(labels, {fs[0]}, ::executorch::aten::ScalarType::Long);
  auto out = check(program_.impl_->module->execute(method_, {et::EValue(*x), et::EValue(*y)}), "training step");
  size_t n = names_.size(), g0 = num_user_outputs_, p0 = num_user_outputs_ + n;
  grads_.clear();
  params_.clear();
  buffers_.clear();
  for (size_t i = 0; i < n; ++i) {
    grads_.push_back(view(names_[i], out[g0 + i]));
    params_.push_back(view(names_[i], out[p0 + i]));
  }
  size_t b0 = num_user_outputs_ - buffer_names_.size();
  for (size_t i = 0; i < buffer_names_.size(); ++i) buffers_.push_back(view(buffer_names_[i], out[b0 + i]));
  const auto loss = out[0].toTensor();
  if (logits) {
    const auto l = out[1].toTensor();
    logits->assign(l.const_data_ptr<float>(), l.const_data_ptr<float>() + l.numel());
  }
  return loss.const_data_ptr<float>()[0];
}

}  // namespace edgetl
