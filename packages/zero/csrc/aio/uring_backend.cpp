// io_uring through raw syscalls: the ring is set up and mmapped by hand, requests are
// IORING_OP_READV/WRITEV (the oldest opcodes, kernel 5.1+) and completions are read off
// the shared completion ring. Only the IoQueue worker touches the ring, so the only
// synchronisation needed is the acquire/release pairing with the kernel on head and tail.
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sched.h>

#include "io_backend.h"

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif
#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426
#endif
#ifndef __NR_io_uring_register
#define __NR_io_uring_register 427
#endif

namespace ds_aio {
namespace {

template <class T>
T* at(void* base, std::uint32_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}

class UringBackend final : public Backend {
 public:
  UringBackend(unsigned depth, int eventfd) {
    io_uring_params params{};
    ring_fd_ = static_cast<int>(syscall(__NR_io_uring_setup, depth, &params));
    if (ring_fd_ < 0) throw OsError(errno, std::string("io_uring_setup: ") + std::strerror(errno));
    try {
      map_rings(params);
      int fd = eventfd;
      if (syscall(__NR_io_uring_register, ring_fd_, IORING_REGISTER_EVENTFD, &fd, 1) < 0) {
        throw OsError(errno, std::string("io_uring_register(EVENTFD): ") + std::strerror(errno));
      }
    } catch (...) {
      release();
      throw;
    }
  }

  ~UringBackend() override { release(); }

  const char* name() const override { return "io_uring"; }

  void submit(const std::vector<std::uint32_t>& slot_ids, std::vector<Slot>& slots,
              std::vector<Completion>& failed) override {
    const unsigned first = *sq_tail_;  // this thread is the only producer
    unsigned tail = first;
    for (std::uint32_t id : slot_ids) {
      Slot& slot = slots[id];
      slot.iov.iov_base = slot.address;
      slot.iov.iov_len = slot.nbytes;
      const unsigned index = tail & *sq_mask_;
      io_uring_sqe* sqe = &sqes_[index];
      std::memset(sqe, 0, sizeof(*sqe));
      sqe->opcode = slot.op == Op::kWrite ? IORING_OP_WRITEV : IORING_OP_READV;
      sqe->fd = slot.fd;
      sqe->addr = reinterpret_cast<std::uint64_t>(&slot.iov);
      sqe->len = 1;
      sqe->off = static_cast<std::uint64_t>(slot.offset);
      sqe->user_data = id;
      sq_array_[index] = index;
      ++tail;
    }
    __atomic_store_n(sq_tail_, tail, __ATOMIC_RELEASE);

    unsigned left = static_cast<unsigned>(slot_ids.size());
    int spins = 0;
    while (left > 0) {
      const long taken = syscall(__NR_io_uring_enter, ring_fd_, left, 0, 0, nullptr, 0);
      if (taken >= 0) {
        left -= static_cast<unsigned>(taken);
        continue;
      }
      const int error = errno;
      if (error == EINTR || ((error == EAGAIN || error == EBUSY) && ++spins < 10000)) {
        sched_yield();
        continue;
      }
      // The kernel consumed entries up to sq_head; take the rest back and fail them.
      const unsigned consumed = __atomic_load_n(sq_head_, __ATOMIC_ACQUIRE);
      for (unsigned position = consumed; position != tail; ++position) {
        failed.push_back({slot_ids[position - first], -static_cast<std::int64_t>(error)});
      }
      __atomic_store_n(sq_tail_, consumed, __ATOMIC_RELEASE);
      return;
    }
  }

  void reap(std::vector<Completion>& out) override {
    unsigned head = *cq_head_;
    const unsigned tail = __atomic_load_n(cq_tail_, __ATOMIC_ACQUIRE);
    for (; head != tail; ++head) {
      const io_uring_cqe& cqe = cqes_[head & *cq_mask_];
      out.push_back({static_cast<std::uint32_t>(cqe.user_data), cqe.res});
    }
    __atomic_store_n(cq_head_, head, __ATOMIC_RELEASE);
  }

 private:
  void map_rings(const io_uring_params& params) {
    sq_bytes_ = params.sq_off.array + params.sq_entries * sizeof(unsigned);
    cq_bytes_ = params.cq_off.cqes + params.cq_entries * sizeof(io_uring_cqe);
    const bool single = (params.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single) sq_bytes_ = cq_bytes_ = std::max(sq_bytes_, cq_bytes_);
    sq_ring_ = map(sq_bytes_, IORING_OFF_SQ_RING);
    cq_ring_ = single ? sq_ring_ : map(cq_bytes_, IORING_OFF_CQ_RING);
    sqes_bytes_ = params.sq_entries * sizeof(io_uring_sqe);
    sqes_ = static_cast<io_uring_sqe*>(map(sqes_bytes_, IORING_OFF_SQES));

    sq_head_ = at<unsigned>(sq_ring_, params.sq_off.head);
    sq_tail_ = at<unsigned>(sq_ring_, params.sq_off.tail);
    sq_mask_ = at<unsigned>(sq_ring_, params.sq_off.ring_mask);
    sq_array_ = at<unsigned>(sq_ring_, params.sq_off.array);
    cq_head_ = at<unsigned>(cq_ring_, params.cq_off.head);
    cq_tail_ = at<unsigned>(cq_ring_, params.cq_off.tail);
    cq_mask_ = at<unsigned>(cq_ring_, params.cq_off.ring_mask);
    cqes_ = at<io_uring_cqe>(cq_ring_, params.cq_off.cqes);
  }

  void* map(std::size_t bytes, std::uint64_t offset) {
    void* address = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                         ring_fd_, static_cast<off_t>(offset));
    if (address == MAP_FAILED) throw OsError(errno, std::string("io_uring mmap: ") + std::strerror(errno));
    return address;
  }

  void release() {
    if (sqes_ != nullptr) munmap(sqes_, sqes_bytes_);
    if (cq_ring_ != nullptr && cq_ring_ != sq_ring_) munmap(cq_ring_, cq_bytes_);
    if (sq_ring_ != nullptr) munmap(sq_ring_, sq_bytes_);
    if (ring_fd_ >= 0) close(ring_fd_);
    sqes_ = nullptr;
    cq_ring_ = sq_ring_ = nullptr;
    ring_fd_ = -1;
  }

  int ring_fd_ = -1;
  void* sq_ring_ = nullptr;
  void* cq_ring_ = nullptr;
  std::size_t sq_bytes_ = 0;
  std::size_t cq_bytes_ = 0;
  std::size_t sqes_bytes_ = 0;
  io_uring_sqe* sqes_ = nullptr;
  unsigned* sq_head_ = nullptr;
  unsigned* sq_tail_ = nullptr;
  unsigned* sq_mask_ = nullptr;
  unsigned* sq_array_ = nullptr;
  unsigned* cq_head_ = nullptr;
  unsigned* cq_tail_ = nullptr;
  unsigned* cq_mask_ = nullptr;
  io_uring_cqe* cqes_ = nullptr;
};

}  // namespace

std::unique_ptr<Backend> make_uring_backend(unsigned depth, int eventfd) {
  return std::make_unique<UringBackend>(depth, eventfd);
}

}  // namespace ds_aio
