// Python bindings: raw addresses and scalars in, nothing out. The GIL is released while
// the loops run, so Python threads (for example host-to-device copies of the previous
// parameter group) keep going during the update.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "optimizer_step.h"

namespace py = pybind11;
using ds_zero::Format;
using ds_zero::Isa;

namespace {

Isa checked_isa(const std::string& name) {
  Isa isa;
  if (!ds_zero::parse_isa(name.c_str(), &isa)) {
    throw py::value_error("unknown instruction-set path '" + name +
                          "'; use one of 'avx512', 'avx2', 'scalar'");
  }
  if (!ds_zero::isa_supported(isa)) {
    throw py::value_error("instruction-set path '" + name +
                          "' is not supported by this CPU or this build; use best_isa()");
  }
  return isa;
}

Format checked_format(int code, bool is_copy) {
  const bool known = code == static_cast<int>(Format::kFloat32) ||
                     code == static_cast<int>(Format::kBFloat16) ||
                     code == static_cast<int>(Format::kFloat16);
  if (is_copy && code == static_cast<int>(Format::kNone)) return Format::kNone;
  if (!known || (is_copy && code == static_cast<int>(Format::kFloat32))) {
    throw py::value_error(std::string(is_copy ? "copy" : "grad") + " dtype code " +
                          std::to_string(code) + " is not supported; use the DTYPE_* constants");
  }
  return static_cast<Format>(code);
}

template <class T>
T* address(std::uintptr_t value, const char* what, std::int64_t numel) {
  if (value == 0 && numel > 0) throw py::value_error(std::string(what) + " address is null");
  return reinterpret_cast<T*>(value);
}

void check_copy(std::uintptr_t copy, Format format) {
  if ((copy == 0) != (format == Format::kNone)) {
    throw py::value_error("pass a copy address together with copy_dtype, or neither");
  }
}

}  // namespace

PYBIND11_MODULE(_cpu_adam, m) {
  m.doc() = "CPU Adam, AdamW and Adagrad over raw fp32 buffers (ds-zero).";
  m.attr("DTYPE_NONE") = static_cast<int>(Format::kNone);
  m.attr("DTYPE_FLOAT32") = static_cast<int>(Format::kFloat32);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(Format::kBFloat16);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(Format::kFloat16);

  m.def(
      "supported_isas",
      [] {
        std::vector<std::string> names;
        for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kScalar}) {
          if (ds_zero::isa_supported(isa)) names.emplace_back(ds_zero::isa_name(isa));
        }
        return names;
      },
      "Instruction-set paths this CPU and build can run, best first.");
  m.def("best_isa", [] { return std::string(ds_zero::isa_name(ds_zero::best_isa())); });
  m.def("max_threads", &ds_zero::max_threads, "OpenMP threads an update uses.");

  m.def(
      "adam_step",
      [](std::uintptr_t param, std::uintptr_t grad, int grad_dtype, std::uintptr_t exp_avg,
         std::uintptr_t exp_avg_sq, std::uintptr_t copy, int copy_dtype, std::int64_t numel,
         double one_minus_beta1, double beta2, double one_minus_beta2, double eps,
         double step_size, double bias_correction2_sqrt, double l2_weight_decay,
         double param_decay, double grad_multiplier, const std::string& isa) {
        const Format copy_format = checked_format(copy_dtype, true);
        check_copy(copy, copy_format);
        const ds_zero::AdamStep step{
            address<float>(param, "param", numel),
            address<const void>(grad, "grad", numel),
            checked_format(grad_dtype, false),
            address<float>(exp_avg, "exp_avg", numel),
            address<float>(exp_avg_sq, "exp_avg_sq", numel),
            reinterpret_cast<void*>(copy),
            copy_format,
            numel,
            static_cast<float>(one_minus_beta1),
            static_cast<float>(beta2),
            static_cast<float>(one_minus_beta2),
            static_cast<float>(eps),
            static_cast<float>(step_size),
            static_cast<float>(bias_correction2_sqrt),
            static_cast<float>(l2_weight_decay),
            static_cast<float>(param_decay),
            static_cast<float>(grad_multiplier)};
        const Isa path = checked_isa(isa);
        py::gil_scoped_release release;
        ds_zero::run_adam(path, step);
      },
      py::kw_only(), py::arg("param"), py::arg("grad"), py::arg("grad_dtype"),
      py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("copy"), py::arg("copy_dtype"),
      py::arg("numel"), py::arg("one_minus_beta1"), py::arg("beta2"),
      py::arg("one_minus_beta2"), py::arg("eps"), py::arg("step_size"),
      py::arg("bias_correction2_sqrt"), py::arg("l2_weight_decay"), py::arg("param_decay"),
      py::arg("grad_multiplier"), py::arg("isa"),
      "One Adam/AdamW update in place (see optimizer_step.h for the formula).");

  m.def(
      "adagrad_step",
      [](std::uintptr_t param, std::uintptr_t grad, int grad_dtype, std::uintptr_t sum,
         std::uintptr_t copy, int copy_dtype, std::int64_t numel, double clr, double eps,
         double weight_decay, double grad_multiplier, const std::string& isa) {
        const Format copy_format = checked_format(copy_dtype, true);
        check_copy(copy, copy_format);
        const ds_zero::AdagradStep step{address<float>(param, "param", numel),
                                        address<const void>(grad, "grad", numel),
                                        checked_format(grad_dtype, false),
                                        address<float>(sum, "sum", numel),
                                        reinterpret_cast<void*>(copy),
                                        copy_format,
                                        numel,
                                        static_cast<float>(clr),
                                        static_cast<float>(eps),
                                        static_cast<float>(weight_decay),
                                        static_cast<float>(grad_multiplier)};
        const Isa path = checked_isa(isa);
        py::gil_scoped_release release;
        ds_zero::run_adagrad(path, step);
      },
      py::kw_only(), py::arg("param"), py::arg("grad"), py::arg("grad_dtype"), py::arg("sum"),
      py::arg("copy"), py::arg("copy_dtype"), py::arg("numel"), py::arg("clr"), py::arg("eps"),
      py::arg("weight_decay"), py::arg("grad_multiplier"), py::arg("isa"),
      "One Adagrad update in place (see optimizer_step.h for the formula).");
}
