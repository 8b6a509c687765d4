// IoQueue: asynchronous file reads and writes with several requests in flight.
//
// The caller submits a request (file descriptor, address, size, offset) and gets an id
// back at once; a worker thread splits the request into block_size pieces, keeps up to
// queue_depth of them with the kernel (io_uring or Linux AIO), resubmits short transfers
// and records the first error. wait(id) blocks until a request is done and reports its
// error. The caller keeps the memory alive and untouched until then.
//
// Every public method takes one mutex, so any number of producer threads may share a
// queue. Requests on an O_DIRECT descriptor must be aligned (address, size and offset
// multiples of kAlignment); submit checks this, so the kernel never sees a misaligned
// O_DIRECT request.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "io_backend.h"

namespace ds_aio {

class IoQueue {
 public:
  IoQueue(unsigned queue_depth, std::size_t block_size, const std::string& backend);
  ~IoQueue();
  IoQueue(const IoQueue&) = delete;
  IoQueue& operator=(const IoQueue&) = delete;

  std::uint64_t submit(Op op, int fd, std::uintptr_t address, std::size_t nbytes, std::int64_t offset);
  // Blocks until request `id` is done, then forgets it; throws OsError if it failed.
  void wait(std::uint64_t id);
  // Whether request `id` is done (it stays known until waited for).
  bool done(std::uint64_t id);
  // Waits for and forgets every request; throws the first failure among them.
  void wait_all();
  // Requests submitted and not yet waited for.
  std::size_t outstanding();
  // Finishes the I/O in flight and stops the worker; later submits throw.
  void close();

  const char* backend_name() const { return backend_->name(); }
  unsigned queue_depth() const { return depth_; }
  std::size_t block_size() const { return block_size_; }

 private:
  struct Piece {
    std::uint64_t request;
    Op op;
    int fd;
    char* address;
    std::size_t nbytes;
    std::int64_t offset;
  };
  struct Request {
    std::size_t pieces_left = 0;
    int error = 0;
    std::string message;
  };

  void run();
  void finish_piece(const Slot& slot, int error, const char* reason);
  void signal();

  const unsigned depth_;
  const std::size_t block_size_;
  int eventfd_ = -1;
  std::unique_ptr<Backend> backend_;

  std::mutex mutex_;
  std::condition_variable finished_;
  std::deque<Piece> pending_;
  std::unordered_map<std::uint64_t, Request> requests_;
  std::uint64_t next_id_ = 1;
  bool stopping_ = false;

  // Owned by the worker thread alone.
  std::vector<Slot> slots_;
  std::vector<std::uint32_t> free_slots_;
  std::thread worker_;
  std::once_flag joined_;
};

}  // namespace ds_aio
