// The kernel interfaces an IoQueue can drive: io_uring and Linux native AIO, both
// reached through raw syscalls so that neither liburing nor libaio has to be installed.
//
// A backend is used by one thread only (the IoQueue's worker), so it needs no locks. Its
// contract is small: every slot handed to submit() produces exactly one Completion,
// either later from reap() or at once through submit()'s `failed` argument. Both
// backends signal `eventfd` whenever a completion is posted, which is what the worker
// sleeps on.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace ds_aio {

// O_DIRECT needs buffer addresses, sizes and file offsets aligned to the device's logical
// block; 4096 covers every block size in use (512 and 4096) and the page size.
constexpr std::size_t kAlignment = 4096;

enum class Op { kRead, kWrite };

// One kernel request in flight: a piece of at most block_size bytes of a user request.
struct Slot {
  Op op = Op::kRead;
  int fd = -1;
  char* address = nullptr;
  std::size_t nbytes = 0;
  std::int64_t offset = 0;
  std::uint64_t request = 0;
  iovec iov{};  // io_uring's readv/writev point at it, so it lives as long as the slot
};

struct Completion {
  std::uint32_t slot;
  std::int64_t result;  // bytes transferred, or -errno
};

// An error with the errno that caused it; the bindings raise it as Python's OSError.
class OsError : public std::runtime_error {
 public:
  OsError(int error, const std::string& what) : std::runtime_error(what), error_(error) {}
  int error() const { return error_; }

 private:
  int error_;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // Queues `slot_ids` (indices into `slots`) with the kernel.
  virtual void submit(const std::vector<std::uint32_t>& slot_ids, std::vector<Slot>& slots,
                      std::vector<Completion>& failed) = 0;
  // Appends every completion already posted, without blocking.
  virtual void reap(std::vector<Completion>& out) = 0;
};

// `name` is "io_uring", "linux_aio" or "auto" (io_uring, else Linux AIO). Throws OsError
// naming every backend that was tried and why it could not start.
std::unique_ptr<Backend> make_backend(const std::string& name, unsigned depth, int eventfd);

std::unique_ptr<Backend> make_uring_backend(unsigned depth, int eventfd);
std::unique_ptr<Backend> make_linux_aio_backend(unsigned depth, int eventfd);

}  // namespace ds_aio
