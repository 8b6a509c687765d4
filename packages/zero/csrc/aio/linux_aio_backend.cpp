// Linux native AIO (io_setup / io_submit / io_getevents) through raw syscalls: the
// fallback for kernels or sandboxes without io_uring (Docker's default seccomp profile
// blocks io_uring, not AIO). It is only truly asynchronous on O_DIRECT files; on
// buffered files io_submit does the copy itself, which still happens on the worker
// thread, off the caller's.
#include <linux/aio_abi.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <sched.h>

#include "io_backend.h"

namespace ds_aio {
namespace {

class LinuxAioBackend final : public Backend {
 public:
  LinuxAioBackend(unsigned depth, int eventfd) : eventfd_(eventfd), iocbs_(depth) {
    if (syscall(__NR_io_setup, depth, &context_) < 0) {
      throw OsError(errno, std::string("io_setup: ") + std::strerror(errno));
    }
  }

  ~LinuxAioBackend() override { syscall(__NR_io_destroy, context_); }

  const char* name() const override { return "linux_aio"; }

  void submit(const std::vector<std::uint32_t>& slot_ids, std::vector<Slot>& slots,
              std::vector<Completion>& failed) override {
    std::vector<iocb*> pointers;
    pointers.reserve(slot_ids.size());
    for (std::uint32_t id : slot_ids) {
      const Slot& slot = slots[id];
      iocb& control = iocbs_[id];
      std::memset(&control, 0, sizeof(control));
      control.aio_data = id;
      control.aio_lio_opcode = slot.op == Op::kWrite ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
      control.aio_fildes = static_cast<std::uint32_t>(slot.fd);
      control.aio_buf = reinterpret_cast<std::uint64_t>(slot.address);
      control.aio_nbytes = slot.nbytes;
      control.aio_offset = slot.offset;
      control.aio_flags = IOCB_FLAG_RESFD;
      control.aio_resfd = static_cast<std::uint32_t>(eventfd_);
      pointers.push_back(&control);
    }
    std::size_t done = 0;
    int spins = 0;
    while (done < pointers.size()) {
      const long taken = syscall(__NR_io_submit, context_, pointers.size() - done, pointers.data() + done);
      if (taken > 0) {
        done += static_cast<std::size_t>(taken);
        continue;
      }
      const int error = taken == 0 ? EAGAIN : errno;
      if (error == EINTR || (error == EAGAIN && ++spins < 10000)) {
        sched_yield();
        continue;
      }
      // io_submit reports the first iocb it could not queue; fail it and go on.
      failed.push_back({slot_ids[done], -static_cast<std::int64_t>(error)});
      ++done;
    }
  }

  void reap(std::vector<Completion>& out) override {
    io_event events[64];
    timespec no_wait{0, 0};
    for (;;) {
      const long count = syscall(__NR_io_getevents, context_, 0, 64, events, &no_wait);
      if (count < 0 && errno == EINTR) continue;
      for (long i = 0; i < count; ++i) {
        out.push_back({static_cast<std::uint32_t>(events[i].data), events[i].res});
      }
      if (count < 64) return;
    }
  }

 private:
  aio_context_t context_ = 0;
  int eventfd_;
  std::vector<iocb> iocbs_;  // one per slot, so a control block outlives its submission
};

}  // namespace

std::unique_ptr<Backend> make_linux_aio_backend(unsigned depth, int eventfd) {
  return std::make_unique<LinuxAioBackend>(depth, eventfd);
}

}  // namespace ds_aio
