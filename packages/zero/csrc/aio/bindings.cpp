// Python bindings of ds.zero._aio: file descriptors, raw addresses and sizes in, request
// ids out. No libtorch: the Python layer (ds.zero.aio) passes tensor.data_ptr(). Every
// call that can block releases the GIL, so Python compute runs while I/O waits.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdint>
#include <string>
#include <vector>

#include "io_queue.h"

namespace py = pybind11;
using ds_aio::IoQueue;
using ds_aio::Op;

namespace {

// The kernel interfaces this process may use: each is probed by starting it.
std::vector<std::string> available_backends() {
  std::vector<std::string> names;
  const int probe = eventfd(0, EFD_CLOEXEC);
  if (probe < 0) return names;
  for (const char* name : {"io_uring", "linux_aio"}) {
    try {
      ds_aio::make_backend(name, 1, probe);
      names.emplace_back(name);
    } catch (const ds_aio::OsError&) {
    }
  }
  close(probe);
  return names;
}

}  // namespace

PYBIND11_MODULE(_aio, m) {
  m.doc() = "Asynchronous file I/O through io_uring or Linux AIO (ds-zero).";
  m.attr("ALIGNMENT") = ds_aio::kAlignment;

  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const ds_aio::OsError& error) {
      py::object exception = py::reinterpret_steal<py::object>(
          PyObject_CallFunction(PyExc_OSError, "is", error.error(), error.what()));
      PyErr_SetObject(PyExc_OSError, exception.ptr());
    }
  });

  m.def("available_backends", &available_backends,
        "Kernel async I/O interfaces this process can start, preferred first.");

  py::class_<IoQueue>(m, "IoQueue")
      .def(py::init<unsigned, std::size_t, const std::string&>(), py::arg("queue_depth") = 32,
           py::arg("block_size") = std::size_t{1} << 20, py::arg("backend") = "auto",
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("backend", &IoQueue::backend_name)
      .def_property_readonly("queue_depth", &IoQueue::queue_depth)
      .def_property_readonly("block_size", &IoQueue::block_size)
      .def(
          "submit_write",
          [](IoQueue& queue, int fd, std::uintptr_t address, std::size_t nbytes, std::int64_t offset) {
            return queue.submit(Op::kWrite, fd, address, nbytes, offset);
          },
          py::arg("fd"), py::arg("address"), py::arg("nbytes"), py::arg("offset"),
          "Queue a write of nbytes from address to fd at offset; returns the request id.")
      .def(
          "submit_read",
          [](IoQueue& queue, int fd, std::uintptr_t address, std::size_t nbytes, std::int64_t offset) {
            return queue.submit(Op::kRead, fd, address, nbytes, offset);
          },
          py::arg("fd"), py::arg("address"), py::arg("nbytes"), py::arg("offset"),
          "Queue a read of nbytes at offset of fd into address; returns the request id.")
      .def("wait", &IoQueue::wait, py::arg("request"), py::call_guard<py::gil_scoped_release>(),
           "Block until the request is done; raises OSError if it failed.")
      .def("done", &IoQueue::done, py::arg("request"), "Whether the request is done.")
      .def("wait_all", &IoQueue::wait_all, py::call_guard<py::gil_scoped_release>(),
           "Wait for every outstanding request; raises the first failure.")
      .def_property_readonly("outstanding", &IoQueue::outstanding)
      .def("close", &IoQueue::close, py::call_guard<py::gil_scoped_release>(),
           "Finish the I/O in flight and stop; later submits raise.");
}
