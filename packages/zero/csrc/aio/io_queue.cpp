#include "io_queue.h"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace ds_aio {
namespace {

std::string describe(Op op, std::size_t nbytes, std::int64_t offset, int fd) {
  return std::string(op == Op::kWrite ? "write" : "read") + " of " + std::to_string(nbytes) +
         " bytes at offset " + std::to_string(offset) + " on fd " + std::to_string(fd);
}

void check_request(Op op, int fd, std::uintptr_t address, std::size_t nbytes, std::int64_t offset) {
  const int flags = fcntl(fd, F_GETFL);
  if (flags < 0) throw OsError(errno, "fd " + std::to_string(fd) + " is not an open file descriptor");
  const int mode = flags & O_ACCMODE;
  if (op == Op::kWrite ? mode == O_RDONLY : mode == O_WRONLY) {
    throw std::invalid_argument("fd " + std::to_string(fd) + " is not open for " +
                                (op == Op::kWrite ? "writing" : "reading"));
  }
  if (offset < 0) throw std::invalid_argument("offset must be >= 0, got " + std::to_string(offset));
  if (address == 0 && nbytes > 0) throw std::invalid_argument("address is null");
  if ((flags & O_DIRECT) != 0 &&
      (address % kAlignment != 0 || nbytes % kAlignment != 0 ||
       static_cast<std::size_t>(offset) % kAlignment != 0)) {
    throw std::invalid_argument(
        "fd " + std::to_string(fd) + " is open with O_DIRECT, which needs the address, size and "
        "offset to be multiples of " + std::to_string(kAlignment) + " (got address " +
        std::to_string(address) + ", size " + std::to_string(nbytes) + ", offset " +
        std::to_string(offset) + "); use aligned buffers and pad the size, or open without O_DIRECT");
  }
}

}  // namespace

std::unique_ptr<Backend> make_backend(const std::string& name, unsigned depth, int eventfd) {
  if (name == "io_uring") return make_uring_backend(depth, eventfd);
  if (name == "linux_aio") return make_linux_aio_backend(depth, eventfd);
  if (name != "auto") {
    throw std::invalid_argument("unknown I/O backend '" + name + "'; use 'auto', 'io_uring' or 'linux_aio'");
  }
  try {
    return make_uring_backend(depth, eventfd);
  } catch (const OsError& uring_error) {
    try {
      return make_linux_aio_backend(depth, eventfd);
    } catch (const OsError& aio_error) {
      throw OsError(aio_error.error(), std::string("no kernel async I/O interface is usable: ") +
                                           uring_error.what() + "; " + aio_error.what());
    }
  }
}

IoQueue::IoQueue(unsigned queue_depth, std::size_t block_size, const std::string& backend)
    : depth_(queue_depth), block_size_(block_size) {
  if (queue_depth < 1 || queue_depth > 4096) {
    throw std::invalid_argument("queue_depth must be in [1, 4096], got " + std::to_string(queue_depth));
  }
  if (block_size < kAlignment || block_size % kAlignment != 0 || block_size > (1u << 30)) {
    throw std::invalid_argument("block_size must be a multiple of " + std::to_string(kAlignment) +
                                " between 4 KiB and 1 GiB, got " + std::to_string(block_size));
  }
  eventfd_ = eventfd(0, EFD_CLOEXEC);
  if (eventfd_ < 0) throw OsError(errno, std::string("eventfd: ") + std::strerror(errno));
  try {
    backend_ = make_backend(backend, queue_depth, eventfd_);
  } catch (...) {
    ::close(eventfd_);
    throw;
  }
  slots_.resize(queue_depth);
  for (unsigned i = queue_depth; i > 0; --i) free_slots_.push_back(i - 1);
  worker_ = std::thread([this] { run(); });
}

IoQueue::~IoQueue() {
  close();
  backend_.reset();
  ::close(eventfd_);
}

void IoQueue::signal() {
  const std::uint64_t one = 1;
  while (::write(eventfd_, &one, sizeof(one)) < 0 && errno == EINTR) {
  }
}

std::uint64_t IoQueue::submit(Op op, int fd, std::uintptr_t address, std::size_t nbytes,
                              std::int64_t offset) {
  check_request(op, fd, address, nbytes, offset);
  std::uint64_t id;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) throw std::runtime_error("this I/O queue is closed; create a new one");
    id = next_id_++;
    Request& request = requests_[id];
    char* base = reinterpret_cast<char*>(address);
    for (std::size_t start = 0; start < nbytes; start += block_size_) {
      const std::size_t size = std::min(block_size_, nbytes - start);
      pending_.push_back({id, op, fd, base + start, size, offset + static_cast<std::int64_t>(start)});
      ++request.pieces_left;
    }
    if (request.pieces_left == 0) return id;  // nothing to transfer: done already
  }
  signal();
  return id;
}

void IoQueue::finish_piece(const Slot& slot, int error, const char* reason) {
  // Called with mutex_ held. A request stays known while any of its pieces is in flight.
  Request& request = requests_.at(slot.request);
  if (error != 0 && request.error == 0) {
    request.error = error;
    request.message = describe(slot.op, slot.nbytes, slot.offset, slot.fd) + " failed: " + reason;
  }
  if (--request.pieces_left == 0) finished_.notify_all();
}

void IoQueue::run() {
  std::vector<Completion> completions;
  std::vector<std::uint32_t> batch;
  for (;;) {
    if (completions.empty()) {
      std::uint64_t counter;  // a completion or a new submission; reading resets it
      while (::read(eventfd_, &counter, sizeof(counter)) < 0 && errno == EINTR) {
      }
    }
    backend_->reap(completions);
    batch.clear();
    std::unique_lock<std::mutex> lock(mutex_);
    for (const Completion& completion : completions) {
      Slot& slot = slots_[completion.slot];
      free_slots_.push_back(completion.slot);
      if (completion.result < 0) {
        const int error = static_cast<int>(-completion.result);
        finish_piece(slot, error, std::strerror(error));
      } else if (completion.result == 0 && slot.nbytes > 0) {
        finish_piece(slot, slot.op == Op::kRead ? ENODATA : EIO,
                     slot.op == Op::kRead ? "the file ends before the requested range"
                                          : "the kernel wrote nothing");
      } else if (static_cast<std::size_t>(completion.result) < slot.nbytes) {
        // Short transfer: queue the rest first so it goes out with this batch.
        const auto moved = static_cast<std::size_t>(completion.result);
        pending_.push_front({slot.request, slot.op, slot.fd, slot.address + moved,
                             slot.nbytes - moved, slot.offset + static_cast<std::int64_t>(moved)});
      } else {
        finish_piece(slot, 0, "");
      }
    }
    completions.clear();
    while (!free_slots_.empty() && !pending_.empty()) {
      const Piece piece = pending_.front();
      pending_.pop_front();
      const std::uint32_t id = free_slots_.back();
      free_slots_.pop_back();
      Slot& slot = slots_[id];
      slot.op = piece.op;
      slot.fd = piece.fd;
      slot.address = piece.address;
      slot.nbytes = piece.nbytes;
      slot.offset = piece.offset;
      slot.request = piece.request;
      batch.push_back(id);
    }
    if (stopping_ && batch.empty() && pending_.empty() && free_slots_.size() == depth_) return;
    // Unlocked: on a buffered file Linux AIO's io_submit does the whole copy itself.
    lock.unlock();
    if (!batch.empty()) backend_->submit(batch, slots_, completions);
  }
}

void IoQueue::wait(std::uint64_t id) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (requests_.count(id) == 0) {
    throw std::invalid_argument("unknown request id " + std::to_string(id) +
                                ": it was never submitted or was already waited for");
  }
  // Look the request up afresh after each wake-up: other submits may rehash the table.
  finished_.wait(lock, [&] { return requests_.at(id).pieces_left == 0; });
  const Request request = std::move(requests_.at(id));
  requests_.erase(id);
  if (request.error != 0) throw OsError(request.error, request.message);
}

bool IoQueue::done(std::uint64_t id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = requests_.find(id);
  if (found == requests_.end()) {
    throw std::invalid_argument("unknown request id " + std::to_string(id) +
                                ": it was never submitted or was already waited for");
  }
  return found->second.pieces_left == 0;
}

void IoQueue::wait_all() {
  std::unique_lock<std::mutex> lock(mutex_);
  finished_.wait(lock, [&] {
    for (const auto& entry : requests_) {
      if (entry.second.pieces_left != 0) return false;
    }
    return true;
  });
  const Request* first_failure = nullptr;
  std::uint64_t first_id = 0;
  for (const auto& entry : requests_) {
    if (entry.second.error != 0 && (first_failure == nullptr || entry.first < first_id)) {
      first_failure = &entry.second;
      first_id = entry.first;
    }
  }
  if (first_failure != nullptr) {
    const OsError error(first_failure->error, first_failure->message);
    requests_.clear();
    throw error;
  }
  requests_.clear();
}

std::size_t IoQueue::outstanding() {
  std::lock_guard<std::mutex> lock(mutex_);
  return requests_.size();
}

void IoQueue::close() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  signal();
  std::call_once(joined_, [this] { worker_.join(); });
}

}  // namespace ds_aio
